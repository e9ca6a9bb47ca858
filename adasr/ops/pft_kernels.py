"""Compiled CPU kernels (numba) of PFT's inference top-k layers: selection, softmax and focusing of one query row at
a time, with the row (at most one window of keys) in L1 cache.

* :func:`topk_softmax`: rows of the first top-k layer of a parity. Given dense scores (rows of n keys), per row: the
  positions of the k largest scores and their softmax weights ``exp(s - max) / sum(exp(s - max))`` over the whole
  row (not renormalised over the kept keys).
* :func:`softmax_focus_topk`: rows of a layer with sparse input (K' inherited keys per row), after the products
  q.k (at the K' keys, or with every key): the bias at the keys, softmax over them, progressive focusing by the
  inherited weights, top-k (when k < K'), written into the layer's state.
* :func:`topk_positions`: the selection alone.

The aggregation and the products stay on PyTorch (``embedding_bag``, BLAS, the sampled product): numba vectorises
innermost loops only (its SLP vectoriser is off by default since numba#8705), so a gathered 13-float row runs scalar
here, slower than FBGEMM (a fused kernel doing them too measured 1.5-2x slower and was dropped; docs/pft.md).

Selection (:func:`_select`): the k-th largest value of a row is bracketed by counting passes (``#{x > t}``, one
vectorised loop over the row) at thresholds from a normal guess (mean + z std of the row), Newton steps and
interpolation between the bracket's ends, until at most a few values are undecided; a vectorised code pass and a
branch-free compaction then write the positions above the bracket and the few candidates, of which the largest are
picked. The kept set is exact, as ``torch.topk`` / ``numpy.argpartition`` (ties at the k-th value broken
arbitrarily; positions in no order).

``exp`` is a vectorisable float32 routine (:func:`_exp_shifted`: Cody-Waite range reduction and a degree-7
polynomial; relative error below 3e-7, within an ulp or two of ``torch.exp``); ``exp(y) = 0`` below y = -87.68, as
flushed denormals.

Compiled lazily on first use (``cache=True``: the machine code is kept in numba's cache directory, by default the
``__pycache__`` next to this file, or ``NUMBA_CACHE_DIR``; about 5 s of compilation without a cache, 0.5 s to load
it). The kernels release the GIL and run on the engine's worker threads (:mod:`adasr.ops.scheduling`), so they use
the thread count of the tile pool; numba's own threading is not used. :func:`enabled` decides per call (option
``pft_kernel``, ``ADASR_PFT_KERNEL``; CPU float32 tensors only).
"""
import math
from statistics import NormalDist
from typing import Optional, Tuple

import numpy as np
import torch

from adasr.ops.config import get_option

try:
    import numba
    _NUMBA_ERROR: Optional[BaseException] = None
except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
    numba = None
    _NUMBA_ERROR = exc

F32 = np.float32
_LOG2E = F32(1.4426950408889634)
_LN2_HI = F32(0.693359375)
_LN2_LO = F32(-2.12194440e-4)
_HALF = F32(0.5)
_LOWEST = F32(-88.0)  # exp(y) = 0 for y < -87.68 (denormal results, flushed); exact above
_ONE = F32(1.0)
_ZERO = F32(0.0)
_C2, _C3, _C4, _C5, _C6, _C7 = (F32(1 / 2), F32(1 / 6), F32(1 / 24), F32(1 / 120), F32(1 / 720), F32(1 / 5040))
_EPS = F32(1e-20)  # PFA's epsilon of the Hadamard renormalisation
_INF = F32(np.inf)
_CANDIDATES = 16  # the selection brackets the k-th value until at most this many values are undecided
_MAX_PASSES = 48

# float reductions may be reassociated (vectorised sums, dot products); no assumption about NaN / inf
_FASTMATH = {'reassoc', 'contract', 'nsz'}


def available() -> bool:
    """True when numba imports (the kernels compile on first use)."""
    return numba is not None


def unavailable_reason() -> str:
    return '' if numba is not None else f'numba cannot be imported: {_NUMBA_ERROR!r}'


def _jit(fastmath=_FASTMATH):
    def wrap(fn):
        if numba is None:
            return fn
        try:
            return numba.njit(nogil=True, cache=True, fastmath=fastmath)(fn)
        except RuntimeError:  # no writable cache location (read-only install, no user cache dir): compile per process
            return numba.njit(nogil=True, cache=False, fastmath=fastmath)(fn)
    return wrap


# ---- row primitives ------------------------------------------------------------------------------------------------

