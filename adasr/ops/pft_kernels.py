"""Compiled CPU kernels (numba) of PFT's top-k attention rows: selection, softmax, focusing and aggregation of one
query row at a time, with the row (at most one window of keys) in L1 cache.

* :func:`topk_softmax_av`: a tile of the first top-k layer of a parity. Given dense scores (rows of n keys), per row:
  the positions of the k largest scores, their softmax weights ``exp(s - max) / sum(exp(s - max))`` (not
  renormalised over the kept keys) and the aggregation ``sum_t w_t v[pos_t]``.
* :func:`focused_sparse_rows`: windows of a layer with sparse input (K' inherited keys per row): the scores at the
  K' keys plus the bias there, softmax over them, progressive focusing by the inherited weights, top-k (when
  k < K') and the aggregation over the kept keys. No n x n or n x K' tensor is written.

Selection (:func:`_select`): the k-th largest value of a row is bracketed by counting passes (``#{x > t}``, one
vectorised loop over the row) at thresholds from a normal guess (mean + z std of the row), Newton steps and
interpolation between the bracket's ends, until at most a few values are undecided; one compaction pass then writes
the positions above the bracket and the few candidates, of which the largest are picked. The kept set is exact, as
``torch.topk`` / ``numpy.argpartition`` (ties at the k-th value broken arbitrarily; positions in no order).

``exp`` is a vectorisable float32 routine (:func:`_exp_shifted`: Cody-Waite range reduction and a degree-7
polynomial; relative error about 1e-7, within an ulp or two of ``torch.exp``); ``exp(y) = 0`` below y = -87.5, as
flushed denormals. Head dims are zero-padded to a multiple of 16 (:data:`LANES`) by the caller; the dot products
and the aggregation are unrolled over 16 lanes.

Compiled lazily on first use (``cache=True``: the machine code is kept in numba's cache directory, by default the
``__pycache__`` next to this file, or ``NUMBA_CACHE_DIR``; :func:`warm_up` compiles everything, in about a second
from the cache and some tens of seconds without it). The kernels release the GIL, so the engine's worker threads
run tiles in parallel. :func:`available` says whether numba imports.
"""
import math
from statistics import NormalDist
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from adasr.ops.config import get_option

try:
    import numba
    _NUMBA_ERROR: Optional[BaseException] = None
except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
    numba = None
    _NUMBA_ERROR = exc

LANES = 16  # head dims are zero-padded to a multiple of this

F32 = np.float32
_LOG2E = F32(1.4426950408889634)
_LN2_HI = F32(0.693359375)
_LN2_LO = F32(-2.12194440e-4)
_HALF = F32(0.5)
_LOWEST = F32(-87.5)  # exp of anything below is 0 (float32 denormal range, flushed)
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
        return numba.njit(nogil=True, cache=True, fastmath=fastmath)(fn)
    return wrap


# ---- row primitives ------------------------------------------------------------------------------------------------

@_jit()
def _exp_shifted(x, m, shift, out, bits):
    """out[j] = exp(x[j] - shift) for j < m (float32, x[j] <= shift; ``out`` may be ``x``); bits: int32 scratch of
    length >= m. Returns the sum of out[:m]."""
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
def _select(x, m, k, z, dens, sel, cand):
    """Positions of the k largest of x[:m] (0 < k < m) into sel[:k], in no particular order. ``z``, ``dens``: the
    standard normal quantile of 1 - k/m and the density there (first guesses); sel, cand: int32 scratch of length
    >= m + 1. Returns the number of counting passes."""
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
    ns = 0
    nc = 0
    for j in range(m):
        v = x[j]
        sel[ns] = j
        ns += v > hi
        cand[nc] = j
        nc += (v <= hi) & (v > lo)
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


@_jit(fastmath={'contract'})  # (no reassociation: the sum over t must not be vectorised, the 16 lanes are)
def _aggregate(wts, pos, kk, v, out, d):
    """out[:d] = sum_t wts[t] * v[pos[t], :d] (v: (n, D) rows zero-padded to D, a multiple of 16)."""
    for b in range(0, v.shape[1], 16):
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = a8 = a9 = a10 = a11 = a12 = a13 = a14 = a15 = _ZERO
        for t in range(kk):
            w = wts[t]
            vr = v[pos[t]]
            a0 += w * vr[b + 0]
            a1 += w * vr[b + 1]
            a2 += w * vr[b + 2]
            a3 += w * vr[b + 3]
            a4 += w * vr[b + 4]
            a5 += w * vr[b + 5]
            a6 += w * vr[b + 6]
            a7 += w * vr[b + 7]
            a8 += w * vr[b + 8]
            a9 += w * vr[b + 9]
            a10 += w * vr[b + 10]
            a11 += w * vr[b + 11]
            a12 += w * vr[b + 12]
            a13 += w * vr[b + 13]
            a14 += w * vr[b + 14]
            a15 += w * vr[b + 15]
        if b + 0 < d:
            out[b + 0] = a0
        if b + 1 < d:
            out[b + 1] = a1
        if b + 2 < d:
            out[b + 2] = a2
        if b + 3 < d:
            out[b + 3] = a3
        if b + 4 < d:
            out[b + 4] = a4
        if b + 5 < d:
            out[b + 5] = a5
        if b + 6 < d:
            out[b + 6] = a6
        if b + 7 < d:
            out[b + 7] = a7
        if b + 8 < d:
            out[b + 8] = a8
        if b + 9 < d:
            out[b + 9] = a9
        if b + 10 < d:
            out[b + 10] = a10
        if b + 11 < d:
            out[b + 11] = a11
        if b + 12 < d:
            out[b + 12] = a12
        if b + 13 < d:
            out[b + 13] = a13
        if b + 14 < d:
            out[b + 14] = a14
        if b + 15 < d:
            out[b + 15] = a15

