"""Measurements behind docs/upscale.md: the per-pixel memory model, the 8K-output memory runs, and the tiling check.

Each measurement runs in a fresh process (``benchmarks.profiling.run_isolated``) with the glibc malloc settings of
``ensure_malloc_env``. Commands:

  python scripts/benchmark_upscale.py inputs --photo PHOTO [--pair-photo PHOTO2] [--out datasets/upscale_bench]
      make the benchmark inputs (not committed): input_1920x1080.png (8K output at x4) from PHOTO, and
      hr_2048.png / lr_512.png (a centre 2048x2048 crop of PHOTO2 and its MATLAB-bicubic x1/4) for the tiling check.
  python scripts/benchmark_upscale.py calibrate --opt X.yml [--sides 256 384]
      peak memory growth of one forward per LR pixel (what each arch declares as ArchTraits.bytes_per_pixel).
  python scripts/benchmark_upscale.py memory --opt X.yml --input IMG [-- extra adasr-upscale flags]
      run adasr-upscale on one image; report wall time, peak RSS of the whole process and the growth during the run.
  python scripts/benchmark_upscale.py tiling --opt X.yml --weights W --lr LR.png --hr HR.png
      [--tiles 128 256 --tile_pad 32]
      whole-image against tiled output: PSNR of each against HR (Y, border = scale) and their difference.

``--opt`` may also be ``arch:NAME:SCALE`` (e.g. ``arch:Bicubic:4``).
"""
import argparse
import json
import os
import os.path as osp
import sys
import time

if __name__ == '__main__':
    sys.path[0] = osp.dirname(osp.dirname(osp.abspath(__file__)))


def _model_flags(spec: str) -> list:
    """``arch:NAME:SCALE`` or an option file -> the model flags of ``adasr-upscale``."""
    if spec.startswith('arch:'):
        _, name, scale = spec.split(':')
        return ['--arch', name, '--scale', scale]
    return ['--opt', spec]


def _build(spec: str, weights=None):
    """(net, scale, multiple) on the CPU in fp32, built exactly as ``adasr-upscale`` builds it."""
    import adasr  # noqa: F401
    from adasr.cli.upscale import build_model, build_parser

    flags = _model_flags(spec) + (['--weights', weights] if weights else ['--random-weights'])
    up = build_model(build_parser().parse_args(['-i', '.', *flags, '--device', 'cpu']))
    return up.net, up.scale, up.multiple


def _calibrate_one(spec: str, side: int, threads: int):
    import torch

    from adasr.inference.tile import padded_forward
    from benchmarks.profiling import current_rss_bytes, rss_peak_bytes

    torch.set_num_threads(threads)
    net, scale, multiple = _build(spec)
    fn = padded_forward(net, scale, multiple)
    x = torch.rand(1, 3, side, side)
    with torch.no_grad():
        fn(torch.rand(1, 3, multiple * 2, multiple * 2))  # load kernels outside the measurement
        base = current_rss_bytes()
        t = time.perf_counter()
        fn(x)
        elapsed = time.perf_counter() - t
    grow = rss_peak_bytes() - base
    return {'side': side, 'peak_growth_bytes': grow, 'bytes_per_pixel': grow / side ** 2, 'seconds': elapsed}


def _run_cli(argv, threads: int):
    import torch

    from benchmarks.profiling import current_rss_bytes, rss_peak_bytes

    torch.set_num_threads(threads)
    import adasr  # noqa: F401
    from adasr.cli.upscale import main

    base = current_rss_bytes()
    t = time.perf_counter()
    status = main(argv)
    return {'status': status, 'seconds': time.perf_counter() - t, 'peak_rss_bytes': rss_peak_bytes(),
            'peak_growth_bytes': rss_peak_bytes() - base, 'rss_after_import_bytes': base}


