#!/usr/bin/env python3
"""Reduced precision and fast convolutions against fp32 on real photos: output PSNR, and AdaFormer's halting flips.

For each model (AdaFormer with the demo checkpoint when it exists, AdaFormer with seeded random weights whose
estimator is biased to halt a target share of tokens per block, and the other archs of the benchmark with seeded
random weights) and each photo, the SR output of every reduced precision (autocast, as ``--precision`` runs it) is
compared with the fp32 output: PSNR on RGB in [0, 1] (clamped, whole image) and the largest difference in 8-bit grey
levels. For AdaFormer it also counts *flips*: the share of tokens whose global keep decision (and of tokens whose
window's local keep decision) differs from fp32's, per block, on the unpadded map.

Precisions: those the device runs (bf16 on a CPU with avx512_bf16/AMX; bf16 and fp16 on CUDA), see
:mod:`adasr.inference.precision`. On the CPU the AdaFormer rows also compare fp32 with other 3x3-convolution methods
(``--conv3x3``, default ``winograd``: the opt-in Winograd F(4x4, 3x3) convolutions, ``adasr.ops`` option
``conv3x3``) against the default ``auto``. Prints Markdown tables.

Example (the docs' tables):
    python scripts/precision_report.py --threads 2
"""
import argparse
import glob
import os.path as osp
import sys
from typing import Callable, Dict, List, Optional

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, REPO)

DEMO_CHECKPOINT = 'experiments/demo_AdaFormer_x4/models/net_g_latest.pth'
DEFAULT_IMAGES = 'datasets/demo/*/LR_bicubic/X4/*.png'
OTHER_ROWS = ('SwinIR-light', 'HAT-S', 'ATD-light', 'PFT-light')


def _psnr(a, b) -> float:
    import math

    mse = (a.clamp(0, 1) - b.clamp(0, 1)).double().pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def configuration(name: str, device) -> Callable:
    """The wrapper of a forward for one compared configuration: a reduced precision (``'bf16'``, ``'fp16'``, by
    autocast as ``--precision`` runs it) or ``'conv3x3=METHOD'`` (fp32, the 3x3 convolutions of the archs that opt
    in by ``METHOD``: the ``adasr.ops`` option ``conv3x3`` for the call)."""
    from adasr.inference.precision import resolve_precision
    from adasr.ops.config import options

    if not name.startswith('conv3x3='):
        return resolve_precision(name, device).wrap
    method = name[len('conv3x3='):]

    def wrap(fn: Callable) -> Callable:
        def run(x):
            with options(conv3x3=method):
                return fn(x)
        return run
    return wrap


def compare(net, scale: int, window: int, images: List, configs: List[str], device,
            adaptive: bool) -> Dict[str, Dict]:
    """Per configuration (:func:`configuration`): PSNR per photo against fp32, max grey-level difference and
    (adaptive) flips per block."""
    import torch

    from adasr.archs.interface import halting_record
    from adasr.inference.tile import padded_forward

    fn = padded_forward(net, scale, window)
    out = {p: {'psnr': [], 'max_diff': 0.0, 'global': None, 'local': None, 'tokens': 0} for p in configs}
    for x in images:
        x = x.to(device)
        with torch.no_grad():
            ref = fn(x)
            ref_keep = _keep(halting_record(net)) if adaptive else None
            for p in configs:
                y = configuration(p, device)(fn)(x)
                r = out[p]
                r['psnr'].append(_psnr(y, ref))
                r['max_diff'] = max(r['max_diff'], 255 * (y.clamp(0, 1) - ref.clamp(0, 1)).abs().max().item())
                if adaptive:
                    keep = _keep(halting_record(net))
                    for branch in ('global', 'local'):
                        flips = [(a != b).sum().item() for a, b in zip(keep[branch], ref_keep[branch])]
                        r[branch] = flips if r[branch] is None else [s + f for s, f in zip(r[branch], flips)]
                    r['tokens'] += keep['global'][0].numel()
    return out


def _keep(info) -> Dict[str, List]:
    """The keep decisions of the blocks that consume them (masks 0 .. depth-2), cropped to the unpadded map."""
    return {'global': [m.bool() for m in info.crop(info.global_keep)[:-1]],
            'local': [m.bool() for m in info.crop(info.local_keep)[:-1]]}


