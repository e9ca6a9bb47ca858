"""Every option file parses, passes the pre-flight checks and builds its network with its real hyperparameters;
bad option files fail with a message that names the key or the path."""
import glob
import os.path as osp

import cv2
import numpy as np
import pytest
import torch
import yaml
from basicsr.archs import build_network

from adasr.cli.options import OptionsError, check_options, load_yaml

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
OPTION_FILES = sorted(glob.glob(osp.join(REPO, 'options', '**', '*.yml'), recursive=True))


def build_with_real_hyperparameters(net_opt):
    """Construct on the meta device (allocates nothing); archs whose constructors compute with tensor values
    (basicsr's SwinIR calls ``.item()``) are built on the CPU instead."""
    try:
        with torch.device('meta'):
            return build_network(dict(net_opt))
    except (RuntimeError, NotImplementedError) as e:
        if 'meta' not in str(e):
            raise
    return build_network(dict(net_opt))


def _is_train(path: str) -> bool:
    return osp.basename(path).startswith('train_')


def test_option_files_found():
    names = {osp.relpath(p, REPO) for p in OPTION_FILES}
    for expected in ('options/test/test_Bicubic_x4.yml', 'options/train/train_SwinIR_light_x4.yml',
                     'options/test/test_SwinIR_x4.yml', 'options/demo/train_SwinIR_light_x4_demo.yml'):
        assert expected in names


@pytest.mark.parametrize('path', OPTION_FILES, ids=lambda p: osp.relpath(p, REPO))
def test_option_file_checks_and_builds(path):
    opt = load_yaml(path)
    check_options(opt, is_train=_is_train(path), check_paths=False)
    net = build_with_real_hyperparameters(opt['network_g'])
    assert sum(p.numel() for p in net.parameters()) >= 0
    scale = opt.get('scale')
    net_scale = opt['network_g'].get('upscale')
    assert scale == net_scale, f'{path}: scale {scale} but network_g.upscale {net_scale}'
    for ds in opt['datasets'].values():
        assert ds['type'] in ('PairedSRDataset', 'PairedImageDataset')
    if 'val' in opt and opt['val'].get('metrics'):
        for metric in opt['val']['metrics'].values():
            assert metric.get('test_y_channel') is True
            assert metric.get('crop_border') == scale


def _write(tmp_path, opt, name='opt.yml'):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(opt))
    return str(p)


@pytest.fixture
def base_test_opt(tiny_pairs):
    hr, lr = tiny_pairs
    return {
        'name': 'tiny', 'model_type': 'AdaSRModel', 'scale': 4, 'num_gpu': 0,
        'datasets': {'test_1': {'name': 'tiny', 'type': 'PairedSRDataset', 'dataroot_gt': hr, 'dataroot_lq': lr,
                                'io_backend': {'type': 'disk'}}},
        'network_g': {'type': 'Bicubic', 'upscale': 4},
        'path': {'pretrain_network_g': None},
        'val': {'save_img': False, 'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 4,
                                                        'test_y_channel': True}}},
    }


def test_valid_options_pass(base_test_opt):
    check_options(base_test_opt, is_train=False)


