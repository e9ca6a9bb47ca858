"""Fault injection on real training runs: kill -9 during checkpoint writes then --auto_resume, a full disk, unreadable
training states, option files that try to run code, bad numbers, and a diverging run. Each case runs the entry points
as a user does (fresh processes), or calls the same entry glue in-process where a process adds nothing."""
import os
import os.path as osp
import random
import resource
import signal
import struct
import subprocess
import sys
import time
from collections import Counter

import cv2
import numpy as np
import pytest
import torch

from adasr.cli.entry import ResumeError, load_resume_state
from adasr.cli.entry import run as entry_run
from adasr.utils.checkpoint import check_finite_state
from adasr.utils.files import TEMP_SUFFIX
from tests.test_pipeline import REPO, TINY_SWINIR, TRAIN, run, write_yaml

NAME = 'faults'


def train_opt(hr, lr, name=NAME, **train):
    """A tiny SwinIR run on ``tiny_pairs`` that checkpoints every iteration (EMA on, no validation)."""
    opt = {
        'name': name, 'model_type': 'AdaSRModel', 'scale': 4, 'num_gpu': 0, 'manual_seed': 0,
        'datasets': {'train': {'name': 'tiny', 'type': 'PairedSRDataset', 'dataroot_gt': hr, 'dataroot_lq': lr,
                               'io_backend': {'type': 'disk'}, 'gt_size': 32, 'use_hflip': True, 'use_rot': True,
                               'use_shuffle': True, 'num_worker_per_gpu': 0, 'batch_size_per_gpu': 2,
                               'dataset_enlarge_ratio': 1000, 'prefetch_mode': None}},
        'network_g': dict(TINY_SWINIR),
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {'ema_decay': 0.9, 'optim_g': {'type': 'Adam', 'lr': 1e-3},
                  'scheduler': {'type': 'MultiStepLR', 'milestones': [10 ** 6], 'gamma': 0.5}, 'total_iter': 3,
                  'warmup_iter': -1, 'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0}},
        'logger': {'print_freq': 100, 'save_checkpoint_freq': 1, 'use_tb_logger': False, 'wandb': None},
    }
    opt['train'].update(train)
    return opt


def _env():
    return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1')


def _listdir(folder):
    return os.listdir(folder) if osp.isdir(folder) else []


def _iteration(name):
    """The iteration a checkpoint file (or its temporary file ``.net_g_5.pth.xyz.adasr-tmp``) belongs to, or None."""
    stem = name.lstrip('.').split('.')[0]
    stem = stem[len('net_g_'):] if stem.startswith('net_g_') else stem
    return int(stem) if stem.isdigit() else None


def _final_files_read(exp):
    """Every checkpoint under its final name reads completely (no truncated file is ever visible) and its weights
    (``params`` and ``params_ema``) are finite; returns the iterations whose network and state both exist."""
    nets, states = set(), set()
    for name in _listdir(osp.join(exp, 'models')):
        if name.endswith('.pth') and not name.startswith('.'):
            path = osp.join(exp, 'models', name)
            saved = torch.load(path, weights_only=True)
            assert set(saved) == {'params', 'params_ema'}
            for key, state in saved.items():
                check_finite_state(state, f'{path} [{key}]')
            nets.add(_iteration(name))
    for name in _listdir(osp.join(exp, 'training_states')):
        if name.endswith('.state') and not name.startswith('.'):
            with torch.serialization.safe_globals([Counter]):
                torch.load(osp.join(exp, 'training_states', name), weights_only=True)
            states.add(_iteration(name))
    return sorted(nets & states - {None})


def _temp_files(exp):
    return [n for sub in ('models', 'training_states') for n in _listdir(osp.join(exp, sub)) if n.endswith(TEMP_SUFFIX)]


@pytest.mark.slow
def test_kill_during_checkpoint_writes_then_auto_resume_loses_at_most_one_interval(tiny_pairs, tmp_path):
    """kill -9 a training run four times, three of them as soon as a checkpoint's temporary file appears and once at
    a random moment; after each kill every visible checkpoint reads, and --auto_resume continues from the newest
    complete one. Before: a kill during ``torch.save`` left a truncated ``N.state`` that --auto_resume always picked
    (raw ``EOFError`` / ``PytorchStreamReader`` traceback)."""
    opt_path = write_yaml(tmp_path / 'train.yml', train_opt(*tiny_pairs, total_iter=10 ** 6))
    exp = str(tmp_path / 'experiments' / NAME)
    rng = random.Random(0)
    caught_mid_write = 0
    for attempt in range(4):
        before = (_final_files_read(exp) or [0])[-1]
        proc = subprocess.Popen([sys.executable, TRAIN, '-opt', opt_path] + (['--auto_resume'] if attempt else []),
                                cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline, kill_at = time.monotonic() + 120, None
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                names = _listdir(osp.join(exp, 'training_states'))
                progressed = any((_iteration(n) or 0) > before for n in names if n.endswith('.state'))
                if not progressed:
                    time.sleep(0.05)  # starting up
                    continue
                if attempt == 3:  # a random moment of the training loop
                    kill_at = kill_at or time.monotonic() + rng.uniform(0, 0.5)
                    if time.monotonic() >= kill_at:
                        break
                elif _temp_files(exp):
                    caught_mid_write += 1
                    break
        finally:
            proc.send_signal(signal.SIGKILL)
            _, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, err.decode()[-3000:]
        seen = max(_iteration(n) or 0 for sub in ('models', 'training_states')
                   for n in _listdir(osp.join(exp, sub)))
        complete = _final_files_read(exp)
        assert complete and complete[-1] >= seen - 1  # at most one checkpoint interval (1 iteration) is lost
        assert complete[-1] > before  # every attempt made progress: resuming does not go backwards
    assert caught_mid_write >= 1

    last = complete[-1]
    leftovers = _temp_files(exp)
    out = run(TRAIN, opt_path, tmp_path, '--auto_resume', '--force_yml', f'train:total_iter={last + 2}')
    log = out.stderr + ''.join(open(osp.join(exp, f)).read() for f in os.listdir(exp) if f.endswith('.log'))
    assert 'Resuming training from epoch' in log and f'iter: {last}.' in log
    for name in leftovers:
        assert f'removed {osp.join(exp, "models" if name.startswith(".net") else "training_states", name)}' in log
    assert _final_files_read(exp)[-1] == last + 2 and not _temp_files(exp)


def _resume_opt(tmp_path):
    return {'name': NAME, 'auto_resume': True, 'root_path': str(tmp_path), 'num_gpu': 0, 'rank': 0,
            'network_g': dict(TINY_SWINIR),
            'path': {'resume_state': None, 'models': str(tmp_path / 'experiments' / NAME / 'models')}}


def test_resume_state_of_another_experiment_is_named(tmp_path):
    """``path.resume_state`` from another experiment: BasicSR would load this experiment's net_g_<iter>.pth (or
    fail in a raw traceback copying the option file into a folder that does not exist); refused naming both."""
    states = tmp_path / 'experiments' / 'other' / 'training_states'
    states.mkdir(parents=True)
    torch.save({'iter': 4, 'optimizers': [], 'schedulers': []}, states / '4.state')
    opt = dict(_resume_opt(tmp_path), auto_resume=False)
    opt['path']['resume_state'] = str(states / '4.state')
    with pytest.raises(ResumeError, match=rf"4.state is iteration 4, but experiment '{NAME}' has no "
                                          rf".*experiments/{NAME}/models/net_g_4.pth: a run resumes in its own"):
        load_resume_state(opt)


def _flip_a_byte_inside_the_largest_record(path) -> None:
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.compress_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack_from('<HH', data, info.header_offset + 26)  # the local header's own lengths
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.compress_size // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_auto_resume_skips_unreadable_states_newest_first(tiny_pairs, tmp_path, capsys):
    """A truncated newest state, a state whose network file has a flipped byte (its CRC fails), one whose network
    holds a NaN, and an orphan temporary file: --auto_resume warns about each by name and resumes from the newest
    usable pair; with none usable it stops with a message."""
    run(TRAIN, write_yaml(tmp_path / 'train.yml', train_opt(*tiny_pairs, total_iter=4)), tmp_path)
    exp = tmp_path / 'experiments' / NAME
    states, models = exp / 'training_states', exp / 'models'
    path = states / '4.state'  # what a kill during BasicSR's torch.save leaves
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    _flip_a_byte_inside_the_largest_record(models / 'net_g_3.pth')  # a bad disk or copy: torch.load reads it
    saved = torch.load(models / 'net_g_2.pth', weights_only=True)
    next(iter(saved['params'].values())).view(-1)[0] = float('nan')
    torch.save(saved, models / 'net_g_2.pth')
    orphan = states / '.5.state.abc123.adasr-tmp'
    orphan.write_bytes(b'partial')

    opt = _resume_opt(tmp_path)
    state = load_resume_state(opt)
    err = capsys.readouterr().err
    assert state['iter'] == 1 and opt['path']['resume_state'] == str(states / '1.state')
    assert opt['path']['pretrain_network_g'] == str(models / 'net_g_1.pth')
    for it in (4, 3, 2):
        assert f'skipping {states / f"{it}.state"}' in err
    assert 'net_g_3.pth is damaged: Bad CRC-32' in err and 'net_g_2.pth holds non-finite' in err
    assert f'removed {orphan}' in err and not orphan.exists()

    (states / '1.state').write_bytes(b'')
    with pytest.raises(ResumeError, match=r'no usable training state .* 4\.state, 3\.state, 2\.state, 1\.state'):
        load_resume_state(_resume_opt(tmp_path))


@pytest.mark.slow
def test_full_disk_stops_the_run_with_the_file_name(tiny_pairs, tmp_path):
    """A file-size limit below the checkpoint size (the log fits): the save fails, the run exits non-zero naming
    the file, and no partial checkpoint is left. Before: "Just ignore it", exit 0, truncated files."""
    opt_path = write_yaml(tmp_path / 'train.yml', train_opt(*tiny_pairs, total_iter=2))
    limit = 48 * 1024  # the tiny SwinIR's net_g file is ~96 KB, the log ~10 KB

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, TRAIN, '-opt', opt_path], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=600, preexec_fn=limit_file_size)
    exp = tmp_path / 'experiments' / NAME
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f'error: cannot save {exp / "models" / "net_g_1.pth"}' in proc.stderr
    assert 'Traceback' not in proc.stderr and 'ignore it' not in proc.stdout + proc.stderr
    assert os.listdir(exp / 'models') == [] and os.listdir(exp / 'training_states') == []


