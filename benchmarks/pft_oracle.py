"""Check PFT against an oracle fixture of the authors' code: build ``PFT(**config)``, load ``state_dict`` strictly,
run ``input`` and compare with ``output``.

    python scripts/verify_pft_oracle.py PATH/pft_light_x4_oracle.pt [--atol 1e-3] [--mae 1e-5]

A fixture is a ``torch.save``d dict ``{config, state_dict, input, output, notes}`` read with ``weights_only=True``.
Exit status 0 on PASS, 1 on FAIL.
"""
import argparse
import sys
import time
from typing import Dict

import torch

ATOL = 1e-3
MAE = 1e-5


def load_fixture(path: str) -> Dict:
    fixture = torch.load(path, map_location='cpu', weights_only=True)
    missing = {'config', 'state_dict', 'input', 'output'} - set(fixture)
    if missing:
        raise KeyError(f'{path} is not a PFT oracle fixture: missing {sorted(missing)}')
    return fixture


def run_fixture(fixture: Dict, atol: float = ATOL, mae: float = MAE, device: str = 'cpu') -> Dict:
    """Build, load strictly, run; return max/mean abs error, the output and whether both bounds hold."""
    from adasr.archs.pft_arch import PFT
    from adasr.utils.checkpoint import check_state_dict

    net = PFT(**fixture['config'])
    check_state_dict(net, fixture['state_dict'], strict=True, source='fixture state_dict')
    net.load_state_dict(fixture['state_dict'], strict=True)
    net.eval().to(device)
    t = time.perf_counter()
    with torch.no_grad():
        out = net(fixture['input'].float().to(device)).cpu()
    seconds = time.perf_counter() - t
    ref = fixture['output'].float()
    if out.shape != ref.shape:
        raise AssertionError(f'output shape {tuple(out.shape)} differs from the fixture {tuple(ref.shape)}')
    err = (out - ref).abs()
    result = {'max_abs_err': err.max().item(), 'mean_abs_err': err.mean().item(), 'seconds': seconds,
              'output': out}
    result['passed'] = result['max_abs_err'] <= atol and result['mean_abs_err'] <= mae
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('fixture', help='path to a *_oracle.pt file')
    parser.add_argument('--atol', type=float, default=ATOL, help=f'maximum absolute error (default {ATOL})')
    parser.add_argument('--mae', type=float, default=MAE, help=f'maximum mean absolute error (default {MAE})')
    parser.add_argument('--device', default='cpu', help='cpu or cuda (the sparse backend follows ADASR_SPARSE_BACKEND)')
    args = parser.parse_args(argv)
    import adasr  # noqa: F401  (registers PFT, applies the basicsr shim)

    res = run_fixture(load_fixture(args.fixture), args.atol, args.mae, args.device)
    print(f'{args.fixture}: max abs err {res["max_abs_err"]:.3e} (atol {args.atol:g}), mean abs err '
          f'{res["mean_abs_err"]:.3e} (limit {args.mae:g}), forward {res["seconds"]:.1f} s: '
          f'{"PASS" if res["passed"] else "FAIL"}')
    return 0 if res['passed'] else 1


if __name__ == '__main__':
    sys.exit(main())