def _tiling_check(spec, weights, lr_path, hr_path, tiles, tile_pad, threads):
    import cv2
    import numpy as np
    import torch

    from adasr.inference.tile import padded_forward, tiled_forward  # imports adasr: the shim before basicsr's

    from basicsr.metrics import calculate_psnr  # isort: skip
    from basicsr.utils import tensor2img  # isort: skip

    torch.set_num_threads(threads)
    net, scale, multiple = _build(spec, weights)
    fn = padded_forward(net, scale, multiple)
    lr = cv2.imread(lr_path)[..., ::-1]
    hr = cv2.imread(hr_path)
    x = torch.from_numpy(lr.astype(np.float32) / 255).permute(2, 0, 1)[None].contiguous()

    def to_img(y):  # as the test pipeline saves images (clone: tensor2img clamps in place)
        return tensor2img(y.clone())

    from adasr.archs.interface import is_adaptive
    from adasr.inference.halting import HaltingCollector

    rows, masks = [], {}
    with torch.no_grad():
        outs = {}
        for tile in [0] + list(tiles):
            collector = HaltingCollector(net, *x.shape[-2:]) if is_adaptive(net) else None
            t = time.perf_counter()
            outs[tile] = tiled_forward(fn, x, scale, tile, tile_pad if tile else 0, multiple, on_tile=collector)
            row = {'tile': tile, 'tile_pad': tile_pad if tile else 0, 'seconds': time.perf_counter() - t}
            if collector is not None:
                masks[tile] = collector.maps()
                row['eval_global_splits'] = sorted(set(collector.splits))
                row['global_halted'] = [round(float(1 - g.mean()), 4) for g in masks[tile]['global_keep']]
                if tile:
                    for key in ('global_keep', 'local_keep'):
                        row[f'{key}_flipped'] = float((masks[tile][key] != masks[0][key]).mean())
            rows.append(row)
        whole = outs[0]
    whole_img = to_img(whole)
    psnr_whole = calculate_psnr(whole_img, hr, scale, test_y_channel=True)
    for row in rows:
        img = to_img(outs[row['tile']])
        row['psnr_y_vs_hr'] = calculate_psnr(img, hr, scale, test_y_channel=True)
        row['delta_db'] = row['psnr_y_vs_hr'] - psnr_whole
        diff = (outs[row['tile']] - whole).abs()
        row['max_abs_diff_float'] = diff.max().item()
        row['psnr_rgb_vs_whole'] = calculate_psnr(img, whole_img, 0) if row['tile'] else float('inf')
        row['uint8_pixels_differing'] = float((img != whole_img).mean())
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='cmd', required=True)
    s = sub.add_parser('inputs')
    s.add_argument('--photo', required=True, help='source of the 1920x1080 input (centre 16:9 crop, area resize)')
    s.add_argument('--pair-photo', help='source of the 2048x2048 HR crop (default: --photo; needs >= 2048 px)')
    s.add_argument('--out', default='datasets/upscale_bench')
    s = sub.add_parser('calibrate')
    s.add_argument('--opt', required=True, nargs='+')
    s.add_argument('--sides', type=int, nargs='+', default=[256, 384])
    s = sub.add_parser('memory')
    s.add_argument('--opt', required=True)
    s.add_argument('--input', required=True)
    s.add_argument('--out', default='results/upscale_bench')
    s.add_argument('extra', nargs='*', help='extra adasr-upscale flags (after --)')
    s = sub.add_parser('tiling')
    s.add_argument('--opt', required=True)
    s.add_argument('--weights')
    s.add_argument('--lr', required=True)
    s.add_argument('--hr', required=True)
    s.add_argument('--tiles', type=int, nargs='+', default=[128, 256])
    s.add_argument('--tile_pad', type=int, default=32)
    for s in sub.choices.values():
        s.add_argument('--threads', type=int, default=os.cpu_count())
        s.add_argument('--json', help='also write the results here')
    args = p.parse_args(argv)

    from benchmarks.profiling import ensure_malloc_env, environment_summary, run_isolated

    ensure_malloc_env()
    env = environment_summary()
    print(json.dumps({'environment': env}))
    results = {'environment': env, 'command': ' '.join(sys.argv)}
    if args.cmd == 'inputs':
        import cv2
        import numpy as np
        import torch

        from adasr.utils.matlab_resize import imresize_uint8

        img = cv2.imread(args.photo)
        if img is None:
            raise SystemExit(f'cannot read {args.photo}')
        os.makedirs(args.out, exist_ok=True)
        h, w = img.shape[:2]
        ch, cw = (h, h * 16 // 9) if w * 9 >= h * 16 else (w * 9 // 16, w)
        crop = img[(h - ch) // 2:(h - ch) // 2 + ch, (w - cw) // 2:(w - cw) // 2 + cw]
        cv2.imwrite(osp.join(args.out, 'input_1920x1080.png'), cv2.resize(crop, (1920, 1080),
                                                                           interpolation=cv2.INTER_AREA))
        img = cv2.imread(args.pair_photo) if args.pair_photo else img
        h, w = img.shape[:2]
        if min(h, w) >= 2048:
            top, left = (h - 2048) // 2, (w - 2048) // 2
            hr = np.ascontiguousarray(img[top:top + 2048, left:left + 2048])
            cv2.imwrite(osp.join(args.out, 'hr_2048.png'), hr)
            cv2.imwrite(osp.join(args.out, 'lr_512.png'), imresize_uint8(hr, 1 / 4))
        del torch
        print(f'wrote {sorted(os.listdir(args.out))} to {args.out}')
        return
    if args.cmd == 'calibrate':
        rows = []
        for spec in args.opt:
            for side in args.sides:
                r = run_isolated(_calibrate_one, spec=spec, side=side, threads=args.threads)
                r['model'] = spec
                rows.append(r)
                print(json.dumps(r))
        results['rows'] = rows
    elif args.cmd == 'memory':
        spec = args.opt
        argv_cli = ['-i', args.input, '-o', args.out, *_model_flags(spec), '--overwrite', *args.extra]
        r = run_isolated(_run_cli, argv=argv_cli, threads=args.threads)
        r['argv'] = argv_cli
        r['loadavg_after'] = os.getloadavg()[0]
        print(json.dumps(r))
        results['rows'] = [r]
    elif args.cmd == 'tiling':
        rows = run_isolated(_tiling_check, spec=args.opt, weights=args.weights, lr_path=args.lr, hr_path=args.hr,
                            tiles=args.tiles, tile_pad=args.tile_pad, threads=args.threads)
        for r in rows:
            print(json.dumps(r))
        results['rows'] = rows
    if args.json:
        os.makedirs(osp.dirname(osp.abspath(args.json)), exist_ok=True)
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=2)


if __name__ == '__main__':
    main()
