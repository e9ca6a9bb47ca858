"""Checkpoints: read with ``weights_only=True``, written atomically, refused when they hold non-finite numbers;
errors name the file and the offending keys."""
import os
import pickle
import re
import zipfile
import zlib
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Mapping, Optional

import torch
from torch import nn

from adasr.utils.checks import first_line
from adasr.utils.files import atomic_write

PARAM_KEYS = ('params_ema', 'params', 'state_dict', 'model')


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or does not match the network."""


def load_checkpoint(path: str, param_key: Optional[str] = 'params') -> Dict[str, torch.Tensor]:
    """Read a state dict from ``path`` with ``torch.load(weights_only=True)`` on the CPU.

    Accepts BasicSR files (``{'params': ..., 'params_ema': ...}``) and bare state dicts (the AdaFormer authors'
    ``model_x4.pt`` layout). ``param_key`` picks the entry; when it is missing, ``params_ema`` falls back to
    ``params`` and vice versa (another name missing is an error: no other entry stands in for it), and a bare state
    dict is used as it is. A ``module.`` prefix (DataParallel) is
    removed.

    Raises:
        CheckpointError: the file is missing, unreadable or damaged, has none of the expected entries, holds an entry
            that is not a tensor, or holds NaN/inf.
    """
    state = pick_entry(read_checkpoint(path), param_key, path)
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f'checkpoint {path}: entries that are not tensors ({len(not_tensors)}): '
                              f'{_summarise(map(str, not_tensors))} (a state dict maps names to tensors)')
    check_finite_state(state, f'checkpoint {path}')
    out = OrderedDict()
    for k, v in state.items():
        out[k[7:] if k.startswith('module.') else k] = v
    return out


def read_checkpoint(path: str) -> Mapping:
    """The mapping stored in ``path``, read with ``torch.load(weights_only=True)`` on the CPU, as it is.

    Raises:
        CheckpointError: the file is missing, unreadable, damaged (a zip record whose CRC-32 does not match), holds
            Python objects that are not plain data (never built), or does not hold a mapping.
    """
    if os.path.isdir(path):
        raise CheckpointError(f'checkpoint {path} is a folder, not a file')
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint not found: {path}')
    if os.path.getsize(path) == 0:
        raise CheckpointError(f'checkpoint {path} is empty (0 bytes): an interrupted download or copy?')
    damaged = damaged_record(path)
    if damaged:
        raise CheckpointError(f'checkpoint {path} is damaged: {damaged} (a corrupted download, copy or disk?)')
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _REFUSED_GLOBAL.search(str(e))
        if refused is None:
            raise CheckpointError(f'cannot read checkpoint {path} with weights_only=True (UnpicklingError: '
                                  f'{_unpickling_reason(e)}); the file may be damaged or not a PyTorch checkpoint'
                                  ) from None
        raise CheckpointError(f'checkpoint {path} is not plain data: it asks to build {refused.group(1)}; '
                              'checkpoints are read as data only (weights_only=True) and code in them is never run'
                              ) from None
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        detail = f'{type(e).__name__}: {first_line(e)}' if str(e) else type(e).__name__
        raise CheckpointError(f'cannot read checkpoint {path} with weights_only=True ({detail}); the file may be '
                              'truncated or not a PyTorch checkpoint') from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f'checkpoint {path} holds a {type(obj).__name__}, not a state dict')
    return obj


#: the object a weights-only load refused, in PyTorch's message (whose advice to load with weights_only=False, which
#: would run the file's code, is not passed on)
_REFUSED_GLOBAL = re.compile(r'(?:unsupported GLOBAL|Unsupported global: GLOBAL)\s+([\w.]+)')


def _unpickling_reason(e: BaseException) -> str:
    """The cause in PyTorch's weights-only error (after ``WeightsUnpickler error:``), without its preamble that
    advises loading with ``weights_only=False`` (which would run the file's code) or its terminal colour codes."""
    text = re.sub(r'\x1b\[[0-9;]*m', '', str(e))
    cause = text.split('WeightsUnpickler error:', 1)
    if len(cause) == 2 and cause[1].strip():
        return cause[1].strip().splitlines()[0].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    kept = [line for line in lines if 'weights_only' not in line and not line.startswith('Weights only load failed')]
    return kept[0] if kept else 'not plain data'


def damaged_record(path: str) -> Optional[str]:
    """Which record of a zip-format checkpoint (``torch.save``'s format) fails its CRC-32, or None. PyTorch does not
    check the CRCs it writes, so a file damaged in the middle (a flipped byte) would load and give wrong pixels or an
    arbitrary error. Records stored without a CRC (``torch.serialization.set_crc32_options(False)``: 0) are not
    checked; a file that does not start as a zip (the legacy format) is left to ``torch.load``."""
    try:
        with open(path, 'rb') as f:  # as torch.load decides: a zip starts with a local file header
            if f.read(4) != b'PK\x03\x04':
                return None
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.CRC == 0:
                    continue
                with z.open(info) as f:  # zipfile compares the CRC when the record is read to its end
                    while f.read(1 << 22):
                        pass
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, zlib.error) as e:
        return str(e) or type(e).__name__
    return None


