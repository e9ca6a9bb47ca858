"""Write the small seeded refactor-guard fixtures of PFT under tests/data/ (run from the repository root).

    python scripts/make_test_fixtures.py pft [--out tests/data]

Each fixture ``pft_guard_<name>.pt`` holds ``{config, seed, input, output, notes}``: the network is rebuilt in the
test from ``config`` and ``seed`` (weights are not stored), so each file is a few kilobytes. The outputs are made by
this implementation after it was checked against the authors' oracle (``pft_light_x4_oracle.pt``, max abs err
5e-5) and, for the paths that oracle does not cover (per-head relative-position bias, pixelshuffle head, x2/x3),
against an independent dense masked formulation of progressive focused attention (tests/test_pft_arch.py).
"""
import argparse
import os

import torch

# ws = 8 (64 tokens a window; the smallest shift region is 4x4 = 16 tokens, so k <= 16 after the dense phase, as
# the released ws = 32 schedules keep k <= 256): dense, dense + transfer + top-16, then sparse scoring.
_COMMON = dict(img_size=16, window_size=8, depths=[2, 4], num_topk=[64, 64, 16, 16, 8, 8], convffn_kernel_size=3,
               img_range=1., resi_connection='1conv', in_chans=3)
GUARDS = {
    'light_x4': dict(_COMMON, upscale=4, embed_dim=16, num_heads=2, mlp_ratio=1, upsampler='pixelshuffledirect'),
    'classical_x2': dict(_COMMON, upscale=2, embed_dim=104, num_heads=4, mlp_ratio=2., upsampler='pixelshuffle'),
    'classical_x3': dict(_COMMON, upscale=3, embed_dim=104, num_heads=4, mlp_ratio=2., upsampler='pixelshuffle'),
}
INPUT_SIZE = (19, 29)  # padded inside to 24 x 32 (3 x 4 windows)


def build(config: dict, seed: int):
    """PFT(**config) with seeded weights, perturbed as in the authors' oracle recipe so biases are non-zero."""
    from adasr.archs.pft_arch import PFT
    torch.manual_seed(seed)
    net = PFT(**config)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return net.eval()


def make(name: str, seed: int = 0) -> dict:
    config = GUARDS[name]
    net = build(config, seed)
    torch.manual_seed(seed + 1)
    x = torch.rand(1, 3, *INPUT_SIZE)
    with torch.no_grad():
        out = net(x)
    return {'config': config, 'seed': seed, 'input': x, 'output': out,
            'notes': f'adasr PFT refactor guard "{name}", made by tests/helpers/pft_fixtures.py'}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='tests/data')
    args = parser.parse_args(argv)
    import adasr  # noqa: F401
    torch.set_num_threads(1)  # one summation order for the committed numbers
    os.makedirs(args.out, exist_ok=True)
    for name in GUARDS:
        path = os.path.join(args.out, f'pft_guard_{name}.pt')
        torch.save(make(name), path)
        print(f'wrote {path} ({os.path.getsize(path)} bytes)')


if __name__ == '__main__':
    main()