@_jit()
def _exp_shifted(x, m, shift, out, bits):
    """out[j] = exp(x[j] - shift) for j < m (float32, x[j] <= shift; ``out`` apart from ``x``, else the loop runs
    scalar); bits: int32 scratch of length >= m. Returns the sum of out[:m]."""
    for j in range(m):
        y = max(x[j] - shift, _LOWEST)
        nf = np.floor(y * _LOG2E + _HALF)
        r = (y - nf * _LN2_HI) - nf * _LN2_LO
        p = _ONE + r * (_ONE + r * (_C2 + r * (_C3 + r * (_C4 + r * (_C5 + r * (_C6 + r * _C7))))))
        out[j] = p
        bits[j] = (np.int32(nf) + np.int32(127)) << np.int32(23)  # 2**nf as float32 bits (0.0 for nf = -127)
    scale = bits.view(np.float32)
    total = _ZERO
    for j in range(m):
        v = out[j] * scale[j]
        out[j] = v
        total += v
    return total


@_jit()
def _count_above(x, m, t):
    c = 0
    for j in range(m):
        c += x[j] > t
    return c


@_jit()
def _moments(x, m):
    s = _ZERO
    s2 = _ZERO
    for j in range(m):
        v = x[j]
        s += v
        s2 += v * v
    return s, s2


@_jit()
def _max4(x, m):
    """max of x[:m] (m >= 1) with four running maxima (a single one is a chain of dependent compares)."""
    m0 = x[0]
    m1 = m0
    m2 = m0
    m3 = m0
    t = 1
    while t + 4 <= m:
        m0 = max(m0, x[t])
        m1 = max(m1, x[t + 1])
        m2 = max(m2, x[t + 2])
        m3 = max(m3, x[t + 3])
        t += 4
    while t < m:
        m0 = max(m0, x[t])
        t += 1
    return max(max(m0, m1), max(m2, m3))


@_jit()
def _select(x, m, k, z, dens, sel, cand, code):
    """Positions of the k largest of x[:m] (0 < k < m) into sel[:k], in no particular order. ``z``, ``dens``: the
    standard normal quantile of 1 - k/m and the density there (first guesses); sel, cand: int32 scratch of length
    >= m + 1; code: uint8 scratch of length >= m. Returns the number of counting passes."""
    s, s2 = _moments(x, m)
    mean = s / m
    std = math.sqrt(max(s2 / m - mean * mean, _ZERO))
    lo = -_INF
    hi = _INF
    n_lo = m  # invariant: #{x > hi} = n_hi < k <= n_lo = #{x > lo}
    n_hi = 0
    t = F32(mean + z * std)
    slope = m * dens / std if std > 0 else _ZERO  # |d count / d t| of a normal row at the quantile
    passes = 0
    same = 0
    while passes < _MAX_PASSES:
        if not (lo < t < hi):
            if lo > -_INF and hi < _INF:
                t = lo + (hi - lo) * _HALF
                if not (lo < t < hi):
                    break
            else:
                break
        c = _count_above(x, m, t)
        passes += 1
        if c >= k:
            same = same + 1 if lo > -_INF and t > lo else 1
            lo = t
            n_lo = c
        else:
            same = same + 1 if hi < _INF and t < hi else 1
            hi = t
            n_hi = c
        if n_lo - n_hi <= _CANDIDATES:
            break
        # aim beside k so that the next count can close the bracket
        if k - n_hi <= _CANDIDATES // 2:
            target = n_hi + 0.75 * _CANDIDATES
        elif n_lo - k <= _CANDIDATES // 2:
            target = n_lo - 0.75 * _CANDIDATES
        else:
            target = k - 0.5
        if lo == -_INF or hi == _INF:  # Newton step on the normal model, doubled while it stays on one side
            if slope <= 0:
                break
            t = F32(t + (c - target) / slope * (1 << min(same - 1, 20)))
        elif passes % 3 == 0:
            t = lo + (hi - lo) * _HALF
        else:  # interpolate the count linearly between the bracket's ends
            t = lo + (hi - lo) * F32((n_lo - target) / (n_lo - n_hi))
    # compaction: everything above hi is kept; the values in (lo, hi] are candidates for the remaining places
    for j in range(m):  # (vectorised) 1: above the bracket, 2: inside it
        v = x[j]
        code[j] = np.uint8(v > hi) | (np.uint8((v <= hi) & (v > lo)) << np.uint8(1))
    ns = 0
    nc = 0
    for j in range(m):  # (branch-free scalar compaction)
        c = code[j]
        sel[ns] = j
        ns += c & np.uint8(1)
        cand[nc] = j
        nc += c >> np.uint8(1)
    need = k - ns
    if nc < need or nc > 4 * _CANDIDATES:  # NaNs, or many ties inside the bracket: order all the candidates
        if nc < need:
            ns = 0
            nc = m
            for j in range(m):
                cand[j] = j
            need = k
        vals = np.empty(nc, np.float32)
        for c in range(nc):
            vals[c] = -x[cand[c]]
        order = np.argsort(vals, kind='mergesort')
        for c in range(need):
            sel[ns + c] = cand[order[c]]
        return passes
    for c in range(need):  # partial selection sort of the few candidates
        best = c
        bv = x[cand[c]]
        for e in range(c + 1, nc):
            v = x[cand[e]]
            if v > bv:
                bv = v
                best = e
        tmp = cand[c]
        cand[c] = cand[best]
        cand[best] = tmp
        sel[ns + c] = cand[c]
    return passes


