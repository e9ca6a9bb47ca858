"""BasicSR's PairedImageDataset with checks that name the file when something is wrong."""
import os.path as osp

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


@DATASET_REGISTRY.register()
class PairedSRDataset(PairedImageDataset):
    """Paired LR/HR images from folders, a meta-info file or LMDBs: exactly BasicSR's ``PairedImageDataset``
    (same options, same outputs), plus:

    * missing roots, non-LMDB folders given to ``io_backend: lmdb`` and empty sets fail at construction with the
      path in the message;
    * an image that cannot be decoded fails with its path (BasicSR raises ``'NoneType' object has no attribute
      'astype'``);
    * grayscale and RGBA files are read as 3-channel colour (BasicSR's ``imfrombytes`` default, made explicit).
    """

    def __init__(self, opt):
        backend = opt['io_backend']['type']
        check_data_root(opt.get('dataroot_gt'), backend, f"dataset {opt.get('name')!r}: dataroot_gt")
        check_data_root(opt.get('dataroot_lq'), backend, f"dataset {opt.get('name')!r}: dataroot_lq")
        try:
            super().__init__(opt)
        except (AssertionError, ValueError) as e:
            raise DatasetError(f"dataset {opt.get('name')!r}: {e}") from e
        if len(self.paths) == 0:
            raise DatasetError(f"dataset {opt.get('name')!r} is empty: {opt['dataroot_lq']}")

    def __getitem__(self, index):
        try:
            return super().__getitem__(index)
        except Exception as e:  # noqa: BLE001 - re-raised with the file that caused it
            bad = self._unreadable(index)
            if bad is None:
                raise
            raise DatasetError(f'cannot read image {bad}') from e

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
