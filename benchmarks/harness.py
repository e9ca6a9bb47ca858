"""The side-by-side benchmark behind ``scripts/benchmark.py``: rows are option files, each measured in a fresh
process (parameters, MACs, latency, peak memory, PSNR/SSIM on Y, halting sparsity), written as Markdown, CSV, JSON
and a latency-vs-PSNR plot.

Adding a row is one line in :data:`DEFAULT_ROWS` (or ``--opt LABEL=path.yml`` on the command line): the option
file's ``network_g`` builds the network and its ``path.pretrain_network_g`` (if the file exists) gives the weights.
"""
import contextlib
import csv
import datetime
import json
import math
import os
import os.path as osp
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

#: label -> option file (relative to the repository root). Rows whose file is absent are reported as skipped.
DEFAULT_ROWS: Dict[str, str] = {
    'Bicubic': 'options/test/test_Bicubic_x4.yml',
    'SwinIR-light': 'options/test/test_SwinIR_light_x4.yml',
    'HAT-S': 'options/test/test_HAT-S_x4.yml',
    'ATD-light': 'options/test/test_ATD_light_x4.yml',
    'AdaFormer': 'options/test/test_AdaFormer_x4.yml',
    'PFT-light': 'options/test/test_PFT_light_x4.yml',
}


class BenchmarkError(ValueError):
    """A row, data set or setting that cannot be benchmarked as given."""


@dataclass
class RowSpec:
    """One model of the table."""

    label: str
    source: str  # the option file
    network_g: Dict[str, Any]
    scale: int
    checkpoint: Optional[str] = None  # None: random init (or parameter-free)
    param_key: str = 'params'
    strict: bool = True
    note: str = ''
    eps_h: Optional[float] = None  # the option file's val.eps_h (AdaFormer's test-time halting threshold)
    precision: str = 'fp32'  # the option file's val.precision, or the --precision the row was expanded to


@dataclass
class DataSpec:
    """One test set: LR/HR pairs matched by file stem."""

    name: str
    hr_dir: str
    lr_dir: str
    pairs: List[Tuple[str, str]] = field(default_factory=list)  # (lr path, hr path)


# ----------------------------------------------------------------------------------------------------- resolution


def resolve_row(label: str, option_file: str, weights: Optional[str] = None) -> RowSpec:
    """Read ``option_file`` into a :class:`RowSpec`. ``weights`` overrides ``path.pretrain_network_g``."""
    from adasr.cli.options import check_network_opt, load_yaml

    opt = load_yaml(option_file)
    if 'network_g' not in opt:
        raise BenchmarkError(f'{option_file} has no network_g')
    net_opt = dict(opt['network_g'])
    check_network_opt(net_opt)
    scale = int(opt.get('scale') or net_opt.get('upscale') or 1)
    path = dict(opt.get('path') or {})
    ckpt = weights if weights is not None else path.get('pretrain_network_g')
    note = ''
    if weights is not None and not osp.isfile(weights):
        raise BenchmarkError(f'weights for {label} not found: {weights}')
    if ckpt and not osp.isfile(ckpt):
        note = f'checkpoint {ckpt} not found: random init'
        ckpt = None
    val = opt.get('val') or {}
    return RowSpec(label=label, source=option_file, network_g=net_opt, scale=scale, checkpoint=ckpt,
                   param_key=path.get('param_key_g') or 'params', strict=bool(path.get('strict_load_g', True)),
                   note=note, eps_h=val.get('eps_h'), precision=val.get('precision', 'fp32'))


def with_precisions(rows: List[RowSpec], precisions: Optional[List[str]]) -> List[RowSpec]:
    """One row per model and precision (``None``: each row's own); labels get `` bf16`` / `` fp16`` appended."""
    from dataclasses import replace

    from adasr.inference.precision import parse_precision

    if not precisions:
        return rows
    for p in precisions:
        parse_precision(p)
    return [replace(r, label=r.label if p == 'fp32' else f'{r.label} {p}', precision=p) for r in rows
            for p in precisions]


