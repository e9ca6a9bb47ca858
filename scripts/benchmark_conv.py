#!/usr/bin/env python3
"""3x3 convolution engines side by side: oneDNN's direct convolution (NCHW, channels_last, oneDNN blocked) and the
Winograd variants of adasr.ops.winograd, on AdaFormer's 64 -> 64 EDSR conv with the activations of a demo photo
(benchmarks/conv_speed.py), with the malloc settings of the AdaFormer benchmarks (benchmarks/profiling.py). Prints the
machine line (ISA, threads, numba, load average, malloc settings) and a Markdown table: median
ms over --repeats rounds in which the contenders run in turns, the speed-up over direct channels_last in the same
run, and the error against a float64 reference. ``--sr`` adds AdaFormer's SR difference on the demo photos with
the encoder / decoder ResBlock convs run by Winograd.

Examples (docs/winograd.md):
    OMP_NUM_THREADS=1 python scripts/benchmark_conv.py --threads 1 --size 272 480
    OMP_NUM_THREADS=2 python scripts/benchmark_conv.py --threads 2 --size 272 480
    OMP_NUM_THREADS=1 python scripts/benchmark_conv.py --threads 1 --no-speed --chain --sr --variants f4 f3 f2
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--size', type=int, nargs=2, default=(272, 480), metavar=('H', 'W'))
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=7)
    parser.add_argument('--variants', nargs='+', default=['f4', 'f3', 'f2', 'f4-lavin'])
    parser.add_argument('--photo', default=None, help='image for the activations (default: the first demo photo)')
    parser.add_argument('--torch-engine', action='store_true', help='also time the PyTorch tile transforms')
    parser.add_argument('--sr', action='store_true', help='also the AdaFormer SR difference on the demo photos')
    parser.add_argument('--chain', action='store_true', help="also the encoder's ResBlock chain (16 convs)")
    parser.add_argument('--no-speed', action='store_true', help='skip the speed table')
    parser.add_argument('--no-malloc-env', action='store_true',
                        help="measure with glibc's default malloc settings (page faults of every fresh buffer)")
    args = parser.parse_args(argv)

    from benchmarks.profiling import ensure_malloc_env

    malloc = ensure_malloc_env(args.no_malloc_env)

    import torch

    from benchmarks import conv_speed

    torch.set_num_threads(args.threads)
    h, w = args.size
    if not args.no_speed:
        x, weight, bias = conv_speed.photo_activations(h, w, args.photo)
        print(f'1x64x{h}x{w} 3x3 conv, AdaFormer encoder conv 0 (seeded), photo activations (|x| <= '
              f'{x.abs().max().item():.0f})')
        print(conv_speed.machine_line() + f'; malloc env: {malloc or "glibc defaults"}')
        rows = conv_speed.speed_table(x, weight, bias, args.variants, args.repeats, args.torch_engine)
        print(conv_speed.table_markdown(rows))
        print(f'(|y| <= {rows[0]["max_ref"]:.0f}; load after: {conv_speed.machine_line().split("load average ")[1]})')
    if args.chain:
        x, _, _ = conv_speed.photo_activations(h, w, args.photo)
        rows = conv_speed.chain_table(x, args.variants, max(3, args.repeats // 2))
        print(f"\nAdaFormer encoder ResBlock chain (8 blocks, 16 convs), 1x64x{h}x{w}, NCHW in and out; "
              f"{conv_speed.machine_line()}")
        print('| method | wall ms (median) | speed-up vs network | CPU ms (median) | max abs error vs fp64 |')
        print('|---|---:|---:|---:|---:|')
        for r in rows:
            print(f"| {r['label']} | {r['ms']:.0f} | {r['speedup']:.2f}x | {r['cpu_ms']:.0f} | {r['max_err']:.2e} |")
        print(f"(|y| <= {rows[0]['max_ref']:.0f})")
    if args.sr:
        print('\nAdaFormer x4 (seeded weights), SR with the ResBlock convs by Winograd vs unchanged (0..1 range)')
        print('| photo | LR | method | convs | max abs diff | max abs diff / max SR | mean abs diff | max err vs '
              'fp64 (direct) | halting decisions changed |')
        print('|---|---|---|---|---:|---:|---:|---:|---:|')
        for photo in conv_speed.demo_photos():
            for v in args.variants:
                for r in conv_speed.sr_difference(v, photo):
                    print(f"| {r['photo']} | {r['lr'][0]}x{r['lr'][1]} | {v} | {r['parts']} | {r['max_abs']:.2e} | "
                          f"{r['max_rel']:.2e} | {r['mean_abs']:.2e} | {r['err_vs_fp64']:.2e} "
                          f"({r['direct_err_vs_fp64']:.2e}) | {r['halting_flips']} / {r['halting_total']} |")
    return 0


if __name__ == '__main__':
    sys.exit(main())
