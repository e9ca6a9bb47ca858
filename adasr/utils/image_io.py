"""Reading and writing the images people actually have: grayscale, alpha, 16-bit, palette, and broken files.

This is the one place adasr reads and writes images (the upscale CLI, data preparation, the benchmark harness).

Images are decoded with OpenCV (``IMREAD_UNCHANGED``, so 16-bit and alpha survive), with Pillow as the fallback for
what OpenCV cannot decode. The EXIF orientation of JPEG, PNG and WebP files is applied as OpenCV's ``IMREAD_COLOR``
(what BasicSR's ``imfrombytes`` and so its datasets use) applies it; ``IMREAD_UNCHANGED`` alone would ignore it.
Float images with NaN or infinite samples are refused. Writes are atomic: the encoded bytes go to a temporary file
``.<name>.<random>.adasr-tmp`` in the destination folder, which is then renamed over the destination, so an
interrupted run never leaves a truncated image behind (:mod:`adasr.utils.files`, which also cleans up after
interrupted runs).
"""
import os
import os.path as osp
from dataclasses import dataclass
from typing import Optional, Tuple

import cv2
import numpy as np

from adasr.utils.checks import count_nonfinite, first_line
from adasr.utils.files import WriteError, atomic_write_bytes

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.gif', '.ppm', '.pgm', '.pnm')
# what each writable format can hold
WRITABLE = {'png': {'alpha': True, 'uint16': True}, 'tif': {'alpha': True, 'uint16': True},
            'tiff': {'alpha': True, 'uint16': True}, 'webp': {'alpha': True, 'uint16': False},
            'jpg': {'alpha': False, 'uint16': False}, 'jpeg': {'alpha': False, 'uint16': False},
            'bmp': {'alpha': True, 'uint16': False}, 'ppm': {'alpha': False, 'uint16': True},
            'pgm': {'alpha': False, 'uint16': True}}
#: the longest side each format can hold (the encoders refuse larger images); formats not listed have no limit here
MAX_SIDE = {'webp': 16383, 'jpg': 65500, 'jpeg': 65500}


class ImageReadError(ValueError):
    """A file that cannot be decoded as an image."""


@dataclass
class LoadedImage:
    """A decoded image in float32 [0, 1].

    Attributes:
        color: (H, W, 3) RGB or (H, W) grayscale.
        alpha: (H, W) or None.
        dtype: the stored sample type, ``'uint8'`` or ``'uint16'`` (float inputs count as 16-bit).
        clipped: how many samples of a float image lay outside [0, 1] and were clipped (HDR values are lost).
    """

    color: np.ndarray
    alpha: Optional[np.ndarray]
    dtype: str
    clipped: int = 0

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


#: EXIF orientation (1..8) -> the transform that shows the image upright, on the (H, W) axes
_ORIENT = {
    2: lambda a: a[:, ::-1],  # mirrored horizontally
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1],  # mirrored vertically
    5: lambda a: a.swapaxes(0, 1),  # transposed
    6: lambda a: a.swapaxes(0, 1)[:, ::-1],  # rotated 90 clockwise to display
    7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],  # transverse
    8: lambda a: a.swapaxes(0, 1)[::-1],  # rotated 90 counter-clockwise to display
}


def _orientable(head: bytes) -> bool:
    """Whether the file starts as a JPEG, PNG or WebP: the formats whose EXIF orientation OpenCV applies with
    ``IMREAD_COLOR`` but not with ``IMREAD_UNCHANGED`` (TIFF orientation tags are applied by libtiff in both)."""
    is_webp = head[:4] == b'RIFF' and head[8:12] == b'WEBP'
    return head[:2] == b'\xff\xd8' or head[:8] == b'\x89PNG\r\n\x1a\n' or is_webp