EVIL = ('name: evil\nscale: 4\nmodel_type: AdaSRModel\nnetwork_g:\n'
        '  type: !!python/object/apply:os.system ["touch {}"]\n')


@pytest.mark.slow
def test_option_files_cannot_run_code(tmp_path, monkeypatch, capsys):
    """``!!python/object/apply:os.system`` in an option file given to adasr/train.py, adasr-upscale --opt, or read by
    BasicSR's own ``parse_options`` inside the entry glue: refused with the file and line; nothing runs. Before: the
    command ran."""
    from basicsr.utils import options as basicsr_options

    from adasr.cli.entry import _safe_basicsr_yaml
    from adasr.cli.upscale import main as upscale

    marker = tmp_path / 'ran'
    evil = tmp_path / 'evil.yml'
    evil.write_text(EVIL.format(marker))
    proc = subprocess.run([sys.executable, TRAIN, '-opt', str(evil)], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode != 0 and f'{evil}, line 5' in proc.stderr and 'Traceback' not in proc.stderr

    cv2.imwrite(str(tmp_path / 'a.png'), np.zeros((8, 8, 3), np.uint8))  # an input, so the option file is what stops
    assert upscale(['-i', str(tmp_path / 'a.png'), '-o', str(tmp_path / 'out'), '--opt', str(evil), '-q']) != 0
    assert f'adasr-upscale: error: {evil}, line 5: ' in capsys.readouterr().err

    monkeypatch.setattr(sys, 'argv', ['train.py', '-opt', str(evil)])
    with _safe_basicsr_yaml(()), pytest.raises(Exception, match='python/object/apply:os.system'):
        basicsr_options.parse_options(str(tmp_path), is_train=True)
    assert not marker.exists()


def test_a_launcher_without_its_environment_stops_with_what_is_missing(tmp_path, monkeypatch):
    """``--launcher pytorch`` without torchrun (BasicSR: ValueError about RANK), ``--launcher slurm`` outside srun
    (BasicSR: KeyError 'SLURM_PROCID'): a message saying how to start it, before the option file is read."""
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'SLURM_PROCID'):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit, match=r'--launcher pytorch needs the variables its launcher sets \(RANK, '
                                         r'WORLD_SIZE, .*start it as torchrun'):
        entry_run('train', ['-opt', str(tmp_path / 'missing.yml'), '--launcher', 'pytorch'])
    with pytest.raises(SystemExit, match=r'--launcher slurm needs .*SLURM_PROCID'):
        entry_run('test', ['-opt', str(tmp_path / 'missing.yml'), '--launcher', 'slurm'])


