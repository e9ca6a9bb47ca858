"""Pictures of where AdaFormer halts (the paper's Fig. 6) and a per-layer sparsity summary, for any image size.

An adaptive arch (AdaFormer) keeps the halting record of its last forward
(:func:`adasr.archs.interface.halting_record`: confidence and keep masks at the padded size of that call).
:class:`HaltingCollector` is given to :func:`adasr.inference.tile.tiled_forward` as ``on_tile``: after every tile
it copies the tile's maps, core region only, into whole-image LR canvases, so tiled and whole-image runs give maps
of the same layout. Layer ``l`` below is the *mask index* of ``HaltingInfo``: the confidence is measured on the
output of block ``l``, and its keep masks decide what block ``l + 1`` skips (the authors' indexing; the last layer's
masks are made but used by no block).
"""
import io
import json
import os.path as osp
from typing import Dict, List

import numpy as np
import torch
from torch import nn

from adasr.archs.halting import halting_sparsity
from adasr.archs.interface import halting_record, is_adaptive, unwrap
from adasr.inference.tile import Tile
from adasr.utils.files import atomic_write_bytes
from adasr.utils.image_io import encode


class HaltingCollector:
    """Collects the network's halting record tile by tile into whole-image maps of the unpadded LR image.

    Usage: ``tiled_forward(fn, x, ..., on_tile=HaltingCollector(net, h, w))``, then :meth:`maps` (batch item 0, as
    numpy arrays for the pictures) or :meth:`to_info` (a whole-image ``HaltingInfo`` for the whole batch, which
    :class:`~adasr.models.adasr_model.AdaSRModel` puts back on the network after a tiled test).
    """

    KEYS = ('logits', 'confidence', 'global_keep', 'local_keep')

    def __init__(self, net: nn.Module, h: int, w: int):
        if not is_adaptive(net):
            raise ValueError(f'{type(unwrap(net)).__name__} keeps no halting record (it is not adaptive)')
        self.net = unwrap(net)
        self.h, self.w = h, w
        self.canvas: Dict[str, torch.Tensor] = {}
        self.last_info = None
        self.splits: List[int] = []

    def __call__(self, tile: Tile, _output: torch.Tensor) -> None:
        info = halting_record(self.net)
        if info is None:
            raise RuntimeError('the network recorded no halting information for this tile')
        (cy, cx), (ry, rx) = tile.core_in_window, tile.core
        for key in self.KEYS:
            maps = getattr(info, key)  # per layer (B, 1, hp, wp)
            if key not in self.canvas:
                self.canvas[key] = torch.zeros(len(maps), maps[0].shape[0], self.h, self.w)
            self.canvas[key][:, :, ry, rx] = torch.stack([m[:, 0, cy, cx] for m in maps]).float().cpu()  # one copy
        self.last_info = info
        if info.eval_global_split is not None:
            self.splits.append(int(info.eval_global_split))

    def maps(self, item: int = 0) -> Dict[str, np.ndarray]:
        """(layers, H, W) float arrays of batch item ``item``: confidence, global_keep, local_keep."""
        if not self.canvas:
            raise RuntimeError('no tile was collected')
        return {k: self.canvas[k][:, item].numpy() for k in ('confidence', 'global_keep', 'local_keep')}

    def to_info(self):
        """The record of the whole tiled forward, in the network's own ``HaltingInfo`` type: maps (B, 1, H, W) of
        the unpadded image (``padded_size == input_size``), the largest eval global split used by a tile, and the
        sparsity recomputed on the stitched masks."""
        import dataclasses

        if self.last_info is None:
            raise RuntimeError('no tile was collected')
        lists = {k: [m[:, None] for m in self.canvas[k]] for k in self.KEYS}
        return dataclasses.replace(
            self.last_info, **lists, input_size=(self.h, self.w), padded_size=(self.h, self.w),
            eval_global_split=max(self.splits) if self.splits else None,
            sparsity=halting_sparsity(lists['global_keep'], lists['local_keep'], (self.h, self.w)))

    def summary(self, item: int = 0) -> Dict[str, object]:
        """Per layer: mean confidence and halted shares over the unpadded image (global tokens, local pixels in
        halted windows), plus the eval global splits the tiles used."""
        m = self.maps(item)
        return {
            'layers': int(m['confidence'].shape[0]),
            'mean_confidence': [float(c.mean()) for c in m['confidence']],
            'global_halted': [float(1 - g.mean()) for g in m['global_keep']],
            'local_halted': [float(1 - g.mean()) for g in m['local_keep']],
            'confidence_scale_max': confidence_scale(m['confidence']),
            'eval_global_splits': sorted(set(self.splits)),
            'indexing': 'layer l: confidence on the output of block l; its masks decide what block l+1 skips',
        }


def _luma(rgb: np.ndarray) -> np.ndarray:
    if rgb.ndim == 2:
        return rgb
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def overlay_confidence(rgb: np.ndarray, conf: np.ndarray, alpha: float = 0.6, cmap: str = 'inferno') -> np.ndarray:
    """Colour-mapped confidence (0..1) over the dimmed grayscale image. Inputs float [0, 1]; returns uint8 RGB."""
    import matplotlib

    colors = matplotlib.colormaps[cmap](np.clip(conf, 0, 1))[..., :3]
    base = np.repeat(_luma(rgb)[..., None], 3, axis=2)
    return np.clip(np.rint((alpha * colors + (1 - alpha) * base) * 255), 0, 255).astype(np.uint8)