def find_dataset(path: str, scale: int, name: Optional[str] = None) -> DataSpec:
    """A test set folder in one of the layouts adasr writes: ``GTmod{s}``/``LRbicx{s}`` (benchmark sets),
    ``HR``/``LR_bicubic/X{s}`` (the demo photos) or ``HR/X{s}``/``LR/X{s}`` (Test2K/4K/8K)."""
    layouts = [(f'GTmod{scale}', f'LRbicx{scale}'), ('HR', osp.join('LR_bicubic', f'X{scale}')),
               (osp.join('HR', f'X{scale}'), osp.join('LR', f'X{scale}'))]
    for hr_rel, lr_rel in layouts:
        hr_dir, lr_dir = osp.join(path, hr_rel), osp.join(path, lr_rel)
        if osp.isdir(lr_dir) and osp.isdir(hr_dir):
            spec = DataSpec(name=name or dataset_name(path), hr_dir=hr_dir, lr_dir=lr_dir)
            spec.pairs = match_pairs(hr_dir, lr_dir, scale)
            return spec
    raise BenchmarkError(f'{path} has no x{scale} test pairs: expected GTmod{scale}+LRbicx{scale}, '
                         f'HR+LR_bicubic/X{scale} or HR/X{scale}+LR/X{scale}')


def dataset_name(path: str) -> str:
    """``datasets/benchmark/Set5`` -> ``Set5``; generic leaf names keep their parent: ``datasets/demo/val`` ->
    ``demo_val``."""
    parts = osp.normpath(osp.abspath(path)).split(os.sep)
    if parts[-1].lower() in ('val', 'train', 'test', 'hr', 'lr') and len(parts) > 1:
        return f'{parts[-2]}_{parts[-1]}'
    return parts[-1]


def match_pairs(hr_dir: str, lr_dir: str, scale: int) -> List[Tuple[str, str]]:
    """(LR, HR) paths matched by stem; LR stems may carry DIV2K's ``x{scale}`` suffix. Each HR must be the LR's
    x``scale`` (up to ``scale - 1`` pixels more a side: cropped as BasicSR does), checked from the file headers."""
    from adasr.data.prepare import list_images
    from adasr.utils.checks import scale_mismatch
    from adasr.utils.image_io import ImageReadError, image_size

    hr = {osp.splitext(n)[0]: osp.join(hr_dir, n) for n in list_images(hr_dir)}
    pairs = []
    for n in list_images(lr_dir):
        stem = osp.splitext(n)[0]
        key = stem if stem in hr else stem[:-len(f'x{scale}')] if stem.endswith(f'x{scale}') else stem
        if key not in hr:
            raise BenchmarkError(f'no HR image for {osp.join(lr_dir, n)} in {hr_dir}')
        pairs.append((osp.join(lr_dir, n), hr[key]))
    if not pairs:
        raise BenchmarkError(f'no images in {lr_dir}')
    for lr_path, hr_path in pairs:  # from the headers, before any row runs: an LR of another scale is named
        try:
            why = scale_mismatch(image_size(lr_path), image_size(hr_path), scale)
        except ImageReadError as e:
            raise BenchmarkError(str(e)) from None
        if why:
            raise BenchmarkError(f'{hr_path} / {lr_path}: {why}')
    return pairs


def parse_size(text: str) -> Tuple[int, int]:
    """'320x180' -> (h=180, w=320): width x height, as image sizes are written."""
    try:
        w, h = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise BenchmarkError(f"size must be WIDTHxHEIGHT (e.g. 320x180), got {text!r}") from None
    if w < 1 or h < 1:
        raise BenchmarkError(f'size must be positive, got {text!r}')
    return h, w


# ----------------------------------------------------------------------------------------------------- measuring


def build_net(spec: Dict[str, Any], device):
    """The row's network on ``device`` in eval mode, with its weights (strict by default) if it has any."""
    import torch
    from basicsr.archs import build_network

    from adasr.archs.interface import is_adaptive, set_halting_threshold
    from adasr.utils.checkpoint import load_weights

    net = build_network(dict(spec['network_g']))
    if spec.get('checkpoint'):
        load_weights(net, spec['checkpoint'], param_key=spec.get('param_key', 'params'),
                     strict=spec.get('strict', True))
    if spec.get('eps_h') is not None:
        if not is_adaptive(net):
            raise BenchmarkError(f"val.eps_h is set but {type(net).__name__} has no eps_h (it is not adaptive)")
        set_halting_threshold(net, spec['eps_h'])
    net = net.to(torch.device(device)).eval()
    return net