def test_validation_images_are_written_atomically_and_a_failed_write_names_the_file(tmp_path, monkeypatch):
    """BasicSR's validation writes with cv2.imwrite (a truncated file on a full disk, "Failed in writing images."
    without a name); inside AdaSRModel.validation the writes go through adasr's atomic writer."""
    import errno

    from basicsr.models import sr_model

    from adasr.models import adasr_model
    from adasr.utils import image_io
    from adasr.utils.files import WriteError

    img = (np.random.default_rng(0).random((6, 7, 3)) * 255).astype(np.uint8)
    image_io.basicsr_imwrite(img, str(tmp_path / 'sub' / 'a.png'))
    assert np.array_equal(cv2.imread(str(tmp_path / 'sub' / 'a.png')), img)
    with pytest.raises(WriteError, match=r'cannot save .*b.xyz: OpenCV cannot encode'):
        image_io.basicsr_imwrite(img, str(tmp_path / 'b.xyz'))

    def full_disk(path, data):
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(image_io, 'atomic_write_bytes', full_disk)
    original = sr_model.imwrite
    with adasr_model._atomic_image_writes():
        assert sr_model.imwrite is image_io.basicsr_imwrite
        with pytest.raises(WriteError, match=r'cannot save .*c.png: No space left on device'):
            sr_model.imwrite(img, str(tmp_path / 'c.png'))
    assert sr_model.imwrite is original and not (tmp_path / 'c.png').exists()