@pytest.mark.parametrize('mutate, words', [
    (lambda o: o['network_g'].update(upscal=4), ["'upscal'", 'network_g', "did you mean 'upscale'"]),
    (lambda o: o.update(netwrk_g={}), ["'netwrk_g'", "did you mean 'network_g'"]),
    (lambda o: o['network_g'].update(type='Bicubik'), ["'Bicubik'", "did you mean 'Bicubic'"]),
    (lambda o: o.update(model_type='SRModell'), ["'SRModell'", 'model_type']),
    (lambda o: o['datasets']['test_1'].update(dataroot_gt='/no/such/dir'), ['/no/such/dir', 'dataroot_gt']),
    (lambda o: o['datasets']['test_1'].update(io_backend={'type': 'lmdb'}), ['not a BasicSR LMDB']),
    (lambda o: o['datasets']['test_1'].update(gt_sise=96), ["'gt_sise'", "did you mean 'gt_size'"]),
    (lambda o: o['path'].update(pretrain_network_g='/no/such/model.pth'), ['/no/such/model.pth']),
    (lambda o: o['val'].update(save_imgs=True), ["'save_imgs'", "did you mean 'save_img'"]),
    (lambda o: o.update(num_gpu=8), ['num_gpu: 8']),
])
def test_bad_options_name_the_problem(base_test_opt, mutate, words):
    if 'num_gpu: 8' in words and torch.cuda.device_count() >= 8:
        pytest.skip('this machine has 8 GPUs')
    mutate(base_test_opt)
    with pytest.raises(OptionsError) as err:
        check_options(base_test_opt, is_train=False)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_swinir_kwargs_typo_is_caught_although_swinir_takes_kwargs():
    # basicsr's SwinIR has **kwargs and would silently ignore the typo
    opt = load_yaml(osp.join(REPO, 'options', 'test', 'test_SwinIR_light_x4.yml'))
    opt['network_g']['embed_dimm'] = 60
    with pytest.raises(OptionsError, match="embed_dimm.*did you mean 'embed_dim'"):
        check_options(opt, is_train=False, check_paths=False)


