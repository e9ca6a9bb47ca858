"""The side-by-side benchmark: data layouts, rows from option files, MAC counting, quality numbers equal to an
independent computation, halting sparsity, and the script end to end on the demo photos (md/csv/json/png)."""
import csv
import json
import os
import os.path as osp
import subprocess
import sys
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import yaml
from basicsr.metrics import calculate_psnr, calculate_ssim
from basicsr.utils.matlab_functions import imresize as basicsr_imresize
from torch import nn

from adasr.archs.interface import ArchTraits, SRArch
from benchmarks.harness import (
    BenchmarkError,
    count_macs,
    evaluate,
    find_dataset,
    match_pairs,
    measure_row,
    parse_size,
    resolve_row,
    sparsity_markdown,
    table_rows,
    to_markdown,
)
from benchmarks.profiling import MALLOC_ENV

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEMO_VAL = osp.join(REPO, 'datasets', 'demo', 'val')
TINY_HAT = {'type': 'HAT', 'upscale': 4, 'embed_dim': 12, 'depths': [1], 'num_heads': [2], 'window_size': 4,
            'compress_ratio': 3, 'squeeze_factor': 4, 'mlp_ratio': 2}


def _write_yaml(path, network_g, ckpt=None):
    opt = {'name': 'tiny', 'model_type': 'AdaSRModel', 'scale': 4, 'num_gpu': 'auto',
           'datasets': {'test_1': {'name': 'x', 'type': 'PairedSRDataset', 'dataroot_gt': 'a', 'dataroot_lq': 'b',
                                   'io_backend': {'type': 'disk'}}},
           'network_g': network_g, 'path': {'pretrain_network_g': ckpt, 'param_key_g': 'params'}}
    with open(path, 'w') as f:
        yaml.safe_dump(opt, f)
    return str(path)


