"""The adasr-upscale CLI on tiny real images: odd image types, unreadable files, resume, atomic writes, tiling,
and the model sources (--arch, --opt, --weights)."""
import os
import os.path as osp
import struct
import subprocess
import sys
import zlib

import cv2
import numpy as np
import pytest
import torch
import yaml
from basicsr.archs.swinir_arch import SwinIR

from adasr.cli.upscale import main
from adasr.utils import files, image_io
from adasr.utils.files import TEMP_SUFFIX, atomic_write_bytes
from adasr.utils.image_io import read_image
from adasr.utils.matlab_resize import imresize

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
PHOTO = osp.join(REPO, 'datasets', 'demo', 'val', 'HR', 'chelsea.png')
TINY_SWINIR = dict(upscale=2, in_chans=3, img_size=16, window_size=8, img_range=1.0, depths=[1], embed_dim=12,
                   num_heads=[2], mlp_ratio=2, upsampler='pixelshuffledirect', resi_connection='1conv')


def photo(h, w, top=60, left=80):
    return np.ascontiguousarray(cv2.imread(PHOTO)[top:top + h, left:left + w])


def bicubic_u8(img_u8, scale):
    """What the CLI must write for --arch Bicubic: MATLAB bicubic on float32 [0, 1], clamped and rounded."""
    x = torch.from_numpy(img_u8.astype(np.float32) / 255)
    x = x.permute(2, 0, 1)[None] if x.dim() == 3 else x[None, None]
    y = imresize(x, scale)[0].clamp(0, 1)
    y = (y * 255).round().to(torch.uint8)
    return (y.permute(1, 2, 0) if y.shape[0] > 1 else y[0]).numpy()


@pytest.fixture
def odd_folder(tmp_path):
    """A folder with a gray PNG, an RGBA PNG, a 16-bit PNG, a tiny odd-size JPEG-free PNG, a palette GIF, a
    broken PNG, a BMP with a damaged header, a PNG whose header claims 100000 x 100000, an empty file, and a text
    file (not an image, ignored)."""
    d = tmp_path / 'in'
    d.mkdir()
    rgb = photo(20, 24)
    cv2.imwrite(str(d / 'gray.png'), cv2.cvtColor(rgb, cv2.COLOR_BGR2GRAY))
    alpha = np.tile(np.linspace(0, 255, 24, dtype=np.float64), (20, 1)).round().astype(np.uint8)
    cv2.imwrite(str(d / 'rgba.png'), np.dstack([rgb, alpha]))
    cv2.imwrite(str(d / 'deep16.png'), (rgb.astype(np.uint16) * 257 + np.arange(24, dtype=np.uint16)[None, :, None]))
    cv2.imwrite(str(d / 'tiny_3x5.png'), photo(3, 5))
    from PIL import Image

    Image.fromarray(rgb[..., ::-1]).convert('P').save(d / 'palette.gif')
    (d / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'not really a png' * 4)
    bmp = bytearray(cv2.imencode('.bmp', rgb)[1].tobytes())
    bmp[22:26] = b'\xff\xff\xff\x7f'  # the height field: OpenCV asserts (cv2.error) instead of returning None
    (d / 'bad_header.bmp').write_bytes(bytes(bmp))

    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))

    (d / 'huge_header.png').write_bytes(  # 100000 x 100000 claimed: past OpenCV's and Pillow's limits
        b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', 100000, 100000, 8, 2, 0, 0, 0))
        + chunk(b'IDAT', zlib.compress(b'\0' * 1000)) + chunk(b'IEND', b''))
    (d / 'empty.jpg').write_bytes(b'')
    (d / 'notes.txt').write_text('not an image')
    return d


