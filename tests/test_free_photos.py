"""The free real-photo set: catalogue, naming, the embedded-JPEG reader and the assembly into train / Test4K /
Test2K with a manifest, on a fake unpacked package tree (no download in the tests)."""
import csv
import os
import os.path as osp
import shutil

import cv2
import numpy as np
import pytest

from adasr.data.free_photos import CATALOGUE, PACKAGES, Photo, assemble, largest_embedded_jpeg, output_name
from adasr.utils.image_io import read_uint8
from adasr.utils.matlab_resize import imresize_uint8

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


def _photo(h, w):
    img = cv2.imread(osp.join(REPO, 'datasets', 'demo', 'train', 'HR', 'coffee.png'), cv2.IMREAD_COLOR)
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC)


def test_catalogue():
    assert len(CATALOGUE) == 84 and len({output_name(p) for p in CATALOGUE}) == 84
    assert len(PACKAGES) == 10
    assert output_name(CATALOGUE[0]) == 'plasma-workspace-wallpapers__BytheWater.jpg'
    edj = [p for p in CATALOGUE if p.embedded]
    assert len(edj) == 14 and output_name(edj[0]) == 'enlightenment-data__Bamboo.jpg'


def test_largest_embedded_jpeg():
    small = cv2.imencode('.jpg', _photo(8, 8))[1].tobytes()
    large = cv2.imencode('.jpg', _photo(16, 24))[1].tobytes()
    blob = b'EET\x00header' + small + b'junk\xff\xd8\xff broken' + large + b'tail'
    assert largest_embedded_jpeg(blob) == large
    with pytest.raises(ValueError, match='no decodable JPEG'):
        largest_embedded_jpeg(b'nothing here')


def test_assemble_train_tests_and_manifest(tmp_path):
    pkgs = tmp_path / 'unpacked'
    cat = [Photo('pkg-a', '/usr/share/a/wide.png', 'CC0-1.0'),           # >= crop, landscape: test sets
           Photo('pkg-a', '/usr/share/a/small.jpg', 'GPL-2+'),           # too small: train
           Photo('pkg-b', '/usr/share/b/tall.png', 'CC-BY-4.0'),         # portrait: train
           Photo('pkg-c', '/usr/share/c/Pic.edj', 'BSD', embedded=True),  # archive: largest JPEG, train
           Photo('pkg-c', '/usr/share/c/absent.jpg', 'BSD')]             # not in the package: reported
    wide = _photo(50, 70)
    for rel, img in (('pkg-a/usr/share/a/wide.png', wide), ('pkg-b/usr/share/b/tall.png', _photo(70, 50))):
        os.makedirs(osp.dirname(pkgs / rel), exist_ok=True)
        cv2.imwrite(str(pkgs / rel), img)
    cv2.imwrite(str(pkgs / 'pkg-a/usr/share/a/small.jpg'), _photo(20, 30))
    os.makedirs(pkgs / 'pkg-c/usr/share/c')
    (pkgs / 'pkg-c/usr/share/c/Pic.edj').write_bytes(b'x' + cv2.imencode('.jpg', _photo(12, 12))[1].tobytes())
    logs = []
    counts = assemble(str(pkgs), str(tmp_path / 'out'), cat, crop=(48, 32), versions={'pkg-a': '1.0'},
                      log=logs.append)
    assert counts == {'train': 3, 'Test4K': 1, 'Test2K': 1}
    assert sorted(os.listdir(tmp_path / 'out' / 'train' / 'HR')) == [
        'pkg-a__small.jpg', 'pkg-b__tall.png', 'pkg-c__Pic.jpg']
    # the original bytes are kept for training
    original = (pkgs / 'pkg-a/usr/share/a/small.jpg').read_bytes()
    assert (tmp_path / 'out/train/HR/pkg-a__small.jpg').read_bytes() == original
    crop = wide[9:41, 11:59]  # centre 48x32 of 70x50
    np.testing.assert_array_equal(read_uint8(str(tmp_path / 'out/Test4K/HR/X4/pkg-a__wide.png')), crop)
    np.testing.assert_array_equal(read_uint8(str(tmp_path / 'out/Test4K/LR/X4/pkg-a__wide.png')),
                                  imresize_uint8(crop, 0.25))
    hr2k = imresize_uint8(crop, 0.5)
    np.testing.assert_array_equal(read_uint8(str(tmp_path / 'out/Test2K/HR/X4/pkg-a__wide.png')), hr2k)
    assert read_uint8(str(tmp_path / 'out/Test2K/LR/X4/pkg-a__wide.png')).shape == (4, 6, 3)
    with open(tmp_path / 'out' / 'manifest.csv') as f:
        rows = list(csv.DictReader(f))
    assert [(r['set'], r['file']) for r in rows] == [('Test4K', 'pkg-a__wide.png'), ('Test2K', 'pkg-a__wide.png'),
                                                    ('train', 'pkg-a__small.jpg'), ('train', 'pkg-b__tall.png'),
                                                    ('train', 'pkg-c__Pic.jpg')]
    assert rows[0]['version'] == '1.0' and rows[0]['licence'] == 'CC0-1.0' and len(rows[0]['sha256']) == 64
    assert any('absent.jpg' in line for line in logs)
    # the benchmark reads the test sets as they are
    from benchmarks.harness import find_dataset

    assert len(find_dataset(str(tmp_path / 'out' / 'Test2K'), 4).pairs) == 1
    # the packages gone (removed after a run): an error, and the licence record is kept, not emptied
    manifest = (tmp_path / 'out' / 'manifest.csv').read_bytes()
    shutil.rmtree(pkgs)
    with pytest.raises(RuntimeError, match='none of the catalogued photos is in the unpacked packages .*manifest.csv '
                                           'is unchanged'):
        assemble(str(pkgs), str(tmp_path / 'out'), cat, crop=(48, 32), log=logs.append)
    assert (tmp_path / 'out' / 'manifest.csv').read_bytes() == manifest
