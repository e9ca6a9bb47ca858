"""Fault injection on the data side: broken LMDBs, EXIF-rotated photos, output folders that cannot be written,
NaN/inf in images and network outputs, validation images too small for the metrics. Each case is made with the
project's own tools (LMDBs by ``folder_to_lmdb``, images from the demo photos) and checked for a clear error that
names the file, or for the correct output."""
import glob
import math
import os
import os.path as osp
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch
import yaml

from adasr.cli.upscale import main as upscale_main
from adasr.data.paired_dataset import DatasetError, PairedSRDataset
from adasr.data.prepare import folder_to_lmdb
from adasr.utils.checks import NonFiniteError
from adasr.utils.files import remove_orphan_temporaries
from adasr.utils.image_io import decode_image, read_image, read_rgb, read_uint8

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
#: a small registered BasicSR network with weights (x2)
NET = {'type': 'MSRResNet', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_block': 1, 'upscale': 2}


def _photo(h: int, w: int) -> np.ndarray:
    img = cv2.imread(osp.join(REPO, 'datasets', 'demo', 'val', 'HR', 'chelsea.png'), cv2.IMREAD_COLOR)
    return np.ascontiguousarray(img[40:40 + h, 60:60 + w])


# ---------------------------------------------------------------------------------------------------------- LMDBs


@pytest.fixture
def lmdbs(tiny_pairs, tmp_path):
    """(HR LMDB, LR LMDB) of the two tiny pairs, made by the project's own create-LMDB code."""
    hr, lr = tiny_pairs
    folder_to_lmdb(hr, str(tmp_path / 'hr.lmdb'))
    folder_to_lmdb(lr, str(tmp_path / 'lr.lmdb'))
    return str(tmp_path / 'hr.lmdb'), str(tmp_path / 'lr.lmdb')


def _lmdb_opt(hr, lr):
    return {'name': 'tiny', 'type': 'PairedSRDataset', 'dataroot_gt': hr, 'dataroot_lq': lr, 'phase': 'val',
            'scale': 4, 'io_backend': {'type': 'lmdb'}}


def test_truncated_lmdb_is_refused_at_construction(lmdbs):
    hr, lr = lmdbs
    data = osp.join(hr, 'data.mdb')
    size = osp.getsize(data)
    os.truncate(data, size // 2)
    # before: reading it kills the process with SIGBUS and no message (a real process, plain lmdb as BasicSR opens it)
    code = ('import lmdb, sys\nenv = lmdb.open(sys.argv[1], readonly=True, lock=False, readahead=False)\n'
            'with env.begin() as txn:\n    [len(v) for _, v in txn.cursor()]\n')
    proc = subprocess.run([sys.executable, '-c', code, hr], capture_output=True, timeout=60)
    assert proc.returncode == -7, proc  # SIGBUS
    # after: the dataset refuses it before any sample is read, naming the file and the sizes
    with pytest.raises(DatasetError, match=rf'dataroot_gt: {data} is truncated: {size // 2} bytes, but its header '
                                           rf'needs {size}'):
        PairedSRDataset(_lmdb_opt(hr, lr))


def test_empty_lmdb_is_refused_at_construction(lmdbs):
    hr, lr = lmdbs
    data = osp.join(lr, 'data.mdb')
    os.truncate(data, 0)  # before: lmdb.Error 'Bad file descriptor' at the first sample, after training started
    with pytest.raises(DatasetError, match=rf'dataroot_lq: {data} is empty \(0 bytes\)'):
        PairedSRDataset(_lmdb_opt(hr, lr))
    os.truncate(data, 100)  # not even a header: named too
    with pytest.raises(DatasetError, match=rf'{data} is not a readable LMDB'):
        PairedSRDataset(_lmdb_opt(hr, lr))


def test_corrupted_lmdb_key_tree_is_named(lmdbs):
    hr, lr = lmdbs
    import lmdb

    data = osp.join(hr, 'data.mdb')
    size = osp.getsize(data)
    with lmdb.open(hr, readonly=True, lock=False) as env:
        psize = env.stat()['psize']
    with open(data, 'r+b') as f:  # every page after the two meta pages overwritten: the key tree is garbage
        f.seek(2 * psize)
        f.write(b'\xff' * (size - 2 * psize))
    # before: lmdb.CorruptedError (MDB_CORRUPTED) at the first sample, after training started
    with pytest.raises(DatasetError, match=rf'dataroot_gt: {data} is corrupted \(.*MDB_CORRUPTED'):
        PairedSRDataset(_lmdb_opt(hr, lr))


def test_meta_info_key_missing_from_lmdb_is_named(lmdbs):
    hr, lr = lmdbs
    for folder in (hr, lr):  # BasicSR requires the two meta_info files to list the same keys
        meta = osp.join(folder, 'meta_info.txt')
        lines = open(meta).read().splitlines() + ['ghost.png (48,48,3) 1']
        with open(meta, 'w') as f:
            f.write('\n'.join(lines) + '\n')
    # before: 'cannot read image ghost' only when the sampler first reaches it, iterations into training
    with pytest.raises(DatasetError, match=rf'1 key\(s\) of {hr}/meta_info.txt are not in {hr}/data.mdb: ghost'):
        PairedSRDataset(_lmdb_opt(hr, lr))


def test_lmdb_is_read_without_lock_file_and_samples_unchanged(lmdbs, tiny_pairs):
    hr, lr = lmdbs
    for folder in (hr, lr):
        os.remove(osp.join(folder, 'lock.mdb'))
    opt = _lmdb_opt(hr, lr)
    opt['io_backend'].update(readonly=False, lock=True)  # a writable, locking open is never wanted for training data
    ds = PairedSRDataset(opt)
    assert ds.io_backend_opt['readonly'] is True and ds.io_backend_opt['lock'] is False
    disk = PairedSRDataset({**_lmdb_opt(*tiny_pairs), 'io_backend': {'type': 'disk'}})
    by_key = {osp.splitext(osp.basename(disk.paths[i]['gt_path']))[0]: disk[i]['gt'] for i in range(len(disk))}
    for i in range(len(ds)):
        sample = ds[i]
        assert torch.equal(sample['gt'], by_key[sample['gt_path']])
    assert not osp.exists(osp.join(hr, 'lock.mdb')) and not osp.exists(osp.join(lr, 'lock.mdb'))


# ---------------------------------------------------------------------------------------------------------- EXIF


def _with_orientation(path: str, img_bgr: np.ndarray, orientation: int, fmt: str) -> None:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    kwargs = {'quality': 100} if fmt in ('JPEG', 'WEBP') else {}
    if fmt == 'WEBP':
        kwargs['lossless'] = True
    Image.fromarray(np.ascontiguousarray(img_bgr[..., ::-1])).save(path, fmt, exif=exif.tobytes(), **kwargs)


def test_test_pair_whose_lr_is_of_another_scale_is_named(tiny_pairs, tmp_path):
    """A GT smaller than LR x scale (here the LR of another scale) is named with both sizes, not an assertion deep
    in BasicSR's metric code."""
    from adasr.data.paired_dataset import PairedSRDataset

    hr, lr = tiny_pairs
    big_lr = tmp_path / 'lr'
    big_lr.mkdir()
    for name in os.listdir(lr):
        cv2.imwrite(str(big_lr / name), cv2.resize(cv2.imread(osp.join(lr, name)), (20, 20)))
    def opt(lq):
        return {'name': 'tiny', 'type': 'PairedSRDataset', 'dataroot_gt': hr, 'dataroot_lq': lq, 'phase': 'val',
                'scale': 4, 'io_backend': {'type': 'disk'}}

    with pytest.raises(DatasetError, match=r'is 48x48 but its LR .* is 20x20: at x4 the GT must be at least 80x80'):
        PairedSRDataset(opt(str(big_lr)))[0]
    assert tuple(PairedSRDataset(opt(lr))[0]['gt'].shape) == (3, 48, 48)
    small_lr = tmp_path / 'lr8'  # the LR of x8: BasicSR crops the GT to its top-left quarter and measures that
    small_lr.mkdir()
    for name in os.listdir(lr):
        cv2.imwrite(str(small_lr / name), cv2.resize(cv2.imread(osp.join(lr, name)), (6, 6)))
    with pytest.raises(DatasetError, match=r'the GT is 48x48 but its LR is 6x6: at x4 the GT height must be 24 to '
                                           r'27'):
        PairedSRDataset(opt(str(small_lr)))[0]


@pytest.mark.parametrize('fmt', ['JPEG', 'PNG', 'WEBP', 'TIFF'])
def test_exif_orientation_as_basicsr_reads_it(tmp_path, fmt):
    """Every reader (upscale CLI, data preparation, benchmark harness) sees what BasicSR's datasets see:
    ``imfrombytes`` (``cv2.imdecode`` with ``IMREAD_COLOR``) applies the EXIF orientation."""
    from basicsr.utils import imfrombytes

    from benchmarks.harness import read_rgb as harness_read_rgb

    img = _photo(16, 24)
    for orientation in range(1, 9):
        path = str(tmp_path / f'o{orientation}.{fmt.lower()}')
        _with_orientation(path, img, orientation, fmt)
        with open(path, 'rb') as f:
            basicsr = imfrombytes(f.read(), float32=True)  # BGR, float32 in [0, 1]
        assert basicsr.shape == ((24, 16, 3) if orientation >= 5 else (16, 24, 3)), (fmt, orientation)
        np.testing.assert_array_equal(read_rgb(path), basicsr[..., ::-1], err_msg=f'{fmt} {orientation}')
        np.testing.assert_array_equal(read_uint8(path), np.rint(basicsr * 255).astype(np.uint8))
        np.testing.assert_array_equal(harness_read_rgb(path)[0].permute(1, 2, 0).numpy(), basicsr[..., ::-1])


def test_upscale_cli_applies_exif_orientation(tmp_path):
    img = _photo(10, 14)
    _with_orientation(str(tmp_path / 'side.jpg'), img, 6, 'JPEG')  # a phone photo taken upright: rotate 90 CW
    # before: written 28x20 (unrotated); after: 20x28, as BasicSR's test path reads it
    assert upscale_main(['-i', str(tmp_path / 'side.jpg'), '-o', str(tmp_path / 'o'), '--arch', 'Bicubic',
                         '--scale', '2', '--ext', 'png', '-q']) == 0
    out = cv2.imread(str(tmp_path / 'o' / 'side_out.png'))
    assert out.shape == (28, 20, 3)
    ref = cv2.imread(str(tmp_path / 'side.jpg'), cv2.IMREAD_COLOR)  # the upright photo
    assert np.abs(cv2.resize(out, (10, 14), interpolation=cv2.INTER_AREA).astype(int) - ref).mean() < 12


# ---------------------------------------------------------------------------------------------- output folders


def test_output_folder_that_cannot_be_created_stops_before_the_model(tmp_path, capsys, monkeypatch):
    import adasr.cli.upscale as upscale

    cv2.imwrite(str(tmp_path / 'a.png'), _photo(8, 8))
    (tmp_path / 'blocker').write_text('a regular file')

    def no_model(args):
        raise AssertionError('the model was built before the output folder was checked')

    monkeypatch.setattr(upscale, 'build_model', no_model)
    out = tmp_path / 'blocker' / 'out'
    # before: a raw NotADirectoryError traceback after the model was built
    assert upscale_main(['-i', str(tmp_path / 'a.png'), '-o', str(out), '--arch', 'Bicubic', '--scale', '2']) == 2
    assert f'output folder {out} cannot be used: Not a directory' in capsys.readouterr().err


def test_orphan_temporary_files_are_removed_but_live_ones_kept(tmp_path, capsys):
    import fcntl

    cv2.imwrite(str(tmp_path / 'a.png'), _photo(8, 8))
    out = tmp_path / 'o'
    out.mkdir()
    old = time.time() - 3600
    orphan = out / '.a_out.png.k1ll3d.adasr-tmp'  # what a kill -9 during atomic_write_bytes leaves
    orphan.write_bytes(b'half an image')
    live = out / '.b_out.png.wr1t1ng.adasr-tmp'  # another process is writing this one right now
    live.write_bytes(b'being written')
    fresh = out / '.c_out.png.n3w.adasr-tmp'  # created an instant ago, not yet locked by its writer
    fresh.write_bytes(b'')
    users = [out / '.mydraft.tmp', out / '.~lock.report.odt.tmp', out / '.a_out.png.x.tmp']  # not ours: never touched
    for p in users:
        p.write_bytes(b'the user\'s')
    for p in (orphan, live, *users):
        os.utime(p, (old, old))
    with open(live, 'rb') as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        assert upscale_main(['-i', str(tmp_path / 'a.png'), '-o', str(out), '--arch', 'Bicubic', '--scale', '2']) == 0
        assert 'removed 1 temporary file(s) left by an interrupted run' in capsys.readouterr().out
    assert not orphan.exists() and live.exists() and fresh.exists() and (out / 'a_out.png').is_file()
    assert len(remove_orphan_temporaries(str(out), min_age=0)) == 2  # once their writers are gone
    assert all(p.read_bytes() == b'the user\'s' for p in users)
    # the halting pictures' folders, and an ONNX export's folder, are cleaned too
    deep = out / 'halting' / 'a'
    deep.mkdir(parents=True)
    (deep / '.layer0.png.x1.adasr-tmp').write_bytes(b'half')
    (tmp_path / '.b.onnx.x2.adasr-tmp').write_bytes(b'half')
    for p in (deep / '.layer0.png.x1.adasr-tmp', tmp_path / '.b.onnx.x2.adasr-tmp'):
        os.utime(p, (old, old))
    assert upscale_main(['-i', str(tmp_path / 'a.png'), '-o', str(out), '--arch', 'Bicubic', '--scale', '2',
                         '-q']) == 0
    assert not (deep / '.layer0.png.x1.adasr-tmp').exists()
    from adasr.cli.export import main as export_main

    assert export_main(['--arch', 'Bicubic', '--scale', '2', '-o', str(tmp_path / 'b.onnx'), '--no-check']) == 0
    assert 'left by an interrupted export' in capsys.readouterr().out
    assert not (tmp_path / '.b.onnx.x2.adasr-tmp').exists() and (tmp_path / 'b.onnx').is_file()


# ----------------------------------------------------------------------------------------------- finite numbers


def test_float_samples_outside_0_1_are_clipped_with_a_note(tmp_path, capsys):
    x = _photo(8, 8).astype(np.float32) / 255
    x[0, :3] = 4.0  # HDR highlights
    x[1, 0, 0] = -0.5
    cv2.imwrite(str(tmp_path / 'hdr.tif'), x)
    assert upscale_main(['-i', str(tmp_path / 'hdr.tif'), '-o', str(tmp_path / 'o'), '--arch', 'Bicubic',
                         '--scale', '2']) == 0
    assert 'hdr.tif: 10 float sample(s) outside 0..1 clipped' in capsys.readouterr().out
    assert upscale_main(['-i', str(tmp_path / 'hdr.tif'), '-o', str(tmp_path / 'result.png'), '--arch', 'Bicubic',
                         '--scale', '2']) == 0  # -o is always a folder: said when its name looks like an image
    assert f'note: -o {tmp_path / "result.png"} is the output folder' in capsys.readouterr().out
    assert (tmp_path / 'result.png' / 'hdr_out.tif').is_file()


def test_nan_tiff_is_refused_and_the_run_continues(tmp_path, capsys):
    src = tmp_path / 'in'
    src.mkdir()
    x = _photo(8, 8).astype(np.float32) / 255
    x[3, 4, 1] = np.nan
    x[0, 0, 0] = np.inf
    cv2.imwrite(str(src / 'float.tif'), x)
    cv2.imwrite(str(src / 'good.png'), _photo(8, 8))
    # before: written with exit 0 (NaN clipped to black by the model, 54% black for AdaFormer)
    assert upscale_main(['-i', str(src), '-o', str(tmp_path / 'o'), '--arch', 'Bicubic', '--scale', '2', '-q']) == 1
    err = capsys.readouterr().err
    assert f'failed: {src / "float.tif"}: 2 sample(s) are NaN or infinite' in err
    assert sorted(os.listdir(tmp_path / 'o')) == ['good_out.png']
    with pytest.raises(ValueError, match='float.tif: 2 sample'):  # every reader refuses it
        decode_image(str(src / 'float.tif'))
    from benchmarks.harness import BenchmarkError
    from benchmarks.harness import read_rgb as harness_read_rgb

    with pytest.raises(BenchmarkError, match='NaN or infinite'):
        harness_read_rgb(str(src / 'float.tif'))


def test_non_finite_network_output_writes_nothing(tmp_path, capsys):
    from basicsr.archs import build_network

    net = build_network(dict(NET))
    with torch.no_grad():  # finite weights whose products overflow float32: inf, then inf - inf = NaN
        for p in net.parameters():
            p.fill_(1e30)
    torch.save({'params': net.state_dict()}, tmp_path / 'w.pth')
    (tmp_path / 'opt.yml').write_text(yaml.safe_dump({'scale': 2, 'network_g': NET}))
    cv2.imwrite(str(tmp_path / 'a.png'), _photo(8, 8))
    # before: an all-black a_out.png, exit 0
    assert upscale_main(['-i', str(tmp_path / 'a.png'), '-o', str(tmp_path / 'o'), '--opt', str(tmp_path / 'opt.yml'),
                         '--weights', str(tmp_path / 'w.pth'), '-q']) == 1
    err = capsys.readouterr().err
    assert 'NonFiniteError: the model output for a.png: 768 of 768 values are NaN or infinite' in err
    assert os.listdir(tmp_path / 'o') == []


def _model(tmp_path, metrics, lq_size=4):
    """An AdaSRModel (test mode) with the small MSRResNet, and one validation pair of the given LR size."""
    from basicsr.models import build_model

    opt = {'name': 'faults', 'model_type': 'AdaSRModel', 'scale': 2, 'num_gpu': 0, 'is_train': False, 'dist': False,
           'rank': 0, 'world_size': 1, 'network_g': dict(NET), 'val': {'save_img': False, 'metrics': metrics},
           'path': {'pretrain_network_g': None, 'strict_load_g': True, 'results_root': str(tmp_path),
                    'visualization': str(tmp_path / 'vis'), 'log': str(tmp_path)}}
    model = build_model(opt)
    lq = torch.from_numpy(_photo(lq_size, lq_size)[..., ::-1].astype(np.float32) / 255).permute(2, 0, 1)[None]
    gt = torch.nn.functional.interpolate(lq, scale_factor=2, mode='bicubic', align_corners=False).clamp(0, 1)
    return model, {'lq': lq, 'gt': gt, 'lq_path': ['val/LR/tiny.png'], 'gt_path': ['val/HR/tiny.png']}


def test_validation_refuses_non_finite_outputs(tmp_path):
    model, data = _model(tmp_path, {'psnr': {'type': 'calculate_psnr', 'crop_border': 2}}, lq_size=16)
    with torch.no_grad():
        for p in model.net_g.parameters():
            p.fill_(float('nan'))
    model.feed_data(data)
    # before: a black image written and psnr averaged over NaN
    with pytest.raises(NonFiniteError, match='the network output for val/LR/tiny.png: 3072 of 3072 values'):
        model.test()


def test_validation_refuses_images_too_small_for_ssim(tmp_path):
    from basicsr.metrics import calculate_ssim

    gt = _photo(16, 16)
    with pytest.warns(RuntimeWarning):  # before: BasicSR reports ssim: nan for a 16x16 image with crop_border 4
        assert math.isnan(calculate_ssim(gt, gt, crop_border=4))
    metrics = {'psnr': {'type': 'calculate_psnr', 'crop_border': 4}, 'ssim': {'type': 'calculate_ssim',
                                                                             'crop_border': 4}}
    model, data = _model(tmp_path, metrics, lq_size=8)  # 16x16 ground truth: 8 px left after the crop, SSIM needs 11
    model.feed_data(data)
    with pytest.raises(DatasetError, match=r"val/HR/tiny.png: the ground truth is 16x16, too small for the metric "
                                           r"'ssim' \(calculate_ssim, crop_border 4\), which needs at least 19 pixels"):
        model.test()
    assert not hasattr(model, 'output')  # refused before the network ran
    model, data = _model(tmp_path, metrics, lq_size=10)  # 20x20: enough
    model.feed_data(data)
    model.test()
    assert model.output.shape == (1, 3, 20, 20)


def test_image_io_round_trip_of_exif_free_files_is_unchanged(tmp_path):
    """No EXIF: decode_image is exactly OpenCV's IMREAD_UNCHANGED (16-bit and alpha kept)."""
    rgba16 = (cv2.cvtColor(_photo(9, 7), cv2.COLOR_BGR2BGRA).astype(np.uint16) * 257)
    cv2.imwrite(str(tmp_path / 'a.png'), rgba16)
    np.testing.assert_array_equal(decode_image(str(tmp_path / 'a.png')), rgba16)
    assert read_image(str(tmp_path / 'a.png')).dtype == 'uint16'


# ----------------------------------------------------------------------------------------- through the entry points


def _run_entry(script: str, opt: dict, cwd) -> subprocess.CompletedProcess:
    (cwd / 'opt.yml').write_text(yaml.safe_dump(opt, sort_keys=False))
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, osp.join(REPO, 'adasr', script), '-opt', 'opt.yml'], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_training_on_a_truncated_lmdb_stops_with_a_message_not_sigbus(lmdbs, tmp_path):
    hr, lr = lmdbs
    data = osp.join(lr, 'data.mdb')
    os.truncate(data, osp.getsize(data) // 2)
    dataset = {'name': 'tiny', 'type': 'PairedSRDataset', 'dataroot_gt': hr, 'dataroot_lq': lr,
               'io_backend': {'type': 'lmdb'}, 'gt_size': 32, 'use_hflip': True, 'use_rot': True,
               'use_shuffle': True, 'num_worker_per_gpu': 0, 'batch_size_per_gpu': 2, 'dataset_enlarge_ratio': 1,
               'prefetch_mode': None}
    opt = {'name': 'truncated', 'model_type': 'AdaSRModel', 'scale': 2, 'num_gpu': 0, 'manual_seed': 0,
           'datasets': {'train': dict(dataset, scale=2)}, 'network_g': dict(NET),
           'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
           'train': {'optim_g': {'type': 'Adam', 'lr': 1e-3}, 'total_iter': 2, 'warmup_iter': -1,
                     'scheduler': {'type': 'MultiStepLR', 'milestones': [10], 'gamma': 0.5},
                     'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0}},
           'logger': {'print_freq': 1, 'save_checkpoint_freq': 2, 'use_tb_logger': False, 'wandb': None}}
    proc = _run_entry('train.py', opt, tmp_path)
    assert proc.returncode == 1, proc  # before: -7 (SIGBUS), no message
    assert f'dataroot_lq: {data} is truncated' in proc.stderr
    assert not glob.glob(str(tmp_path / 'experiments' / 'truncated' / 'models' / '*.pth'))


@pytest.mark.slow
def test_yaml_test_on_an_image_too_small_for_ssim_names_it(tmp_path):
    from tests.conftest import make_pairs

    hr, lr = make_pairs(str(tmp_path / 'pairs'), names=('astronaut',), size=16)
    opt = {'name': 'tiny_ssim', 'model_type': 'AdaSRModel', 'scale': 4, 'num_gpu': 0, 'manual_seed': 0,
           'datasets': {'test_1': {'name': 'tiny', 'type': 'PairedSRDataset', 'dataroot_gt': hr, 'dataroot_lq': lr,
                                   'io_backend': {'type': 'disk'}}},
           'network_g': {'type': 'Bicubic', 'upscale': 4}, 'path': {'pretrain_network_g': None},
           'val': {'save_img': True, 'suffix': None, 'metrics': {'ssim': {'type': 'calculate_ssim', 'crop_border': 4}}}}
    proc = _run_entry('test.py', opt, tmp_path)
    # before: exit 0 with 'ssim: nan' in the log
    assert proc.returncode == 1, proc
    assert f"{hr}/astronaut.png: the ground truth is 16x16, too small for the metric 'ssim'" in proc.stderr
    assert not glob.glob(str(tmp_path / 'results' / 'tiny_ssim' / 'visualization' / 'tiny' / '*.png'))
