"""Top-k and row statistics of a block of attention in one compiled pass per row (numba).

Why this exists: with torch's operators, the reductions of a captured block cost more than
the attention that produced it. ``torch.topk`` alone was about 30% of a statistics + top-32
capture at 4096 tokens (a full selection per row, even though after the first few hundred keys
almost no key can enter the top 32), and entropy, sink, local weight and the gathers each made
one more pass over the block. Here one compiled loop per row takes the maximum of each group of
32 keys, bounds the k-th largest logit from below by the k-th largest group maximum, sorts only
the keys at or above that bound into a buffer of the ``k`` largest, and computes every
statistic from the same row while it is in cache. The softmax itself stays torch's (its
vectorised exponential has no match in portable compiled code).

The kernel releases the GIL and the block's rows are split between ``threads`` threads (torch's
thread count, or 1 when :func:`attnformat.adapters.reductions.reduce_call` already runs whole
blocks on separate threads). numba is optional (in the ``torch`` extra): without it, :mod:`~attnformat.adapters.reductions`
uses torch's operators and gives the same values (the tests run both against the models' eager
weights). Ties between equal logits keep the lower key first. A -inf logit is never a top key
and adds nothing to the entropy; a NaN logit makes its row's softmax NaN, and what the kernel
reports for that row is then unspecified (it does not fail).

torch's OpenMP threads spin for a while after each of torch's parallel operations (GNU OpenMP's
default) and competed with this kernel's threads for the cores: with ``OMP_WAIT_POLICY=PASSIVE``
set before torch loaded, a 2-thread statistics + top-32 capture of 2 layers at 4096 tokens went
from 2.83x to 2.34x the plain forward. That is why :func:`~attnformat.adapters.reductions.reduce_call`
now runs whole blocks on separate threads with torch single-threaded (no OpenMP team, nothing
spinning) and calls this kernel with ``threads=1`` there: 2.29x to 1.96x on the same 2 layers
with ``kernel="replace"``.

The first call in a fresh environment compiles the kernel (a few seconds); numba caches the
machine code beside this module (or in its user cache when the package directory is read-only).
"""

from __future__ import annotations

import importlib.util
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

#: Logits at or below this are masked (the tap writes float32's minimum on masked cells).
MASKED_BELOW = float(np.finfo(np.float32).min) / 2
_FLOOR = float(np.finfo(np.float32).min)
_GROUP = 32
# numba is imported (0.4 s) and the kernel loaded from its cache (or compiled) on first use only.
_HAVE_NUMBA = importlib.util.find_spec("numba") is not None


def available() -> bool:
    """True when the compiled kernel can be used (numba is installed and not disabled).

    ``ATTNFORMAT_FUSED=0`` in the environment turns it off (torch's operators are then used).

    Examples
    --------
    >>> isinstance(available(), bool)
    True
    """
    return _HAVE_NUMBA and os.environ.get("ATTNFORMAT_FUSED", "1") != "0"


def _insert(values, places, count, kk, v, t):
    """Insert logit ``v`` of key ``t`` into the sorted buffer (largest first; a key equal to one
    already kept goes after it, so the lower key comes first). Returns the new count."""
    if count < kk:
        p = count
        count += 1
    else:
        p = kk - 1
    while p > 0 and values[p - 1] < v:
        values[p] = values[p - 1]
        places[p] = places[p - 1]
        p -= 1
    values[p] = v
    places[p] = t
    return count


def _group_maxima(x, group_max):
    """The maximum of each group of ``_GROUP`` keys of row ``x`` (NaN logits may or may not count:
    compiled with every fast-math flag so that the maxima vectorise; the callers skip NaN keys)."""
    n = x.shape[0]
    full = n // _GROUP
    for g in range(full):
        begin = g * _GROUP
        largest = x[begin]
        for t in range(begin + 1, begin + _GROUP):
            largest = max(largest, x[t])
        group_max[g] = largest
    if full * _GROUP < n:
        largest = x[full * _GROUP]
        for t in range(full * _GROUP + 1, n):
            largest = max(largest, x[t])
        group_max[full] = largest