def exif_orientation(path: str) -> int:
    """The EXIF orientation tag (1..8) of ``path``, 1 when there is none.

    Only the EXIF block Pillow meets while parsing the header is read (JPEG APP1, PNG ``eXIf``, WebP ``EXIF``); no
    pixels are decoded.
    """
    import warnings

    from PIL import Image as PILImage

    try:
        with warnings.catch_warnings():  # the header of a very large image is still only a header
            warnings.simplefilter('ignore', PILImage.DecompressionBombWarning)
            im = PILImage.open(path)
        with im:
            raw = im.info.get('exif')
            if not raw:
                return 1
            exif = PILImage.Exif()
            exif.load(raw)
            value = exif.get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block does not stop the image from being read
        return 1
    return value if value in _ORIENT else 1


def decode_image(path: str) -> np.ndarray:
    """Decode ``path`` as stored: (H, W) gray, (H, W, 2) gray + alpha, (H, W, 3) BGR or (H, W, 4) BGRA; uint8,
    uint16 or float; upright (EXIF orientation applied).

    Raises:
        ImageReadError: the file is missing, empty, unreadable, not an image or has non-finite samples (the message
            names the file).
    """
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise ImageReadError(f'{path}: cannot read file ({e.strerror or e})') from e
    if data.size == 0:
        raise ImageReadError(f'{path}: empty file')
    try:
        arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error:  # a damaged header OpenCV asserts on (a size past its limits): Pillow decides, or refuses
        arr = None
    if arr is None:
        arr = _pillow_decode(path)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (2, 3, 4)) or min(arr.shape[:2]) < 1:
        raise ImageReadError(f'{path}: unsupported image layout {arr.shape}')
    bad, _ = count_nonfinite(arr)
    if bad:
        raise ImageReadError(f'{path}: {bad} sample(s) are NaN or infinite')
    orientation = exif_orientation(path) if _orientable(data[:12].tobytes()) else 1
    return np.ascontiguousarray(_ORIENT[orientation](arr)) if orientation != 1 else arr


def image_size(path: str) -> Tuple[int, int]:
    """(height, width) of an image file as :func:`decode_image` returns it (EXIF orientation applied), from its
    header (Pillow); TIFFs and files Pillow cannot read are decoded.

    Raises:
        ImageReadError: the file cannot be read as an image (the message names it).
    """
    import warnings

    from PIL import Image as PILImage

    try:
        with open(path, 'rb') as f:
            head = f.read(12)
    except OSError as e:
        raise ImageReadError(f'{path}: cannot read file ({e.strerror or e})') from e
    if head[:4] in (b'II*\x00', b'MM\x00*'):  # TIFF: libtiff applies its orientation tag while decoding
        arr = decode_image(path)
        return arr.shape[0], arr.shape[1]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', PILImage.DecompressionBombWarning)
            with PILImage.open(path) as im:
                w, h = im.size
    except Exception:  # noqa: BLE001 - a format Pillow lacks: decode it
        arr = decode_image(path)
        return arr.shape[0], arr.shape[1]
    if _orientable(head) and exif_orientation(path) in (5, 6, 7, 8):  # turned by 90 degrees, as decode_image does
        h, w = w, h
    return h, w


def read_image(path: str) -> LoadedImage:
    """Decode ``path`` into a :class:`LoadedImage` (:func:`decode_image`, then float [0, 1]; float samples outside
    it are clipped and counted in ``clipped``).

    Grayscale (also gray + alpha) stays grayscale; palette images become RGB(A); 16-bit stays 16-bit.

    Raises:
        ImageReadError: see :func:`decode_image`.
    """
    arr = decode_image(path)
    clipped = int(np.count_nonzero((arr < 0) | (arr > 1))) if arr.dtype.kind == 'f' else 0
    f, dtype = _to_float(arr, path)
    if arr.ndim == 2:
        return LoadedImage(f, None, dtype, clipped)
    if f.shape[2] == 2:  # gray + alpha
        return LoadedImage(np.ascontiguousarray(f[..., 0]), np.ascontiguousarray(f[..., 1]), dtype, clipped)
    alpha = np.ascontiguousarray(f[..., 3]) if f.shape[2] == 4 else None
    bgr = f[..., :3]
    if alpha is not None and _pillow_mode(path) == 'LA':  # OpenCV expands gray + alpha to BGRA
        return LoadedImage(np.ascontiguousarray(bgr[..., 0]), alpha, dtype, clipped)
    return LoadedImage(np.ascontiguousarray(bgr[..., ::-1]), alpha, dtype, clipped)


