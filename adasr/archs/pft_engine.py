"""PFA (progressive focused attention, PFT's window attention) without autograd: the inference engine.

:func:`attend` computes one layer's attention for all windows, tile by tile (a tile is a few windows x a few hundred
query rows, about :func:`adasr.ops.config.tile_bytes` of float32 work): scores, softmax, focusing, top-k and
aggregation of a tile finish before the next tile starts, in place, written straight into preallocated outputs and
into the state for the next layer of the same shift parity. On the CPU the tiles run on
:func:`adasr.ops.scheduling.parallel_for` worker threads. Only public :mod:`adasr.ops` functions are called.

This module also holds what the engine shares with the autograd formulation in :mod:`adasr.archs.pft_arch`: the
arithmetic of one tile (:func:`dense_scores`, :func:`softmax`, :func:`focus`), the shift mask and the layer states
(:class:`DenseMap`, :class:`SparseMap`).
"""
from typing import List, Optional, Tuple

import torch

from adasr.archs.layers import window_partition
from adasr.ops import parallel_for, sparse_av, sparse_qk, topk_positions
from adasr.ops.config import memory_budget_bytes, tile_bytes

EPS = 1e-20  # PFA's epsilon in the Hadamard renormalisation (float32 in the authors' code)
MASK_VALUE = -100.0  # shift-mask value for keys of another region (not -inf, as upstream)

Tile = Tuple[slice, slice]  # (windows, query rows)


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

    def add_to(self, s: torch.Tensor, ws: slice, rs: slice) -> torch.Tensor:
        """s (cw, h, r, n) scores of windows ws, query rows rs: add the mask of each window."""
        kinds = [self.kind[w % self.n_win] for w in range(ws.start, ws.stop)]
        if not any(kinds):
            return s
        masks = self.masks()
        if len(kinds) == 1:
            return s.add_(masks[kinds[0], rs])
        return s.add_(masks[torch.tensor(kinds, device=masks.device)][:, None, rs])


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

