#!/usr/bin/env python3
"""End-to-end check of the evaluation pipeline: MATLAB bicubic through ``adasr/test.py`` on the classic sets must
land within 0.1 dB of the published PSNR-Y (EDSR/RCAN/SwinIR tables).

Prepare the sets first (docs/datasets.md), e.g.
    python scripts/data_preparation/prepare_benchmark.py --name Set5 --hr path/to/Set5/HR
then
    python scripts/check_bicubic.py                       # Set5 and Set14, x2 x3 x4
    python scripts/check_bicubic.py --sets Set5 --scales 4

Runs ``options/test/test_Bicubic_x{s}.yml`` restricted to the sets asked for (results under --work), prints a table
and exits non-zero when a set misses the published value by more than --tolerance dB.
"""
import argparse
import copy
import glob
import os
import os.path as osp
import re
import subprocess
import sys
import tempfile

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))

#: PSNR-Y of bicubic x2/x3/x4 as published in the EDSR, RCAN and SwinIR papers.
PUBLISHED = {
    'Set5': {2: 33.66, 3: 30.39, 4: 28.42},
    'Set14': {2: 30.24, 3: 27.55, 4: 26.00},
    'B100': {2: 29.56, 3: 27.21, 4: 25.96},
    'Urban100': {2: 26.88, 3: 24.46, 4: 23.14},
    'Manga109': {2: 30.80, 3: 26.95, 4: 24.89},
}


def run_scale(scale: int, sets, root: str, work: str) -> dict:
    """Run the test pipeline for one scale and return {set: (psnr, ssim)} read from its log."""
    import yaml

    sys.path.insert(0, REPO)
    from adasr.cli.options import load_yaml

    opt = load_yaml(osp.join(REPO, 'options', 'test', f'test_Bicubic_x{scale}.yml'))
    opt = copy.deepcopy(dict(opt))
    opt['name'] = f'check_Bicubic_x{scale}'
    datasets = {}
    for i, name in enumerate(sets, 1):
        datasets[f'test_{i}'] = {'name': name, 'type': 'PairedSRDataset',
                                 'dataroot_gt': osp.abspath(osp.join(root, name, f'GTmod{scale}')),
                                 'dataroot_lq': osp.abspath(osp.join(root, name, f'LRbicx{scale}')),
                                 'io_backend': {'type': 'disk'}}
    opt['datasets'] = datasets
    opt['val'] = dict(opt['val'], save_img=False, pbar=False)
    os.makedirs(work, exist_ok=True)
    opt_path = osp.join(work, f'check_Bicubic_x{scale}.yml')
    with open(opt_path, 'w') as f:
        yaml.safe_dump(_plain(opt), f, sort_keys=False)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
    proc = subprocess.run([sys.executable, osp.join(REPO, 'adasr', 'test.py'), '-opt', opt_path], cwd=work,
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f'the test pipeline failed for x{scale}:\n{proc.stderr[-3000:]}')
    log = sorted(glob.glob(osp.join(work, 'results', opt['name'], 'test_*.log')), key=osp.getmtime)[-1]
    return parse_log(open(log).read())


def check_same_hr(root: str, name: str, scales) -> None:
    """All scales of a set must come from the same HR images: ``GTmod{s}`` sizes may differ only by the crop to a
    multiple of ``s`` (< s pixels). SelfExSR's Urban100 ``x2/HR`` is half resolution (bicubic then scores 26.66
    instead of the published 26.88): prepared from it, GTmod2 is half the size of GTmod4 and this stops the check."""
    from adasr.utils.image_io import decode_image

    sizes = {}
    for s in scales:
        folder = osp.join(root, name, f'GTmod{s}')
        files = sorted(f for f in os.listdir(folder) if not f.startswith('.'))
        sizes[s] = {f: decode_image(osp.join(folder, f)).shape[:2] for f in files[:3]}
    ref_scale = max(scales)
    for s in scales:
        for f, (h, w) in sizes[s].items():
            rh, rw = sizes[ref_scale].get(f, (h, w))
            if abs(h - rh) >= max(s, ref_scale) or abs(w - rw) >= max(s, ref_scale):
                raise SystemExit(f'error: {osp.join(root, name, f"GTmod{s}", f)} is {w}x{h} but the x{ref_scale} '
                                 f'ground truth is {rw}x{rh}: the sets were prepared from HR images of different '
                                 'resolutions (SelfExSR\'s Urban100 x2/HR is half resolution: prepare every scale '
                                 "from the full-resolution HR, e.g. --hr 'Urban100/x4/HR'; see docs/datasets.md)")


def parse_log(text: str) -> dict:
    """{dataset: {metric: value}} from a BasicSR test log ('Validation <name>' then '# psnr: x' lines)."""
    out, current = {}, None
    for line in text.splitlines():
        m = re.search(r'Validation (\S+)', line)
        if m:
            current = out.setdefault(m.group(1), {})
            continue
        m = re.search(r'# (\w+): ([0-9.]+)', line)
        if m and current is not None:
            current[m.group(1)] = float(m.group(2))
    return out


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description='Bicubic end-to-end check against published PSNR-Y.',
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument('--root', default='datasets/benchmark', help='benchmark root (default: datasets/benchmark)')
    parser.add_argument('--sets', nargs='+', default=['Set5', 'Set14'], choices=sorted(PUBLISHED))
    parser.add_argument('--scales', type=int, nargs='+', default=[2, 3, 4], choices=[2, 3, 4])
    parser.add_argument('--tolerance', type=float, default=0.1, help='dB (default 0.1)')
    parser.add_argument('--work', default=None, help='folder for option files and results (default: a temp dir)')
    args = parser.parse_args(argv)
    for name in args.sets:
        for s in args.scales:
            for sub in (f'GTmod{s}', f'LRbicx{s}'):
                if not osp.isdir(osp.join(args.root, name, sub)):
                    raise SystemExit(f'error: {osp.join(args.root, name, sub)} does not exist; prepare it with '
                                     'scripts/data_preparation/prepare_benchmark.py')
        check_same_hr(args.root, name, args.scales)
    work = args.work or tempfile.mkdtemp(prefix='adasr_bicubic_')
    rows, ok = [], True
    for s in args.scales:
        res = run_scale(s, args.sets, args.root, work)
        for name in args.sets:
            psnr, ssim = res[name]['psnr'], res[name].get('ssim', float('nan'))
            diff = psnr - PUBLISHED[name][s]
            good = abs(diff) <= args.tolerance
            ok &= good
            rows.append(f'| {name} | x{s} | {psnr:.2f} | {ssim:.4f} | {PUBLISHED[name][s]:.2f} | {diff:+.2f} | '
                        f'{"ok" if good else "MISS"} |')
    print('| set | scale | PSNR-Y (adasr) | SSIM-Y | published | diff | within %.1f dB |' % args.tolerance)
    print('|---|---|---|---|---|---|---|')
    print('\n'.join(rows))
    print(f'(results and logs: {work})')
    if not ok:
        raise SystemExit(1)


if __name__ == '__main__':
    main()