@pytest.fixture
def base_train_opt(base_test_opt, tiny_pairs):
    hr, lr = tiny_pairs
    opt = dict(base_test_opt)
    opt['datasets'] = {'train': {'name': 't', 'type': 'PairedSRDataset', 'dataroot_gt': hr, 'dataroot_lq': lr,
                                 'io_backend': {'type': 'disk'}, 'gt_size': 32, 'use_hflip': True, 'use_rot': True,
                                 'batch_size_per_gpu': 2, 'num_worker_per_gpu': 0},
                       'val': {'name': 'v', 'type': 'PairedSRDataset', 'dataroot_gt': hr, 'dataroot_lq': lr,
                               'io_backend': {'type': 'disk'}}}
    opt['network_g'] = {'type': 'SwinIR', 'upscale': 4, 'embed_dim': 12, 'depths': [1], 'num_heads': [2],
                        'window_size': 4, 'upsampler': 'pixelshuffledirect'}
    opt['train'] = {'optim_g': {'type': 'AdamW', 'lr': 1e-3}, 'scheduler': {'type': 'MultiStepLR', 'milestones': [9],
                    'gamma': 0.5}, 'total_iter': 2, 'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0}}
    opt['val'] = dict(opt['val'], val_freq=2)
    opt['logger'] = {'print_freq': 1, 'save_checkpoint_freq': 2, 'use_tb_logger': False}
    return opt


@pytest.mark.parametrize('name', ['../../escape', 'a/b', '..', '', 7])
def test_experiment_name_is_a_plain_folder_name(base_test_opt, name):
    base_test_opt['name'] = name
    with pytest.raises(OptionsError, match='name must be a plain folder name'):
        check_options(base_test_opt, is_train=False)


def test_network_argument_values_are_checked_by_building(base_test_opt):
    from adasr.cli.options import check_network_builds

    check_network_builds(base_test_opt['network_g'])
    base_test_opt['network_g'] = dict(base_test_opt['network_g'], upscale='four')
    with pytest.raises(OptionsError, match=r'cannot build network_g \(\w+\) with these arguments'):
        check_network_builds(base_test_opt['network_g'])


@pytest.mark.parametrize('net, hint', [
    ({'type': 'SwinIR', 'embed_dim': 'twelve'}, "network_g.embed_dim is 'twelve' where SwinIR's default is 96"),
    ({'type': 'HAT', 'depths': 6}, "network_g.depths is 6 where HAT's default is (6, 6, 6, 6, 6, 6)"),
])
def test_a_failed_build_names_the_argument_unlike_its_default(net, hint):
    """A constructor's own message may say nothing of the key ("not all arguments converted during string
    formatting" for SwinIR's embed_dim: twelve): the error adds each value of another kind than the default."""
    from adasr.cli.options import check_network_builds

    with pytest.raises(OptionsError) as err:
        check_network_builds(net)
    assert hint in str(err.value)


def test_seed_and_io_backend_are_checked(base_test_opt):
    base_test_opt['manual_seed'] = 'ten'
    with pytest.raises(OptionsError, match='manual_seed must be a non-negative integer'):
        check_options(base_test_opt, is_train=False)
    base_test_opt['manual_seed'] = 10
    next(iter(base_test_opt['datasets'].values()))['io_backend'] = {'type': 'dsk'}
    with pytest.raises(OptionsError, match="io_backend.type: 'dsk' is not supported"):
        check_options(base_test_opt, is_train=False)


def test_test_option_file_needs_val(base_test_opt):
    base_test_opt.pop('val')
    with pytest.raises(OptionsError, match='a test option file needs a "val" section'):
        check_options(base_test_opt, is_train=False)


def test_training_option_checks(base_train_opt):
    opt = base_train_opt
    check_options(opt, is_train=True)
    opt['train']['pixel_opt']['loss_wieght'] = 2
    with pytest.raises(OptionsError, match="loss_wieght.*did you mean 'loss_weight'"):
        check_options(opt, is_train=True)


def test_basicsr_style_whole_floats_pass(base_train_opt):
    """BasicSR's own option files write ``save_checkpoint_freq: !!float 5e3``; warmup_iter -1 means none."""
    base_train_opt['logger'].update(save_checkpoint_freq=5e3, print_freq=100.0)
    base_train_opt['train'].update(total_iter=5e5, warmup_iter=-1, max_nonfinite_steps=3)
    check_options(base_train_opt, is_train=True)


BAD_NUMBERS = [
    (lambda o: o.update(scale='four'), ['scale must be an integer', "'four'"]),
    (lambda o: o.update(scale=2), ['scale: 2 but network_g.upscale: 4']),
    (lambda o: o['datasets']['train'].update(scale=3), ['scale: 4 but datasets.train.scale: 3']),
    (lambda o: o.pop('scale'), ['no "scale"']),
    (lambda o: o['datasets']['train'].update(gt_size=30), ['datasets.train.gt_size: 30 is not a multiple of scale']),
    (lambda o: o['datasets']['train'].update(batch_size_per_gpu=0), ['datasets.train.batch_size_per_gpu', '>= 1']),
    (lambda o: o['train'].update(total_iter=0), ['train.total_iter must be an integer >= 1, got 0']),
    (lambda o: o['train'].update(total_iter=2.5), ['train.total_iter', '2.5']),
    (lambda o: o['train'].update(warmup_iter=-2), ['train.warmup_iter must be an integer >= -1']),
    (lambda o: o['train'].update(max_nonfinite_steps=0), ['train.max_nonfinite_steps must be an integer >= 1']),
    (lambda o: o['logger'].update(save_checkpoint_freq=0), ['logger.save_checkpoint_freq', 'got 0']),
    (lambda o: o['logger'].update(print_freq=-1), ['logger.print_freq', 'got -1']),
    (lambda o: o['logger'].pop('print_freq'), ['logger: missing print_freq']),
    (lambda o: o['val'].update(val_freq=0), ['val.val_freq', 'got 0']),
    (lambda o: o['val'].pop('val_freq'), ['val: missing val_freq']),
    (lambda o: o['train']['optim_g'].update(lr=0), ['train.optim_g.lr must be a positive number']),
    (lambda o: o['train']['optim_g'].update(lr='2e-4'), ['train.optim_g.lr', '!!float 2e-4']),
    (lambda o: o['train'].update(ema_decay=1.0), ['train.ema_decay must be a number in [0, 1)']),
    (lambda o: o['train']['scheduler'].update(milestones=[0]), ['train.scheduler.milestones[0]']),
    (lambda o: o['train']['scheduler'].update(gamma=-0.5), ['train.scheduler.gamma']),
    (lambda o: o['train']['optim_g'].update(lr=float('nan')), ['train.optim_g.lr must be a positive number', 'nan']),
    (lambda o: o['train']['optim_g'].update(lr=float('inf')), ['train.optim_g.lr', 'inf']),
    # what BasicSR would otherwise stop on with a traceback after the experiment folder exists
    (lambda o: o['train']['optim_g'].update(type='Adamm'), ["train.optim_g.type: 'Adamm'", "did you mean 'Adam'"]),
    (lambda o: o['train']['optim_g'].update(lrr=1e-3), ['train.optim_g (AdamW)', 'lrr']),
    (lambda o: o['train']['optim_g'].update(betas=0.9), ['train.optim_g.betas must be two numbers']),
    (lambda o: o['train']['optim_g'].pop('lr'), ['train.optim_g: missing lr']),
    (lambda o: o['train'].pop('optim_g'), ['train: missing optim_g']),
    (lambda o: o['train']['scheduler'].update(type='MultiStepLRR'), ["'MultiStepLRR'", "did you mean 'MultiStepLR'"]),
    (lambda o: o['train']['scheduler'].update(gama=0.5), ['train.scheduler (MultiStepLR)', 'gama']),
    (lambda o: o['train']['scheduler'].update(milestones=9), ['train.scheduler.milestones must be a list']),
    (lambda o: o['train']['scheduler'].pop('milestones'), ['missing milestones']),
    (lambda o: o['train'].update(scheduler=None), ['train.scheduler must be a mapping with a type']),
    (lambda o: o['train'].pop('pixel_opt'), ['no pixel_opt or perceptual_opt']),
    (lambda o: o['train'].update(pixel_opt='L1Loss'), ['train.pixel_opt must be a mapping']),
    (lambda o: o['train']['pixel_opt'].update(loss_weight=float('nan')), ['pixel_opt.loss_weight must be a finite']),
    (lambda o: o['train']['pixel_opt'].update(loss_weight=-1.0), ['pixel_opt.loss_weight must be a finite', '-1.0']),
    (lambda o: o.pop('val'), ['datasets.val is given but there is no "val" section: validation would never run']),
    (lambda o: o['datasets'].pop('val'), ['a "val" section but no validation dataset']),
    (lambda o: o['train']['pixel_opt'].update(reduction='none'), ["train.pixel_opt.reduction must be 'mean' or 'sum'"]),
    (lambda o: o['train'].update(scheduler={'type': 'CosineAnnealingRestartLR', 'periods': [2, 2]}, total_iter=6),
     ['train.scheduler.periods [2, 2] add up to 4 iterations, fewer than train.total_iter 6']),
    (lambda o: o['train'].update(scheduler={'type': 'CosineAnnealingRestartLR', 'periods': [3, 3],
                                            'restart_weights': [1]}, total_iter=6),
     ['train.scheduler.restart_weights has 1 entries and periods 2']),
    (lambda o: o['train'].update(pixl_opt=o['train'].pop('pixel_opt')),
     ["unknown key 'pixl_opt' in train (the losses AdaSRModel reads)", "did you mean 'pixel_opt'"]),
]

REQUIRED_OR_TYPED = [  # what BasicSR reads with opt[...] or tests with a plain if: refused before any work
    (lambda o: o['val'].pop('save_img'), ['val: missing save_img (BasicSR reads it']),
    (lambda o: o['logger'].pop('use_tb_logger'), ['logger: missing use_tb_logger']),
    (lambda o: o.update(path=None), ['the "path" section must be a mapping']),
    (lambda o: o['val']['metrics'].update(psnr=None), ['val.metrics.psnr must be a mapping']),
    (lambda o: o['val']['metrics']['psnr'].update(crop_border=-3), ['crop_border must be a non-negative integer']),
    (lambda o: o['val']['metrics']['psnr'].update(crop_border=2.5), ['crop_border must be a non-negative integer']),
    (lambda o: o['val']['metrics']['psnr'].update(test_y_channel='maybe'), ['test_y_channel must be true or false']),
    (lambda o: o['datasets']['train'].update(use_hflip='maybe'), ['datasets.train.use_hflip must be true or false']),
    (lambda o: o['path'].update(strict_load_g='false'), ["path.strict_load_g must be true or false, got 'false'"]),
    (lambda o: o['datasets']['train'].update(prefetch_mode='gpu'), ["prefetch_mode: 'gpu' is not one of BasicSR"]),
]


@pytest.mark.parametrize('mutate, words', BAD_NUMBERS + REQUIRED_OR_TYPED)
def test_bad_numbers_and_missing_keys_name_the_key(base_train_opt, mutate, words):
    mutate(base_train_opt)
    with pytest.raises(OptionsError) as err:
        check_options(base_train_opt, is_train=True)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_a_test_that_saves_images_needs_a_suffix_and_prefetch_keys_pass(base_test_opt, base_train_opt):
    base_test_opt['val']['save_img'] = True
    with pytest.raises(OptionsError, match='val: missing suffix'):
        check_options(base_test_opt, is_train=False)
    base_test_opt['val']['suffix'] = None
    check_options(base_test_opt, is_train=False)
    base_train_opt['datasets']['train'].update(prefetch_mode='cpu', num_prefetch_queue=2)
    check_options(base_train_opt, is_train=True)


def test_force_yml_setting_a_key_twice_is_refused():
    from adasr.cli.options import parse_overrides

    with pytest.raises(OptionsError, match=r"--force_yml sets name twice \('name=a' and 'name=b'\)"):
        parse_overrides(['name=a', 'train:total_iter=3', 'name=b'])


def test_unreadable_or_missing_yaml(tmp_path):
    with pytest.raises(OptionsError, match='option file not found'):
        load_yaml(str(tmp_path / 'missing.yml'))
    bad = tmp_path / 'bad.yml'
    bad.write_text('name: [unclosed\n')
    with pytest.raises(OptionsError, match='bad.yml is not valid YAML'):
        load_yaml(str(bad))
    binary = tmp_path / 'binary.yml'
    binary.write_bytes(b'\xff\xfe\x00garbage')  # a UTF-16 mark, or any binary file given by mistake
    with pytest.raises(OptionsError, match=r'binary.yml is not a text file in UTF-8 \(byte 0'):
        load_yaml(str(binary))
    with pytest.raises(OptionsError, match='is a folder'):
        load_yaml(str(tmp_path))


def test_cli_option_file_that_is_not_text_exits_2_naming_it(tmp_path, capsys):
    from adasr.cli.export import main as export_main
    from adasr.cli.upscale import main as upscale_main

    binary = tmp_path / 'binary.yml'
    binary.write_bytes(b'\xff\xfe\x00garbage')
    cv2.imwrite(str(tmp_path / 'a.png'), np.zeros((4, 4, 3), np.uint8))
    assert upscale_main(['-i', str(tmp_path / 'a.png'), '-o', str(tmp_path / 'o'), '--opt', str(binary)]) == 2
    assert f'{binary} is not a text file in UTF-8' in capsys.readouterr().err
    assert export_main(['--opt', str(binary), '-o', str(tmp_path / 'x.onnx'), '--random-weights']) == 2
    assert f'{binary} is not a text file in UTF-8' in capsys.readouterr().err


def test_safe_loader_keeps_basicsr_types_and_refuses_python_tags(tmp_path):
    from collections import OrderedDict

    good = tmp_path / 'good.yml'
    good.write_text('name: x\nbase: &b {lr: !!float 2e-4}\ntrain:\n  <<: *b\n  total_iter: 10\n  milestones: [1, 2]\n')
    opt = load_yaml(str(good))
    assert isinstance(opt, OrderedDict) and isinstance(opt['train'], OrderedDict)
    assert opt['train'] == {'lr': 2e-4, 'total_iter': 10, 'milestones': [1, 2]}
    assert list(opt) == ['name', 'base', 'train']
    marker = tmp_path / 'ran'
    for tag in ('!!python/object/apply:os.system', '!!python/object/new:os.system', '!!python/name:os.system'):
        evil = tmp_path / 'evil.yml'
        evil.write_text(f'name: x\nscale: 4\nnetwork_g:\n  type: {tag} ["touch {marker}"]\n')
        with pytest.raises(OptionsError) as err:
            load_yaml(str(evil))
        assert f'{evil}, line 4' in str(err.value) and 'python/' in str(err.value)
    assert not marker.exists()


def test_a_key_written_twice_is_an_error_naming_both_lines(tmp_path):
    """PyYAML keeps the last of two equal keys silently (a pasted block with ``lr: 2e-4`` and later ``lr: 2e-3``
    would train with one of them unseen): refused, naming the file and both lines. A merged anchor's key may still
    be overridden, as YAML allows."""
    twice = tmp_path / 'twice.yml'
    twice.write_text('name: x\ntrain:\n  total_iter: 10\n  optim_g: {type: Adam}\n  total_iter: 20\n')
    with pytest.raises(OptionsError) as err:
        load_yaml(str(twice))
    assert f'{twice}, line 5' in str(err.value) and "'total_iter' appears twice" in str(err.value)
    assert 'first on line 3' in str(err.value) and 'python/' not in str(err.value)
    merged = tmp_path / 'merged.yml'
    merged.write_text('base: &b {lr: 1, gamma: 2}\ntrain:\n  <<: *b\n  lr: 3\n')
    assert load_yaml(str(merged))['train'] == {'lr': 3, 'gamma': 2}


def test_force_yml_values_are_parsed_as_data(tmp_path):
    from adasr.cli.options import apply_overrides, parse_overrides

    overrides = parse_overrides(['train:total_iter=4', 'train:optim_g:lr=!!float 1e-3', 'val=none',
                                 'train:milestones=[1, 2]', 'name=x"]=__import__("os").system("true");#'])
    opt = apply_overrides({'name': 'a', 'val': {}, 'train': {'optim_g': {'lr': 1.0}}}, overrides)
    assert opt == {'name': 'x"]=__import__("os").system("true");#', 'val': None,
                   'train': {'total_iter': 4, 'optim_g': {'lr': 1e-3}, 'milestones': [1, 2]}}
    with pytest.raises(OptionsError, match='no section train:optim_d'):
        apply_overrides({'train': {}}, parse_overrides(['train:optim_d:lr=1']))
    for bad in ('train:total_iter', '=3', 'a=!!python/object/apply:os.system ["true"]'):
        with pytest.raises(OptionsError, match='--force_yml'):
            parse_overrides([bad])


def test_one_safe_loader_reads_every_option_file():
    """adasr, its scripts and benchmarks read YAML only through adasr.cli.options (OptionLoader): no other
    ``yaml.load``, no BasicSR ``ordered_yaml()`` (an unsafe loader), no ``unsafe_load`` / ``full_load``."""
    import re

    unsafe = re.compile(r'yaml\.(unsafe_load|full_load)\(|Loader=(?!OptionLoader)|ordered_yaml\(\)\[0\]'
                        r'|yaml\.load\((?!.*Loader=OptionLoader)')
    found = []
    for folder in ('adasr', 'scripts', 'benchmarks'):
        for path in glob.glob(osp.join(REPO, folder, '**', '*.py'), recursive=True):
            with open(path, encoding='utf-8') as f:
                found += [f'{osp.relpath(path, REPO)}:{i}' for i, line in enumerate(f, 1) if unsafe.search(line)]
    assert not found, found


@pytest.mark.parametrize('kind,flags', [('train', ['--auto_resume', '--force_yml']),
                                        ('test', ['--sets', '--force_yml'])])
def test_help_lists_basicsr_and_adasr_flags_and_runs_nothing(kind, flags, capsys):
    """``adasr-train -h`` / ``adasr-test -h`` print the flags (BasicSR's and adasr's) and exit 0 without an option
    file; nothing is read or run."""
    from adasr.cli.entry import run

    with pytest.raises(SystemExit) as exc:
        run(kind, ['-h'])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f'usage: adasr-{kind}' in out and '-opt FILE' in out and '--launcher' in out
    assert all(flag in out for flag in flags)
