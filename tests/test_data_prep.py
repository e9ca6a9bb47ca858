"""Data preparation: sub-images, bicubic LR, benchmark sets, Test2K/4K/8K, LMDBs and the DIV2K/DF2K pipeline, on
tiny real-photo crops (positions and pixels checked, not only counts)."""
import importlib.util
import os
import os.path as osp

import cv2
import numpy as np
import pytest

from adasr.data.paired_dataset import PairedSRDataset
from adasr.data.prepare import (
    DIV8K_TEST_SETS,
    bicubic_lr,
    bicubic_resize,
    build_div8k_test_sets,
    extract_subimages,
    folder_to_lmdb,
    generate_bicubic_lr,
    lmdb_keys,
    mod_crop,
    prepare_benchmark_set,
    prepare_training_set,
    subimage_positions,
)
from adasr.utils.image_io import read_uint8
from adasr.utils.matlab_resize import imresize_uint8

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


def photo(h, w, name='astronaut', top=0, left=0, gray=False):
    img = cv2.imread(osp.join(REPO, 'datasets', 'demo', 'train', 'HR', f'{name}.png'), cv2.IMREAD_COLOR)
    img = np.ascontiguousarray(img[top:top + h, left:left + w])
    assert img.shape[:2] == (h, w)
    return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) if gray else img


def load_script(name):
    path = osp.join(REPO, 'scripts', 'data_preparation', f'{name}.py')
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------------ positions / crops


@pytest.mark.parametrize('length, crop, step, thresh, expected', [
    (1356, 480, 240, 0, [0, 240, 480, 720, 876]),   # DIV2K 0001 height: the last crop is moved flush with the end
    (339, 120, 60, 0, [0, 60, 120, 180, 219]),      # the same at x4: exactly a quarter of the HR offsets
    (480, 480, 240, 0, [0]),
    (479, 480, 240, 0, []),                         # too small: no crop
    (500, 480, 240, 20, [0]),                       # 20 px left over is not more than thresh_size
    (500, 480, 240, 19, [0, 20]),
])
def test_subimage_positions_follow_basicsr(length, crop, step, thresh, expected):
    assert subimage_positions(length, crop, step, thresh) == expected


