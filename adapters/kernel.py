"""A tap on Hugging Face's attention interface: weights recomputed in row blocks while the model runs its own kernel.

``transformers`` attention modules compute their query and key states (after rotary embeddings,
with the key/value cache applied) and hand them to an attention function looked up by name in
``ALL_ATTENTION_FUNCTIONS`` (``"sdpa"``, ``"flash_attention_2"``, ``"flex_attention"``...) or to
the module file's ``eager_attention_forward``. While a :class:`KernelTap` is active, that
function is wrapped for the captured modules only: the model's own function still runs and its
output is returned unchanged (the model never switches to eager attention), and the wrapper
hands an :class:`AttentionCall` to a handler. The call recomputes the weights from the query
and key the kernel received, with the call's scaling, logit softcapping, mask (boolean or
additive, including a relative position bias) or, when the mask is ``None``, the causal flag
and sliding window, in blocks of query rows sized by a memory budget: memory holds one block
(batch x heads x rows x keys, float32), never a layer.

The recomputed weights are what the model's eager implementation returns with
``output_attentions=True`` (tests check it value by value for GPT-2, Llama, Mistral, Gemma-2,
BERT, T5, BART, ViT, Whisper and CLIP), computed in float32 whatever the model's dtype.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator, Mapping

import torch

from attnformat.adapters.errors import UnsupportedModelError
from attnformat.adapters.fused import MASKED_BELOW

#: Default memory budget of one block of weights (batch x heads x rows x keys float32): 8 MiB, about
#: what stays in the CPU's caches while the block is reduced (larger blocks are slower, not faster).
#: The reductions hold about three such blocks at once.
DEFAULT_BLOCK_BYTES = 8 * 2**20
_MIN = torch.finfo(torch.float32).min


class AttentionCall:
    """One attention call of a captured module, as the kernel received it.

    Built by :class:`KernelTap` and handed to its handler while the call runs; valid only
    during the handler (it holds the call's query and key tensors).

    Attributes
    ----------
    module, module_path, site, layer
        The attention module, its path in the model, and the site and layer it is captured as.
    call_index
        How many times this module ran before in this capture (0 on its first call; during
        ``generate`` the prefill is 0 and each new token one more).
    attention_type, causal
        ``"self"`` or ``"cross"``; whether the call is causal (its ``is_causal``, or the
        module's) — the mask, when given, is what decides the weights.
    batch, heads, query_count, key_count
        Sizes: ``heads`` counts query heads (grouped key heads are repeated, as eager does).
    query_positions
        Each query row's position along this call's key axis (int64, ``(query_count,)``): for
        self-attention ``key_count - query_count + i`` (a one-token decoding step with a cache is
        at ``key_count - 1``), or ``i`` when the call has no mask and is causal with more keys
        than queries (SDPA then aligns the causal mask top-left: an empty static cache); for
        cross-attention ``i``. ``position_ids`` is the model's own keyword, as passed (or None).
    scaling, softcap, sliding_window
        As the call received them (``scaling`` defaults to ``head_dim ** -0.5``).

    Examples
    --------
    >>> import torch
    >>> from transformers import GPT2Config, GPT2Model
    >>> model = GPT2Model(GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=50, attn_implementation="sdpa")).eval()
    >>> seen = []
    >>> with KernelTap(model, {"h.0.attn": ("decoder/self", 0)}, lambda call: seen.append(call.weights(slice(0, 3)).sum(-1))):
    ...     _ = model(torch.tensor([[1, 2, 3]]))
    >>> torch.allclose(seen[0], torch.ones(1, 2, 3))
    True
    """

    def __init__(self, module, module_path: str, site: str, layer: int, call_index: int, query, key, mask, kwargs: Mapping,
                 *, attention_type: str, block_bytes: int | None = None):
        self.module, self.module_path, self.site, self.layer, self.call_index = module, module_path, site, int(layer), int(call_index)
        self.attention_type = attention_type
        self.batch, self.heads, self.query_count, head_dim = (int(n) for n in query.shape)
        self.key_heads, self.key_count = int(key.shape[1]), int(key.shape[2])
        if self.heads % self.key_heads:
            raise UnsupportedModelError(f"{module_path}: {self.heads} query heads but {self.key_heads} key heads (not a multiple)")
        self._query, self._key = query, key
        self._mask = mask
        self._position_bias = kwargs.get("position_bias")
        scaling = kwargs.get("scaling")
        self.scaling = float(scaling) if scaling is not None else head_dim ** -0.5
        self.softcap = kwargs.get("softcap")
        self.sliding_window = kwargs.get("sliding_window")
        is_causal = kwargs.get("is_causal")
        self.causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False)) and attention_type == "self"
        self.position_ids = kwargs.get("position_ids")
        self.block_bytes = int(block_bytes or DEFAULT_BLOCK_BYTES)
        # SDPA applies is_causal only without a mask and with more than one query, top-left aligned.
        self._implicit_causal = mask is None and self.causal and self.query_count > 1
        offset = 0 if attention_type == "cross" or self._implicit_causal else self.key_count - self.query_count
        self.query_positions = torch.arange(self.query_count, dtype=torch.int64) + max(offset, 0)
        self._key_valid = None
        self._key_t = None
        self.workspace = None
        #: Set by a :class:`KernelTap` with ``replace=True`` when the tap may return the attention
        #: output instead of running the model's kernel: the call's value states (batch, key
        #: heads, keys, value dim), as the kernel received them.
        self.value = None
        self._value_grouped = None
        self._output = None
        self._output_lock = threading.Lock()

    @classmethod
    def from_tensors(cls, query, key, *, attn_mask=None, is_causal: bool = False, scale: float | None = None, softcap=None,
                     sliding_window=None, position_bias=None, module=None, module_path: str = "", site: str = "", layer: int = 0,
                     call_index: int = 0, attention_type: str = "self", block_bytes: int | None = None) -> AttentionCall:
        """A call from plain tensors, as ``torch.nn.functional.scaled_dot_product_attention`` takes them.

        ``query`` (batch, heads, queries, dim), ``key`` (batch, key heads, keys, dim) with
        ``heads`` a multiple of ``key heads``; ``attn_mask`` boolean (True: attend) or additive,
        broadcastable to (batch, heads, queries, keys); ``is_causal`` as SDPA applies it (only
        without a mask, top-left aligned).

        Examples
        --------
        >>> import torch
        >>> call = AttentionCall.from_tensors(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), is_causal=True)
        >>> call.weights(slice(None))[0, 0].triu(1).abs().max().item()
        0.0
        """
        kwargs = {"scaling": scale, "softcap": softcap, "sliding_window": sliding_window, "position_bias": position_bias,
                  "is_causal": bool(is_causal)}
        return cls(module, module_path, site, layer, call_index, query.detach(), key.detach(),
                   None if attn_mask is None else attn_mask.detach(), kwargs, attention_type=attention_type, block_bytes=block_bytes)

    # -- weights ----------------------------------------------------------------------------
    def logits(self, rows: slice) -> torch.Tensor:
        """Scaled, softcapped and masked scores of query ``rows`` over every key, float32 (batch, heads, rows, keys).

        Masked cells hold float32's minimum, as eager's additive mask leaves them.

        Examples
        --------
        >>> import torch
        >>> from transformers import GPT2Config, GPT2Model
        >>> model = GPT2Model(GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=50, attn_implementation="sdpa")).eval()
        >>> out = []
        >>> with KernelTap(model, {"h.0.attn": ("decoder/self", 0)}, lambda call: out.append(call.logits(slice(0, 2)))):
        ...     _ = model(torch.tensor([[1, 2, 3]]))
        >>> bool(out[0][0, 0, 0, 1] == torch.finfo(torch.float32).min)  # causal: row 0 does not see key 1
        True
        """
        logits, start = self.block_logits(rows, trim=False)
        return logits

    def weights(self, rows: slice) -> torch.Tensor:
        """Attention weights of query ``rows`` over every key, float32 (batch, heads, rows, keys).

        Examples
        --------
        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)).eval()
        >>> out = []
        >>> with KernelTap(model, {"encoder.layer.0.attention.self": ("encoder/self", 0)}, lambda call: out.append(call.weights(slice(None)))):
        ...     _ = model(torch.tensor([[1, 5, 7, 2]]))
        >>> tuple(out[0].shape)
        (1, 2, 4, 4)
        """
        return torch.softmax(self.logits(rows), dim=-1)

    def block_rows(self, budget_bytes: int | None = None) -> int:
        """How many query rows one block holds within ``budget_bytes`` (at least 1).

        Examples
        --------
        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)).eval()
        >>> out = []
        >>> with KernelTap(model, {"encoder.layer.0.attention.self": ("encoder/self", 0)}, lambda call: out.append(call.block_rows(64))):
        ...     _ = model(torch.tensor([[1, 5, 7, 2]]))
        >>> out  # 64 bytes hold one row of 2 heads x 4 keys x 4 bytes (2 rows)
        [2]
        """
        row_bytes = self.batch * self.heads * self.key_count * 4
        return max(1, min(self.query_count, int(budget_bytes or self.block_bytes) // max(row_bytes, 1)))

    def blocks(self, budget_bytes: int | None = None) -> Iterator[tuple[slice, torch.Tensor]]:
        """Yield ``(rows, weights)`` block by block over every query row (weights as in :meth:`weights`).

        Examples
        --------
        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)).eval()
        >>> out = []
        >>> with KernelTap(model, {"encoder.layer.0.attention.self": ("encoder/self", 0)},
        ...                lambda call: out.extend(rows for rows, _ in call.blocks(64))):
        ...     _ = model(torch.tensor([[1, 5, 7, 2]]))
        >>> out
        [slice(0, 2, None), slice(2, 4, None)]
        """
        for rows in self.row_slices(budget_bytes):
            yield rows, self.weights(rows)

    def row_slices(self, budget_bytes: int | None = None) -> list[slice]:
        """The row blocks :meth:`blocks` walks through.

        Examples
        --------
        >>> AttentionCall.row_slices.__name__
        'row_slices'
        """
        size = self.block_rows(budget_bytes)
        return [slice(start, min(start + size, self.query_count)) for start in range(0, self.query_count, size)]

    def block_logits(self, rows: slice, *, trim: bool = True, workspace=None) -> tuple[torch.Tensor, int]:
        """Logits of ``rows`` over the keys any of them can see: ``(logits, first key)``.

        With a ``workspace`` (:class:`~attnformat.adapters.reductions.Workspace`) the logits are
        written into its reused buffer (valid until the next block; no fresh block-sized
        allocation, whose page faults would cost more than the arithmetic).

        With ``trim`` (the default), keys masked for every row of the block (future keys of a
        causal block, keys outside a sliding window, padding) are left out of the block, unless
        a row has no visible key at all (eager then spreads it uniformly over every key); the
        returned tensor covers keys ``[first key, first key + logits.shape[-1])``, and every key
        outside has weight 0.

        Examples
        --------
        >>> import torch
        >>> from transformers import GPT2Config, GPT2Model
        >>> model = GPT2Model(GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=50, attn_implementation="sdpa")).eval()
        >>> out = []
        >>> with KernelTap(model, {"h.0.attn": ("decoder/self", 0)}, lambda call: out.append(call.block_logits(slice(0, 2)))):
        ...     _ = model(torch.tensor([[1, 2, 3, 4]]))
        >>> tuple(out[0][0].shape), out[0][1]  # rows 0-1 of a causal call see keys 0-1 only
        ((1, 2, 2, 2), 0)
        """
        rows = slice(*rows.indices(self.query_count))
        first, stop = 0, self.key_count
        allowed = None
        positions = self.query_positions[rows]
        if self._mask is not None:
            mask_rows = self._mask_rows(rows)
            if trim and mask_rows.dtype == torch.bool:
                allowed = mask_rows
            elif trim:
                allowed = mask_rows > MASKED_BELOW
            if allowed is not None:
                # Trim only when every row of every sample sees a key: eager spreads a row that sees
                # none over every key.
                if bool(allowed.any(-1).all()):
                    columns = torch.nonzero(allowed.flatten(0, -2).any(0)).flatten()
                    first, stop = int(columns[0]), int(columns[-1]) + 1
        elif trim and positions.numel():
            if self._implicit_causal:
                stop = min(stop, int(positions[-1]) + 1)
            if self.sliding_window is not None and self.attention_type == "self":
                first = max(0, int(positions[0]) - int(self.sliding_window) + 1)
        keys = slice(first, stop)
        count, width = rows.stop - rows.start, stop - first
        group = self.heads // self.key_heads
        # Grouped heads: multiply each key head by its group of query heads, without repeating the keys;
        # the scaling is fused into the product (one pass less over the block).
        query = self._query[:, :, rows].float().reshape(self.batch * self.key_heads, group * count, self._query.shape[-1])
        key = self._keys_transposed()[:, :, keys]
        if workspace is not None:
            logits = workspace.take("logits", (self.batch * self.key_heads, group * count, width))
            torch.baddbmm(logits, query, key, beta=0, alpha=self.scaling, out=logits)
        else:
            logits = torch.baddbmm(torch.empty(1, 1, 1), query, key, beta=0, alpha=self.scaling)
        logits = logits.view(self.batch, self.heads, count, width)
        if self.softcap is not None:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        if self._position_bias is not None:
            logits.add_(self._position_bias[..., rows, keys].float())
        if self._mask is not None:
            mask = self._mask_rows(rows)[..., keys]
            if mask.dtype == torch.bool:
                logits.masked_fill_(~mask, _MIN)
            else:
                logits.add_(mask.float()).clamp_(min=_MIN)
        elif positions.numel():
            # Only the columns a row can lose need a mask: past the first row's position (causal),
            # before the last row's window start (sliding).
            if self._implicit_causal:
                start = max(int(positions[0]) + 1, first)
                if start < stop:
                    columns = torch.arange(start, stop)
                    logits[..., start - first:].masked_fill_(columns[None, :] > positions[:, None], _MIN)
            if self.sliding_window is not None and self.attention_type == "self":
                end = min(int(positions[-1]) - int(self.sliding_window) + 1, stop)
                if end > first:
                    columns = torch.arange(first, end)
                    logits[..., :end - first].masked_fill_(columns[None, :] <= positions[:, None] - int(self.sliding_window), _MIN)
        return logits, first

    def _keys_transposed(self) -> torch.Tensor:
        """The keys as (batch x key heads, dim, keys), contiguous, made once per call: a
        transposed view would be copied by every block's matrix product."""
        if self._key_t is None:
            key = self._key.float()
            self._key_t = key.reshape(self.batch * self.key_heads, self.key_count, key.shape[-1]).transpose(1, 2).contiguous()
        return self._key_t

    def prepare_blocks(self) -> None:
        """Make what the blocks share (transposed keys, grouped values, the output buffer) before
        threads reduce blocks side by side (each would otherwise make its own).

        Examples
        --------
        >>> call = AttentionCall.from_tensors(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4))
        >>> call.prepare_blocks()
        >>> tuple(call._keys_transposed().shape)
        (1, 4, 2)
        """
        self._keys_transposed()
        if self.wants_output:
            self._output_buffer()

    # -- output (kernel="replace") ----------------------------------------------------------------
    @property
    def wants_output(self) -> bool:
        """True when the tap asks for the attention output (it then skips the model's kernel if
        :meth:`add_output` covered every row)."""
        return self.value is not None

    def add_output(self, rows: slice, first_key: int, weights: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        """Add the attention output of ``rows`` from a block's weights over keys ``[first_key, first_key + width)``.

        ``weights`` (batch, heads, rows, width), contiguous. Keys outside the block weigh 0. Heads
        sharing a key head (grouped-query attention) are multiplied by its values without
        repeating them. ``scale`` (batch, heads, rows), when given, multiplies each row of the
        product: the weights are then a softmax's exponentials before normalisation.

        Examples
        --------
        >>> import torch
        >>> q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
        >>> call = AttentionCall.from_tensors(q, k, is_causal=True)
        >>> call.value = v
        >>> call.add_output(slice(0, 3), 0, call.weights(slice(0, 3)))
        >>> expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
        >>> torch.allclose(call.output(), expected, atol=1e-6)
        True
        """
        rows = slice(*rows.indices(self.query_count))
        count, width = rows.stop - rows.start, weights.shape[-1]
        group = self.heads // self.key_heads
        values = self._values_grouped()
        output = self._output_buffer()
        block = torch.bmm(weights.reshape(self.batch * self.key_heads, group * count, width), values[:, first_key:first_key + width])
        if scale is not None:
            block.mul_(scale.reshape(self.batch * self.key_heads, group * count, 1))
        output[:, rows] = block.view(self.batch, self.heads, count, -1).transpose(1, 2)
        with self._output_lock:  # blocks may run on several threads (reductions.reduce_call)
            self._output_rows += count

    def _output_buffer(self) -> torch.Tensor:
        """The attention output being filled (batch, queries, heads, value dim), float32, made on first use."""
        with self._output_lock:
            if self._output is None:
                values = self._values_grouped()
                self._output = torch.empty(self.batch, self.query_count, self.heads, values.shape[-1], dtype=torch.float32,
                                           device=values.device)
                self._output_rows = 0
            return self._output

    def output(self) -> torch.Tensor | None:
        """The attention output (batch, queries, heads, value dim) in the value's dtype, as
        ``transformers``' attention functions return it, once :meth:`add_output` covered every
        row; else None.

        Examples
        --------
        >>> AttentionCall.from_tensors(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4)).output() is None
        True
        """
        if self._output is None or self._output_rows != self.query_count:
            return None
        return self._output.to(self.value.dtype)

    def _values_grouped(self) -> torch.Tensor:
        """The values as (batch x key heads, keys, value dim), float32 and contiguous, made once per call."""
        if self._value_grouped is None:
            value = self.value.float()
            self._value_grouped = value.reshape(self.batch * self.key_heads, self.key_count, value.shape[-1]).contiguous()
        return self._value_grouped

    def key_valid(self) -> torch.Tensor:
        """Keys visible to at least one query row, per sample: bool (batch, keys) (padding keys are False).

        Examples
        --------
        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)).eval()
        >>> out = []
        >>> with KernelTap(model, {"encoder.layer.0.attention.self": ("encoder/self", 0)}, lambda call: out.append(call.key_valid())):
        ...     _ = model(torch.tensor([[1, 5, 7, 0]]), attention_mask=torch.tensor([[1, 1, 1, 0]]))
        >>> out[0].tolist()
        [[True, True, True, False]]
        """
        if self._key_valid is None:
            if self._mask is None:
                self._key_valid = torch.ones(self.batch, self.key_count, dtype=torch.bool)
            else:
                mask = self._mask_4d()
                allowed = mask if mask.dtype == torch.bool else mask > MASKED_BELOW
                self._key_valid = allowed.any(-2).any(-2).expand(self.batch, self.key_count).clone()
        return self._key_valid

    def first_keys(self) -> torch.Tensor:
        """Each sample's first valid key (int64, (batch,)): where a sink would be; 0 without padding.

        Examples
        --------
        >>> AttentionCall.first_keys.__name__
        'first_keys'
        """
        valid = self.key_valid()
        return torch.where(valid.any(-1), valid.to(torch.int8).argmax(-1), torch.zeros(self.batch, dtype=torch.int64))

    def _mask_4d(self) -> torch.Tensor:
        mask = self._mask
        if mask.dim() == 2:  # flash-style padding mask (batch, keys): 1 = attend
            mask = mask.bool()[:, None, None, :]
        return mask[..., -self.key_count:] if mask.shape[-1] > self.key_count else mask

    def _mask_rows(self, rows: slice) -> torch.Tensor:
        mask = self._mask_4d()
        if mask.shape[-2] == 1:
            return mask
        return mask[..., rows, :]


class KernelTap:
    """Hand every attention call of the given modules to ``handler`` while the model runs its own kernel.

    Parameters
    ----------
    model
        A ``transformers`` model (any ``nn.Module`` whose attention modules call
        ``ALL_ATTENTION_FUNCTIONS`` or their file's ``eager_attention_forward``).
    modules
        ``{module path: (site, layer)}`` of the attention modules to tap.
    handler
        Called with each :class:`AttentionCall` (during the call; the model's output does not
        depend on it).
    cross
        Module paths whose calls are cross-attention (their queries and keys are on different axes).
    block_bytes
        Memory budget of one block of recomputed weights (default :data:`DEFAULT_BLOCK_BYTES`).
    replace
        Let the handler compute the attention output and return it instead of running the
        model's kernel (SDPA calls only). The call then carries ``value`` (``wants_output``);
        a handler that covered every row with :meth:`AttentionCall.add_output` replaces the
        kernel, otherwise the kernel runs after the handler. Calls where the tap cannot stand
        in for the kernel run it as usual and are counted in :attr:`fallbacks` by reason:
        dropout active (training), gradients wanted, a ``head_mask``, ``output_attentions``,
        keyword arguments the tap does not know, eager/flash/flex implementations.

    The tap installs wrappers on enter and removes them on exit (also after an error). A module
    that ran without passing through the attention interface raises
    :class:`~attnformat.adapters.UnsupportedModelError` (its weights cannot be tapped; capture
    it with eager attention instead).

    Examples
    --------
    >>> import torch
    >>> from transformers import GPT2Config, GPT2Model
    >>> model = GPT2Model(GPT2Config(n_embd=8, n_layer=2, n_head=2, vocab_size=50, attn_implementation="sdpa")).eval()
    >>> calls = []
    >>> with KernelTap(model, {"h.0.attn": ("decoder/self", 0), "h.1.attn": ("decoder/self", 1)},
    ...                lambda call: calls.append((call.layer, call.query_count, call.key_count))):
    ...     _ = model(torch.tensor([[1, 2, 3]]))
    >>> calls, model.config._attn_implementation
    ([(0, 3, 3), (1, 3, 3)], 'sdpa')
    """

    def __init__(self, model, modules: Mapping[str, tuple[str, int]], handler: Callable[[AttentionCall], None], *,
                 cross: set | frozenset = frozenset(), block_bytes: int | None = None, replace: bool = False):
        self.model = model
        self.replace = bool(replace)
        #: ``{reason: count}`` of the calls that ran the model's kernel although ``replace`` was asked.
        self.fallbacks: dict[str, int] = {}
        self.modules = dict(modules)
        self.handler = handler
        self.cross = set(cross)
        self.block_bytes = block_bytes
        named = dict(model.named_modules())
        missing = [path for path in self.modules if path not in named]
        if missing:
            raise UnsupportedModelError(f"{type(model).__name__}: no modules {missing}")
        # An output-recording module may wrap the one that calls the interface (T5LayerSelfAttention
        # holds T5Attention): any module inside a tapped one counts as it.
        self._by_id: dict[int, str] = {}
        for path in self.modules:
            for inner in named[path].modules():
                self._by_id.setdefault(id(inner), path)
        self._named = named
        self.call_counts: dict[str, int] = {}
        self._undo: list[Callable[[], None]] = []
        self._handles: list = []
        self._entered: dict[str, int] = {}
        self._tapped: dict[str, int] = {}
        from attnformat.adapters.reductions import Workspace

        self.workspace = Workspace()

    def __enter__(self) -> KernelTap:
        try:
            self._install()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self._remove()

    # -- wrappers ------------------------------------------------------------------------------
    def _install(self) -> None:
        interfaces: dict[int, tuple] = {}
        eager_homes: dict[str, object] = {}
        for path in self.modules:
            module = self._named[path]
            caller = next((inner for inner in module.modules() if hasattr(inner, "config")), module)
            implementation = getattr(getattr(caller, "config", None), "_attn_implementation", None) or "eager"
            home = sys.modules.get(type(caller).__module__)
            if implementation == "eager" or implementation.startswith("paged|eager"):
                if home is None or not callable(getattr(home, "eager_attention_forward", None)):
                    raise UnsupportedModelError(
                        f"{type(module).__name__} ({path}): eager attention without an eager_attention_forward in "
                        f"{type(module).__module__}; load the model with attn_implementation='sdpa' or capture with eager=True")
                eager_homes[home.__name__] = home
            else:
                interface = getattr(home, "ALL_ATTENTION_FUNCTIONS", None)
                if interface is None:
                    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

                    interface = ALL_ATTENTION_FUNCTIONS
                interfaces.setdefault((id(interface), implementation), (interface, implementation))
            self._handles.append(module.register_forward_pre_hook(self._entering(path)))
            self._handles.append(module.register_forward_hook(self._leaving(path)))
        for found, implementation in interfaces.values():
            self._wrap_interface(found, implementation)
        for home in eager_homes.values():
            self._wrap_eager(home)

    def _wrap_interface(self, interface, implementation: str) -> None:
        local = interface._local_mapping
        had_local, previous = implementation in local, local.get(implementation)
        original = interface[implementation]
        local[implementation] = self._wrapper(original, implementation)

        def undo():
            if had_local:
                local[implementation] = previous
            else:
                local.pop(implementation, None)

        self._undo.append(undo)

    def _wrap_eager(self, home) -> None:
        original = home.eager_attention_forward
        home.eager_attention_forward = self._wrapper(original, "eager")
        self._undo.append(lambda: setattr(home, "eager_attention_forward", original))

    def _wrapper(self, original, implementation: str = "sdpa"):
        tap = self

        def tapped_attention(module, query, key, value, attention_mask, *args, **kwargs):
            path = tap._by_id.get(id(module))
            if path is None:
                return original(module, query, key, value, attention_mask, *args, **kwargs)
            observed = False
            if tap.replace:
                reason = tap._cannot_replace(implementation, module, query, key, value, attention_mask, args, kwargs)
                if reason is None:
                    call = tap._observe(path, module, query, key, attention_mask, args, kwargs, value=value)
                    output = call.output()
                    if output is not None:
                        return output, None
                    reason, observed = "the handler did not compute the output", True
                tap.fallbacks[reason] = tap.fallbacks.get(reason, 0) + 1
            # The model's own kernel: the default, and every call the tap cannot stand in for.
            output = original(module, query, key, value, attention_mask, *args, **kwargs)
            if not observed:
                tap._observe(path, module, query, key, attention_mask, args, kwargs)
            return output

        tapped_attention.__wrapped__ = original
        return tapped_attention

    #: Keyword arguments of an attention call that the recomputation either applies (scaling,
    #: masks, windows, biases) or that SDPA's attention function ignores (caching, positions,
    #: output flags passed down from the model's forward). Other keywords block the replacement
    #: when they carry data (a tensor: attention sinks, packed-sequence offsets...); plain flags
    #: and numbers, which the SDPA function ignores, do not.
    _REPLACEABLE_KWARGS = frozenset({"dropout", "scaling", "is_causal", "sliding_window", "softcap", "position_bias", "position_ids",
                                     "use_cache", "cache_position", "output_attentions", "head_mask", "encoder_hidden_states",
                                     "past_key_values", "past_key_value", "layer_past", "encoder_attention_mask"})

    def _cannot_replace(self, implementation, module, query, key, value, mask, args, kwargs) -> str | None:
        """Why this call must run the model's kernel with ``replace`` (None: the tap may stand in)."""
        if implementation != "sdpa":
            return f"{implementation} attention"
        if len(args) > 2:
            return "positional arguments"
        named = {**dict(zip(("dropout", "scaling"), args)), **kwargs}
        unknown = {name for name, value in named.items() if name not in self._REPLACEABLE_KWARGS
                   and not (value is None or isinstance(value, (bool, int, float, str)))}
        if unknown:
            return f"unknown keyword arguments {sorted(unknown)}"
        if getattr(module, "training", False) or float(named.get("dropout") or 0.0) != 0.0:
            return "dropout"
        if named.get("head_mask") is not None:
            return "head_mask"
        if named.get("output_attentions"):
            return "output_attentions"
        if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
            return "gradients"
        if mask is None and query.shape[2] > 1 and named.get("is_causal") is None and not hasattr(module, "is_causal"):
            return "is_causal unknown"  # SDPA's default (causal) and eager's (not) differ
        if (query.dim() != 4 or key.dim() != 4 or value.dim() != 4 or tuple(value.shape[:3]) != tuple(key.shape[:3])
                or query.shape[0] != key.shape[0] or query.shape[1] % max(int(key.shape[1]), 1)):
            return "shapes"
        return None

    def _observe(self, path, module, query, key, mask, args, kwargs, value=None) -> AttentionCall:
        if args:  # positional dropout/scaling as in the eager functions' signatures
            kwargs = {**dict(zip(("dropout", "scaling"), args)), **kwargs}
        site, layer = self.modules[path]
        index = self.call_counts.get(path, 0)
        self.call_counts[path] = index + 1
        self._tapped[path] = self._tapped.get(path, 0) + 1
        attention_type = "cross" if path in self.cross else "self"
        with torch.no_grad():
            call = AttentionCall(module, path, site, layer, index, query.detach(), key.detach(),
                                 None if mask is None else mask.detach(), kwargs, attention_type=attention_type,
                                 block_bytes=self.block_bytes)
            call.workspace = self.workspace
            if value is not None:
                call.value = value.detach()
            self.handler(call)
        return call

    # -- checks --------------------------------------------------------------------------------
    def _entering(self, path):
        def hook(module, args):
            self._entered[path] = self._tapped.get(path, 0)

        return hook

    def _leaving(self, path):
        def hook(module, args, output):
            if self._tapped.get(path, 0) == self._entered.pop(path, -1):
                raise UnsupportedModelError(
                    f"{type(module).__name__} ({path}) ran without calling the attention interface the tap wraps "
                    f"(config._attn_implementation={getattr(getattr(module, 'config', None), '_attn_implementation', None)!r}); "
                    f"capture it with eager=True instead")

        return hook

    def _remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        while self._undo:
            self._undo.pop()()


class WeightsCall(AttentionCall):
    """An :class:`AttentionCall` for weights already in hand (eager attention's output): no recomputation.

    The "logits" of a block are the log of the weights (float32's minimum where a weight is 0),
    which give back the same weights, top-k and statistics; a key is valid when some row puts
    weight on it.

    Examples
    --------
    >>> import torch
    >>> weights = torch.tensor([[[[1.0, 0.0], [0.25, 0.75]]]])
    >>> call = WeightsCall(weights, site="s", layer=0)
    >>> call.weights(slice(None)).tolist()
    [[[[1.0, 0.0], [0.25, 0.75]]]]
    """

    def __init__(self, weights, *, module=None, module_path: str = "", site: str = "", layer: int = 0, call_index: int = 0,
                 attention_type: str = "self", causal: bool = False, block_bytes: int | None = None):
        self.module, self.module_path, self.site, self.layer, self.call_index = module, module_path, site, int(layer), int(call_index)
        self.attention_type, self.causal = attention_type, bool(causal)
        self._weights = weights.detach()
        self.batch, self.heads, self.query_count, self.key_count = (int(n) for n in weights.shape)
        self.key_heads = self.heads
        self.scaling, self.softcap, self.sliding_window, self.position_ids = None, None, None, None
        self.block_bytes = int(block_bytes or DEFAULT_BLOCK_BYTES)
        offset = 0 if attention_type == "cross" else self.key_count - self.query_count
        self.query_positions = torch.arange(self.query_count, dtype=torch.int64) + max(offset, 0)
        self._key_valid = None

    def weights(self, rows: slice) -> torch.Tensor:
        """The weights of ``rows``, float32, as given.

        Examples
        --------
        >>> import torch
        >>> WeightsCall(torch.full((1, 1, 1, 2), 0.5)).weights(slice(None)).tolist()
        [[[[0.5, 0.5]]]]
        """
        return self._weights[:, :, rows].float()

    def block_logits(self, rows: slice, *, trim: bool = True, workspace=None) -> tuple[torch.Tensor, int]:
        """The log of the weights of ``rows`` (all keys; ``trim`` has nothing to trim).

        Examples
        --------
        >>> import torch
        >>> WeightsCall(torch.full((1, 1, 1, 2), 0.5)).block_logits(slice(None))[0].exp().tolist()
        [[[[0.5, 0.5]]]]
        """
        weights = self._weights[:, :, rows].float()
        return torch.log(weights).clamp_(min=_MIN), 0

    def prepare_blocks(self) -> None:
        """Nothing to prepare: the weights are in hand.

        Examples
        --------
        >>> WeightsCall(torch.full((1, 1, 1, 2), 0.5)).prepare_blocks()
        """

    def key_valid(self) -> torch.Tensor:
        """Keys some row of the sample puts weight on, rows spread evenly over every key aside: bool (batch, keys).

        Examples
        --------
        >>> import torch
        >>> WeightsCall(torch.tensor([[[[1.0, 0.0]]]])).key_valid().tolist()
        [[True, False]]
        """
        if self._key_valid is None:
            weights = self._weights
            # A row that sees no key at all is spread evenly over every key by eager attention
            # (padding queries of a left-padded batch): it says nothing about which keys are real.
            spread = (weights.amax(-1) == weights.amin(-1)) & (self.key_count > 1)
            self._key_valid = ((weights > 0) & ~spread[..., None]).any(1).any(1)
        return self._key_valid


def derived_site_names(site: str) -> dict[str, str]:
    """The file's site names for what is kept of attention ``site``: dense, topk, statistics, head mean.

    Examples
    --------
    >>> derived_site_names("decoder/self")
    {'dense': 'decoder/self', 'topk': 'decoder/self_topk', 'statistics': 'decoder/self_stats', 'head_mean': 'decoder/self_mean'}
    """
    return {"dense": site, "topk": f"{site}_topk", "statistics": f"{site}_stats", "head_mean": f"{site}_mean"}


class CallWriter:
    """Write what a :class:`~attnformat.adapters.keep.Keep` keeps of each :class:`AttentionCall` through a Recorder.

    Any capture shares it: each call is reduced block by block
    (:func:`attnformat.adapters.reductions.reduce_call`) and written as one layer of the
    sites ``X`` (dense: the selected layers, heads and rows), ``X_topk``, ``X_stats`` and
    ``X_mean``, all with ``describes = "X"``. Each site is described (tokens, attributes)
    before its first write in this writer, and again once per writer inside
    :meth:`Recorder.samples <attnformat.adapters.Recorder.samples>` (a batch's labels).

    Parameters
    ----------
    recorder
        Where to write.
    keeps
        ``{site: Keep}``; sites not listed keep everything dense.
    describe
        ``describe(site) -> dict`` of :meth:`Recorder.describe` keywords for attention site
        ``site`` (token labels, masks, positions, ``attrs``), or ``None``.
    layer_counts
        ``{site: number of layers}`` (declared up front so layers are numbered from the start).
    block_bytes
        Memory budget of one block of weights.

    Examples
    --------
    >>> import torch, tempfile, pathlib, attnformat
    >>> from attnformat.adapters import Recorder
    >>> from attnformat.adapters.keep import Keep
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "x.attn.zarr"
    >>> with Recorder(out) as recorder:
    ...     writer = CallWriter(recorder, {"self": Keep(dense=False, top_k=2)}, layer_counts={"self": 1})
    ...     writer.write(AttentionCall.from_tensors(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), is_causal=True, site="self"))
    >>> attnformat.open(out)["self_topk"]["key_index"].values[0, 0, 0, 0].tolist()  # layer 0, sample 0, head 0, row 0
    [0, -1]
    """

    def __init__(self, recorder, keeps: Mapping, *, describe: Callable[[str], dict | None] | None = None,
                 layer_counts: Mapping[str, int] | None = None, block_bytes: int | None = None):
        from attnformat.adapters.keep import Keep

        self.recorder = recorder
        self.keeps = dict(keeps)
        self._default = Keep()
        self.describe = describe or (lambda site: None)
        self.layer_counts = dict(layer_counts or {})
        self.block_bytes = block_bytes
        self._described: set[str] = set()
        self._dense_buffer = None

    def keep_of(self, site: str):
        """The Keep of ``site`` (dense everything when not given).

        Examples
        --------
        >>> CallWriter(None, {}).keep_of("x").dense
        True
        """
        return self.keeps.get(site, self._default)

    def write(self, call: AttentionCall) -> None:
        """Reduce ``call`` and write it as layer ``call.layer`` of its sites.

        Examples
        --------
        >>> CallWriter.write.__name__
        'write'
        """
        from attnformat.adapters.reductions import reduce_call

        keep = self.keep_of(call.site)
        dense = keep.keeps_layer(call.layer)
        if not dense and not keep.needs_rows:
            return
        # The dense weights go into one buffer reused from layer to layer: the recorder has copied
        # (write-behind) or stored them when log() returns, and a fresh layer-sized array would
        # cost a page fault per 4 KiB.
        result = reduce_call(call, keep, dense=dense, budget_bytes=self.block_bytes, dense_out=self._dense_out)
        names = derived_site_names(call.site)
        attention_attrs = {"attention_type": call.attention_type, "causal": int(call.causal), "describes": call.site}
        base = dict(self.describe(call.site) or {})
        base_attrs = {**attention_attrs, **base.pop("attrs", {})}
        base_attrs["describes"] = call.site
        layers = list(range(self.layer_counts.get(call.site, call.layer + 1)))
        if dense:
            description = _select_rows(base, keep.rows, call.query_count)
            description["attrs"] = dict(base_attrs)
            description["layers"] = [layer for layer in layers if keep.keeps_layer(layer)]
            if keep.heads is not None:
                description["heads"] = list(keep.heads)
            self._describe(names["dense"], description)
            self.recorder.log(names["dense"], layer=call.layer, weights=result["weights"], dims=("sample", "head", "query", "key"))
        reduced_attrs = dict(base_attrs)  # reduced sites keep the patch coordinates, so they keep patch_grid too [ATTN-IMG-002]
        reduced_attrs["key_count"] = call.key_count
        if keep.top_k:
            self._describe(names["topk"], {**_token_keys(base), "layout": "topk", "layers": layers,
                                           "attrs": {**reduced_attrs, "top_k": int(keep.top_k)}})
            self.recorder.log(names["topk"], layer=call.layer, weights=result["topk_weights"], key_index=result["key_index"],
                              omitted_weight=result["omitted_weight"], dims=("sample", "head", "query", "rank"))
        statistics = {name: result[name] for name in keep.statistic_names if name in result}
        if statistics:
            attrs = dict(reduced_attrs)
            if "local_weight" in statistics:
                attrs["local_window"] = keep.window
            self._describe(names["statistics"], {**_token_keys(base), "layout": "statistics", "layers": layers, "attrs": attrs})
            self.recorder.log(names["statistics"], layer=call.layer, dims=("sample", "head", "query"), **statistics)
        if keep.head_mean:
            self._describe(names["head_mean"], {**_token_keys(base), "layers": layers,
                                                "attrs": {**base_attrs, "head_reduction": "mean"}})
            self.recorder.log(names["head_mean"], layer=call.layer, weights=result["head_mean"], dims=("sample", "query", "key"))

    def release(self) -> None:
        """Drop the reused dense buffer (the writer keeps working; a later dense layer allocates a new one).

        Examples
        --------
        >>> CallWriter(None, {}).release()
        """
        self._dense_buffer = None

    def _dense_out(self, shape):
        import numpy as np

        count = int(np.prod(shape))
        if self._dense_buffer is None or self._dense_buffer.size < count:
            self._dense_buffer = None  # release the smaller one first
            self._dense_buffer = np.empty(count, np.float32)
        return self._dense_buffer[:count].reshape(shape)

    def _describe(self, site: str, description: dict) -> None:
        if site in self._described:
            return
        self._described.add(site)
        in_samples = self.recorder.in_samples
        if site not in self.recorder.sites:
            self.recorder.describe(site, **description)
        elif in_samples:
            # A later batch of one file: the site exists; its per-sample coordinates are written at the batch.
            self.recorder.describe(site, **{key: value for key, value in description.items() if key != "layers"})


#: Description keywords about tokens (and other coordinates), which every derived site shares.
_TOKEN_DESCRIPTION_KEYS = ("labels", "query_labels", "key_labels", "groups", "query_groups", "key_groups", "mask", "query_mask",
                           "key_mask", "positions", "query_positions", "key_positions", "tokens", "query_tokens", "key_tokens",
                           "generation_steps", "query_generation_steps", "key_generation_steps", "samples", "coords")


def _token_keys(description: Mapping) -> dict:
    return {key: value for key, value in description.items() if key in _TOKEN_DESCRIPTION_KEYS}


def _select_rows(description: Mapping, rows, query_count: int) -> dict:
    """The description of a dense site that keeps only some query rows: query coordinates taken at those rows."""
    description = dict(description)
    if rows is None:
        return description
    import numpy as np

    selected = np.arange(query_count)[rows] if isinstance(rows, slice) else np.asarray(list(rows), dtype=np.int64)
    for stem in ("labels", "groups", "mask", "positions", "tokens", "generation_steps"):
        shared = description.pop(stem, None)
        query = description.get(f"query_{stem}", shared)
        if shared is not None:
            description.setdefault(f"key_{stem}", shared)
        if query is not None:
            values = np.asarray(query, dtype=object if stem in ("labels", "tokens") else None)
            description[f"query_{stem}"] = values[..., selected]
    if description.get("query_positions") is None:
        description["query_positions"] = selected
        description.setdefault("key_positions", np.arange(query_count) if description.get("key_labels") is None else None)
        if description["key_positions"] is None:
            del description["key_positions"]
    coords = dict(description.get("coords") or {})
    for name, (dims, values) in list(coords.items()):
        if dims and dims[-1] == "query":
            coords[name] = (dims, np.asarray(values)[..., selected])
    if coords:
        description["coords"] = coords
    return description
