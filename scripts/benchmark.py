#!/usr/bin/env python3
"""One table of AdaFormer, PFT and the baselines side by side: parameters, MACs at a stated input size, latency
(median and spread), peak memory, PSNR/SSIM on Y, and the per-layer halting sparsity of adaptive models.

Rows are option files (their network_g and path.pretrain_network_g): the default six are
Bicubic, SwinIR-light, HAT-S, ATD-light, AdaFormer and PFT-light (x4); rows without weights are labelled
"untrained". Each row runs in a fresh process. Outputs: <out>/benchmark.{md,csv,json,png}, and the table printed.

Examples:
    # the demo photos, CPU, the default rows and LR size 320x180 (a 1280x720 output at x4)
    python scripts/benchmark.py --data datasets/demo/val

    # classic sets, some rows, official weights from another place, GPU
    python scripts/benchmark.py --data datasets/benchmark/Set5 datasets/benchmark/Set14 \\
        --rows Bicubic SwinIR-light HAT-S --weights HAT-S=/ckpt/HAT-S_SRx4.pth --device cuda

    # every row in fp32 and bf16 (autocast; bf16 on a CPU with avx512_bf16/AMX)
    python scripts/benchmark.py --data datasets/demo/val --rows SwinIR-light AdaFormer --precision fp32 bf16

    # any option file as an extra row
    python scripts/benchmark.py --data datasets/demo/val --rows Bicubic --opt Mine=options/test/my_model.yml
"""
import argparse
import os.path as osp
import shlex
import sys

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, REPO)


def _pairs(items, what):
    out = {}
    for item in items or []:
        if '=' not in item:
            raise SystemExit(f'error: {what} takes LABEL=PATH, got {item!r}')
        k, v = item.split('=', 1)
        out[k] = v
    return out


