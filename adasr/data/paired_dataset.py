"""BasicSR's PairedImageDataset with checks that name the file when something is wrong."""
import math
import os.path as osp
import re
from typing import Dict, Iterable, List, Optional, Tuple

from basicsr.data.paired_image_dataset import PairedImageDataset
from basicsr.utils import imfrombytes
from basicsr.utils.dist_util import get_dist_info
from basicsr.utils.registry import DATASET_REGISTRY

from adasr.utils.checks import scale_mismatch
from adasr.utils.image_io import image_size

#: how an LMDB is made, in errors: the repository's script, or the same function from an installed package
_MAKE_LMDB = ("scripts/data_preparation/create_lmdb.py (adasr's repository) or "
              'adasr.data.prepare.folder_to_lmdb(folder, lmdb_path)')


class DatasetError(RuntimeError):
    """A dataset folder, LMDB or image that cannot be used."""


def check_data_root(path: str, io_backend: str, what: str) -> None:
    """Raise a :class:`DatasetError` naming ``path`` when it is not a usable folder or LMDB."""
    if path is None:
        raise DatasetError(f'{what} is not set')
    if not osp.isdir(path):
        raise DatasetError(f'{what} does not exist: {path}')
    if io_backend == 'disk' and osp.isfile(osp.join(path, 'data.mdb')) and osp.isfile(osp.join(path, 'meta_info.txt')):
        raise DatasetError(f'{what} is a BasicSR LMDB ({path} holds data.mdb and meta_info.txt) but io_backend is '
                           'disk: set io_backend: {type: lmdb}')
    if io_backend == 'lmdb':
        for name in ('data.mdb', 'meta_info.txt'):
            if not osp.isfile(osp.join(path, name)):
                raise DatasetError(f'{what} is not a BasicSR LMDB (no {name}): {path}; '
                                   f'make one with {_MAKE_LMDB}')


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
    remake = f'make it again with {_MAKE_LMDB}'
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


_SIZE = re.compile(r'\((\d+),\s*(\d+)(?:,\s*\d+)?\)')


def _meta_info(path: str) -> List[Tuple[str, Optional[Tuple[int, int]]]]:
    """(key, (height, width) or None) of each line of a BasicSR LMDB's ``meta_info.txt`` (``name.png (h,w,c)
    level``), the key read as BasicSR reads it (up to the first dot)."""
    with open(osp.join(path, 'meta_info.txt')) as f:
        lines = [(line.split('.')[0], _SIZE.search(line)) for line in f]
    return [(key, (int(m.group(1)), int(m.group(2))) if m else None) for key, m in lines]


def _meta_keys(path: str) -> List[str]:
    return [key for key, _ in _meta_info(path)]


def _meta_sizes(path: str) -> Dict[str, Tuple[int, int]]:
    """(height, width) of each key whose ``meta_info.txt`` line gives it."""
    return {key: size for key, size in _meta_info(path) if size is not None}


def _check_crop_sizes(lq: str, gt: str, scale: int, gt_size: int, name: str) -> None:
    """Every LMDB training pair can be cropped as BasicSR's ``paired_random_crop`` will: the GT is ``scale`` times
    its LR and at least ``gt_size`` on each side. Sizes come from the two ``meta_info.txt`` files (no image is
    read), so a bad pair is named at construction instead of at the step that first draws it."""
    lq_sizes, gt_sizes = _meta_sizes(lq), _meta_sizes(gt)
    for key, (h, w) in sorted(gt_sizes.items()):
        if key not in lq_sizes:
            continue
        lh, lw = lq_sizes[key]
        where = f'{name}: key {key!r} of {osp.join(gt, "meta_info.txt")}'
        if (h, w) != (lh * scale, lw * scale):
            raise DatasetError(f'{where} is {h}x{w} but its LR in {lq} is {lh}x{lw}: not x{scale} (is this the LR of '
                               'another scale?)')
        if min(h, w) < gt_size:
            raise DatasetError(f'{where} is {h}x{w}, smaller than gt_size {gt_size}: no {gt_size}x{gt_size} '
                               'training crop fits; lower gt_size or leave the image out')


