"""PFA (progressive focused attention, PFT's window attention) without autograd: the inference engine.

:func:`attend` computes one layer's attention for all windows. Dense layers (k >= n) are fused dense attention
(:func:`dense_attention`), and their state is the recipe of their scores (:class:`DenseScores`), never the map. The
first top-k layer of a parity and the sparse layers run tile by tile (a tile is a few windows x a few hundred query
rows, about :func:`adasr.ops.config.tile_bytes` of float32 work): scores, softmax, focusing, top-k and aggregation of a
tile finish before the next tile starts, written straight into preallocated outputs and into the state for the next
layer of the same shift parity (:class:`SparseMap`); on the CPU the tiles run on
:func:`adasr.ops.scheduling.parallel_for` worker threads. Only public :mod:`adasr.ops` functions are called.

This module also holds what the engine shares with the autograd formulation in :mod:`adasr.archs.pft_arch`: the
arithmetic of one chunk (:func:`dense_scores`, :func:`softmax`, :func:`focus`), the shift mask and the states.
"""
import math
import weakref
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from adasr.archs.layers import relative_position_index, window_partition
from adasr.ops import parallel_for, pft_kernels, sparse_av, sparse_qk, topk_positions
from adasr.ops.config import tile_bytes

EPS = 1e-20  # PFA's epsilon in the Hadamard renormalisation (float32 in the authors' code)
MASK_VALUE = -100.0  # shift-mask value for keys of another region (not -inf, as upstream)

Tile = Tuple[slice, slice]  # (windows, query rows)


# ---- relative-position bias ----------------------------------------------------------------------------------------

