#!/usr/bin/env python3
"""Latency, peak memory, MACs and per-block sparsity of AdaFormer's sparse eval against the dense computation.

For each setting (the halting threshold ``eps_h``; a bias added to the confidence estimator's last conv to force
a sparsity level; or ``halt=<share>``: the bias that halts that share of tokens per block, mean over blocks 1-5,
calibrated on a centre crop by :mod:`benchmarks.halting_rates`) the paper-configuration network runs in eval mode
twice, each in a fresh process:

* ``sparse``: attention only for kept windows and tokens (``sparse_eval=True``, the default; the authors' eval
  chunking of the global branch);
* ``dense``: the same network computing attention for every token and masking afterwards (``sparse_eval=False``,
  the training computation; whole-image global attention, so its masks can differ slightly).

The row with a bias of -20 has no halting at all (every token attends in every block): the cost of the plain
transformer. Timing: median wall time of ``--repeats`` calls after ``--warmup`` calls, and the median process CPU
time of the same calls (all threads; steadier than wall time on a shared machine); memory: peak RSS (CPU) or peak
CUDA allocation above the level before the first call. Prints a Markdown table; ``--csv`` also writes the rows.

Example (the docs' table):
    python scripts/benchmark_adaformer.py --size 270 480 --repeats 3 --csv benchmark_adaformer.csv

    # latency against the share of tokens halted per block (the speed of adaptive inference before trained weights)
    python scripts/benchmark_adaformer.py --settings halt=0 halt=0.25 halt=0.5 halt=0.75 halt=0.9 halt=1
"""
import argparse
import csv
import os.path as osp
import sys
from typing import Any, Dict, List, Optional

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

DEFAULT_SETTINGS = ['bias=-20', 'eps=0.05', 'eps=0.2', 'eps=0.5', 'bias=2', 'bias=20']


def parse_setting(text: str) -> Dict[str, float]:
    """'eps=0.2' -> {'eps': 0.2}; 'bias=3' -> {'bias': 3}; 'halt=0.5' -> {'halt': 0.5} (eps_h 0.05 unless set)."""
    key, _, value = text.partition('=')
    try:
        number = float(value)
    except ValueError:
        number = None
    if key not in ('eps', 'bias', 'halt') or number is None or (key == 'halt' and not 0 <= number <= 1):
        raise argparse.ArgumentTypeError(f"setting {text!r}: use eps=<float>, bias=<float> or halt=<share in [0, 1]>")
    return {key: number}


def measure(setting: Dict[str, float], sparse: bool, size, repeats: int, warmup: int, device: str,
            weights: Optional[str], seed: int, threads: Optional[int]) -> Dict[str, Any]:
    """One configuration, run inside a fresh process (see benchmarks.profiling.run_isolated)."""
    import torch

    import adasr  # noqa: F401
    from adasr.archs.adaformer_arch import AdaFormer, load_authors_weights
    from benchmarks.halting_rates import calibrate_on_centre, shift_estimator_bias
    from benchmarks.harness import perturb_weights
    from benchmarks.profiling import time_forward

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    torch.manual_seed(seed)
    net = AdaFormer()
    if weights:
        load_authors_weights(net, weights)
    else:  # seeded random weights: default init plus a small perturbation (as the authors' oracle)
        perturb_weights(net)
    shift_estimator_bias(net, setting.get('bias', 0.0))
    net.eps_h = setting.get('eps', 0.05)
    net.sparse_eval = sparse
    net = net.eval().to(dev)
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(seed + 1)).to(dev)
    offset = None
    if 'halt' in setting:  # calibrated in sparse mode on a centre crop, the same offset for both modes
        net.sparse_eval = True
        offset, _ = calibrate_on_centre(net, x, setting['halt'])
        net.sparse_eval = sparse

    timing, peak = time_forward(net, x, repeats, warmup, dev)
    info = net.last_halting
    return {'median_s': timing.median, 'spread': timing.spread, 'times': timing.times,
            'cpu_median_s': timing.cpu_median, 'peak_mb': peak / 2 ** 20, 'estimator_offset': offset,
            'gmacs': net.flops(*size) / 1e9, 'gmacs_authors': net.flops(*size, convention='authors') / 1e9,
            'global_consumed': info.sparsity['global_consumed'], 'local_consumed': info.sparsity['local_consumed'],
            'split': info.eval_global_split}