def perturb_weights(net, std: float = 0.02) -> None:
    """Random weights for untrained rows: add ``std`` x N(0, 1) from torch's global generator to every parameter, so
    that biases are not zero (the authors' oracle recipe). Seed with ``torch.manual_seed(seed)`` before building the
    network: the same seed then gives the same weights in every process and script."""
    import torch

    with torch.no_grad():
        for p in net.parameters():
            p.add_(std * torch.randn_like(p))


def read_rgb(path: str):
    """(1, 3, H, W) float tensor in [0, 1], RGB (:func:`adasr.utils.image_io.read_rgb`: grayscale repeated and EXIF
    orientation applied, as in BasicSR)."""
    import torch

    from adasr.utils.image_io import ImageReadError
    from adasr.utils.image_io import read_rgb as read_rgb_array

    try:
        img = read_rgb_array(path)
    except ImageReadError as e:
        raise BenchmarkError(str(e)) from None
    return torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0)


def latency_input(lr_path: str, h: int, w: int):
    """An h x w crop of a real LR image (centre), mirrored if the image is smaller: halting models see content."""
    import numpy as np
    import torch

    x = read_rgb(lr_path)[0].permute(1, 2, 0).numpy()
    ih, iw = x.shape[:2]
    if ih < h or iw < w:
        x = np.pad(x, ((0, max(0, h - ih)), (0, max(0, w - iw)), (0, 0)), mode='symmetric')
        ih, iw = x.shape[:2]
    top, left = (ih - h) // 2, (iw - w) // 2
    x = np.ascontiguousarray(x[top:top + h, left:left + w])
    return torch.from_numpy(x).permute(2, 0, 1).unsqueeze(0)


def _sparse_flop_formulas() -> Dict:
    """FlopCounterMode formulas (2 flops per multiply-add) for the products of PFT's CPU path that torch's counter
    does not know: ``sparse_sampled_addmm`` (one d-long dot product per stored entry), embedding-bag sums with
    per-sample weights (one weighted d-long row per index), the CPU flash attention of its dense layers
    (``q @ k^T`` and ``attn @ v``: n*m*(d + dv) per head) and the oneDNN linears of CPU inference
    (``adasr.ops.cpu_inference.linear``: rows x in x out)."""
    import torch

    aten = torch.ops.aten

    def sampled_addmm(inp, mat1, mat2, *args, out_val=None, **kwargs):
        return 2 * inp.values().numel() * mat1.shape[-1]

    def embedding_bag(weight, indices, *args, out_val=None, **kwargs):
        return 2 * indices.numel() * weight.shape[-1]

    def onednn_linear(x, w, *args, out_shape=None, **kwargs):  # x (..., in), w (out, in): one product per weight
        return 2 * math.prod(x[:-1]) * w[0] * w[1]

    def cpu_flash_attention(q, k, v, *args, out_shape=None, **kwargs):  # shapes (b, h, n, d), (b, h, m, d), ...
        return 2 * q[0] * q[1] * q[2] * k[2] * (q[3] + v[3])

    formulas = {aten.sparse_sampled_addmm: sampled_addmm, aten._embedding_bag: embedding_bag,
                aten._embedding_bag_forward_only: embedding_bag}
    for fn in formulas.values():
        fn._get_raw = True  # FlopCounterMode passes the tensors themselves (nnz is not in a shape)
    formulas[aten._scaled_dot_product_flash_attention_for_cpu] = cpu_flash_attention  # given shapes
    if hasattr(torch.ops.mkldnn, '_linear_pointwise'):  # adasr.ops.cpu_inference's oneDNN linears
        formulas[torch.ops.mkldnn._linear_pointwise] = onednn_linear
    return formulas


