"""The 3x3 convolution engines side by side (``scripts/benchmark_conv.py``): oneDNN's direct convolution (NCHW,
channels_last, oneDNN's blocked layout) against the Winograd variants of :mod:`adasr.ops.winograd`, on AdaFormer's
EDSR convolutions (64 -> 64 channels) with the activations of a real photo.

* :func:`photo_activations`: a demo photo resized to the LR size, through the seeded AdaFormer's ``sub_mean`` and
  ``head``: the input of the first encoder ResBlock, and that block's first conv (weight, bias).
* :func:`speed_table`: every contender called in turns (``repeats`` rounds, median wall and process CPU time
  each; CPU time is the steadier on a shared machine), the speed-ups over direct channels_last in the same run,
  and the max abs / mean abs error against a float64 reference.
* :func:`chain_table`: the encoder's whole ResBlock chain (16 convs) by the network's own forward (oneDNN) and
  channels-last by each method.
* :func:`sr_difference`: AdaFormer's SR of a photo with the encoder and/or decoder ResBlock convs run by another
  method, against the unchanged network (and both against a float64 run of the same network).
"""
import contextlib
import copy
import glob
import os
import os.path as osp
import platform
import statistics
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from adasr.ops import winograd

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEMO_HR = osp.join(ROOT, 'datasets', 'demo', 'val', 'HR')


def demo_photos() -> List[str]:
    return sorted(glob.glob(osp.join(DEMO_HR, '*.png')))


def _read(path: str) -> torch.Tensor:
    from benchmarks.harness import read_rgb
    return read_rgb(path)


def lr_photo(path: str, h: int, w: int) -> torch.Tensor:
    """(1, 3, h, w) in [0, 1]: the photo resized (bicubic, antialiased) to h x w."""
    img = _read(path)
    return F.interpolate(img, size=(h, w), mode='bicubic', antialias=True, align_corners=False).clamp_(0, 1)