def test_folder_of_odd_images(odd_folder, tmp_path, capsys):
    out = tmp_path / 'out'
    status = main(['-i', str(odd_folder), '-o', str(out), '--arch', 'Bicubic', '--scale', '2', '-q'])
    captured = capsys.readouterr()
    assert status == 1  # some inputs failed
    assert sorted(os.listdir(out)) == ['deep16_out.png', 'gray_out.png', 'palette_out.png', 'rgba_out.png',
                                       'tiny_3x5_out.png']
    # failures are named with a reason, the others were still written, and a summary is printed
    assert 'broken.png' in captured.err and 'cannot decode' in captured.err
    assert 'empty.jpg: empty file' in captured.err
    broken_line = next(line for line in captured.err.splitlines() if line.startswith('failed:') and 'broken' in line)
    assert broken_line.count('broken.png') == 1  # the path is named once
    assert 'notes.txt' not in captured.err + captured.out
    assert 'bad_header.bmp' in captured.err and 'huge_header.png' in captured.err  # named, and the run went on
    assert 'done: 5 written, 0 skipped (output exists), 4 failed' in captured.out

    gray = cv2.imread(str(out / 'gray_out.png'), cv2.IMREAD_UNCHANGED)
    src_gray = cv2.imread(str(odd_folder / 'gray.png'), cv2.IMREAD_UNCHANGED)
    assert gray.shape == (40, 48) and gray.dtype == np.uint8  # grayscale stays grayscale
    assert np.abs(gray.astype(int) - bicubic_u8(src_gray, 2).astype(int)).max() <= 1

    rgba = cv2.imread(str(out / 'rgba_out.png'), cv2.IMREAD_UNCHANGED)
    src = cv2.imread(str(odd_folder / 'rgba.png'), cv2.IMREAD_UNCHANGED)
    assert rgba.shape == (40, 48, 4)
    assert np.array_equal(rgba[..., :3], bicubic_u8(src[..., :3], 2))  # colour through the model
    assert np.array_equal(rgba[..., 3], bicubic_u8(src[..., 3], 2))  # alpha upscaled separately (bicubic)

    deep = cv2.imread(str(out / 'deep16_out.png'), cv2.IMREAD_UNCHANGED)
    src16 = cv2.imread(str(odd_folder / 'deep16.png'), cv2.IMREAD_UNCHANGED)
    assert deep.dtype == np.uint16 and deep.shape == (40, 48, 3)
    ref = imresize(torch.from_numpy(src16.astype(np.float64) / 65535).permute(2, 0, 1), 2).clamp(0, 1)
    ref = (ref * 65535).round().permute(1, 2, 0).numpy()
    assert np.abs(deep.astype(np.float64) - ref).max() <= 1  # no 8-bit round trip on the way
    assert np.any(deep % 257 != 0)

    tiny = cv2.imread(str(out / 'tiny_3x5_out.png'))
    assert tiny.shape == (6, 10, 3)
    assert np.array_equal(tiny, bicubic_u8(photo(3, 5), 2))
    assert cv2.imread(str(out / 'palette_out.png')).shape == (40, 48, 3)
    assert not [f for f in os.listdir(out) if f.endswith(TEMP_SUFFIX)]


def test_arch_bicubic_equals_imresize_whole_and_tiled(tmp_path):
    img = photo(50, 70)
    cv2.imwrite(str(tmp_path / 'a.png'), img)
    for tile, name in ((['--tile', '0'], 'whole'), (['--tile', '16', '--tile_pad', '4'], 'tiled')):
        assert main(['-i', str(tmp_path / 'a.png'), '-o', str(tmp_path / name), '--arch', 'Bicubic',
                     '--scale', '4', '-q', *tile]) == 0
    expect = bicubic_u8(img, 4)
    whole = cv2.imread(str(tmp_path / 'whole' / 'a_out.png'))
    tiled = cv2.imread(str(tmp_path / 'tiled' / 'a_out.png'))
    assert np.array_equal(whole, expect)
    assert np.abs(tiled.astype(int) - expect.astype(int)).max() <= 1
    assert (tiled != expect).mean() < 1e-3


