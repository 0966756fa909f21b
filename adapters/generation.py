"""Attention of ``model.generate()``: prefill plus one row per new token, stored as one causal map.

During generation a decoder's attention modules run once for the prompt (the prefill, every
prompt row) and then once per new token, with one query row over a key/value cache that grows by
one key each step. A :class:`GenerationRun` receives every call (from the attention-interface tap
of :mod:`attnformat.adapters.kernel`), places each row at its token's index in the final
sequence, and writes, when ``generate`` returns, ordinary sites over prompt + generated tokens:

- ``decoder/self``: a causal map over the final sequence (dense, top-k, statistics and head-mean
  sites as the capture's :class:`~attnformat.adapters.keep.Keep` asks), with coordinates
  ``query_generation_step``/``key_generation_step`` (-1 for prompt tokens, t for the token step t
  produced: step 0 is the token the prefill produced), readable labels (``query_label``: `` cat``)
  and the tokenizer's raw pieces (``query_token``: ``Ġcat``);
- encoder-decoder models (T5, BART, Whisper): ``encoder/self`` once, and ``decoder/self`` and
  ``decoder/cross`` (decoder rows over encoder keys) growing the same way.

What is stored, exactly:

- **Rows.** Row ``i`` is the attention of token ``i`` as a query. The model never reads the last
  token it produced (generation stops there), so that row was never computed: it holds NaN
  ("not captured"). To see what produced token ``i``, read row ``i - 1``.
- **Samples.** One per returned sequence: ``num_return_sequences`` > 1 gives ``batch x n``
  samples in ``generate``'s order (prompt 0's sequences first). Encoder sites are repeated to
  match, so sample ``s`` is one sequence in every site.
- **Padding.** Batched prompts are left-padded; the map's token axis is the padded sequence
  (``query_position`` is the index), and ``query_mask``/``key_mask`` are false on padding. Rows of
  padding queries are 0 (dense) and NaN (top-k, statistics): the model computes nothing
  meaningful there. Tokens ``generate`` appends after a sequence finished (its pad token) are kept
  as the model ran them, with their masks true (the model attended to them).
- **Values.** The weights are those the model's eager implementation returns with
  ``output_attentions=True`` for one forward pass over the final sequence (with the same mask and
  position ids), recomputed from the query and key each call received while the model ran its
  own kernel (SDPA, flash...).

Greedy search and sampling are supported (any logits processors); beam search and assisted
decoding reorder or rewrite the cache between steps and raise
:class:`~attnformat.adapters.errors.UnsupportedModelError`.

Use it through :func:`attnformat.adapters.huggingface.capture`, which installs it (:func:`install`)::

    with huggingface.capture(model, "gen.attn.zarr", tokenizer=tokenizer, keep=Keep(top_k=32, statistics=True)):
        sequences = model.generate(**prompts, max_new_tokens=64)

One ``generate`` call per capture: its file holds that call's sequences as samples.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from attnformat.adapters import tokens as token_text
from attnformat.adapters.errors import CaptureStateError, UnsupportedModelError
from attnformat.adapters.keep import Keep
from attnformat.adapters.kernel import WeightsCall
from attnformat.adapters.reductions import RowReducer

#: Memory budget of the rows staged before they are reduced together (top-k, statistics, head
#: means are computed once per batch of decoding steps, not once per step and layer).
STAGE_BYTES = 32 * 2**20
#: At most this many decoding steps are staged before a reduction.
STAGE_ROWS = 32
_MASKED = torch.finfo(torch.float32).min


@dataclass
class _SiteState:
    """Rows received for one site (all its layers), grown as generation runs."""

    name: str
    attention_type: str
    causal: bool
    layers: int
    keep: Keep
    decoder: bool
    batch: int = 0
    heads: int = 0
    capacity: int = 0
    key_capacity: int = 0
    key_total: int = 0  # keys seen so far (self-attention: tokens; cross-attention: encoder tokens)
    buffers: dict = field(default_factory=dict)
    key_valid: np.ndarray | None = None
    stage: dict | None = None


class GenerationRun:
    """Accumulate the attention rows of one ``generate`` call and write them as sites.

    Parameters
    ----------
    sites
        ``{module path: (site, layer)}`` of the captured attention modules.
    keeps
        One :class:`~attnformat.adapters.keep.Keep` per site name (what to write).
    attention_types
        ``{site: "self" | "cross"}``.
    causal
        ``{site: bool}``: causal self-attention sites are the decoder's and grow with generation.
    layer_counts
        ``{site: number of layers}``.

    The tap's handler is :meth:`add`; :meth:`watch` registers the hooks that see the token ids
    the model is fed; :meth:`write` writes the sites once ``generate`` has returned. Dense rows
    go straight into per-site buffers that grow by doubling; the reductions (top-k, statistics,
    head means, by :class:`~attnformat.adapters.reductions.RowReducer`) of the prompt run on its
    blocks of rows as they come, and those of decoding steps on a batch of steps at a time, so
    that a step costs the tap's recomputation and one copy per layer.

    Examples
    --------
    >>> run = GenerationRun({"h.0.attn": ("decoder/self", 0)}, {"decoder/self": Keep()}, {"decoder/self": "self"},
    ...                     {"decoder/self": True}, {"decoder/self": 1})
    >>> run.rows_captured("decoder/self")
    0
    """

    def __init__(self, sites: Mapping[str, tuple[str, int]], keeps: Mapping[str, Keep], attention_types: Mapping[str, str],
                 causal: Mapping[str, bool], layer_counts: Mapping[str, int]):
        self.sites = dict(sites)
        self.states: dict[str, _SiteState] = {}
        for site in dict.fromkeys(site for site, _ in self.sites.values()):
            kind = attention_types[site]
            self.states[site] = _SiteState(site, kind, bool(causal.get(site)) and kind == "self", int(layer_counts[site]),
                                           keeps[site], decoder=kind == "cross" or bool(causal.get(site)))
        self._rows_seen: dict[str, int] = {}
        self._prompt_rows: dict[str, int] = {}  # rows of a site's first call: the prompt (prefill)
        self.fed_ids: list[torch.Tensor] = []
        self.encoder_ids: torch.Tensor | None = None
        self._fed_missing = False

    # -- receiving ---------------------------------------------------------------------------
    def add(self, call) -> None:
        """Take one attention call (an :class:`~attnformat.adapters.kernel.AttentionCall`): place its rows.

        Rows go to the positions this module has not filled yet (the prompt first, then one per
        step), and the call's keys to the tokens they belong to.

        Examples
        --------
        >>> GenerationRun.add.__name__
        'add'
        """
        path = call.module_path
        site, layer = self.sites[path]
        state = self.states[site]
        start = self._rows_seen.get(path, 0)
        count, keys = int(call.query_count), int(call.key_count)
        end = start + count
        self._rows_seen[path] = end
        if start == 0:
            self._prompt_rows.setdefault(site, count)
        if state.attention_type == "self":
            # The cache holds the keys of tokens [0, end): a static cache has more slots (empty,
            # masked), a sliding-window cache only the last ones.
            used = min(keys, end)
            key_offset, key_total = end - used, end
        else:
            used, key_offset, key_total = keys, 0, keys
        if state.batch == 0:
            state.batch, state.heads = int(call.batch), int(call.heads)
        elif (state.batch, state.heads) != (int(call.batch), int(call.heads)):
            raise CaptureStateError(f"{site} [layer={layer}]: a call with batch {call.batch} x {call.heads} heads after "
                                    f"{state.batch} x {state.heads}; one generate() per capture")
        self._grow(state, end, max(key_total, state.key_total))
        state.key_total = max(state.key_total, key_total)
        if start == 0 or isinstance(call, WeightsCall):
            # Padding is known from a module's first call (the prompt, or the encoder's keys); the keys decoding steps
            # add are generated tokens, which generate() always attends to. Weights in hand (eager) tell padding only
            # by zero weight, which the prompt's padding rows (spread evenly over every key) do not show.
            state.key_valid[:, key_offset:key_offset + used] &= call.key_valid()[:, :used].cpu().numpy()
        dense = layer in _dense_layers(state)
        if count > self._stage_size(state):
            self._reduce_call(state, layer, call, start, key_offset, used, dense)
            return
        logits, _ = call.block_logits(slice(0, count), trim=False)
        logits = logits[..., :used]
        if dense:
            self._store_dense(state, layer, slice(start, end), torch.softmax(logits, dim=-1), key_offset)
        if _needs_reductions(state.keep):
            self._stage_logits(state, layer, start, logits, key_offset)

    def rows_captured(self, site: str) -> int:
        """How many query rows of ``site`` every layer has received.

        Examples
        --------
        >>> GenerationRun.rows_captured.__name__
        'rows_captured'
        """
        counts = [self._rows_seen.get(path, 0) for path, (name, _) in self.sites.items() if name == site]
        return min(counts) if counts else 0

    def watch(self, model) -> list:
        """Hooks that record the token ids fed to ``model`` (and to its encoder); returns removable handles.

        Examples
        --------
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> run = GenerationRun({}, {}, {}, {}, {})
        >>> handles = run.watch(GPT2LMHeadModel(GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=50)))
        >>> len(handles)
        1
        """
        handles = [model.register_forward_pre_hook(self._on_forward, with_kwargs=True)]
        encoder = model.get_encoder() if getattr(getattr(model, "config", None), "is_encoder_decoder", False) else None
        if encoder is not None and encoder is not model:
            handles.append(encoder.register_forward_pre_hook(self._on_encoder, with_kwargs=True))
        return handles

    def _on_forward(self, module, args, kwargs):
        encoder_decoder = getattr(module.config, "is_encoder_decoder", False)
        ids = kwargs.get("decoder_input_ids") if encoder_decoder else kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor) and not ids.dtype.is_floating_point:
            self.fed_ids.append(ids.detach().to("cpu", copy=True))
        else:
            self._fed_missing = True  # inputs_embeds: the tokens are not known

    def _on_encoder(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor) and not ids.dtype.is_floating_point:
            self.encoder_ids = ids.detach().to("cpu", copy=True)

    # -- buffers -----------------------------------------------------------------------------
    def _grow(self, state: _SiteState, rows: int, keys: int) -> None:
        """Make room for ``rows`` query rows and ``keys`` keys (doubling, so growth costs O(total))."""
        key_need = keys if state.attention_type == "cross" else max(keys, rows)
        if rows <= state.capacity and key_need <= state.key_capacity:
            return
        capacity = max(rows, 2 * state.capacity, 16) if rows > state.capacity else state.capacity
        key_capacity = max(key_need, state.key_capacity) if state.attention_type == "cross" else max(key_need, capacity)
        keep = state.keep
        batch, heads, layers = state.batch, state.heads, state.layers
        new: dict[str, np.ndarray] = {}
        dense_layers = _dense_layers(state)
        if dense_layers:
            new["weights"] = np.zeros((len(dense_layers), batch, len(_dense_heads(state)), capacity, key_capacity), np.float32)
        if keep.head_mean:
            new["head_mean"] = np.zeros((layers, batch, capacity, key_capacity), np.float32)
        if keep.top_k:
            new["topk_weights"] = np.full((layers, batch, heads, capacity, keep.top_k), np.nan, np.float32)
            new["key_index"] = np.full((layers, batch, heads, capacity, keep.top_k), -1, np.int32)
            new["omitted_weight"] = np.full((layers, batch, heads, capacity), np.nan, np.float32)
        for name in _statistics(state):
            integer = name == "top_key"
            new[name] = np.full((layers, batch, heads, capacity), -1 if integer else np.nan, np.int32 if integer else np.float32)
        for name, array in state.buffers.items():
            new[name][tuple(slice(0, size) for size in array.shape)] = array
        state.buffers = new
        valid = np.ones((batch, key_capacity), bool)
        if state.key_valid is not None:
            valid[:, :state.key_valid.shape[1]] = state.key_valid
        state.key_valid = valid
        state.capacity, state.key_capacity = capacity, key_capacity

    def _store_dense(self, state: _SiteState, layer: int, rows: slice, weights, key_offset: int) -> None:
        heads = _dense_heads(state)
        if len(heads) != state.heads:
            weights = weights[:, heads]
        weights = weights.numpy() if isinstance(weights, torch.Tensor) else weights
        keys = slice(key_offset, key_offset + weights.shape[-1])
        state.buffers["weights"][_dense_layers(state).index(layer), :, :, rows, keys] = weights

    def _first_keys(self, state: _SiteState) -> torch.Tensor:
        """Each sample's first valid key over the site's keys so far (the sink)."""
        valid = state.key_valid[:, :max(state.key_total, 1)]
        return torch.from_numpy(np.where(valid.any(-1), valid.argmax(-1), 0).astype(np.int64))

    def _reducer(self, state: _SiteState, rows: int, key_count: int, positions, *, dense: bool) -> RowReducer:
        # Keep.rows selects rows of the final sequence: applied when writing, not per call.
        keep = replace(state.keep, rows=None)
        return RowReducer(state.batch, state.heads, rows, key_count, keep, dense=dense, query_positions=positions,
                          first_keys=self._first_keys(state), local=state.attention_type == "self")

    def _reduce_call(self, state: _SiteState, layer: int, call, start: int, key_offset: int, used: int, dense: bool) -> None:
        """The prompt (or an encoder call): reduce its blocks of rows as the tap yields them."""
        count = int(call.query_count)
        if not (dense or _needs_reductions(state.keep)):
            return
        positions = torch.arange(start, start + count)
        reducer = self._reducer(state, count, key_offset + int(call.key_count), positions, dense=dense)
        for rows in call.row_slices():
            logits, first = call.block_logits(rows)
            reducer.add(rows, logits, key_offset + first)
        self._place(state, layer, start, reducer.result(), key_offset + used)

    def _place(self, state: _SiteState, layer: int, start: int, result: Mapping[str, np.ndarray], key_end: int) -> None:
        """Copy a reducer's result for rows ``start...`` of one layer into the site's buffers."""
        buffers = state.buffers
        for name, values in result.items():
            rows = slice(start, start + values.shape[2] if name != "head_mean" else start + values.shape[1])
            if name == "weights":
                buffers["weights"][_dense_layers(state).index(layer), :, :, rows, :key_end] = values[..., :key_end]
            elif name == "head_mean":
                buffers["head_mean"][layer, :, rows, :key_end] = values[..., :key_end]
            elif name in buffers:
                buffers[name][layer, :, :, rows] = values

    def _stage_size(self, state: _SiteState) -> int:
        row_bytes = state.layers * state.batch * state.heads * max(state.key_capacity, 1) * 4
        return max(1, min(STAGE_ROWS, STAGE_BYTES // max(row_bytes, 1)))

    def _stage_logits(self, state: _SiteState, layer: int, start: int, logits: torch.Tensor, key_offset: int) -> None:
        """Keep decoding rows until a batch of steps is complete; the reducer then takes every layer's rows at once."""
        stage = state.stage
        end = start + logits.shape[2]
        if stage is not None and (start < stage["start"] or end > stage["start"] + stage["logits"].shape[3] or stage["key_offset"] != key_offset):
            self._flush(state)
            stage = None
        if stage is None:
            stage = {"start": start, "key_offset": key_offset, "filled": [start] * state.layers,
                     "logits": torch.full((state.layers, state.batch, state.heads, self._stage_size(state),
                                           state.key_capacity - key_offset), _MASKED)}
            state.stage = stage
        width = logits.shape[-1]
        if width > stage["logits"].shape[-1]:
            wider = torch.full(stage["logits"].shape[:-1] + (state.key_capacity - key_offset,), _MASKED)
            wider[..., :stage["logits"].shape[-1]] = stage["logits"]
            stage["logits"] = wider
        stage["logits"][layer, :, :, start - stage["start"]:end - stage["start"], :width] = logits
        stage["filled"][layer] = max(stage["filled"][layer], end)

    def _flush(self, state: _SiteState) -> None:
        stage, state.stage = state.stage, None
        if stage is None:
            return
        width = state.key_total - stage["key_offset"]
        for layer, filled in enumerate(stage["filled"]):
            count = filled - stage["start"]
            if count <= 0:
                continue
            positions = torch.arange(stage["start"], filled)
            reducer = self._reducer(state, count, stage["key_offset"] + width, positions, dense=False)
            reducer.add(slice(0, count), stage["logits"][layer, :, :, :count, :width], stage["key_offset"])
            self._place(state, layer, stage["start"], reducer.result(), stage["key_offset"] + width)

    def flush(self) -> None:
        """Reduce the rows still staged (:meth:`write` calls it).

        Examples
        --------
        >>> GenerationRun({}, {}, {}, {}, {}).flush()
        """
        for state in self.states.values():
            self._flush(state)

    # -- writing -----------------------------------------------------------------------------
    def write(self, recorder, sequences, *, tokenizer=None, tokens: Mapping[str, Mapping] | None = None) -> None:
        """Write every site of this run through ``recorder`` (a :class:`~attnformat.adapters.Recorder`).

        ``sequences`` is what ``generate`` returned (ids, or an output with ``.sequences``): its
        last column is the last token, which no call read. ``tokenizer`` gives readable labels
        and raw pieces; ``tokens`` adds per-site :meth:`~attnformat.adapters.Recorder.describe`
        keywords (attributes, coordinates).

        Examples
        --------
        >>> GenerationRun.write.__name__
        'write'
        """
        self.flush()
        sequences = getattr(sequences, "sequences", sequences)
        decoder = [state for state in self.states.values() if state.decoder and state.batch]
        if not decoder:
            raise CaptureStateError(f"{recorder.path}: generate() made no decoder attention call inside the capture; nothing to write")
        main = next((state for state in decoder if state.attention_type == "self"), decoder[0])
        fed = self.rows_captured(main.name)
        total, batch = fed + 1, main.batch
        steps = np.full(total, -1, dtype=np.int64)
        prefill = self._prompt_rows.get(main.name, 1)
        steps[prefill:] = np.arange(total - prefill)
        decoder_tokens = {"mask": self._valid(main, total), "generation_steps": steps}
        ids = self._decoder_ids(sequences, batch, total)
        if ids is not None and tokenizer is not None:
            decoder_tokens.update(token_text.token_description(tokenizer, ids))
        encoder = next((state for state in self.states.values() if not state.decoder and state.batch), None)
        cross = next((state for state in decoder if state.attention_type == "cross"), None)
        encoder_tokens: dict = {}
        encoder_length = None
        if encoder is not None:
            encoder_length = self.rows_captured(encoder.name)
            encoder_tokens = {"mask": _repeat_samples(self._valid(encoder, encoder_length), batch)}
            if self.encoder_ids is not None and tokenizer is not None and self.encoder_ids.shape[-1] == encoder_length:
                encoder_tokens.update(token_text.token_description(tokenizer, _repeat_samples(self.encoder_ids.numpy(), batch)))
        elif cross is not None:
            encoder_tokens = {"mask": self._valid(cross, cross.key_total)}
        for state in self.states.values():
            if not state.batch:
                continue
            if state.decoder:
                query_side = decoder_tokens
                key_side = decoder_tokens if state.attention_type == "self" else encoder_tokens
                sizes = (total, total if state.attention_type == "self" else state.key_total)
            else:
                query_side = key_side = encoder_tokens
                sizes = (encoder_length, encoder_length)
            self._write_site(recorder, state, batch, sizes, query_side, key_side, dict((tokens or {}).get(state.name, {})),
                             encoder.name if encoder is not None else None)

    def _decoder_ids(self, sequences, batch: int, total: int):
        """Token ids of the final decoder sequences: every id fed, then the last one produced (None if unknown)."""
        if self._fed_missing or not self.fed_ids or sequences is None:
            return None
        ids = torch.cat(self.fed_ids + [torch.as_tensor(sequences)[:, -1:].cpu()], dim=1)
        return ids.numpy() if tuple(ids.shape) == (batch, total) else None

    def _valid(self, state: _SiteState, length: int) -> np.ndarray:
        """Token validity (not padding) per sample over ``length`` tokens; tokens no call showed count as valid."""
        valid = np.ones((state.batch, length), bool)
        known = min(length, state.key_valid.shape[1], state.key_total)
        valid[:, :known] = state.key_valid[:, :known]
        return valid

    def _write_site(self, recorder, state: _SiteState, batch: int, sizes: tuple[int, int], query_side: dict, key_side: dict,
                    user: dict, encoder_site: str | None) -> None:
        keep, buffers = state.keep, state.buffers
        query_count, key_count = sizes
        captured = min(query_count, self.rows_captured(state.name))
        padding = ~np.asarray(query_side["mask"], bool)[:, :query_count]  # padding queries: nothing meaningful computed there
        attrs = {"attention_type": state.attention_type, "causal": int(state.causal), "describes": state.name}
        if state.attention_type == "cross" and encoder_site:
            attrs["key_site"] = encoder_site
        attrs.update(user.pop("attrs", None) or {})
        description = {**{f"query_{k}": v for k, v in query_side.items()}, **{f"key_{k}": v for k, v in key_side.items()}, **user}
        description.setdefault("query_positions", np.arange(query_count))
        description.setdefault("key_positions", np.arange(key_count))
        layers = list(range(state.layers))

        def rows(name: str, position: int, fill) -> np.ndarray:
            """One layer of a buffer over the final sequence: (sample, [head,] query, ...), one sample per sequence.

            Rows never computed hold ``fill`` (NaN, -1); dense keys beyond the buffer (the last token
            was never a key) weigh 0; rows of padding queries are 0 (dense) or ``fill``. One layer at
            a time, so writing holds one layer's copy, not the whole buffer's.
            """
            array = buffers[name][position]
            square = name in ("weights", "head_mean")
            row_axis = array.ndim - 2 if square else (2 if array.ndim == 4 else array.ndim - 1)
            shape = list(array.shape)
            shape[row_axis] = query_count
            if square:
                shape[-1] = key_count
            out = np.full(shape, 0 if square else fill, array.dtype)
            source = [slice(None)] * array.ndim
            source[row_axis] = slice(0, captured)
            if square:
                source[-1] = slice(0, min(key_count, array.shape[-1]))
                uncaptured = [slice(None)] * array.ndim
                uncaptured[row_axis] = slice(captured, None)
                out[tuple(uncaptured)] = fill
            out[tuple(source)] = array[tuple(source)]
            out = _repeat_samples(out, batch, axis=0)
            samples, queries = np.nonzero(padding)
            index = [samples] + [slice(None)] * (row_axis - 1) + [queries]
            out[tuple(index)] = 0 if square else fill
            return out

        if "weights" in buffers:
            site_description = dict(description, layers=_dense_layers(state), heads=_dense_heads(state))
            selected = _selected_rows(keep, query_count)
            if selected is not None:
                site_description.update({key: np.asarray(value)[..., selected] for key, value in description.items()
                                         if key.startswith("query_") and value is not None})
            self._declare(recorder, state.name, site_description, attrs)
            for position, layer in enumerate(_dense_layers(state)):
                dense = rows("weights", position, np.nan)
                recorder.log(state.name, layer=layer, weights=dense if selected is None else dense[:, :, selected],
                             dims=("sample", "head", "query", "key"))
        if keep.head_mean:
            site = f"{state.name}_mean"
            self._declare(recorder, site, dict(description, layers=layers), {**attrs, "head_reduction": "mean"})
            for layer in layers:
                recorder.log(site, layer=layer, weights=rows("head_mean", layer, np.nan), dims=("sample", "query", "key"))
        if keep.top_k:
            site = f"{state.name}_topk"
            self._declare(recorder, site, dict(description, layout="topk", layers=layers),
                          {**attrs, "top_k": int(keep.top_k), "key_count": int(key_count)})
            for layer in layers:
                recorder.log(site, layer=layer, weights=rows("topk_weights", layer, np.nan), key_index=rows("key_index", layer, -1),
                             omitted_weight=rows("omitted_weight", layer, np.nan), dims=("sample", "head", "query", "rank"))
        statistics = _statistics(state)
        if statistics:
            site = f"{state.name}_stats"
            stat_attrs = {**attrs, "key_count": int(key_count)}
            if "local_weight" in statistics:
                stat_attrs["local_window"] = int(keep.window)
            self._declare(recorder, site, dict(description, layout="statistics", layers=layers), stat_attrs)
            for layer in layers:
                values = {name: rows(name, layer, -1 if name == "top_key" else np.nan) for name in statistics}
                recorder.log(site, layer=layer, dims=("sample", "head", "query"), **values)

    @staticmethod
    def _declare(recorder, site: str, description: dict, attrs: dict) -> None:
        if site in recorder.sites:
            raise CaptureStateError(f"{recorder.path}:{site}: already written in this capture (generate() ran twice, or after a forward "
                                    f"call); capture one generate() per file, with several prompts as one batch")
        recorder.describe(site, **description, attrs=attrs)

    def site_names(self) -> list[str]:
        """Every site this run may write (the dense site and its derived sites, as the keeps say).

        Examples
        --------
        >>> GenerationRun({"h.0.attn": ("decoder/self", 0)}, {"decoder/self": Keep(top_k=2)}, {"decoder/self": "self"},
        ...               {"decoder/self": True}, {"decoder/self": 1}).site_names()
        ['decoder/self', 'decoder/self_topk']
        """
        names = []
        for state in self.states.values():
            keep = state.keep
            names += [state.name] if _dense_layers(state) else []
            names += [f"{state.name}_mean"] if keep.head_mean else []
            names += [f"{state.name}_topk"] if keep.top_k else []
            names += [f"{state.name}_stats"] if keep.statistic_names else []
        return names