def _check_same_keys(lq: str, gt: str, name: str) -> None:
    """The LR and GT LMDBs list the same keys; otherwise an error naming both and some keys of each side."""
    lq_keys, gt_keys = set(_meta_keys(lq)), set(_meta_keys(gt))
    if lq_keys != gt_keys:
        def some(keys):
            keys = sorted(keys)
            return ', '.join(keys[:5]) + (' ...' if len(keys) > 5 else '') if keys else 'none'

        raise DatasetError(f'{name}: the LMDBs {lq} and {gt} hold different keys: only in the LR one: '
                           f'{some(lq_keys - gt_keys)}; only in the GT one: {some(gt_keys - lq_keys)}')


def _pair_by_stem(lq_folder: str, gt_folder: str, tmpl: str, name: str) -> List[dict]:
    """Pairs of images whose names match without their extension (``0001.jpg`` with ``0001.png``: the bicubic LR
    that ``generate_bicubic_lr.py`` writes of a JPEG), for folders whose extensions differ; BasicSR pairs by the
    whole name. Each GT needs exactly one LR image named ``filename_tmpl`` of its stem."""
    from adasr.data.prepare import list_images

    by_stem: dict = {}
    for f in list_images(lq_folder):
        by_stem.setdefault(osp.splitext(f)[0], []).append(f)
    paths = []
    for f in list_images(gt_folder):
        want = tmpl.format(osp.splitext(f)[0])
        found = by_stem.get(want, [])
        if len(found) != 1:
            raise DatasetError(f'{name}: {osp.join(gt_folder, f)} has {"no" if not found else len(found)} LR '
                               f'image{"s" if found else ""} named {want}.* in {lq_folder}'
                               f'{": " + ", ".join(found) if found else ""}')
        paths.append({'lq_path': osp.join(lq_folder, found[0]), 'gt_path': osp.join(gt_folder, f)})
    return paths