def test_resume_skips_existing_outputs_and_overwrite_replaces(tmp_path, capsys):
    src = tmp_path / 'in'
    src.mkdir()
    for i in range(3):
        cv2.imwrite(str(src / f'im{i}.png'), photo(8, 9, top=10 * i))
    out = tmp_path / 'out'
    out.mkdir()
    # an earlier, interrupted run wrote im0 only
    assert main(['-i', str(src / 'im0.png'), '-o', str(out), '--arch', 'Bicubic', '--scale', '2', '-q']) == 0
    first = out / 'im0_out.png'
    os.utime(first, (1_000_000_000, 1_000_000_000))
    capsys.readouterr()
    assert main(['-i', str(src), '-o', str(out), '--arch', 'Bicubic', '--scale', '2']) == 0
    text = capsys.readouterr().out
    assert 'done: 2 written, 1 skipped (output exists), 0 failed' in text
    assert f'skip im0.png: {first} exists' in text
    assert os.stat(first).st_mtime == 1_000_000_000  # untouched
    assert sorted(os.listdir(out)) == ['im0_out.png', 'im1_out.png', 'im2_out.png']
    assert main(['-i', str(src), '-o', str(out), '--arch', 'Bicubic', '--scale', '2', '--overwrite', '-q']) == 0
    assert os.stat(first).st_mtime > 1_000_000_000
    assert 'done: 3 written, 0 skipped' in capsys.readouterr().out


def test_atomic_write_leaves_old_file_and_no_temp_on_failure(tmp_path, monkeypatch):
    dst = tmp_path / 'x.png'
    dst.write_bytes(b'old')

    def broken_fsync(fd):
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(files.os, 'fsync', broken_fsync)
    with pytest.raises(OSError, match='No space'):
        atomic_write_bytes(str(dst), b'new content that never lands')
    assert dst.read_bytes() == b'old'
    assert os.listdir(tmp_path) == ['x.png']
    monkeypatch.undo()
    atomic_write_bytes(str(dst), b'new')
    assert dst.read_bytes() == b'new' and os.listdir(tmp_path) == ['x.png']
    assert os.stat(dst).st_mode & 0o777 == 0o666 & ~files._umask()  # as open() would create it, not 0600


def test_interrupted_run_loses_nothing(tmp_path, monkeypatch, capsys):
    """A failure while writing one image (disk full, Ctrl-C) leaves no partial file; earlier outputs stay."""
    src = tmp_path / 'in'
    src.mkdir()
    for i in range(3):
        cv2.imwrite(str(src / f'im{i}.png'), photo(8, 8, top=8 * i))
    out = tmp_path / 'out'
    calls = {'n': 0}
    real_replace = os.replace

    def flaky_replace(a, b):
        calls['n'] += 1
        if calls['n'] == 2:
            raise KeyboardInterrupt
        return real_replace(a, b)

    monkeypatch.setattr(files.os, 'replace', flaky_replace)
    assert main(['-i', str(src), '-o', str(out), '--arch', 'Bicubic', '--scale', '2', '-q']) == 130
    assert 'interrupted; the images written' in capsys.readouterr().err  # no traceback
    assert os.listdir(out) == ['im0_out.png']  # no truncated im1, no temporary file
    assert cv2.imread(str(out / 'im0_out.png')).shape == (16, 16, 3)
    monkeypatch.undo()
    assert main(['-i', str(src), '-o', str(out), '--arch', 'Bicubic', '--scale', '2', '-q']) == 0
    assert 'done: 2 written, 1 skipped' in capsys.readouterr().out