def _fmt(values: List[float]) -> str:
    return ' '.join(f'{v:.2f}' for v in values)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--size', type=int, nargs=2, default=[270, 480], metavar=('H', 'W'), help='LR input size')
    parser.add_argument('--settings', type=parse_setting, nargs='+', default=None,
                        help='eps=<eps_h>, bias=<estimator bias> or halt=<share halted per block>; default: '
                             f'{" ".join(DEFAULT_SETTINGS)}')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch default)')
    parser.add_argument('--weights', default=None, help='checkpoint (authors\' or BasicSR); default: seeded random')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--csv', default=None, help='also write the rows to this CSV file')
    parser.add_argument('--no-malloc-env', action='store_true', help='measure with glibc malloc defaults')
    args = parser.parse_args(argv)

    from benchmarks.profiling import ensure_malloc_env

    ensure_malloc_env(disable=args.no_malloc_env or args.device != 'cpu')
    from benchmarks.profiling import environment_summary, run_isolated

    settings = args.settings or [parse_setting(s) for s in DEFAULT_SETTINGS]
    rows = []
    for setting in settings:
        label = ', '.join(f'{k}={v:g}' for k, v in setting.items())
        result = {}
        for mode in ('sparse', 'dense'):
            r = run_isolated(measure, setting=setting, sparse=(mode == 'sparse'), size=tuple(args.size),
                             repeats=args.repeats, warmup=args.warmup, device=args.device, weights=args.weights,
                             seed=args.seed, threads=args.threads)
            result[mode] = r
            rows.append({'setting': label, 'mode': mode, **{k: v for k, v in r.items() if k != 'times'},
                         'times': ' '.join(f'{t:.3f}' for t in r['times'])})
            print(f'  {label:12s} {mode:6s} {r["median_s"]:.3f} s', file=sys.stderr, flush=True)
        rows[-2]['speedup_vs_dense'] = result['dense']['median_s'] / result['sparse']['median_s']
        rows[-2]['cpu_speedup_vs_dense'] = result['dense']['cpu_median_s'] / result['sparse']['cpu_median_s']
        rows[-1]['speedup_vs_dense'] = rows[-1]['cpu_speedup_vs_dense'] = 1.0

    env = environment_summary()
    print(f'AdaFormer x4, input 1x3x{args.size[0]}x{args.size[1]}, {args.device}, '
          f'{"seeded random weights" if not args.weights else args.weights}; '
          f'torch {env["torch"]}, {args.threads or env["threads"]} threads, {env["cpu_count"]} CPUs, '
          f'load {env.get("loadavg_1m", "?")}, malloc env {"on" if env["malloc_env"] else "off"}; '
          f'median of {args.repeats} after {args.warmup} warm-up\n')
    print('| setting | mode | wall s, median (spread) | CPU s | dense / sparse (wall, CPU) | peak MB '
          '| GMACs (authors\' count) | global halted per block | local halted per block |')
    print('|---|---|---|---|---|---|---|---|---|')
    for r in rows:
        print(f'| {r["setting"]} | {r["mode"]} | {r["median_s"]:.2f} (±{100 * r["spread"]:.0f}%) | '
              f'{r["cpu_median_s"]:.2f} | {r["speedup_vs_dense"]:.2f}, {r["cpu_speedup_vs_dense"]:.2f} | '
              f'{r["peak_mb"]:.0f} | {r["gmacs"]:.1f} ({r["gmacs_authors"]:.1f}) | '
              f'{_fmt(r["global_consumed"])} | {_fmt(r["local_consumed"])} |')
    if args.csv:
        keys = ['setting', 'mode', 'median_s', 'spread', 'times', 'cpu_median_s', 'speedup_vs_dense',
                'cpu_speedup_vs_dense', 'peak_mb', 'estimator_offset', 'gmacs',
                'gmacs_authors', 'split', 'global_consumed', 'local_consumed']
        with open(args.csv, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            for r in rows:
                writer.writerow({k: (_fmt(r[k]) if isinstance(r[k], list) else r[k]) for k in keys})
        print(f'\nwrote {args.csv}', file=sys.stderr)


if __name__ == '__main__':
    main()