def _sequential_attention() -> contextlib.AbstractContextManager:
    """Run adasr's tiled attention in the calling thread (``adasr.ops.config`` option ``threads=0``) and PFT's layers
    by PyTorch's operators (``pft_kernel='torch'``: the compiled kernels do the same products, invisibly to the
    counter), where the FLOP counter sees every operation, for the duration."""
    try:
        from adasr.ops import config
    except ImportError:  # a checkout without adasr.ops
        return contextlib.nullcontext()
    return config.options(threads=0, pft_kernel='torch')


def count_macs(net, x, window_size: int = 1, scale: int = 1) -> Tuple[float, str, Dict[str, float]]:
    """Multiply-accumulates of one forward on ``x`` as the harness runs it (padded to ``window_size`` for archs
    that do not pad themselves).

    The arch's analytic ``flops(h, w)`` when it has one ("analytic"; call it after a forward on ``x`` so that adaptive
    archs count the work of that input); otherwise PyTorch's ``FlopCounterMode`` ("torch"), which sees every aten
    matrix product that runs (convolution, mm/addmm, bmm/baddbmm - einsum and matmul end up there - and fused
    attention) and counts 2 flops per multiply-add: halved here. It runs inside the ops, so PFT's sparse products are
    charged for the kernel actually chosen (n*K*d for the gather, sampled-product and embedding-bag forms, or n*m*d
    for the dense BLAS form); they are counted with adasr's PyTorch backend (Triton kernels are invisible to the
    counter), with its block pool off (the counter sees only the calling thread), and with formulas for the two
    products the stock counter does not know (:func:`_sparse_flop_formulas`). Not counted: normalisation, softmax,
    activations, element-wise arithmetic, gathers and sorts.

    fvcore's ``FlopCountAnalysis`` gives the same products (plus ~1% for LayerNorm) but keeps every intermediate
    tensor of its trace alive: 7.7 GiB against 0.8 GiB for a HAT-S forward on a 160x90 input.

    Returns (MACs, method, MACs per counted op).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from adasr.archs.interface import count_flops
    from adasr.inference.tile import padded_forward

    analytic = count_flops(net, x.shape[-2], x.shape[-1])
    if analytic is not None:
        return float(analytic), 'analytic', {}
    try:
        from adasr.ops import backend as sparse_backend

        ops_ctx = sparse_backend('torch')
    except ImportError:  # a checkout without adasr.ops
        ops_ctx = contextlib.nullcontext()
    counter = FlopCounterMode(display=False, custom_mapping=_sparse_flop_formulas())
    with torch.no_grad(), ops_ctx, _sequential_attention(), counter:
        padded_forward(net, scale, window_size)(x)
    per_op = {str(op): flops / 2 for op, flops in counter.get_flop_counts().get('Global', {}).items()}
    return counter.get_total_flops() / 2, 'torch', per_op


def _sync(device) -> None:
    import torch

    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


def evaluate(net, data: DataSpec, scale: int, window_size: int, device, max_images: Optional[int] = None,
             precision: str = 'fp32') -> Dict:
    """PSNR/SSIM on Y (border = scale), as ``adasr/test.py`` computes them (in ``precision``), plus per-image
    halting sparsity."""
    import torch
    from basicsr.metrics import calculate_psnr, calculate_ssim
    from basicsr.utils import tensor2img

    from adasr.archs.interface import halting_record, is_adaptive
    from adasr.inference.precision import resolve_precision
    from adasr.inference.tile import padded_forward

    forward = resolve_precision(precision, device).wrap(padded_forward(net, scale, window_size))
    psnrs, ssims, sparsity = [], [], []
    for lr_path, hr_path in data.pairs[:max_images]:
        lq = read_rgb(lr_path).to(device)
        gt = read_rgb(hr_path)
        gt = gt[..., :lq.shape[-2] * scale, :lq.shape[-1] * scale]  # as BasicSR's paired dataset crops
        with torch.no_grad():
            sr = forward(lq)
        sr_img, gt_img = tensor2img(sr.cpu()), tensor2img(gt)
        psnrs.append(calculate_psnr(sr_img, gt_img, crop_border=scale, test_y_channel=True))
        ssims.append(calculate_ssim(sr_img, gt_img, crop_border=scale, test_y_channel=True))
        halting = halting_record(net) if is_adaptive(net) else None
        if halting is not None and halting.sparsity:
            sparsity.append({k: list(v) for k, v in halting.sparsity.items()})
    out = {'psnr': sum(psnrs) / len(psnrs), 'ssim': sum(ssims) / len(ssims), 'images': len(psnrs)}
    if sparsity:
        out['sparsity'] = {k: [sum(s[k][i] for s in sparsity) / len(sparsity) for i in range(len(sparsity[0][k]))]
                           for k in sparsity[0]}
    return out


def measure_row(spec: Dict[str, Any], datasets: List[Dict[str, Any]], size: Tuple[int, int], repeats: int,
                warmup: int, device: str, threads: Optional[int], max_images: Optional[int]) -> Dict[str, Any]:
    """Everything the table says about one row. Module-level so that it runs in a fresh process
    (:func:`benchmarks.profiling.run_isolated`): the peak memory is then that row's alone."""
    import torch

    import adasr  # noqa: F401  (registration in the fresh process)
    from adasr.archs.interface import arch_traits, halting_record
    from adasr.inference.precision import resolve_precision
    from adasr.inference.tile import padded_forward
    from benchmarks.profiling import timed_no_grad

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    net = build_net(spec, dev)
    h, w = size
    x = latency_input(datasets[0]['pairs'][0][0], h, w).to(dev)
    traits = arch_traits(net, net_opt=spec['network_g'])
    window = traits.window  # as the test pipeline pads
    scale = int(spec['scale'])

    precision = spec.get('precision', 'fp32')
    forward = resolve_precision(precision, dev).wrap(padded_forward(net, scale, window))

    # memory: what the forward passes add on top of the built model and its input
    timing, peak = timed_no_grad(lambda: forward(x), dev, repeats, warmup)
    result: Dict[str, Any] = {
        'params': sum(p.numel() for p in net.parameters()),
        'latency': timing.as_dict(), 'spread': timing.spread, 'peak_bytes': int(peak),
        'memory_kind': 'CUDA max_memory_allocated' if dev.type == 'cuda' else 'RSS peak increase',
    }
    halting = halting_record(net) if traits.adaptive else None
    if halting is not None and halting.sparsity:
        result['latency_input_sparsity'] = {k: list(v) for k, v in halting.sparsity.items()}
    macs, method, per_op = count_macs(net, x, window, scale)  # after the timed runs: adaptive archs count that input
    result.update(macs=macs, macs_method=method, macs_per_op=per_op)
    result['quality'] = {}
    for d in datasets:
        data = DataSpec(name=d['name'], hr_dir=d['hr_dir'], lr_dir=d['lr_dir'], pairs=[tuple(p) for p in d['pairs']])
        result['quality'][d['name']] = evaluate(net, data, scale, window, dev, max_images, precision)
    return result