def test_opt_and_weights_with_tiling(tmp_path):
    torch.manual_seed(0)
    net = SwinIR(**TINY_SWINIR)
    torch.save({'params_ema': net.state_dict()}, tmp_path / 'w.pth')
    opt = {'name': 'tiny', 'model_type': 'AdaSRModel', 'scale': 2, 'network_g': {'type': 'SwinIR', **TINY_SWINIR},
           'path': {'pretrain_network_g': str(tmp_path / 'w.pth'), 'param_key_g': 'params_ema'}}
    (tmp_path / 'opt.yml').write_text(yaml.safe_dump(opt))
    img = photo(30, 37)
    cv2.imwrite(str(tmp_path / 'a.png'), img)
    for name, extra in (('whole', ['--tile', '0']), ('tiled', ['--tile', '16', '--tile_pad', '16'])):
        assert main(['-i', str(tmp_path / 'a.png'), '-o', str(tmp_path / name), '--opt', str(tmp_path / 'opt.yml'),
                     '-q', '--ext', 'png', *extra]) == 0
    x = torch.from_numpy(img[..., ::-1].astype(np.float32) / 255).permute(2, 0, 1)[None].contiguous()
    with torch.no_grad():
        from adasr.inference.tile import padded_forward

        ref = padded_forward(net.eval(), 2, 8)(x)[0].clamp(0, 1).permute(1, 2, 0).numpy()[..., ::-1]
    ref = np.rint(ref * 255)
    whole = cv2.imread(str(tmp_path / 'whole' / 'a_out.png')).astype(np.float64)
    tiled = cv2.imread(str(tmp_path / 'tiled' / 'a_out.png')).astype(np.float64)
    assert whole.shape == (60, 74, 3)
    assert np.abs(whole - ref).max() <= 1
    assert np.abs(tiled - whole).max() <= 1


@pytest.fixture
def registered_test_net():
    from basicsr.utils.registry import ARCH_REGISTRY

    class AdaSRTestNet(torch.nn.Module):
        def __init__(self, *, upscale: int = 4):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3 * upscale ** 2, 3, 1, 1)
            self.shuffle = torch.nn.PixelShuffle(upscale)

        def forward(self, x):
            return self.shuffle(self.conv(x))

    ARCH_REGISTRY._do_register('AdaSRTestNet', AdaSRTestNet)
    yield AdaSRTestNet
    del ARCH_REGISTRY._obj_map['AdaSRTestNet']


def test_any_error_of_one_image_fails_that_image_only(registered_test_net, tmp_path, capsys):
    """A network that raises an unexpected error type (IndexError here; spandrel models raise AssertionError or
    TypeError on sizes they refuse) fails that image, named, and the run goes on; an output path that is a folder
    fails its image; an empty file at an output path (not one of ours: writes are atomic) is redone."""
    class Picky(registered_test_net):
        def forward(self, x):
            if x.shape[-1] == 13:
                raise IndexError('index 4702111233380188253 is out of bounds')
            return super().forward(x)

    from basicsr.utils.registry import ARCH_REGISTRY

    ARCH_REGISTRY._obj_map['AdaSRTestNet'] = Picky
    src, out = tmp_path / 'in', tmp_path / 'o'
    src.mkdir()
    out.mkdir()
    for name, w in (('a.png', 13), ('b.png', 12), ('c.png', 12), ('d.png', 12)):
        cv2.imwrite(str(src / name), photo(9, w))
    (out / 'c_out.png').mkdir()
    (out / 'd_out.png').write_bytes(b'')
    assert main(['-i', str(src), '-o', str(out), '--arch', 'AdaSRTestNet', '--scale', '4', '--random-weights',
                 '-q']) == 1
    err = capsys.readouterr().err
    assert 'FAILED a.png: IndexError: index 4702111233380188253 is out of bounds' in err
    assert f'FAILED c.png: the output path {out / "c_out.png"} is a folder' in err
    assert cv2.imread(str(out / 'b_out.png')).shape == (36, 48, 3)
    assert cv2.imread(str(out / 'd_out.png')).shape == (36, 48, 3)
    assert not (out / 'a_out.png').exists()


