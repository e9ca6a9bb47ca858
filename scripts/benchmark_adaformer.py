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

Two other modes (docs/adaformer.md, *Speed*):

* ``--profile``: where the time of one sparse-eval call goes, stage by stage (encoder, decoder, estimator, attention
  branches, MLP, glue), per setting, in a fresh process; ``--complete-maps`` runs the estimator on every token;
  with ``--authors DIR`` the authors' network on the same weights and input too (the same stages, calls in turns in
  one process) and a table of where the speed-up comes from.
* ``--compare``: implementations side by side on the same seeded weights and input, each in its own process, called
  in turns: this tree, ``--baseline TREE`` (another adasr checkout, e.g. ``main``), ``--authors DIR`` (the authors'
  code, xiaotongtt/AdaFormer, from a folder outside the repository; needs ``timm`` and ``einops``) and SwinIR-light.

Examples (the docs' tables):
    python scripts/benchmark_adaformer.py --size 270 480 --repeats 3 --csv benchmark_adaformer.csv

    # latency against the share of tokens halted per block (the speed of adaptive inference before trained weights)
    python scripts/benchmark_adaformer.py --settings halt=0 halt=0.25 halt=0.5 halt=0.75 halt=0.9 halt=1
    python scripts/benchmark_adaformer.py --profile --threads 1 --settings eps=0.05 bias=-20
    python scripts/benchmark_adaformer.py --profile --threads 1 --repeats 5 --settings eps=0.05 --authors AUTHORS_DIR
    python scripts/benchmark_adaformer.py --compare --threads 1 --repeats 5 --authors AUTHORS_DIR --baseline MAIN_TREE
    python scripts/benchmark_adaformer.py --compare --conv3x3 direct --threads 1 --repeats 5 --authors AUTHORS_DIR
    python scripts/benchmark_adaformer.py --compare --winograd --threads 1 --repeats 5 --authors AUTHORS_DIR
"""
import argparse
import csv
import os.path as osp
import statistics
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


def _network(setting: Dict[str, float], weights: Optional[str], seed: int):
    """The paper network in eval mode: seeded random weights (as the authors' oracle) or a checkpoint, with the
    setting's estimator bias and eps_h."""

    import adasr  # noqa: F401
    from adasr.archs.adaformer_arch import load_authors_weights
    from benchmarks.adaformer_speed import seeded_adaformer
    from benchmarks.halting_rates import shift_estimator_bias

    net = seeded_adaformer(seed)
    if weights:
        load_authors_weights(net, weights)
    shift_estimator_bias(net, setting.get('bias', 0.0))
    net.eps_h = setting.get('eps', 0.05)
    return net


def _profiled(setting: Dict[str, float], size, weights: Optional[str], seed: int, threads: Optional[int],
              complete_maps: bool):
    """The network and input of a profile (a ``halt=`` setting calibrated on the input's centre crop, as the
    table's rows)."""
    import torch

    from benchmarks.halting_rates import calibrate_on_centre

    if threads:
        torch.set_num_threads(threads)
    net = _network(setting, weights, seed)
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(seed + 1))
    if 'halt' in setting:
        calibrate_on_centre(net, x, setting['halt'])
    net.complete_halting_maps = complete_maps
    return net, x


def profile(setting: Dict[str, float], size, repeats: int, warmup: int, weights: Optional[str], seed: int,
            threads: Optional[int], complete_maps: bool) -> Dict[str, Any]:
    """Stage breakdown of one setting (in a fresh process), see benchmarks.adaformer_speed.stage_profile."""
    from benchmarks.adaformer_speed import stage_profile

    net, x = _profiled(setting, size, weights, seed, threads, complete_maps)
    return stage_profile(net, x, repeats=repeats, warmup=warmup)


def profile_against_authors(setting: Dict[str, float], size, repeats: int, warmup: int, weights: Optional[str],
                            seed: int, threads: Optional[int], complete_maps: bool, authors: str
                            ) -> List[Dict[str, Any]]:
    """Stage breakdown of this tree's network and the authors' on the same weights and input, in one (fresh)
    process, their calls in turns (benchmarks.adaformer_speed.paired_stage_profile)."""
    from benchmarks.adaformer_speed import _wrap_adaformer, _wrap_authors, authors_adaformer, paired_stage_profile

    net, x = _profiled(setting, size, weights, seed, threads, complete_maps)
    theirs = authors_adaformer(authors, net, net.eps_h)
    return paired_stage_profile([(net, x, _wrap_adaformer), (theirs, x * 255, _wrap_authors)], repeats=repeats,
                                warmup=warmup)


def print_profile_pair(ours: Dict[str, Any], theirs: Dict[str, Any], label: str) -> None:
    """One table: each stage's CPU time in the authors' code and in this tree, their ratio, and the stage's part in
    the difference (the sum of the stages' differences: each stage is a median of its own, so their sum is not
    quite the difference of the median totals)."""
    (tw, tc), (ow, oc) = theirs['total'], ours['total']
    print(f'\n{label}: this tree {ow:.2f} s wall, {oc:.2f} s CPU; the authors\' {tw:.2f} s wall, {tc:.2f} s CPU '
          f'(medians): {tw / ow:.2f}x wall, {tc / oc:.2f}x CPU; global halted per block (this tree) '
          f'{_fmt(ours["sparsity"]["global_consumed"])}\n')
    print('| stage | authors\' CPU s | this tree CPU s | authors / this tree | part of the difference |')
    print('|---|---|---|---|---|')
    stages = sorted(set(ours['stages']) | set(theirs['stages']), key=lambda s: -theirs['stages'].get(s, (0, 0))[1])
    cpu = {s: (theirs['stages'].get(s, (0.0, 0.0))[1], ours['stages'].get(s, (0.0, 0.0))[1]) for s in stages}
    diff = sum(t - o for t, o in cpu.values())
    shares = abs(diff) > 1e-3 * max(tc, oc)  # no parts of a difference that is not there
    for stage, (t, o) in cpu.items():
        ratio = f'{t / o:.2f}x' if o > 0 else '-'
        print(f'| {stage} | {t:.3f} | {o:.3f} | {ratio} | {f"{100 * (t - o) / diff:.0f}%" if shares else "-"} |')
    print(f'| **total** | {tc:.3f} | {oc:.3f} | {tc / oc:.2f}x | {"100%" if shares else "-"} |')


def print_profile(result: Dict[str, Any], label: str) -> None:
    total_w, total_c = result['total']
    print(f'\n{label}: {total_w:.2f} s wall, {total_c:.2f} s CPU per call (median); global halted per block '
          f'{_fmt(result["sparsity"]["global_consumed"])}\n')
    print('| stage | wall s | CPU s | share of CPU |')
    print('|---|---|---|---|')
    for stage, (w, c) in sorted(result['stages'].items(), key=lambda kv: -kv[1][1]):
        print(f'| {stage} | {w:.3f} | {c:.3f} | {100 * c / total_c:.0f}% |')
    print(f'| **total** | {total_w:.3f} | {total_c:.3f} | 100% |')


def compare(args) -> None:
    """--compare: implementations side by side, in turns (benchmarks.adaformer_speed.side_by_side)."""
    from benchmarks.adaformer_speed import side_by_side

    contenders = [('adasr (this tree)', 'adasr', None)]
    for method in (args.conv3x3 or []) + (['winograd'] if args.winograd else []):
        contenders.append((f'adasr (this tree, conv3x3={method})', f'adasr:{method}', None))
    if args.baseline:
        contenders.append((f'adasr ({args.baseline})', 'adasr', args.baseline))
    if args.authors:
        contenders.append(('authors (xiaotongtt/AdaFormer)', 'authors', None))
    contenders.append(('SwinIR-light', 'swinir-light', None))
    res = side_by_side(contenders, tuple(args.size), repeats=args.repeats, seed=args.seed,
                       eps_h=args.eps, threads=args.threads, authors_dir=args.authors,
                       progress=lambda m: print('  ' + m, file=sys.stderr, flush=True))
    med = {k: (statistics.median(v['wall']), statistics.median(v['cpu'])) for k, v in res.items()}
    ref = 'authors (xiaotongtt/AdaFormer)' if args.authors else contenders[-2][0]
    print(f'side by side, input 1x3x{args.size[0]}x{args.size[1]} x4, seeded random weights shared by the AdaFormer '
          f'rows, eps_h {args.eps:g}, median of {args.repeats} rounds (order rotating); {_environment(args)}\n')
    print(f'| implementation | wall s, median (all) | CPU s, median | speed-up vs {ref.split(" (")[0]} (wall, CPU) '
          f'| time / SwinIR-light (wall, CPU) | max abs SR diff vs adasr, 0..255 |')
    print('|---|---|---|---|---|---|')
    for label, r in res.items():
        w, c = med[label]
        diff = '-' if r['sr_diff_vs_first'] is None else f'{r["sr_diff_vs_first"]:.2e}'
        print(f'| {label} | {w:.2f} ({" ".join(f"{t:.2f}" for t in r["wall"])}) | {c:.2f} | '
              f'{med[ref][0] / w:.2f}, {med[ref][1] / c:.2f} | {w / med["SwinIR-light"][0]:.2f}, '
              f'{c / med["SwinIR-light"][1]:.2f} | {diff} |')


def _environment(args) -> str:
    from benchmarks.profiling import environment_line

    return environment_line(args.threads)


def measure(setting: Dict[str, float], sparse: bool, size, repeats: int, warmup: int, device: str,
            weights: Optional[str], seed: int, threads: Optional[int]) -> Dict[str, Any]:
    """One configuration, run inside a fresh process (see benchmarks.profiling.run_isolated)."""
    import torch

    import adasr  # noqa: F401
    from benchmarks.halting_rates import calibrate_on_centre
    from benchmarks.profiling import timed_no_grad

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    net = _network(setting, weights, seed)
    net.sparse_eval = sparse
    net = net.to(dev)
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(seed + 1)).to(dev)
    offset = None
    if 'halt' in setting:  # calibrated in sparse mode on a centre crop, the same offset for both modes
        net.sparse_eval = True
        offset, _ = calibrate_on_centre(net, x, setting['halt'])
        net.sparse_eval = sparse

    timing, peak = timed_no_grad(lambda: net(x), dev, repeats, warmup)
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
    parser.add_argument('--profile', action='store_true',
                        help='per-stage time of the sparse eval path for each setting, instead of the table')
    parser.add_argument('--complete-maps', action='store_true',
                        help='with --profile: complete_halting_maps=True (estimator on every token, as the authors)')
    parser.add_argument('--compare', action='store_true',
                        help='side by side in turns: this tree, --baseline, --authors, SwinIR-light (eps_h --eps)')
    parser.add_argument('--winograd', action='store_true',
                        help="with --compare: also this tree with conv3x3='winograd' (opt-in Winograd convolutions)")
    parser.add_argument('--conv3x3', nargs='+', default=None, metavar='METHOD',
                        help="with --compare: also this tree with these conv3x3 methods (e.g. direct: the authors' "
                             'numbers bit for bit)')
    parser.add_argument('--baseline', default=None, help='with --compare: another adasr tree (e.g. a main checkout)')
    parser.add_argument('--authors', default=None,
                        help='with --compare: folder holding the authors\' code (xiaotongtt/AdaFormer, model/...); '
                             'with --profile: also their stages, in the same process, calls in turns')
    parser.add_argument('--eps', type=float, default=0.05, help='with --compare: eps_h of the AdaFormer rows')
    args = parser.parse_args(argv)

    from benchmarks.profiling import ensure_malloc_env

    ensure_malloc_env(disable=args.no_malloc_env or args.device != 'cpu')
    from benchmarks.profiling import run_isolated

    if args.compare:
        compare(args)
        return
    settings = args.settings or [parse_setting(s) for s in DEFAULT_SETTINGS]
    if args.profile:
        print(f'AdaFormer x4 stage profile, input 1x3x{args.size[0]}x{args.size[1]}, sparse eval, '
              f'{"complete" if args.complete_maps else "live-window"} estimator maps, '
              f'{"seeded random weights" if not args.weights else args.weights}; {_environment(args)}; '
              f'median of {args.repeats} after {args.warmup} warm-up')
        for setting in settings:
            if args.authors:
                ours, theirs = run_isolated(profile_against_authors, setting=setting, size=tuple(args.size),
                                            repeats=args.repeats, warmup=args.warmup, weights=args.weights,
                                            seed=args.seed, threads=args.threads,
                                            complete_maps=args.complete_maps, authors=args.authors)
                print_profile_pair(ours, theirs, ', '.join(f'{k}={v:g}' for k, v in setting.items()))
                continue
            r = run_isolated(profile, setting=setting, size=tuple(args.size), repeats=args.repeats,
                             warmup=args.warmup, weights=args.weights, seed=args.seed, threads=args.threads,
                             complete_maps=args.complete_maps)
            print_profile(r, ', '.join(f'{k}={v:g}' for k, v in setting.items()))
        return
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

    print(f'AdaFormer x4, input 1x3x{args.size[0]}x{args.size[1]}, {args.device}, '
          f'{"seeded random weights" if not args.weights else args.weights}; {_environment(args)}; '
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
