#!/usr/bin/env python3
"""One speed report: AdaFormer (exact path in fp32, reduced precision and fast convolutions, dense mode) against
SwinIR-light, PFT-light against SwinIR-light, and AdaFormer's latency against the share of tokens halted per block,
with the ISA, threads, load and malloc settings, in one run.

Networks come from the benchmark's option files (options/test/test_{AdaFormer,SwinIR_light,PFT_light}_x4.yml) with
seeded random weights where the file's checkpoint is absent (the same weights in every row of a model); the input is
the centre of a demo photo mirrored to the size. Each configuration runs in a fresh process (unless --quick) with the
glibc malloc settings of benchmarks/profiling.py; timing = median wall time (and process CPU time, all threads) of
--repeats calls after --warmup.

Sections (per thread count):
* AdaFormer x4 at --size (default 480x270 LR, i.e. 1920x1080 out): exact path (sparse_eval and conv3x3 auto, the
  defaults: halting decisions the authors' bit for bit) fp32, the same with the authors' convolutions everywhere
  (conv3x3=direct: their SR bit for bit), each
  reduced precision the CPU runs (bf16 with avx512_bf16/AMX; refused elsewhere, with the reason), fp32 with the
  opt-in Winograd convolutions (conv3x3=winograd; other rounding: scripts/precision_report.py counts its halting
  flips), dense mode
  (sparse_eval=False: every token computed, then masked), SwinIR-light fp32; ratios.
* PFT-light x4 against SwinIR-light x4 at --pft-size (default 256x256).
* Halting that is real: AdaFormer's exact path with its estimator biased so that a target share of tokens halts per
  block (--halted; benchmarks/halting_rates.py), latency against the shares reached.

``--device cuda`` runs the same sections on a GPU (reduced precision by autocast where the GPU supports it; the
rows of the CPU convolution engines, conv3x3 direct and winograd, are left out: CUDA convolutions are cuDNN's).

Examples:
    python scripts/speed_report.py --threads 1 2            # the docs' tables (several minutes per thread count)
    python scripts/speed_report.py --quick                  # tiny sizes, one run each, in-process (for tests)
    python scripts/speed_report.py --device cuda --size 1920x1080 --halted 0 0.5 1   # 8K output on a GPU
"""
import argparse
import os.path as osp
import shlex
import sys
from typing import Any, Dict, List, Optional

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, REPO)

PHOTO = 'datasets/demo/val/HR/chelsea.png'
ROWS = {'AdaFormer': 'options/test/test_AdaFormer_x4.yml', 'SwinIR-light': 'options/test/test_SwinIR_light_x4.yml',
        'PFT-light': 'options/test/test_PFT_light_x4.yml'}
DEFAULT_HALTED = [0.0, 0.25, 0.5, 0.75, 0.9, 1.0]


def _specs() -> Dict[str, Dict[str, Any]]:
    from benchmarks.harness import resolve_row

    specs = {}
    for label, path in ROWS.items():
        row = resolve_row(label, osp.join(REPO, path))
        specs[label] = {'network_g': row.network_g, 'scale': row.scale, 'checkpoint': row.checkpoint,
                        'param_key': row.param_key, 'eps_h': row.eps_h}
    return specs


def _net_variant(spec: Dict[str, Any], **network_g) -> Dict[str, Any]:
    """``spec`` with these ``network_g`` options changed."""
    return dict(spec, network_g=dict(spec['network_g'], **network_g))


def _fmt_shares(values: List[float]) -> str:
    return ' '.join(f'{100 * v:.0f}' for v in values)


def _ratios(r: Dict[str, Any], ref: Dict[str, Any]) -> str:
    """'wall ratio, CPU ratio' of ``r`` against ``ref``."""
    return f'{r["median_s"] / ref["median_s"]:.2f}, {r["cpu_median_s"] / ref["cpu_median_s"]:.2f}'


def _cell(r: Dict[str, Any]) -> str:
    return f'{r["median_s"]:.3f} (±{100 * r["spread"]:.0f}%) | {r["cpu_median_s"]:.2f}'