def _kth_largest(source, m, k, scratch):
    """The ``k``-th largest (1-based) of ``source[:m]``, by quickselect in ``scratch`` (NaN counts as -inf)."""
    for i in range(m):
        v = source[i]
        scratch[i] = v if v == v else -np.inf
    target = k - 1
    low, high = 0, m - 1
    while low < high:
        a, b, c = scratch[low], scratch[(low + high) // 2], scratch[high]
        pivot = max(min(a, b), min(max(a, b), c))  # median of three
        i, j = low, high
        while i <= j:
            while scratch[i] > pivot:
                i += 1
            while scratch[j] < pivot:
                j -= 1
            if i <= j:
                scratch[i], scratch[j] = scratch[j], scratch[i]
                i += 1
                j -= 1
        if target <= j:
            high = j
        elif target >= i:
            low = i
        else:
            break
    return scratch[target]


def _top_keys(x, values, places, kk, group_max, scratch, candidate_values, candidate_keys):
    """The ``kk`` largest logits of row ``x`` into ``values``/``places``; returns how many were found.

    The maximum of each group of ``_GROUP`` keys (a vectorised pass), then ``bound``, the
    ``kk``-th largest group maximum: each of ``kk`` groups holds a key >= ``bound``, so the
    ``kk``-th largest logit is >= ``bound`` and only keys >= ``bound`` of groups whose maximum is
    >= ``bound`` can be top keys. Those candidates (a few more than ``kk`` on typical rows) are
    gathered, then sorted into the buffer in key order (so that equal logits keep the lower key).
    """
    n = x.shape[0]
    groups = (n + _GROUP - 1) // _GROUP
    _group_maxima(x, group_max)
    bound = -np.inf
    if groups > kk:
        bound = _kth_largest(group_max, groups, kk, scratch)
    found = 0
    for g in range(groups):
        if bound > -np.inf and not group_max[g] >= bound:
            continue
        for t in range(g * _GROUP, min(g * _GROUP + _GROUP, n)):
            v = x[t]
            if v >= bound and v > -np.inf:  # -inf or NaN: never a top key
                candidate_values[found] = v
                candidate_keys[found] = t
                found += 1
    count = 0
    for c in range(found):
        v = candidate_values[c]
        if count < kk or v > values[kk - 1]:
            count = _insert(values, places, count, kk, v, candidate_keys[c])
    return count


def _rows(logits, weights, start, stop, kk, first_key, sink_column, local_low, local_high, want_entropy,
          top_weight, top_index, omitted, max_weight, entropy, top_key, sink, local):
    """Reduce rows ``[start, stop)`` of a (rows, keys) block; see :func:`reduce_block` for the outputs."""
    n = logits.shape[1]
    values = np.empty(kk, np.float32)
    places = np.empty(kk, np.int64)
    group_max = np.empty((n + _GROUP - 1) // _GROUP, np.float32)
    scratch = np.empty_like(group_max)
    candidate_values = np.empty(n + 1, np.float32)
    candidate_keys = np.empty(n + 1, np.int64)
    for r in range(start, stop):
        x = logits[r]
        w = weights[r]
        count = _top_keys(x, values, places, kk, group_max, scratch, candidate_values, candidate_keys)
        if count == 0:
            max_weight[r] = np.nan
            entropy[r] = np.nan
            top_key[r] = -1
            omitted[r] = np.nan
            for p in range(kk):
                top_weight[r, p] = np.nan
                top_index[r, p] = -1
        else:
            maximum = values[0]
            every = maximum <= MASKED_BELOW  # no visible key: the model spreads the row over every key
            kept = 0.0
            for p in range(kk):
                if p < count and (every or values[p] > MASKED_BELOW):
                    top_weight[r, p] = w[places[p]]
                    top_index[r, p] = places[p] + first_key
                    kept += w[places[p]]
                else:
                    top_weight[r, p] = np.nan
                    top_index[r, p] = -1
            omitted[r] = max(1.0 - kept, 0.0)
            largest_weight = w[places[0]]
            max_weight[r] = largest_weight
            top_key[r] = places[0] + first_key
            if want_entropy:
                # entropy = log(sum e) - sum(w z), z = logit - max, sum e = 1 / max weight. z is
                # floored so that a -inf logit (weight 0) adds 0, not NaN.
                total = 0.0
                for t in range(n):
                    z = x[t] - maximum
                    z = z if z > _FLOOR else _FLOOR
                    total += w[t] * z
                entropy[r] = -math.log(largest_weight) - total
        column = sink_column[r]
        sink[r] = w[column] if 0 <= column < n else 0.0
        near = 0.0
        for t in range(max(local_low[r], 0), min(local_high[r], n)):
            near += w[t]
        local[r] = near


_compiled = None
_compile_lock = threading.Lock()


def _kernel():
    """The compiled :func:`_rows` (its helpers are compiled first: numba resolves them as globals)."""
    global _compiled, _group_maxima, _insert, _kth_largest, _top_keys
    with _compile_lock:
        if _compiled is not None:
            return _compiled
        import numba

        jit = numba.njit(nogil=True, cache=True, boundscheck=False, fastmath={"reassoc", "contract", "nsz"})
        # Every fast-math flag for the group maxima only, so that they vectorise (NaN is handled by the callers).
        _group_maxima = numba.njit(nogil=True, cache=True, boundscheck=False, fastmath=True)(_group_maxima)
        _insert, _kth_largest = jit(_insert), jit(_kth_largest)
        _top_keys = jit(_top_keys)
        _compiled = jit(_rows)
        return _compiled


_pools: dict[str, tuple[ThreadPoolExecutor, int]] = {}


def _forget_pools() -> None:
    # A forked child inherits the pool objects but not their threads: it must make its own.
    _pools.clear()


os.register_at_fork(after_in_child=_forget_pools)


def executor(name: str, threads: int) -> ThreadPoolExecutor:
    """A thread pool of ``threads`` threads kept for reuse under ``name`` (remade when the count changes).

    Separate names keep separate pools, so work on one pool may wait for work on another
    without deadlock. Forgotten in a forked child.

    Examples
    --------
    >>> executor("example", 1).submit(sum, [1, 2]).result()
    3
    """
    pool, count = _pools.get(name, (None, 0))
    if pool is None or count != threads:
        if pool is not None:
            pool.shutdown(wait=False)
        pool = ThreadPoolExecutor(threads, thread_name_prefix=f"attnformat-{name}")
        _pools[name] = (pool, threads)
    return pool


def reduce_block(logits: np.ndarray, weights: np.ndarray, k: int, *, first_key: int = 0, sink_column=None,
                 local_low=None, local_high=None, entropy: bool = True, threads: int = 1) -> dict[str, np.ndarray]:
    """Top-k and statistics of every row of a block, in one compiled pass per row.

    Parameters
    ----------
    logits, weights
        C-contiguous float32 arrays of shape ``(rows, keys)``: a block's logits (masked cells at
        float32's minimum) and its softmax weights, over keys ``[first_key, first_key + keys)``.
    k
        Keys kept per row (at least 1; the largest is also the top key and gives the max weight).
    first_key
        Key index of the block's first column (added to the indices returned).
    sink_column, local_low, local_high
        Per row (int64, ``(rows,)``): the block column of the row's sink key (outside
        ``[0, keys)``: weight 0) and the half-open column range ``[low, high)`` of its local window
        (clipped to the block). ``None``: not computed (zeros).
    entropy
        Compute the entropy (one more pass over the row).
    threads
        Threads to split the rows between (the kernel releases the GIL).

    Returns
    -------
    dict
        ``topk_weights`` (rows, k) float32 (NaN where a rank has no visible key), ``key_index``
        (rows, k) int64 (-1 there), ``omitted_weight``, ``max_weight``, ``entropy``, ``sink_weight``,
        ``local_weight`` (rows,) float32, ``top_key`` (rows,) int64.

    Examples
    --------
    >>> logits = np.array([[0.0, 2.0, 1.0, -1.0]], np.float32)
    >>> weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    >>> out = reduce_block(logits, weights.astype(np.float32), 2, first_key=10)
    >>> out["key_index"].tolist(), round(float(out["omitted_weight"][0]), 4)
    ([[11, 12]], 0.1192)
    """
    if not _HAVE_NUMBA:
        raise RuntimeError("attnformat.adapters.fused needs numba (pip install 'attnformat[torch]')")
    kernel = _kernel()
    rows = logits.shape[0]
    kk = max(1, int(k))
    none = np.full(rows, -1, np.int64)
    sink_column = none if sink_column is None else np.ascontiguousarray(sink_column, np.int64)
    local_low = np.zeros(rows, np.int64) if local_low is None else np.ascontiguousarray(local_low, np.int64)
    local_high = np.zeros(rows, np.int64) if local_high is None else np.ascontiguousarray(local_high, np.int64)
    out = {
        "topk_weights": np.empty((rows, kk), np.float32), "key_index": np.empty((rows, kk), np.int64),
        "omitted_weight": np.empty(rows, np.float32), "max_weight": np.empty(rows, np.float32),
        "entropy": np.full(rows, np.nan, np.float32), "top_key": np.empty(rows, np.int64),
        "sink_weight": np.empty(rows, np.float32), "local_weight": np.empty(rows, np.float32),
    }
    arguments = (logits, weights)
    rest = (kk, int(first_key), sink_column, local_low, local_high, bool(entropy), out["topk_weights"], out["key_index"],
            out["omitted_weight"], out["max_weight"], out["entropy"], out["top_key"], out["sink_weight"], out["local_weight"])
    threads = max(1, min(int(threads), rows // 8 or 1))
    if threads == 1:
        kernel(*arguments, 0, rows, *rest)
        return out
    # More pieces than threads: a thread that shares its core with another process takes fewer of
    # them, instead of holding the block back by half of it.
    pieces = min(4 * threads, max(rows // 8, threads))
    bounds = np.linspace(0, rows, pieces + 1).astype(int)
    futures = [executor("rows", threads).submit(kernel, *arguments, int(a), int(b), *rest) for a, b in zip(bounds[:-1], bounds[1:])]
    for future in futures:
        future.result()
    return out