def test_extract_subimages_positions_names_and_lr_alignment(tmp_path):
    hr = photo(100, 76, top=30, left=50)  # neither side a multiple of 24; 100 = 4*25, 76 = 4*19
    os.makedirs(tmp_path / 'HR')
    cv2.imwrite(str(tmp_path / 'HR' / 'pic_HR.png'), hr)
    lrs = {}
    for s in (2, 4):
        os.makedirs(tmp_path / f'X{s}')
        lrs[s] = bicubic_lr(hr, s)
        cv2.imwrite(str(tmp_path / f'X{s}' / f'pic_HRx{s}.png'), lrs[s])  # DIV2K-style LR name
    out = tmp_path / 'sub'
    report = extract_subimages(str(tmp_path / 'HR'), str(out / 'HR'),
                               {s: (str(tmp_path / f'X{s}'), str(out / f'X{s}')) for s in (2, 4)},
                               crop_size=24, step=12, thresh_size=0, strip_suffix='_HR', progress=False)
    ys, xs = subimage_positions(100, 24, 12), subimage_positions(76, 24, 12)
    assert ys == [0, 12, 24, 36, 48, 60, 72, 76] and xs == [0, 12, 24, 36, 48, 52]
    n = len(ys) * len(xs)
    assert (report.processed, report.skipped, report.written) == (1, 0, 3 * n)
    names = sorted(f for f in os.listdir(out / 'HR') if f.endswith('.png'))
    assert names == [f'pic_s{i:03d}.png' for i in range(1, n + 1)]
    for s in (2, 4):
        assert sorted(f for f in os.listdir(out / f'X{s}')) == names
    index = 0
    for y in ys:
        for x in xs:  # row-major, as BasicSR numbers them
            index += 1
            name = f'pic_s{index:03d}.png'
            np.testing.assert_array_equal(read_uint8(str(out / 'HR' / name)), hr[y:y + 24, x:x + 24])
            for s in (2, 4):
                sub_lr = read_uint8(str(out / f'X{s}' / name))
                np.testing.assert_array_equal(sub_lr, lrs[s][y // s:y // s + 24 // s, x // s:x // s + 24 // s])
    # alignment: away from the crop border, the LR sub-image is the bicubic x1/s of its HR sub-image
    hr_sub = read_uint8(str(out / 'HR' / 'pic_s009.png'))
    lr_sub = read_uint8(str(out / 'X2' / 'pic_s009.png'))
    interior = np.abs(bicubic_lr(hr_sub, 2).astype(int) - lr_sub.astype(int))[3:-3, 3:-3]
    assert interior.max() <= 1
    shifted = np.abs(bicubic_lr(hr[12:36, 2:26], 2).astype(int) - lr_sub.astype(int))[3:-3, 3:-3]
    assert shifted.max() > 10  # a 1-LR-pixel misalignment would be caught


def test_extract_subimages_resumes_and_rejects_wrong_lr(tmp_path):
    hr = photo(48, 48)
    os.makedirs(tmp_path / 'HR')
    os.makedirs(tmp_path / 'X4')
    cv2.imwrite(str(tmp_path / 'HR' / 'a.png'), hr)
    cv2.imwrite(str(tmp_path / 'HR' / 'b.png'), hr[:, ::-1])
    cv2.imwrite(str(tmp_path / 'X4' / 'a.png'), bicubic_lr(hr, 4))
    cv2.imwrite(str(tmp_path / 'X4' / 'b.png'), bicubic_lr(hr[:, ::-1], 4))
    args = (str(tmp_path / 'HR'), str(tmp_path / 'sub'), {4: (str(tmp_path / 'X4'), str(tmp_path / 'sub4'))})
    first = extract_subimages(*args, crop_size=24, step=12, progress=False)
    assert (first.processed, first.written) == (2, 2 * 9 * 2)
    mtime = os.path.getmtime(tmp_path / 'sub' / 'a_s001.png')
    second = extract_subimages(*args, crop_size=24, step=12, progress=False)
    assert (second.processed, second.skipped, second.written) == (0, 2, 0)
    assert os.path.getmtime(tmp_path / 'sub' / 'a_s001.png') == mtime
    os.remove(tmp_path / 'sub' / '.done' / 'b')  # an image interrupted half-way is done again
    assert extract_subimages(*args, crop_size=24, step=12, progress=False).processed == 1

    # a scale added later is cut from the same positions, the HR crops kept; other crop settings are refused
    os.makedirs(tmp_path / 'X2')
    cv2.imwrite(str(tmp_path / 'X2' / 'a.png'), bicubic_lr(hr, 2))
    cv2.imwrite(str(tmp_path / 'X2' / 'b.png'), bicubic_lr(hr[:, ::-1], 2))
    both = {**args[2], 2: (str(tmp_path / 'X2'), str(tmp_path / 'sub2'))}
    added = extract_subimages(args[0], args[1], both, crop_size=24, step=12, progress=False)
    assert (added.processed, added.written) == (2, 2 * 9) and os.path.getmtime(tmp_path / 'sub' / 'a_s001.png') == mtime
    assert sorted(os.listdir(tmp_path / 'sub2')) == sorted(f for f in os.listdir(tmp_path / 'sub') if f != '.done')
    assert extract_subimages(args[0], args[1], both, crop_size=24, step=12, progress=False).skipped == 2
    with pytest.raises(ValueError, match=r"cut with \{'crop_size': 24, 'step': 12, 'thresh_size': 0\}, not "
                                         r"\{'crop_size': 16"):
        extract_subimages(*args, crop_size=16, step=8, progress=False)

    cv2.imwrite(str(tmp_path / 'X4' / 'a.png'), bicubic_lr(hr, 2))  # an x2 file in the x4 folder
    with pytest.raises(ValueError, match=r'X4/a.png is 24x24 but its HR .*a.png is 48x48: not an x4 pair'):
        extract_subimages(str(tmp_path / 'HR'), str(tmp_path / 'other'),
                          {4: (str(tmp_path / 'X4'), str(tmp_path / 'other4'))}, crop_size=24, step=12,
                          progress=False)
    with pytest.raises(ValueError, match='multiples of every scale'):
        extract_subimages(*args, crop_size=26, step=12, progress=False)


# ------------------------------------------------------------------------------------------------ bicubic LR


def test_generate_bicubic_lr_equals_imresize_uint8_and_resumes(tmp_path):
    hr = photo(50, 37, name='coffee', top=20, left=80)
    os.makedirs(tmp_path / 'HR')
    cv2.imwrite(str(tmp_path / 'HR' / '0001.png'), hr)
    outs = {s: str(tmp_path / f'X{s}') for s in (2, 3, 4)}
    report = generate_bicubic_lr(str(tmp_path / 'HR'), outs, suffix_template='x{scale}', progress=False)
    assert (report.processed, report.written) == (1, 3)
    for s in (2, 3, 4):
        lr = read_uint8(osp.join(outs[s], f'0001x{s}.png'))
        cropped = hr[:50 - 50 % s, :37 - 37 % s]
        np.testing.assert_array_equal(lr, imresize_uint8(cropped, 1 / s))
        assert lr.shape[:2] == (50 // s, 37 // s)
    old = 1_000_000_000.0
    orphans = [tmp_path / 'X2' / '.0001x2.png.k1ll3d.adasr-tmp', tmp_path / 'X2' / '.sources' / '.r.json.x.adasr-tmp']
    for p in orphans:  # what a kill -9 during a write leaves
        p.write_bytes(b'half')
        os.utime(p, (old, old))
    again = generate_bicubic_lr(str(tmp_path / 'HR'), outs, suffix_template='x{scale}', progress=False)
    assert (again.processed, again.skipped, again.written) == (0, 1, 0)
    assert not any(p.exists() for p in orphans)


def test_bicubic_resize_large_image_path_equals_imresize_uint8(monkeypatch):
    import adasr.utils.matlab_resize as matlab_resize

    img = photo(40, 44)
    whole = {s: imresize_uint8(img, s) for s in (0.25, 0.5)}  # all channels at once
    monkeypatch.setattr(matlab_resize, 'LARGE_IMAGE_PIXELS', 100)  # force the channel-by-channel path
    np.testing.assert_array_equal(bicubic_resize(img, 0.25), whole[0.25])
    np.testing.assert_array_equal(bicubic_resize(img, 0.5), whole[0.5])


# ------------------------------------------------------------------------------------------------ benchmark sets


def test_benchmark_set_layout_mod_crop_and_grayscale(tmp_path):
    os.makedirs(tmp_path / 'HR')
    cv2.imwrite(str(tmp_path / 'HR' / 'color.png'), photo(50, 37))
    cv2.imwrite(str(tmp_path / 'HR' / 'gray.png'), photo(45, 30, gray=True))
    out = tmp_path / 'benchmark' / 'Tiny'
    report = prepare_benchmark_set({s: str(tmp_path / 'HR') for s in (2, 3, 4)}, str(out), progress=False)
    assert (report.processed, report.written) == (2, 2 * 3 * 2)
    assert sorted(os.listdir(out)) == ['GTmod2', 'GTmod3', 'GTmod4', 'LRbicx2', 'LRbicx3', 'LRbicx4']
    for s in (2, 3, 4):
        for name, src in (('color', photo(50, 37)), ('gray', photo(45, 30, gray=True))):
            gt = read_uint8(str(out / f'GTmod{s}' / f'{name}.png'))
            lq = read_uint8(str(out / f'LRbicx{s}' / f'{name}.png'))
            np.testing.assert_array_equal(gt, mod_crop(src, s))
            assert gt.shape[0] % s == 0 and gt.shape[1] % s == 0
            assert gt.ndim == src.ndim  # grayscale stays grayscale
            np.testing.assert_array_equal(lq, imresize_uint8(gt, 1 / s))
    assert read_uint8(str(out / 'GTmod4' / 'color.png')).shape == (48, 36, 3)
    assert read_uint8(str(out / 'LRbicx3' / 'gray.png')).shape == (15, 10)
    # the prepared folders feed the test dataset: grayscale is read as 3 channels, pairs match
    ds = PairedSRDataset({'name': 'Tiny', 'type': 'PairedSRDataset', 'dataroot_gt': str(out / 'GTmod4'),
                          'dataroot_lq': str(out / 'LRbicx4'), 'io_backend': {'type': 'disk'}, 'phase': 'val',
                          'scale': 4})
    sample = ds[1]
    assert sample['gt'].shape == (3, 44, 28) and sample['lq'].shape == (3, 11, 7)
    # a re-run from the same files skips; from another folder (Urban100 prepared from its half-size x2/HR first,
    # then from x4/HR) the outputs of the old files are made again, not kept as "already done"
    again = prepare_benchmark_set({4: str(tmp_path / 'HR')}, str(out), progress=False)
    assert (again.processed, again.skipped) == (0, 2)
    os.makedirs(tmp_path / 'HR2')
    cv2.imwrite(str(tmp_path / 'HR2' / 'color.png'), photo(100, 74))
    cv2.imwrite(str(tmp_path / 'HR2' / 'gray.png'), photo(45, 30, gray=True))
    redone = prepare_benchmark_set({4: str(tmp_path / 'HR2')}, str(out), progress=False)
    assert (redone.processed, redone.skipped) == (2, 0)
    assert read_uint8(str(out / 'GTmod4' / 'color.png')).shape == (100, 72, 3)


def test_benchmark_set_copies_given_lr_after_checking_its_size(tmp_path):
    hr = photo(48, 40)
    for d in ('HR', 'LR'):
        os.makedirs(tmp_path / d)
    cv2.imwrite(str(tmp_path / 'HR' / 'img_001.png'), hr)
    given = np.full((12, 10, 3), 7, np.uint8)  # recognisable: not what bicubic would give
    cv2.imwrite(str(tmp_path / 'LR' / 'img_001.png'), given)
    prepare_benchmark_set({4: str(tmp_path / 'HR')}, str(tmp_path / 'out'), {4: str(tmp_path / 'LR')},
                          progress=False)
    np.testing.assert_array_equal(read_uint8(str(tmp_path / 'out' / 'LRbicx4' / 'img_001.png')), given)
    cv2.imwrite(str(tmp_path / 'LR' / 'img_001.png'), given[:11])
    with pytest.raises(ValueError, match=r'the given LR of .*img_001.png at x4 is 10x11, expected 10x12'):
        prepare_benchmark_set({4: str(tmp_path / 'HR')}, str(tmp_path / 'out2'), {4: str(tmp_path / 'LR')},
                              progress=False)


# ------------------------------------------------------------------------------------------------ Test2K/4K/8K


def test_div8k_test_sets_sizes_names_and_resume(tmp_path):
    div8k = tmp_path / 'DIV8K'
    os.makedirs(div8k)
    sizes = {1201: (70, 90), 1202: (66, 100), 1301: (70, 90), 1401: (35, 45)}
    for idx, (h, w) in sizes.items():
        cv2.imwrite(str(div8k / f'{idx:04d}.png'), photo(h, w, top=idx % 7, left=idx % 11))
    cv2.imwrite(str(div8k / '0800.png'), photo(20, 20))  # a training image: ignored
    reports = build_div8k_test_sets(str(div8k), str(tmp_path / 'out'), allow_missing=True, progress=False)
    assert {k: (r.processed, r.written) for k, r in reports.items()} == {
        'Test2K': (2, 4), 'Test4K': (1, 2), 'Test8K': (1, 2)}
    for idx, (h, w) in sizes.items():
        name = {12: 'Test2K', 13: 'Test4K', 14: 'Test8K'}[idx // 100]
        factor = DIV8K_TEST_SETS[name][2]
        src = photo(h, w, top=idx % 7, left=idx % 11)
        hr = read_uint8(str(tmp_path / 'out' / name / 'HR' / 'X4' / f'{idx}.png'))
        lr = read_uint8(str(tmp_path / 'out' / name / 'LR' / 'X4' / f'{idx}.png'))
        expected_hr = mod_crop(src if factor == 1 else imresize_uint8(src, factor), 4)
        np.testing.assert_array_equal(hr, expected_hr)
        np.testing.assert_array_equal(lr, imresize_uint8(hr, 0.25))
        assert hr.shape[0] == 4 * lr.shape[0] and hr.shape[1] == 4 * lr.shape[1]
    # Test2K 1201: 70x90 -> ceil(x/4) = 18x23 -> cropped to 16x20; LR 4x5
    assert read_uint8(str(tmp_path / 'out' / 'Test2K' / 'HR' / 'X4' / '1201.png')).shape == (16, 20, 3)
    assert not os.path.exists(tmp_path / 'out' / 'Test2K' / 'HR' / 'X4' / '0800.png')
    stamp = os.path.getmtime(tmp_path / 'out' / 'Test8K' / 'LR' / 'X4' / '1401.png')
    again = build_div8k_test_sets(str(div8k), str(tmp_path / 'out'), allow_missing=True, progress=False)
    assert all((r.processed, r.written) == (0, 0) for r in again.values())
    assert sum(r.skipped for r in again.values()) == 4
    assert os.path.getmtime(tmp_path / 'out' / 'Test8K' / 'LR' / 'X4' / '1401.png') == stamp
    with pytest.raises(FileNotFoundError, match=r'Test2K needs DIV8K images 1201-1300 .* missing 98: 1203.png'):
        build_div8k_test_sets(str(div8k), str(tmp_path / 'out'), sets=['Test2K'], progress=False)


# ------------------------------------------------------------------------------------------------ LMDB + pipeline


def test_lmdb_keys_strip_suffix_and_reject_duplicates():
    assert lmdb_keys(['X4/0001x4.png', 'X4/0002x4.png'], 'x4') == ['0001', '0002']
    assert lmdb_keys(['0001_s001.png'], 'x4') == ['0001_s001']  # no suffix: unchanged
    with pytest.raises(ValueError, match='unique without their extension and x4.*: a/0001x4.png and b/0001.png'):
        lmdb_keys(['a/0001x4.png', 'b/0001.png'], 'x4')
    # BasicSR reads meta_info.txt keys up to the first dot: img.v1 would be read as img and never found
    with pytest.raises(ValueError, match=r'up to the first dot: rename img.v1.png'):
        lmdb_keys(['img.v1.png', 'b.png'])


def test_lmdb_map_is_sized_from_the_decoded_images(tmp_path):
    """A noisy JPEG re-encoded as PNG grows far beyond 10x its file (the old map size: MDB_MAP_FULL on a JPEG
    folder); the map is bounded by the decoded size instead."""
    from adasr.data.prepare import _raw_bytes

    noise = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    path = str(tmp_path / 'noise.jpg')
    cv2.imwrite(path, noise, [cv2.IMWRITE_JPEG_QUALITY, 20])
    png = cv2.imencode('.png', cv2.imread(path), [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].size
    assert png > 10 * os.path.getsize(path) and png <= _raw_bytes(path)
    wide = str(tmp_path / 'wide.png')  # 16-bit RGB: Pillow reads it as 8-bit, the LMDB writer (OpenCV) as 16
    cv2.imwrite(wide, np.random.default_rng(1).integers(0, 65536, (50, 60, 3), dtype=np.uint16))
    png = cv2.imencode('.png', cv2.imread(wide, cv2.IMREAD_UNCHANGED), [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].size
    assert png <= _raw_bytes(wide)


def test_bicubic_lr_refuses_two_images_of_one_name(tmp_path):
    os.makedirs(tmp_path / 'hr')
    cv2.imwrite(str(tmp_path / 'hr' / '0001.png'), photo(16, 16))
    cv2.imwrite(str(tmp_path / 'hr' / '0001.jpg'), photo(16, 16, top=20))
    with pytest.raises(ValueError, match='0001.jpg and 0001.png'):
        generate_bicubic_lr(str(tmp_path / 'hr'), {4: str(tmp_path / 'lr')}, progress=False)
    assert not os.path.exists(tmp_path / 'lr')


def test_interrupted_lmdb_leaves_no_lmdb_behind(tmp_path, monkeypatch):
    """An LMDB is built under a temporary name and renamed when complete: a run killed while writing leaves no
    path that a resumed run (or --skip-existing) would take as finished."""
    import basicsr.utils.lmdb_util as lmdb_util

    src = tmp_path / 'imgs'
    src.mkdir()
    for i in range(3):
        cv2.imwrite(str(src / f'{i}.png'), np.full((8, 8, 3), 40 * i, np.uint8))

    def killed(folder, lmdb_path, *args, **kwargs):
        os.makedirs(lmdb_path)
        open(osp.join(lmdb_path, 'meta_info.txt'), 'w').close()  # basicsr opens it before writing the images
        raise KeyboardInterrupt

    monkeypatch.setattr(lmdb_util, 'make_lmdb_from_imgs', killed)
    with pytest.raises(KeyboardInterrupt):
        folder_to_lmdb(str(src), str(tmp_path / 'out.lmdb'))
    assert not (tmp_path / 'out.lmdb').exists()
    monkeypatch.undo()
    n, path = folder_to_lmdb(str(src), str(tmp_path / 'out.lmdb'))  # the next run starts afresh and completes
    assert n == 3 and (tmp_path / 'out.lmdb' / 'data.mdb').is_file()
    assert not (tmp_path / 'out.partial.lmdb').exists()


def test_lmdb_of_a_folder_with_a_broken_image_names_it(tmp_path):
    """A truncated image stops the LMDB with its name (no partial LMDB left); --overwrite replaces only an LMDB."""
    src = tmp_path / 'imgs'
    src.mkdir()
    for i in range(3):
        cv2.imwrite(str(src / f'{i}.png'), np.full((8, 8, 3), 40 * i, np.uint8))
    data = (src / '1.png').read_bytes()
    (src / '1.png').write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r'1\.png: cannot be decoded'):
        folder_to_lmdb(str(src), str(tmp_path / 'out.lmdb'))
    assert not (tmp_path / 'out.lmdb').exists() and not (tmp_path / 'out.partial.lmdb').exists()
    (tmp_path / 'file.lmdb').write_text('not an lmdb')
    with pytest.raises(ValueError, match='is not an LMDB'):
        folder_to_lmdb(str(src), str(tmp_path / 'file.lmdb'), overwrite=True)
    assert (tmp_path / 'file.lmdb').read_text() == 'not an lmdb'


def test_outputs_never_go_into_an_input_folder(tmp_path):
    hr = tmp_path / 'hr'
    hr.mkdir()
    cv2.imwrite(str(hr / 'a.png'), np.full((16, 16, 3), 90, np.uint8))
    with pytest.raises(ValueError, match='is the input folder'):
        generate_bicubic_lr(str(hr), {2: str(hr)})
    with pytest.raises(ValueError, match='is the input folder'):
        extract_subimages(str(hr), str(hr), crop_size=8, step=8)
    cv2.imwrite(str(hr / 'dot.png'), np.full((1, 1, 3), 90, np.uint8))
    with pytest.raises(ValueError, match='dot.png is 1x1: too small for an x2 LR image'):
        generate_bicubic_lr(str(hr), {2: str(tmp_path / 'lr')}, progress=False)
    assert sorted(os.listdir(hr)) == ['a.png', 'dot.png']
    lr4 = tmp_path / 'lr4'
    lr4.mkdir()
    cv2.imwrite(str(lr4 / 'a.png'), np.full((4, 4, 3), 90, np.uint8))
    with pytest.raises(ValueError, match='are one folder'):  # LR crops would replace the HR crops of one name
        extract_subimages(str(hr), str(tmp_path / 'same'), lr={4: (str(lr4), str(tmp_path / 'same'))},
                          crop_size=8, step=8)
    with pytest.raises(ValueError, match='dot.png is 1x1: too small for an x2 LR image'):
        prepare_benchmark_set({2: str(hr)}, str(tmp_path / 'bench'), progress=False)


def test_subimages_of_images_smaller_than_a_crop_are_an_error(tmp_path):
    hr = tmp_path / 'hr'
    hr.mkdir()
    cv2.imwrite(str(hr / 'a.png'), np.full((64, 64, 3), 90, np.uint8))
    with pytest.raises(SystemExit, match='no sub-image was written: every image .* is smaller than --crop-size 480'):
        load_script('extract_subimages').main(['--hr', str(hr), '--hr-out', str(tmp_path / 'out')])


def test_div2k_pipeline_makes_matching_lmdbs_and_resumes(tmp_path):
    root = tmp_path / 'datasets'
    hr_dir = root / 'DIV2K' / 'DIV2K_train_HR'
    os.makedirs(hr_dir)
    cv2.imwrite(str(hr_dir / '0001.png'), photo(72, 96, top=40, left=40))
    cv2.imwrite(str(hr_dir / '0002.png'), photo(60, 48, name='rocket', top=10, left=100))
    logs = []
    out = prepare_training_set('DIV2K', str(root), scales=(2, 4), crop_size=48, step=24, progress=False,
                               log=logs.append)
    assert out['hr_lmdb'] == str(root / 'DIV2K' / 'DIV2K_train_HR_sub.lmdb')
    assert out['lr_lmdb'] == {s: str(root / 'DIV2K' / f'DIV2K_train_LR_bicubic_X{s}_sub.lmdb') for s in (2, 4)}
    # LR made in DIV2K's layout and names because the download had none
    assert sorted(os.listdir(root / 'DIV2K' / 'DIV2K_train_LR_bicubic' / 'X4')) == ['.sources', '0001x4.png',
                                                                                  '0002x4.png']
    # 0001: 72x96 -> 2x3 crops; 0002: 60x48 -> 2x1 crops
    meta = {s: open(osp.join(p, 'meta_info.txt')).read().split('\n') for s, p in out['lr_lmdb'].items()}
    hr_meta = open(osp.join(out['hr_lmdb'], 'meta_info.txt')).read().split('\n')
    hr_keys = [line.split(' ')[0] for line in hr_meta if line]
    assert hr_keys == [f'0001_s00{i}.png' for i in range(1, 7)] + ['0002_s001.png', '0002_s002.png']
    assert all(line.split(' ')[1] == '(48,48,3)' for line in hr_meta if line)
    for s in (2, 4):
        assert [line.split(' ')[0] for line in meta[s] if line] == hr_keys
        assert all(line.split(' ')[1] == f'({48 // s},{48 // s},3)' for line in meta[s] if line)
    # the LMDB pairs train: BasicSR's paired crop checks their scale and the pixels match the disk sub-images
    ds = PairedSRDataset({'name': 'div2k', 'type': 'PairedSRDataset', 'dataroot_gt': out['hr_lmdb'],
                          'dataroot_lq': out['lr_lmdb'][4], 'io_backend': {'type': 'lmdb'}, 'phase': 'train',
                          'scale': 4, 'gt_size': 32, 'use_hflip': False, 'use_rot': False})
    assert len(ds) == 8
    sample = ds[0]
    assert sample['gt'].shape == (3, 32, 32) and sample['lq'].shape == (3, 8, 8)
    again = prepare_training_set('DIV2K', str(root), scales=(2, 4), crop_size=48, step=24, progress=False,
                                 log=logs.append)
    assert again == out
    assert any('0 images processed, 2 already done, 0 files written' in line for line in logs)
    assert any('DIV2K_train_HR_sub.lmdb exists, kept' in line for line in logs)


def test_scripts_report_errors_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r'error: DIV2K needs .*DIV2K_train_HR'):
        load_script('prepare_div2k').main(['--dataset', 'DIV2K', '--root', str(tmp_path)])
    with pytest.raises(SystemExit, match='error: folder does not exist'):
        load_script('prepare_benchmark').main(['--name', 'Set5', '--hr', str(tmp_path / 'none'),
                                               '--out', str(tmp_path)])
    with pytest.raises(SystemExit, match='Test8K needs DIV8K images 1401-1500'):
        load_script('prepare_test2k4k8k').main(['--div8k', str(tmp_path), '--sets', 'Test8K', '--out',
                                                str(tmp_path)])
    with pytest.raises(SystemExit, match='Test8K needs DIV8K images 1401-1500'):  # gaps allowed, not an empty set
        load_script('prepare_test2k4k8k').main(['--div8k', str(tmp_path), '--sets', 'Test8K', '--out',
                                                str(tmp_path), '--allow-missing'])
    with pytest.raises(SystemExit, match='error: the DIV8K folder .*nowhere does not exist'):
        load_script('prepare_test2k4k8k').main(['--div8k', str(tmp_path / 'nowhere'), '--allow-missing', '--out',
                                                str(tmp_path)])
    hr = tmp_path / 'hr'
    hr.mkdir()
    cv2.imwrite(str(hr / 'a.png'), np.full((16, 16, 3), 90, np.uint8))
    (tmp_path / 'afile').write_text('a file where the output folder goes')
    with pytest.raises(SystemExit, match=r'^error: cannot use .*afile'):
        load_script('generate_bicubic_lr').main(['--input', str(hr), '--output', str(tmp_path / 'afile' / 'X2'),
                                                 '--scales', '2'])


def test_benchmark_script_with_scale_placeholder(tmp_path, capsys):
    for s in (2, 4):
        os.makedirs(tmp_path / f'x{s}' / 'HR')
        cv2.imwrite(str(tmp_path / f'x{s}' / 'HR' / 'img_001.png'), mod_crop(photo(30, 26), s))
    load_script('prepare_benchmark').main(['--name', 'S', '--hr', str(tmp_path / 'x{scale}' / 'HR'),
                                           '--scales', '2', '4', '--out', str(tmp_path / 'bm')])
    assert 'S: 2 images processed' in capsys.readouterr().out
    assert read_uint8(str(tmp_path / 'bm' / 'S' / 'LRbicx4' / 'img_001.png')).shape == (7, 6, 3)
    folder_to_lmdb(str(tmp_path / 'bm' / 'S' / 'GTmod2'), str(tmp_path / 'gt.lmdb'))
    assert open(tmp_path / 'gt.lmdb' / 'meta_info.txt').read().startswith('img_001.png (30,26,3)')


def test_check_bicubic_refuses_half_resolution_hr(tmp_path):
    """SelfExSR's Urban100 x2/HR is half resolution: prepared from it, GTmod2 is half the size of GTmod4, and the
    end-to-end bicubic check stops with a message naming the file instead of reporting a wrong PSNR."""
    import cv2

    spec = importlib.util.spec_from_file_location('check_bicubic', osp.join(REPO, 'scripts', 'check_bicubic.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    img = cv2.imread(osp.join(REPO, 'datasets', 'demo', 'val', 'HR', 'chelsea.png'))[:96, :120]
    for scale, hr in ((2, img[:48, :60]), (4, img)):
        os.makedirs(tmp_path / 'Urban100' / f'GTmod{scale}')
        cv2.imwrite(str(tmp_path / 'Urban100' / f'GTmod{scale}' / 'img_001.png'), hr)
    with pytest.raises(SystemExit, match=r'GTmod2/img_001.png is 60x48 but the x4 ground truth is 120x96'):
        mod.check_same_hr(str(tmp_path), 'Urban100', [2, 4])
    cv2.imwrite(str(tmp_path / 'Urban100' / 'GTmod2' / 'img_001.png'), img)  # same HR for both scales: accepted
    mod.check_same_hr(str(tmp_path), 'Urban100', [2, 4])