def read_rgb(path: str) -> np.ndarray:
    """(H, W, 3) float32 RGB in [0, 1]: gray repeated into three channels and alpha dropped, as BasicSR's
    ``imfrombytes(..., float32=True)`` reads colour (16-bit keeps its precision)."""
    img = read_image(path)
    return np.repeat(img.color[..., None], 3, axis=2) if img.is_gray else img.color


def read_uint8(path: str) -> np.ndarray:
    """An 8-bit image as stored: (H, W) gray or (H, W, 3) BGR (an alpha channel is dropped: SR data sets are
    opaque).

    Raises:
        ImageReadError: see :func:`decode_image`, or the image is not 8-bit.
    """
    img = decode_image(path)
    if img.dtype != np.uint8:
        raise ImageReadError(f'{path} is {img.dtype}; only 8-bit images are supported')
    if img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    elif img.ndim == 3 and img.shape[2] == 2:
        img = np.ascontiguousarray(img[..., 0])
    return img


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


def encode(arr: np.ndarray, ext: str, jpeg_quality: int = 95, compress_level: Optional[int] = None,
           params: Optional[list] = None) -> bytes:
    """Encode ``arr`` as ``ext``; ``compress_level`` is the PNG compression (OpenCV's default when None); ``params``
    (OpenCV's ``imwrite`` flags) replace the ones made from ``jpeg_quality`` and ``compress_level``.

    Raises:
        OSError: OpenCV cannot encode the array as ``ext`` (it returned no data, or raised).
    """
    if params is None:
        params = []
        if ext in ('jpg', 'jpeg'):
            params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]
        elif ext == 'webp':
            params = [cv2.IMWRITE_WEBP_QUALITY, 100]
        elif ext == 'png' and compress_level is not None:
            params = [cv2.IMWRITE_PNG_COMPRESSION, compress_level]
    try:
        ok, buf = cv2.imencode('.' + ext, arr, params)
    except cv2.error as e:
        raise OSError(f'OpenCV cannot encode it ({first_line(e)})') from None
    if not ok:
        raise OSError(f'OpenCV cannot encode a {arr.shape} {arr.dtype} image as .{ext}')
    return buf.tobytes()


def basicsr_imwrite(img: np.ndarray, file_path: str, params=None, auto_mkdir: bool = True) -> None:
    """BasicSR's ``imwrite`` (same arguments, OpenCV's encoding), written atomically; a failure raises a
    :class:`~adasr.utils.files.WriteError` naming the file (BasicSR's says "Failed in writing images." and leaves a
    truncated file)."""
    if auto_mkdir:
        os.makedirs(osp.abspath(osp.dirname(file_path)), exist_ok=True)
    try:
        atomic_write_bytes(file_path, encode(img, osp.splitext(file_path)[1].lstrip('.'), params=params or []))
    except OSError as e:
        raise WriteError(f'cannot save {file_path}: {e.strerror or e}') from None


def write_image(path: str, arr: np.ndarray, jpeg_quality: int = 95, compress_level: Optional[int] = None) -> None:
    """Encode a uint8/uint16 gray, BGR or BGRA array by the extension of ``path`` and write it atomically
    (``compress_level``: PNG compression, OpenCV's default when None)."""
    ext = osp.splitext(path)[1].lower().lstrip('.')
    atomic_write_bytes(path, encode(arr, ext, jpeg_quality, compress_level))