def test_an_experiments_folder_that_cannot_be_made_is_named(tiny_pairs, tmp_path):
    """BasicSR makes experiments/<name> itself (a read-only or full disk, a file in the way): a message naming the
    path, not an OSError traceback."""
    opt_path = write_yaml(tmp_path / 'train.yml', train_opt(*tiny_pairs, total_iter=1))
    (tmp_path / 'experiments').write_text('a file where the folder goes')
    proc = run(TRAIN, opt_path, tmp_path, check=False)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    assert f'error: cannot use {tmp_path / "experiments"}' in proc.stderr


def test_a_damaged_or_mismatched_validation_image_stops_the_run_before_training(tiny_pairs, tmp_path):
    """BasicSR reads the validation set first at val_freq (thousands of iterations in); adasr reads it before the
    first step: a truncated GT, then an LR of another scale, each named, no experiment folder made."""
    import shutil

    hr, lr = tiny_pairs
    val_hr = tmp_path / 'val_hr'
    shutil.copytree(hr, val_hr)
    victim = sorted(val_hr.iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:200])
    opt = train_opt(hr, lr)
    opt['datasets']['val'] = {'name': 'v', 'type': 'PairedSRDataset', 'dataroot_gt': str(val_hr), 'dataroot_lq': lr,
                              'io_backend': {'type': 'disk'}}
    opt['val'] = {'val_freq': 1000, 'save_img': False, 'metrics': {'psnr': {'type': 'calculate_psnr',
                                                                             'crop_border': 4}}}
    proc = run(TRAIN, write_yaml(tmp_path / 'train.yml', opt), tmp_path, check=False)
    assert proc.returncode == 1 and f'error: datasets.val: cannot read GT image {victim}' in proc.stderr, \
        proc.stderr[-3000:]
    assert not (tmp_path / 'experiments').exists()
    opt['datasets']['val']['dataroot_gt'] = lr  # the LR as its own GT: not x4
    proc = run(TRAIN, write_yaml(tmp_path / 'train.yml', opt), tmp_path, check=False)
    assert proc.returncode == 1 and 'error: datasets.val: ' in proc.stderr and 'at x4 the GT must be' in proc.stderr


