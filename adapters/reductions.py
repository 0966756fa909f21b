"""Torch reductions of attention, one block of query rows at a time: top-k, row statistics, head mean, dense.

A :class:`RowReducer` takes the logits of one attention call block by block (as
:meth:`attnformat.adapters.kernel.AttentionCall.block_logits` gives them: masked cells at
float32's minimum, keys outside the block's range known to weigh 0) and keeps only what a
:class:`~attnformat.adapters.keep.Keep` asks for. Each block goes through one softmax. With
numba it is the compiled kernel's (:mod:`attnformat.adapters.fused`), which gives the top-k and
every statistic in the same pass over each row, and leaves the weights unnormalised when only
the attention output needs them. Without numba it is torch's (its exponential stays fast on
masked cells and on logits far below the row's maximum, where ``torch.exp`` takes a slow path
about ten times slower), followed by torch's operators:

- top-k on the logits (the same keys as on the weights, since softmax is monotonic), their
  weights gathered from the block, and the omitted mass ``1 - sum(kept)``;
- max weight (the weight at the row's maximum logit, ``1 / sum(exp(logit - max))``), entropy
  ``-log(max weight) - sum(w * z)`` with ``z = logit - max`` (no log pass over the weights),
  sink weight (the sample's first valid key), local weight (keys within the window of the
  query's position), top key (from the top-k, or one ``max`` pass giving the maximum and where
  it is);
- with a tap that replaces the model's kernel, the attention output ``weights @ values`` of
  the same block.

The numpy reference of the same quantities is :mod:`attnformat.reductions`; the tests check
both against the framework's eager weights.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import torch

from attnformat.adapters import fused
from attnformat.adapters.keep import Keep

class Workspace:
    """Buffers reused from block to block (and call to call), grown when a block needs more.

    Examples
    --------
    >>> workspace = Workspace()
    >>> a = workspace.take("exp", (2, 3))
    >>> b = workspace.take("exp", (3, 2))
    >>> a.data_ptr() == b.data_ptr(), tuple(b.shape)
    (True, (3, 2))
    """

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape) -> torch.Tensor:
        """A float32 tensor of ``shape`` (its contents are left over from earlier blocks).

        Examples
        --------
        >>> Workspace().take("logits", (2, 2)).dtype
        torch.float32
        """
        count = 1
        for size in shape:
            count *= int(size)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < count:
            buffer = self._buffers[name] = torch.empty(count, dtype=torch.float32)
        return buffer[:count].view(*shape)


class RowReducer:
    """Accumulate what ``keep`` asks for over the row blocks of one attention call.

    Parameters
    ----------
    batch, heads, query_count, key_count
        The call's sizes.
    keep
        What to keep.
    dense
        Keep this call's dense weights (the layer is selected) — the heads and rows of
        ``keep.heads``/``keep.rows``.
    query_positions
        Position of each query row on the key axis (int64, ``(query_count,)``), for
        ``local_weight``.
    first_keys
        Each sample's first valid key (int64, ``(batch,)``), for ``sink_weight``.
    local
        Compute ``local_weight`` (self-attention only).
    dense_out
        ``dense_out(shape)`` gives a C-contiguous float32 array of the dense weights' shape to fill
        instead of a fresh zeroed one (a buffer reused from call to call: a fresh layer-sized
        array costs a page fault per 4 KiB when first written). Every cell is written (keys
        outside a block are zeroed).

    Examples
    --------
    >>> import torch
    >>> logits = torch.tensor([[[[0.0, 1.0, 2.0]]]])
    >>> reducer = RowReducer(1, 1, 1, 3, Keep(dense=False, top_k=2, statistics=["max_weight", "top_key"]), dense=False)
    >>> reducer.add(slice(0, 1), logits, 0)
    >>> result = reducer.result()
    >>> result["key_index"].tolist(), round(float(result["max_weight"][0, 0, 0]), 4)
    ([[[[2, 1]]]], 0.6652)
    """

    def __init__(self, batch: int, heads: int, query_count: int, key_count: int, keep: Keep, *, dense: bool,
                 query_positions=None, first_keys=None, local: bool = True, dense_out=None):
        self.keep = keep
        self.batch, self.heads, self.query_count, self.key_count = batch, heads, query_count, key_count
        self.out: dict[str, np.ndarray] = {}
        self.dense_heads = None if keep.heads is None else torch.as_tensor(list(keep.heads), dtype=torch.int64)
        self.dense_rows = _row_indices(keep.rows, query_count) if dense else None
        if dense:
            head_count = heads if self.dense_heads is None else len(self.dense_heads)
            row_count = query_count if self.dense_rows is None else len(self.dense_rows)
            shape = (batch, head_count, row_count, key_count)
            buffer = None if dense_out is None else dense_out(shape)
            if buffer is not None and (buffer.shape != shape or buffer.dtype != np.float32 or not buffer.flags.c_contiguous):
                raise ValueError(f"dense_out must give a C-contiguous float32 array of shape {shape}, not {buffer.dtype} {buffer.shape}")
            self.out["weights"] = np.zeros(shape, np.float32) if buffer is None else buffer
            if self.dense_rows is not None:
                self._dense_position = {int(row): i for i, row in enumerate(self.dense_rows)}
        self.top_k = keep.top_k
        if self.top_k:
            self.out["topk_weights"] = np.full((batch, heads, query_count, self.top_k), np.nan, np.float32)
            self.out["key_index"] = np.full((batch, heads, query_count, self.top_k), -1, np.int32)
            self.out["omitted_weight"] = np.full((batch, heads, query_count), np.nan, np.float32)
        self.statistics = tuple(name for name in keep.statistic_names if local or name != "local_weight")
        for name in self.statistics:
            self.out[name] = np.full((batch, heads, query_count), -1 if name == "top_key" else np.nan,
                                     np.int32 if name == "top_key" else np.float32)
        if keep.head_mean:
            self.out["head_mean"] = np.zeros((batch, query_count, key_count), np.float32)
        self.query_positions = (torch.arange(query_count, dtype=torch.int64) if query_positions is None
                                else torch.as_tensor(query_positions, dtype=torch.int64))
        self.first_keys = torch.zeros(batch, dtype=torch.int64) if first_keys is None else torch.as_tensor(first_keys, dtype=torch.int64)
        self.window = keep.window
        self._reused = dense and dense_out is not None
        #: Threads of the compiled pass (None: torch's thread count); 1 while blocks run on several threads.
        self.kernel_threads = None

    def add(self, rows: slice, logits: torch.Tensor, first_key: int, workspace: Workspace | None = None, output=None) -> None:
        """Reduce one block: ``logits`` (batch, heads, rows, keys) of keys ``[first_key, first_key + keys)``.

        The block is consumed (modified in place). A ``workspace`` holds the block-sized
        temporaries between blocks. ``output``, when given, is called as ``output(rows,
        first_key, weights, scale)`` with the block's weights (contiguous) and ``scale`` None, or
        with the unnormalised exponentials and each row's ``scale`` (the compiled kernel when no
        dense weights are kept): what :meth:`~attnformat.adapters.kernel.AttentionCall.add_output` takes.

        Examples
        --------
        >>> import torch
        >>> reducer = RowReducer(1, 1, 2, 2, Keep(), dense=True)
        >>> reducer.add(slice(0, 2), torch.zeros(1, 1, 2, 2), 0)
        >>> reducer.result()["weights"].tolist()
        [[[[0.5, 0.5], [0.5, 0.5]]]]
        """
        rows = slice(*rows.indices(self.query_count))
        width = logits.shape[-1]
        keys = slice(first_key, first_key + width)
        # With numba, one compiled pass per row gives the softmax, the top-k and every statistic (attnformat.adapters.fused).
        if (self.statistics or self.top_k) and fused.available() and logits.shape[0] == self.batch:
            probabilities = "weights" in self.out or "head_mean" in self.out
            weights = None
            if output is not None or probabilities:
                weights = workspace.take("weights", logits.shape) if workspace is not None else torch.empty(logits.shape)
            # Unnormalised weights when only the output needs them: it is normalised row by row after the product.
            scale = self._reduce_fused(rows, keys, logits, weights, first_key, normalize=probabilities)
            if output is not None:
                output(rows, first_key, weights, None if probabilities else scale)
            if probabilities:
                self._store_probabilities(rows, keys, weights)
            return
        top_values = top_index = maximum = None
        if self.top_k:
            # Top-k on the logits (softmax is monotonic); the largest is the row maximum.
            top_values, top_index = torch.topk(logits, min(self.top_k, width), dim=-1)
            maximum = top_values[..., :1]
        elif "top_key" in self.statistics:
            maximum, top_index = logits.max(-1, keepdim=True)  # the row maximum and where it is, in one pass
        # torch's softmax, not exp(logit - max) / sum: its exp stays fast on masked cells (float32's
        # minimum) and on far-below-maximum logits, where torch.exp takes a slow path (~10x).
        weights = _softmax(logits, workspace)
        if output is not None:
            output(rows, first_key, weights, None)
        if self.statistics or self.top_k:
            self._reduce_rows(rows, keys, logits, weights, top_values, top_index, maximum, first_key)
        if "weights" in self.out or "head_mean" in self.out:
            self._store_probabilities(rows, keys, weights)

    def _reduce_rows(self, rows, keys, logits, weights, top_values, top_index, maximum, first_key) -> None:
        """Top-k and statistics of one block from its logits (consumed) and weights."""
        max_weight = None
        if self.statistics:
            # The largest weight is 1 / sum(exp(logit - max)): where the maximum is, when known.
            max_weight = (weights.gather(-1, top_index[..., :1]) if top_index is not None else weights.amax(-1, keepdim=True))[..., 0]
        if "entropy" in self.statistics:
            # entropy = log(sum e) - sum(w * z), with z = logit - max and sum e = 1 / max weight: no
            # log of the weights. z is float32's minimum (not -inf) on masked keys, so w * z is 0 there.
            if maximum is None:
                maximum = logits.amax(-1, keepdim=True)
            z = logits.sub_(maximum)
            entropy = -torch.log(max_weight) - z.mul_(weights).sum(-1)
            self.out["entropy"][:, :, rows] = entropy.numpy()
        self._store_statistics(rows, keys, weights, max_weight, top_index, first_key)
        if self.top_k:
            available = top_values > fused.MASKED_BELOW
            # A row with no visible key is spread uniformly by the model (every logit equal): all keys count.
            available |= (maximum <= fused.MASKED_BELOW)
            kept_weights = torch.where(available, weights.gather(-1, top_index), torch.nan)
            kept = torch.where(available, kept_weights, 0).sum(-1)
            index = torch.where(available, top_index + first_key, -1)
            count = kept_weights.shape[-1]
            self.out["topk_weights"][:, :, rows, :count] = kept_weights.numpy()
            self.out["key_index"][:, :, rows, :count] = index.numpy()
            self.out["omitted_weight"][:, :, rows] = (1 - kept).clamp_(min=0).numpy()

    def _reduce_fused(self, rows, keys, logits, weights, first_key, *, normalize: bool):
        """Softmax (into ``weights`` when given), top-k and statistics of one block with the compiled
        kernel (the same values as :meth:`_reduce_rows`); returns each row's normalising scale
        (batch, heads, rows), which ``weights`` still needs unless ``normalize``."""
        batch, heads, count, width = logits.shape
        names = self.statistics
        sink_column = local_low = local_high = None
        if "sink_weight" in names:
            sink_column = np.repeat((self.first_keys.numpy() - keys.start), heads * count)
        if "local_weight" in names:
            positions = self.query_positions[rows].numpy() - keys.start
            local_low = np.tile(positions - self.window, batch * heads)
            local_high = np.tile(positions + self.window + 1, batch * heads)
        out = fused.reduce_block(logits.contiguous().view(-1, width).numpy(), self.top_k or 1,
                                 weights=None if weights is None else weights.view(-1, width).numpy(), normalize=normalize,
                                 first_key=first_key, sink_column=sink_column, local_low=local_low,
                                 local_high=local_high, entropy="entropy" in names,
                                 threads=self.kernel_threads or torch.get_num_threads())
        shape = (batch, heads, count)
        for name in names:
            self.out[name][:, :, rows] = out[name].reshape(shape)
        if self.top_k:
            self.out["topk_weights"][:, :, rows] = out["topk_weights"].reshape(*shape, -1)
            self.out["key_index"][:, :, rows] = out["key_index"].reshape(*shape, -1)
            self.out["omitted_weight"][:, :, rows] = out["omitted_weight"].reshape(shape)
        return torch.from_numpy(out["scale"]).view(shape)

    def _store_probabilities(self, rows, keys, weights) -> None:
        """Store a block's weights as dense weights and/or head means."""
        if "weights" in self.out:
            self._store_dense(rows, keys, weights)
        if "head_mean" in self.out:
            self.out["head_mean"][:, rows, keys] = weights.mean(1).numpy()

    def _zero_outside(self, target, keys: slice) -> None:
        """Zero the keys of ``target`` (rows of a reused output buffer) outside the block's ``keys``."""
        if not self._reused:
            return
        if keys.start > 0:
            target[..., :keys.start] = 0
        if keys.stop < target.shape[-1]:
            target[..., keys.stop:] = 0

    def _store_statistics(self, rows, keys, weights, max_weight, top_index, first_key) -> None:
        names = self.statistics
        if not names:
            return
        if "max_weight" in names:
            self.out["max_weight"][:, :, rows] = max_weight.numpy()
        if "top_key" in names:
            self.out["top_key"][:, :, rows] = (top_index[..., 0] + first_key).numpy()
        if "sink_weight" in names:
            sink = torch.zeros(self.batch, self.heads, rows.stop - rows.start)
            for sample in range(self.batch):
                key = int(self.first_keys[sample]) - keys.start
                if 0 <= key < weights.shape[-1]:
                    sink[sample] = weights[sample if weights.shape[0] > 1 else 0, :, :, key]
            self.out["sink_weight"][:, :, rows] = sink.numpy()
        if "local_weight" in names:
            positions = self.query_positions[rows]
            low = max(int(positions.min()) - self.window, keys.start)
            high = min(int(positions.max()) + self.window + 1, keys.stop)
            if high > low:
                key_positions = torch.arange(low, high)
                band = ((key_positions[None, :] - positions[:, None]).abs() <= self.window).to(weights.dtype)
                near = weights[..., low - keys.start:high - keys.start]
                local = torch.einsum("bhrk,rk->bhr", near, band)
            else:
                local = torch.zeros(weights.shape[:-1])
            self.out["local_weight"][:, :, rows] = local.numpy()

    def _store_dense(self, rows, keys, probabilities) -> None:
        if self.dense_heads is not None:
            probabilities = probabilities.index_select(1, self.dense_heads)
        if self.dense_rows is None:
            self.out["weights"][:, :, rows, keys] = probabilities.numpy()
            self._zero_outside(self.out["weights"][:, :, rows], keys)
            return
        wanted = [(i, self._dense_position[row]) for i, row in enumerate(range(rows.start, rows.stop)) if row in self._dense_position]
        if wanted:
            source = torch.as_tensor([i for i, _ in wanted])
            target = np.asarray([j for _, j in wanted])
            self.out["weights"][:, :, target, keys] = probabilities.index_select(2, source).numpy()
            if self._reused:
                # Rows of a reused buffer: keys outside the block weigh 0.
                self.out["weights"][:, :, target, :keys.start] = 0
                self.out["weights"][:, :, target, keys.stop:] = 0

    def result(self) -> dict[str, np.ndarray]:
        """What was kept, as numpy arrays: ``weights`` (dense, (batch, heads, rows, keys)), ``topk_weights``,
        ``key_index``, ``omitted_weight``, the statistics by name, ``head_mean`` (batch, query, key).

        Examples
        --------
        >>> sorted(RowReducer(1, 1, 1, 1, Keep(dense=False, top_k=1), dense=False).result())
        ['key_index', 'omitted_weight', 'topk_weights']
        """
        return self.out


