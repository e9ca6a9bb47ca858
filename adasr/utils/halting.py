"""Pictures of where AdaFormer halts (the paper's Fig. 6) and a per-layer sparsity summary, for any image size.

AdaFormer keeps the halting record of its last forward in ``net.last_halting`` (confidence and keep masks at the
padded size of that call). :class:`HaltingCollector` is given to :func:`adasr.utils.tile.tiled_forward` as
``on_tile``: after every tile it copies the tile's maps, core region only, into whole-image LR canvases, so tiled
and whole-image runs give maps of the same layout. Layer ``l`` below is the *mask index* of ``HaltingInfo``: the
confidence is measured on the output of block ``l``, and its keep masks decide what block ``l + 1`` skips (the
authors' indexing; the last layer's masks are made but used by no block).
"""
import io
import json
import os.path as osp
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

from adasr.utils.image_io import atomic_write_bytes, encode
from adasr.utils.tile import Tile


def has_halting(net: nn.Module) -> bool:
    bare = net.module if hasattr(net, 'module') else net
    return hasattr(bare, 'last_halting')


class HaltingCollector:
    """Collects ``net.last_halting`` tile by tile into (layers, H, W) maps of the unpadded LR image (batch item 0).

    Usage: ``tiled_forward(fn, x, ..., on_tile=HaltingCollector(net, h, w))``, then :meth:`maps`.
    """

    def __init__(self, net: nn.Module, h: int, w: int):
        if not has_halting(net):
            raise ValueError(f'{type(net).__name__} keeps no halting record (only AdaFormer does)')
        self.net = net.module if hasattr(net, 'module') else net
        self.h, self.w = h, w
        self.confidence: Optional[torch.Tensor] = None
        self.global_keep: Optional[torch.Tensor] = None
        self.local_keep: Optional[torch.Tensor] = None
        self.splits: List[int] = []

    def __call__(self, tile: Tile, _output: torch.Tensor) -> None:
        info = self.net.last_halting
        if info is None:
            raise RuntimeError('the network recorded no halting information for this tile')
        if self.confidence is None:
            n = len(info.confidence)
            self.confidence = torch.zeros(n, self.h, self.w)
            self.global_keep = torch.zeros(n, self.h, self.w)
            self.local_keep = torch.zeros(n, self.h, self.w)
        (cy, cx), (ry, rx) = tile.core_in_window, tile.core
        for dst, src in ((self.confidence, info.confidence), (self.global_keep, info.global_keep),
                         (self.local_keep, info.local_keep)):
            dst[:, ry, rx] = torch.stack([m[0, 0, cy, cx].float().cpu() for m in src])
        if info.eval_global_split is not None:
            self.splits.append(int(info.eval_global_split))

    def maps(self) -> Dict[str, np.ndarray]:
        if self.confidence is None:
            raise RuntimeError('no tile was collected')
        return {'confidence': self.confidence.numpy(), 'global_keep': self.global_keep.numpy(),
                'local_keep': self.local_keep.numpy()}

    def summary(self) -> Dict[str, object]:
        """Per layer: mean confidence and halted shares over the unpadded image (global tokens, local pixels in
        halted windows), plus the eval global splits the tiles used."""
        m = self.maps()
        return {
            'layers': int(m['confidence'].shape[0]),
            'mean_confidence': [float(c.mean()) for c in m['confidence']],
            'global_halted': [float(1 - g.mean()) for g in m['global_keep']],
            'local_halted': [float(1 - g.mean()) for g in m['local_keep']],
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
    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(x - 0.2, summary['global_halted'], 0.4, label='global: tokens halted', color='#d62728')
    ax.bar(x + 0.2, summary['local_halted'], 0.4, label='local: pixels in halted windows', color='#1f77b4')
    ax.plot(x, summary['mean_confidence'], 'k.--', label='mean confidence')
    ax.set_xticks(x, [str(i) for i in x])
    ax.set_xlabel('layer l (mask made after block l, used by block l+1)')
    ax.set_ylabel('share')
    ax.set_ylim(0, 1.05)
    ax.legend(loc='upper left', fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format='png')
    return buf.getvalue()


def save_halting_pictures(folder: str, rgb: np.ndarray, collector: HaltingCollector, title: str = '',
                          zoom: int = 1) -> List[str]:
    """Write ``layer{l}_confidence.png``, ``layer{l}_global.png``, ``layer{l}_local.png`` (overlays on the LR input),
    ``sparsity.png`` and ``halting.json`` into ``folder`` (atomically). ``zoom`` enlarges the overlays by pixel
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

    for layer in range(summary['layers']):
        pictures = {
            'confidence': overlay_confidence(rgb, maps['confidence'][layer]),
            'global': overlay_mask(rgb, maps['global_keep'][layer]),
            'local': overlay_mask(rgb, maps['local_keep'][layer], color=(0.1, 0.35, 1.0)),
        }
        for kind, pic in pictures.items():
            put(f'layer{layer}_{kind}.png', encode(np.ascontiguousarray(pic[..., ::-1]), 'png'))
    put('sparsity.png', sparsity_figure(summary, title))
    put('halting.json', (json.dumps(summary, indent=2) + '\n').encode())
    return written