# ---- tile kernels --------------------------------------------------------------------------------------------------

@_jit()
def _topk_softmax(x, k, z, dens, vals, pos):
    rows, n = x.shape
    e = np.empty(n, np.float32)
    bits = np.empty(n, np.int32)
    sel = np.empty(n + 1, np.int32)
    cand = np.empty(n + 1, np.int32)
    code = np.empty(n, np.uint8)
    kept = np.empty(k, np.float32)
    passes = 0
    for i in range(rows):
        xr = x[i]
        passes += _select(xr, n, k, z, dens, sel, cand, code)
        for t in range(k):
            kept[t] = xr[sel[t]]
        mx = _max4(kept, k)  # the row maximum is kept
        total = _exp_shifted(xr, n, mx, e, bits)
        vrow = vals[i]
        prow = pos[i]
        for t in range(k):
            j = sel[t]
            vrow[t] = e[j] / total
            prow[t] = j
    return passes


@_jit()
def _softmax_focus_topk(s, full, bias, r0, pv, pidx, k, z, dens, training, vals, idxs):
    cw, heads, r, _ = s.shape
    kk = pidx.shape[3]
    shared = bias.shape[0] == 1
    do_topk = k < kk
    a = np.empty(kk, np.float32)  # (not in place: a loop writing what it reads loses its vector form)
    x = np.empty(kk, np.float32)
    bits = np.empty(kk, np.int32)
    sel = np.empty(kk + 1, np.int32)
    cand = np.empty(kk + 1, np.int32)
    code = np.empty(kk, np.uint8)
    passes = 0
    for w in range(cw):
        for hh in range(heads):
            bh = bias[0 if shared else hh]
            for i in range(r):
                srow = s[w, hh, i]
                p = pv[w, hh, i]
                prow = pidx[w, hh, i]
                brow = bh[r0 + i]
                if full:  # products with every key: read at the kept keys
                    for t in range(kk):
                        j = prow[t]
                        x[t] = srow[j] + brow[j]
                else:
                    for t in range(kk):
                        x[t] = srow[t] + brow[prow[t]]
                mx = _max4(x, kk)
                total = _exp_shifted(x, kk, mx, a, bits)
                for t in range(kk):
                    a[t] = a[t] / total
                den = _ZERO
                if training:  # (a p + eps) / (sum a p + eps)
                    for t in range(kk):
                        a[t] = a[t] * p[t]
                        den += a[t]
                    den += _EPS
                    for t in range(kk):
                        a[t] = (a[t] + _EPS) / den
                else:  # (a p + eps) / (sum (a p + eps) + eps)
                    for t in range(kk):
                        a[t] = a[t] * p[t] + _EPS
                        den += a[t]
                    den += _EPS
                    for t in range(kk):
                        a[t] = a[t] / den
                vrow = vals[w, hh, i]
                if do_topk:
                    passes += _select(a, kk, k, z, dens, sel, cand, code)
                    irow = idxs[w, hh, i]
                    for t in range(k):
                        j = sel[t]
                        vrow[t] = a[j]
                        irow[t] = prow[j]
                else:
                    for t in range(kk):
                        vrow[t] = a[t]
    return passes


@_jit()
def _select_rows(x, k, z, dens, pos):
    rows, m = x.shape
    sel = np.empty(m + 1, np.int32)
    cand = np.empty(m + 1, np.int32)
    code = np.empty(m, np.uint8)
    passes = 0
    for i in range(rows):
        passes += _select(x[i], m, k, z, dens, sel, cand, code)
        prow = pos[i]
        for t in range(k):
            prow[t] = sel[t]
    return passes


# ---- entry points (torch tensors on the CPU, read and written in place through NumPy views) ------------------------

def _check() -> None:
    if numba is None:
        raise RuntimeError(unavailable_reason())


def enabled(*tensors: torch.Tensor) -> bool:
    """Whether PFT's inference top-k layers on these tensors run on the kernels here: option ``pft_kernel``
    (``ADASR_PFT_KERNEL``) ``'numba'`` or ``'auto'`` (when numba imports), for CPU float32 tensors only (elsewhere
    the PyTorch path). ``'numba'`` without numba raises."""
    choice = get_option('pft_kernel')
    if choice == 'torch':
        return False
    if choice == 'numba':
        _check()
    if numba is None:
        return False
    return all(t.device.type == 'cpu' and t.dtype == torch.float32 for t in tensors)


