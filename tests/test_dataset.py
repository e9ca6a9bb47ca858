"""PairedSRDataset: BasicSR's paired dataset with errors that name the file, and odd image types."""
import os
import os.path as osp

import cv2
import numpy as np
import pytest

from adasr.data.paired_dataset import DatasetError, PairedSRDataset
from adasr.data.prepare import folder_to_lmdb


def _by_name(ds, name):
    for i in range(len(ds)):
        if osp.basename(ds.paths[i]['gt_path']).startswith(name):
            return i
    raise KeyError(name)


def _opt(hr, lr, backend='disk', phase='val'):
    return {'name': 'tiny', 'type': 'PairedSRDataset', 'dataroot_gt': hr, 'dataroot_lq': lr, 'phase': phase,
            'scale': 4, 'io_backend': {'type': backend}, 'gt_size': 32, 'use_hflip': True, 'use_rot': True}


def test_disk_and_lmdb_give_identical_samples(tiny_pairs, tmp_path):
    hr, lr = tiny_pairs
    folder_to_lmdb(hr, str(tmp_path / 'hr.lmdb'))
    folder_to_lmdb(lr, str(tmp_path / 'lr.lmdb'))
    disk = PairedSRDataset(_opt(hr, lr))
    lmdb = PairedSRDataset(_opt(str(tmp_path / 'hr.lmdb'), str(tmp_path / 'lr.lmdb'), backend='lmdb'))
    assert len(disk) == len(lmdb) == 2
    for name in ('astronaut', 'coffee'):
        a, b = disk[_by_name(disk, name)], lmdb[_by_name(lmdb, name)]
        assert a['gt'].shape == (3, 48, 48) and a['lq'].shape == (3, 12, 12)
        assert (a['gt'] - b['gt']).abs().max() == 0 and (a['lq'] - b['lq']).abs().max() == 0
    with pytest.raises(FileExistsError):
        folder_to_lmdb(hr, str(tmp_path / 'hr.lmdb'))


def test_missing_roots_and_non_lmdb(tiny_pairs, tmp_path):
    hr, lr = tiny_pairs
    with pytest.raises(DatasetError, match='dataroot_gt does not exist: /no/where'):
        PairedSRDataset(_opt('/no/where', lr))
    with pytest.raises(DatasetError, match='not a BasicSR LMDB'):
        PairedSRDataset(_opt(hr, lr, backend='lmdb'))
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(DatasetError):
        PairedSRDataset(_opt(str(empty), str(empty)))


def test_unreadable_image_is_named(tiny_pairs):
    hr, lr = tiny_pairs
    bad = osp.join(lr, 'coffee.png')
    with open(bad, 'wb') as f:
        f.write(b'not a png at all')
    ds = PairedSRDataset(_opt(hr, lr))
    ds[_by_name(ds, 'astronaut')]  # the other pair is fine
    with pytest.raises(DatasetError, match=f'cannot read LR image {bad}$'):
        ds[_by_name(ds, 'coffee')]


def test_folders_of_different_counts_name_the_unpaired_files_and_an_lmdb_given_as_disk_is_named(tiny_pairs,
                                                                                                tmp_path):
    import shutil

    hr, lr = tiny_pairs
    gt = tmp_path / 'gt'
    shutil.copytree(hr, gt)
    (gt / 'README.txt').write_text('a stray file')  # BasicSR lists every file of the folder
    with pytest.raises(DatasetError, match=r'different number of images.*GT files without a partner in .*gt: '
                                           r'README.txt\)'):
        PairedSRDataset(_opt(str(gt), lr))
    lmdb_like = tmp_path / 'x.lmdb'
    lmdb_like.mkdir()
    (lmdb_like / 'data.mdb').write_bytes(b'')
    (lmdb_like / 'meta_info.txt').write_text('')
    with pytest.raises(DatasetError, match=r'is a BasicSR LMDB .* but io_backend is disk: set io_backend: '
                                           r'\{type: lmdb\}'):
        PairedSRDataset(_opt(hr, str(lmdb_like)))


def test_grayscale_alpha_and_16bit_inputs_become_rgb(tiny_pairs):
    hr, lr = tiny_pairs
    for folder in (hr, lr):
        img = cv2.imread(osp.join(folder, 'astronaut.png'))
        gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        os.remove(osp.join(folder, 'astronaut.png'))
        cv2.imwrite(osp.join(folder, 'astronaut.png'), gray)
        rgba = cv2.cvtColor(cv2.imread(osp.join(folder, 'coffee.png')), cv2.COLOR_BGR2BGRA)
        cv2.imwrite(osp.join(folder, 'coffee.png'), (rgba.astype(np.uint16) * 257))
    ds = PairedSRDataset(_opt(hr, lr))
    g, c = ds[_by_name(ds, 'astronaut')], ds[_by_name(ds, 'coffee')]
    assert g['gt'].shape == (3, 48, 48) and c['gt'].shape == (3, 48, 48)
    assert (g['gt'][0] - g['gt'][1]).abs().max() == 0  # gray replicated into three channels


def test_training_set_smaller_than_a_batch_is_refused(tiny_pairs):
    """Two pairs and batch_size_per_gpu 4: BasicSR's loader drops the incomplete batch, every epoch is empty and the
    run ends at once with untrained weights and exit 0 (before); refused with the numbers to change."""
    hr, lr = tiny_pairs
    opt = dict(_opt(hr, lr, phase='train'), batch_size_per_gpu=4)
    with pytest.raises(DatasetError, match='2 image pairs x dataset_enlarge_ratio 1 over 1 process.*fewer than '
                                           'batch_size_per_gpu 4'):
        PairedSRDataset(opt)
    assert len(PairedSRDataset(dict(opt, dataset_enlarge_ratio=2))) == 2


