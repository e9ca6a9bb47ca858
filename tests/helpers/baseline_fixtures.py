"""Write ``tests/data/baselines_tiny.pt``: seeded refactor guards for the HAT and ATD baselines.

For a tiny configuration of each, the weights are filled from a seeded generator (independent of the init code),
run on a 9x11 crop of a bundled demo photo, and the output is stored. ``tests/test_baselines.py`` rebuilds the
weights from the seed and compares. ATD's ``category_size`` covers every token of the padded input, so the result
does not depend on how the unstable sort in its category attention orders equal keys (which is
platform-dependent). Run from the repository root:

    python scripts/make_test_fixtures.py baselines
"""
import os.path as osp

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))

TINY = {
    'HAT': {'type': 'HAT', 'upscale': 4, 'embed_dim': 12, 'depths': [2], 'num_heads': [2], 'window_size': 4,
            'compress_ratio': 3, 'squeeze_factor': 4, 'mlp_ratio': 2},
    'ATD': {'type': 'ATD', 'upscale': 4, 'embed_dim': 12, 'depths': [2], 'num_heads': [2], 'window_size': 4,
            'category_size': 256, 'num_tokens': 8, 'reducted_dim': 4, 'convffn_kernel_size': 3, 'mlp_ratio': 1,
            'upsampler': 'pixelshuffledirect'},
}
SEED = 1234


def seeded_net(net_opt: dict, seed: int = SEED):
    """Build ``net_opt`` and fill every parameter from ``torch.Generator().manual_seed(seed)`` (sorted by name)."""
    import torch
    from basicsr.archs import build_network

    net = build_network(dict(net_opt))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(net.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return net.eval()


def demo_input():
    """(1, 3, 9, 11) RGB crop of the bundled 'chelsea' photo in [0, 1]."""
    import cv2
    import torch

    img = cv2.imread(osp.join(REPO, 'datasets', 'demo', 'val', 'HR', 'chelsea.png'), cv2.IMREAD_COLOR)
    crop = img[100:109, 120:131, ::-1].copy()
    return torch.from_numpy(crop).permute(2, 0, 1).float().div(255).unsqueeze(0)


def main(argv=None) -> None:
    import torch

    import adasr  # noqa: F401

    x = demo_input()
    out = {}
    for name, opt in TINY.items():
        with torch.no_grad():
            y = seeded_net(opt)(x)
        out[name] = {'network_g': opt, 'seed': SEED, 'input': x, 'output': y}
    path = osp.join(REPO, 'tests', 'data', 'baselines_tiny.pt')
    torch.save(out, path)
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