# ----------------------------------------------------------------------------------------------------- reporting


def weights_label(row: RowSpec, params: Optional[int]) -> str:
    if params == 0:
        return 'none needed'
    if row.checkpoint:
        return osp.basename(row.checkpoint)
    return 'untrained (random init)'


def display_name(row: RowSpec, params: Optional[int]) -> str:
    return row.label if (row.checkpoint or params == 0) else f'{row.label} (untrained)'


def _fmt(v: Optional[float], spec: str) -> str:
    return '-' if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table_rows(rows: List[RowSpec], results: Dict[str, Dict], data_names: List[str]) -> Tuple[List[str], List[List]]:
    """Header and cells shared by the Markdown and CSV outputs."""
    header = ['model', 'weights', 'precision', 'params', 'MACs (G)', 'MACs method', 'latency median (s)',
              'spread (+-%)', 'peak memory (MB)']
    for n in data_names:
        header += [f'PSNR-Y {n}', f'SSIM-Y {n}']
    header.append('mean halted (global / window)')
    cells = []
    for row in rows:
        res = results.get(row.label)
        if res is None or 'error' in res:
            cells.append([row.label, (res or {}).get('error', 'skipped')] + [None] * (len(header) - 2))
            continue
        quality = [v for n in data_names for v in (res['quality'][n]['psnr'], res['quality'][n]['ssim'])]
        cells.append([display_name(row, res['params']), weights_label(row, res['params']), row.precision,
                      res['params'],
                      res['macs'] / 1e9, res['macs_method'], res['latency']['median_s'], 100 * res['spread'],
                      res['peak_bytes'] / 2 ** 20] + quality + [halting_summary(res)])
    return header, cells


