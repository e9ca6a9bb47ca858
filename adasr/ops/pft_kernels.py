"""Compiled CPU kernels (numba) of PFT's inference layers (float32, no autograd), one query row (or two) at a time
with the row in L1 cache.

* :class:`DenseRows`: dense layers (softmax attention with every key) and the first top-k layer of a parity (the k
  largest scores of each row and their softmax weights over the whole row, not renormalised). The products with
  every key are one vectorised pass over the transposed keys per pair of query rows; no n x n map is written.
* :class:`SparseRows`: layers with sparse input (K' inherited keys per row): the products at the K' keys (16 gathered
  key rows per vectorised step, :func:`_scores_intrinsic` where numba targets AVX-512, else two transposed groups of
  eight, :func:`_scores_halves_intrinsic`: the same numbers, for head dims up to 48 in chunks of 16 (PFT-light's
  13, PFT's 40); or with every key, read at the keys, when K' is a large share of the window), the bias at the
  keys (from the (n, n) bias rows, or from the layer's relative-position table, 16 KB in cache instead of 4 MB of
  rows: :func:`_bias_layout`), softmax, progressive focusing by the inherited weights and top-k when k < K',
  written into the layer's state.
* :func:`aggregate`: the aggregation of both, sum_t w_t v[idx_t] per query row, vectorised across the head dim by
  an LLVM-IR intrinsic (:func:`_bag_intrinsic`: a masked 16-lane load of each gathered value row and one fused
  multiply-add per key, four query rows per pass; numba alone cannot vectorise it: it vectorises innermost loops
  only, its SLP vectoriser is off since numba#8705, and LLVM's gathers measured slower than scalar code). It sums in
  FBGEMM's ``embedding_bag`` order, so its numbers are :func:`adasr.ops.embedding_bag_av`'s bit for bit.
* :func:`topk_softmax`: the first top-k layer's rows for score head dims above :data:`DENSE_ROWS_MAX_DIM` (BLAS
  scores computed outside).
* :func:`topk_positions`: the selection alone.

The layer kernels are generated per head dim (:func:`layer_source`: the dims unrolled with constant indices, so the
query values stay in registers) and cached on disk (:mod:`adasr.ops.codegen`).

Selection (:func:`_select`): the k-th largest value of a row is bracketed by counting passes (``#{x > t}``, one
vectorised loop over the row) at thresholds from a normal guess (mean + z std of the row), Newton steps and
interpolation between the bracket's ends, until at most a few values are undecided; the compaction then writes the
positions above the bracket and the few candidates, of which the largest are picked (:func:`_compact_vector`, 16
positions per step: by AVX-512 compression where numba targets AVX-512F, by a table of lane permutations and
``vpermd`` where it targets AVX2; else :func:`_compact_scalar`, a vectorised code pass and a branch-free scalar
loop). The kept set is exact, as ``torch.topk`` / ``numpy.argpartition`` (ties
at the k-th value broken arbitrarily; positions in no order).

Every sum is in an order fixed by the code (16-lane running sums folded in a fixed order, :func:`_sum_intrinsic`;
no fast-math reassociation), so the numbers are the same whether a kernel was compiled in the process or loaded
from the cache (with LLVM free to reassociate they differed by an ulp).

``exp`` is a vectorisable float32 routine (:func:`_exp_shifted`: Cody-Waite range reduction and a degree-7
polynomial; relative error below 3e-7, within an ulp or two of ``torch.exp``); ``exp(y) = 0`` below y = -87.68, as
flushed denormals.

Compiled lazily on first use (``cache=True``: the machine code is kept in numba's cache directory: ``__pycache__``
next to this file or ``NUMBA_CACHE_DIR`` for the fixed kernels, ``~/.cache/adasr/pft_kernels`` for the generated
ones; about 12 s of compilation for PFT-light without a cache, well under a second to load it). The kernels release the
GIL and run on the engine's worker threads (:mod:`adasr.ops.scheduling`), so they use the thread count of the tile
pool; numba's own threading is not used. :func:`enabled` decides per call (option ``pft_kernel``,
``ADASR_PFT_KERNEL``; CPU float32 tensors only).
"""
import hashlib
import math
from statistics import NormalDist
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from adasr.ops import codegen
from adasr.ops.config import get_option
from adasr.ops.sparse_attention import _BAG as _EBAG_KEYS  # embedding_bag_av's longest bag

try:
    import numba
    _NUMBA_ERROR: Optional[BaseException] = None
    codegen.configure_numba()  # before the first decorated function below makes numba's CPU target
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
_CANDIDATES = 16  # the selection brackets the k-th value until at most this many values are undecided (rows of
# 1024; m / 64, at least 2, in shorter rows, where a counting pass costs less than ordering the candidates)
_MAX_PASSES = 48

# FP contraction (a * b + c as one FMA) and no signed zeros; no 'reassoc': every sum is in an order the code fixes
# (the loop reductions are the intrinsics' 16-lane sums, :func:`_sum_intrinsic`), so the numbers do not depend on
# how LLVM compiled a kernel (with 'reassoc' they differed by an ulp between a kernel compiled in the process and the
# same kernel loaded from numba's cache); no assumption about NaN / inf
_ORDERED = {'contract', 'nsz'}


def available() -> bool:
    """True when numba imports (the kernels compile on first use)."""
    return numba is not None


def unavailable_reason() -> str:
    return '' if numba is not None else f'numba cannot be imported: {_NUMBA_ERROR!r}'


def _jit(fastmath=_ORDERED):
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
def _exp_shifted(x, m, shift, out):
    """out[j] = exp(x[j] - shift) for j < m (float32, x[j] <= shift; ``out`` apart from ``x``, else the loop runs
    scalar). Returns the sum of out[:m] (:func:`_sum_intrinsic`'s order). One vectorised loop: 2**nf is built from
    its float32 bits in the loop (0.0 for nf = -127); it was written to an int32 scratch and multiplied in a
    second loop, 1.4x the time (the same numbers)."""
    for j in range(m):
        y = max(x[j] - shift, _LOWEST)
        nf = np.floor(y * _LOG2E + _HALF)
        r = (y - nf * _LN2_HI) - nf * _LN2_LO
        p = _ONE + r * (_ONE + r * (_C2 + r * (_C3 + r * (_C4 + r * (_C5 + r * (_C6 + r * _C7))))))
        out[j] = p * _f32_bits((np.int32(nf) + np.int32(127)) << np.int32(23))
    return _sum16(out, m)


@_jit()
def _count_above(x, m, t):
    c = 0
    for j in range(m):
        c += x[j] > t
    return c


@_jit()
def _moments(x, m):
    return _sum16(x, m), _dot16(x, x, m)


_SLACK = 16  # extra entries of the selection's position scratch (the vector compaction stores 16 at a time)


def _target_has(feature: str) -> bool:
    """Whether numba compiles for a CPU with ``feature`` (LLVM's name: 'avx512f', 'avx2'; the host's CPU, unless
    ``NUMBA_CPU_NAME`` names another)."""
    if numba is None:
        return False
    from numba.core import config as numba_config

    if numba_config.CPU_NAME and numba_config.CPU_NAME != 'host':
        return f'+{feature}' in (numba_config.CPU_FEATURES or '')
    from llvmlite import binding

    return bool(binding.get_host_cpu_features().get(feature, False))


def _avx512_target() -> bool:
    """Whether numba compiles for a CPU with AVX-512F."""
    return _target_has('avx512f')


def _avx2_target() -> bool:
    """Whether numba compiles for a CPU with AVX2."""
    return _target_has('avx2')


# ---- LLVM IR pieces of the intrinsics below (llvmlite imported only when numba is) ---------------------------------

def _splat(builder, x, ty):
    """``x`` in every lane of the vector type ``ty``."""
    from llvmlite import ir

    i32 = ir.IntType(32)
    one = builder.insert_element(ir.Constant(ty, ir.Undefined), x, ir.Constant(i32, 0))
    return builder.shuffle_vector(one, ir.Constant(ty, ir.Undefined),
                                  ir.Constant(ir.VectorType(i32, ty.count), [0] * ty.count))


def _declare(builder, name: str, ret, args):
    """The LLVM function (intrinsic) ``name`` of type ``ret (args)`` in the module being built."""
    from llvmlite import ir
    from numba.core import cgutils

    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _clamped_row(builder, j, signed: bool, last):
    """A loaded position widened to 64 bits and clamped to ``[0, last]`` (a negative one is a huge unsigned one):
    the row an intrinsic reads, never one outside the array."""
    from llvmlite import ir

    if j.type.width < 64:
        j = builder.sext(j, ir.IntType(64)) if signed else builder.zext(j, ir.IntType(64))
    return builder.select(builder.icmp_unsigned('>', j, last), last, j)


