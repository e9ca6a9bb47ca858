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
    with pytest.raises(DatasetError, match=f'cannot read image {bad}'):
        ds[_by_name(ds, 'coffee')]


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
