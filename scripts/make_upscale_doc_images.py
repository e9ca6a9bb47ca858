"""Make the halting pictures of docs/upscale.md: run ``adasr-upscale --save-halting`` on one photo and copy the
overview and sparsity figures into docs/images/ as small palette PNGs (each well under 200 KB).

  python scripts/make_upscale_doc_images.py --opt options/demo/test_AdaFormer_x4_demo.yml \
      --weights experiments/demo_AdaFormer_x4/models/net_g_latest.pth --photo datasets/demo/val/HR/chelsea.png \
      --eps-h 0.5
"""
import argparse
import os
import os.path as osp
import shutil
import sys
import tempfile

if __name__ == '__main__':
    sys.path[0] = osp.dirname(osp.dirname(osp.abspath(__file__)))


def shrink_png(src: str, dst: str, colors: int = 128, limit: int = 200_000) -> int:
    """Save ``src`` as an adaptive-palette PNG at ``dst``, halving the colours until it is under ``limit`` bytes."""
    from PIL import Image

    with Image.open(src) as im:
        rgb = im.convert('RGB')
    while True:
        rgb.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(dst,
                                                                                                    optimize=True)
        size = os.path.getsize(dst)
        if size < limit or colors <= 16:
            return size
        colors //= 2


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--opt', required=True)
    p.add_argument('--weights', required=True)
    p.add_argument('--photo', required=True)
    p.add_argument('--eps-h', type=float, default=None)
    p.add_argument('--tile', type=int, default=0)
    p.add_argument('--out', default='docs/images')
    p.add_argument('--prefix', default='halting_demo')
    args = p.parse_args(argv)

    from adasr.cli.upscale import main as upscale

    work = tempfile.mkdtemp(prefix='adasr_doc_')
    try:
        cli = ['-i', args.photo, '-o', work, '--opt', args.opt, '--weights', args.weights, '--param-key', 'params',
               '--save-halting', '--tile', str(args.tile), '-q']
        if args.eps_h is not None:
            cli += ['--eps-h', str(args.eps_h)]
        status = upscale(cli)
        if status:
            raise SystemExit(f'adasr-upscale failed with status {status}')
        folder = osp.join(work, 'halting', osp.splitext(osp.basename(args.photo))[0])
        os.makedirs(args.out, exist_ok=True)
        for name in ('overview', 'sparsity'):
            dst = osp.join(args.out, f'{args.prefix}_{name}.png')
            size = shrink_png(osp.join(folder, f'{name}.png'), dst)
            print(f'{dst}: {size / 1000:.0f} KB')
        shutil.copy(osp.join(folder, 'halting.json'), osp.join(args.out, f'{args.prefix}.json'))
        with open(osp.join(folder, 'halting.json')) as f:
            print(f.read())
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
