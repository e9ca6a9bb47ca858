"""ONNX export of adasr's networks, an onnxruntime runner, and the comparison of the two.

The exporter is PyTorch's maintained one, ``torch.onnx.export(..., dynamo=True)``: ``torch.export`` captures the
graph and onnxscript's torchlib translates it, at opset :data:`OPSET` (torchlib's own opset; onnxruntime and
TensorRT 8.6+ read it). The TorchScript exporter (``dynamo=False``) is deprecated and not used.

What is traced is the network's declared export form (:func:`adasr.archs.exportable.export_module`: AdaFormer and
PFT compute their data-dependent eval paths with static control flow there), wrapped with the padding the harness
applies to networks that do not pad their input themselves. With ``size=None`` the graph takes any batch, height
and width (``torch.export.Dim.DYNAMIC``); networks whose Python code fixes sizes while tracing (basicsr's SwinIR)
need a fixed ``size``, and the error says so.

Two torchlib gaps are filled here for every arch: ``aten.sort.stable`` (ATD sorts its token categories) becomes a
full-length ``TopK`` (ONNX breaks ties by the lower index, i.e. a stable sort, as PyTorch's CPU sort), and
``aten.remainder.Scalar`` accepts a symbolic divisor (the padding index arithmetic at dynamic sizes).
"""
import contextlib
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from adasr.archs.exportable import export_module, mirror_pad_to_multiple
from adasr.archs.interface import arch_traits
from adasr.utils.image_io import atomic_write_bytes

#: ONNX opset of the exported graphs (onnxscript torchlib's native opset: no version conversion step).
OPSET = 18


class ExportError(RuntimeError):
    """The network could not be exported (the message says what to change, e.g. a fixed ``size``)."""


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote."""

    path: str
    seconds: float
    bytes: int
    dynamic: bool
    size: Optional[Tuple[int, int]]
    opset: int


class _Traced(nn.Module):
    """The module that is traced: the export form of ``net``, behind the harness's reflect padding and crop for
    networks that do not pad themselves (the values of :func:`adasr.inference.tile.padded_forward`, as index gathers
    valid for every input size)."""

    def __init__(self, net: nn.Module, scale: int, multiple: int):
        super().__init__()
        self.body = export_module(net)
        self.scale = scale
        self.multiple = 1 if arch_traits(net).pads_input else multiple  # 1: it pads itself

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.multiple == 1:
            return self.body(x)
        h, w = x.shape[-2:]
        return self.body(mirror_pad_to_multiple(x, self.multiple, 'reflect'))[..., :h * self.scale, :w * self.scale]


def _sort_stable(self, dim: int = -1, descending: bool = False, stable: Optional[bool] = None):
    """``aten.sort.stable`` as a full-length TopK (ties in index order, i.e. stable)."""
    from onnxscript import opset18 as op

    k = op.Shape(self, start=dim, end=dim + 1 if dim != -1 else None)
    values, indices = op.TopK(self, k, axis=dim, largest=descending, sorted=True)
    return values, indices


def _remainder_scalar(self, other):
    """``aten.remainder.Scalar`` (Python's sign convention) with a constant or a symbolic divisor."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    if isinstance(other, (int, float)):
        other = op.Constant(value=ir.tensor(np.array(other, dtype=self.dtype.numpy())))
    else:
        other = op.CastLike(other, self)
    if self.dtype.is_integer():
        return op.Mod(self, other)  # fmod=0: the result has the divisor's sign
    return op.Sub(self, op.Mul(op.Floor(op.Div(self, other)), other))


def _translations() -> Dict[Callable, Callable]:
    return {torch.ops.aten.sort.stable: _sort_stable, torch.ops.aten.remainder.Scalar: _remainder_scalar}


def export_onnx(net: nn.Module, path: str, scale: int, *, in_channels: int = 3,
                size: Optional[Sequence[int]] = None, multiple: Optional[int] = None,
                opset: int = OPSET) -> ExportResult:
    """Export ``net`` (eval mode, float32, CPU) to the ONNX file ``path`` (written atomically).

    Args:
        net: the network (its parameters are stored in the file).
        path: output ``.onnx`` file.
        scale: the network's upscaling factor (for the crop after harness padding).
        in_channels: image channels of the input.
        size: ``(H, W)`` for a graph of that fixed input size (batch 1); None for dynamic batch, height and width.
        multiple: what the harness pads the input of a network that does not pad itself to (None: the window the
            arch declares, :func:`adasr.archs.interface.arch_traits`; give the option file's
            ``network_g.window_size`` for basicsr's SwinIR, as ``adasr-upscale`` does).
        opset: ONNX opset.

    Returns:
        an :class:`ExportResult`.

    Raises:
        ExportError: when ``torch.export`` or the ONNX translation fails (with the exporter's reason).
    """
    net = net.eval().float().cpu()
    traced = _Traced(net, scale, arch_traits(net).window if multiple is None else multiple).eval()
    dynamic = size is None
    h, w = (37, 45) if dynamic else (int(size[0]), int(size[1]))  # sizes that need padding for every window
    example = torch.rand(1, in_channels, h, w)
    shapes = ({2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC},) if dynamic else None
    start = time.perf_counter()
    try:
        with torch.no_grad():
            program = torch.onnx.export(traced, (example,), dynamo=True, opset_version=opset, dynamic_shapes=shapes,
                                        input_names=['lr'], output_names=['sr'],
                                        custom_translation_table=_translations(), verbose=False)
    except Exception as e:  # noqa: BLE001 - reported with the exporter's own summary
        lines = str(e).splitlines()
        summary = next((line for line in lines if line.startswith("<class '")), lines[-1] if lines else repr(e))
        hint = '' if not dynamic else ' Its Python code may fix sizes while tracing: export a fixed size (size=(H, W)).'
        raise ExportError(f'cannot export {type(net).__name__} to ONNX ({"dynamic" if dynamic else f"{h}x{w}"}): '
                          f'{summary[:500]}.{hint}') from e
    written = next((o.version for o in program.model_proto.opset_import if o.domain in ('', 'ai.onnx')), None)
    if written != opset:
        raise ExportError(f'the exporter wrote ONNX opset {written}, not the requested {opset} (the dynamo exporter '
                          f'writes opset {OPSET} and later)')
    data = program.model_proto.SerializeToString()
    seconds = time.perf_counter() - start
    atomic_write_bytes(path, data)
    return ExportResult(path=path, seconds=seconds, bytes=len(data), dynamic=dynamic,
                        size=None if dynamic else (h, w), opset=opset)


class OnnxRunner:
    """An onnxruntime CPU session for an exported network: ``runner(x)`` maps a (B, C, H, W) float32 array (0..1)
    to the SR array.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (0: onnxruntime's default, one per physical core).
    """

    def __init__(self, path: str, threads: int = 0):
        import onnxruntime as ort

        if not os.path.isfile(path):
            raise FileNotFoundError(f'ONNX file not found: {path}')
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
        self.input_name = self.session.get_inputs()[0].name
        self.input_shape = tuple(self.session.get_inputs()[0].shape)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]