def _softmax(logits: torch.Tensor, workspace: Workspace | None) -> torch.Tensor:
    """Softmax over the last axis into the workspace's ``weights`` buffer (contiguous; a fresh tensor without one)."""
    if workspace is None:
        return torch.softmax(logits, dim=-1)
    # out= must be contiguous: torch 2.13 writes a strided softmax output wrongly.
    return torch.ops.aten._softmax.out(logits, -1, False, out=workspace.take("weights", logits.shape))


def _row_indices(rows, query_count: int):
    if rows is None:
        return None
    if isinstance(rows, slice):
        return np.arange(query_count)[rows]
    selected = np.asarray(list(rows), dtype=np.int64)
    if selected.size and (selected.min() < 0 or selected.max() >= query_count):
        from attnformat.adapters.errors import CaptureShapeError

        raise CaptureShapeError(f"Keep(rows=...) selects rows {selected.tolist()}, but the call has {query_count} query rows")
    return selected


def reduce_call(call, keep: Keep, *, dense: bool, budget_bytes: int | None = None, dense_out=None) -> dict[str, np.ndarray]:
    """Reduce every row of an :class:`~attnformat.adapters.kernel.AttentionCall` block by block.

    ``dense_out(shape)``: a reused buffer for the dense weights (see :class:`RowReducer`). When the
    call wants its attention output (``call.wants_output``: a tap with ``replace=True``), the
    output is computed from the same blocks.

    With more than one torch thread and more than one block, the blocks are shared between that
    many threads, each running torch single-threaded (``ATTNFORMAT_BLOCK_THREADS=0`` keeps them on
    the calling thread, with torch's own threads inside each operation); the values are the same.

    Examples
    --------
    >>> import torch
    >>> from transformers import GPT2Config, GPT2Model
    >>> from attnformat.adapters.kernel import KernelTap
    >>> model = GPT2Model(GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=50, attn_implementation="sdpa")).eval()
    >>> out = []
    >>> with KernelTap(model, {"h.0.attn": ("decoder/self", 0)}, lambda call: out.append(reduce_call(call, Keep(dense=False, top_k=2), dense=False))):
    ...     _ = model(torch.tensor([[1, 2, 3]]))
    >>> out[0]["key_index"][0, 0, 0].tolist()  # row 0 sees one key: the second rank is empty
    [0, -1]
    """
    reducer = RowReducer(call.batch, call.heads, call.query_count, call.key_count, keep, dense=dense,
                         query_positions=call.query_positions, first_keys=call.first_keys() if "sink_weight" in keep.statistic_names else None,
                         local=call.attention_type == "self", dense_out=dense_out)
    workspace = getattr(call, "workspace", None) or Workspace()
    output = call.add_output if getattr(call, "wants_output", False) else None
    slices = call.row_slices(budget_bytes)
    threads = torch.get_num_threads()
    if threads > 1 and len(slices) > 1 and block_workers_enabled():
        _reduce_on_threads(call, reducer, output, slices, min(threads, len(slices)), workspace)
    else:
        for rows in slices:
            logits, first = call.block_logits(rows, workspace=workspace)
            reducer.add(rows, logits, first, workspace, output)
    return reducer.result()