@_jit()
def _scores(qrow, kw, idx, kk, brow, a):
    """a[t] = brow[idx[t]] + qrow . kw[idx[t]] for t < kk (rows zero-padded to a multiple of 16). Returns max a."""
    for t in range(kk):
        a[t] = brow[idx[t]]
    for b in range(0, kw.shape[1], 16):
        q0, q1, q2, q3, q4, q5, q6, q7 = (
            qrow[b + 0], qrow[b + 1], qrow[b + 2], qrow[b + 3], qrow[b + 4], qrow[b + 5], qrow[b + 6], qrow[b + 7])
        q8, q9, q10, q11, q12, q13, q14, q15 = (
            qrow[b + 8], qrow[b + 9], qrow[b + 10], qrow[b + 11], qrow[b + 12], qrow[b + 13], qrow[b + 14],
            qrow[b + 15])
        for t in range(kk):
            kr = kw[idx[t]]
            a[t] += ((q0 * kr[b + 0] + q1 * kr[b + 1] + q2 * kr[b + 2] + q3 * kr[b + 3])
                     + (q4 * kr[b + 4] + q5 * kr[b + 5] + q6 * kr[b + 6] + q7 * kr[b + 7])
                     + (q8 * kr[b + 8] + q9 * kr[b + 9] + q10 * kr[b + 10] + q11 * kr[b + 11])
                     + (q12 * kr[b + 12] + q13 * kr[b + 13] + q14 * kr[b + 14] + q15 * kr[b + 15]))
    mx = a[0]
    for t in range(1, kk):
        mx = max(mx, a[t])
    return mx


# ---- tile kernels --------------------------------------------------------------------------------------------------

@_jit()
def _topk_softmax_av(s, vp, w0, r0, k, z, dens, vals, idxs, out):
    cw, h, r, n = s.shape
    d = out.shape[3]
    e = np.empty(n, np.float32)
    bits = np.empty(n, np.int32)
    sel = np.empty(n + 1, np.int32)
    cand = np.empty(n + 1, np.int32)
    wts = np.empty(k, np.float32)
    passes = 0
    for w in range(cw):
        for hh in range(h):
            for i in range(r):
                x = s[w, hh, i]
                passes += _select(x, n, k, z, dens, sel, cand)
                mx = x[sel[0]]  # the row maximum is kept
                for t in range(1, k):
                    mx = max(mx, x[sel[t]])
                total = _exp_shifted(x, n, mx, e, bits)
                vrow = vals[w0 + w, hh, r0 + i]
                irow = idxs[w0 + w, hh, r0 + i]
                for t in range(k):
                    j = sel[t]
                    wt = e[j] / total
                    wts[t] = wt
                    vrow[t] = wt
                    irow[t] = j
                _aggregate(wts, sel, k, vp[w0 + w, hh], out[w0 + w, r0 + i, hh], d)
    return passes