def nonfinite_keys(state: Mapping[str, Any]) -> List[str]:
    """Names of the floating-point tensors of ``state`` that hold a NaN or an infinity."""
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def check_finite_state(state: Mapping[str, Any], source: str) -> None:
    """Raise a :class:`CheckpointError` naming the tensors of ``state`` that hold NaN or inf."""
    bad = nonfinite_keys(state)
    if bad:
        raise CheckpointError(f'{source} holds non-finite numbers (NaN or inf) in {len(bad)} tensor(s): '
                              f'{_summarise(bad)}')


def save_checkpoint(obj: Any, path: str) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (:func:`adasr.utils.files.atomic_write`): the file appears
    complete or not at all.

    Raises:
        CheckpointError: the write failed (a full disk, a file-size limit, ...); the message names ``path``.
    """
    try:
        with atomic_write(path) as f:
            torch.save(obj, f)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise CheckpointError(f'cannot save {path}: {e}') from e


def pick_entry(obj: Mapping, param_key: Optional[str], path: str) -> Mapping:
    """The state dict of a checkpoint's entry ``param_key`` (``params`` and ``params_ema`` stand in for each other;
    another name the file lacks is an error), else the first of :data:`PARAM_KEYS`; a bare state dict as it is."""
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj  # a bare state dict
    order: List[str] = []
    if param_key:
        order.append(param_key)
        if param_key == 'params_ema':
            order.append('params')
        elif param_key == 'params':
            order.append('params_ema')
        elif not isinstance(obj.get(param_key), Mapping):  # an entry asked for by name: no other one stands in
            raise CheckpointError(f'checkpoint {path} has no entry {param_key!r}; its top-level keys are '
                                  f'{sorted(obj)}')
    order += [k for k in PARAM_KEYS if k not in order]
    for key in order:
        if key in obj and isinstance(obj[key], Mapping):
            return obj[key]
    raise CheckpointError(f'checkpoint {path} has no entry {param_key!r}; its top-level keys are {sorted(obj)}')


def _summarise(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ', '.join(keys[:limit])
    return shown + (f', ... ({len(keys) - limit} more)' if len(keys) > limit else '')


def check_state_dict(net: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True,
                     source: str = 'checkpoint') -> Dict[str, torch.Tensor]:
    """Compare ``state`` with ``net.state_dict()``.

    With ``strict`` any missing key, unexpected key or shape mismatch raises a :class:`CheckpointError` that names
    them. Without it, entries whose shapes differ are dropped (BasicSR's ``strict_load_g: false`` behaviour, used to
    fine-tune x3/x4 from x2) and the rest is returned.
    """
    own = net.state_dict()
    missing = set(own) - set(state)
    unexpected = set(state) - set(own)
    mismatched = {k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape)}
    if strict and (missing or unexpected or mismatched):
        lines = [f'{source} does not match {net.__class__.__name__}:']
        if missing:
            lines.append(f'  missing keys ({len(missing)}): {_summarise(missing)}')
        if unexpected:
            lines.append(f'  unexpected keys ({len(unexpected)}): {_summarise(unexpected)}')
        if mismatched:
            detail = [f'{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}' for k in sorted(mismatched)[:12]]
            lines.append(f'  shape mismatches ({len(mismatched)}; checkpoint vs network): ' + ', '.join(detail))
        lines.append('  (check network_g against the checkpoint, or set strict_load_g: false to fine-tune)')
        raise CheckpointError('\n'.join(lines))
    if own and not set(own) & set(state) - mismatched:  # nothing would load: not a fine-tuning start but a wrong file
        raise CheckpointError(f'{source} does not match {net.__class__.__name__}: none of its {len(state)} entries '
                              f'loads ({len(missing)} of the network\'s {len(own)} missing, e.g. '
                              f'{_summarise(missing, 3)}; unexpected: {_summarise(unexpected, 3) or "none"}; shape '
                              f'mismatches: {len(mismatched)}); check network_g and param_key against the checkpoint')
    return OrderedDict((k, v) for k, v in state.items() if k not in mismatched)


def match_prefix(net: nn.Module, state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Remove a ``model.`` prefix (the AdaFormer authors' EDSR-style trainer saves ``model.<name>``) when no key of
    ``state`` matches the network and every key has it; otherwise return ``state`` unchanged. Needs the network,
    so that an arch whose own names begin with ``model.`` is left alone."""
    if state and not (set(state) & set(net.state_dict())) and all(k.startswith('model.') for k in state):
        return OrderedDict((k[len('model.'):], v) for k, v in state.items())
    return state


def load_weights(net: nn.Module, path: str, param_key: Optional[str] = 'params', strict: bool = True):
    """Load ``path`` into ``net`` (see :func:`load_checkpoint`, :func:`match_prefix` and :func:`check_state_dict`).
    Returns what ``net.load_state_dict`` returns (the keys not loaded, when not ``strict``)."""
    state = match_prefix(net, load_checkpoint(path, param_key))
    state = check_state_dict(net, state, strict=strict, source=f'checkpoint {path}')
    return net.load_state_dict(state, strict=strict)