def block_workers_enabled() -> bool:
    """True unless ``ATTNFORMAT_BLOCK_THREADS=0``: with more than one torch thread, a call's blocks
    are shared between threads that each run torch single-threaded (see :func:`reduce_call`).

    Examples
    --------
    >>> isinstance(block_workers_enabled(), bool)
    True
    """
    return os.environ.get("ATTNFORMAT_BLOCK_THREADS", "1") != "0"


_local = threading.local()


def _thread_workspace() -> Workspace:
    workspace = getattr(_local, "workspace", None)
    if workspace is None:
        workspace = _local.workspace = Workspace()
    return workspace


def _reduce_on_threads(call, reducer: RowReducer, output, slices: list[slice], workers: int, workspace: Workspace) -> None:
    """Reduce a call's blocks on ``workers`` threads (this one included), torch single-threaded meanwhile.

    Why: torch splits each operation of a block (the logits' product, the softmax, the output's
    product) between its OpenMP threads, which meet at a barrier after every operation and spin
    while the compiled pass or Python runs; a block of 8 MiB is too small for that to pay off
    (the recomputation scaled 1.3x from 1 to 2 threads). Whole blocks on separate threads, each
    running torch on one thread, share no barrier. The threads pull blocks from one queue, as a
    causal call's later blocks are wider. Each writes disjoint rows of the reducer's outputs and
    of the attention output. torch's thread count is process-wide: it is 1 while the blocks run
    and restored afterwards (on error too).
    """
    call.prepare_blocks()
    pending = iter(slices)
    lock = threading.Lock()
    failed = threading.Event()

    def take():
        with lock:
            return None if failed.is_set() else next(pending, None)

    def work(space: Workspace) -> None:
        try:
            while (rows := take()) is not None:
                logits, first = call.block_logits(rows, workspace=space)
                reducer.add(rows, logits, first, space, output)
        except BaseException:
            failed.set()  # the other threads stop at their next block instead of finishing the call
            raise

    threads = torch.get_num_threads()
    reducer.kernel_threads = 1
    torch.set_num_threads(1)
    try:
        pool = fused.executor("blocks", workers - 1)
        futures = [pool.submit(lambda: work(_thread_workspace())) for _ in range(workers - 1)]
        try:
            work(workspace)
        finally:
            for future in futures:
                future.result()
    finally:
        torch.set_num_threads(threads)
        reducer.kernel_threads = None
