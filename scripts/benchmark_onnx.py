"""Measurements behind docs/onnx.md: ONNX export time, file size, and onnxruntime CPU latency against PyTorch.

  python scripts/benchmark_onnx.py --photo datasets/demo/val/LR_bicubic/X4/chelsea.png --threads 1 \\
      --out results/onnx_bench options/test/test_AdaFormer_x4.yml options/test/test_PFT_light_x4.yml ... arch:Bicubic:4

Each model (an option file, or ``arch:NAME:SCALE``) is measured in a fresh process: built as ``adasr-export`` and
``adasr-upscale`` build it (``--weights``, else random weights), exported with dynamic height and width (``--size``
for a fixed size), then PyTorch (``padded_forward``, ``torch.no_grad``) and onnxruntime (CPU provider) upscale the
whole photo with the same thread count: the median of ``--repeat`` runs after one warm-up run each, and the
difference between the two outputs (clipped to 0..1), with PyTorch sorting stably as the graph does and with its
default sort (``*_default_sort``; differs for ATD only). One JSON line per model is printed, then a Markdown table.
"""
import argparse
import json
import os
import os.path as osp
import statistics
import subprocess
import sys
import time

if __name__ == '__main__':
    sys.path[0] = osp.dirname(osp.dirname(osp.abspath(__file__)))


def _measure(spec: str, photo: str, out_dir: str, threads: int, repeat: int, size, weights) -> dict:
    import numpy as np
    import torch

    from adasr.inference.onnx_export import OnnxRunner, compare, export_onnx
    from adasr.inference.tile import padded_forward
    from adasr.utils.image_io import read_image
    from scripts.benchmark_upscale import _build

    torch.set_num_threads(threads)
    net, scale, multiple = _build(spec, weights)
    name = spec if spec.startswith('arch:') else osp.splitext(osp.basename(spec))[0]
    path = osp.join(out_dir, name.replace(':', '_') + '.onnx')
    result = export_onnx(net, path, scale, size=size, multiple=multiple)
    color = read_image(photo).color
    x = torch.from_numpy(np.ascontiguousarray(color.transpose(2, 0, 1)))[None]
    fn = padded_forward(net, scale, multiple)
    runner = OnnxRunner(path, threads=threads)

    def timed(call) -> float:
        call()  # warm-up
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    with torch.no_grad():
        t_torch = timed(lambda: fn(x))
    t_ort = timed(lambda: runner(x.numpy()))
    cmp = compare(fn, runner, x)
    default_sort = compare(fn, runner, x, stable_sort=False)  # PyTorch's own (unstable) sort order
    return dict(model=name, input=f'{x.shape[2]}x{x.shape[3]}', dynamic=result.dynamic, opset=result.opset,
                export_s=round(result.seconds, 1), mib=round(result.bytes / 2 ** 20, 2),
                params=sum(p.numel() for p in net.parameters()), torch_s=round(t_torch, 3), ort_s=round(t_ort, 3),
                max_abs=cmp.max_abs, psnr=round(cmp.psnr, 1), max_abs_default_sort=default_sort.max_abs,
                psnr_default_sort=round(default_sort.psnr, 1), load=round(os.getloadavg()[0], 1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('models', nargs='+', help='option files or arch:NAME:SCALE')
    p.add_argument('--photo', required=True, help='LR image upscaled by both (whole image)')
    p.add_argument('--out', default='results/onnx_bench', help='folder for the .onnx files')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--repeat', type=int, default=3)
    p.add_argument('--size', type=int, nargs=2, default=None, help='fixed export size (default: dynamic)')
    p.add_argument('--weights', default=None, help='checkpoint (one model only)')
    p.add_argument('--one', action='store_true', help=argparse.SUPPRESS)  # child process: measure models[0]
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.one:
        print(json.dumps(_measure(args.models[0], args.photo, args.out, args.threads, args.repeat, args.size,
                                  args.weights)))
        return 0
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    rows = []
    for spec in args.models:
        cmd = [sys.executable, osp.abspath(__file__), spec, '--one', '--photo', args.photo, '--out', args.out,
               '--threads', str(args.threads), '--repeat', str(args.repeat)]
        cmd += ['--size', *map(str, args.size)] if args.size else []
        cmd += ['--weights', args.weights] if args.weights else []
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ''
        if proc.returncode or not line.startswith('{'):
            print(f'{spec}: failed:\n{proc.stderr[-2000:]}', file=sys.stderr)
            continue
        print(line, flush=True)
        rows.append(json.loads(line))
    from benchmarks.profiling import environment_line

    print(f'\n{environment_line(args.threads)} (each model in a fresh process)')
    print('| model | params | export (s) | file (MiB) | PyTorch (s) | onnxruntime (s) | max abs diff | PSNR (dB) |')
    print('|---|---|---|---|---|---|---|---|')
    for r in rows:
        print(f'| {r["model"]} | {r["params"] / 1e6:.2f} M | {r["export_s"]} | {r["mib"]} | {r["torch_s"]} | '
              f'{r["ort_s"]} | {r["max_abs"]:.1e} | {r["psnr"]} |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