def photo_activations(h: int, w: int, photo: Optional[str] = None, seed: int = 0
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x (1, 64, h, w), weight (64, 64, 3, 3), bias (64,))``: the first encoder conv of the seeded AdaFormer and
    its input (head features of a demo photo resized to h x w)."""
    from benchmarks.adaformer_speed import seeded_adaformer

    net = seeded_adaformer(seed)
    img = lr_photo(photo or demo_photos()[0], h, w)
    with torch.no_grad():
        x = net.head(net.sub_mean(img * net.img_range))
    conv = net.shollow_feature_extraction[0].body[0]
    return x.contiguous(), conv.weight.detach().clone(), conv.bias.detach().clone()


def machine_line() -> str:
    """ISA, threads and load average (every figure of this benchmark is read with them)."""
    load = os.getloadavg() if hasattr(os, 'getloadavg') else (float('nan'),) * 3
    return (f'{platform.processor() or platform.machine()}, torch {torch.__version__}, ISA '
            f'{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} thread(s), numba '
            f'{"yes" if winograd.numba_available() else "no"}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}')


def in_turns(fns: Dict[str, Callable[[], Any]], repeats: int) -> Tuple[Dict[str, List[float]], Dict[str, List[float]]]:
    """``repeats`` rounds in which every contender runs once, in order: wall and process CPU seconds per label."""
    times: Dict[str, List[float]] = {k: [] for k in fns}
    cpu: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return times, cpu


def contenders(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, variants: Sequence[str],
               torch_engine: bool = False) -> Dict[str, Callable[[], torch.Tensor]]:
    """label -> a call returning the conv of ``x`` (NCHW float32)."""
    xc = x.contiguous(memory_format=torch.channels_last)
    fns: Dict[str, Callable[[], torch.Tensor]] = {
        'direct NCHW': lambda: F.conv2d(x, weight, bias, 1, 1),
        'direct channels_last': lambda: F.conv2d(xc, weight, bias, 1, 1),
    }
    if torch.backends.mkldnn.is_available():
        xm = x.to_mkldnn()
        fns['direct oneDNN blocked'] = lambda: torch.mkldnn_convolution(xm, weight, bias, (1, 1), (1, 1), (1, 1), 1)
    for v in variants:
        conv = winograd.WinogradConv3x3(weight, bias, v)
        fns[f'winograd {v} channels_last'] = lambda conv=conv: conv(xc)
    if variants:
        conv = winograd.WinogradConv3x3(weight, bias, variants[0])
        fns[f'winograd {variants[0]} NCHW'] = lambda conv=conv: conv(x)
        if torch_engine:
            def torch_path(conv=conv):
                winograd.set_engine('torch')
                try:
                    return conv(xc)
                finally:
                    winograd.set_engine('auto')
            fns[f'winograd {variants[0]} channels_last (PyTorch transforms)'] = torch_path
    return fns


def speed_table(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, variants: Sequence[str],
                repeats: int = 7, torch_engine: bool = False) -> List[Dict]:
    """Rows ``{label, ms, speedup, max_err, mean_err, max_ref}``: median of ``repeats`` rounds in which every
    contender runs once (in turns); errors against ``F.conv2d`` in float64 on the same input."""
    fns = contenders(x, weight, bias, variants, torch_engine)
    ref = F.conv2d(x.double(), weight.double(), bias.double(), 1, 1)
    errors: Dict[str, Tuple[float, float]] = {}
    with torch.no_grad():
        for k, fn in fns.items():  # warm-up (compiles the transforms) and the error
            y = fn()
            y = y.to_dense() if y.is_mkldnn else y
            e = (y.double() - ref).abs()
            errors[k] = (e.max().item(), e.mean().item())
        times, cpu = in_turns(fns, repeats)
    base = statistics.median(times['direct channels_last'])
    base_cpu = statistics.median(cpu['direct channels_last'])
    return [{'label': k, 'ms': statistics.median(v) * 1e3, 'speedup': base / statistics.median(v),
             'cpu_ms': statistics.median(cpu[k]) * 1e3, 'cpu_speedup': base_cpu / statistics.median(cpu[k]),
             'max_err': errors[k][0], 'mean_err': errors[k][1], 'max_ref': ref.abs().max().item()}
            for k, v in times.items()]


def table_markdown(rows: List[Dict]) -> str:
    direct = next(r for r in rows if r['label'] == 'direct channels_last')
    lines = ['| method | wall ms (median) | speed-up (wall) | CPU ms (median) | speed-up (CPU) | max abs error | '
             'mean abs error | max error / direct channels_last |', '|---|---:|---:|---:|---:|---:|---:|---:|']
    for r in rows:
        lines.append(f"| {r['label']} | {r['ms']:.1f} | {r['speedup']:.2f}x | {r['cpu_ms']:.1f} | "
                     f"{r['cpu_speedup']:.2f}x | {r['max_err']:.2e} | "
                     f"{r['mean_err']:.2e} | {r['max_err'] / direct['max_err']:.1f}x |")
    return '\n'.join(lines)


# ------------------------------------------------------------------------------------------- AdaFormer end to end


@contextlib.contextmanager
def resblock_convs(net, method: str, parts: Sequence[str] = ('encoder', 'decoder')) -> Iterator[None]:
    """Run the ResBlock chains ``parts`` of an AdaFormer (``'encoder'``: ``shollow_feature_extraction``,
    ``'decoder'``: ``deep_feature_extraction``) by :func:`adasr.ops.winograd.conv3x3` ``method`` (their
    ``conv3x3`` attribute, restored on exit). The tail follows ``net.conv3x3``, i.e. the encoder's setting."""
    chains = {'encoder': net.shollow_feature_extraction, 'decoder': net.deep_feature_extraction}
    saved = {part: chains[part].conv3x3 for part in parts}
    try:
        for part in parts:
            chains[part].conv3x3 = method
        yield
    finally:
        for part, value in saved.items():
            chains[part].conv3x3 = value


def resblock_chain(chain, x: torch.Tensor, method: str) -> torch.Tensor:
    """An AdaFormer ResBlock chain channels-last from end to end (one conversion in, one out) with its convs by
    :func:`adasr.ops.winograd.conv3x3` ``method`` (``ResBlocks.forward_channels_last``)."""
    with torch.no_grad():
        return chain.forward_channels_last(x, method)