def test_an_output_too_large_for_its_format_fails_before_the_model_runs(tmp_path, capsys, monkeypatch):
    """A 4200-pixel-wide WebP at x4 (WebP holds 16383 pixels a side): named with the fix before any upscaling;
    --ext png writes it."""
    from adasr.cli import upscale

    cv2.imwrite(str(tmp_path / 'wide.webp'), np.full((2, 4200, 3), 128, np.uint8))
    runs = []
    real = upscale.upscale_image
    monkeypatch.setattr(upscale, 'upscale_image', lambda *a, **k: runs.append(1) or real(*a, **k))
    argv = ['-i', str(tmp_path / 'wide.webp'), '-o', str(tmp_path / 'o'), '--arch', 'Bicubic', '-s', '4', '-q']
    assert main(argv) == 1
    assert ('the x4 output would be 16800 pixels on its long side; .webp holds at most 16383 (choose another '
            'format: --ext png)') in capsys.readouterr().err
    assert runs == [] and os.listdir(tmp_path / 'o') == []
    assert main([*argv, '--ext', 'png']) == 0 and runs == [1]
    assert cv2.imread(str(tmp_path / 'o' / 'wide_out.png')).shape == (8, 16800, 3)


def test_arch_with_default_hyperparameters_and_weights(registered_test_net, tmp_path):
    net = registered_test_net(upscale=3)
    torch.save({'params': net.state_dict()}, tmp_path / 'w.pth')
    img = photo(9, 11)
    cv2.imwrite(str(tmp_path / 'a.png'), img)
    assert main(['-i', str(tmp_path / 'a.png'), '-o', str(tmp_path / 'o'), '--arch', 'AdaSRTestNet', '--scale', '3',
                 '--weights', str(tmp_path / 'w.pth'), '-q']) == 0  # params_ema asked, params found
    x = torch.from_numpy(img[..., ::-1].astype(np.float32) / 255).permute(2, 0, 1)[None].contiguous()
    with torch.no_grad():
        ref = net(x)[0].clamp(0, 1).permute(1, 2, 0).numpy()[..., ::-1]
    out = cv2.imread(str(tmp_path / 'o' / 'a_out.png')).astype(np.float64)
    assert out.shape == (27, 33, 3) and np.abs(out - np.rint(ref * 255)).max() <= 1