def test_lmdb_key_mismatch_and_meta_info_file_are_named(tiny_pairs, tmp_path):
    hr, lr = tiny_pairs
    folder_to_lmdb(hr, str(tmp_path / 'hr.lmdb'))
    os.remove(osp.join(lr, 'coffee.png'))
    folder_to_lmdb(lr, str(tmp_path / 'lr.lmdb'))
    opt = _opt(str(tmp_path / 'hr.lmdb'), str(tmp_path / 'lr.lmdb'), backend='lmdb')
    with pytest.raises(DatasetError, match=r'hold different keys: only in the LR one: none; only in the GT one: '
                                           r'coffee'):
        PairedSRDataset(opt)
    with pytest.raises(DatasetError, match='meta_info_file is not used with io_backend lmdb'):
        PairedSRDataset(dict(opt, meta_info_file=str(tmp_path / 'meta.txt')))


def test_lr_pngs_of_jpeg_gts_are_paired_by_name(tiny_pairs, tmp_path):
    """generate_bicubic_lr.py writes the LR of 0001.jpg as 0001.png; BasicSR pairs by the whole file name and
    failed with "astronaut.jpg is not in lq_paths"."""
    hr, lr = tiny_pairs
    for name in ('astronaut', 'coffee'):
        img = cv2.imread(osp.join(hr, f'{name}.png'))
        os.remove(osp.join(hr, f'{name}.png'))
        cv2.imwrite(osp.join(hr, f'{name}.jpg'), img, [cv2.IMWRITE_JPEG_QUALITY, 100])
    ds = PairedSRDataset(_opt(hr, lr))
    assert [(osp.basename(p['gt_path']), osp.basename(p['lq_path'])) for p in ds.paths] == [
        ('astronaut.jpg', 'astronaut.png'), ('coffee.jpg', 'coffee.png')]
    assert ds[0]['gt'].shape == (3, 48, 48)
    os.remove(osp.join(lr, 'coffee.png'))
    cv2.imwrite(osp.join(lr, 'other.png'), np.zeros((12, 12, 3), np.uint8))
    with pytest.raises(DatasetError, match=r'coffee.jpg has no LR image named coffee.\* in'):
        PairedSRDataset(_opt(hr, lr))


def test_training_pair_of_another_scale_is_named(tiny_pairs):
    hr, lr = tiny_pairs
    img = cv2.imread(osp.join(hr, 'coffee.png'))
    cv2.imwrite(osp.join(lr, 'coffee.png'), cv2.resize(img, (24, 24), interpolation=cv2.INTER_AREA))  # an x2 LR
    ds = PairedSRDataset(dict(_opt(hr, lr, phase='train'), batch_size_per_gpu=1))
    with pytest.raises(DatasetError, match=r'training pair .*coffee.png / .*coffee.png .*: Scale mismatches. GT '
                                           r'\(48, 48\) is not 4x multiplication of LQ \(24, 24\).$'):
        ds[_by_name(ds, 'coffee')]  # BasicSR's two-part message as one sentence, not a tuple
    small = PairedSRDataset(dict(_opt(hr, lr, phase='train'), batch_size_per_gpu=1, gt_size=400))
    with pytest.raises(DatasetError, match=r'smaller than patch size .*\(or lower datasets.\*.gt_size\)'):
        small[_by_name(small, 'astronaut')]


def test_lmdb_training_pairs_that_cannot_be_cropped_are_named_at_construction(tiny_pairs, tmp_path):
    """The sizes in meta_info.txt are checked before any sample is read: a GT smaller than gt_size, or an LR of
    another scale, is an error naming the key (folders: when the pair is drawn, the test above)."""
    hr, lr = tiny_pairs
    folder_to_lmdb(hr, str(tmp_path / 'hr.lmdb'))
    folder_to_lmdb(lr, str(tmp_path / 'lr.lmdb'))
    opt = dict(_opt(str(tmp_path / 'hr.lmdb'), str(tmp_path / 'lr.lmdb'), backend='lmdb', phase='train'),
               batch_size_per_gpu=1)
    assert len(PairedSRDataset(opt)) == 2  # 48x48 GTs, gt_size 32
    with pytest.raises(DatasetError, match=r"key 'astronaut' of .*hr.lmdb/meta_info.txt is 48x48, smaller than "
                                           r'gt_size 64'):
        PairedSRDataset(dict(opt, gt_size=64))
    assert len(PairedSRDataset(dict(opt, gt_size=64, phase='val'))) == 2  # no crop outside training
    img = cv2.imread(osp.join(hr, 'coffee.png'))
    cv2.imwrite(osp.join(lr, 'coffee.png'), cv2.resize(img, (24, 24), interpolation=cv2.INTER_AREA))  # an x2 LR
    folder_to_lmdb(lr, str(tmp_path / 'lr2.lmdb'))
    with pytest.raises(DatasetError, match=r"key 'coffee' .* is 48x48 but its LR in .*lr2.lmdb is 24x24: not x4"):
        PairedSRDataset(dict(opt, dataroot_lq=str(tmp_path / 'lr2.lmdb')))


def test_worker_errors_keep_their_own_message():
    """A DataLoader re-raises a worker's error with its whole traceback in the text; the entry prints the worker's
    message alone."""
    from torch.utils.data import DataLoader, Dataset

    from adasr.cli.entry import worker_message

    class Broken(Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            raise DatasetError('cannot read image /data/x.png')

    with pytest.raises(DatasetError) as err:
        next(iter(DataLoader(Broken(), num_workers=1, multiprocessing_context='fork')))
    assert 'Original Traceback' in str(err.value)
    assert worker_message(err.value) == 'cannot read image /data/x.png'
    assert worker_message(DatasetError('plain')) == 'plain'
