#!/usr/bin/env python3
"""Seeded random-weight checkpoints of a few spandrel architectures, and a ``type: Spandrel`` option file for each,
to measure how the harness tiles them (docs/spandrel.md) where no published weights can be downloaded.

Writes ``<out>/<name>.pth`` (BasicSR layout, ``params_ema``) and ``<out>/<name>.yml`` for:
SwinIR-light x4 (shifted windows with a mask), DCTLSA x4 (shifted windows rolled without a mask), SPAN x4 (a CNN),
DAT-light x4 (shifted rectangular windows with a mask, features padded inside the attention). Example:

    python scripts/make_spandrel_checkpoints.py --out results/spandrel_models
    python scripts/benchmark_upscale.py tiling --opt results/spandrel_models/SwinIR-light_x4.yml \\
        --lr LR.png --hr HR.png --tiles 32 --tile_pad 16
"""
import argparse
import os
import os.path as osp
import sys

if __name__ == '__main__':
    sys.path[0] = osp.dirname(osp.dirname(osp.abspath(__file__)))


def models():
    """name -> (spandrel network class, its published x4 configuration)."""
    from spandrel.architectures.DAT import DAT
    from spandrel.architectures.DCTLSA import DCTLSA
    from spandrel.architectures.SPAN import SPAN
    from spandrel.architectures.SwinIR import SwinIR

    return {
        'SwinIR-light_x4': (SwinIR, dict(upscale=4, in_chans=3, img_size=64, window_size=8, img_range=1.0,
                                         depths=[6, 6, 6, 6], embed_dim=60, num_heads=[6, 6, 6, 6], mlp_ratio=2,
                                         upsampler='pixelshuffledirect', resi_connection='1conv')),
        'DCTLSA_x4': (DCTLSA, dict(in_nc=3, nf=55, num_modules=6, out_nc=3, upscale=4, num_head=5)),
        'SPAN_x4': (SPAN, dict(num_in_ch=3, num_out_ch=3, feature_channels=48, upscale=4)),
        'DAT-light_x4': (DAT, dict(upscale=4, in_chans=3, img_size=64, img_range=1.0, depth=[18], embed_dim=60,
                                   num_heads=[6], expansion_factor=2, resi_connection='3conv', split_size=[8, 32],
                                   upsampler='pixelshuffledirect')),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', required=True, help='output folder')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--only', nargs='*', help='names to write (default: all)')
    args = parser.parse_args(argv)

    import torch
    import yaml

    os.makedirs(args.out, exist_ok=True)
    for name, (cls, cfg) in models().items():
        if args.only and name not in args.only:
            continue
        torch.manual_seed(args.seed)
        net = cls(**cfg)
        path = osp.abspath(osp.join(args.out, f'{name}.pth'))
        torch.save({'params_ema': net.state_dict()}, path)
        opt = {'name': name, 'model_type': 'AdaSRModel', 'scale': cfg.get('upscale', 4),
               'network_g': {'type': 'Spandrel', 'path': path}}
        with open(osp.join(args.out, f'{name}.yml'), 'w') as f:
            yaml.safe_dump(opt, f, sort_keys=False)
        print(f'{name}: {sum(p.numel() for p in net.parameters())} parameters -> {path}')


if __name__ == '__main__':
    main()