def test_bad_arguments_exit_2_with_a_message(tmp_path, capsys, registered_test_net):
    cv2.imwrite(str(tmp_path / 'a.png'), photo(8, 8))
    a = str(tmp_path / 'a.png')
    cases = [
        (['--arch', 'Bicubc', '--scale', '4'], "did you mean 'Bicubic'"),
        (['--arch', 'Bicubic'], '--arch needs --scale'),
        (['--arch', 'Bicubic', '--scale', '4', '--opt', 'x.yml'], 'exactly one of --opt'),
        (['--arch', 'AdaSRTestNet', '--scale', '2', '--weights', 'w.pth', '--random-weights'],
         '--random-weights and --weights contradict each other'),
        (['--arch', 'SwinIR', '--scale', '2'], 'cannot build SwinIR'),  # its defaults do not build; use --opt
        (['--arch', 'AdaSRTestNet', '--scale', '2'], 'give --weights'),
        (['--arch', 'Bicubic', '--scale', '4', '--ext', 'xyz'], '--ext xyz is not supported'),
        (['--arch', 'Bicubic', '--scale', '4', '--save-halting'], '--save-halting needs an AdaFormer model'),
    ]
    for extra, message in cases:
        assert main(['-i', a, '-o', str(tmp_path / 'o'), *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(['-i', str(tmp_path / 'missing'), '-o', str(tmp_path / 'o'), '--arch', 'Bicubic',
                 '--scale', '2']) == 2
    assert 'input not found' in capsys.readouterr().err
    (tmp_path / 'empty').mkdir()
    assert main(['-i', str(tmp_path / 'empty'), '-o', str(tmp_path / 'o'), '--arch', 'Bicubic', '--scale', '2']) == 2
    assert 'no images in' in capsys.readouterr().err
    (tmp_path / 'zero.pth').write_bytes(b'')
    assert main(['-i', a, '-o', str(tmp_path / 'o'), '--arch', 'Bicubic', '--scale', '2', '--weights',
                 str(tmp_path / 'zero.pth')]) == 2
    assert 'is empty (0 bytes)' in capsys.readouterr().err
    # a checkpoint that does not match is reported by key
    torch.save({'params': {'conv_first.weight': torch.zeros(1)}}, tmp_path / 'bad.pth')
    opt = {'scale': 2, 'network_g': {'type': 'SwinIR', **TINY_SWINIR}}
    (tmp_path / 'opt.yml').write_text(yaml.safe_dump(opt))
    assert main(['-i', a, '-o', str(tmp_path / 'o'), '--opt', str(tmp_path / 'opt.yml'),
                 '--weights', str(tmp_path / 'bad.pth')]) == 2
    err = capsys.readouterr().err
    assert 'missing keys' in err and 'conv_first.weight (1,) vs (12, 3, 3, 3)' in err
    assert not osp.exists(tmp_path / 'o' / 'a_out.png')
    # scale and network_g.upscale that disagree would crop the network's output wrongly; a network_g that is no
    # mapping: both named before anything is built
    for bad, words in (({'scale': 2, 'network_g': {'type': 'Bicubic', 'upscale': 4}},
                        'scale: 2 but network_g.upscale: 4'),
                       ({'scale': 2, 'network_g': [1, 2]}, 'network_g must be a mapping'),
                       ({'scale': 2, 'pth': {}, 'network_g': {'type': 'Bicubic', 'upscale': 2}},
                        "unknown key 'pth' in the option file (did you mean 'path'?)")):
        (tmp_path / 'bad.yml').write_text(yaml.safe_dump(bad))
        assert main(['-i', a, '-o', str(tmp_path / 'o'), '--opt', str(tmp_path / 'bad.yml')]) == 2
        assert words in capsys.readouterr().err
    assert not osp.exists(tmp_path / 'o' / 'a_out.png')


def test_a_run_into_the_input_folder_can_be_run_again(tmp_path, capsys):
    """-o the input folder: the second run skips the first run's outputs as inputs (it refused, because
    a_out.png's output a_out_out.png ... counted as an input replaced)."""
    cv2.imwrite(str(tmp_path / 'a.png'), photo(8, 8))
    argv = ['-i', str(tmp_path), '-o', str(tmp_path), '--arch', 'Bicubic', '--scale', '2']
    assert main(argv) == 0 and main(argv) == 0
    out = capsys.readouterr().out
    assert 'are outputs of other inputs' in out and 'done: 0 written, 1 skipped' in out
    assert sorted(os.listdir(tmp_path)) == ['a.png', 'a_out.png']


def test_scale_device_and_format_are_refused_up_front(tmp_path, capsys):
    """An option file whose scale is not the built network's (SwinIR without upscale is x2) failed every image
    after building; --device xpu was a traceback; --ext ppm failed for each gray image after the model ran."""
    cv2.imwrite(str(tmp_path / 'a.png'), photo(8, 8))
    a, out = str(tmp_path / 'a.png'), str(tmp_path / 'o')
    noup = {k: v for k, v in TINY_SWINIR.items() if k != 'upscale'}
    (tmp_path / 'noup.yml').write_text(yaml.safe_dump({'scale': 4, 'network_g': {'type': 'SwinIR', **noup}}))
    for extra, words in ((['--opt', str(tmp_path / 'noup.yml'), '--random-weights'],
                          'the network built is x2, but x4 was given'),
                         (['--arch', 'Bicubic', '--scale', '2', '--device', 'xpu'], 'runs on cpu, cuda or mps'),
                         (['--arch', 'Bicubic', '--scale', '2', '--ext', 'ppm'], 'ppm is written only for ppm inputs')):
        assert main(['-i', a, '-o', out, *extra]) == 2
        assert words in capsys.readouterr().err, extra
    assert not osp.exists(osp.join(out, 'a_out.png'))
    (tmp_path / 'none.yml').write_text(yaml.safe_dump({'network_g': {'type': 'SwinIR', **noup}}))
    assert main(['-i', a, '-o', out, '--opt', str(tmp_path / 'none.yml'), '--random-weights']) == 0
    assert cv2.imread(osp.join(out, 'a_out.png')).shape == (16, 16, 3)  # x2, measured from the network


def test_colliding_output_names_stop_before_anything_is_written(tmp_path, capsys):
    """a.png and a.jpg would both become a_out.png; an output may not be another input; a suffix is no path."""
    src = tmp_path / 'in'
    src.mkdir()
    cv2.imwrite(str(src / 'a.png'), photo(8, 8))
    cv2.imwrite(str(src / 'a.jpg'), photo(8, 8))
    cv2.imwrite(str(src / 'a_out.png'), photo(8, 8))
    base = ['--arch', 'Bicubic', '--scale', '2', '-q']
    assert main(['-i', str(src), '-o', str(tmp_path / 'o'), '--ext', 'png', *base]) == 2
    assert 'would both be written to' in capsys.readouterr().err
    assert main(['-i', str(src), '-o', str(src), '--ext', 'jpg', '--overwrite', *base]) == 2
    err = capsys.readouterr().err
    assert 'would both be written to' in err or 'would replace the input' in err
    assert main(['-i', str(src / 'a.png'), '-o', str(tmp_path / 'o'), '--suffix', '../x', *base]) == 2
    assert 'no path separator' in capsys.readouterr().err
    assert not osp.exists(tmp_path / 'o' / 'a_out.png') and not osp.exists(tmp_path / 'x.png')
    # png and jpg outputs keep them apart
    assert main(['-i', str(src), '-o', str(tmp_path / 'o'), *base]) == 0
    assert sorted(os.listdir(tmp_path / 'o')) == ['a_out.jpg', 'a_out.png', 'a_out_out.png']


def test_read_image_types(tmp_path):
    from PIL import Image

    rgb = photo(6, 7)[..., ::-1]
    Image.fromarray(rgb).convert('LA').save(tmp_path / 'la.png')
    img = read_image(str(tmp_path / 'la.png'))
    assert img.is_gray and img.alpha is not None and img.dtype == 'uint8'
    Image.fromarray((np.arange(42, dtype=np.uint16).reshape(6, 7) * 1500)).save(tmp_path / 'g16.png')
    img = read_image(str(tmp_path / 'g16.png'))
    assert img.is_gray and img.dtype == 'uint16' and img.color[5, 6] == pytest.approx(41 * 1500 / 65535)
    Image.fromarray(rgb).save(tmp_path / 'c.tif')
    img = read_image(str(tmp_path / 'c.tif'))
    assert np.allclose(img.color * 255, rgb)  # RGB order
    with pytest.raises(image_io.ImageReadError, match='cannot read file'):
        read_image(str(tmp_path / 'nothing.png'))


def test_jpg_output_of_rgba_and_16_bit_is_noted(tmp_path, capsys):
    rgb = photo(8, 8)
    cv2.imwrite(str(tmp_path / 'a.png'), np.dstack([rgb, np.full((8, 8), 200, np.uint8)]))
    cv2.imwrite(str(tmp_path / 'b.png'), rgb.astype(np.uint16) * 257)
    assert main(['-i', str(tmp_path), '-o', str(tmp_path / 'o'), '--arch', 'Bicubic', '--scale', '2',
                 '--ext', 'jpg', '-q']) == 0
    out = capsys.readouterr().out
    assert 'a.png: .jpg cannot hold alpha; alpha dropped' in out
    assert 'b.png: .jpg cannot hold 16 bits; written as 8-bit' in out
    assert cv2.imread(str(tmp_path / 'o' / 'a_out.jpg'), cv2.IMREAD_UNCHANGED).shape == (16, 16, 3)


@pytest.mark.slow
def test_wrapper_script_runs_from_a_clone(tmp_path):
    cv2.imwrite(str(tmp_path / 'a.png'), photo(8, 10))
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    proc = subprocess.run([sys.executable, osp.join(REPO, 'inference', 'upscale.py'), '-i', str(tmp_path / 'a.png'),
                           '-o', str(tmp_path / 'o'), '--arch', 'Bicubic', '--scale', '3'],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert cv2.imread(str(tmp_path / 'o' / 'a_out.png')).shape == (24, 30, 3)
    assert 'done: 1 written' in proc.stdout