class TiledMaps:
    """A (B_, h, n, X) tensor stored as (B_, row tiles, h, rows, X), so that the tile of windows ``ws`` and query rows
    ``rs`` (a tile of :func:`tile_plan`) is one contiguous tensor, written and read in place."""

    def __init__(self, nb: int, h: int, n: int, x: int, rows: int, dtype, device):
        self.rows, self.shape = rows, (nb, h, n, x)
        self.data = torch.empty(nb, -(-n // rows), h, rows, x, dtype=dtype, device=device)

    def tile(self, ws: slice, rs: slice) -> torch.Tensor:
        if rs.start % self.rows:
            raise RuntimeError(f'row tile {rs} does not start on a multiple of {self.rows}')  # internal error
        t = self.data[ws, rs.start // self.rows]
        return t if rs.stop - rs.start == self.rows else t[:, :, :rs.stop - rs.start]


def tile_of(t, ws: slice, rs: slice) -> torch.Tensor:
    """Windows ws, query rows rs of a (B_, h, n, X) tensor or :class:`TiledMaps`: (cw, h, r, X)."""
    return t.tile(ws, rs) if isinstance(t, TiledMaps) else t[ws, :, rs]


class DenseMap:
    """A dense (B_, h, n, n) attention map (tensor or :class:`TiledMaps`) kept for the next layer of its parity."""

    kind = 'dense'

    def __init__(self, maps):
        self.maps = maps

    def probs(self, ws: slice, rs: slice) -> torch.Tensor:
        return tile_of(self.maps, ws, rs)


class RecomputedDenseMap:
    """A dense map recomputed per tile from the layer's q, k and bias (and the map before it) instead of being
    stored: q and k cost 2*n*d per window and head, the map n*n. Inference only."""

    kind = 'dense'

    def __init__(self, q, k, bias, mask: Optional[ShiftMask], prev, training: bool):
        self.q, self.k, self.bias, self.mask, self.prev, self.training = q, k, bias, mask, prev, training

    def probs(self, ws: slice, rs: slice) -> torch.Tensor:
        a = softmax(dense_scores(self.q, self.k, self.bias, self.mask, ws, rs), inplace=True)
        if self.prev is not None:
            a = focus(a, self.prev.probs(ws, rs), self.training, inplace=True)
        return a


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

def tile_plan(nb: int, h: int, n: int, keys: int, sparse_in: bool) -> Tuple[int, int]:
    """(windows, query rows) per tile, about :func:`adasr.ops.config.tile_bytes` of float32 each: whole windows for
    layers with sparse input (rows of K' entries), else rows of n entries in row tiles that depend on (nb, h, n)
    only, so that a dense map is kept, or recomputed, on exactly the tiles it was first computed on."""
    target = tile_bytes()
    per_row = 4 * h * (keys if sparse_in else n)
    if sparse_in or per_row * n <= target:
        return max(1, min(nb, target // (per_row * n))), n
    return 1, max(1, target // per_row)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, mask: Optional[ShiftMask], prev,
           topk: int, training: bool):
    """One PFA layer without autograd.

    Args:
        q: (B_, h, n, d) queries, already scaled.
        k, v: (B_, h, n, d) keys and values.
        bias: (h or 1, n, n) float32 relative-position bias.
        mask: the shift mask of a shifted layer, else None.
        prev: state of the previous layer of the same parity (:class:`DenseMap`, :class:`RecomputedDenseMap`,
            :class:`SparseMap`) or None.
        topk: this layer's k (``>= n``: dense).
        training: focusing uses the training formula.

    Returns:
        (out (B_, h, n, d) view of a (B_, n, h, d) buffer, state for the next layer of this parity).
    """
    nb, h, n, d = q.shape
    sparse_in = prev is not None and prev.kind == 'sparse'
    keys = prev.keys if sparse_in else n
    do_topk = topk < n and topk != keys  # k == K' would only permute the kept set
    keep_dense = topk >= n  # (validation: a sparse parity never returns to dense)
    store = keep_dense and nb * h * n * n * 4 <= memory_budget_bytes()
    wstep, rstep = tile_plan(nb, h, n, keys, sparse_in)
    tiles = [(slice(w0, min(nb, w0 + wstep)), slice(r0, min(n, r0 + rstep)))
             for w0 in range(0, nb, wstep) for r0 in range(0, n, rstep)]

    out_buf = torch.empty(nb, n, h, d, dtype=v.dtype, device=v.device)
    out = out_buf.permute(0, 2, 1, 3)  # (nb, h, n, d) view; the layer merges heads without a copy
    maps = TiledMaps(nb, h, n, n, rstep, torch.float32, q.device) if store else None
    vals = idxs = None
    if not keep_dense:
        if sparse_in and not do_topk:  # same keys: update the inherited values in place, share the index
            vals, idxs = prev.values, prev.index
        else:
            kout = topk if do_topk else keys
            vals = torch.empty(nb, h, n, kout, device=q.device)
            idxs = torch.empty(nb, h, n, kout, dtype=index_dtype(n), device=q.device)
    if mask is not None and any(mask.kind):
        mask.masks()  # build once, before the tiles run in parallel

    def tile_probs(ws: slice, rs: slice):
        """Attention weights of one tile after focusing and top-k, and their key indices (None: dense)."""
        if sparse_in:
            idx = tile_of(prev.index, ws, rs)
            a = softmax(sparse_qk(q[ws, :, rs], k[ws], idx, bias=bias[:, rs]).float(), inplace=True)
            if do_topk:
                a = focus(a, tile_of(prev.values, ws, rs), training, inplace=True)
            else:  # focus straight into the kept values (prod = prev * a, as a * prev)
                a = focus(tile_of(vals, ws, rs), a, training, inplace=True)
        else:
            idx = None
            a = softmax(dense_scores(q, k, bias, mask, ws, rs, out=maps.tile(ws, rs) if store else None), True)
            if prev is not None:
                a = focus(a, prev.probs(ws, rs), training, inplace=True)
        if do_topk:
            pos = topk_positions(a, topk)
            kept = vals[ws, :, rs]  # gather the kept values and indices straight into the state
            a = torch.gather(a, -1, pos, out=kept) if kept.is_contiguous() else kept.copy_(a.gather(-1, pos))
            idx = pos if idx is None else torch.gather(idx, -1, pos)  # in the stored (int16) dtype
            idxs[ws, :, rs] = idx
        return a, idx

    def run_tile(tile: Tile) -> None:
        ws, rs = tile
        a, idx = tile_probs(ws, rs)
        out[ws, :, rs] = torch.matmul(a.to(v.dtype), v[ws]) if idx is None else sparse_av(a, v[ws], idx)

    if q.device.type == 'cpu':
        parallel_for(run_tile, tiles)
    else:
        for tile in tiles:
            run_tile(tile)

    if keep_dense:
        state = DenseMap(maps) if store else RecomputedDenseMap(q, k, bias, mask, prev, training)
    else:
        state = SparseMap(vals, idxs)
    return out, state