class RelativeBias:
    """A layer's relative-position bias as its table (h or 1, E) and the window's index (n, n): the (h or 1, n, n)
    bias is built on first use (dense layers, the PyTorch path); the compiled sparse layers read the table itself
    when the index is Swin's (:func:`adasr.archs.layers.relative_position_index`, what PFT's checkpoints hold), the
    same numbers from 16 KB a head instead of the 4 MB of (n, n) bias rows (``pft_kernels.SparseRows(table=)``)."""

    def __init__(self, table: torch.Tensor, index: torch.Tensor):
        self.table, self.index = table, index
        self._dense: Optional[torch.Tensor] = None

    def dense(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = self.table[:, self.index].contiguous()
        return self._dense

    def swin_table(self) -> Optional[torch.Tensor]:
        """The table, when the index is Swin's for a square window (checked once per index tensor and version)."""
        index = self.index
        seen = _SWIN_INDEX.get(id(index))
        if seen is None or seen[0]() is not index or seen[1] != index._version:
            n = index.shape[-1]
            ws = math.isqrt(n)
            ok = (index.shape == (n, n) and ws * ws == n and self.table.shape[1] == (2 * ws - 1) ** 2
                  and torch.equal(index.cpu(), relative_position_index(ws)))
            if len(_SWIN_INDEX) > 64:
                _SWIN_INDEX.clear()
            seen = _SWIN_INDEX[id(index)] = (weakref.ref(index), index._version, ok)
        return self.table if seen[2] else None


# id of an index tensor -> (a weak reference to it, its version, whether it is Swin's index)
_SWIN_INDEX: Dict[int, Tuple[weakref.ref, int, bool]] = {}


def _dense_bias(bias) -> torch.Tensor:
    return bias.dense() if isinstance(bias, RelativeBias) else bias


# ---- shift mask ----------------------------------------------------------------------------------------------------

def shift_labels(hp: int, wp: int, ws: int, device) -> torch.Tensor:
    """Region label of every token of every window for the shifted layers: (nW, ws*ws), int."""
    shift = ws // 2
    img = torch.zeros(1, hp, wp, 1, device=device)
    cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    label = 0
    for hs in cuts:
        for wsl in cuts:
            img[:, hs, wsl, :] = label
            label += 1
    return window_partition(img, ws).squeeze(-1)


class ShiftMask:
    """Region labels (nW, n) of the shifted layers (indexable like the label tensor) and their -100 masks.

    Only windows on the last window row / column hold more than one region; their masks take at most three distinct
    patterns, built once per forward and added to the scores of those windows only (elsewhere the mask is zero).
    """

    def __init__(self, labels: torch.Tensor):
        self.labels = labels
        self.n_win = labels.shape[0]
        mixed = (labels.amin(1) != labels.amax(1)).tolist()
        patterns: List[torch.Tensor] = []
        self.kind: List[int] = []  # per window: 0 = one region, else 1 + its pattern
        for w, is_mixed in enumerate(mixed):
            if not is_mixed:
                self.kind.append(0)
                continue
            for p, lab in enumerate(patterns):
                if torch.equal(lab, labels[w]):
                    self.kind.append(p + 1)
                    break
            else:
                patterns.append(labels[w])
                self.kind.append(len(patterns))
        self._patterns = patterns
        self._masks: Optional[torch.Tensor] = None

    @property
    def shape(self):
        return self.labels.shape

    def __getitem__(self, item):
        return self.labels[item]

    def masks(self) -> torch.Tensor:
        """(1 + patterns, n, n) float32: 0 where query and key share a region, -100 elsewhere; [0] is all zeros."""
        if self._masks is None:
            n = self.labels.shape[1]
            lab = torch.stack(self._patterns) if self._patterns else self.labels[:0]
            masks = (lab[:, :, None] != lab[:, None, :]).float().mul_(MASK_VALUE)
            self._masks = torch.cat([torch.zeros(1, n, n, device=masks.device), masks])
        return self._masks

    def add_to(self, s: torch.Tensor, ws: slice, rs: slice, times: int = 1) -> torch.Tensor:
        """s (cw, h, r, n) scores of windows ws, query rows rs: add the mask of each window (``times`` times)."""
        kinds = [self.kind[w % self.n_win] for w in range(ws.start, ws.stop)]
        if not any(kinds):
            return s
        masks = self.masks()
        if len(kinds) == 1:
            return s.add_(masks[kinds[0], rs], alpha=times)
        return s.add_(masks[torch.tensor(kinds, device=masks.device)][:, None, rs], alpha=times)


# ---- the arithmetic of one tile ------------------------------------------------------------------------------------

def dense_scores(q, k, bias, mask: Optional[ShiftMask], ws: slice, rs: slice,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q k^T + bias (+ shift mask) in float32 for windows ``ws`` and query rows ``rs``: (cw, h, r, n), written into
    ``out`` when given."""
    if out is not None and q.dtype == torch.float32 and k.dtype == torch.float32 and out.is_contiguous():
        s = torch.matmul(q[ws, :, rs], k[ws].transpose(-2, -1), out=out)
    else:
        s = torch.matmul(q[ws, :, rs], k[ws].transpose(-2, -1))
        if s.dtype != torch.float32:
            s = s.float()
        if out is not None:
            s = out.copy_(s)
    s = s.add_(bias[:, rs])
    if mask is not None:
        s = mask.add_to(s, ws, rs)
    return s


def softmax(s: torch.Tensor, inplace: bool) -> torch.Tensor:
    """Softmax over the last dim; ``inplace`` writes it over the scores (same kernel, bitwise equal)."""
    if inplace:
        return torch.ops.aten._softmax.out(s, -1, False, out=s)
    return torch.softmax(s, -1)


def focus(a: torch.Tensor, prev: torch.Tensor, training: bool, inplace: bool = False) -> torch.Tensor:
    """Progressive focusing: multiply by the previous map of the same parity and renormalise (spec section 2.4)."""
    if inplace:
        a = a.mul_(prev)
        if training:
            den = a.sum(-1, keepdim=True).add_(EPS)
            return a.add_(EPS).div_(den)
        a = a.add_(EPS)
        return a.div_(a.sum(-1, keepdim=True).add_(EPS))
    prod = a * prev
    if training:
        return (prod + EPS) / (prod.sum(-1, keepdim=True) + EPS)
    prod = prod + EPS
    return prod / (prod.sum(-1, keepdim=True) + EPS)


# ---- layer states (what a layer passes to the next layer of its shift parity) --------------------------------------

class DenseMap:
    """A dense (B_, h, n, n) attention map (probabilities), as the autograd formulation keeps it."""

    kind = 'dense'

    def __init__(self, maps: torch.Tensor):
        self.maps = maps

    def probs(self, ws: slice, rs: slice) -> torch.Tensor:
        return self.maps[ws, :, rs]


class DenseScores:
    """The map of a dense layer kept as the scores that make it: ``softmax(q k^T + bias + masks * shift mask)``.

    Focusing a dense map by the dense map before it multiplies their softmaxes, which is the softmax of the sum of
    their scores (up to PFA's EPS, far below float32 resolution of the kept weights), so a chain of dense layers is one
    score product with the layers' q and k concatenated along the head dim and their biases (and masks) added.
    q and k cost 2 * n * D numbers per window and head, the map n * n.
    """

    kind = 'dense'

    def __init__(self, q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, mask: Optional[ShiftMask], masks: int):
        self.q, self.k, self.bias, self.mask, self.masks = q, k, bias, mask, masks

    def then(self, q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, mask: Optional[ShiftMask]) -> 'DenseScores':
        """The scores of the next dense layer of this parity focused by this map."""
        return DenseScores(torch.cat([q, self.q.to(q.dtype)], -1), torch.cat([k, self.k.to(k.dtype)], -1),
                           bias + self.bias, mask, self.masks + (mask is not None))

    def logits(self, ws: slice, rs: slice) -> torch.Tensor:
        """Scores of windows ws, query rows rs, float32: (cw, h, r, n)."""
        s = torch.matmul(self.q[ws, :, rs], self.k[ws].transpose(-2, -1))
        s = s.float() if s.dtype != torch.float32 else s
        s = s.add_(self.bias[:, rs])
        if self.mask is not None:
            s = self.mask.add_to(s, ws, rs, self.masks)
        return s

    def probs(self, ws: slice, rs: slice) -> torch.Tensor:
        return softmax(self.logits(ws, rs), inplace=True)


def _start(prev, q, k, bias, mask) -> DenseScores:
    if prev is None:
        return DenseScores(q, k, bias, mask, int(mask is not None))
    if not isinstance(prev, DenseScores):
        raise TypeError(f'a {type(prev).__name__} state (from a forward with autograd) cannot feed a layer run '
                        'without autograd')
    return prev.then(q, k, bias, mask)


class SparseMap:
    """Top-k weights (B_, h, n, K) and their in-window key indices (int16 / int32)."""

    kind = 'sparse'

    def __init__(self, values: torch.Tensor, index: torch.Tensor):
        self.values, self.index = values, index

    @property
    def keys(self) -> int:
        return self.index.shape[-1]


def index_dtype(n: int) -> torch.dtype:
    """Smallest integer dtype of the in-window key indices of a state (int16 for windows up to 32767 tokens)."""
    return torch.int16 if n <= torch.iinfo(torch.int16).max else torch.int32


# ---- the engine ----------------------------------------------------------------------------------------------------

def dense_attention(scores: DenseScores, v: torch.Tensor) -> torch.Tensor:
    """``softmax(scores) @ v`` for every window, in float32, the n x n map never in memory: on the compiled
    dense-row kernel (CPU float32, score head dims up to ``pft_kernels.DENSE_ROWS_MAX_DIM``), else by fused attention
    (``scaled_dot_product_attention``, windows grouped by their shift-mask pattern). -> (B_, h, n, d)."""
    if _dense_rows_ok(scores, v):
        return _dense_rows(scores, v)
    q, k = scores.q.float(), scores.k.float()
    v32 = v.float()
    d = v.shape[-1]
    if q.shape[-1] != d:  # the fused kernels want one head dim: zero columns of v add nothing
        v32 = torch.cat([v32, v32.new_zeros(*v32.shape[:-1], q.shape[-1] - d)], -1)
    nb = q.shape[0]
    mask = scores.mask
    kinds = [mask.kind[w % mask.n_win] for w in range(nb)] if mask is not None else [0] * nb
    out = torch.empty(nb, *v32.shape[1:], device=v.device)
    with torch.autocast(v.device.type, enabled=False):
        for kind in sorted(set(kinds)):
            bias = scores.bias if not kind else scores.bias + scores.masks * mask.masks()[kind]
            if len(set(kinds)) == 1:
                sel = slice(None)
            else:
                sel = torch.tensor([w for w, x in enumerate(kinds) if x == kind], device=v.device)
            qs, ks, vs = q[sel], k[sel], v32[sel]
            out[sel] = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=bias.expand(qs.shape[0], -1, -1, -1),
                                                      scale=1.0)
    return out[..., :d]


def tile_plan(nb: int, h: int, n: int, keys: int, sparse_in: bool) -> Tuple[int, int]:
    """(windows, query rows) per tile, about :func:`adasr.ops.config.tile_bytes` of float32 each: whole windows for
    layers with sparse input (rows of K' entries), else rows of n entries."""
    target = tile_bytes()
    per_row = 4 * h * (keys if sparse_in else n)
    if sparse_in or per_row * n <= target:
        return max(1, min(nb, target // (per_row * n))), n
    return 1, max(1, target // per_row)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias, mask: Optional[ShiftMask], prev,
           topk: int, training: bool):
    """One PFA layer without autograd.

    Args:
        q: (B_, h, n, d) queries, already scaled.
        k, v: (B_, h, n, d) keys and values.
        bias: (h or 1, n, n) float32 relative-position bias, or a :class:`RelativeBias` (float32 table).
        mask: the shift mask of a shifted layer, else None.
        prev: state of the previous layer of the same parity (:class:`DenseScores`, :class:`SparseMap`) or None.
        topk: this layer's k (``>= n``: dense).
        training: focusing uses the training formula.

    Returns:
        (out (B_, h, n, d), state for the next layer of this parity).

    Three kinds of layer: dense (k >= n; fused attention over the scores of this and the earlier dense layers of its
    parity), first top-k (dense scores, the k largest kept with their softmax weights), sparse (scores at the K'
    inherited keys, softmax, focusing, top-k when k < K', aggregation over the kept keys).
    """
    nb, h, n, d = q.shape
    if mask is not None and any(mask.kind):
        mask.masks()  # build once, before the tiles run in parallel
    if prev is None or prev.kind == 'dense':
        scores = _start(prev, q, k, _dense_bias(bias), mask)
        if topk >= n:
            return dense_attention(scores, v), scores
        return _first_topk(scores, v, topk)
    return _sparse(q, k, v, bias, prev, topk, training)


def _output(v: torch.Tensor) -> torch.Tensor:
    """(B_, h, n, d) view of a (B_, n, h, d) buffer: the layer merges the heads without a copy."""
    nb, h, n, d = v.shape
    return torch.empty(nb, n, h, d, dtype=v.dtype, device=v.device).permute(0, 2, 1, 3)


def _run(fn, tiles, device) -> None:
    if device.type == 'cpu':
        parallel_for(fn, tiles)
    else:
        for tile in tiles:
            fn(tile)


def _tiles(nb: int, n: int, wstep: int, rstep: int) -> List[Tile]:
    return [(slice(w0, min(nb, w0 + wstep)), slice(r0, min(n, r0 + rstep)))
            for w0 in range(0, nb, wstep) for r0 in range(0, n, rstep)]


def kept_softmax(s: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``softmax(s, -1)`` at the positions ``pos`` of the largest scores of each row (the row maximum among them),
    computed as softmax is (maximum subtracted, exp, sum, divide); overwrites ``s``."""
    kept = torch.gather(s, -1, pos)
    top = kept.amax(-1, keepdim=True)
    total = s.sub_(top).exp_().sum(-1, keepdim=True)
    return kept.sub_(top).exp_().div_(total)


def _dense_rows_ok(scores: DenseScores, v: torch.Tensor) -> bool:
    """The compiled dense-row kernel serves these operands (CPU float32, score head dim up to its limit)."""
    return pft_kernels.enabled(scores.q, scores.k, v) and scores.q.shape[-1] <= pft_kernels.DENSE_ROWS_MAX_DIM


def _dense_rows(scores: DenseScores, v: torch.Tensor, topk: int = 0, vals: Optional[torch.Tensor] = None,
                idxs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A dense (``topk`` 0) or first top-k layer on the compiled kernels (``pft_kernels.DenseRows``: the scores of
    two query rows at a time in L1 cache, never a map in memory; the top-k layer's aggregation over its kept keys in
    the same call after each head's rows, while they are in cache: ``pft_kernels.aggregate``'s numbers, those of
    ``embedding_bag``), one window per tile. -> (B_, h, n, d) (a view of a (B_, n, h, d) buffer)."""
    nb = v.shape[0]
    mask = scores.mask
    kinds = [mask.kind[w % mask.n_win] for w in range(nb)] if mask is not None else []
    masked = any(kinds)
    rows = pft_kernels.DenseRows(scores.q, scores.k, v, scores.bias, mask.masks() if masked else None,
                                 kinds if masked else None, scores.masks)
    if not topk:
        out = rows.output()
        _run(lambda w: rows.run(w, w + 1, out), range(nb), v.device)
        return out.permute(0, 2, 1, 3)
    out = _output(v)

    def run_window(w: int) -> None:  # selection and aggregation head by head in one call
        rows.select(w, w + 1, topk, vals, idxs, v=v, out=out)

    _run(run_window, range(nb), v.device)
    return out


def _first_topk(scores: DenseScores, v: torch.Tensor, topk: int):
    """The first sparse layer of a parity: the k largest entries of each row of the (focused) dense map, by the
    scores (softmax is monotonic), and their softmax weights exp(score - logsumexp) (not renormalised)."""
    nb, h, n, d = v.shape
    vals = torch.empty(nb, h, n, topk, device=v.device)
    idxs = torch.empty(nb, h, n, topk, dtype=index_dtype(n), device=v.device)
    if _dense_rows_ok(scores, v):
        return _dense_rows(scores, v, topk, vals, idxs), SparseMap(vals, idxs)
    kernels = pft_kernels.enabled(scores.q, scores.k, v)
    out = _output(v)
    wstep, rstep = tile_plan(nb, h, n, n, False)

    def run_tile(tile: Tile) -> None:
        ws, rs = tile
        s = scores.logits(ws, rs)
        if kernels:  # (large head dims) BLAS scores; selection and softmax of each row in one compiled pass
            kept, pos = pft_kernels.topk_softmax(s, topk)
        else:
            pos = topk_positions(s, topk)
            kept = kept_softmax(s, pos)
        vals[ws, :, rs] = kept
        idxs[ws, :, rs] = pos
        out[ws, :, rs] = sparse_av(kept, v[ws], pos)

    _run(run_tile, _tiles(nb, n, wstep, rstep), v.device)
    return out, SparseMap(vals, idxs)


def _sparse(q, k, v, bias, prev: SparseMap, topk: int, training: bool):
    """A layer with sparse input: scores at the K' inherited keys, softmax, focusing, top-k, aggregation."""
    nb, h, n, d = q.shape
    keys = prev.keys
    do_topk = topk < keys  # k == K' would only permute the kept set
    if do_topk:
        vals = torch.empty(nb, h, n, topk, device=q.device)
        idxs = torch.empty(nb, h, n, topk, dtype=prev.index.dtype, device=q.device)
    else:  # same keys: update the inherited values in place, share the index
        vals, idxs = prev.values, prev.index
    out = _output(v)
    if pft_kernels.enabled(q, k, v, prev.values):  # one compiled pass per row (products, softmax, focusing, top-k),
        # each head's aggregation after its rows (pft_kernels.aggregate's numbers, embedding_bag's), a window a tile
        table = bias.swin_table() if isinstance(bias, RelativeBias) else None  # else the bias rows
        rows = pft_kernels.SparseRows(q, k, _dense_bias(bias) if table is None else None, prev.values, prev.index,
                                      table=table)

        def run_window(w: int) -> None:  # focusing, top-k and aggregation head by head in one call
            rows.run(w, w + 1, topk, training, vals, idxs, v=v, out=out)

        _run(run_window, range(nb), q.device)
        return out, SparseMap(vals, idxs)
    bias = _dense_bias(bias)
    wstep, rstep = tile_plan(nb, h, n, keys, True)

    def run_tile(tile: Tile) -> None:
        ws, rs = tile
        idx = prev.index[ws, :, rs]
        a = softmax(sparse_qk(q[ws, :, rs], k[ws], idx, bias=bias[:, rs]).float(), inplace=True)
        if do_topk:
            a = focus(a, prev.values[ws, :, rs], training, inplace=True)
            pos = topk_positions(a, topk)
            a = torch.gather(a, -1, pos, out=vals[ws, :, rs])
            idx = torch.gather(idx, -1, pos, out=idxs[ws, :, rs])
        else:  # focus straight into the kept values (prod = prev * a, as a * prev)
            a = focus(vals[ws, :, rs], a, training, inplace=True)
        out[ws, :, rs] = sparse_av(a, v[ws], idx)

    _run(run_tile, _tiles(nb, n, wstep, rstep), q.device)
    return out, SparseMap(vals, idxs)