def halting_summary(res: Dict) -> Optional[str]:
    """Mean halted share over the layers of the first data set, e.g. '31% / 12%' (None for dense models)."""
    for q in res.get('quality', {}).values():
        sp = q.get('sparsity')
        if sp and 'global_consumed' in sp and 'local_consumed' in sp:
            g, loc = sp['global_consumed'], sp['local_consumed']
            return f'{100 * sum(g) / len(g):.0f}% / {100 * sum(loc) / len(loc):.0f}%'
    return None


def to_markdown(header: List[str], cells: List[List]) -> str:
    fmts = {'params': lambda v: f'{v / 1e6:.3f}M' if v else '0',
            'MACs (G)': lambda v: f'{v:.2f}' if v >= 1 else f'{v:.3g}',
            'latency median (s)': lambda v: f'{v:.3f}', 'spread (+-%)': lambda v: f'{v:.1f}',
            'peak memory (MB)': lambda v: f'{v:.0f}'}
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for row in cells:
        out = []
        for h, v in zip(header, row):
            if v is None:
                out.append('-')
            elif h in fmts and isinstance(v, (int, float)):
                out.append(fmts[h](v))
            elif h.startswith('PSNR'):
                out.append(f'{v:.2f}')
            elif h.startswith('SSIM'):
                out.append(f'{v:.4f}')
            else:
                out.append(str(v))
        lines.append('| ' + ' | '.join(out) + ' |')
    return '\n'.join(lines)


def sparsity_markdown(rows: List[RowSpec], results: Dict[str, Dict]) -> str:
    """Per-layer halted shares of every adaptive row, per data set (the keys the arch reports)."""
    parts = []
    for row in rows:
        res = results.get(row.label) or {}
        for data_name, q in (res.get('quality') or {}).items():
            sp = q.get('sparsity')
            if not sp:
                continue
            keys = [k for k in sp if k.endswith('_consumed')] or list(sp)
            n = max(len(sp[k]) for k in keys)
            parts.append(f'\n**{display_name(row, res.get("params"))}, {data_name}** '
                         f'(halted share per block, mean over {q["images"]} images)\n')
            parts.append('| ' + ' | '.join(['measure'] + [f'block {i}' for i in range(n)]) + ' |')
            parts.append('|' + '---|' * (n + 1))
            for k in keys:
                parts.append('| ' + ' | '.join([k] + [f'{100 * v:.1f}%' for v in sp[k]]) + ' |')
    return '\n'.join(parts)


def write_csv(path: str, header: List[str], cells: List[List]) -> None:
    with open(path, 'w', newline='') as f:
        wr = csv.writer(f)
        wr.writerow(header)
        for row in cells:
            wr.writerow(['' if v is None else v for v in row])