def test_find_dataset_layouts(tmp_path):
    demo = find_dataset(DEMO_VAL, 4)
    assert demo.name == 'demo_val'
    assert [(osp.basename(lr), osp.basename(hr)) for lr, hr in demo.pairs] == [
        ('chelsea.png', 'chelsea.png'), ('grace_hopper.png', 'grace_hopper.png')]
    assert demo.lr_dir.endswith(osp.join('LR_bicubic', 'X4'))
    for i, (hr_rel, lr_rel) in enumerate((('GTmod4', 'LRbicx4'), (osp.join('HR', 'X4'), osp.join('LR', 'X4')))):
        root = tmp_path / f'set{i}'
        os.makedirs(root / hr_rel)
        os.makedirs(root / lr_rel)
        cv2.imwrite(str(root / hr_rel / '1201.png'), np.zeros((8, 8, 3), np.uint8))
        cv2.imwrite(str(root / lr_rel / '1201x4.png'), np.zeros((2, 2, 3), np.uint8))  # DIV2K-style LR name
        spec = find_dataset(str(root), 4, name='Mine')
        assert spec.name == 'Mine' and spec.lr_dir == str(root / lr_rel)
        assert [osp.basename(p) for p in spec.pairs[0]] == ['1201x4.png', '1201.png']
    with pytest.raises(BenchmarkError, match=r'has no x3 test pairs: expected GTmod3\+LRbicx3'):
        find_dataset(DEMO_VAL + '/HR', 3)
    os.makedirs(tmp_path / 'H')
    os.makedirs(tmp_path / 'L')
    cv2.imwrite(str(tmp_path / 'L' / 'lonely.png'), np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(BenchmarkError, match='no HR image for .*lonely.png'):
        match_pairs(str(tmp_path / 'H'), str(tmp_path / 'L'), 4)
    # an LR of another scale: named from the headers before any row runs (it gave 13.30 dB against the HR's corner)
    cv2.imwrite(str(tmp_path / 'H' / 'lonely.png'), np.zeros((16, 19, 3), np.uint8))
    assert len(match_pairs(str(tmp_path / 'H'), str(tmp_path / 'L'), 8)) == 1  # up to scale - 1 more: cropped
    with pytest.raises(BenchmarkError, match=r'lonely.png: the GT is 19x16 but its LR is 2x2: at x4 the GT height '
                                             r'must be 8 to 11 \(is this the LR of another scale\?\)'):
        match_pairs(str(tmp_path / 'H'), str(tmp_path / 'L'), 4)


def test_parse_size():
    assert parse_size('320x180') == (180, 320)
    with pytest.raises(BenchmarkError, match='WIDTHxHEIGHT'):
        parse_size('320')


def test_rows_from_option_files_label_missing_weights(tmp_path):
    row = resolve_row('HAT-S', osp.join(REPO, 'options', 'test', 'test_HAT-S_x4.yml'))
    assert row.network_g['embed_dim'] == 144 and row.scale == 4 and row.param_key == 'params_ema'
    assert row.checkpoint is None and 'HAT-S_SRx4.pth not found: random init' in row.note
    net = nn.Conv2d(3, 3, 1)
    torch.save({'params': net.state_dict()}, tmp_path / 'w.pth')
    row = resolve_row('X', _write_yaml(tmp_path / 'x.yml', TINY_HAT), weights=str(tmp_path / 'w.pth'))
    assert row.checkpoint == str(tmp_path / 'w.pth') and row.note == ''
    with pytest.raises(BenchmarkError, match='weights for X not found'):
        resolve_row('X', str(tmp_path / 'x.yml'), weights=str(tmp_path / 'none.pth'))


def test_mac_counts():
    from adasr.archs.bicubic_arch import Bicubic

    x = torch.rand(1, 3, 10, 12)
    macs, method, _ = count_macs(Bicubic(upscale=4), x)
    # 4 taps per output sample in each separable pass (upscaling): rows 40x12, then 40x48, 3 channels
    assert (macs, method) == (3 * 4 * (40 * 12 + 40 * 48), 'analytic')
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1), nn.Flatten(2))
    macs, method, per_op = count_macs(net, x)
    assert method == 'torch' and macs == 120 * (8 * 3 * 9 + 2 * 8)  # 10x12 pixels, two convolutions
    assert per_op == {'aten.convolution': macs}
    lin = nn.Linear(5, 7)
    assert count_macs(lin, torch.rand(4, 5))[0] == 4 * 5 * 7
    # an arch that does not pad itself (basicsr's SwinIR) is counted as the harness runs it: padded to its window
    from basicsr.archs import build_network

    swin = build_network({'type': 'SwinIR', 'upscale': 4, 'img_size': 8, 'window_size': 4, 'depths': [1],
                          'embed_dim': 12, 'num_heads': [2], 'mlp_ratio': 2, 'upsampler': 'pixelshuffledirect'})
    odd, _, _ = count_macs(swin.eval(), torch.rand(1, 3, 10, 13), window_size=4, scale=4)
    padded, _, _ = count_macs(swin, torch.rand(1, 3, 12, 16), window_size=4, scale=4)
    assert odd == padded > 0


def test_quality_equals_an_independent_computation():
    """Bicubic through the benchmark's evaluation equals BasicSR's own imresize + metrics on the same files."""
    from adasr.archs.bicubic_arch import Bicubic

    data = find_dataset(DEMO_VAL, 4)
    res = evaluate(Bicubic(upscale=4).eval(), data, scale=4, window_size=1, device='cpu')
    psnrs, ssims = [], []
    for lr_path, hr_path in data.pairs:
        lr = cv2.imread(lr_path).astype(np.float64) / 255.0
        sr = basicsr_imresize(lr, 4)  # numpy HWC path of BasicSR's MATLAB port
        sr = (np.clip(sr, 0, 1) * 255.0).round().astype(np.uint8)
        hr = cv2.imread(hr_path)
        psnrs.append(calculate_psnr(sr, hr, 4, test_y_channel=True))
        ssims.append(calculate_ssim(sr, hr, 4, test_y_channel=True))
    assert res['images'] == 2
    assert res['psnr'] == pytest.approx(np.mean(psnrs), abs=1e-3)
    assert res['ssim'] == pytest.approx(np.mean(ssims), abs=1e-4)


