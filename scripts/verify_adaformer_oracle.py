#!/usr/bin/env python3
"""Check AdaFormer against an oracle file made with the authors' code.

Builds ``AdaFormer(**network_g)`` from an option file (default: options/test/test_AdaFormer_x4.yml), loads the
oracle's ``state_dict`` strictly, runs every input of the file (0..255 tensors, fed as ``x / 255``, output times 255)
in eval and train mode, and compares SR, logits, confidence, both keep-mask lists, sparsity and, where the file has
them, the intermediate tensors. Prints a PASS/FAIL table with the max errors; exits with status 1 on any failure.

Example:
    python scripts/verify_adaformer_oracle.py /path/to/adaformer_x4_oracle.pt
    python scripts/verify_adaformer_oracle.py fixture.pt --opt options/test/test_AdaFormer_x4.yml --failures-only
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('fixture', help='oracle .pt file (state_dict, input*, eval_outputs*, train_outputs*)')
    parser.add_argument('--opt', default='options/test/test_AdaFormer_x4.yml', help='option file with network_g')
    parser.add_argument('--modes', nargs='+', default=['eval', 'train'], choices=['eval', 'train'])
    parser.add_argument('--failures-only', action='store_true', help='print only the failed rows')
    parser.add_argument('--conv3x3', default=None, help="network_g's conv3x3 for this run (e.g. direct: the authors' "
                        'convolutions bit for bit; auto: the default; winograd)')
    args = parser.parse_args(argv)

    import adasr  # noqa: F401
    from adasr.archs.adaformer_arch import AdaFormer
    from adasr.cli.options import load_yaml
    from benchmarks.adaformer_oracle import compare_with_oracle, format_table, load_oracle, oracle_inputs, summary

    network_g = dict(load_yaml(args.opt)['network_g'])
    if network_g.pop('type') != 'AdaFormer':
        raise SystemExit(f'error: {args.opt}: network_g.type is not AdaFormer')
    if args.conv3x3:
        network_g['conv3x3'] = args.conv3x3
    net = AdaFormer(**network_g)
    oracle = load_oracle(args.fixture)
    print(f'fixture: {args.fixture}')
    print(f'network: AdaFormer(**network_g) from {args.opt}')
    for key in oracle_inputs(oracle):
        x = oracle[key]
        s = net.window_size
        hp, wp = -(-x.shape[-2] // s) * s, -(-x.shape[-1] // s) * s
        print(f'  {key}: {tuple(x.shape)}, padded {hp}x{wp}, eval global split {net.global_split(hp, wp)}')
    checks = compare_with_oracle(net, oracle, modes=args.modes)
    print(format_table(checks, only_failures=args.failures_only))
    print(summary(checks))
    return 0 if all(c.passed for c in checks) else 1


if __name__ == '__main__':
    sys.exit(main())
