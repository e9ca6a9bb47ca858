"""Argument checks shared by every layer: each raises a ValueError that names the option (or the data)."""
import math
from typing import Optional, Tuple


def is_real(value) -> bool:
    """An int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value, minimum: int = 1) -> int:
    """Return ``value`` if it is an int (not a bool) >= ``minimum``, else raise a ValueError naming the option."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}')
    return value


def check_positive(name: str, value) -> float:
    """Return ``value`` as a float if it is a finite number > 0, else raise a ValueError naming the option."""
    if not is_real(value) or not 0 < value < math.inf:
        raise ValueError(f'{name} must be a positive number, got {value!r}')
    return float(value)


def check_choice(name: str, value, choices) -> None:
    """Raise a ValueError that names the option when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f'{name}={value!r} is not supported; choose one of {list(choices)}')


class NonFiniteError(ValueError):
    """Numbers that must be finite (an image, a network output) hold NaN or infinite values."""


def count_nonfinite(values) -> Tuple[int, int]:
    """(number of NaN or infinite entries, number of entries) of a torch tensor or a numpy array."""
    import numpy as np

    if isinstance(values, np.ndarray):
        finite = values.size if values.dtype.kind not in 'fc' else int(np.count_nonzero(np.isfinite(values)))
        return values.size - finite, values.size
    import torch

    finite = int(torch.isfinite(values).sum().item()) if values.is_floating_point() else values.numel()
    return values.numel() - finite, values.numel()


def check_finite(what: str, values) -> None:
    """Raise a :class:`NonFiniteError` naming ``what`` when ``values`` (a torch tensor or a numpy array) has NaN or
    infinite entries."""
    bad, total = count_nonfinite(values)
    if bad:
        raise NonFiniteError(f'{what}: {bad} of {total} values are NaN or infinite')


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (PyTorch's and OpenCV's run to many lines), or its type's
    name."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def scale_mismatch(lq_hw: Tuple[int, int], gt_hw: Tuple[int, int], scale: int) -> Optional[str]:
    """Why a GT of size ``gt_hw`` (height, width) is not the x``scale`` of an LR of ``lq_hw``, or None. A GT may be
    up to ``scale - 1`` pixels larger on a side (BasicSR crops it to the LR x scale, as a benchmark set's GT is
    mod-cropped); smaller, or larger than that (the LR of another scale), is a mismatch."""
    for side, lq, gt in (('height', lq_hw[0], gt_hw[0]), ('width', lq_hw[1], gt_hw[1])):
        if not lq * scale <= gt < (lq + 1) * scale:
            return (f'the GT is {gt_hw[1]}x{gt_hw[0]} but its LR is {lq_hw[1]}x{lq_hw[0]}: at x{scale} the GT '
                    f'{side} must be {lq * scale}' + (f' to {lq * scale + scale - 1}' if scale > 1 else '')
                    + ' (is this the LR of another scale?)')
    return None
