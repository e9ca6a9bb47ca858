"""Upscale images or folders with any adasr model: ``adasr-upscale -i INPUT -o OUTPUT --opt X.yml`` (or
``python inference/upscale.py ...`` from a clone).

The model comes from an option file (``--opt``: its ``network_g``, and ``path.pretrain_network_g`` /
``param_key_g`` unless ``--weights`` is given), from an arch name with its default hyperparameters
(``--arch NAME --scale S --weights W``; ``--arch Bicubic --scale 4`` needs no weights), or from the checkpoint
alone (``--weights W``: any architecture spandrel recognises, PFT and AdaFormer included; the detected architecture
and hyperparameters are printed). Big images run tile by
tile (``--tile``, ``--tile_pad``; chosen from the free memory when ``--tile`` is not given), so any size fits.
Grayscale stays grayscale, alpha is upscaled separately, 16-bit stays 16-bit, EXIF orientation is applied (as
BasicSR's readers do). Files that cannot be read or hold NaN/infinite samples, and outputs that are not finite, are
reported and skipped (nothing is written for them); the output folder is checked before the model is built, and
temporary files left by an interrupted run are removed; outputs are written atomically, and existing outputs are
skipped unless ``--overwrite``, so an interrupted folder run resumes where it stopped. Exit status: 0 when every
image was written or skipped, 1 when any failed, 2 for bad arguments. Under ``torchrun`` the inputs are shared
between the processes, with one summary. See docs/upscale.md.
"""
import argparse
import datetime
import os
import os.path as osp
import sys
import time
from dataclasses import dataclass, field, fields
from typing import Dict, List, Optional, Sequence, Tuple

from adasr.ops.config import CONV3X3_METHODS, check_environment, set_option

HALF_DTYPES = ('fp16', 'bf16')
DIST_TIMEOUT = datetime.timedelta(days=7)  # under torchrun: how long the summary waits for the slowest share
PRECISION_CHOICES = ('auto', 'fp32', 'bf16', 'fp16')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='adasr-upscale', description='Upscale an image or a folder of images with an adasr model.',
        epilog='Examples:\n'
               '  adasr-upscale -i photo.png -o out --arch Bicubic --scale 4\n'
               '  adasr-upscale -i photos/ -o out --opt options/test/test_SwinIR_light_x4.yml --weights w.pth\n'
               '  adasr-upscale -i photo.png -o out --weights any_spandrel_model.pth\n'
               '  adasr-upscale -i big.png -o out --opt X.yml --tile 256 --save-halting\n'
               "(option files such as options/test/*.yml are in adasr's repository; with the package alone, name\n"
               ' the network with --arch, or give spandrel-detectable --weights)',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-i', '--input', required=True, help='an image file or a folder of images (not recursive)')
    p.add_argument('-o', '--output', default='results/upscale', help='output folder. Default: results/upscale')
    add_model_args(p)
    run = p.add_argument_group('inference')
    run.add_argument('-t', '--tile', type=int, default=None,
                     help='tile core side in LR pixels; 0 = whole image; default: chosen from the free memory')
    run.add_argument('--tile_pad', '--tile-pad', type=int, default=32,
                     help='context around each tile, LR pixels, cross-faded over the seams. Default: 32')
    run.add_argument('--max-memory', type=float, default=None,
                     help='GiB the automatic tile size may plan for. Default: 4 on the CPU, 80%% of free on CUDA')
    run.add_argument('--device', default='auto', help='auto (CUDA if available), cpu, cuda or cuda:N')
    run.add_argument('--precision', choices=PRECISION_CHOICES, default=None,
                     help='fp32, bf16 (CUDA, or a CPU with avx512_bf16/AMX) or fp16 (CUDA only), by autocast. '
                          'Default (auto): on CUDA the half type the arch declares, else fp16; fp32 on the CPU')
    run.add_argument('--conv3x3', choices=CONV3X3_METHODS, default=None,
                     help='CPU fp32: how archs that offer it (AdaFormer) run their 3x3 convolution chains: direct '
                          "(the reference numbers bit for bit), auto (the arch's choice within its reference "
                          'tolerances; AdaFormer: its decoder and tail by Winograd F(2x2,3x3), halting decisions '
                          'unchanged) or winograd (everywhere, about 1.9x faster per convolution, other rounding; '
                          'docs/winograd.md). Default: ADASR_CONV3X3, else auto')
    run.add_argument('--fp32', action='store_true', help='alias of --precision fp32')
    run.add_argument('--half', choices=HALF_DTYPES, default=None, help='alias of --precision fp16 / bf16')
    out = p.add_argument_group('output')
    out.add_argument('--ext', default='auto',
                     help='output format: auto (the input\'s if writable, else png), png, jpg, webp, tif, bmp')
    out.add_argument('--suffix', default='out', help='output name: <name>_<suffix>.<ext>; empty for <name>.<ext>')
    out.add_argument('--alpha', choices=('bicubic', 'model'), default='bicubic',
                     help='how the alpha channel is upscaled: MATLAB bicubic (default) or the model')
    out.add_argument('--overwrite', action='store_true', help='replace existing outputs (default: skip them)')
    out.add_argument('--save-halting', action='store_true',
                     help='AdaFormer only: write per-layer confidence and halting-mask overlays and a sparsity '
                          'figure to <output>/halting/<name>/')
    out.add_argument('--eps-h', type=float, default=None,
                     help='AdaFormer only: halting threshold for this run (larger halts more: faster, lower PSNR). '
                          'Default: the network\'s')
    out.add_argument('--halting-zoom', type=int, default=1, help='enlarge the halting overlays by this factor')
    out.add_argument('-q', '--quiet', action='store_true', help='no progress bars or per-image lines')
    return p