def test_force_yml_cannot_run_code(tiny_pairs, tmp_path, monkeypatch):
    """BasicSR builds ``opt["k"]=value`` from --force_yml and execs it; adasr parses the entry as YAML data."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / 'ran'
    opt_path = write_yaml(tmp_path / 'train.yml', train_opt(*tiny_pairs))
    for entry in (f'name"]=__import__("os").system("touch {marker}");#=1',
                  f'train:total_iter=!!python/object/apply:os.system ["touch {marker}"]'):
        with pytest.raises(SystemExit) as err:
            entry_run('train', ['-opt', opt_path, '--force_yml', entry])
        assert str(err.value).startswith('error: ') and not marker.exists()
    assert not (tmp_path / 'experiments').exists()


@pytest.mark.parametrize('mutate, words', [
    (lambda o: o.update(scale='four'), ['scale must be an integer', "'four'"]),
    (lambda o: o['network_g'].update(upscale=2), ['scale: 4 but network_g.upscale: 2']),
    (lambda o: o['datasets']['train'].update(gt_size=30), ['datasets.train.gt_size: 30 is not a multiple']),
    (lambda o: o['train'].update(total_iter=0), ['train.total_iter must be an integer >= 1, got 0']),
    (lambda o: o['logger'].update(save_checkpoint_freq=0), ['logger.save_checkpoint_freq', 'got 0']),
    (lambda o: o['train']['optim_g'].update(lr=-1e-3), ['train.optim_g.lr must be a positive number']),
], ids=['scale_four', 'upscale_mismatch', 'gt_size', 'total_iter_0', 'save_freq_0', 'lr_negative'])
def test_bad_options_stop_before_any_work(tiny_pairs, tmp_path, monkeypatch, mutate, words):
    """Before: ``total_iter: 0`` exited 0 with untrained weights saved, ``save_checkpoint_freq: 0`` raised
    ZeroDivisionError after one iteration, ``scale: four`` a TypeError deep in BasicSR, mismatched scales trained."""
    monkeypatch.chdir(tmp_path)
    opt = train_opt(*tiny_pairs)
    mutate(opt)
    opt_path = write_yaml(tmp_path / 'bad.yml', opt)
    with pytest.raises(SystemExit) as err:
        entry_run('train', ['-opt', opt_path])
    message = str(err.value)
    assert message.startswith(f'error: {opt_path}: ')
    for w in words:
        assert w in message, message
    assert not (tmp_path / 'experiments').exists()


@pytest.mark.slow
def test_diverging_run_stops_and_saves_no_nonfinite_weights(tiny_pairs, tmp_path):
    """``lr: 1e30``: the loss is NaN from iteration 2; the steps are skipped with a warning and the run stops after
    ``max_nonfinite_steps`` with a message; every checkpoint written is finite. Before: it trained on ``l_pix: nan``,
    saved NaN checkpoints and exited 0."""
    opt = train_opt(*tiny_pairs, total_iter=20, max_nonfinite_steps=3)
    opt['train']['optim_g']['lr'] = 1e30
    proc = run(TRAIN, write_yaml(tmp_path / 'train.yml', opt), tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert 'error: training diverged: the loss was not finite for 3 steps in a row (iter 4' in proc.stderr
    assert 'Traceback' not in proc.stderr
    exp = str(tmp_path / 'experiments' / NAME)
    assert 'step skipped (2 in a row' in ''.join(open(osp.join(exp, f)).read() for f in os.listdir(exp)
                                                   if f.endswith('.log'))
    assert _final_files_read(exp) == [1, 2, 3]
    assert not osp.exists(osp.join(exp, 'models', 'net_g_latest.pth'))


PERCEPTUAL = {'type': 'PerceptualLoss', 'layer_weights': {'conv5_4': 1.0}, 'vgg_type': 'vgg19',
              'perceptual_weight': 1.0, 'style_weight': 0.0, 'criterion': 'l1'}


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """torch.hub's cache in an empty folder, the run's directory without BasicSR's VGG file, downloads that fail."""
    from urllib.error import URLError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))  # torch.hub's cache: $TORCH_HOME/hub
    assert torch.hub.get_dir() == str(tmp_path / 'hub')
    calls = []

    def offline(url, dst, *args, **kwargs):
        calls.append((url, dst))
        raise URLError('[Errno -3] Temporary failure in name resolution')

    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    return calls


def test_perceptual_loss_without_its_vgg_weights_stops_before_any_work(tiny_pairs, tmp_path, empty_hub):
    """Offline, BasicSR's PerceptualLoss tried to download torchvision's VGG19 after the experiment's folders
    were made and the log opened, and died in a URLError; the pre-flight now fetches the file first or names it."""
    opt_path = write_yaml(tmp_path / 'percep.yml', train_opt(*tiny_pairs, perceptual_opt=dict(PERCEPTUAL)))
    with pytest.raises(SystemExit) as err:
        entry_run('train', ['-opt', opt_path])
    expected = osp.join(str(tmp_path / 'hub'), 'checkpoints', 'vgg19-dcbb9e9d.pth')
    message = str(err.value)
    assert message.startswith(f'error: {opt_path}: train.perceptual_opt: ')
    for words in (expected, 'https://download.pytorch.org/models/vgg19-dcbb9e9d.pth', 'URLError',
                  'experiments/pretrained_models/vgg19-dcbb9e9d.pth'):
        assert words in message, message
    assert empty_hub == [('https://download.pytorch.org/models/vgg19-dcbb9e9d.pth', expected)]
    assert not (tmp_path / 'experiments').exists()