def normal_guess(k: int, m: int) -> Tuple[float, float]:
    """(z, density): the standard normal quantile of 1 - k/m and the density there (the selection's first guess)."""
    z = NormalDist().inv_cdf(1.0 - k / m)
    return z, math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy()


def _rows(a: torch.Tensor, k: int, name: str) -> Tuple[torch.Tensor, int]:
    """``a`` (..., m) as contiguous rows (R, m), after checking 0 < k < m."""
    _check()
    m = a.shape[-1]
    if not 0 < k < m:
        raise ValueError(f'{name}: k={k} must be in [1, {m - 1}] for rows of length {m}')
    return a.detach().reshape(-1, m).contiguous(), m


def topk_softmax(s: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k largest scores of each row of a float32 CPU tensor (..., n), 0 < k < n, and their softmax weights over
    the whole row: (weights (..., k) float32 ``exp(s - max) / sum(exp(s - max))`` (not renormalised over the kept
    keys), positions (..., k) int64, in no particular order). ``s`` is read only."""
    x, n = _rows(s, k, 'topk_softmax')
    vals = torch.empty(x.shape[0], k)
    pos = torch.empty(x.shape[0], k, dtype=torch.int64)
    z, dens = normal_guess(k, n)
    _topk_softmax(_np(x), k, F32(z), F32(dens), _np(vals), _np(pos))
    return vals.view(*s.shape[:-1], k), pos.view(*s.shape[:-1], k)


def softmax_focus_topk(s: torch.Tensor, bias: torch.Tensor, r0: int, prev_values: torch.Tensor,
                       prev_index: torch.Tensor, k: int, training: bool, values: torch.Tensor,
                       index: torch.Tensor) -> None:
    """A sparse layer's rows after their products q.k: the bias at the keys added, softmax over the K' scores,
    progressive focusing by the inherited weights, and top-k when ``k < K'``, in one compiled pass per row.

    Args:
        s: (B, h, r, K') float32 products q.k at the inherited keys, or (B, h, r, n) products with every key (read
            at the inherited keys), of query rows ``r0:r0+r``.
        bias: (h or 1, n, n) float32 relative-position bias, read at the keys.
        prev_values, prev_index: (B, h, r, K') the inherited weights and key positions.
        k: this layer's k; ``k >= K'`` keeps every key (no selection; ``values`` may be ``prev_values``).
        training: focusing by the training formula ``(a p + eps) / (sum a p + eps)``, else by the eval one
            ``(a p + eps) / (sum (a p + eps) + eps)`` (spec section 2.4).
        values: (B, h, r, min(k, K')) float32 out: the kept focused weights (not renormalised after the top-k).
        index: (B, h, r, min(k, K')) out: their key positions (the dtype of ``prev_index``; unused when k >= K').
    """
    _check()
    kk = prev_index.shape[-1]
    heads, n = s.shape[1], bias.shape[-1]
    if s.dim() != 4 or s.shape[-1] not in (kk, n) or tuple(prev_index.shape) != tuple(s.shape[:3]) + (kk,):
        raise ValueError(f'softmax_focus_topk: scores {tuple(s.shape)} do not match the index '
                         f'{tuple(prev_index.shape)} (K\' or n = {n} columns)')
    if bias.dim() != 3 or bias.shape[0] not in (1, heads) or bias.shape[1] != n:
        raise ValueError(f'softmax_focus_topk: bias {tuple(bias.shape)} is not (1 or {heads}, {n}, {n})')
    z, dens = normal_guess(min(k, kk - 1), kk) if kk > 1 else (0.0, 1.0)
    full = s.shape[-1] != kk
    _softmax_focus_topk(_np(s), full, _np(bias), r0, _np(prev_values), _np(prev_index), k, F32(z), F32(dens),
                        bool(training), _np(values), _np(index))


def topk_positions(a: torch.Tensor, k: int) -> torch.Tensor:
    """Positions (int64) of the k largest entries of each row of a float32 CPU tensor (..., m), 0 < k < m, in no
    particular order (the same sets as ``torch.topk``; ties at the k-th value broken arbitrarily)."""
    x, m = _rows(a, k, 'topk_positions')
    pos = torch.empty(x.shape[0], k, dtype=torch.int64)
    z, dens = normal_guess(k, m)
    _select_rows(_np(x), k, F32(z), F32(dens), _np(pos))
    return pos.view(*a.shape[:-1], k)


__all__ = ['available', 'unavailable_reason', 'enabled', 'normal_guess', 'topk_softmax', 'softmax_focus_topk',
           'topk_positions']