def main(argv: Optional[List[str]] = None) -> None:
    if argv is None:  # as a script: re-exec once with the malloc settings that make CPU timing stable
        from benchmarks.profiling import ensure_malloc_env

        ensure_malloc_env(disable='--no-malloc-env' in sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--size', default='480x270', help='AdaFormer / SwinIR-light LR input WIDTHxHEIGHT')
    parser.add_argument('--pft-size', default='256x256', help='PFT-light / SwinIR-light LR input WIDTHxHEIGHT')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--threads', type=int, nargs='+', default=[None],
                        help='torch thread counts, one report section each (default: torch\'s choice)')
    parser.add_argument('--halted', type=float, nargs='*', default=DEFAULT_HALTED,
                        help='target shares of tokens halted per block for the halting section (none: skip it)')
    parser.add_argument('--precisions', nargs='+', default=['bf16', 'fp16'], choices=('bf16', 'fp16'),
                        help='reduced precisions to try for AdaFormer (those the CPU refuses are listed with why)')
    parser.add_argument('--image', default=PHOTO, help=f'photo for the input (default: {PHOTO})')
    parser.add_argument('--quick', action='store_true',
                        help='tiny sizes (32x24, 24x24), 1 run, no warm-up, halting 0 and 1, in-process')
    parser.add_argument('--out', default=None, help='also write the report (Markdown) to this file')
    parser.add_argument('--no-malloc-env', action='store_true', help="keep glibc's default malloc settings")
    parser.add_argument('--timeout', type=float, default=None, help='seconds per configuration')
    parser.add_argument('--device', default='cpu', help="'cpu' (default) or a CUDA device ('cuda', 'cuda:1')")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.pft_size, args.repeats, args.warmup = '32x24', '24x24', 1, 0
        args.halted = [0.0, 1.0] if args.halted == DEFAULT_HALTED else args.halted

    import torch

    import adasr  # noqa: F401
    from adasr.inference.precision import PrecisionError, cpu_isa, resolve_precision
    from benchmarks.halting_rates import mean_halted
    from benchmarks.harness import BenchmarkError, git_commit, now, parse_size
    from benchmarks.profiling import environment_summary, run_isolated
    from benchmarks.speed import CALIBRATION_SIDE, time_config

    try:
        size, pft_size = parse_size(args.size), parse_size(args.pft_size)
        device = torch.device(args.device)
    except (BenchmarkError, RuntimeError) as e:
        raise SystemExit(f'error: {e}') from None
    if device.type not in ('cpu', 'cuda'):
        raise SystemExit(f'error: --device {args.device}: the report runs on cpu or cuda')
    cuda = device.type == 'cuda'
    if cuda and not torch.cuda.is_available():
        raise SystemExit(f'error: --device {args.device} but torch sees no CUDA device')
    image = args.image if osp.isabs(args.image) else osp.join(REPO, args.image)
    if not osp.isfile(image):
        raise SystemExit(f'error: image not found: {args.image}')
    for t in args.halted:
        if not 0 <= t <= 1:
            raise SystemExit(f'error: --halted takes shares in [0, 1], got {t}')
    specs = _specs()
    reduced, refused = [], []
    for p in args.precisions:
        try:
            resolve_precision(p, device)
            reduced.append(p)
        except PrecisionError as e:
            refused.append(f'{p}: {e}')

    def run(label, spec, sz, threads, **kw) -> Dict[str, Any]:
        print(f'  [{threads or "default"} threads] {label} ...', file=sys.stderr, flush=True)
        kwargs = dict(spec=spec, image=image, size=sz, repeats=args.repeats, warmup=args.warmup, threads=threads,
                      device=args.device, **kw)
        if args.quick:
            saved = torch.get_num_threads()
            try:
                return time_config(**kwargs)
            finally:
                torch.set_num_threads(saved)
        return run_isolated(time_config, timeout=args.timeout, **kwargs)

    env = environment_summary()
    lines = ['# Speed report', '',
             f'- command: `python scripts/speed_report.py {" ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))}`',
             f'- date: {now()}; adasr commit {git_commit(REPO) or "unknown"}',
             f'- CPU: {env.get("cpu_model") or "?"}, {env["cpu_count"]} CPUs; PyTorch ISA {cpu_isa()}; cpuinfo flags: '
             f'{", ".join(env["cpu_flags"]) or "none of interest"}; torch {env["torch"]}',
             f'- load average at start (1, 5, 15 min): {env.get("loadavg", "?")} (shared machine: other jobs run '
             f'alongside, so CPU seconds are the steadier figure)',
             f'- glibc malloc settings: {env["malloc_env"] or "defaults"}',
             '- device: ' + (f'{torch.cuda.get_device_name(device)} ({args.device}), CUDA {torch.version.cuda}; '
                              'times include a synchronisation after each call' if cuda else 'cpu'),
             f'- input: centre of {args.image}, mirrored to size; seeded random weights (no checkpoint in the option '
             f'files); median of {args.repeats} after {args.warmup} warm-up; '
             + ('in-process (--quick)' if args.quick else 'each configuration in a fresh process')]
    if refused:
        lines.append('- refused precisions: ' + '; '.join(refused))
    (h, w), (ph, pw) = size, pft_size
    for threads in args.threads:
        tlabel = f'{threads} thread{"s" if threads != 1 else ""}' if threads else f'{torch.get_num_threads()} threads'
        if cuda:
            tlabel = f'{args.device}, {tlabel} on the host'
        ada, swin = specs['AdaFormer'], specs['SwinIR-light']
        exact = run('AdaFormer exact fp32', ada, size, threads)
        rows = [('AdaFormer, exact path (sparse_eval), fp32', exact)]
        if not cuda:  # (the CPU convolution engines: on CUDA every convolution is cuDNN's)
            rows.append(("AdaFormer, exact path, fp32, the authors' convolutions bit for bit (conv3x3=direct)",
                         run('AdaFormer direct', _net_variant(ada, conv3x3='direct'), size, threads)))
        for p in reduced:
            rows.append((f'AdaFormer, sparse_eval, {p} (autocast; other rounding)',
                         run(f'AdaFormer {p}', ada, size, threads, precision=p)))
        if not cuda:
            rows.append(('AdaFormer, sparse_eval, fp32, Winograd F(4x4) convolutions everywhere (conv3x3=winograd; '
                          'other rounding)',
                         run('AdaFormer winograd', _net_variant(ada, conv3x3='winograd'), size, threads)))
        rows.append(('AdaFormer, dense mode (sparse_eval=False), fp32',
                     run('AdaFormer dense', _net_variant(ada, sparse_eval=False), size, threads)))
        swin_r = run('SwinIR-light', swin, size, threads)
        rows.append(('SwinIR-light, fp32', swin_r))
        lines += ['', f'## AdaFormer x4 at {w}x{h} LR, {tlabel}', '',
                  '| configuration | wall s, median (spread) | CPU s | / AdaFormer exact fp32 (wall, CPU) '
                  '| / SwinIR-light (wall, CPU) | halted per block, global (%) | local (%) |',
                  '|---|---|---|---|---|---|---|']
        for name, r in rows:
            hal = r.get('halted')
            shares = f'{_fmt_shares(hal["global"])} | {_fmt_shares(hal["local"])}' if hal else '- | -'
            lines.append(f'| {name} | {_cell(r)} | {_ratios(r, exact)} | {_ratios(r, swin_r)} | {shares} |')

        pft_r = run('PFT-light', specs['PFT-light'], pft_size, threads)
        swin_p = run('SwinIR-light (PFT size)', swin, pft_size, threads)
        lines += ['', f'## PFT-light x4 against SwinIR-light x4 at {pw}x{ph} LR, {tlabel}', '',
                  '| model | wall s, median (spread) | CPU s | / SwinIR-light (wall) | / SwinIR-light (CPU) |',
                  '|---|---|---|---|---|']
        for name, r in (('PFT-light, fp32', pft_r), ('SwinIR-light, fp32', swin_p)):
            lines.append(f'| {name} | {_cell(r)} | {r["median_s"] / swin_p["median_s"]:.2f} | '
                         f'{r["cpu_median_s"] / swin_p["cpu_median_s"]:.2f} |')

        if args.halted:
            sweep = [(t, run(f'AdaFormer halted {t:g}', ada, size, threads, halted=t)) for t in args.halted]
            base = sweep[0][1]
            lines += ['', f'## AdaFormer latency against the share of tokens halted per block, {w}x{h} LR, fp32, '
                      f'{tlabel}', '',
                      'Estimator bias set so that the target share of tokens halts per block (mean over blocks 1-5, '
                      'global branch; calibrated by bisection on a centre crop of at most '
                      f'{CALIBRATION_SIDE}x{CALIBRATION_SIDE} of the input); shares below are those reached on the '
                      'timed input. Block 0 always runs every token.', '',
                      '| target | estimator offset | halted per block, global (%) | local (%) | mean halted, global '
                      f'| wall s, median (spread) | CPU s | / {_fmt_shares([sweep[0][0]])}% row (wall, CPU) '
                      '| / SwinIR-light (wall, CPU) |',
                      '|---|---|---|---|---|---|---|---|---|']
            for t, r in sweep:
                hal = r['halted']
                lines.append(f'| {100 * t:.0f}% | {r["estimator_offset"]:+.2f} | {_fmt_shares(hal["global"])} | '
                             f'{_fmt_shares(hal["local"])} | {100 * mean_halted(hal["global"]):.0f}% | {_cell(r)} | '
                             f'{_ratios(r, base)} | {_ratios(r, swin_r)} |')
    end = environment_summary()
    lines += ['', f'Load average at the end (1, 5, 15 min): {end.get("loadavg", "?")}.']
    report = '\n'.join(lines) + '\n'
    print(report)
    if args.out:
        from adasr.utils.image_io import atomic_write_bytes

        atomic_write_bytes(args.out, report.encode())
        print(f'written: {args.out}', file=sys.stderr)

if __name__ == '__main__':
    main()
