"""Dataset preparation helpers used by ``scripts/data_preparation`` (argparse CLIs) and the tests."""
import os
import os.path as osp
import shutil
from typing import List, Optional, Tuple

IMG_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm')


def list_images(folder: str, recursive: bool = False) -> List[str]:
    """Image paths relative to ``folder``, sorted."""
    if not osp.isdir(folder):
        raise FileNotFoundError(f'folder does not exist: {folder}')
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for f in files:
            if f.lower().endswith(IMG_EXTENSIONS):
                out.append(osp.relpath(osp.join(root, f), folder))
        if not recursive:
            break
    return sorted(out)


def lmdb_keys(paths: List[str], strip_suffix: Optional[str] = None) -> List[str]:
    """LMDB keys: the file name without extension (and without ``strip_suffix``, e.g. ``x4`` of DIV2K's
    ``0001x4.png``, so that LR and HR keys match as ``PairedImageDataset`` requires)."""
    keys = []
    for p in paths:
        key = osp.splitext(osp.basename(p))[0]
        if strip_suffix and key.endswith(strip_suffix):
            key = key[:-len(strip_suffix)]
        keys.append(key)
    dup = {k for k in keys if keys.count(k) > 1}
    if dup:
        raise ValueError(f'duplicate LMDB keys (file names must be unique): {sorted(dup)[:5]}')
    return keys


def folder_to_lmdb(folder: str, lmdb_path: str, strip_suffix: Optional[str] = None, overwrite: bool = False,
                   compress_level: int = 1) -> Tuple[int, str]:
    """Write every image of ``folder`` into a BasicSR LMDB (``data.mdb`` + ``meta_info.txt``).

    Uses BasicSR's ``make_lmdb_from_imgs`` (keys are file names without extension) with a map size computed from
    all files rather than from the first one. Returns (number of images, lmdb path).
    """
    from basicsr.utils.lmdb_util import make_lmdb_from_imgs

    if not lmdb_path.endswith('.lmdb'):
        raise ValueError(f"the LMDB path must end with '.lmdb': {lmdb_path}")
    paths = list_images(folder)
    if not paths:
        raise ValueError(f'no images in {folder}')
    if osp.exists(lmdb_path):
        if not overwrite:
            raise FileExistsError(f'{lmdb_path} exists; pass --overwrite to replace it')
        shutil.rmtree(lmdb_path)
    keys = lmdb_keys(paths, strip_suffix)
    total = sum(osp.getsize(osp.join(folder, p)) for p in paths)
    map_size = max(10 * total, 1 << 26)  # PNG level 1 re-encoding can be several times larger than the source
    os.makedirs(osp.dirname(osp.abspath(lmdb_path)), exist_ok=True)
    make_lmdb_from_imgs(folder, lmdb_path, paths, keys, compress_level=compress_level, map_size=map_size)
    return len(paths), lmdb_path