def _needs_reductions(keep: Keep) -> bool:
    return bool(keep.top_k or keep.statistic_names or keep.head_mean)


def _statistics(state: _SiteState) -> tuple[str, ...]:
    """The statistics a site keeps; ``local_weight`` only for self-attention (a cross-attention's
    query and key positions are not on one axis)."""
    return tuple(name for name in state.keep.statistic_names if name != "local_weight" or state.attention_type == "self")


def _dense_layers(state: _SiteState) -> list[int]:
    return [layer for layer in range(state.layers) if state.keep.keeps_layer(layer)]


def _dense_heads(state: _SiteState) -> list[int]:
    heads = state.keep.heads
    return list(range(state.heads)) if heads is None else [int(h) for h in heads if 0 <= int(h) < state.heads]


def _selected_rows(keep: Keep, count: int):
    if keep.rows is None:
        return None
    if isinstance(keep.rows, slice):
        return np.arange(count)[keep.rows]
    return np.asarray([row for row in keep.rows if 0 <= row < count], dtype=np.int64)


def _repeat_samples(values: np.ndarray, batch: int, axis: int = 0) -> np.ndarray:
    """Encoder results have one sample per prompt, decoder results one per returned sequence: repeat to match."""
    values = np.asarray(values)
    size = values.shape[axis]
    if size == batch or size == 0 or batch % size:
        return values
    return np.repeat(values, batch // size, axis=axis)


# -- the generate() wrapper -------------------------------------------------------------------------
def check_generation_mode(model, kwargs: Mapping) -> None:
    """Raise :class:`UnsupportedModelError` for decoding strategies whose rows cannot be laid on one sequence.

    Beam search reorders the cache between steps (a row's keys then belong to another
    hypothesis) and assisted or prompt-lookup decoding feeds several guessed tokens at once and
    rolls back the rejected ones.

    Examples
    --------
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=50))
    >>> check_generation_mode(model, {"do_sample": True})
    >>> try:
    ...     check_generation_mode(model, {"num_beams": 2})
    ... except UnsupportedModelError as error:
    ...     print(str(error).split(":")[0])
    generate(num_beams=2)
    """
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
    if int(beams) > 1:
        raise UnsupportedModelError(f"generate(num_beams={beams}): beam search reorders the cache between steps, so rows do not "
                                    f"form one sequence; capture greedy search or sampling (num_beams=1, do_sample=...)")
    for name in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit"):
        value = kwargs.get(name, getattr(config, name, None))
        if value is not None:
            raise UnsupportedModelError(f"generate({name}=...): assisted decoding feeds guessed tokens and rolls back the rejected "
                                        f"ones; capture plain greedy search or sampling")


def install(session) -> _GenerateHandle:
    """Make ``session.model.generate`` capture its attention into ``session.recorder`` while installed.

    ``session`` is a capture session (:class:`~attnformat.adapters.huggingface.HuggingFaceCapture`
    or the one :func:`capture_generation` builds) with ``model``, ``recorder``, ``sites``
    (``{module path: (site, layer)}``), ``keeps`` (``{site: Keep}``), ``causal``,
    ``site_kinds`` (``{site: "attentions" | "cross_attentions"}``), ``layer_counts``, ``tokens``,
    ``tokenizer`` and a settable ``call_handler`` (where the kernel tap sends each attention call).
    ``generate`` is wrapped on the model instance; the returned handle's ``remove()`` restores it.

    Examples
    --------
    >>> import torch, tempfile, pathlib, attnformat
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> from attnformat.adapters import huggingface
    >>> model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, attn_implementation="sdpa")).eval()
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "gen.attn.zarr"
    >>> with huggingface.capture(model, out, keep=Keep(top_k=2, statistics=True)):  # installs this module's generate()
    ...     sequences = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    >>> site = attnformat.open(out)["decoder/self"]
    >>> site["weights"].sizes["query"], site["query_generation_step"].values.tolist()
    (7, [-1, -1, -1, 0, 1, 2, 3])
    >>> bool(site["weights"].isel(query=-1).isnull().all())  # the last token was never read: its row is not captured
    True
    """
    return _GenerateHandle(session)


class _GenerateHandle:
    """Wraps ``model.generate`` for one capture session; ``remove()`` undoes it."""

    def __init__(self, session):
        self.session = session
        model = session.model
        self.model = model
        self._had_attribute = "generate" in vars(model)
        self._previous = vars(model).get("generate")
        original = model.generate
        self.runs = 0

        @functools.wraps(original)
        def generate(*args, **kwargs):
            return self._generate(original, *args, **kwargs)

        model.generate = generate

    def _generate(self, original, *args, **kwargs):
        session = self.session
        check_generation_mode(self.model, kwargs)
        if self.runs:
            raise CaptureStateError(f"{session.recorder.path}: generate() ran twice in one capture; capture one generate() per file "
                                    f"(several prompts go in as one batch)")
        self.runs += 1
        kinds = {site: "cross" if kind == "cross_attentions" else "self" for site, kind in session.site_kinds.items()}
        run = GenerationRun(session.sites, session.keeps, kinds, session.causal, session.layer_counts)
        written = [site for site in run.site_names() if site in session.recorder.sites]
        if written:
            raise CaptureStateError(f"{session.recorder.path}: sites {written} were already written in this capture (by a forward "
                                    f"call); capture generate() in a capture of its own")
        previous_handler = session.call_handler
        session.call_handler = run.add
        handles = run.watch(self.model)
        try:
            output = original(*args, **kwargs)
        finally:
            session.call_handler = previous_handler
            for handle in handles:
                handle.remove()
        run.write(session.recorder, output, tokenizer=getattr(session, "tokenizer", None), tokens=getattr(session, "tokens", None))
        return output

    def remove(self) -> None:
        if self._had_attribute:
            self.model.generate = self._previous
        else:
            vars(self.model).pop("generate", None)
