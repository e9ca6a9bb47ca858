"""Reading and writing the images people actually have: grayscale, alpha, 16-bit, palette, and broken files.

Images are decoded with OpenCV (``IMREAD_UNCHANGED``, so 16-bit and alpha survive), with Pillow as the fallback for
what OpenCV cannot decode. Writes are atomic: the encoded bytes go to a temporary file in the destination folder,
which is then renamed over the destination, so an interrupted run never leaves a truncated image behind.
"""
import os.path as osp
from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np

from adasr.utils.files import atomic_write_bytes

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.gif', '.ppm', '.pgm', '.pnm')
# what each writable format can hold
WRITABLE = {'png': {'alpha': True, 'uint16': True}, 'tif': {'alpha': True, 'uint16': True},
            'tiff': {'alpha': True, 'uint16': True}, 'webp': {'alpha': True, 'uint16': False},
            'jpg': {'alpha': False, 'uint16': False}, 'jpeg': {'alpha': False, 'uint16': False},
            'bmp': {'alpha': True, 'uint16': False}, 'ppm': {'alpha': False, 'uint16': True},
            'pgm': {'alpha': False, 'uint16': True}}


class ImageReadError(ValueError):
    """A file that cannot be decoded as an image."""


@dataclass
class LoadedImage:
    """A decoded image in float32 [0, 1].

    Attributes:
        color: (H, W, 3) RGB or (H, W) grayscale.
        alpha: (H, W) or None.
        dtype: the stored sample type, ``'uint8'`` or ``'uint16'`` (float inputs count as 16-bit).
    """

    color: np.ndarray
    alpha: Optional[np.ndarray]
    dtype: str

    @property
    def is_gray(self) -> bool:
        return self.color.ndim == 2

    @property
    def size(self):
        return self.color.shape[:2]


def is_image_file(path: str) -> bool:
    return osp.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _to_float(arr: np.ndarray, path: str):
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0, 'uint8'
    if arr.dtype == np.uint16:
        return (arr.astype(np.float64) / 65535.0).astype(np.float32), 'uint16'
    if arr.dtype in (np.float32, np.float64):
        return np.clip(arr, 0, 1).astype(np.float32), 'uint16'
    raise ImageReadError(f'{path}: unsupported sample type {arr.dtype} (8-bit, 16-bit or float images only)')


def _pillow_decode(path: str) -> np.ndarray:
    from PIL import Image as PILImage

    try:
        with PILImage.open(path) as im:
            im.load()
            if im.mode in ('I;16', 'I;16B', 'I;16L'):
                return np.asarray(im, dtype=np.uint16)
            if im.mode == 'I':
                return np.clip(np.asarray(im), 0, 65535).astype(np.uint16)
            if im.mode == 'F':
                return np.asarray(im, dtype=np.float32)
            has_alpha = im.mode in ('RGBA', 'LA', 'PA') or 'transparency' in im.info
            if im.mode in ('L', '1'):
                return np.asarray(im.convert('L'))
            rgb = np.asarray(im.convert('RGBA' if has_alpha else 'RGB'))
    except Exception as e:  # noqa: BLE001 - becomes the reported reason
        raise ImageReadError(f'{path}: cannot decode image ({type(e).__name__}: {e})') from e
    return cv2.cvtColor(rgb, cv2.COLOR_RGBA2BGRA if rgb.shape[-1] == 4 else cv2.COLOR_RGB2BGR)


def _pillow_mode(path: str) -> Optional[str]:
    try:
        from PIL import Image as PILImage

        with PILImage.open(path) as im:
            return im.mode
    except Exception:  # noqa: BLE001 - only a hint
        return None


def read_image(path: str) -> LoadedImage:
    """Decode ``path`` into a :class:`LoadedImage`.

    Grayscale (also gray + alpha) stays grayscale; palette images become RGB(A); 16-bit stays 16-bit.

    Raises:
        ImageReadError: the file is missing, empty, unreadable or not an image (the message names the file).
    """
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise ImageReadError(f'{path}: cannot read file ({e.strerror or e})') from e
    if data.size == 0:
        raise ImageReadError(f'{path}: empty file')
    arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if arr is None:
        arr = _pillow_decode(path)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        color, dtype = _to_float(arr, path)
        return LoadedImage(color, None, dtype)
    if arr.ndim != 3 or arr.shape[2] not in (2, 3, 4) or min(arr.shape[:2]) < 1:
        raise ImageReadError(f'{path}: unsupported image layout {arr.shape}')
    f, dtype = _to_float(arr, path)
    if f.shape[2] == 2:  # gray + alpha
        return LoadedImage(np.ascontiguousarray(f[..., 0]), np.ascontiguousarray(f[..., 1]), dtype)
    alpha = np.ascontiguousarray(f[..., 3]) if f.shape[2] == 4 else None
    bgr = f[..., :3]
    if alpha is not None and _pillow_mode(path) == 'LA':  # OpenCV expands gray + alpha to BGRA
        return LoadedImage(np.ascontiguousarray(bgr[..., 0]), alpha, dtype)
    return LoadedImage(np.ascontiguousarray(bgr[..., ::-1]), alpha, dtype)


def quantize(x: np.ndarray, dtype: str) -> np.ndarray:
    """float [0, 1] -> uint8 / uint16, clamped and rounded half to even (one float temporary, for 8K outputs)."""
    peak = 255.0 if dtype == 'uint8' else 65535.0
    y = np.clip(x, 0, 1).astype(np.float32, copy=False)
    y *= peak
    np.rint(y, out=y)
    return y.astype(np.uint8 if dtype == 'uint8' else np.uint16)


def to_stored(img: LoadedImage, dtype: str) -> np.ndarray:
    """The array OpenCV writes: gray (H, W), BGR or BGRA, in ``dtype``."""
    color = img.color if img.is_gray else img.color[..., ::-1]
    if img.alpha is not None:
        if img.is_gray:
            color = np.repeat(color[..., None], 3, axis=2)
        color = np.concatenate([color, img.alpha[..., None]], axis=2)
    return quantize(np.ascontiguousarray(color), dtype)


def encode(arr: np.ndarray, ext: str, jpeg_quality: int = 95) -> bytes:
    params = []
    if ext in ('jpg', 'jpeg'):
        params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]
    elif ext == 'webp':
        params = [cv2.IMWRITE_WEBP_QUALITY, 100]
    ok, buf = cv2.imencode('.' + ext, arr, params)
    if not ok:
        raise OSError(f'OpenCV cannot encode a {arr.shape} {arr.dtype} image as .{ext}')
    return buf.tobytes()


def write_image(path: str, arr: np.ndarray, jpeg_quality: int = 95) -> None:
    """Encode a uint8/uint16 gray, BGR or BGRA array by the extension of ``path`` and write it atomically
    (:func:`adasr.utils.files.atomic_write_bytes`)."""
    ext = osp.splitext(path)[1].lower().lstrip('.')
    atomic_write_bytes(path, encode(arr, ext, jpeg_quality))
