#!/usr/bin/env python3
"""Cost of UncertaintyLoss (float32, softplus gradient) against the spec's formula written out plainly, forward +
backward at AdaFormer's training shapes (6 layers of (B, 1, h, w) logits, x4 to the HR patch).

Timing: minimum and median of ``--repeats`` interleaved calls of each (the machine may be shared). Prints a Markdown
table.

Example (the docs' figure):
    python scripts/benchmark_uncertainty_loss.py --batch 16 --lr-size 48 --threads 1
"""
import argparse
import os.path as osp
import sys
import time

import torch
from torch.nn import functional as F

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))


def plain_formula(logits, sr, hr, pixel_scale: float = 255.0):
    """ADAFORMER_SPEC.md section 6 as written: sum over layers of mean(C_up * err) + mean(-log(C_up + 1e-8))."""
    err = (hr - sr.detach()).abs().mean(1, keepdim=True) * pixel_scale
    total = 0
    for logit in logits:
        conf = F.interpolate(torch.sigmoid(logit), size=hr.shape[-2:], mode='bilinear', align_corners=True)
        total = total + (conf * err - torch.log(conf + 1e-8)).mean()
    return total


def main() -> None:
    from adasr.losses.uncertainty_loss import UncertaintyLoss

    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--lr-size', type=int, default=48, help='LR patch side (gt_size / scale). Default: 48')
    p.add_argument('--scale', type=int, default=4)
    p.add_argument('--layers', type=int, default=6)
    p.add_argument('--repeats', type=int, default=10)
    p.add_argument('--threads', type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, h, hr_side = args.batch, args.lr_size, args.lr_size * args.scale
    logits = [torch.randn(b, 1, h, h, requires_grad=True) for _ in range(args.layers)]
    sr, hr = torch.rand(b, 3, hr_side, hr_side), torch.rand(b, 3, hr_side, hr_side)
    fns = {'spec formula, plain': plain_formula, 'UncertaintyLoss': UncertaintyLoss()}
    times = {name: [] for name in fns}
    for _ in range(args.repeats + 1):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn(logits, sr, hr).backward()
            times[name].append(time.perf_counter() - t)
    from benchmarks.profiling import environment_line

    print(f'B={b}, LR {h}x{h}, x{args.scale}, {args.layers} layers; {environment_line()}\n')
    print('| loss | min (ms) | median (ms) |\n|---|---:|---:|')
    for name, ts in times.items():
        ts = sorted(ts[1:])  # the first call warms up
        print(f'| {name} | {ts[0] * 1e3:.0f} | {ts[len(ts) // 2] * 1e3:.0f} |')


if __name__ == '__main__':
    main()