@_jit()
def _focused_sparse_rows(qp, kp, vp, bias, pvals, pidx, w0, w1, k, z, dens, training, vals, idxs, out):
    nb, h, n, dp = qp.shape
    kk = pidx.shape[3]
    d = out.shape[3]
    do_topk = k < kk
    a = np.empty(kk, np.float32)
    bits = np.empty(kk, np.int32)
    sel = np.empty(kk + 1, np.int32)
    cand = np.empty(kk + 1, np.int32)
    keep = np.empty(kk, np.int32)
    wts = np.empty(kk, np.float32)
    passes = 0
    for w in range(w0, w1):
        for hh in range(h):
            bh = bias[hh if bias.shape[0] > 1 else 0]
            kw = kp[w, hh]
            for i in range(n):
                idx = pidx[w, hh, i]
                pv = pvals[w, hh, i]
                mx = _scores(qp[w, hh, i], kw, idx, kk, bh[i], a)
                total = _exp_shifted(a, kk, mx, a, bits)
                for t in range(kk):  # softmax, then progressive focusing by the inherited weights
                    a[t] = a[t] / total
                den = _ZERO
                if training:  # (a p + eps) / (sum a p + eps)
                    for t in range(kk):
                        a[t] = a[t] * pv[t]
                        den += a[t]
                    den += _EPS
                    for t in range(kk):
                        a[t] = (a[t] + _EPS) / den
                else:  # (a p + eps) / (sum (a p + eps) + eps)
                    for t in range(kk):
                        a[t] = a[t] * pv[t] + _EPS
                        den += a[t]
                    den += _EPS
                    for t in range(kk):
                        a[t] = a[t] / den
                vrow = vals[w, hh, i]
                irow = idxs[w, hh, i]
                if do_topk:
                    passes += _select(a, kk, k, z, dens, sel, cand)
                    for t in range(k):
                        p = sel[t]
                        wts[t] = a[p]
                        keep[t] = idx[p]
                        vrow[t] = a[p]
                        irow[t] = idx[p]
                    _aggregate(wts, keep, k, vp[w, hh], out[w, i, hh], d)
                else:  # the same keys: the focused weights replace the inherited ones
                    for t in range(kk):
                        vrow[t] = a[t]
                        keep[t] = idx[t]
                    _aggregate(a, keep, kk, vp[w, hh], out[w, i, hh], d)
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


def pad_lanes(x: torch.Tensor) -> torch.Tensor:
    """x (..., d) float32 zero-padded to (..., D), D the next multiple of :data:`LANES`, contiguous."""
    d = x.shape[-1]
    dp = -(-d // LANES) * LANES
    return F.pad(x, (0, dp - d)).contiguous() if dp != d else x.contiguous()


def normal_guess(k: int, m: int) -> Tuple[float, float]:
    """(z, density): the standard normal quantile of 1 - k/m and the density there (the selection's first guess)."""
    z = NormalDist().inv_cdf(1.0 - k / m)
    return z, math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy()


def topk_softmax_av(s: torch.Tensor, vp: torch.Tensor, w0: int, r0: int, k: int, vals: torch.Tensor,
                    idxs: torch.Tensor, out: torch.Tensor) -> int:
    """One tile of a first top-k layer; returns the number of counting passes of the selections.

    Args:
        s: (cw, h, r, n) float32 scores of windows ``w0:w0+cw``, query rows ``r0:r0+r`` (contiguous rows).
        vp: (B_, h, n, D) float32 values, rows zero-padded to D (:func:`pad_lanes`).
        k: kept keys per row, 0 < k < n.
        vals: (B_, h, n, k) float32 out: softmax weights of the kept keys (not renormalised).
        idxs: (B_, h, n, k) int16 / int32 out: their key positions (any order).
        out: (B_, n, h, d) float32 out: ``out[w, i, hh] = sum_t vals[w, hh, i, t] * v[w, hh, idxs[w, hh, i, t]]``.
    """
    _check()
    n = s.shape[-1]
    if not 0 < k < n:
        raise ValueError(f'topk_softmax_av: k={k} must be in [1, {n - 1}]')
    z, dens = normal_guess(k, n)
    return _topk_softmax_av(_np(s), _np(vp), w0, r0, k, F32(z), F32(dens), _np(vals), _np(idxs), _np(out))


def focused_sparse_rows(qp: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, bias: torch.Tensor,
                        pvals: torch.Tensor, pidx: torch.Tensor, w0: int, w1: int, k: int, training: bool,
                        vals: torch.Tensor, idxs: torch.Tensor, out: torch.Tensor) -> int:
    """Windows ``w0:w1`` of a layer with sparse input; returns the number of counting passes of the selections.

    Args:
        qp, kp, vp: (B_, h, n, D) float32 queries (scaled), keys, values, zero-padded (:func:`pad_lanes`).
        bias: (h or 1, n, n) float32 relative-position bias (contiguous).
        pvals, pidx: (B_, h, n, K') the inherited weights and key positions.
        k: this layer's k; ``k >= K'`` keeps the K' keys (no selection; ``vals`` / ``idxs`` may then be ``pvals`` /
            ``pidx``, updated in place).
        training: focusing by the training formula ``(a p + eps) / (sum a p + eps)``, else by the eval one
            ``(a p + eps) / (sum (a p + eps) + eps)``.
        vals, idxs: (B_, h, n, min(k, K')) out: the focused weights kept and their key positions.
        out: (B_, n, h, d) float32 out: the aggregation over the kept keys.
    """
    _check()
    kk = pidx.shape[-1]
    z, dens = normal_guess(min(k, kk - 1), kk)
    return _focused_sparse_rows(_np(qp), _np(kp), _np(vp), _np(bias), _np(pvals), _np(pidx), w0, w1, k, F32(z),
                                F32(dens), bool(training), _np(vals), _np(idxs), _np(out))


__all__ = ['LANES', 'available', 'unavailable_reason', 'enabled', 'pad_lanes', 'normal_guess', 'topk_softmax_av',
           'focused_sparse_rows']
