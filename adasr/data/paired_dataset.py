"""BasicSR's PairedImageDataset with checks that name the file when something is wrong."""
import os.path as osp
from typing import Iterable

from basicsr.data.paired_image_dataset import PairedImageDataset
from basicsr.utils import imfrombytes
from basicsr.utils.registry import DATASET_REGISTRY


class DatasetError(RuntimeError):
    """A dataset folder, LMDB or image that cannot be used."""


def check_data_root(path: str, io_backend: str, what: str) -> None:
    """Raise a :class:`DatasetError` naming ``path`` when it is not a usable folder or LMDB."""
    if path is None:
        raise DatasetError(f'{what} is not set')
    if not osp.isdir(path):
        raise DatasetError(f'{what} does not exist: {path}')
    if io_backend == 'lmdb':
        for name in ('data.mdb', 'meta_info.txt'):
            if not osp.isfile(osp.join(path, name)):
                raise DatasetError(f'{what} is not a BasicSR LMDB (no {name}): {path}; '
                                   'make one with scripts/data_preparation/create_lmdb.py')


def check_lmdb(path: str, keys: Iterable[str], what: str) -> None:
    """Check a BasicSR LMDB before any sample is read, opening it read-only without a lock file.

    ``data.mdb`` must not be empty, must be as long as its own header says (LMDB maps the file into memory: a
    truncated one kills the process with SIGBUS, with no message, when a missing page is touched), must have an
    intact key tree, and must hold every key of ``keys`` (from ``meta_info.txt``), confirmed with one pass over the
    keys that reads no image.

    Raises:
        DatasetError: naming the file and what is wrong.
    """
    import lmdb

    data = osp.join(path, 'data.mdb')
    size = osp.getsize(data)
    remake = 'make it again with scripts/data_preparation/create_lmdb.py'
    if size == 0:
        raise DatasetError(f'{what}: {data} is empty (0 bytes); {remake}')
    try:
        env = lmdb.open(path, readonly=True, lock=False, readahead=False, max_readers=1)
    except lmdb.Error as e:
        raise DatasetError(f'{what}: {data} is not a readable LMDB ({e}); {remake}') from e
    try:
        needed = (env.info()['last_pgno'] + 1) * env.stat()['psize']  # the header pages only
        if size < needed:
            raise DatasetError(f'{what}: {data} is truncated: {size} bytes, but its header needs {needed}; {remake}')
        with env.begin() as txn:
            present = set(txn.cursor().iternext(keys=True, values=False))
    except lmdb.Error as e:
        raise DatasetError(f'{what}: {data} is corrupted ({e}); {remake}') from e
    finally:
        env.close()
    missing = [k for k in keys if k.encode() not in present]
    if missing:
        raise DatasetError(f'{what}: {len(missing)} key(s) of {osp.join(path, "meta_info.txt")} are not in {data}: '
                           f'{", ".join(missing[:5])}{" ..." if len(missing) > 5 else ""}; {remake}')


@DATASET_REGISTRY.register()
class PairedSRDataset(PairedImageDataset):
    """Paired LR/HR images from folders, a meta-info file or LMDBs: exactly BasicSR's ``PairedImageDataset``
    (same options, same outputs), plus:

    * missing roots, non-LMDB folders given to ``io_backend: lmdb`` and empty sets fail at construction with the
      path in the message;
    * LMDBs are opened read-only without a lock file (``readonly: true, lock: false`` are enforced), and checked at
      construction (:func:`check_lmdb`): an empty or truncated ``data.mdb`` or a ``meta_info.txt`` key missing from
      it is an error naming the file, before any training step;
    * an image that cannot be decoded fails with its path (BasicSR raises ``'NoneType' object has no attribute
      'astype'``);
    * grayscale and RGBA files are read as 3-channel colour (BasicSR's ``imfrombytes`` default, made explicit).
    """

    def __init__(self, opt):
        backend = opt['io_backend']['type']
        name = f"dataset {opt.get('name')!r}"
        check_data_root(opt.get('dataroot_gt'), backend, f'{name}: dataroot_gt')
        check_data_root(opt.get('dataroot_lq'), backend, f'{name}: dataroot_lq')
        if backend == 'lmdb':
            opt['io_backend'].update(readonly=True, lock=False)
        try:
            super().__init__(opt)
        except (AssertionError, ValueError) as e:
            raise DatasetError(f'{name}: {e}') from e
        if len(self.paths) == 0:
            raise DatasetError(f"{name} is empty: {opt['dataroot_lq']}")
        if backend == 'lmdb':
            for key in ('gt', 'lq'):
                check_lmdb(opt[f'dataroot_{key}'], [p[f'{key}_path'] for p in self.paths], f'{name}: dataroot_{key}')

    def __getitem__(self, index):
        try:
            sample = super().__getitem__(index)
        except Exception as e:  # noqa: BLE001 - re-raised with the file that caused it
            bad = self._unreadable(index)
            if bad is None:
                raise
            raise DatasetError(f'cannot read image {bad}') from e
        if self.opt['phase'] != 'train':  # BasicSR crops GT to LQ x scale; a GT smaller than that fails in a metric
            scale = self.opt['scale']
            lq, gt = tuple(sample['lq'].shape[-2:]), tuple(sample['gt'].shape[-2:])
            if gt != (lq[0] * scale, lq[1] * scale):
                raise DatasetError(f"{sample['gt_path']} is {gt[0]}x{gt[1]} but its LR {sample['lq_path']} is "
                                   f'{lq[0]}x{lq[1]}: at x{scale} the GT must be at least {lq[0] * scale}x'
                                   f'{lq[1] * scale} (is this the LR of another scale?)')
        return sample

    def _unreadable(self, index):
        """Return the first of the pair's paths that does not decode, or None."""
        client = self.file_client
        if client is None:  # the failure happened before the file client existed
            return None
        for key in ('lq', 'gt'):
            path = self.paths[index][f'{key}_path']
            try:
                imfrombytes(client.get(path, key), float32=True)
            except Exception:  # noqa: BLE001
                return path
        return None