def _unpaired(lq_folder: str, gt_folder: str, tmpl: str, limit: int = 5) -> str:
    """The files of two folders of different counts that have no partner (names matched without extensions, as
    :func:`_pair_by_stem`), in words; every file BasicSR lists counts (a README.txt too)."""
    from basicsr.utils import scandir

    lq = {osp.splitext(f)[0]: f for f in scandir(lq_folder)}
    gt = {tmpl.format(osp.splitext(f)[0]): f for f in scandir(gt_folder)}
    parts = []
    for label, own, other, folder in (('GT', gt, lq, gt_folder), ('LR', lq, gt, lq_folder)):
        alone = sorted(own[k] for k in own if k not in other)
        if alone:
            more = f' and {len(alone) - limit} more' if len(alone) > limit else ''
            parts.append(f'{label} files without a partner in {folder}: {", ".join(alone[:limit])}{more}')
    return '(' + '; '.join(parts) + ')' if parts else ''


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
    * grayscale and RGBA files are read as 3-channel colour (BasicSR's ``imfrombytes`` default, made explicit);
    * LR and GT files whose names differ only in their extension are paired (BasicSR pairs by the whole name);
    * LMDBs whose keys differ are named with the keys, ``meta_info_file`` with LMDBs is refused (BasicSR ignores it),
      a training set with fewer samples per process than ``batch_size_per_gpu`` is refused (BasicSR would run empty
      epochs and end without a step), and a training pair that cannot be cropped (an LR of another scale, smaller
      than ``gt_size / scale``) is named: for LMDBs at construction (the sizes in ``meta_info.txt``), for folders
      when the pair is first drawn.
    """

    def __init__(self, opt):
        backend = self._backend = opt['io_backend']['type']
        name = f"dataset {opt.get('name')!r}"
        check_data_root(opt.get('dataroot_gt'), backend, f'{name}: dataroot_gt')
        check_data_root(opt.get('dataroot_lq'), backend, f'{name}: dataroot_lq')
        if backend == 'lmdb':
            if opt.get('meta_info_file'):
                raise DatasetError(f'{name}: meta_info_file is not used with io_backend lmdb (BasicSR lists the '
                                   "LMDB's own meta_info.txt): remove it, or train on the image folders (io_backend "
                                   'disk) to use a subset')
            _check_same_keys(opt['dataroot_lq'], opt['dataroot_gt'], name)
            opt['io_backend'].update(readonly=True, lock=False)
        try:
            super().__init__(opt)
        except AssertionError as e:
            if backend == 'disk' and not opt.get('meta_info_file') and 'different number' in str(e):
                unpaired = _unpaired(opt['dataroot_lq'], opt['dataroot_gt'], self.filename_tmpl)
                raise DatasetError(f'{name}: {e} {unpaired}') from e
            if backend != 'disk' or opt.get('meta_info_file') or 'is not in' not in str(e):
                raise DatasetError(f'{name}: {e}') from e
            self.paths = _pair_by_stem(opt['dataroot_lq'], opt['dataroot_gt'], self.filename_tmpl, name)
        except ValueError as e:
            raise DatasetError(f'{name}: {e}') from e
        if len(self.paths) == 0:
            raise DatasetError(f"{name} is empty: {opt['dataroot_lq']}")
        if backend == 'lmdb':
            for key in ('gt', 'lq'):
                check_lmdb(opt[f'dataroot_{key}'], [p[f'{key}_path'] for p in self.paths], f'{name}: dataroot_{key}')
            if opt.get('phase') == 'train' and opt.get('gt_size'):
                _check_crop_sizes(opt['dataroot_lq'], opt['dataroot_gt'], opt['scale'], opt['gt_size'], name)
        if opt.get('phase') == 'train' and opt.get('batch_size_per_gpu'):
            # BasicSR's sampler gives each process ceil(n x ratio / world) samples and its loader drops an
            # incomplete batch: fewer samples than a batch make empty epochs, and the run ends without a step
            ratio, world = opt.get('dataset_enlarge_ratio', 1), get_dist_info()[1]
            per_process = math.ceil(len(self.paths) * ratio / world)
            if per_process < opt['batch_size_per_gpu']:
                raise DatasetError(
                    f"{name}: {len(self.paths)} image pairs x dataset_enlarge_ratio {ratio} over {world} "
                    f"process(es) give {per_process} samples per process, fewer than batch_size_per_gpu "
                    f"{opt['batch_size_per_gpu']}: no batch would ever be full (BasicSR drops incomplete ones) and no "
                    'training step would run; lower batch_size_per_gpu or raise dataset_enlarge_ratio')

    def __getitem__(self, index):
        try:
            sample = super().__getitem__(index)
        except Exception as e:  # noqa: BLE001 - re-raised with the file that caused it
            bad = self._unreadable(index)
            if bad is not None:
                key, path = bad
                where = f" in the LMDB {self.opt[f'dataroot_{key}']}" if self._backend == 'lmdb' else ''
                raise DatasetError(f'cannot read {"GT" if key == "gt" else "LR"} image {path}{where}') from e
            if isinstance(e, ValueError):  # BasicSR's crop: an LR of another scale, or smaller than gt_size / scale
                where = self.paths[index]
                text = ''.join(e.args) if e.args and all(isinstance(a, str) for a in e.args) else str(e)
                if 'smaller than patch size' in text:  # BasicSR says "Please remove <file>": a smaller crop works too
                    text += ' (or lower datasets.*.gt_size)'
                raise DatasetError(f"training pair {where['gt_path']} / {where['lq_path']} (dataroot_gt "
                                   f"{self.opt['dataroot_gt']}): {text}") from e
            raise
        if self.opt['phase'] != 'train':  # BasicSR crops GT to LQ x scale; a GT smaller than that fails in a metric
            scale = self.opt['scale']
            lq, gt = tuple(sample['lq'].shape[-2:]), tuple(sample['gt'].shape[-2:])
            if gt != (lq[0] * scale, lq[1] * scale):
                raise DatasetError(f"{sample['gt_path']} is {gt[0]}x{gt[1]} but its LR {sample['lq_path']} is "
                                   f'{lq[0]}x{lq[1]}: at x{scale} the GT must be at least {lq[0] * scale}x'
                                   f'{lq[1] * scale} (is this the LR of another scale?)')
            if self._backend == 'disk':  # larger by a whole LR pixel or more: BasicSR's crop would hide it
                why = scale_mismatch(lq, image_size(sample['gt_path']), scale)
                if why:
                    raise DatasetError(f"{sample['gt_path']} / {sample['lq_path']}: {why}")
        return sample

    def _unreadable(self, index):
        """The first of the pair's images that does not decode, as (``'lq'`` or ``'gt'``, its path or LMDB key), or
        None."""
        client = self.file_client
        if client is None:  # the failure happened before the file client existed
            return None
        for key in ('lq', 'gt'):
            path = self.paths[index][f'{key}_path']
            try:
                imfrombytes(client.get(path, key), float32=True)
            except Exception:  # noqa: BLE001
                return key, path
        return None