def chain_table(x: torch.Tensor, variants: Sequence[str], repeats: int = 5, seed: int = 0) -> List[Dict]:
    """The seeded AdaFormer's encoder ResBlock chain (8 blocks, 16 convs) on ``x`` (NCHW): the network's own forward
    (oneDNN, blocked layout), direct channels_last and the Winograd variants channels-last, called in turns; median
    wall / CPU ms, speed-up over the network's forward, max abs error against the float64 chain."""
    from benchmarks.adaformer_speed import seeded_adaformer

    chain = seeded_adaformer(seed).shollow_feature_extraction
    fns: Dict[str, Callable[[], torch.Tensor]] = {'network (oneDNN blocked)': lambda: chain(x),
                                                  'direct channels_last': lambda: resblock_chain(chain, x, 'direct')}
    for v in variants:
        fns[f'winograd {v} channels_last'] = lambda v=v: resblock_chain(chain, x, v)
    with torch.no_grad():
        ref = copy.deepcopy(chain).double()(x.double())
        errors = {k: (fn().double() - ref).abs().max().item() for k, fn in fns.items()}  # also the warm-up
        times, cpu = in_turns(fns, repeats)
    base = statistics.median(times['network (oneDNN blocked)'])
    return [{'label': k, 'ms': statistics.median(v) * 1e3, 'speedup': base / statistics.median(v),
             'cpu_ms': statistics.median(cpu[k]) * 1e3, 'max_err': errors[k], 'max_ref': ref.abs().max().item()}
            for k, v in times.items()]


def sr_difference(method: str, photo: Optional[str] = None, lr_size: Optional[Tuple[int, int]] = None,
                  seed: int = 0, parts_list: Sequence[Sequence[str]] = (('decoder',), ('encoder', 'decoder'))
                  ) -> List[Dict]:
    """AdaFormer x4 (seeded weights) on a demo photo downscaled x4 (or resized to ``lr_size``): for each set of
    parts, the SR with those ResBlock convs by ``method`` against the unchanged float32 network (max abs difference,
    in the 0..1 range, and the same relative to the largest SR value), with the float64 network's SR as the
    reference of both, and the number of halting decisions that differ."""
    from benchmarks.adaformer_speed import seeded_adaformer

    path = photo or demo_photos()[0]
    img = _read(path)
    h, w = lr_size or (img.shape[-2] // 4, img.shape[-1] // 4)
    lr = lr_photo(path, h, w)
    net = seeded_adaformer(seed)
    rows = []
    with torch.no_grad():
        sr = net(lr)
        keep = _keeps(net)
        net64 = seeded_adaformer(seed).double()
        ref = net64(lr.double())
        base_err = (sr.double() - ref).abs().max().item()
        for parts in parts_list:
            with resblock_convs(net, method, parts):
                out = net(lr)
            d = (out - sr).abs()
            flips = sum((a != b).sum().item() for a, b in zip(keep, _keeps(net)))
            total = sum(a.numel() for a in keep)
            rows.append({'photo': osp.basename(path), 'lr': (h, w), 'method': method, 'parts': '+'.join(parts),
                         'max_abs': d.max().item(),
                         'max_rel': (d.max() / sr.abs().max()).item(),  # relative to the largest SR value
                         'mean_abs': d.mean().item(),
                         'err_vs_fp64': (out.double() - ref).abs().max().item(), 'direct_err_vs_fp64': base_err,
                         'halting_flips': flips, 'halting_total': total})
    return rows


def _keeps(net) -> List[torch.Tensor]:
    info = net.last_halting
    if info is None:
        return []
    return [k.bool() for k in list(info.global_keep) + list(info.local_keep)]


__all__ = ['photo_activations', 'speed_table', 'chain_table', 'resblock_chain', 'table_markdown', 'machine_line',
           'sr_difference', 'resblock_convs', 'demo_photos', 'lr_photo', 'contenders']