class _Halting(SRArch, nn.Module):
    """A parameter-free 'adaptive' model: bicubic-free nearest upscale that reports made-up halting shares."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.last_halting = None

    def arch_traits(self):
        return ArchTraits(pads_input=True, adaptive=True)

    def halting_record(self):
        return self.last_halting

    def forward(self, x):
        self.calls += 1
        share = 0.1 * self.calls
        self.last_halting = SimpleNamespace(sparsity={'global_consumed': [0.0, share], 'local_consumed': [0.0, 0.5]})
        return x.repeat_interleave(4, 2).repeat_interleave(4, 3)


def test_halting_sparsity_is_averaged_and_reported():
    data = find_dataset(DEMO_VAL, 4)
    res = evaluate(_Halting(), data, scale=4, window_size=1, device='cpu')
    assert res['sparsity']['global_consumed'] == pytest.approx([0.0, 0.15])  # images: 0.1 and 0.2
    from benchmarks.harness import RowSpec, halting_summary

    row = RowSpec(label='Ada', source='x.yml', network_g={}, scale=4)
    results = {'Ada': {'params': 0, 'quality': {'demo_val': res}}}
    md = sparsity_markdown([row], results)
    assert '| global_consumed | 0.0% | 15.0% |' in md and '| local_consumed | 0.0% | 50.0% |' in md
    assert halting_summary(results['Ada']) == '8% / 25%'


def test_measure_row_in_process():
    data = find_dataset(DEMO_VAL, 4)
    spec = {'network_g': TINY_HAT, 'scale': 4, 'checkpoint': None}
    d = [{'name': data.name, 'hr_dir': data.hr_dir, 'lr_dir': data.lr_dir, 'pairs': data.pairs[:1]}]
    threads = torch.get_num_threads()
    try:
        res = measure_row(spec, d, size=(9, 11), repeats=1, warmup=0, device='cpu', threads=1, max_images=1)
    finally:
        torch.set_num_threads(threads)
    from basicsr.archs import build_network

    assert res['params'] == sum(p.numel() for p in build_network(dict(TINY_HAT)).parameters())
    assert res['macs_method'] == 'torch' and res['macs'] == pytest.approx(sum(res['macs_per_op'].values()))
    assert set(res['macs_per_op']) == {'aten.convolution', 'aten.addmm', 'aten.bmm'}  # convs, linears, attention
    assert res['latency']['runs'] == 1 and res['latency']['median_s'] > 0
    q = res['quality']['demo_val']
    assert q['images'] == 1 and 0 < q['psnr'] < 40 and -1 <= q['ssim'] <= 1
    header, cells = table_rows([resolve_row_stub()], {'tiny': res}, ['demo_val'])
    md = to_markdown(header, cells)
    assert '| tiny (untrained) | untrained (random init) |' in md


def resolve_row_stub():
    from benchmarks.harness import RowSpec

    return RowSpec(label='tiny', source='x.yml', network_g=TINY_HAT, scale=4)


@pytest.mark.slow
def test_benchmark_script_end_to_end(tmp_path):
    opt = _write_yaml(tmp_path / 'tiny.yml', TINY_HAT)
    out = tmp_path / 'bench'
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS='1', **MALLOC_ENV)  # no re-exec needed
    proc = subprocess.run([sys.executable, osp.join(REPO, 'scripts', 'benchmark.py'), '--data', DEMO_VAL,
                           '--rows', 'Bicubic', '--opt', f'Tiny={opt}', '--size', '16x12', '--repeats', '1',
                           '--warmup', '0', '--threads', '1', '--out', str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == ['benchmark.csv', 'benchmark.json', 'benchmark.md', 'benchmark.png']
    with open(out / 'benchmark.csv') as f:
        rows = list(csv.DictReader(f))
    assert [r['model'] for r in rows] == ['Bicubic', 'Tiny (untrained)']
    assert rows[0]['weights'] == 'none needed' and rows[1]['weights'] == 'untrained (random init)'
    bicubic = evaluate(__import__('adasr.archs.bicubic_arch', fromlist=['Bicubic']).Bicubic(upscale=4).eval(),
                       find_dataset(DEMO_VAL, 4), scale=4, window_size=1, device='cpu')
    assert float(rows[0]['PSNR-Y demo_val']) == pytest.approx(bicubic['psnr'], abs=1e-6)
    assert float(rows[0]['MACs (G)']) == pytest.approx(3 * 4 * (48 * 16 + 48 * 64) / 1e9)
    assert float(rows[1]['params']) > 0 and float(rows[1]['latency median (s)']) > 0
    md = (out / 'benchmark.md').read_text()
    assert '| Bicubic | none needed | fp32 | 0 |' in md and 'MALLOC_MMAP_THRESHOLD_' in md and '16x12 LR input' in md
    assert 'python scripts/benchmark.py --data' in md
    assert (out / 'benchmark.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    saved = json.loads((out / 'benchmark.json').read_text())
    assert saved['settings']['environment']['threads'] == 1
    assert '| Tiny (untrained) |' in proc.stdout


def test_script_rejects_bad_arguments(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location('benchmark_script', osp.join(REPO, 'scripts', 'benchmark.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit, match="unknown row 'HAT-XL'"):
        mod.main(['--data', DEMO_VAL, '--rows', 'HAT-XL'])
    with pytest.raises(SystemExit, match='has no x4 test pairs'):
        mod.main(['--data', str(tmp_path), '--rows', 'Bicubic'])
    with pytest.raises(SystemExit, match="--weights for 'HAT-S', which is not a row"):
        mod.main(['--data', DEMO_VAL, '--rows', 'Bicubic', '--weights', 'HAT-S=x.pth'])
    for flag, value in (('--max-images', '0'), ('--repeats', '0'), ('--warmup', '-1'), ('--timeout', 'nan')):
        with pytest.raises(SystemExit) as stop:
            mod.main(['--data', DEMO_VAL, '--rows', 'Bicubic', flag, value])
        assert stop.value.code == 2 and flag in capsys.readouterr().err


def test_outputs_and_eps_h(tmp_path):
    from benchmarks.harness import RowSpec, build_net, save_outputs

    row = RowSpec(label='Ada', source='x.yml', network_g={}, scale=4, checkpoint='w.pth', note='a note')
    res = {'params': 10, 'macs': 2e9, 'macs_method': 'analytic', 'latency': {'median_s': 1.0}, 'spread': 0.01,
           'peak_bytes': 2 ** 20, 'quality': {'demo_val': {'psnr': 30.0, 'ssim': 0.9, 'images': 2}}}
    settings = {'command': 'c', 'date': 'd', 'device': 'cpu', 'size_label': '8x8', 'repeats': 1, 'warmup': 0,
                'scale': 4, 'data': ['demo_val'], 'memory_kind': 'rss',
                'environment': {'torch': 't', 'threads': 1, 'cpu_count': 2, 'malloc_env': {}}}
    paths = save_outputs(str(tmp_path), [row], {'Ada': res, }, ['demo_val'], settings)
    md = open(paths['md']).read()
    assert '| Ada | w.pth | fp32 | 0.000M | 2.00 | analytic | 1.000 | 1.0 | 1 | 30.00 | 0.9000 | - |' in md
    assert '- Ada: a note' in md and 'defaults (--no-malloc-env)' in md
    # val.eps_h of an option file reaches the network; a network without it is an error
    opt = _write_yaml(tmp_path / 'e.yml', TINY_HAT)
    with open(opt) as f:
        data = yaml.safe_load(f)
    data['val'] = {'eps_h': 0.2}
    with open(opt, 'w') as f:
        yaml.safe_dump(data, f)
    spec = resolve_row('E', opt)
    assert spec.eps_h == 0.2
    with pytest.raises(BenchmarkError, match='val.eps_h is set but HAT has no eps_h'):
        build_net({'network_g': TINY_HAT, 'eps_h': 0.2}, 'cpu')


@pytest.mark.parametrize('n, kk, d', [(40, 2, 3), (40, 30, 3)])
def test_pft_sparse_attention_products_are_counted(n, kk, d):
    """PFT's custom sparse products are counted inside the op, so they are charged for the kernel it picks on this
    device: n*K*d for the gather, sampled-product and embedding-bag forms, n*m*d for the dense BLAS form (large K
    on a CPU)."""
    from adasr.ops import sparse_av, sparse_qk
    from adasr.ops.sparse_attention import pick_method

    class SparseAttention(SRArch, nn.Module):
        def arch_traits(self):
            return ArchTraits(pads_input=True)

        def forward(self, x):  # x: (B, n, d); every query attends to its first K keys
            index = torch.arange(kk).expand(x.shape[0], x.shape[1], kk).contiguous()
            attn = sparse_qk(x, x, index).softmax(-1)
            return sparse_av(attn, x, index)

    macs, method, _ = count_macs(SparseAttention(), torch.rand(2, n, d))
    assert method == 'torch'
    cpu = torch.device('cpu')
    expected = sum(2 * n * (n if pick_method(op, n, kk, d, cpu) == 'dense' else kk) * d for op in ('qk', 'av'))
    assert macs == expected
    assert (kk == 2) == (expected == 2 * 2 * n * kk * d)  # small K: sparse forms for both; large K: dense scores


def test_cpu_fused_attention_is_counted():
    """PFT's dense layers run as scaled_dot_product_attention (CPU flash kernel), which torch's counter does not
    price: counted here as q @ k^T plus attn @ v, b*h*n*m*(d + dv) multiply-adds."""
    class Attention(SRArch, nn.Module):
        def arch_traits(self):
            return ArchTraits(pads_input=True)

        def forward(self, x):  # (b, h, n, d)
            return torch.nn.functional.scaled_dot_product_attention(x, x, x, attn_mask=torch.zeros(1, 1, 64, 64))

    macs, method, _ = count_macs(Attention(), torch.rand(2, 4, 64, 13))
    assert method == 'torch' and macs == 2 * 4 * 64 * 64 * (13 + 13)


def test_environment_line_names_the_isa_threads_and_load(monkeypatch):
    """Every benchmark figure is printed with the ISA PyTorch dispatches to, the threads and the load."""
    from benchmarks.profiling import environment_line

    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: 'AVX2')
    line = environment_line(3)
    assert 'PyTorch ISA AVX2' in line and '3 threads' in line and 'load ' in line and 'malloc env ' in line
    assert f'{torch.get_num_threads()} threads' in environment_line()


def test_pft_macs_are_counted_whatever_kernel_runs():
    """PFT's compiled layer kernels do their products out of the counter's sight: the harness counts PFT by
    PyTorch's operators, so the count is the same whichever kernel the option picks."""
    from adasr.archs.pft_arch import PFT
    from adasr.ops import config
    from tests.helpers import pft_fixtures as fixtures

    torch.manual_seed(0)
    net = PFT(**fixtures.GUARDS['light_x4']).eval()
    x = torch.rand(1, 3, 16, 16)
    counts = []
    for kernel in ('numba', 'torch'):
        with config.options(pft_kernel=kernel):
            counts.append(count_macs(net, x)[0])
    assert counts[0] == counts[1] > 0


def test_pft_macs_count_the_onednn_linears(monkeypatch):
    """At CPU inference PFT's linear layers run as oneDNN linears (adasr.ops.cpu_inference.linear), an operator
    PyTorch's counter does not know: the harness counts them (rows x in x out), so the count is the plain
    operators' (the engines off)."""
    from adasr.archs.pft_arch import PFT
    from adasr.ops import cpu_inference
    from tests.helpers import pft_fixtures as fixtures

    torch.manual_seed(0)
    net = PFT(**fixtures.GUARDS['light_x4']).eval()
    x = torch.rand(1, 3, 16, 16)
    macs, _, per_op = count_macs(net, x)
    monkeypatch.setattr(cpu_inference, 'fast_path_ok', lambda t: False)
    plain, _, plain_op = count_macs(net, x)
    assert macs == plain and per_op.get('aten.addmm', 0) + per_op.get('mkldnn._linear_pointwise', 0) == \
        plain_op['aten.addmm'] > 0