def plot(path: str, header: List[str], cells: List[List], data_name: str, size_label: str, device: str) -> None:
    """Latency (log x) against PSNR-Y on ``data_name``; untrained rows hollow."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    i_lat, i_psnr = header.index('latency median (s)'), header.index(f'PSNR-Y {data_name}')
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for row in cells:
        lat, psnr = row[i_lat], row[i_psnr]
        if lat is None or psnr is None:
            continue
        untrained = 'untrained' in str(row[1])
        ax.scatter([lat], [psnr], s=60, facecolors='none' if untrained else 'C0', edgecolors='C0')
        label = str(row[0]).replace(' (untrained)', '')
        ax.annotate(label, (lat, psnr), textcoords='offset points', xytext=(5, 4), fontsize=8)
    ax.set_xscale('log')
    ax.set_xlabel(f'latency per {size_label} LR input on {device} (s, log scale)')
    ax.set_ylabel(f'PSNR-Y on {data_name} (dB)')
    ax.set_title('latency vs PSNR (hollow: untrained, random weights)', fontsize=9)
    ax.grid(True, which='both', alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def git_commit(repo: str) -> Optional[str]:
    try:
        out = subprocess.run(['git', '-C', repo, 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def settings_markdown(settings: Dict[str, Any]) -> str:
    env = settings['environment']
    lines = [
        f"- command: `{settings['command']}`",
        f"- date: {settings['date']}; adasr commit {settings.get('commit') or 'unknown'}",
        f"- device: {settings['device']}" + (f" ({env.get('cuda')})" if env.get('cuda') else '')
        + f"; torch {env['torch']}; {env['threads']} threads of {env['cpu_count']} CPUs"
        + (f"; {env.get('cpu_model') or 'CPU'}, ISA {env['isa']} ({', '.join(env.get('cpu_flags') or [])})"
           if env.get('isa') else '')
        + (f"; 1-min load average at start {env['loadavg_1m']}" if 'loadavg_1m' in env else ''),
        f"- glibc malloc settings: {env['malloc_env'] or 'defaults (--no-malloc-env)'}",
        f"- latency and MACs: one {settings['size_label']} LR input (the centre of the first image of "
        f"{settings['data'][0]}), {settings['warmup']} warm-up + {settings['repeats']} timed runs, median and "
        f"spread = (max - min) / 2 / median; each row in a fresh process",
        f"- peak memory: {settings['memory_kind']} during those runs, over the built model and its input",
        '- MACs: multiply-accumulates (1 MAC = 1 multiply + 1 add); "analytic" = the arch\'s own count of the work '
        'it does on that input; "torch" = PyTorch\'s FlopCounterMode over the matrix products that ran (convolution, '
        'mm/addmm, bmm; PFT\'s sparse products as the kernel it picked computes them); normalisation, softmax, '
        'activations and element-wise ops are not counted',
        f"- PSNR/SSIM: Y channel, {settings['scale']} px border, whole images (padded to each arch's window), "
        f"as `adasr/test.py` computes them; data: {', '.join(settings['data'])}",
    ]
    return '\n'.join(lines)


def save_outputs(out_dir: str, rows: List[RowSpec], results: Dict[str, Dict], data_names: List[str],
                 settings: Dict[str, Any]) -> Dict[str, str]:
    """Write benchmark.md / .csv / .json / .png under ``out_dir``; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    header, cells = table_rows(rows, results, data_names)
    md = to_markdown(header, cells)
    sp = sparsity_markdown(rows, results)
    notes = [f'- {r.label}: {r.note}' for r in rows if r.note]
    paths = {k: osp.join(out_dir, f'benchmark.{k}') for k in ('md', 'csv', 'json', 'png')}
    with open(paths['md'], 'w') as f:
        f.write(f"# Benchmark, x{settings['scale']}, {settings['device']}\n\n{md}\n\n{settings_markdown(settings)}\n")
        if notes:
            f.write('\n' + '\n'.join(notes) + '\n')
        if sp:
            f.write('\n## Halting sparsity\n' + sp + '\n')
    write_csv(paths['csv'], header, cells)
    with open(paths['json'], 'w') as f:
        json.dump({'settings': settings, 'rows': [asdict(r) for r in rows], 'results': results}, f, indent=1,
                  default=str)
    plot(paths['png'], header, cells, data_names[0], settings['size_label'], settings['device'])
    return paths


def now() -> str:
    return datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')


__all__ = ['DEFAULT_ROWS', 'BenchmarkError', 'RowSpec', 'DataSpec', 'resolve_row', 'with_precisions', 'find_dataset',
           'match_pairs', 'parse_size', 'build_net', 'perturb_weights', 'latency_input', 'count_macs', 'evaluate',
           'measure_row', 'table_rows', 'to_markdown', 'sparsity_markdown', 'save_outputs', 'settings_markdown',
           'git_commit', 'now']