@dataclass
class Comparison:
    """onnxruntime against PyTorch on the same input, both clipped to 0..1 (as images are saved)."""

    max_abs: float
    psnr: float  # dB between the two outputs (inf when equal)


class StableSort(TorchFunctionMode):
    """Within this mode ``torch.sort`` / ``torch.argsort`` break ties by index (``stable=True``), as the exported
    ``TopK`` does. PyTorch's default ``stable=False`` leaves the order of equal keys to the implementation (ATD sorts
    its tokens by category, with many ties)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.sort, torch.Tensor.sort, torch.argsort, torch.Tensor.argsort):
            kwargs['stable'] = True
        return func(*args, **kwargs)


def compare(net_fn: Callable[[torch.Tensor], torch.Tensor], runner: OnnxRunner, x: torch.Tensor,
            stable_sort: bool = True) -> Comparison:
    """Run ``net_fn`` (the PyTorch forward, e.g. :func:`adasr.inference.tile.padded_forward`) and ``runner`` on
    ``x`` (B, C, H, W) in 0..1 and compare the outputs clipped to 0..1. With ``stable_sort`` PyTorch runs under
    :class:`StableSort`, so both break sorting ties the same way."""
    with torch.no_grad(), (StableSort() if stable_sort else contextlib.nullcontext()):
        ref = net_fn(x).clamp(0, 1).numpy()
    out = np.clip(runner(x.numpy()), 0, 1)
    if out.shape != ref.shape:
        raise ValueError(f'onnxruntime output {out.shape} and PyTorch output {ref.shape} differ in shape')
    if not (np.isfinite(out).all() and np.isfinite(ref).all()):
        raise ValueError('non-finite values in the outputs')
    diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    mse = float((diff ** 2).mean())
    return Comparison(max_abs=float(diff.max()), psnr=math.inf if mse == 0 else 10 * math.log10(1 / mse))