def _named_by_hash(folder, stem, legacy=False):
    """A small weights file named as torch.hub names them (``stem-<first 8 hex of its SHA-256>.pth``)."""
    import hashlib

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / 'tmp.pth'
    torch.save({'features.0.weight': torch.arange(6.0)}, tmp, _use_new_zipfile_serialization=not legacy)
    path = folder / f'{stem}-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth'
    tmp.rename(path)
    return path


def test_perceptual_weights_downloaded_into_a_new_cache_and_checked(tmp_path, empty_hub, monkeypatch):
    """The real download (torch.hub's, from a file:// address) into a cache folder that does not exist yet, the file
    checked against the hash in its name: the pre-2020 (non-zip) format of torchvision's VGG files is accepted, a
    copy cut short or a download with another hash is refused by name."""
    from adasr.cli import options

    monkeypatch.undo()  # the real torch.hub.download_url_to_file
    monkeypatch.chdir(tmp_path)
    src = _named_by_hash(tmp_path / 'server', 'vgg19', legacy=True)
    dst = tmp_path / 'hub' / 'checkpoints' / src.name  # neither folder exists
    monkeypatch.setattr(options, 'perceptual_weights', lambda opt: (str(dst), src.as_uri(), 'local.pth'))
    train = {'perceptual_opt': dict(PERCEPTUAL)}
    options.ensure_perceptual_weights(train)
    assert dst.read_bytes() == src.read_bytes()
    options.ensure_perceptual_weights(train)  # found: checked, not downloaded again
    dst.write_bytes(src.read_bytes()[:-100])  # a copy cut short
    with pytest.raises(options.OptionsError, match=f'{dst} is damaged or cut short .*does not begin with'):
        options.ensure_perceptual_weights(train)
    dst.unlink()
    wrong = dst.with_name('vgg19-00000000.pth')
    monkeypatch.setattr(options, 'perceptual_weights', lambda opt: (str(wrong), src.as_uri(), 'local.pth'))
    with pytest.raises(options.OptionsError, match='downloading them from file:.*failed \\(RuntimeError: invalid hash'):
        options.ensure_perceptual_weights(train)
    assert not wrong.exists()


def test_perceptual_weights_cases_without_download(tmp_path, empty_hub, monkeypatch):
    from adasr.cli import options
    from adasr.cli.options import OptionsError, ensure_perceptual_weights

    real = options.perceptual_weights
    cached = _named_by_hash(tmp_path / 'hub' / 'checkpoints', 'vgg16')
    monkeypatch.setattr(options, 'perceptual_weights', lambda opt: (str(cached), 'https://x/' + cached.name, 'l'))
    train = {'perceptual_opt': dict(PERCEPTUAL, vgg_type='vgg16')}
    ensure_perceptual_weights(train)  # in torch.hub's cache, whole: nothing downloaded
    monkeypatch.setattr(options, 'perceptual_weights', real)
    for section in ({}, {'type': 'L1Loss', 'loss_weight': 1.0}):  # no VGG built: nothing asked for
        ensure_perceptual_weights({'perceptual_opt': section})
    monkeypatch.setenv('LOCAL_RANK', '1')  # under torchrun only local rank 0 downloads
    ensure_perceptual_weights({'perceptual_opt': dict(PERCEPTUAL)})
    monkeypatch.delenv('LOCAL_RANK')
    with pytest.raises(OptionsError, match="vgg_type: 'vgg91' is not a VGG BasicSR builds.*did you mean 'vgg19'"):
        ensure_perceptual_weights({'perceptual_opt': dict(PERCEPTUAL, vgg_type='vgg91')})
    local = tmp_path / 'experiments' / 'pretrained_models' / 'vgg19-dcbb9e9d.pth'  # BasicSR's own place comes first
    local.parent.mkdir(parents=True)
    local.write_bytes(b'not checked here: a hash we cannot match')
    with pytest.raises(OptionsError, match='vgg_type is vgg16, but BasicSR loads experiments/pretrained_models/'
                                           'vgg19-dcbb9e9d.pth .* for every vgg_type'):
        ensure_perceptual_weights(train)
    assert empty_hub == []