def overlay_mask(rgb: np.ndarray, keep: np.ndarray, color=(1.0, 0.15, 0.1), alpha: float = 0.55) -> np.ndarray:
    """Tint the halted pixels (``keep == 0``) of the image with ``color``; kept pixels are shown as they are."""
    base = np.repeat(rgb[..., None], 3, axis=2) if rgb.ndim == 2 else rgb
    halted = (keep < 0.5)[..., None]
    tinted = (1 - alpha) * base + alpha * np.asarray(color, dtype=np.float32)
    out = np.where(halted, tinted, base)
    return np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)


def sparsity_figure(summary: Dict[str, object], title: str = '') -> bytes:
    """PNG bytes of a bar chart: halted share per layer (global tokens, local windows) and mean confidence."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = summary['layers']
    x = np.arange(n)
    fig = Figure(figsize=(6.4, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(x - 0.2, summary['global_halted'], 0.4, label='global: tokens halted', color='#d62728')
    ax.bar(x + 0.2, summary['local_halted'], 0.4, label='local: pixels in halted windows', color='#1f77b4')
    ax.plot(x, summary['mean_confidence'], 'k.--', label='mean confidence')
    ax.set_xticks(x, [str(i) for i in x])
    ax.set_xlabel('layer l (mask made after block l, used by block l+1)')
    ax.set_ylabel('share')
    ax.set_ylim(0, 1.05)
    ax.legend(loc='upper center', bbox_to_anchor=(0.5, -0.2), ncol=3, fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format='png')
    return buf.getvalue()


def confidence_scale(conf: np.ndarray) -> float:
    """The top of the colour scale of the confidence pictures: the largest confidence over all layers (so that
    layers compare, and a weakly confident network still shows where it is most confident)."""
    return max(float(np.max(conf)), 1e-6)


def overview_figure(rgb: np.ndarray, maps: Dict[str, np.ndarray], title: str = '', max_side: int = 160) -> bytes:
    """PNG bytes of one figure in the layout of the paper's Fig. 6: a row per layer, columns confidence / global
    halting / local halting overlays (images shrunk by pixel striding so that the long side is <= ``max_side``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    vmax = confidence_scale(maps['confidence'])
    step = max(1, int(np.ceil(max(rgb.shape[:2]) / max_side)))
    rgb = rgb[::step, ::step]
    maps = {k: v[:, ::step, ::step] for k, v in maps.items()}
    n = maps['confidence'].shape[0]
    h, w = rgb.shape[:2]
    cell = 1.6
    fig = Figure(figsize=(3 * cell * w / max(h, w) + 0.6, n * cell * h / max(h, w) + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    columns = ((f'confidence (0 to {vmax:.2f})', lambda i: overlay_confidence(rgb, maps['confidence'][i] / vmax)),
               ('global halted (red)', lambda i: overlay_mask(rgb, maps['global_keep'][i])),
               ('local halted (blue)', lambda i: overlay_mask(rgb, maps['local_keep'][i], color=(0.1, 0.35, 1.0))))
    for layer in range(n):
        for j, (name, make) in enumerate(columns):
            ax = fig.add_subplot(n, 3, layer * 3 + j + 1)
            ax.imshow(make(layer), interpolation='nearest')
            ax.set_xticks([])
            ax.set_yticks([])
            if layer == 0:
                ax.set_title(name, fontsize=8)
            if j == 0:
                ax.set_ylabel(f'layer {layer}', fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(pad=0.3, rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight() if title else 1))
    buf = io.BytesIO()
    fig.savefig(buf, format='png')
    return buf.getvalue()


def save_halting_pictures(folder: str, rgb: np.ndarray, collector: HaltingCollector, title: str = '',
                          zoom: int = 1) -> List[str]:
    """Write ``layer{l}_confidence.png``, ``layer{l}_global.png``, ``layer{l}_local.png`` (overlays on the LR input),
    ``sparsity.png`` (halted share per layer), ``overview.png`` (all layers in one figure, as the paper's Fig. 6) and
    ``halting.json`` (the numbers) into ``folder`` (atomically). ``zoom`` enlarges the overlays by pixel
    repetition. Returns the paths written.
    """
    maps = collector.maps()
    summary = collector.summary()
    if zoom > 1:
        rgb = rgb.repeat(zoom, 0).repeat(zoom, 1)
        maps = {k: v.repeat(zoom, 1).repeat(zoom, 2) for k, v in maps.items()}
    written = []

    def put(name: str, data: bytes) -> None:
        path = osp.join(folder, name)
        atomic_write_bytes(path, data)
        written.append(path)

    vmax = confidence_scale(maps['confidence'])
    for layer in range(summary['layers']):
        pictures = {
            'confidence': overlay_confidence(rgb, maps['confidence'][layer] / vmax),
            'global': overlay_mask(rgb, maps['global_keep'][layer]),
            'local': overlay_mask(rgb, maps['local_keep'][layer], color=(0.1, 0.35, 1.0)),
        }
        for kind, pic in pictures.items():
            put(f'layer{layer}_{kind}.png', encode(np.ascontiguousarray(pic[..., ::-1]), 'png'))
    put('sparsity.png', sparsity_figure(summary, title))
    put('overview.png', overview_figure(rgb if zoom == 1 else rgb[::zoom, ::zoom], collector.maps(), title))
    put('halting.json', (json.dumps(summary, indent=2) + '\n').encode())
    return written
