"""Export a network to ONNX and check it with onnxruntime: ``adasr-export --opt X.yml -o model.onnx``.

The network comes from an option file (``--opt``: its ``network_g``, and ``path.pretrain_network_g`` /
``param_key_g`` unless ``--weights`` is given) or from an arch name (``--arch NAME --scale S``), built and loaded as
``adasr-upscale`` does. The graph takes any height and width (batch 1) unless ``--size H W`` fixes them. After
writing the file, the graph is run with onnxruntime on the CPU and compared with the PyTorch forward on a crop of
``--check-image`` (or a random image): the maximum absolute difference and the PSNR between the two outputs
(clipped to 0..1) are printed, and the status is 1 when the difference exceeds ``--tolerance``. Exit status 2 for bad
arguments or a network that cannot be exported. See docs/onnx.md.
"""
import argparse
import os
import os.path as osp
import sys
from types import SimpleNamespace
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    from adasr.cli.upscale import add_model_args

    p = argparse.ArgumentParser(
        prog='adasr-export', description='Export an adasr model to ONNX and check it with onnxruntime.',
        epilog='Examples:\n'
               '  adasr-export --opt options/test/test_PFT_light_x4.yml -o pft_light_x4.onnx\n'
               '  adasr-export --opt options/test/test_AdaFormer_x4.yml --weights model_x4.pt -o adaformer.onnx\n'
               '  adasr-export --arch Bicubic --scale 4 -o bicubic_x4.onnx --check-image photo.png\n'
               "(option files such as options/test/*.yml are in adasr's repository; with the package alone, name\n"
               ' the network with --arch)',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-o', '--output', required=True, help='the .onnx file to write')
    p.add_argument('--overwrite', action='store_true', help='replace an existing output file')
    add_model_args(p)
    graph = p.add_argument_group('graph')
    graph.add_argument('--size', type=int, nargs=2, metavar=('H', 'W'),
                       help='fixed input height and width (default: dynamic height and width)')
    graph.add_argument('--opset', type=int, default=None, help='ONNX opset, 18 or later (default: 18)')
    check = p.add_argument_group('check with onnxruntime')
    check.add_argument('--check-image', help='image whose top-left crop is upscaled by both (default: random)')
    check.add_argument('--check-size', type=int, nargs=2, default=None, metavar=('H', 'W'),
                       help='crop size for the check (default: --size, else 48 x 40)')
    check.add_argument('--tolerance', type=float, default=1e-3,
                       help='largest accepted |onnxruntime - PyTorch| in the 0..1 range. Default: 1e-3')
    check.add_argument('--no-check', action='store_true', help='write the file without running it')
    check.add_argument('--threads', type=int, default=0, help='onnxruntime threads for the check (0: its default)')
    return p


def _check_input(args, in_channels: int):
    import numpy as np
    import torch

    h, w = args.check_size or args.size or (48, 40)
    if args.check_image:
        from adasr.utils.image_io import read_image

        color = read_image(args.check_image).color
        if color.ndim == 2:
            color = np.repeat(color[..., None], in_channels, axis=2) if in_channels == 3 else color[..., None]
        if color.shape[0] < h or color.shape[1] < w:
            raise ValueError(f'{args.check_image} is {color.shape[0]}x{color.shape[1]}, smaller than the check '
                             f'crop {h}x{w}')
        return torch.from_numpy(np.ascontiguousarray(color[:h, :w].transpose(2, 0, 1)))[None].float()
    return torch.rand(1, in_channels, h, w, generator=torch.Generator().manual_seed(0))


def _option_file_weights(opt_path: Optional[str]):
    """(label, path) of the checkpoint an option file names (``path.pretrain_network_g``), if it reads."""
    if not opt_path or not osp.isfile(opt_path):
        return []
    from adasr.cli.options import OptionsError, load_yaml

    try:
        path = (load_yaml(opt_path).get('path') or {}).get('pretrain_network_g')
    except (OptionsError, AttributeError):  # reported when the model is built
        return []
    return [(f'{opt_path} path.pretrain_network_g', path)] if isinstance(path, str) else []


def _output_problem(args) -> Optional[str]:
    """Why ``--output`` cannot be written (checked before the network is built), or None."""
    out = args.output
    if not out or out.endswith(os.sep) or (os.altsep and out.endswith(os.altsep)):
        return f'--output {out!r} is a folder name; give the .onnx file to write'
    if osp.isdir(out):
        return f'--output {out} is a folder; give the .onnx file to write'
    for label, path in (('--weights', args.weights), ('--opt', args.opt), *_option_file_weights(args.opt)):
        if path and osp.exists(out) and osp.exists(path) and osp.samefile(out, path):
            return f'--output {out} is the {label} file; it would be replaced by the ONNX graph'
    folder = osp.dirname(osp.abspath(out))
    if not osp.isdir(folder):
        return f'--output {out}: the folder {folder} does not exist'
    if not os.access(folder, os.W_OK | os.X_OK):
        return f'--output {out}: the folder {folder} is not writable'
    if osp.exists(out) and not args.overwrite:
        return f'--output {out} exists; pass --overwrite to replace it'
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns (and, as a console script, exits with) the status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, pair in (('--size', args.size), ('--check-size', args.check_size)):
        if pair is not None and min(pair) < 1:
            parser.error(f'{name} must be positive, got {pair}')
    if args.opset is not None and args.opset < 18:  # the exporter writes nothing older (docs/onnx.md)
        parser.error(f'--opset {args.opset}: the exporter writes opset 18 or later')
    if args.threads < 0:
        parser.error(f'--threads must be 0 (onnxruntime\'s default) or more, got {args.threads}')
    if not (0 < args.tolerance < float('inf')):
        parser.error(f'--tolerance must be a positive number, got {args.tolerance}')
    if args.size and args.check_size and tuple(args.size) != tuple(args.check_size):
        parser.error(f'--check-size {args.check_size[0]} {args.check_size[1]}: a graph of fixed size '
                     f'{args.size[0]}x{args.size[1]} (--size) takes only that size')
    problem = _output_problem(args)
    if problem:
        parser.error(problem)
    from adasr.ops.config import check_environment

    try:  # every ADASR_* setting, before the model is built
        check_environment()
    except ValueError as e:
        parser.error(str(e))
    from adasr.utils.files import remove_orphan_temporaries

    for path in remove_orphan_temporaries(osp.dirname(osp.abspath(args.output))):
        print(f'removed {path}, left by an interrupted export')

    import adasr  # noqa: F401  (shim + registration)
    from adasr.cli.upscale import UsageError, build_model
    from adasr.inference.onnx_export import OPSET, ExportError, OnnxRunner, compare, export_onnx
    from adasr.inference.tile import padded_forward

    try:
        up = build_model(SimpleNamespace(**vars(args), device='cpu', precision='fp32', fp32=False, half=None))
        x = None if args.no_check else _check_input(args, up.in_channels)
        result = export_onnx(up.net, args.output, up.scale, in_channels=up.in_channels, size=args.size,
                             multiple=up.multiple, opset=args.opset or OPSET)
    except (UsageError, ExportError, ValueError) as e:
        print(f'adasr-export: error: {e}', file=sys.stderr)
        return 2
    shape = 'dynamic height and width' if result.dynamic else f'fixed {result.size[0]}x{result.size[1]}'
    print(f'model: {up.description}')
    print(f'wrote {result.path}: {result.bytes / 2 ** 20:.1f} MiB, opset {result.opset}, batch 1, {shape}, '
          f'exported in {result.seconds:.1f} s')
    if args.no_check:
        return 0
    try:
        runner = OnnxRunner(args.output, threads=args.threads)
        cmp = compare(padded_forward(up.net, up.scale, up.multiple), runner, x)
    except Exception as e:  # noqa: BLE001 - the file is written; its check failed (non-finite outputs, onnxruntime)
        print(f'adasr-export: the check of {args.output} failed: {type(e).__name__}: {e}', file=sys.stderr)
        return 1
    ok = cmp.max_abs <= args.tolerance
    print(f'check on {"a crop of " + args.check_image if args.check_image else "a random image"} '
          f'{x.shape[2]}x{x.shape[3]}: max |onnxruntime - PyTorch| = {cmp.max_abs:.2e} (0..1 range), '
          f'PSNR between them {cmp.psnr:.1f} dB: {"ok" if ok else f"ABOVE the tolerance {args.tolerance}"}')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