def load_images(pattern: str) -> List:
    from benchmarks.harness import read_rgb

    paths = sorted(glob.glob(osp.join(REPO, pattern)))
    if not paths:
        raise SystemExit(f'error: no images match {pattern}')
    return paths, [read_rgb(p) for p in paths]


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--images', default=DEFAULT_IMAGES, help=f'glob of LR photos (default: {DEFAULT_IMAGES})')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--precisions', nargs='+', default=None, choices=('bf16', 'fp16'),
                        help='default: those the device runs')
    parser.add_argument('--conv3x3', nargs='*', default=None, metavar='METHOD',
                        help='AdaFormer rows: also fp32 with these 3x3-convolution methods (default on the CPU: '
                             'winograd; none on CUDA, where every convolution is cuDNN\'s)')
    parser.add_argument('--halted', type=float, nargs='*', default=[0.25, 0.5, 0.75],
                        help='random-weight AdaFormer rows: target shares of tokens halted per block')
    parser.add_argument('--weights', default=DEMO_CHECKPOINT, help='AdaFormer checkpoint (skipped if absent)')
    parser.add_argument('--rows', nargs='*', default=list(OTHER_ROWS), help='other benchmark rows (random weights)')
    parser.add_argument('--threads', type=int, default=None)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    import adasr  # noqa: F401
    from adasr.archs.adaformer_arch import AdaFormer
    from adasr.archs.interface import arch_traits, is_adaptive
    from adasr.inference.precision import PrecisionError, cpu_isa, resolve_precision
    from adasr.ops.config import CONV3X3_METHODS, get_option
    from adasr.utils.checkpoint import load_weights
    from benchmarks.halting_rates import calibrate_halting, halted_per_block, mean_halted
    from benchmarks.harness import DEFAULT_ROWS, build_net, perturb_weights, resolve_row
    from benchmarks.profiling import environment_summary

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precisions = []
    for p in args.precisions or ['bf16', 'fp16']:
        try:
            resolve_precision(p, device)
            precisions.append(p)
        except PrecisionError as e:
            if args.precisions:
                raise SystemExit(f'error: {e}') from None
            print(f'skipped {p}: {e}', file=sys.stderr)
    methods = args.conv3x3 if args.conv3x3 is not None else ([] if device.type == 'cuda' else ['winograd'])
    for m in methods:
        if m not in CONV3X3_METHODS or m == 'auto':
            raise SystemExit(f'error: --conv3x3 {m!r}: choose from {[c for c in CONV3X3_METHODS if c != "auto"]}')
    if not precisions and not methods:
        raise SystemExit(f'error: {args.device} runs no reduced precision (and no --conv3x3 method was given)')
    conv_configs = [f'conv3x3={m}' for m in methods]
    paths, images = load_images(args.images)

    models = []  # (label, net, note, scale, network_g)
    weights = osp.join(REPO, args.weights) if not osp.isabs(args.weights) else args.weights
    if osp.isfile(weights):
        net = AdaFormer()
        load_weights(net, weights, 'params', strict=True)
        models.append((f'AdaFormer, {osp.relpath(weights, REPO)}', net.eval().to(device), 'trained (demo)', 4, {},
                       conv_configs))
    else:
        print(f'no AdaFormer checkpoint at {args.weights}: random-weight rows only', file=sys.stderr)
    for target in args.halted:
        torch.manual_seed(args.seed)
        net = AdaFormer()
        perturb_weights(net)
        net = net.eval().to(device)
        offset, reached = calibrate_halting(net, images[0].to(device), target)
        models.append((f'AdaFormer, random, {100 * target:.0f}% halted', net,
                       f'seeded random, estimator bias {offset:+.2f}', 4, {}, conv_configs))
    for label in args.rows:
        row = resolve_row(label, osp.join(REPO, DEFAULT_ROWS[label]))
        torch.manual_seed(args.seed)
        spec = {'network_g': row.network_g, 'checkpoint': row.checkpoint}
        net = build_net(spec, device)
        if not row.checkpoint:
            perturb_weights(net)
        models.append((label, net, row.checkpoint or 'seeded random', row.scale, row.network_g, []))

    env = environment_summary()
    print(f'# Reduced precision and fast convolutions against fp32\n\n{len(images)} photos ({args.images}), '
          f'{args.device}, ISA {cpu_isa()}, torch {env["torch"]}, {torch.get_num_threads()} threads; reduced '
          f'precision by autocast (adasr.inference.precision); the fp32 reference with conv3x3 '
          f'{get_option("conv3x3")!r} (adasr.ops option)\n')
    print('| model | weights | configuration | PSNR vs fp32, mean (min) dB | max diff (grey levels) | halted per block '
          '(fp32, global) | global flips per block | local flips per block | flips, mean (count) |')
    print('|---|---|---|---|---|---|---|---|---|')
    for label, net, note, scale, net_opt, convs in models:
        adaptive = is_adaptive(net)
        halted = ''
        if adaptive:  # fp32 halting on the photos, averaged
            shares = []
            for x in images:
                with torch.no_grad():
                    net(x.to(device))
                shares.append(halted_per_block(net)['global'])
            per_block = [sum(s[i] for s in shares) / len(shares) for i in range(len(shares[0]))]
            halted = ' '.join(f'{100 * v:.0f}' for v in per_block) + f' % (mean {100 * mean_halted(per_block):.0f}%)'
        configs = precisions + convs
        res = compare(net, scale, arch_traits(net, net_opt=net_opt).window, images, configs, device, adaptive)
        for p in configs:
            r = res[p]
            psnr = f'{sum(r["psnr"]) / len(r["psnr"]):.2f} ({min(r["psnr"]):.2f})'
            if adaptive:
                g = [f / r['tokens'] for f in r['global']]
                loc = [f / r['tokens'] for f in r['local']]
                flips = (' '.join(f'{100 * v:.3f}' for v in g) + ' %', ' '.join(f'{100 * v:.3f}' for v in loc) + ' %',
                         f'{100 * sum(g) / len(g):.3f}% / {100 * sum(loc) / len(loc):.3f}% ({sum(r["global"])} / '
                         f'{sum(r["local"])} of {r["tokens"] * len(g)})')
            else:
                flips = ('-', '-', '-')
            name = f'fp32, {p}' if p.startswith('conv3x3=') else p
            print(f'| {label} | {note} | {name} | {psnr} | {r["max_diff"]:.3g} | {halted or "-"} | ' + ' | '.join(flips)
                  + ' |', flush=True)
    print('\nFlips: share (and count) of tokens whose keep decision in the global branch (tokens) or the local '
          'branch (their window) differs from fp32, for the masks blocks 1..depth-1 consume, over all photos. Halted: '
          'fp32 share of tokens each block skipped (block 0 runs all).')


if __name__ == '__main__':
    main()