# ---------------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------------


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model flags that :func:`build_model` reads (shared with ``adasr-export``)."""
    model = p.add_argument_group('model (--opt, --arch, or only --weights)')
    model.add_argument('--opt', help='BasicSR option file: builds its network_g (and takes its pretrained path)')
    model.add_argument('--arch', help='registered arch name, built with its default hyperparameters')
    model.add_argument('-s', '--scale', type=int, help='upscaling factor for --arch (default: the option file\'s)')
    model.add_argument('--weights', help='checkpoint (.pth); loaded strictly with weights_only=True. Alone (no --opt '
                       'or --arch): any checkpoint spandrel recognises, architecture detected')
    model.add_argument('--param-key', default=None,
                       help='checkpoint entry: params_ema (default, falls back to params) or params')
    model.add_argument('--random-weights', action='store_true',
                       help='run with untrained weights (for memory and speed tests only)')


class UsageError(ValueError):
    """Bad arguments or a model that cannot be built or loaded (reported without a traceback, exit status 2)."""


@dataclass
class Upscaler:
    """A ready network and how to run it."""

    net: object
    scale: int
    multiple: int
    device: object
    precision: object  # adasr.inference.precision.Precision
    in_channels: int
    description: str
    tiling: str = 'supported'

    @property
    def dtype(self):
        """The compute type (what memory planning assumes); weights and inputs stay float32 (autocast)."""
        return self.precision.dtype

    def forward_fn(self):
        import torch

        from adasr.inference.tile import padded_forward

        inner = self.precision.wrap(padded_forward(self.net, self.scale, self.multiple, mode='reflect'))

        def fn(x):
            with torch.no_grad():
                return inner(x.to(self.device, torch.float32, non_blocking=True))

        return fn


def _constructor_scale_key(cls) -> Optional[str]:
    from adasr.cli.options import constructor_keys

    keys = constructor_keys(cls)
    for key in ('upscale', 'scale', 'upscaling_factor'):
        if key in keys:
            return key
    return None


def build_model(args) -> Upscaler:
    from basicsr.archs import build_network
    from basicsr.utils.registry import ARCH_REGISTRY

    from adasr.archs.interface import arch_traits
    from adasr.cli.options import TOP_KEYS, OptionsError, check_keys, check_network_opt, load_yaml
    from adasr.inference.precision import PrecisionError, resolve_precision
    from adasr.utils.checkpoint import CheckpointError, load_weights

    if args.opt and args.arch:
        raise UsageError('give exactly one of --opt (an option file) or --arch (an arch name), or only --weights')
    if args.weights and args.random_weights:
        raise UsageError('--random-weights and --weights contradict each other: give one')
    weights, param_key = args.weights, args.param_key
    if not args.opt and not args.arch:
        if not weights:
            raise UsageError('give --opt (an option file), --arch (an arch name) or --weights (a checkpoint whose '
                             'architecture spandrel detects)')
        net, name = _detected_model(weights, param_key, args.scale)
        scale, weights = net.scale, None  # loaded with the detection
        traits = arch_traits(net)
    elif args.opt:
        try:
            opt = load_yaml(args.opt)
        except OptionsError as e:  # the message names the file (and the line)
            raise UsageError(str(e)) from None
        try:  # a misspelt top-level key (pth: for path:) would otherwise be ignored without a word
            check_keys('the option file', opt, TOP_KEYS)
        except OptionsError as e:
            raise UsageError(f'{args.opt}: {e}') from None
        if not isinstance(opt.get('network_g'), dict):
            raise UsageError(f'{args.opt}: network_g must be a mapping (type: ..., its arguments), got '
                             f'{type(opt.get("network_g")).__name__}')
        try:
            net_opt = dict(opt['network_g'])
            check_network_opt(net_opt, 'network_g')
        except OptionsError as e:
            raise UsageError(f'{args.opt}: {e}') from None
        if opt.get('scale') is not None and net_opt.get('upscale') is not None \
                and opt['scale'] != net_opt['upscale']:
            raise UsageError(f'{args.opt}: scale: {opt["scale"]} but network_g.upscale: {net_opt["upscale"]}; '
                             'they must agree')
        scale = opt.get('scale') or net_opt.get('upscale')
        if args.scale is not None and scale is not None and args.scale != scale:
            raise UsageError(f'--scale {args.scale} but {args.opt} is a x{scale} model')
        scale = scale or args.scale
        if weights is None and not args.random_weights:
            path_opt = opt.get('path') or {}
            weights = path_opt.get('pretrain_network_g')
            param_key = param_key or path_opt.get('param_key_g')
        name = f'{net_opt["type"]} from {args.opt}'
        try:
            net = build_network(net_opt)
        except Exception as e:  # noqa: BLE001 - reported with the option file's name
            raise UsageError(f'{args.opt}: cannot build network_g: {e}') from None
        traits = arch_traits(net, net_opt=net_opt)
    else:
        if args.arch not in ARCH_REGISTRY:
            import difflib

            close = difflib.get_close_matches(args.arch, list(ARCH_REGISTRY.keys()), n=1)
            raise UsageError(f"--arch '{args.arch}' is not a registered arch"
                             + (f" (did you mean '{close[0]}'?)" if close else ''))
        if args.scale is None:
            raise UsageError('--arch needs --scale')
        cls = ARCH_REGISTRY.get(args.arch)
        key = _constructor_scale_key(cls)
        kwargs = {key: args.scale} if key else {}
        try:
            net = cls(**kwargs)
        except Exception as e:  # noqa: BLE001 - any constructor failure is a usage problem here
            raise UsageError(f'cannot build {args.arch} with {kwargs} and its defaults: {e}; use --opt') from None
        scale, name = args.scale, args.arch
        traits = arch_traits(net)
    measured = _measured_scale(net, traits)
    if measured is not None:
        if scale is not None and scale != measured:
            raise UsageError(f'{name}: the network built is x{measured}, but x{scale} was given (scale / --scale); '
                             'set its scale argument (network_g.upscale) to match')
        scale = measured
    if not isinstance(scale, int) or scale < 1:
        raise UsageError(f'the model has no valid scale ({scale!r}); give --scale')

    has_params = any(True for _ in net.parameters()) and not traits.pretrained
    if weights:
        try:
            load_weights(net, weights, param_key or 'params_ema', strict=True)
        except CheckpointError as e:
            raise UsageError(str(e)) from None
        name += f', weights {weights}'
    elif has_params and not args.random_weights:
        raise UsageError(f'{name} has learnable parameters: give --weights (or --random-weights for a test run)')
    elif has_params:
        name += ', random weights'

    device = _pick_device(args.device)
    try:
        precision = resolve_precision(_precision_arg(args), device, preferred_half=traits.preferred_half)
    except PrecisionError as e:
        raise UsageError(f'--precision: {e}') from None
    if precision.name != 'fp32' and precision.dtype not in traits.half_dtypes:
        raise UsageError(f'--precision {precision.name}: this model does not run in it (half types: '
                         f'{", ".join(str(t) for t in traits.half_dtypes) or "none"}); use fp32')
    net.eval()
    net.to(device=device)
    in_channels = _in_channels(net)
    return Upscaler(net, scale, traits.window, device, precision, in_channels,
                    f'{name}, x{scale}, {device}, {precision.name}', traits.tiling)


def _measured_scale(net, traits) -> Optional[int]:
    """The scale of the network as built, measured: the size of its output for one small input (a side of the
    arch's window, at least its minimum), so that an option file's ``scale`` can never disagree with it (a
    network_g without its scale argument takes the constructor's default). None when the probe does not run."""
    import torch

    side = traits.window * -(-max(traits.min_window or 1, 8) // traits.window)
    try:
        with torch.no_grad():
            y = net.eval()(torch.zeros(1, _in_channels(net), side, side))
    except Exception:  # noqa: BLE001 - the declared scale stands; the real run reports a network that fails
        return None
    h, w = y.shape[-2:]
    return h // side if h == w and h % side == 0 and h >= side else None


def _detected_model(weights: str, param_key: Optional[str], scale: Optional[int]):
    """The network of a checkpoint whose architecture spandrel detects (the registered arch ``Spandrel``, built as a
    YAML ``type: Spandrel`` would be), and its description."""
    from basicsr.utils.registry import ARCH_REGISTRY

    from adasr.utils.checkpoint import CheckpointError

    try:
        net = ARCH_REGISTRY.get('Spandrel')(path=weights, scale=scale, param_key=param_key)
    except (CheckpointError, ValueError) as e:
        raise UsageError(f'--weights {weights}: {e}') from None
    return net, f'detected by spandrel in {weights}: {net.describe()}'


def _precision_arg(args) -> str:
    """The one precision asked for by ``--precision`` or its aliases ``--fp32`` / ``--half``."""
    given = {v for v in (args.precision, 'fp32' if args.fp32 else None, args.half) if v is not None}
    if len(given) > 1:
        raise UsageError(f'conflicting precisions {sorted(given)}: give one --precision (--fp32 and --half are its '
                         'aliases)')
    return given.pop() if given else 'auto'


def _pick_device(name: str):
    import torch

    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f'--device {name}: {e}') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError('--device cuda but CUDA is not available')
    if device.type == 'mps' and not torch.backends.mps.is_available():
        raise UsageError('--device mps but MPS (Apple GPUs) is not available')
    if device.type not in ('cpu', 'cuda', 'mps'):
        raise UsageError(f'--device {name}: adasr-upscale runs on cpu, cuda or mps')
    return device


def _in_channels(net) -> int:
    from torch import nn

    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return 3


# ---------------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------------


def list_inputs(path: str) -> List[str]:
    from adasr.utils.image_io import is_image_file

    if osp.isdir(path):
        found = sorted(osp.join(path, f) for f in os.listdir(path)
                       if is_image_file(f) and osp.isfile(osp.join(path, f)) and not f.startswith('.'))
        if not found:
            raise UsageError(f'no images in {path} (looked for files with an image extension)')
        return found
    if osp.exists(path):
        return [path]
    raise UsageError(f'input not found: {path}')


#: formats that hold one kind of image only (ppm colour, pgm gray): written for inputs of that format (--ext auto)
SAME_KIND_ONLY = {'ppm', 'pgm'}


def output_ext(input_path: str, ext: str) -> str:
    from adasr.utils.image_io import WRITABLE

    if ext != 'auto':
        ext = ext.lower().lstrip('.')
        chosen = sorted(set(WRITABLE) - SAME_KIND_ONLY)
        if ext not in chosen:
            raise UsageError(f'--ext {ext} is not supported; choose one of auto, {", ".join(chosen)}'
                             + (f' ({ext} is written only for {ext} inputs, with --ext auto: it holds only '
                                f'{"colour" if ext == "ppm" else "gray"} images)' if ext in SAME_KIND_ONLY else ''))
        return ext
    in_ext = osp.splitext(input_path)[1].lower().lstrip('.')
    return in_ext if in_ext in WRITABLE else 'png'


def output_path(input_path: str, out_dir: str, ext: str, suffix: str) -> str:
    stem = osp.splitext(osp.basename(input_path))[0]
    return osp.join(out_dir, f'{stem}_{suffix}.{ext}' if suffix else f'{stem}.{ext}')


def destination(input_path: str, args) -> str:
    """The output file of ``input_path`` under the CLI's ``-o``, ``--ext`` and ``--suffix``."""
    return output_path(input_path, args.output, output_ext(input_path, args.ext), args.suffix)


def without_own_outputs(paths: Sequence[str], args) -> List[str]:
    """``paths`` without the files that are another input's output (``-o`` into the input folder: a re-run would
    otherwise take the first run's ``a_out.png`` as an input, whose output ``a_out_out.png`` ... )."""
    outputs = {}
    for p in paths:
        outputs.setdefault(osp.abspath(destination(p, args)), p)
    return [p for p in paths if outputs.get(osp.abspath(p), p) == p]


def check_output_names(paths: Sequence[str], args) -> None:
    """Every input gets an output of its own: no two inputs map to one output (or, with ``--save-halting``, to one
    halting folder), and no output is an input; checked before the model is built (UsageError naming them)."""
    if args.suffix and (os.sep in args.suffix or (os.altsep and os.altsep in args.suffix)):
        raise UsageError(f'--suffix {args.suffix!r} must be a plain name part (no path separator)')
    inputs = {osp.abspath(p): p for p in paths}
    seen: Dict[str, str] = {}
    folders: Dict[str, str] = {}
    for path in paths:
        dst = osp.abspath(destination(path, args))
        if dst in seen:
            raise UsageError(f'{seen[dst]} and {path} would both be written to {dst}: give them different names, '
                             'or upscale them into different folders')
        other = inputs.get(dst)
        if other is not None:
            raise UsageError(f'the output of {path} would replace the input {other} (use another -o or --suffix)')
        seen[dst] = path
        if args.save_halting:
            stem = osp.splitext(osp.basename(path))[0]
            if stem in folders:
                raise UsageError(f'{folders[stem]} and {path} would share the halting folder '
                                 f'{osp.join(args.output, "halting", stem)}: give them different names')
            folders[stem] = path


@dataclass
class Report:
    written: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    failed: List[Tuple[str, str]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @classmethod
    def merged(cls, reports: Sequence['Report']) -> 'Report':
        """One report listing the entries of all, in order."""
        return cls(*(sum((getattr(r, f.name) for r in reports), []) for f in fields(cls)))


def _to_tensor(arr):
    import numpy as np
    import torch

    if arr.ndim == 2:
        return torch.from_numpy(np.ascontiguousarray(arr))[None, None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))[None]


def _run_model(up: Upscaler, x, args, *, desc: str, on_tile=None, tile: Optional[int] = None):
    """(1, C, H, W) float32 CPU -> (1, C', sH, sW) float32 CPU, tiled."""
    import torch

    from adasr.inference.memory import auto_tile_size
    from adasr.inference.tile import tiled_forward

    fn = up.forward_fn()
    h, w = x.shape[-2:]
    why = None
    if up.tiling == 'internal':  # the model tiles itself (spandrel's ModelTiling.INTERNAL): never tile it
        tile, why = 0, 'whole image: the model tiles internally'
    elif tile is None:
        max_mem = None if args.max_memory is None else args.max_memory * 1024 ** 3
        tile, why = auto_tile_size(up.net, fn, h, w, up.scale, in_channels=up.in_channels, device=up.device,
                                   dtype=up.dtype, tile_pad=args.tile_pad, multiple=up.multiple, max_memory=max_mem)
    if tile and up.tiling == 'discouraged':
        why = (why or f'tile {tile}, pad {args.tile_pad}') + '; tiling is discouraged for this arch (output ' \
            'differs slightly from the whole image)'
    y = tiled_forward(fn, x, up.scale, tile, args.tile_pad, up.multiple, out_device=torch.device('cpu'),
                      progress=not args.quiet, desc=desc, on_tile=on_tile)
    return y, tile, why


def upscale_image(up: Upscaler, img, args, name: str, on_tile=None):
    """Upscale a :class:`~adasr.utils.image_io.LoadedImage`; returns (LoadedImage, tile used, tile explanation)."""
    import numpy as np
    import torch

    from adasr.utils.checks import check_finite
    from adasr.utils.image_io import LoadedImage
    from adasr.utils.matlab_resize import imresize

    color = img.color
    if img.is_gray and up.in_channels == 3:
        color = np.repeat(color[..., None], 3, axis=2)
    elif not img.is_gray and up.in_channels == 1:
        raise ValueError(f'the model takes 1 channel but {name} is a colour image')
    x = _to_tensor(color)
    y, tile, why = _run_model(up, x, args, desc=name, on_tile=on_tile, tile=args.tile)
    check_finite(f'the model output for {name}', y)
    y = y[0].clamp_(0, 1)
    if img.is_gray and y.shape[0] == 3:  # back to one channel (BT.601 luma, as OpenCV's BGR2GRAY)
        y = y[0] * 0.299 + y[1] * 0.587 + y[2] * 0.114
        out_color = y.numpy()
    elif y.shape[0] == 1:
        out_color = y[0].numpy()
    else:
        out_color = y.permute(1, 2, 0).numpy()
    alpha = None
    if img.alpha is not None:
        a = torch.from_numpy(img.alpha)[None, None]
        if args.alpha == 'model':
            a3 = a.expand(1, up.in_channels, *a.shape[-2:]).contiguous()
            alpha = _run_model(up, a3, args, desc=name + ' (alpha)', tile=tile)[0][0].mean(0)
            check_finite(f'the model output for the alpha channel of {name}', alpha)
        else:
            alpha = imresize(a.double(), up.scale)[0, 0].float()
        alpha = alpha.clamp_(0, 1).numpy()
    return LoadedImage(np.ascontiguousarray(out_color), alpha, img.dtype), tile, why


def process(paths: Sequence[str], up: Upscaler, args, log) -> Report:
    from tqdm import tqdm

    from adasr.inference.halting import HaltingCollector, save_halting_pictures
    from adasr.utils.image_io import MAX_SIDE, WRITABLE, ImageReadError, read_image, to_stored, write_image

    report = Report()
    bar = tqdm(paths, desc='images', unit='img', disable=args.quiet or len(paths) < 2, dynamic_ncols=True)
    for path in bar:
        name = osp.basename(path)
        ext = output_ext(path, args.ext)
        dst = destination(path, args)
        halting_dir = osp.join(args.output, 'halting', osp.splitext(name)[0])
        # a re-run resumes: an image is done when its output is there, and its halting pictures where asked for
        # (halting.json is written last: a run stopped between the image and its pictures redoes the image)
        if osp.isdir(dst):
            report.failed.append((path, f'the output path {dst} is a folder'))
            log(f'FAILED {name}: the output path {dst} is a folder', error=True)
            continue
        # (outputs are written atomically: an empty file there is not one of ours, and is redone)
        if osp.isfile(dst) and osp.getsize(dst) > 0 and not args.overwrite and (
                not args.save_halting or osp.exists(osp.join(halting_dir, 'halting.json'))):
            report.skipped.append(dst)
            log(f'skip {name}: {dst} exists')
            continue
        start = time.perf_counter()
        try:
            img = read_image(path)
            if img.clipped:
                report.notes.append(f'{name}: {img.clipped} float sample(s) outside 0..1 clipped (values above 1 '
                                    'are lost: adasr upscales images of 0..1)')
            limit, side = MAX_SIDE.get(ext), max(img.size) * up.scale
            if limit is not None and side > limit:  # found before the model runs, not when the result is encoded
                raise ImageReadError(f'{path}: the x{up.scale} output would be {side} pixels on its long side; '
                                     f'.{ext} holds at most {limit} (choose another format: --ext png)')
            collector = HaltingCollector(up.net, *img.size) if args.save_halting else None
            out, tile, why = upscale_image(up, img, args, name, on_tile=collector)
            dtype = out.dtype
            if dtype == 'uint16' and not WRITABLE[ext]['uint16']:
                dtype = 'uint8'
                report.notes.append(f'{name}: .{ext} cannot hold 16 bits; written as 8-bit')
            if out.alpha is not None and not WRITABLE[ext]['alpha']:
                out.alpha = None
                report.notes.append(f'{name}: .{ext} cannot hold alpha; alpha dropped')
            write_image(dst, to_stored(out, dtype))
            if collector is not None:
                save_halting_pictures(halting_dir, img.color, collector, title=name, zoom=args.halting_zoom)
        except ImageReadError as e:
            reason = str(e).removeprefix(f'{path}: ')  # the summary names the path itself
            report.failed.append((path, reason))
            log(f'FAILED {name}: {reason}', error=True)
            continue
        except Exception as e:  # noqa: BLE001 - a model or write failure fails this image only (Ctrl-C still stops)
            report.failed.append((path, f'{type(e).__name__}: {e}'))
            log(f'FAILED {name}: {type(e).__name__}: {e}', error=True)
            continue
        report.written.append(dst)
        h, w = img.size
        kind = ('gray' if img.is_gray else 'RGB') + ('+alpha' if img.alpha is not None else '') + f' {img.dtype}'
        log(f'{name} ({w}x{h} {kind}) -> {dst} ({time.perf_counter() - start:.1f} s, '
            + (why or (f'tile {tile}, pad {args.tile_pad}' if tile else 'whole image')) + ')')
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns (and, as a console script, exits with) the status.

    Under ``torchrun`` each process upscales every ``WORLD_SIZE``-th input from its ``RANK`` (on its own GPU,
    ``LOCAL_RANK``, where there are GPUs), and process 0 prints one summary for all; every process returns the
    status of the whole run.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, value, low in (('--tile', args.tile, 0), ('--tile_pad', args.tile_pad, 0),
                             ('--halting-zoom', args.halting_zoom, 1)):
        if value is not None and value < low:
            parser.error(f'{name} must be >= {low}, got {value}')
    if args.max_memory is not None and not 0 < args.max_memory < float('inf'):
        parser.error(f'--max-memory must be a positive number of GiB, got {args.max_memory}')
    from adasr.utils import distributed, malloc

    try:  # freed feature maps kept for the next image and tile (no page faults each forward): docs/upscale.md
        malloc.tune()
        check_environment()  # every ADASR_* setting, before the model is built
    except ValueError as e:
        parser.error(str(e))
    if args.conv3x3 is not None:
        set_option('conv3x3', args.conv3x3)
    if not distributed.launched_by_torchrun():
        try:
            return _upscale(args, rank=0, world_size=1)
        except KeyboardInterrupt:  # the images written are whole (atomic writes); a re-run skips them
            print(f'adasr-upscale: interrupted; the images written to {args.output} are complete: run the same '
                  'command again to go on (finished images are skipped)', file=sys.stderr)
            return 130
    # the summary waits for the slowest share; torchrun stops every process when one fails
    rank, world_size = distributed.init_from_env(timeout=DIST_TIMEOUT)
    try:
        return _upscale(args, rank, world_size)
    finally:
        distributed.destroy()


def _upscale(args, rank: int, world_size: int) -> int:
    """Upscale this process's share of the inputs; process 0 prints the summary of all shares."""
    from adasr.utils.distributed import gather_to_all, shard

    def log(msg: str, error: bool = False) -> None:
        if error or not args.quiet:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr if error else sys.stdout)

    from adasr.utils.files import OutputFolderError, prepare_output_folder, remove_orphan_temporaries
    from adasr.utils.image_io import is_image_file

    try:
        paths = list_inputs(args.input)
        if args.ext != 'auto':
            output_ext('x.png', args.ext)  # validate early
        kept = without_own_outputs(paths, args)
        if len(kept) < len(paths):
            log(f'note: {len(paths) - len(kept)} file(s) of the input folder are outputs of other inputs (a run into '
                'the input folder) and are not upscaled again')
        paths = kept
        check_output_names(paths, args)
        if is_image_file(args.output) and not osp.isdir(args.output):
            log(f'note: -o {args.output} is the output folder (it is made as a folder, and the images go into it)')
        try:  # before the model is built: a folder that cannot hold the outputs stops the run at once
            orphans = prepare_output_folder(args.output)
        except OutputFolderError as e:
            raise UsageError(str(e)) from None
        orphans += remove_orphan_temporaries(osp.join(args.output, 'halting'), recursive=True)  # --save-halting
        if orphans:
            log(f'removed {len(orphans)} temporary file(s) left by an interrupted run in {args.output}')
        import adasr  # noqa: F401  (shim + registration)

        up = build_model(args)
        if args.save_halting or args.eps_h is not None:
            from adasr.archs.interface import is_adaptive, set_complete_halting_maps, set_halting_threshold

            if not is_adaptive(up.net):
                flag = '--save-halting' if args.save_halting else '--eps-h'
                raise UsageError(f'{flag} needs an AdaFormer model (an adaptive arch); '
                                 f'{type(up.net).__name__} does not halt')
            if args.eps_h is not None:
                try:
                    set_halting_threshold(up.net, args.eps_h)
                except ValueError as e:
                    raise UsageError(f'--eps-h: {e}') from None
                up.description += f', eps_h {args.eps_h}'
            if args.save_halting:  # pictures show the confidence of every token (the same SR and decisions)
                set_complete_halting_maps(up.net)
    except UsageError as e:
        print(f'adasr-upscale: error: {e}', file=sys.stderr)  # every process: the problem may be one node's
        return 2
    if rank == 0:
        log(f'model: {up.description}; {len(paths)} image(s) -> {args.output}'
            + (f', shared by {world_size} processes' if world_size > 1 else ''))
    reports = gather_to_all(process(shard(paths, rank, world_size), up, args, log))
    report = Report.merged(reports)
    if rank == 0:
        print(f'done: {len(report.written)} written, {len(report.skipped)} skipped (output exists), '
              f'{len(report.failed)} failed' + (f' -> {args.output}' if report.written else ''))
        for note in report.notes:
            print(f'note: {note}')
        for path, reason in report.failed:
            print(f'failed: {path}: {reason}', file=sys.stderr)
    return 1 if report.failed else 0


if __name__ == '__main__':
    sys.exit(main())