def _compress16_intrinsic():
    """``_compress16(x, j, lo, hi, sel, ns, cand, nc)``: of the positions j .. j + 15 of x (float32 or float64), those
    above ``hi`` written packed to sel[ns:], those in (lo, hi] (NaN in neither) to cand[nc:] (16 int32 stored in
    each: both need :data:`_SLACK` spare entries); returns the two counts as ``above + (inside << 5)``. One load and
    three compares per 16 values, AVX-512's register ``vpcompressd`` and one plain store per output (LLVM's generic
    compress-store becomes ``vpcompressd`` to memory, microcoded and ~6x slower on Zen 4)."""
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def _compress16(typingctx, x, j, lo, hi, sel, ns, cand, nc):
        if not (isinstance(x, types.Array) and x.dtype in (types.float32, types.float64)):
            return None
        sig = types.intp(x, j, lo, hi, sel, ns, cand, nc)

        def codegen(context, builder, signature, args):
            xa, jj, lov, hiv, sa, nsv, ca, ncv = args
            i32, i1 = ir.IntType(32), ir.IntType(1)
            ft = context.get_value_type(signature.args[0].dtype)
            lanes = 16 if signature.args[0].dtype == types.float32 else 8
            vf = ir.VectorType(ft, lanes)
            v16i, v16b = ir.VectorType(i32, 16), ir.VectorType(i1, 16)
            xarr = context.make_array(signature.args[0])(context, builder, xa)
            lov = context.cast(builder, lov, signature.args[2], signature.args[0].dtype)
            hiv = context.cast(builder, hiv, signature.args[3], signature.args[0].dtype)

            above, inside = [], []
            for part in range(16 // lanes):
                ptr = builder.gep(xarr.data, [builder.add(jj, ir.Constant(jj.type, part * lanes))])
                vals = builder.load(builder.bitcast(ptr, vf.as_pointer()), align=4)
                above.append(builder.fcmp_ordered('>', vals, _splat(builder, hiv, vf)))
                inside.append(builder.and_(builder.fcmp_ordered('<=', vals, _splat(builder, hiv, vf)),
                                           builder.fcmp_ordered('>', vals, _splat(builder, lov, vf))))
            idx = builder.add(_splat(builder, builder.trunc(jj, i32), v16i), ir.Constant(v16i, list(range(16))))
            compress = _declare(builder, 'llvm.x86.avx512.mask.compress.v16i32', v16i, [v16i, v16i, v16b])
            popcount = builder.module.declare_intrinsic('llvm.ctpop', [ir.IntType(16)])
            intp = context.get_value_type(types.intp)
            counts = []
            for masks, arr, ty, n in ((above, sa, signature.args[4], nsv), (inside, ca, signature.args[6], ncv)):
                mask = masks[0] if lanes == 16 else builder.shuffle_vector(
                    masks[0], masks[1], ir.Constant(ir.VectorType(i32, 16), list(range(16))))
                packed = builder.call(compress, [idx, ir.Constant(v16i, [0] * 16), mask])
                out = context.make_array(ty)(context, builder, arr)
                builder.store(packed, builder.bitcast(builder.gep(out.data, [n]), v16i.as_pointer()), align=4)
                counts.append(builder.zext(builder.call(popcount, [builder.bitcast(mask, ir.IntType(16))]), intp))
            return builder.or_(counts[0], builder.shl(counts[1], ir.Constant(intp, 5)))

        return sig, codegen

    return _compress16


def _left_pack_table(builder):
    """A module-global constant of 256 x 8 bytes: entry b lists the set bits of b in ascending order (zero-padded),
    the lane permutation that packs the lanes of an 8-lane mask b to the front."""
    from llvmlite import ir

    name = 'adasr_left_pack_8'
    table = builder.module.globals.get(name)
    if table is None:
        i8 = ir.IntType(8)
        rows = [[lane for lane in range(8) if b >> lane & 1] for b in range(256)]
        ty = ir.ArrayType(i8, 256 * 8)
        table = ir.GlobalVariable(builder.module, ty, name)
        table.linkage = 'internal'
        table.global_constant = True
        table.initializer = ir.Constant(ty, [lane for row in rows for lane in row + [0] * (8 - len(row))])
    return table


def _compress16_avx2_intrinsic():
    """:func:`_compress16_intrinsic`'s ``_compress16`` (same signature, same writes and counts) for AVX2 CPUs, which
    have no compression instruction: per group of eight positions, the compare mask's eight bits (``vmovmskps``)
    index a 2 KB table of lane permutations (:func:`_left_pack_table`) by which ``vpermd`` packs the positions to
    the front of a register, stored whole; the count is the mask's population count. (LLVM's generic
    compress-store is a branch per lane on AVX2.)"""
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def _compress16(typingctx, x, j, lo, hi, sel, ns, cand, nc):
        if not (isinstance(x, types.Array) and x.dtype in (types.float32, types.float64)):
            return None
        sig = types.intp(x, j, lo, hi, sel, ns, cand, nc)

        def codegen(context, builder, signature, args):
            xa, jj, lov, hiv, sa, nsv, ca, ncv = args
            i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
            ft = context.get_value_type(signature.args[0].dtype)
            lanes = 8 if signature.args[0].dtype == types.float32 else 4
            vf = ir.VectorType(ft, lanes)
            v8i = ir.VectorType(i32, 8)
            xarr = context.make_array(signature.args[0])(context, builder, xa)
            lov = context.cast(builder, lov, signature.args[2], signature.args[0].dtype)
            hiv = context.cast(builder, hiv, signature.args[3], signature.args[0].dtype)
            table = builder.bitcast(_left_pack_table(builder), i8.as_pointer())
            permd = _declare(builder, 'llvm.x86.avx2.permd', v8i, [v8i, v8i])
            popcount = builder.module.declare_intrinsic('llvm.ctpop', [i8])
            intp = context.get_value_type(types.intp)
            outs = [(context.make_array(signature.args[4])(context, builder, sa), nsv),
                    (context.make_array(signature.args[6])(context, builder, ca), ncv)]
            totals = [ir.Constant(intp, 0), ir.Constant(intp, 0)]
            for group in (0, 8):
                above, inside = [], []
                for part in range(0, 8, lanes):
                    ptr = builder.gep(xarr.data, [builder.add(jj, ir.Constant(jj.type, group + part))])
                    vals = builder.load(builder.bitcast(ptr, vf.as_pointer()), align=4)
                    above.append(builder.fcmp_ordered('>', vals, _splat(builder, hiv, vf)))
                    inside.append(builder.and_(builder.fcmp_ordered('<=', vals, _splat(builder, hiv, vf)),
                                               builder.fcmp_ordered('>', vals, _splat(builder, lov, vf))))
                idx = builder.add(_splat(builder, builder.trunc(builder.add(jj, ir.Constant(jj.type, group)), i32),
                                         v8i), ir.Constant(v8i, list(range(8))))
                for o, masks in enumerate((above, inside)):
                    mask = masks[0] if lanes == 8 else builder.shuffle_vector(
                        masks[0], masks[1], ir.Constant(v8i, list(range(8))))
                    bits = builder.bitcast(mask, i8)
                    row = builder.gep(table, [builder.mul(builder.zext(bits, i64), ir.Constant(i64, 8))])
                    perm = builder.zext(builder.load(builder.bitcast(row, ir.VectorType(i8, 8).as_pointer()),
                                                     align=1), v8i)
                    packed = builder.call(permd, [idx, perm])
                    out, start = outs[o]
                    dst = builder.gep(out.data, [builder.add(start, totals[o])])
                    builder.store(packed, builder.bitcast(dst, v8i.as_pointer()), align=4)
                    totals[o] = builder.add(totals[o], builder.zext(builder.call(popcount, [bits]), intp))
            return builder.or_(totals[0], builder.shl(totals[1], ir.Constant(intp, 5)))

        return sig, codegen

    return _compress16


@_jit()
def _compact_scalar(x, m, lo, hi, sel, cand, code):
    """Positions of x[:m] above hi into sel, those in (lo, hi] into cand (in order); returns (#sel, #cand)."""
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
    return ns, nc


if _avx512_target() or _avx2_target():
    _compress16 = _compress16_intrinsic() if _avx512_target() else _compress16_avx2_intrinsic()

    @_jit()
    def _compact_vector(x, m, lo, hi, sel, cand, code):
        """:func:`_compact_scalar` 16 positions at a time: AVX-512 compression, or on AVX2 a table of lane
        permutations (either 3-4x faster than the scalar loop on rows of 1024, measured on an AVX-512 core)."""
        ns = 0
        nc = 0
        j = 0
        while j + 16 <= m:
            both = _compress16(x, j, lo, hi, sel, ns, cand, nc)
            ns += both & 31
            nc += both >> 5
            j += 16
        for t in range(j, m):
            v = x[t]
            sel[ns] = t
            ns += v > hi
            cand[nc] = t
            nc += (v <= hi) & (v > lo)
        return ns, nc

    _compact = _compact_vector
else:
    _compact_vector = None
    _compact = _compact_scalar


# ---- aggregation: weighted sums of gathered value rows ---------------------------------------------------------------

_BAG_ROWS = 4  # query rows per pass of the aggregation (independent FMA chains)


def _bag_intrinsic(rows: int):
    """``_bag(w, ix, r0, t0, t1, v, c0, out, o0)``: for r < ``rows`` (a compile-time count),
    ``out[o0 + r, c0:c0 + 16] = sum over t in [t0, t1) of w[r0 + r, t] * v[ix[r0 + r, t], c0:c0 + 16]`` (the lanes
    below v's width), summed in t order by one fused multiply-add per key into a 16-lane register: the order and the
    rounding of FBGEMM's ``embedding_bag`` (sum mode, per-sample weights), so the same numbers. w, ix, v, out: 2-D,
    unit stride along the last axis; an index outside v's rows is clamped to the last row (never read out of
    bounds). Generic LLVM vector IR (masked 16-lane loads and stores, ``llvm.fma``): AVX-512 registers where there are
    some, two AVX2 halves elsewhere; the rows of ``v`` best 64-byte aligned and 16 floats apart (no split loads)."""
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    @intrinsic
    def _bag(typingctx, w, ix, r0, t0, t1, v, c0, out, o0):
        arrays = (w, ix, v, out)
        if not all(isinstance(a, types.Array) and a.ndim == 2 for a in arrays) or not (
                w.dtype == v.dtype == out.dtype == types.float32 and isinstance(ix.dtype, types.Integer)):
            return None
        sig = types.none(w, ix, r0, t0, t1, v, c0, out, o0)

        def codegen(context, builder, signature, args):
            sa = signature.args
            i32, i64 = ir.IntType(32), ir.IntType(64)
            v16f, v16i = ir.VectorType(ir.FloatType(), 16), ir.VectorType(i32, 16)
            v16b, ptrty = ir.VectorType(ir.IntType(1), 16), ir.VectorType(ir.FloatType(), 16).as_pointer()
            warr, ixarr, varr, oarr = (context.make_array(sa[k])(context, builder, args[k]) for k in (0, 1, 5, 7))
            r0v, t0v, t1v, c0v, o0v = (context.cast(builder, args[k], sa[k], types.intp) for k in (2, 3, 4, 6, 8))

            def row_stride(arr, elem_bytes):
                return builder.sdiv(builder.extract_value(arr.strides, 0), ir.Constant(i64, elem_bytes))

            ws, vs, os_ = row_stride(warr, 4), row_stride(varr, 4), row_stride(oarr, 4)
            ixs = row_stride(ixarr, sa[1].dtype.bitwidth // 8)
            last = builder.sub(builder.extract_value(varr.shape, 0), ir.Constant(i64, 1))
            lanes = builder.add(_splat(builder, builder.trunc(c0v, i32), v16i), ir.Constant(v16i, list(range(16))))
            mask = builder.icmp_signed('<', lanes, _splat(builder, builder.trunc(builder.extract_value(varr.shape, 1),
                                                                                 i32), v16i))
            load = _declare(builder, 'llvm.masked.load.v16f32.p0', v16f, [ptrty, i32, v16b, v16f])
            store = _declare(builder, 'llvm.masked.store.v16f32.p0', ir.VoidType(), [v16f, ptrty, i32, v16b])
            fma = _declare(builder, 'llvm.fma.v16f32', v16f, [v16f, v16f, v16f])
            zero = ir.Constant(v16f, [0.0] * 16)
            accs = [cgutils.alloca_once_value(builder, zero) for _ in range(rows)]  # registers after SROA
            wrow = [builder.mul(builder.add(r0v, ir.Constant(i64, r)), ws) for r in range(rows)]
            irow = [builder.mul(builder.add(r0v, ir.Constant(i64, r)), ixs) for r in range(rows)]
            with cgutils.for_range_slice(builder, t0v, t1v, ir.Constant(i64, 1), inc=True) as (t, _):
                for r in range(rows):
                    wt = builder.load(builder.gep(warr.data, [builder.add(wrow[r], t)]))
                    j = _clamped_row(builder, builder.load(builder.gep(ixarr.data, [builder.add(irow[r], t)])),
                                     sa[1].dtype.signed, last)
                    ptr = builder.gep(varr.data, [builder.add(builder.mul(j, vs), c0v)])
                    row = builder.call(load, [builder.bitcast(ptr, ptrty), ir.Constant(i32, 4), mask, zero])
                    builder.store(builder.call(fma, [row, _splat(builder, wt, v16f), builder.load(accs[r])]),
                                  accs[r])
            for r in range(rows):
                orow = builder.mul(builder.add(o0v, ir.Constant(i64, r)), os_)
                ptr = builder.gep(oarr.data, [builder.add(orow, c0v)])
                builder.call(store, [builder.load(accs[r]), builder.bitcast(ptr, ptrty), ir.Constant(i32, 4), mask])
            return context.get_dummy_value()

        return sig, codegen

    return _bag


def _fold16(builder, a, vt, combine=None):
    """Lane 0 + ... + lane 15 of the 16-lane vector ``a`` (or another ``combine(builder, b, a)`` of the lanes):
    folded onto the lower half three times, then lanes 0 + 1."""
    from llvmlite import ir

    i32 = ir.IntType(32)
    vi = ir.VectorType(i32, 16)
    for half in (8, 4, 2, 1):
        b = builder.shuffle_vector(a, ir.Constant(vt, ir.Undefined),
                                   ir.Constant(vi, [h + half if h < half else h for h in range(16)]))
        a = builder.fadd(a, b) if combine is None else combine(builder, b, a)
    return builder.extract_element(a, ir.Constant(i32, 0))


def _larger(builder, b, a):
    """b where b > a, else a (lane by lane; a NaN in b is skipped)."""
    return builder.select(builder.fcmp_ordered('>', b, a), b, a)


def _max_intrinsic():
    """``_max16(x, m)``: the largest of x[:m] (float32, contiguous, m >= 1) by 16-lane vector compares, then a
    reduction of the 16 lanes and a scalar tail (a maximum is exact in any order; NaN entries are skipped unless
    x[0] is one). numba does not vectorise a float maximum (without ``nnan`` LLVM keeps the compare chain); four
    scalar running maxima, the form before, took 0.05 us for 256 values and 0.16 us for 1024, this 0.009 / 0.035."""
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    @intrinsic
    def _max16(typingctx, x, m):
        if not (isinstance(x, types.Array) and x.ndim == 1 and x.dtype == types.float32 and x.layout == 'C'
                and isinstance(m, types.Integer)):
            return None
        sig = types.float32(x, m)

        def codegen(context, builder, signature, args):
            i64 = ir.IntType(64)
            v16f = ir.VectorType(ir.FloatType(), 16)
            xa = context.make_array(signature.args[0])(context, builder, args[0])
            mv = context.cast(builder, args[1], signature.args[1], types.intp)
            acc = cgutils.alloca_once_value(builder, _splat(builder, builder.load(xa.data), v16f))
            chunks = builder.sdiv(mv, ir.Constant(i64, 16))
            with cgutils.for_range(builder, chunks) as loop:
                ptr = builder.gep(xa.data, [builder.mul(loop.index, ir.Constant(i64, 16))])
                v = builder.load(builder.bitcast(ptr, v16f.as_pointer()), align=4)
                builder.store(_larger(builder, v, builder.load(acc)), acc)
            best = cgutils.alloca_once_value(builder, _fold16(builder, builder.load(acc), v16f, _larger))
            with cgutils.for_range_slice(builder, builder.mul(chunks, ir.Constant(i64, 16)), mv,
                                         ir.Constant(i64, 1), inc=True) as (t, _):
                v = builder.load(builder.gep(xa.data, [t]))
                builder.store(_larger(builder, v, builder.load(best)), best)
            return builder.load(best)

        return sig, codegen

    return _max16


def _lane_sums(builder, xs, ys, m, dtype):
    """The 16-lane sums of :func:`_sum_intrinsic`: for every pair (x, y) of the pointers ``xs`` x ``ys`` (x-major) the
    sum of x[j] * y[j], j < m (``ys`` empty: of x[j]), each in its own running lane sums over one pass through the
    whole chunks (every x and y chunk loaded once for all pairs: independent FMA chains), then its fold and tail."""
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils

    i64 = ir.IntType(64)
    et = ir.FloatType() if dtype == types.float32 else ir.DoubleType()
    vt = ir.VectorType(et, 16)
    name = 'f32' if dtype == types.float32 else 'f64'
    fma_v = _declare(builder, f'llvm.fma.v16{name}', vt, [vt, vt, vt])
    fma_s = _declare(builder, f'llvm.fma.{name}', et, [et, et, et])
    pairs = [(x, y) for x in xs for y in ys] if ys else [(x, None) for x in xs]
    accs = [cgutils.alloca_once_value(builder, ir.Constant(vt, [0.0] * 16)) for _ in pairs]
    chunks = builder.sdiv(m, ir.Constant(i64, 16))
    with cgutils.for_range(builder, chunks) as loop:
        at = builder.mul(loop.index, ir.Constant(i64, 16))
        chunk = {id(ptr): builder.load(builder.bitcast(builder.gep(ptr, [at]), vt.as_pointer()),
                                       align=dtype.bitwidth // 8) for ptr in list(xs) + list(ys)}
        for (x, y), acc in zip(pairs, accs):
            a = builder.load(acc)
            builder.store(builder.fadd(a, chunk[id(x)]) if y is None else
                          builder.call(fma_v, [chunk[id(x)], chunk[id(y)], a]), acc)
    totals = []
    for (x, y), acc in zip(pairs, accs):
        total = cgutils.alloca_once_value(builder, _fold16(builder, builder.load(acc), vt))
        with cgutils.for_range_slice(builder, builder.mul(chunks, ir.Constant(i64, 16)), m,
                                     ir.Constant(i64, 1), inc=True) as (t, _):
            r = builder.load(total)
            xt = builder.load(builder.gep(x, [t]))
            builder.store(builder.fadd(r, xt) if y is None else
                          builder.call(fma_s, [xt, builder.load(builder.gep(y, [t])), r]), total)
        totals.append(builder.load(total))
    return totals


def _vector_row(a) -> bool:
    from numba import types

    return isinstance(a, types.Array) and a.ndim == 1 and a.layout == 'C' and a.dtype in (types.float32,
                                                                                           types.float64)


def _sum_intrinsic(products: bool):
    """``_sum16(x, m)`` (``products`` False): x[0] + ... + x[m - 1]; ``_dot16(x, y, m)`` (True): the sum of
    x[j] * y[j] by fused multiply-adds. x (and y): 1-D contiguous float32 or float64 with at least m entries. The
    order is fixed by the IR: 16 running lane sums (lane l takes j = l mod 16 of the whole chunks, in order), folded
    onto the lower half three times and then lanes 0 + 1, then the tail j >= 16 * (m // 16) added in order. No
    fast-math flag, so LLVM keeps that order whatever the context it is compiled in; a loop reduction under
    'reassoc' does not (its numbers differed by an ulp between a kernel compiled in the process and the same
    kernel loaded from numba's cache). 16-lane registers on AVX-512, two halves on AVX2: the same numbers."""
    from numba import types
    from numba.extending import intrinsic

    def pointers(context, builder, tys, vals):
        return [context.make_array(t)(context, builder, v).data for t, v in zip(tys, vals)]

    if products:
        @intrinsic
        def _dot16(typingctx, x, y, m):
            if not (_vector_row(x) and _vector_row(y) and x.dtype == y.dtype and isinstance(m, types.Integer)):
                return None

            def codegen(context, builder, signature, args):
                xp, yp = pointers(context, builder, signature.args[:2], args[:2])
                mv = context.cast(builder, args[2], signature.args[2], types.intp)
                return _lane_sums(builder, [xp], [yp], mv, signature.args[0].dtype)[0]

            return x.dtype(x, y, m), codegen

        return _dot16

    @intrinsic
    def _sum16(typingctx, x, m):
        if not (_vector_row(x) and isinstance(m, types.Integer)):
            return None

        def codegen(context, builder, signature, args):
            xp, = pointers(context, builder, signature.args[:1], args[:1])
            mv = context.cast(builder, args[1], signature.args[1], types.intp)
            return _lane_sums(builder, [xp], [], mv, signature.args[0].dtype)[0]

        return x.dtype(x, m), codegen

    return _sum16


def _dots_intrinsic():
    """``_dots16(xs, ys, m)``: the tuple of every :func:`_sum_intrinsic` ``_dot16(x, y, m)`` of the tuples of rows
    ``xs`` x ``ys`` (x-major), each bit for bit ``_dot16``'s, in one pass over the rows (each chunk of x and y loaded
    once for all products; the independent FMA chains keep the vector units busy where one chain waits for the
    latency of its last FMA): a dense layer's aggregation, two query rows by a few value channels."""
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    @intrinsic
    def _dots16(typingctx, xs, ys, m):
        if not (isinstance(xs, types.UniTuple) and isinstance(ys, types.UniTuple) and _vector_row(xs.dtype)
                and xs.dtype == ys.dtype and isinstance(m, types.Integer)):
            return None
        dtype = xs.dtype.dtype
        sig = types.UniTuple(dtype, len(xs) * len(ys))(xs, ys, m)

        def codegen(context, builder, signature, args):
            rows = [[context.make_array(t.dtype)(context, builder, v).data for v in cgutils.unpack_tuple(builder, a)]
                    for t, a in zip(signature.args[:2], args[:2])]
            mv = context.cast(builder, args[2], signature.args[2], types.intp)
            totals = _lane_sums(builder, rows[0], rows[1], mv, dtype)
            return context.make_tuple(builder, signature.return_type, totals)

        return sig, codegen

    return _dots16


def _bits_intrinsic():
    """``_f32_bits(i)``: the float32 whose bits are the low 32 bits of the integer i (a vectorisable bit cast)."""
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def _f32_bits(typingctx, i):
        if not isinstance(i, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            v = args[0]
            if v.type.width != 32:
                v = builder.trunc(v, ir.IntType(32))
            return builder.bitcast(v, ir.FloatType())

        return types.float32(i), codegen

    return _f32_bits


_KEY_LANES = 16  # one chunk of a key row in the gathered score products (one 16-lane load per key and chunk)
_MAX_KEY_CHUNKS = 3
#: head dims up to this use the vectorised gathered score products (:func:`_scores_intrinsic`: up to three chunks of
#: 16 dims, PFT's 40 included); larger ones the scalar code
GATHERED_SCORES_MAX_DIM = _KEY_LANES * _MAX_KEY_CHUNKS


def key_chunks(d: int) -> int:
    """The 16-dim chunks of a key row of head dim ``d`` in the gathered score products."""
    return -(-d // _KEY_LANES)


def _combine_chunks(builder, sums):
    """The chunk sums of a key (dims 0-15, 16-31, 32-47) combined as the balanced tree over the head dims combines
    them (:func:`_tree`: its top split is at 16 for d <= 32, at 32 above): c0, c0 + c1, (c0 + c1) + c2."""
    total = sums[0]
    for extra in sums[1:]:
        total = builder.fadd(total, extra)
    return total


def _scores_step_intrinsic(emit, width: int):
    """An intrinsic with ``_scores16``'s signature and argument checks (:func:`_scores_intrinsic`) whose code is written
    by ``emit(builder, q, x, t0, kk, gather)``: q, x the data pointers of q16 and x, t0 and kk as intp, and
    ``gather(g0, lanes)`` -> (row pointers, bias vector): the key rows and the biases of the ``lanes`` keys at list
    positions g0, g0 + 1, ... (a position at or past kk reads the step's first key t0; a key position outside the rows
    of kp the last row: never a read out of bounds; the bias of key j is ``brow[boff[j]]``). Key rows ``width``
    floats apart and contiguous positions, offsets and bias rows (what the kernels pass) are addressed without a
    multiplication per key (steps 1.05-1.21x faster, docs/pft.md); other strides take a general path, the same
    numbers."""
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def _scores16(typingctx, kp, q16, brow, boff, prow, t0, kk, x):
        floats = (kp, q16, brow, x)
        if not (all(isinstance(a, types.Array) and a.dtype == types.float32 for a in floats) and kp.ndim == 2
                and q16.ndim == brow.ndim == x.ndim == 1 and q16.layout == x.layout == 'C'
                and isinstance(prow, types.Array) and prow.ndim == 1 and isinstance(prow.dtype, types.Integer)
                and isinstance(boff, types.Array) and boff.ndim == 1 and boff.dtype == types.int32):
            return None
        sig = types.none(kp, q16, brow, boff, prow, t0, kk, x)

        def codegen(context, builder, signature, args):
            sa = signature.args
            i32, i64 = ir.IntType(32), ir.IntType(64)
            kpa, qa, ba, oa, pa, xa = (context.make_array(sa[k])(context, builder, args[k]) for k in (0, 1, 2, 3, 4, 7))
            t0v, kkv = (context.cast(builder, args[k], sa[k], types.intp) for k in (5, 6))
            last = builder.sub(builder.extract_value(kpa.shape, 0), ir.Constant(i64, 1))
            kstride = builder.sdiv(builder.extract_value(kpa.strides, 0), ir.Constant(i64, 4))

            def stride(arr, ty, elem_bytes):  # unit for contiguous arrays: no multiplication per key
                if ty.layout == 'C':
                    return ir.Constant(i64, 1)
                return builder.sdiv(builder.extract_value(arr.strides, 0), ir.Constant(i64, elem_bytes))

            pstride = stride(pa, sa[4], sa[4].dtype.bitwidth // 8)
            bstride, ostride = stride(ba, sa[2], 4), stride(oa, sa[3], 4)

            def gather_rows(row_stride):
                def gather(g0, lanes):
                    rows, bias = [], ir.Constant(ir.VectorType(ir.FloatType(), lanes), ir.Undefined)
                    for lane in range(lanes):
                        t = builder.add(g0, ir.Constant(i64, lane))
                        t = builder.select(builder.icmp_signed('<', t, kkv), t, t0v)  # past the end: the first
                        j = _clamped_row(builder, builder.load(builder.gep(pa.data, [builder.mul(t, pstride)])),
                                         sa[4].dtype.signed, last)
                        rows.append(builder.gep(kpa.data, [builder.mul(j, row_stride)]))
                        b = builder.sext(builder.load(builder.gep(oa.data, [builder.mul(j, ostride)])), i64)
                        bias = builder.insert_element(
                            bias, builder.load(builder.gep(ba.data, [builder.mul(b, bstride)])), ir.Constant(i32, lane))
                    return rows, bias
                return gather

            # key rows of the documented width (what the kernels pass): a constant row offset, no multiplication
            with builder.if_else(builder.icmp_signed('==', kstride, ir.Constant(i64, width))) as (packed, other):
                with packed:
                    emit(builder, qa.data, xa.data, t0v, kkv, gather_rows(ir.Constant(i64, width)))
                with other:
                    emit(builder, qa.data, xa.data, t0v, kkv, gather_rows(kstride))
            return context.get_dummy_value()

        return sig, codegen

    return _scores16


def _scores_intrinsic(chunks: int = 1):
    """``_scores16(kp, q16, brow, boff, prow, t0, kk, x)``: the scores of one query row at 16 of its inherited keys,
    ``x[t0 + l] = brow[boff[j]] + sum_c q16[c] kp[j, c]`` with ``j = prow[t0 + l]``, for ``l < min(16, kk - t0)``
    (the other entries of x are not written). kp: (n, 16 ``chunks``) float32 key rows zero-padded to 16 ``chunks``
    floats (unit stride along the row); q16: the query zero-padded to as many floats (contiguous); brow, boff: the
    bias row and the int32 offsets (n) of the keys' biases in it (``arange(n)`` for a row of the (n, n) bias; a
    relative-position table's layout, :func:`_bias_layout`; the caller keeps them inside brow); prow: the key
    positions (any integer type; outside ``[0, n)`` clamped to the last row: never a read out of bounds); x:
    contiguous.

    Per chunk of 16 dims, the 16 key rows are loaded as 16-lane vectors and reduced together by a shuffle network:
    the first level pairs the dims (2c, 2c + 1) by one fused multiply-add (``fma(k_2c, q_2c, k_2c+1 q_2c+1)``) for
    two keys per register, the next levels add neighbouring partial sums (dims 0-3, 0-7, 0-15), four registers'
    worth of keys into one, so that the sixteen chunk sums come out in one register; the chunk sums are added as
    :func:`_combine_chunks` says, then the bias at the keys, and the register is stored (masked for the last
    group). Per key that is the balanced tree over the head dims that the vectorised full pass (:func:`_key_pass`)
    sums, with the fused multiply-adds at its first level. Generic LLVM vector IR (AVX-512 registers where there are
    some, AVX2 halves elsewhere); numba alone cannot vectorise it (per key it is a reduction over a gathered row)."""
    from llvmlite import ir

    def emit(builder, qp, xp, t0v, kkv, gather):
        i32, i64 = ir.IntType(32), ir.IntType(64)
        v16f, v16i = ir.VectorType(ir.FloatType(), 16), ir.VectorType(i32, 16)
        v16b = ir.VectorType(ir.IntType(1), 16)

        def shuffle(a, b, lanes):
            return builder.shuffle_vector(a, b, ir.Constant(v16i, lanes))

        def load16(ptr, offset):
            return builder.load(builder.bitcast(builder.gep(ptr, [ir.Constant(i64, offset)]), v16f.as_pointer()),
                                align=4)

        even, odd = list(range(0, 32, 2)), list(range(1, 32, 2))
        ptrs, bias = gather(t0v, 16)
        fma = _declare(builder, 'llvm.fma.v16f32', v16f, [v16f, v16f, v16f])
        sums = []
        for chunk in range(chunks):
            q = load16(qp, 16 * chunk)
            q_even, q_odd = shuffle(q, q, even[:8] * 2), shuffle(q, q, odd[:8] * 2)
            rows = [load16(r, 16 * chunk) for r in ptrs]
            # level 1: keys 2p and 2p + 1 in one register, 8 lanes each: dims (2c, 2c + 1) by one FMA
            level = [builder.call(fma, [shuffle(rows[2 * p], rows[2 * p + 1], even), q_even,
                                        builder.fmul(shuffle(rows[2 * p], rows[2 * p + 1], odd), q_odd)])
                     for p in range(8)]
            while len(level) > 1:  # neighbouring partial sums added: 4, 8, 16 keys per register
                level = [builder.fadd(shuffle(level[2 * p], level[2 * p + 1], even),
                                      shuffle(level[2 * p], level[2 * p + 1], odd)) for p in range(len(level) // 2)]
            sums.append(level[0])
        scores = builder.fadd(bias, _combine_chunks(builder, sums))
        count = _splat(builder, builder.trunc(builder.sub(kkv, t0v), i32), v16i)
        mask = builder.icmp_signed('<', ir.Constant(v16i, list(range(16))), count)
        store = _declare(builder, 'llvm.masked.store.v16f32.p0', ir.VoidType(),
                         [v16f, v16f.as_pointer(), i32, v16b])
        dst = builder.bitcast(builder.gep(xp, [t0v]), v16f.as_pointer())
        builder.call(store, [scores, dst, ir.Constant(i32, 4), mask])

    return _scores_step_intrinsic(emit, 16 * chunks)


def _scores_halves_intrinsic(chunks: int = 1):
    """``_scores16`` (same signature, the same numbers bit for bit) for CPUs without AVX-512: the 16 keys as two groups
    of eight, each group's key rows transposed in 8-lane registers (two 8 x 8 transposes by unpack, shuffle and
    128-bit lane permutes: register d then holds dim d of the eight keys), so that each key's sum is computed in its
    own lane by the very operations of :func:`_scores_intrinsic`: ``p_c = fma(k_2c, q_2c, k_2c+1 q_2c+1)`` for the
    eight dim pairs, then ``(p_0 + p_1) + (p_2 + p_3)`` and ``(p_4 + p_5) + (p_6 + p_7)``, their sum, the bias
    added. On AVX2 each 16-lane register of the other form is split in two, its shuffle network and lane inserts with
    it; this form takes 48 shuffles per eight keys (unpacks, in-lane shuffles, 128-bit lane permutes) and measured
    1.27-1.34x faster on an AVX2 core (docs/pft.md). Per further chunk of 16 dims the same, the chunk sums added
    as :func:`_combine_chunks` says. The stores are plain where the eight keys all lie before ``kk``, masked for
    the last group."""
    from llvmlite import ir

    def emit(builder, qp, xp, t0v, kkv, gather):
        i32, i64 = ir.IntType(32), ir.IntType(64)
        v8f, v8i, v8b = ir.VectorType(ir.FloatType(), 8), ir.VectorType(i32, 8), ir.VectorType(ir.IntType(1), 8)
        fma = _declare(builder, 'llvm.fma.v8f32', v8f, [v8f, v8f, v8f])
        store = _declare(builder, 'llvm.masked.store.v8f32.p0', ir.VoidType(), [v8f, v8f.as_pointer(), i32, v8b])
        qd = [_splat(builder, builder.load(builder.gep(qp, [ir.Constant(i64, d)])), v8f) for d in range(16 * chunks)]

        def shuffle(a, b, lanes):
            return builder.shuffle_vector(a, b, ir.Constant(v8i, lanes))

        def transpose(rows):  # 8 registers of 8 floats: row l lane d -> register d lane l
            t = [shuffle(rows[2 * p], rows[2 * p + 1], lanes) for p in range(4)
                 for lanes in ([0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15])]
            lo, hi = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
            u = [shuffle(t[a], t[a + 2], lanes) for a in (0, 1, 4, 5) for lanes in (lo, hi)]
            # u: dims (0,4), (1,5), (2,6), (3,7) of keys 0-3 (u[0..3]) and of keys 4-7 (u[4..7])
            first, second = [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]
            return ([shuffle(u[i], u[i + 4], first) for i in range(4)]
                    + [shuffle(u[i], u[i + 4], second) for i in range(4)])

        def load8(ptr):
            return builder.load(builder.bitcast(ptr, v8f.as_pointer()), align=4)

        for group in (0, 8):
            g0 = builder.add(t0v, ir.Constant(i64, group))
            ptrs, bias = gather(g0, 8)
            sums = []
            for chunk in range(chunks):
                base = 16 * chunk
                dims = (transpose([load8(builder.gep(r, [ir.Constant(i64, base)])) for r in ptrs])
                        + transpose([load8(builder.gep(r, [ir.Constant(i64, base + 8)])) for r in ptrs]))
                p = [builder.call(fma, [dims[2 * c], qd[base + 2 * c],
                                        builder.fmul(dims[2 * c + 1], qd[base + 2 * c + 1])]) for c in range(8)]
                while len(p) > 1:
                    p = [builder.fadd(p[2 * c], p[2 * c + 1]) for c in range(len(p) // 2)]
                sums.append(p[0])
            scores = builder.fadd(bias, _combine_chunks(builder, sums))
            dst = builder.bitcast(builder.gep(xp, [g0]), v8f.as_pointer())
            count = builder.sub(kkv, g0)
            with builder.if_else(builder.icmp_signed('>=', count, ir.Constant(i64, 8))) as (whole, part):
                with whole:
                    builder.store(scores, dst, align=4)
                with part:
                    mask = builder.icmp_signed('<', ir.Constant(v8i, list(range(8))),
                                               _splat(builder, builder.trunc(count, i32), v8i))
                    builder.call(store, [scores, dst, ir.Constant(i32, 4), mask])

    return _scores_step_intrinsic(emit, 16 * chunks)


if numba is not None:
    @_jit(_ORDERED)
    def _aligned_rows(m, width):
        """A zeroed (m, width) float32 scratch whose first row starts on a 64-byte boundary (rows of 16 floats then
        never straddle cache lines)."""
        flat = np.zeros(m * width + 16, np.float32)
        off = ((64 - flat.ctypes.data % 64) % 64) // 4
        return flat[off:off + m * width].reshape(m, width)

    _max16 = _max_intrinsic()
    _sum16 = _sum_intrinsic(False)
    _dot16 = _sum_intrinsic(True)
    _dots16 = _dots_intrinsic()
    _f32_bits = _bits_intrinsic()
    _scores16_wide = _scores_intrinsic()
    _scores16_halves = _scores_halves_intrinsic()
    _scores16 = _scores16_wide if _avx512_target() else _scores16_halves  # the same numbers; each where it is faster
    _scores32_wide, _scores48_wide = _scores_intrinsic(2), _scores_intrinsic(3)  # key rows of 2 and 3 chunks
    _scores32_halves, _scores48_halves = _scores_halves_intrinsic(2), _scores_halves_intrinsic(3)
    _scores32 = _scores32_wide if _avx512_target() else _scores32_halves
    _scores48 = _scores48_wide if _avx512_target() else _scores48_halves
    _bag_rows = _bag_intrinsic(_BAG_ROWS)
    _bag_row = _bag_intrinsic(1)

    @_jit(_ORDERED)
    def _add_parts(og, part, i, rows, c0, c1):
        """og[i + r, c0:c1] += part[r, c0:c1] for r < rows (the later bags of a row, in order)."""
        for r in range(rows):
            for c in range(c0, c1):
                og[i + r, c] = og[i + r, c] + part[r, c]

    @_jit(_ORDERED)
    def _aggregate(vals, idx, v, out):
        """out[g, i] = sum_t vals[g, i, t] * v[g, idx[g, i, t]] for (G, n, K) vals / idx, (G, m, d) v, (G, n, d)
        out, in :func:`adasr.ops.embedding_bag_av`'s order: bags of :data:`_EBAG_KEYS` keys summed in order when K
        is a larger multiple of it. Each group's values are first copied into 64-byte aligned rows of 16 floats."""
        g, n, kk = vals.shape
        m, d = v.shape[1], v.shape[2]
        parts = kk // _EBAG_KEYS if kk > _EBAG_KEYS and kk % _EBAG_KEYS == 0 else 1
        step = kk // parts
        dp = (d + 15) // 16 * 16
        vp = _aligned_rows(m, dp)[:, :d]
        part = np.empty((_BAG_ROWS, dp), np.float32)
        full = n - n % _BAG_ROWS
        for gg in range(g):
            vp[:, :] = v[gg]
            wg, ig, og = vals[gg], idx[gg], out[gg]
            for c0 in range(0, d, 16):
                c1 = min(d, c0 + 16)
                for i in range(0, full, _BAG_ROWS):
                    _bag_rows(wg, ig, i, 0, step, vp, c0, og, i)
                    for p in range(1, parts):
                        _bag_rows(wg, ig, i, p * step, (p + 1) * step, vp, c0, part, 0)
                        _add_parts(og, part, i, _BAG_ROWS, c0, c1)
                for i in range(full, n):
                    _bag_row(wg, ig, i, 0, step, vp, c0, og, i)
                    for p in range(1, parts):
                        _bag_row(wg, ig, i, p * step, (p + 1) * step, vp, c0, part, 0)
                        _add_parts(og, part, i, 1, c0, c1)


@_jit()
def _select(x, m, k, z, dens, sel, cand, code):
    """Positions of the k largest of x[:m] (0 < k < m) into sel[:k], in no particular order. ``z``, ``dens``: the
    standard normal quantile of 1 - k/m and the density there (first guesses); sel, cand: int32 scratch of length
    >= m + :data:`_SLACK`; code: uint8 scratch of length >= m. Returns the number of counting passes."""
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
    few = max(2, min(_CANDIDATES, m >> 6))
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
        if n_lo - n_hi <= few:
            break
        # aim beside k so that the next count can close the bracket
        if k - n_hi <= few // 2:
            target = n_hi + 0.75 * few
        elif n_lo - k <= few // 2:
            target = n_lo - 0.75 * few
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
    ns, nc = _compact(x, m, lo, hi, sel, cand, code)
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


@_jit()
def _select_positive(x, m, k, z, dens, sel, cand, code, y):
    """:func:`_select` for float32 rows of positive values (NaN counts as the largest, as in ``torch.topk``): on
    their bit patterns (as float64, scratch ``y``), which order them exactly as their values and are close to a
    scaled log2: the normal model of the first guesses fits heavy-tailed rows (focused weights, products of
    probabilities) there, in a few counting passes instead of some twenty on the values."""
    xi = x.view(np.int32)
    for j in range(m):
        y[j] = np.float64(xi[j])
    return _select(y, m, k, z, dens, sel, cand, code)


# ---- tile kernels --------------------------------------------------------------------------------------------------

@_jit()
def _topk_softmax_row(x, n, k, z, dens, sel, cand, code, e, vrow, irow):
    """One row of scores x[:n]: the positions of its k largest into irow, their softmax weights over the whole row
    (``exp(s - max) / sum(exp(s - max))``, not renormalised) into vrow; e: exp scratch. Returns the passes."""
    passes = _select(x, n, k, z, dens, sel, cand, code)
    total = _exp_shifted(x, n, _max16(x, n), e)  # (the row maximum is among the kept)
    for t in range(k):
        j = sel[t]
        vrow[t] = e[j] / total
        irow[t] = j
    return passes


@_jit()
def _topk_softmax(x, k, z, dens, vals, pos):
    rows, n = x.shape
    e = np.empty(n, np.float32)
    sel = np.empty(n + _SLACK, np.int32)
    cand = np.empty(n + _SLACK, np.int32)
    code = np.empty(n, np.uint8)
    passes = 0
    for i in range(rows):
        passes += _topk_softmax_row(x[i], n, k, z, dens, sel, cand, code, e, vals[i], pos[i])
    return passes


@_jit()
def _softmax_focus(x, kk, p, training, a):
    """a[:kk] = the focused weights of a sparse layer's row: softmax of the scores x[:kk] (bias included), then the
    Hadamard product with the inherited weights p, renormalised with PFA's epsilon (training or eval formula)."""
    mx = _max16(x, kk)
    total = _exp_shifted(x, kk, mx, a)
    if training:  # (a p + eps) / (sum a p + eps)
        for t in range(kk):
            a[t] = a[t] / total * p[t]
        den = _sum16(a, kk) + _EPS
        for t in range(kk):
            a[t] = (a[t] + _EPS) / den
    else:  # (a p + eps) / (sum (a p + eps) + eps)
        for t in range(kk):
            a[t] = a[t] / total * p[t] + _EPS
        den = _sum16(a, kk) + _EPS
        for t in range(kk):
            a[t] = a[t] / den


@_jit()
def _select_rows(x, k, z, dens, pos):
    rows, m = x.shape
    sel = np.empty(m + _SLACK, np.int32)
    cand = np.empty(m + _SLACK, np.int32)
    code = np.empty(m, np.uint8)
    passes = 0
    for i in range(rows):
        passes += _select(x[i], m, k, z, dens, sel, cand, code)
        prow = pos[i]
        for t in range(k):
            prow[t] = sel[t]
    return passes


# ---- whole layers: generated per head dim --------------------------------------------------------------------------

_ROWS = 2  # query rows per pass over the keys in the dense-row kernel (each key column loaded once for both)
# value channels per pass of a dense layer's aggregation where numba targets AVX-512 (rows x ways 16-lane running sums
# in registers; half as many with 16 ymm registers): 2.4x faster than a _dot16 per row and channel on an AMX Xeon
_DOT_WAYS = 4
# the dense-row kernel keeps 2 rows x d query values in registers: beyond this score head dim it spills and loses to
# BLAS products (PFT's head dim 40: 3x slower; PFT-light's 13 and its chains' 26 are below)
DENSE_ROWS_MAX_DIM = 32
_PAD = 16  # padding of the transposed keys' and values' rows (rows 4 KB apart would share their L1 cache sets)


def _tree(terms: List[str]) -> str:
    """A balanced sum (independent FMA chains instead of one chain of dependent ones)."""
    while len(terms) > 1:
        terms = [f'({terms[i]} + {terms[i + 1]})' if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


def _dot(a: str, row: str, d: int, stride: str = '') -> str:
    """a0 * row[0] + ... (balanced), or a0 * row[0, j] + ... with ``stride`` 'j' (a transposed block)."""
    return _tree([f'{a}{c} * {row}[{c}{", " + stride if stride else ""}]' for c in range(d)])


def _tuple(items: List[str]) -> str:
    """A tuple's source: ``(a, b)``, ``(a,)``."""
    return '(' + ', '.join(items) + (',)' if len(items) == 1 else ')')


def _query_rows(rows: int, d: int, ind: str, bias_rows: bool = True) -> List[str]:
    """Loads of ``rows`` query rows from row i on: a{r}_{c} (their values), b{r} (bias rows, unless not
    ``bias_rows``), s{r} (score rows)."""
    src = []
    for r in range(rows):
        src += [f'{ind}a{r}_{c} = q[w, hh, i + {r}, {c}]' for c in range(d)]
        src += ([f'{ind}b{r} = bh[i + {r}]'] if bias_rows else []) + [f'{ind}s{r} = s[{r}]']
    return src


def _chains(terms: List[str], ways: int) -> str:
    """``ways`` FMA chains over interleaved terms (t0 + t_w + t_2w ...), summed by a balanced tree: one operation per
    term (a :func:`_tree` of products needs a multiplication per pair besides its FMAs), still ``ways`` independent
    chains."""
    return _tree(['(' + ' + '.join(terms[i::ways]) + ')' for i in range(min(ways, len(terms)))])


# dense-row score products above this head dim (the chains of dense layers, PFT-light's 26) sum by FMA chains
# (:func:`_chains`), 1.5x fewer vector operations than the balanced tree; up to it the tree (no faster there)
_CHAIN_SCORES_FROM_DIM = 16
_SCORE_CHAINS = 4


def _key_pass(rows: int, d: int, ind: str, masked: bool = False, chains: int = 0) -> List[str]:
    """One vectorised pass over the transposed keys ktw (d, n): the scores of the :func:`_query_rows` with every
    key, bias (and ``times`` the shift-mask rows m{r}) added; the products summed by a balanced tree, or by
    ``chains`` FMA chains (:func:`_chains`)."""
    src = [f'{ind}for j in range(n):'] + [f'{ind}    k{c} = ktw[{c}, j]' for c in range(d)]
    for r in range(rows):
        base = f'(b{r}[j] + times * m{r}[j])' if masked else f'b{r}[j]'
        terms = [f'a{r}_{c} * k{c}' for c in range(d)]
        src.append(f'{ind}    s{r}[j] = {base} + ' + (_chains(terms, chains) if chains else _tree(terms)))
    return src


def _sparse_row_tail(row: str, ind: str) -> List[str]:
    """The rest of a sparse layer's row once its scores at the K' keys are in ``x``: softmax, focusing, top-k."""
    return [ind + line for line in (
        f'_softmax_focus(x, kk, pv[w, hh, {row}], training, a)',
        f'vrow = vals[w, hh, {row}]',
        'if do_topk:',
        '    passes += _select_positive(a, kk, topk, z, dens, sel, cand, code, y)',
        f'    irow = idxs[w, hh, {row}]',
        '    for t in range(topk):',
        '        e = sel[t]',
        '        vrow[t] = a[e]',
        '        irow[t] = prow[e]',
        'else:  # the same keys: the focused weights replace the inherited ones',
        '    for t in range(kk):',
        '        vrow[t] = a[t]')]


def layer_source(d: int, dv: int, rows: int = _ROWS) -> str:
    """Python source (numba) of the compiled PFT layer kernels for score head dim ``d`` (the concatenated dims of a
    chain of dense layers) and value head dim ``dv``, unrolled over the head dims with constant indices:

    * ``dense_rows``: dense and first top-k layers. The products q.k of ``rows`` query rows with every key,
      vectorised over the keys (keys transposed, (d, n) per window and head) with the bias (and shift mask) added
      in the same pass (head dims above :data:`_CHAIN_SCORES_FROM_DIM` summed by FMA chains), the rows in L1
      cache; then per row either softmax and the aggregation with every value (values transposed (dv, n): one
      16-lane dot product per head channel, :func:`_sum_intrinsic`), or the top-k selection and the softmax weights
      of the kept keys over the whole row, their aggregation (``agg``: :func:`_aggregate` over the values ``v`` into
      ``aout``) after each head's rows, while its kept weights and positions are in cache.
    * ``sparse_rows``: layers with sparse input (K' inherited keys per row): the products at the K' keys (gathered
      key rows: 16 per vectorised step, :func:`_scores_intrinsic`, for d up to :data:`GATHERED_SCORES_MAX_DIM`,
      over key rows padded to a multiple of 16 floats; scalar code above) or, where K' is a large share of the
      window, with every key (vectorised, ``rows`` query rows per pass over the keys, read at the keys); bias at the
      keys, softmax, focusing, and top-k when k < K'; the aggregation (``agg``) after each head's rows, as in
      ``dense_rows``.
    """
    r_ = range(rows)
    width = _KEY_LANES * key_chunks(d)  # of the gathered score products' key rows
    # the generated kernels call (and numba inlines) this module's functions: the digest of its source in theirs
    # names a new cached file whenever this module changes (numba's cache would keep the old machine code)
    src = [f'# generated by adasr.ops.pft_kernels.layer_source from module source {_module_digest()}',
           'import numpy as np', 'import numba', '',
           'from adasr.ops.pft_kernels import (_ORDERED, _SLACK, _aggregate, _aligned_rows, _dots16, _exp_shifted,',
           '                                  _max16, _scores16, _scores32, _scores48, _select, _select_positive,',
           '                                  _softmax_focus,',
           '                                  _topk_softmax_row)', '',
           'F32 = np.float32', '', '',
           '@numba.njit(nogil=True, cache=True, fastmath=_ORDERED)',
           'def dense_rows(q, kt, vt, bias, masks, kinds, times, w0, w1, k, z, dens, out, vals, idxs, v, aout, agg):',
           '    heads, n = q.shape[1], q.shape[2]',
           '    shared = bias.shape[0] == 1',
           f'    s = np.empty(({rows}, n), np.float32)',
           f'    e = np.empty(({rows}, n), np.float32)',
           f'    tot = np.empty({rows}, np.float32)',
           '    sel = np.empty(n + _SLACK, np.int32)',
           '    cand = np.empty(n + _SLACK, np.int32)',
           '    code = np.empty(n, np.uint8)',
           '    passes = 0',
           '    for w in range(w0, w1):',
           '        kind = kinds[w]',
           '        mk = masks[kind]  # (masks[0]: a placeholder, unread)',
           '        for hh in range(heads):',
           '            bh = bias[0 if shared else hh]',
           '            ktw = kt[w, hh]',
           '            vtw = vt[w, hh]',
           f'            for i in range(0, n, {rows}):']
    src += _query_rows(rows, d, ' ' * 16)
    for masked in (False, True):
        src.append('                if kind != 0:' if masked else '                if kind == 0:')
        if masked:
            src += [f'                    m{r} = mk[i + {r}]' for r in r_]
        src += _key_pass(rows, d, ' ' * 20, masked, _SCORE_CHAINS if d > _CHAIN_SCORES_FROM_DIM else 0)
    src += ['                if k == 0:  # dense: softmax and the aggregation with every value']
    src += [f'                    tot[{r}] = _exp_shifted(s{r}, n, _max16(s{r}, n), e[{r}])' for r in r_]
    src += [f'                    t{r} = tot[{r}]' for r in r_]
    ways = _DOT_WAYS if _avx512_target() else _DOT_WAYS // 2
    for c0 in range(0, dv, ways):  # the aggregation: every row by a few value channels in one pass (_dots16)
        cs = range(c0, min(c0 + ways, dv))
        src.append(f'                    {_tuple([f"o{r}_{c}" for r in r_ for c in cs])} = '
                   f'_dots16({_tuple([f"e[{r}]" for r in r_])}, {_tuple([f"vtw[{c}]" for c in cs])}, n)')
        src += [f'                    out[w, i + {r}, hh, {c}] = o{r}_{c} / t{r}' for r in r_ for c in cs]
    src += ['                    continue',
            f'                for r in range({rows}):  # first top-k: selection and the kept weights',
            '                    passes += _topk_softmax_row(s[r], n, k, z, dens, sel, cand, code, e[0],',
            '                                                vals[w, hh, i + r], idxs[w, hh, i + r])',
            '            if agg:  # the head\'s kept weights aggregated while they are in cache',
            '                _aggregate(vals[w, hh:hh + 1], idxs[w, hh:hh + 1], v[w, hh:hh + 1], aout[w, hh:hh + 1])',
            '    return passes', '', '',
            '@numba.njit(nogil=True, cache=True, fastmath=_ORDERED)',
            'def sparse_rows(q, kt, k, bias, rstart, boff, pv, pidx, w0, w1, topk, z, dens, training, full, vals,',
            '                idxs, v, aout, agg):',
            '    # the bias of query i and key j: bias[0 or head, rstart[i] + boff[j]] (pft_kernels._bias_layout)',
            '    heads, n = q.shape[1], q.shape[2]',
            '    kk = pidx.shape[3]',
            '    shared = bias.shape[0] == 1',
            '    do_topk = topk < kk',
            f'    s = np.empty(({rows}, n), np.float32)',
            f'    bs = np.empty(({rows}, n), np.float32)',
            '    x = np.empty(kk, np.float32)',
            '    a = np.empty(kk, np.float32)',
            '    sel = np.empty(kk + _SLACK, np.int32)',
            '    cand = np.empty(kk + _SLACK, np.int32)',
            '    code = np.empty(kk, np.uint8)',
            '    y = np.empty(kk, np.float64)',
            f'    q16 = np.zeros({width}, np.float32)',
            f'    kp = _aligned_rows(n, {width})  # the key rows zero-padded to a multiple of 16 floats',
            '    passes = 0',
            '    for w in range(w0, w1):',
            '        for hh in range(heads):',
            '            bh = bias[0 if shared else hh]',
            '            ktw = kt[w, hh]',
            '            kw = k[w, hh]',
            '            if full:  # products with every key and the bias rows: one vectorised pass for',
            f'                # {rows} rows (the keys read once for all), read at the inherited keys',
            f'                for i in range(0, n, {rows}):']
    src += _query_rows(rows, d, ' ' * 20, bias_rows=False)
    for r in r_:  # the bias rows of the pass, in key order
        src += [f'                    br = bh[rstart[i + {r}]:]',
                f'                    b{r} = bs[{r}]',
                '                    for j in range(n):',
                f'                        b{r}[j] = br[boff[j]]']
    src += _key_pass(rows, d, ' ' * 20)
    for r in r_:
        src += [f'                    prow = pidx[w, hh, i + {r}]',
                '                    for t in range(kk):',
                f'                        x[t] = s{r}[np.uint32(prow[t])]']
        src += _sparse_row_tail(f'i + {r}', '                    ')
    if d <= GATHERED_SCORES_MAX_DIM:
        src += ['            else:  # products at the inherited keys only: 16 gathered key rows (copied zero-padded',
                f'                # to {width} floats, in cache) per vectorised step',
                f'                kp[:, :{d}] = kw',
                '                for i in range(n):']
        src += [f'                    q16[{c}] = q[w, hh, i, {c}]' for c in range(d)]
        src += ['                    brow = bh[rstart[i]:]',
                '                    prow = pidx[w, hh, i]',
                f'                    for t0 in range(0, kk, {_KEY_LANES}):',
                f'                        _scores{width}(kp, q16, brow, boff, prow, t0, kk, x)']
    else:
        src += ['            else:  # products at the inherited keys only (gathered key rows)',
                '                for i in range(n):']
        src += [f'                    a{c} = q[w, hh, i, {c}]' for c in range(d)]
        src += ['                    brow = bh[rstart[i]:]',
                '                    prow = pidx[w, hh, i]',
                '                    for t in range(kk):',
                '                        j = np.uint32(prow[t])',
                f'                        x[t] = brow[boff[j]] + ({_tree([f"a{c} * kw[j, {c}]" for c in range(d)])})']
    src += _sparse_row_tail('i', '                    ')
    src += ['            if agg:  # the head\'s kept weights aggregated while they are in cache',
            '                _aggregate(vals[w, hh:hh + 1], idxs[w, hh:hh + 1], v[w, hh:hh + 1], aout[w, hh:hh + 1])',
            '    return passes']
    return '\n'.join(src) + '\n'


_DIGEST: Optional[str] = None


def _module_digest() -> str:
    """A digest of this module's source (12 hex digits), computed once."""
    global _DIGEST
    if _DIGEST is None:
        with open(__file__, 'rb') as f:
            _DIGEST = hashlib.sha1(f.read()).hexdigest()[:12]
    return _DIGEST


def _layer_kernels(d: int, dv: int):
    return codegen.load_module('pft_kernels', (d, dv, _ROWS), f'pft_layers_{d}_{dv}_{_ROWS}',
                               lambda: layer_source(d, dv))


class _Layer:
    """Operands of one layer for the compiled layer kernels (CPU float32, no autograd), copied once where needed:
    queries contiguous, keys transposed to (d, n) per window and head with padded rows (for the vectorised passes
    over the keys) or contiguous (for gathered key rows)."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, bias: Optional[torch.Tensor], dv: int):
        _check()
        nb, h, n, d = q.shape
        if k.shape != q.shape or bias is not None and (bias.dim() != 3 or bias.shape[0] not in (1, h)
                                                       or bias.shape[1:] != (n, n)):
            raise ValueError(f'PFT layer kernels: q {tuple(q.shape)}, k {tuple(k.shape)}, bias '
                             f'{None if bias is None else tuple(bias.shape)} do not fit (B, h, n, d), (B, h, n, d), '
                             '(h or 1, n, n)')
        self.q = q.detach().contiguous()
        self.bias = bias.detach().contiguous() if bias is not None else None
        self.shape = (nb, h, n, d, dv)
        self.kernels = _layer_kernels(d, dv)

    @staticmethod
    def _transposed(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[2]
        t = torch.empty(*x.shape[:2], x.shape[3], n + _PAD)
        t[..., :n].copy_(x.detach().transpose(-2, -1))
        return t


class DenseRows(_Layer):
    """A dense or first top-k layer of PFT on the compiled kernels (:func:`layer_source`, ``dense_rows``).

    Args:
        q, k: (B, h, n, d) scaled queries and keys (d: the concatenated head dims of a chain of dense layers).
        v: (B, h, n, dv) values.
        bias: (h or 1, n, n) the (summed) relative-position biases.
        masks: (1 + patterns, n, n) shift masks (``ShiftMask.masks()``: [0] all zeros, unread) or None.
        kinds: per window, the index into ``masks`` (0: no mask), or None.
        times: how many times the mask is added (the masked layers of the chain).
    """

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                 masks: Optional[torch.Tensor] = None, kinds: Optional[Sequence[int]] = None, times: int = 0):
        super().__init__(q, k, bias, v.shape[-1])
        nb, h, n, _ = q.shape
        if v.shape[:3] != q.shape[:3]:
            raise ValueError(f'DenseRows: values {tuple(v.shape)} do not fit queries {tuple(q.shape)}')
        if n % _ROWS:
            raise ValueError(f'DenseRows: a window of {n} tokens is not a multiple of {_ROWS} rows')
        self.kt = self._transposed(k)
        self.vt = self._transposed(v)
        self.masks = masks.detach().contiguous() if masks is not None else torch.zeros(1, 1, 1)
        self.kinds = np.asarray(list(kinds) if kinds is not None else [0] * nb, dtype=np.int32)
        if self.kinds.shape != (nb,) or not 0 <= self.kinds.min(initial=0) <= self.kinds.max(initial=0) < len(
                self.masks) or (masks is not None and tuple(masks.shape[1:]) != (n, n)):
            raise ValueError(f'DenseRows: {len(self.kinds)} window kinds for {nb} windows and masks '
                             f'{tuple(self.masks.shape)}')
        self.times = F32(times)

    def output(self) -> torch.Tensor:
        """A (B, n, h, dv) buffer for :meth:`run` (``.permute(0, 2, 1, 3)`` is the layer's (B, h, n, dv) output)."""
        nb, h, n, _, dv = self.shape
        return torch.empty(nb, n, h, dv)

    def run(self, w0: int, w1: int, out: torch.Tensor) -> None:
        """Dense softmax attention of windows ``w0:w1`` into ``out`` (:meth:`output`)."""
        self.kernels.dense_rows(_np(self.q), _np(self.kt), _np(self.vt), _np(self.bias), _np(self.masks),
                                self.kinds, self.times, w0, w1, 0, F32(0.0), F32(1.0), _np(out), _np(_NO_VALUES),
                                _NO_INDEX, *_no_aggregation())

    def select(self, w0: int, w1: int, topk: int, values: torch.Tensor, index: torch.Tensor,
               v: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> int:
        """The first top-k layer's selection for windows ``w0:w1``, 0 < topk < n: ``values`` / ``index`` (B, h, n,
        topk) get the kept softmax weights ``exp(s - max) / sum(exp(s - max))`` over the whole row (not
        renormalised) and their key positions (in no particular order); with values ``v`` (B, h, n, dv) also their
        aggregation into ``out`` (B, h, n, dv, unit stride along dv: :func:`aggregate`'s numbers), head by head.
        Returns the counting passes."""
        n = self.shape[2]
        if not 0 < topk < n:
            raise ValueError(f'DenseRows.select: k={topk} must be in [1, {n - 1}]')
        z, dens = normal_guess(topk, n)
        return self.kernels.dense_rows(_np(self.q), _np(self.kt), _np(self.vt), _np(self.bias), _np(self.masks),
                                       self.kinds, self.times, w0, w1, topk, F32(z), F32(dens),
                                       _np(_NO_VALUES), _np(values), _np(index), *_aggregation(v, out, values))


# a sparse layer's products with every key (one vectorised pass over the transposed keys) cost about as much as
# those at n / 4 gathered key rows by scalar code (head dim 13, 1024-token windows; docs/pft.md), and as those at
# n / 2 gathered key rows by the vectorised steps (_scores16; for PFT's head dim 40, whose full pass spills its
# query values, a 256-key layer's rows took 0.67x the time with the steps, 0.80x with AVX2 code: docs/pft.md,
# *Tenth round*)
_FULL_PRODUCTS_FROM = 0.25
_FULL_PRODUCTS_FROM_VECTOR = 0.5


class SparseRows(_Layer):
    """The rows of a layer with sparse input (K' inherited keys per row) on the compiled kernels
    (:func:`layer_source`, ``sparse_rows``): products, bias at the keys, softmax, focusing, top-k. The aggregation
    is not part of it (:func:`aggregate`, over the layer's kept keys).

    Args:
        q, k, bias: as :class:`DenseRows` (no mask: a sparse layer's keys all lie in the query's region).
        prev_values, prev_index: (B, h, n, K') the inherited weights and key positions.
        full: products with every key, read at the inherited keys (None: when K' >= n / 2 for head dims up to
            :data:`GATHERED_SCORES_MAX_DIM`, else when K' >= n / 4).
        table: instead of ``bias`` (None then), a relative-position bias table (h or 1, (2 ws - 1)^2) of a square
            window of ws x ws = n tokens (row-major) with Swin's index: the bias of query i and key j is
            ``table[:, (dy + ws - 1) (2 ws - 1) + dx + ws - 1]`` for (dy, dx) = position of i - position of j, the
            same numbers as ``bias`` built from it. The kernel reads it (16 KB a head for 32 x 32 windows, in L1
            cache) instead of the (n, n) bias rows (4 MB a head), of which a row's K' gathered keys touch up to K'
            cache lines, fetched from memory (docs/pft.md, *Eighth round*).
    """

    def __init__(self, q: torch.Tensor, k: torch.Tensor, bias: Optional[torch.Tensor], prev_values: torch.Tensor,
                 prev_index: torch.Tensor, full: Optional[bool] = None, table: Optional[torch.Tensor] = None):
        nb, h, n, _ = q.shape
        if (bias is None) == (table is None):
            raise ValueError('SparseRows: give either the bias or its table')
        super().__init__(q, k, bias, q.shape[-1])
        self.bias, self.rstart, self.boff = _bias_layout(self.bias, table, n, h)
        kk = prev_index.shape[-1]
        if tuple(prev_index.shape) != (nb, h, n, kk) or prev_values.shape != prev_index.shape:
            raise ValueError(f'SparseRows: inherited weights {tuple(prev_values.shape)} / positions '
                             f'{tuple(prev_index.shape)} are not (B, h, n, K) = ({nb}, {h}, {n}, K)')
        self.prev_values = prev_values.detach().contiguous()
        self.prev_index = prev_index.detach().contiguous()
        vector = q.shape[-1] <= GATHERED_SCORES_MAX_DIM
        self.full = kk >= (_FULL_PRODUCTS_FROM_VECTOR if vector else _FULL_PRODUCTS_FROM) * n if full is None \
            else bool(full)
        # the kernel reads one of the two (``full``); the other is the same array, so that every view it takes
        # lies inside an array
        self.k = self._transposed(k) if self.full else k.detach().contiguous()

    def run(self, w0: int, w1: int, topk: int, training: bool, values: torch.Tensor, index: torch.Tensor,
            v: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> int:
        """Windows ``w0:w1``: bias at the keys, softmax, focusing by the inherited weights (training or eval
        formula), then top-k when ``topk < K'``: ``values`` / ``index`` (B, h, n, k) get the kept focused weights (not
        renormalised) and their key positions; else ``values`` (B, h, n, K', may be ``prev_values``) gets the focused
        weights and ``index`` must be ``prev_index``. With values ``v`` (B, h, n, dv) also the aggregation of
        ``values`` at ``index`` into ``out`` (B, h, n, dv, unit stride along dv: :func:`aggregate`'s numbers), head by
        head. Returns the selection's counting passes."""
        kk = self.prev_index.shape[-1]
        z, dens = normal_guess(min(topk, kk - 1), kk) if kk > 1 else (0.0, 1.0)
        return self.kernels.sparse_rows(_np(self.q), _np(self.k), _np(self.k), _np(self.bias), self.rstart,
                                        self.boff, _np(self.prev_values), _np(self.prev_index), w0, w1, topk, F32(z),
                                        F32(dens), bool(training), self.full, _np(values), _np(index),
                                        *_aggregation(v, out, values))


def _window_side(table: torch.Tensor, n: int, h: int) -> int:
    """ws of the ws x ws windows (n tokens) whose relative-position table (h or 1, (2 ws - 1)^2) ``table`` is."""
    if table.dim() != 2 or table.shape[0] not in (1, h):
        raise ValueError(f'SparseRows: bias table {tuple(table.shape)} is not (h or 1, (2 ws - 1)^2)')
    ws = math.isqrt(n)
    if ws * ws != n or table.shape[1] != (2 * ws - 1) ** 2:
        raise ValueError(f'SparseRows: a bias table of {table.shape[1]} entries does not fit windows of {n} tokens '
                         '((2 ws - 1)^2 entries for ws x ws tokens)')
    return ws


def _bias_layout(bias: Optional[torch.Tensor], table: Optional[torch.Tensor], n: int,
                 h: int) -> Tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(rows, rstart, boff) of the sparse-row kernel: the bias of query i and key j is
    ``rows[0 or head, rstart[i] + boff[j]]``. From an (h or 1, n, n) bias: its rows flattened, i n + j. From a
    table T (h or 1, E): the table reversed, R[e] = T[E - 1 - e] (E entries), so that the index ``base(i) - off(j)``
    (base(i) = (y_i + ws - 1)(2 ws - 1) + x_i + ws - 1, off(j) = y_j (2 ws - 1) + x_j) becomes the non-negative
    ``E - 1 - base(i) + off(j)``."""
    if table is None:
        return bias.reshape(bias.shape[0], n * n), np.arange(n, dtype=np.int64) * n, np.arange(n, dtype=np.int32)
    ws = _window_side(table, n, h)
    entries = table.shape[1]
    y, x = np.divmod(np.arange(n), ws)
    base = (y + ws - 1) * (2 * ws - 1) + x + ws - 1
    return (table.detach().float().flip(1).contiguous(), (entries - 1 - base).astype(np.int64),
            (y * (2 * ws - 1) + x).astype(np.int32))


_NO_VALUES = torch.zeros(1, 1, 1, 1)
_NO_INDEX = np.zeros((1, 1, 1, 1), np.int16)


def _no_aggregation() -> Tuple[np.ndarray, np.ndarray, bool]:
    return _np(_NO_VALUES), _np(_NO_VALUES), False


def _aggregation(v: Optional[torch.Tensor], out: Optional[torch.Tensor],
                 values: torch.Tensor) -> Tuple[np.ndarray, np.ndarray, bool]:
    """The layer kernels' aggregation arguments (values, output, flag): ``v`` (B, h, n', dv) float32 and ``out`` (B,
    h, n, dv) with unit stride along dv, checked against the kept ``values`` (B, h, n, K), or none."""
    if v is None:
        return _no_aggregation()
    nb, h, n = values.shape[:3]
    if out is None or v.dim() != 4 or tuple(v.shape[:2]) != (nb, h) or v.dtype != torch.float32 or \
            tuple(out.shape) != (nb, h, n, v.shape[3]) or out.dtype != torch.float32 or out.stride(-1) != 1 or \
            v.shape[2] == 0:
        raise ValueError(f'layer aggregation: values {tuple(v.shape)} / output '
                         f'{None if out is None else tuple(out.shape)} do not fit kept weights {tuple(values.shape)}')
    return _np(v.detach()), _np(out), True


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


def aggregate(values: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The aggregation of sparse attention, ``out[g, i] = sum_t values[g, i, t] * v[g, index[g, i, t]]``, for float32
    CPU tensors values (G, n, K), v (G, m, d), index (G, n, K) (any integer type), out (G, n, d) (may be a view with
    unit stride along d; None: a new tensor). The numbers of :func:`adasr.ops.embedding_bag_av` (FBGEMM's
    ``embedding_bag``) bit for bit, in the same order, but vectorised across the head dim with 64-byte aligned value
    rows and four query rows per pass (1.7-2.5x faster at head dim 13 on one window's operands: docs/pft.md). An
    index outside ``[0, m)`` reads row ``m - 1`` (no bounds error, and no read outside the values). No autograd."""
    _check()
    if (values.dim() != 3 or v.dim() != 3 or v.shape[0] != values.shape[0] or index.shape != values.shape
            or index.dtype.is_floating_point or index.dtype == torch.bool):
        raise ValueError(f'aggregate: values {tuple(values.shape)}, v {tuple(v.shape)} and integer index '
                         f'{tuple(index.shape)} must be (G, n, K), (G, m, d), (G, n, K)')
    if values.dtype != torch.float32 or v.dtype != torch.float32 or any(
            t.device.type != 'cpu' for t in (values, v, index)):
        raise ValueError(f'aggregate: float32 CPU tensors only, got {values.dtype} / {v.dtype} on {values.device} / '
                         f'{v.device} / {index.device}')
    g, n, kk = values.shape
    d = v.shape[-1]
    if out is None:
        out = torch.empty(g, n, d)
    elif tuple(out.shape) != (g, n, d) or out.dtype != torch.float32 or out.stride(-1) != 1:
        raise ValueError(f'aggregate: out {tuple(out.shape)} {out.dtype} must be float32 (G, n, d) = ({g}, {n}, {d}) '
                         'with unit stride along d')
    if v.shape[1] == 0 or kk == 0:
        return out.zero_()
    _aggregate(_np(values.detach().contiguous()), _np(index.detach().contiguous()), _np(v.detach()), _np(out))
    return out


def topk_positions(a: torch.Tensor, k: int) -> torch.Tensor:
    """Positions (int64) of the k largest entries of each row of a float32 CPU tensor (..., m), 0 < k < m, in no
    particular order (the same sets as ``torch.topk``; ties at the k-th value broken arbitrarily)."""
    x, m = _rows(a, k, 'topk_positions')
    pos = torch.empty(x.shape[0], k, dtype=torch.int64)
    z, dens = normal_guess(k, m)
    _select_rows(_np(x), k, F32(z), F32(dens), _np(pos))
    return pos.view(*a.shape[:-1], k)


__all__ = ['available', 'unavailable_reason', 'enabled', 'normal_guess', 'DenseRows', 'SparseRows', 'layer_source',
           'DENSE_ROWS_MAX_DIM', 'topk_softmax', 'topk_positions', 'aggregate']
