"""Softmax, top-k and row statistics of a block of attention in one compiled pass per row (numba).

Why this exists: with torch's operators, the reductions of a captured block cost more than
the attention that produced it. ``torch.topk`` alone was about 30% of a statistics + top-32
capture at 4096 tokens (a full selection per row, even though after the first few hundred keys
almost no key can enter the top 32), and entropy, sink, local weight and the gathers each made
one more pass over the block. Here one compiled loop per row takes the maximum of each group of
32 keys, bounds the k-th largest logit from below by bisection over those group maxima, sorts
only the keys at or above that bound into a buffer of the ``k`` largest, then makes the softmax's
exponentials, their sum and the entropy's sum in one vectorised pass while the row is in cache.

The softmax is the kernel's own since 2026-12: torch's made three passes over a block of 8 MiB
(maximum, exponentials, normalisation), none of them in cache, and the kernel then read the
block twice more. With the kernel's float32 exponential (a polynomial within 1 ulp, written so
that it vectorises) a block is read once and written once; with ``normalize=False`` the
weights stay unnormalised and the attention output is normalised row by row after its product
(:meth:`~attnformat.adapters.kernel.AttentionCall.add_output`). Measured at 4096 tokens, 12
heads, 1 thread: the replaced attention call went from 1.16 s to 0.91 s per call (SDPA: 0.5 s), and a
statistics + top-32 capture with ``kernel="replace"`` from 2.29x to 1.56x the plain forward
on 2 threads (``benchmarks/bench_llm_capture.py``).

The kernel releases the GIL and the block's rows are split between ``threads`` threads (torch's
thread count, or 1 when :func:`attnformat.adapters.reductions.reduce_call` already runs whole
blocks on separate threads). numba is optional (in the ``torch`` extra): without it, :mod:`~attnformat.adapters.reductions`
uses torch's operators and gives the same values (the tests run both against the models' eager
weights). Ties between equal logits keep the lower key first. A -inf logit is never a top key,
weighs exactly 0 and adds nothing to the entropy; a row with no finite logit has NaN weights and
statistics, as torch's softmax gives. A NaN logit among finite ones makes torch's softmax NaN;
what the kernel reports for that row is unspecified (it does not fail).

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


def _bound(group_max, groups, kk):
    """A lower bound on the ``kk``-th largest logit: a value ``t`` with at least ``kk`` group
    maxima ``>= t`` (so ``kk`` distinct keys are ``>= t``), found by bisection between the smallest
    visible and the largest group maximum, stopping once at most ``kk + kk // 8`` groups reach it.

    Each step counts the maxima at or above the midpoint, a branch-free vectorised pass. An exact
    selection (the quickselect this replaced) cost more than the rest of the top-k: its
    comparisons branch unpredictably on random logits. The looser bound lets a few more groups
    through to the candidate scan, which is cheaper than the selection it saves. Returns -inf
    when fewer than ``kk`` groups hold a visible key (every key is then a candidate).
    """
    low = np.inf
    high = -np.inf
    visible = 0
    for g in range(groups):
        v = group_max[g]
        if v > MASKED_BELOW:  # NaN is not visible
            visible += 1
            low = min(low, v)
            high = max(high, v)
    if visible < kk:
        return -np.inf
    slack = kk + kk // 8
    if visible <= slack:
        return low
    for _ in range(40):
        middle = low + (high - low) * 0.5
        if not (low < middle < high):
            break
        count = 0
        for g in range(groups):
            count += group_max[g] >= middle
        if count >= kk:
            low = middle
            if count <= slack:
                break
        else:
            high = middle
    return low


def _top_keys(x, values, places, kk, group_max, candidate_values, candidate_keys):
    """The ``kk`` largest logits of row ``x`` into ``values``/``places``; returns how many were found.

    The maximum of each group of ``_GROUP`` keys (a vectorised pass), then ``bound``
    (:func:`_bound`): at least ``kk`` groups hold a key >= ``bound``, so the ``kk``-th largest
    logit is >= ``bound`` and only keys >= ``bound`` of groups whose maximum is >= ``bound`` can
    be top keys. Those candidates (a few more than ``kk`` on typical rows) are gathered, then
    sorted into the buffer in key order (so that equal logits keep the lower key).
    """
    n = x.shape[0]
    groups = (n + _GROUP - 1) // _GROUP
    _group_maxima(x, group_max)
    bound = -np.inf
    if groups > kk:
        bound = _bound(group_max, groups, kk)
    found = 0
    for g in range(groups):
        if bound > -np.inf and not group_max[g] >= bound:
            continue
        begin = g * _GROUP
        if bound > -np.inf and begin + _GROUP <= n:
            # Most groups that reach the bound hold one key at or above it: count them and sum
            # their offsets in one branch-free (vectorised) pass, which gives that key's place.
            hits = np.int32(0)
            offset = np.int32(0)
            for t in range(_GROUP):  # int32 selects: AVX2 has no 64-bit multiply
                hit = x[begin + t] >= bound
                hits += np.int32(1) if hit else np.int32(0)
                offset += np.int32(t) if hit else np.int32(0)
            if hits == 1:
                candidate_values[found] = x[begin + offset]
                candidate_keys[found] = begin + offset
                found += 1
                continue
        for t in range(begin, min(begin + _GROUP, n)):
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


# exp(z) for z <= 0 in float32 (Cephes' expf: z = n ln2 + r, |r| <= ln2 / 2, a degree-7
# polynomial in r, 2^n made from its exponent bits): within 1 ulp of the exact value (measured:
# 0.98 ulp over 700,000 points of [-87.3, 0], tests/adapters/test_fused_reductions.py), and written
# without calls or branches so that the row loop vectorises (numba has no vectorised exp of its
# own without Intel's SVML). Below -87.33 it is 0, where float32 leaves its normal numbers.
_F = np.float32
_LOG2E, _LN2_HIGH, _LN2_LOW = _F(1.44269504088896341), _F(0.693359375), _F(-2.12194440e-4)
_P0, _P1, _P2 = _F(1.9875691500e-4), _F(1.3981999507e-3), _F(8.3334519073e-3)
_P3, _P4, _P5 = _F(4.1665795894e-2), _F(1.6666665459e-1), _F(5.0000001201e-1)
_EXP_LOW, _HALF, _ONE, _ZERO = _F(-87.33), _F(0.5), _F(1.0), _F(0.0)
_Z_FLOOR = _F(_FLOOR)


def _float_from_bits(bits):  # replaced by a numba intrinsic (a bit cast) in _kernel()
    raise NotImplementedError


def _exp_negative(z):
    """exp(z) for z <= 0 (z - the row's maximum), float32; 0 below -87.33."""
    underflow = z < _EXP_LOW
    z = max(z, _EXP_LOW)
    n = np.floor(z * _LOG2E + _HALF)
    r = z - n * _LN2_HIGH
    r = r - n * _LN2_LOW
    y = ((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5
    y = y * (r * r) + r + _ONE
    scale = _float_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))
    return _ZERO if underflow else y * scale


def _exp_row(x, w, maximum, write, local_low, local_high):
    """exp(x - maximum) over a row: (sum, sum of e * z with z floored, sum over [local_low, local_high)),
    written into ``w`` when ``write``. One vectorised pass; the local sum reads back the few keys
    of the window."""
    n = x.shape[0]
    total = _ZERO
    weighted = _ZERO
    if write:  # two loops, not a test inside one: each stays a straight vectorised loop
        for t in range(n):
            z = x[t] - maximum
            e = _exp_negative(z)
            w[t] = e
            total += e
            weighted += e * max(z, _Z_FLOOR)
    else:
        for t in range(n):
            z = x[t] - maximum
            e = _exp_negative(z)
            total += e
            weighted += e * max(z, _Z_FLOOR)
    near = _ZERO
    for t in range(max(local_low, 0), min(local_high, n)):
        near += _exp_negative(x[t] - maximum)
    return total, weighted, near


def _rows(logits, weights, start, stop, kk, first_key, sink_column, local_low, local_high, want_entropy, write, normalize,
          top_weight, top_index, omitted, max_weight, entropy, top_key, sink, local, scale):
    """Softmax, top-k and statistics of rows ``[start, stop)`` of a (rows, keys) block; see :func:`reduce_block`."""
    n = logits.shape[1]
    values = np.empty(kk, np.float32)
    places = np.empty(kk, np.int64)
    group_max = np.empty((n + _GROUP - 1) // _GROUP, np.float32)
    candidate_values = np.empty(n + 1, np.float32)
    candidate_keys = np.empty(n + 1, np.int64)
    for r in range(start, stop):
        x = logits[r]
        w = weights[r]
        count = _top_keys(x, values, places, kk, group_max, candidate_values, candidate_keys)
        if count == 0:  # every logit -inf or NaN: softmax is NaN, as torch's
            max_weight[r] = np.nan
            entropy[r] = np.nan
            top_key[r] = -1
            omitted[r] = np.nan
            sink[r] = np.nan
            local[r] = np.nan
            scale[r] = np.nan
            for p in range(kk):
                top_weight[r, p] = np.nan
                top_index[r, p] = -1
            if write:
                for t in range(n):
                    w[t] = np.nan
            continue
        maximum = values[0]
        total, weighted, near = _exp_row(x, w, maximum, write, local_low[r], local_high[r])
        inverse = _ONE / total
        scale[r] = inverse
        if write and normalize:
            for t in range(n):
                w[t] *= inverse
        every = maximum <= MASKED_BELOW  # no visible key: the model spreads the row over every key
        kept = 0.0
        for p in range(kk):
            if p < count and (every or values[p] > MASKED_BELOW):
                weight = _exp_negative(values[p] - maximum) * inverse
                top_weight[r, p] = weight
                top_index[r, p] = places[p] + first_key
                kept += weight
            else:
                top_weight[r, p] = np.nan
                top_index[r, p] = -1
        omitted[r] = max(1.0 - kept, 0.0)
        max_weight[r] = inverse  # exp(0) / sum
        top_key[r] = places[0] + first_key
        if want_entropy:
            # entropy = log(sum e) - sum(e z) / sum e, z = logit - max (floored: a -inf logit adds 0, not NaN).
            entropy[r] = math.log(total) - weighted * inverse
        column = sink_column[r]
        sink[r] = _exp_negative(x[column] - maximum) * inverse if 0 <= column < n else 0.0
        local[r] = near * inverse


_compiled = None
_compile_lock = threading.Lock()
# The Python functions the kernel is compiled from (numba resolves a helper through this
# module's globals, so compiling rebinds those names to the compiled helpers).
_SOURCES = {function.__name__: function for function in (_group_maxima, _exp_negative, _insert, _bound, _exp_row, _top_keys, _rows)}


def _kernel():
    """The compiled :func:`_rows`, loaded from numba's cache or compiled.

    A cache written by a process that imported this file under another module name (``pytest
    --doctest-modules adapters/fused.py`` imports it as ``adapters.fused``) fails to load: numba
    rebuilds the kernel's environment by importing the name it was compiled under. The kernel is
    then compiled afresh without the cache rather than failing the capture, so a first call on a
    tiny block loads (or compiles) it here, where that can be caught.
    """
    global _compiled
    with _compile_lock:
        if _compiled is None:
            try:
                _compiled = _warmed(_compile(cache=True))
            except Exception:  # noqa: BLE001 - any failure to load a cache entry; a real compile error recurs below
                _compiled = _warmed(_compile(cache=False))
        return _compiled


def _compile(cache: bool):
    """Compile the kernel's functions, helpers first (rebinding this module's names to them)."""
    import numba

    names = globals()
    names.update(_SOURCES)
    jit = numba.njit(nogil=True, cache=cache, boundscheck=False, fastmath={"reassoc", "contract", "nsz"})
    # Every fast-math flag for the group maxima only, so that they vectorise (NaN is handled by the callers).
    names["_group_maxima"] = numba.njit(nogil=True, cache=cache, boundscheck=False, fastmath=True)(_SOURCES["_group_maxima"])
    names["_float_from_bits"] = _bit_cast_intrinsic()
    # No "reassoc" here: it would fold the two-part ln 2 reduction into one product (4 ulp at -87).
    names["_exp_negative"] = numba.njit(nogil=True, cache=cache, fastmath={"contract", "nsz"})(_SOURCES["_exp_negative"])
    for name in ("_insert", "_bound", "_exp_row", "_top_keys"):
        names[name] = jit(_SOURCES[name])
    return jit(_SOURCES["_rows"])


def _warmed(kernel):
    """``kernel`` after one call on a tiny block, with the argument types every call uses."""
    logits = np.zeros((2, 40), np.float32)
    _, arguments, rest = _kernel_arguments(logits, 2, np.empty_like(logits), True, 0, None, None, None, True)
    kernel(*arguments, 0, 2, *rest)
    return kernel


def _bit_cast_intrinsic():
    """A numba intrinsic: the float32 whose bits are the low 32 bits of an integer (2^n from n + 127 << 23)."""
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def float_from_bits(typingctx, bits):
        if not isinstance(bits, types.Integer):
            return None

        def codegen(context, builder, signature, arguments):
            value = arguments[0]
            if bits.bitwidth != 32:
                value = builder.trunc(value, ir.IntType(32)) if bits.bitwidth > 32 else builder.sext(value, ir.IntType(32))
            return builder.bitcast(value, ir.FloatType())

        return types.float32(bits), codegen

    return float_from_bits


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


def reduce_block(logits: np.ndarray, k: int, *, weights: np.ndarray | None = None, normalize: bool = True, first_key: int = 0,
                 sink_column=None, local_low=None, local_high=None, entropy: bool = True, threads: int = 1) -> dict[str, np.ndarray]:
    """Softmax, top-k and statistics of every row of a block, in one compiled pass per row.

    Parameters
    ----------
    logits
        C-contiguous float32 array of shape ``(rows, keys)``: a block's logits (masked cells at
        float32's minimum) over keys ``[first_key, first_key + keys)``.
    k
        Keys kept per row (at least 1; the largest is also the top key and gives the max weight).
    weights
        A C-contiguous float32 array of the logits' shape to receive the softmax weights, or None
        (not written: the statistics alone need no pass over memory beyond the logits).
    normalize
        Write the weights normalised (each row sums to 1); else ``exp(logit - row maximum)``,
        whose rows the returned ``scale`` normalises (an attention output is then
        ``(weights @ values) * scale``, one multiplication per output value instead of one
        more pass over the block).
    first_key
        Key index of the block's first column (added to the indices returned).
    sink_column, local_low, local_high
        Per row (int64, ``(rows,)``): the block column of the row's sink key (outside
        ``[0, keys)``: weight 0) and the half-open column range ``[low, high)`` of its local window
        (clipped to the block). ``None``: not computed (zeros).
    entropy
        Compute the entropy.
    threads
        Threads to split the rows between (the kernel releases the GIL).

    Returns
    -------
    dict
        ``topk_weights`` (rows, k) float32 (NaN where a rank has no visible key), ``key_index``
        (rows, k) int64 (-1 there), ``omitted_weight``, ``max_weight``, ``entropy``, ``sink_weight``,
        ``local_weight``, ``scale`` (rows,) float32 (1 / the row's sum of exponentials), ``top_key`` (rows,) int64.

    Examples
    --------
    >>> logits = np.array([[0.0, 2.0, 1.0, -1.0]], np.float32)
    >>> weights = np.empty_like(logits)
    >>> out = reduce_block(logits, 2, weights=weights, first_key=10)
    >>> out["key_index"].tolist(), round(float(out["omitted_weight"][0]), 4), weights.astype(float).round(4).tolist()
    ([[11, 12]], 0.1192, [[0.0871, 0.6439, 0.2369, 0.0321]])
    """
    if not _HAVE_NUMBA:
        raise RuntimeError("attnformat.adapters.fused needs numba (pip install 'attnformat[torch]')")
    kernel = _kernel()
    out, arguments, rest = _kernel_arguments(logits, k, weights, normalize, first_key, sink_column, local_low, local_high, entropy)
    rows = arguments[0].shape[0]
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


def _kernel_arguments(logits, k, weights, normalize, first_key, sink_column, local_low, local_high, entropy):
    """``(out, (logits, weights), rest)``: the outputs of :func:`reduce_block` and the kernel's
    arguments around its ``start, stop`` (one signature for every call, the warm-up's included)."""
    logits = np.ascontiguousarray(logits, np.float32)
    rows = logits.shape[0]
    kk = max(1, int(k))
    sink_column = np.full(rows, -1, np.int64) if sink_column is None else np.ascontiguousarray(sink_column, np.int64)
    local_low = np.zeros(rows, np.int64) if local_low is None else np.ascontiguousarray(local_low, np.int64)
    local_high = np.zeros(rows, np.int64) if local_high is None else np.ascontiguousarray(local_high, np.int64)
    write = weights is not None
    if write and (weights.shape != logits.shape or weights.dtype != np.float32 or not weights.flags.c_contiguous):
        raise ValueError(f"weights must be a C-contiguous float32 array of shape {logits.shape}, not {weights.dtype} {weights.shape}")
    if not write:
        weights = np.empty((1, 1), np.float32)  # never written
    out = {
        "topk_weights": np.empty((rows, kk), np.float32), "key_index": np.empty((rows, kk), np.int64),
        "omitted_weight": np.empty(rows, np.float32), "max_weight": np.empty(rows, np.float32),
        "entropy": np.full(rows, np.nan, np.float32), "top_key": np.empty(rows, np.int64),
        "sink_weight": np.empty(rows, np.float32), "local_weight": np.empty(rows, np.float32),
        "scale": np.empty(rows, np.float32),
    }
    rest = (kk, int(first_key), sink_column, local_low, local_high, bool(entropy), write, bool(normalize),
            out["topk_weights"], out["key_index"], out["omitted_weight"], out["max_weight"], out["entropy"], out["top_key"],
            out["sink_weight"], out["local_weight"], out["scale"])
    return out, (logits, weights), rest