def main(argv=None) -> None:
    if argv is None:  # run as a script: re-exec once with the glibc malloc settings that make CPU timing stable
        from benchmarks.profiling import ensure_malloc_env

        ensure_malloc_env(disable='--no-malloc-env' in sys.argv[1:])
    from benchmarks.harness import DEFAULT_ROWS

    parser = argparse.ArgumentParser(description='Side-by-side SR benchmark.',
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument('--data', nargs='+', required=True,
                        help='test set folders [NAME=]PATH (GTmod{s}/LRbicx{s}, HR/LR_bicubic/X{s} or '
                             'HR/X{s}/LR/X{s})')
    parser.add_argument('--rows', nargs='*', default=None, metavar='LABEL',
                        help=f'preset rows (default: all of {", ".join(DEFAULT_ROWS)})')
    parser.add_argument('--opt', action='append', default=[], metavar='LABEL=YML', help='an option file as a row')
    parser.add_argument('--weights', action='append', default=[], metavar='LABEL=PTH',
                        help="checkpoint for a row (instead of its option file's pretrain_network_g)")
    parser.add_argument('--scale', type=int, default=4)
    parser.add_argument('--size', default='320x180', help='LR input WIDTHxHEIGHT for latency, memory and MACs')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s choice)')
    parser.add_argument('--device', default='cpu', help="'cpu' or 'cuda' (or 'cuda:N')")
    parser.add_argument('--precision', nargs='+', default=None, choices=('fp32', 'bf16', 'fp16'),
                        help="measure every row in each of these precisions (autocast; bf16 on the CPU needs "
                             "avx512_bf16/AMX, fp16 needs CUDA). Default: each option file's val.precision, else fp32")
    parser.add_argument('--max-images', type=int, default=None, help='evaluate at most this many images per set')
    parser.add_argument('--out', default='results/benchmark', help='output folder (default: results/benchmark)')
    parser.add_argument('--no-malloc-env', action='store_true', help="keep glibc's default malloc settings")
    parser.add_argument('--timeout', type=float, default=None, help='seconds per row before it is abandoned')
    args = parser.parse_args(argv)
    for name, value, low in (('--repeats', args.repeats, 1), ('--warmup', args.warmup, 0),
                             ('--max-images', args.max_images, 1), ('--threads', args.threads, 1)):
        if value is not None and value < low:
            parser.error(f'{name} must be at least {low}, got {value}')
    if args.timeout is not None and not 0 < args.timeout < float('inf'):
        parser.error(f'--timeout must be a positive number of seconds, got {args.timeout}')

    import torch

    import adasr  # noqa: F401
    from adasr.cli.options import OptionsError
    from adasr.inference.precision import PrecisionError, resolve_precision
    from benchmarks.harness import (
        BenchmarkError,
        find_dataset,
        git_commit,
        measure_row,
        now,
        parse_size,
        resolve_row,
        save_outputs,
        table_rows,
        to_markdown,
        with_precisions,
    )
    from benchmarks.profiling import environment_summary, run_isolated

    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise SystemExit('error: --device cuda but torch sees no CUDA device')
    try:
        h, w = parse_size(args.size)
        datasets = [find_dataset(d.split('=', 1)[1], args.scale, d.split('=', 1)[0]) if '=' in d
                    else find_dataset(d, args.scale) for d in args.data]
    except BenchmarkError as e:
        raise SystemExit(f'error: {e}') from None
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise SystemExit(f'error: data set names must differ, got {names}')

    wanted = {}
    for label in (DEFAULT_ROWS if args.rows is None else args.rows):
        if label not in DEFAULT_ROWS:
            raise SystemExit(f'error: unknown row {label!r}; presets: {", ".join(DEFAULT_ROWS)} (or use --opt)')
        wanted[label] = osp.join(REPO, DEFAULT_ROWS[label])
    wanted.update(_pairs(args.opt, '--opt'))
    weights = _pairs(args.weights, '--weights')
    for label in weights:
        if label not in wanted:
            raise SystemExit(f'error: --weights for {label!r}, which is not a row')

    rows, skipped = [], []
    for label, path in wanted.items():
        if not osp.isfile(path):
            skipped.append(f'{label}: {osp.relpath(path, REPO)} not in this checkout')
            continue
        try:
            row = resolve_row(label, path, weights.get(label))
        except (BenchmarkError, OptionsError) as e:
            raise SystemExit(f'error: row {label}: {e}') from None
        if row.scale != args.scale:
            raise SystemExit(f'error: row {label} is x{row.scale} ({path}) but --scale is {args.scale}')
        rows.append(row)
    if not rows:
        raise SystemExit('error: no rows to measure')
    rows = with_precisions(rows, args.precision)
    for row in rows:
        try:
            resolve_precision(row.precision, args.device)
        except PrecisionError as e:
            raise SystemExit(f'error: row {row.label}: {e}') from None

    results = {}
    data_arg = [{'name': d.name, 'hr_dir': d.hr_dir, 'lr_dir': d.lr_dir, 'pairs': d.pairs} for d in datasets]
    env = environment_summary()
    for row in rows:
        print(f'[{row.label}] measuring ...', flush=True)
        spec = {'network_g': row.network_g, 'scale': row.scale, 'checkpoint': row.checkpoint,
                'param_key': row.param_key, 'strict': row.strict, 'eps_h': row.eps_h,
                'precision': row.precision}
        try:
            results[row.label] = run_isolated(measure_row, timeout=args.timeout, spec=spec, datasets=data_arg,
                                              size=(h, w), repeats=args.repeats, warmup=args.warmup,
                                              device=args.device, threads=args.threads, max_images=args.max_images)
        except RuntimeError as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            first = lines[0] if lines else type(e).__name__
            if 'exit code -9' in first:
                first += ' - killed, most likely out of memory (try a smaller --size)'
            elif len(lines) > 1:  # "... failed in its subprocess:" then the traceback: its last line is the reason
                first = f'{first} {lines[-1]}'
            print(f'[{row.label}] failed: {e}', file=sys.stderr)
            results[row.label] = {'error': f'failed: {first}'}
    if args.threads:
        env['threads'] = args.threads
    settings = {
        'command': 'python scripts/benchmark.py ' + ' '.join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        'date': now(), 'commit': git_commit(REPO), 'device': args.device, 'environment': env,
        'size_label': f'{w}x{h}', 'repeats': args.repeats, 'warmup': args.warmup, 'scale': args.scale,
        'data': names, 'skipped': skipped,
        'memory_kind': 'CUDA max_memory_allocated increase' if args.device.startswith('cuda')
        else 'increase of the process RSS peak (ru_maxrss)',
    }
    paths = save_outputs(args.out, rows, results, names, settings)
    header, cells = table_rows(rows, results, names)
    print()
    print(to_markdown(header, cells))
    for line in skipped:
        print(f'skipped {line}')
    print(f"\nwritten: {', '.join(paths.values())}")


if __name__ == '__main__':
    main()
