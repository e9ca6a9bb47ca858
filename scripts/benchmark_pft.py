"""Benchmark PFT's sparse attention and the full PFT-light x4 network; prints Markdown tables.

    python scripts/benchmark_pft.py                    # CPU (and the same on CUDA when a GPU is visible)
    python scripts/benchmark_pft.py --device cpu --repeats 3 --size 256

1. Attention stage of one layer for a realistic batch of windows (PFT-light x4 on a 256x256 LR input: 64 windows
   of 32x32 tokens x 4 heads, head dim 13; ``--heads 6 --head-dim 40`` for the classical model): scores at K keys,
   softmax, aggregation. "sparse" = adasr.ops at K keys (chunked by the memory budget); "dense" = the plain
   full-window attention over all 1024 keys (q k^T, softmax, A v) for the whole batch at once, which is what a
   dense window transformer does; "fused" = ``scaled_dot_product_attention`` over all keys (what PFT's dense layers
   run). Latency is the median of ``--repeats`` runs; peak memory
   is measured in a fresh process for each row (CPU: peak RSS growth; CUDA: max_memory_allocated growth).
2. Full PFT-light x4 (released config, random weights) on a ``--size`` x ``--size`` input, inference, next to
   basicsr's SwinIR-light x4 (options/train/train_SwinIR_light_x4.yml) on the same input in the same run: median of
   ``--net-repeats`` runs after one warm-up run, peak RSS growth of the first run (fresh process per network).

3. ``--interleaved``: PFT-light and SwinIR-light x4 built in one process and run alternately (``--net-repeats``
   pairs after one warm-up pair) at each of ``--threads``, so that both see the same machine load: medians and the
   median of the per-pair time ratios.
4. ``--profile``: where PFT-light's time goes, stage by stage (exclusive wall time of each stage, in one process,
   ``--threads`` intra-op threads with the attention tiles run in the calling thread so that stages never overlap).
5. ``--layers``: time per row of each kind of PFT-light attention layer (``--config classical``: the classical
   PFT's; ``--profile`` takes it too), compiled kernels against the PyTorch path;
   ``--aggregate``: the sparse layers' aggregation, ``embedding_bag`` against ``pft_kernels.aggregate``, ns per key
   (``--windows 8 --repeats 5`` is enough for both).

On the CPU the script re-executes itself with glibc malloc settings (benchmarks.profiling.ensure_malloc_env).
"""
import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.profiling import (  # noqa: E402
    ensure_malloc_env,
    environment_summary,
    memory_growth,
    memory_mark,
    run_isolated,
    time_fn,
)

KS = (1024, 512, 256, 128, 64, 32, 16)
LIGHT_X4 = dict(upscale=4, in_chans=3, img_size=64, embed_dim=52, depths=[2, 4, 6, 6, 6], num_heads=4,
                num_topk=[1024] * 2 + [256] * 4 + [128] * 6 + [64] * 6 + [32] * 6, window_size=32,
                convffn_kernel_size=7, img_range=1., mlp_ratio=1, upsampler='pixelshuffledirect',
                resi_connection='1conv')
#: the classical PFT x4 (options/test/test_PFT_x4.yml's network_g)
CLASSICAL_X4 = dict(upscale=4, in_chans=3, img_size=64, embed_dim=240, depths=[4, 4, 4, 6, 6, 6], num_heads=6,
                    num_topk=[1024] * 4 + [256] * 4 + [128] * 4 + [64] * 6 + [32] * 6 + [16] * 6, window_size=32,
                    convffn_kernel_size=7, img_range=1., mlp_ratio=2, upsampler='pixelshuffle',
                    resi_connection='1conv')
SWINIR_LIGHT_X4 = dict(upscale=4, in_chans=3, img_size=64, window_size=8, img_range=1., depths=[6, 6, 6, 6],
                       embed_dim=60, num_heads=[6, 6, 6, 6], mlp_ratio=2, upsampler='pixelshuffledirect',
                       resi_connection='1conv')


def attention_case(mode: str, k: int, windows: int, heads: int, head_dim: int, device: str, backend: str,
                   repeats: int, dtype: str = 'float32'):
    import adasr  # noqa: F401
    from adasr import ops

    dev = torch.device(device)
    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    n = 1024
    shape = (windows, heads, n, head_dim)
    q, kk, v = (torch.randn(shape, device=dev, dtype=dt) for _ in range(3))
    q = q * head_dim ** -0.5
    index = None
    if mode == 'sparse':  # k distinct keys per query, spread over the window, without an n x n temporary
        offset = torch.randint(0, n, (windows, heads, n, 1), device=dev)
        index = (torch.arange(k, device=dev) * (n // k) + offset) % n
    if device == 'cuda':
        torch.cuda.synchronize()

    def dense():
        a = torch.softmax((q @ kk.transpose(-2, -1)).float(), -1)
        return a.to(dt) @ v

    def fused():  # what PFT's dense layers run
        return torch.nn.functional.scaled_dot_product_attention(q, kk, v, scale=1.0)

    def sparse():
        with ops.backend(backend):
            a = torch.softmax(ops.sparse_qk(q, kk, index).float(), -1)
            return ops.sparse_av(a, v, index)

    fn = {'dense': dense, 'fused': fused, 'sparse': sparse}[mode]
    with torch.no_grad():
        start = memory_mark(dev)
        fn()
        peak = memory_growth(dev, start)
        timing = time_fn(fn, repeats=repeats, warmup=1, device=dev)
    return {'median_s': timing.median, 'spread': timing.spread, 'peak_bytes': peak}


def network_case(size: int, device: str, backend: str, repeats: int, dtype: str = 'float32', arch: str = 'PFT'):
    import adasr  # noqa: F401
    from adasr import ops

    dev = torch.device(device)
    torch.manual_seed(0)
    if arch == 'PFT':
        from adasr.archs.pft_arch import PFT
        net = PFT(**LIGHT_X4).eval().to(dev)
    else:
        from basicsr.archs.swinir_arch import SwinIR
        net = SwinIR(**SWINIR_LIGHT_X4).eval().to(dev)
    x = torch.rand(1, 3, size, size, device=dev)
    autocast = dtype != 'float32'

    def run():
        with ops.backend(backend), torch.no_grad(), torch.autocast(dev.type, dtype=getattr(torch, dtype),
                                                                   enabled=autocast):
            return net(x)

    start = memory_mark(dev)
    out = run()
    peak = memory_growth(dev, start)
    assert out.shape == (1, 3, 4 * size, 4 * size) and torch.isfinite(out).all()
    timing = time_fn(run, repeats=repeats, warmup=0, device=dev)  # the measured-memory run above was the warm-up
    return {'median_s': timing.median, 'spread': timing.spread, 'peak_bytes': peak, 'runs': repeats}


def _networks(size: int):
    import importlib

    from adasr.archs.pft_arch import PFT  # adasr first: its basicsr shim

    swinir = importlib.import_module('basicsr.archs.swinir_arch').SwinIR
    torch.manual_seed(0)
    return PFT(**LIGHT_X4).eval(), swinir(**SWINIR_LIGHT_X4).eval(), torch.rand(1, 3, size, size)


def interleaved_case(size: int, threads: int, repeats: int) -> Dict[str, List[float]]:
    """PFT-light and SwinIR-light run alternately in one process (one warm-up pair): their times in seconds."""
    torch.set_num_threads(threads)
    pft, swin, x = _networks(size)
    times: Dict[str, List[float]] = {'PFT-light': [], 'SwinIR-light': []}
    with torch.no_grad():
        for i in range(repeats + 1):
            for name, net in (('PFT-light', pft), ('SwinIR-light', swin)):
                t = time.perf_counter()
                net(x)
                if i:
                    times[name].append(time.perf_counter() - t)
    return times


class StageTimer:
    """Exclusive wall time per stage: a stage's time excludes the stages that run inside it."""

    def __init__(self):
        self.seconds: Dict[str, float] = defaultdict(float)
        self.calls: Dict[str, int] = defaultdict(int)
        self._stack: List[list] = []

    def enter(self, stage: str) -> None:
        self._stack.append([stage, time.perf_counter(), 0.0])

    def exit(self) -> None:
        stage, start, inner = self._stack.pop()
        elapsed = time.perf_counter() - start
        self.seconds[stage] += elapsed - inner
        self.calls[stage] += 1
        if self._stack:
            self._stack[-1][2] += elapsed

    def wrap(self, fn: Callable, stage: str) -> Callable:
        def timed(*args, **kwargs):
            self.enter(stage)
            try:
                return fn(*args, **kwargs)
            finally:
                self.exit()
        return timed

    def hook(self, module: torch.nn.Module, stage: str) -> None:
        module.register_forward_pre_hook(lambda *_: self.enter(stage))
        module.register_forward_hook(lambda *_: self.exit())


#: engine functions timed by --profile, by stage (module-level names of adasr.archs.pft_engine)
ENGINE_STAGES = {
    'dense_scores': 'dense attention products (q k^T + bias, A v)',
    'dense_attention': 'dense attention products (q k^T + bias, A v)',
    'softmax': 'softmax',
    'kept_softmax': 'softmax',
    'focus': 'focusing',
    'topk_positions': 'top-k',
    'sparse_qk': 'sparse products (scores, aggregation)',
    'sparse_av': 'sparse products (scores, aggregation)',
    'sampled_qk': 'sparse products (scores, aggregation)',
    'embedding_bag_av': 'sparse products (scores, aggregation)',
}


#: compiled layer kernels timed by --profile (adasr.ops.pft_kernels, ADASR_PFT_KERNEL=numba / auto): (class, method)
KERNEL_STAGES = {
    ('DenseRows', 'run'): 'dense layers (compiled: products, softmax, aggregation)',
    ('DenseRows', 'select'): 'first top-k layers (compiled: products, top-k, softmax)',
    ('SparseRows', 'run'): 'sparse layers (compiled: products, softmax, focusing, top-k)',
    ('_Layer', '__init__'): 'attention glue (tiles, gathers, state)',
}
#: compiled functions timed by --profile (module-level names of adasr.ops.pft_kernels)
KERNEL_FUNCTIONS = {
    'aggregate': 'sparse products (scores, aggregation)',
    'topk_softmax': 'first top-k layers, score head dims above 32 (compiled: top-k, softmax; BLAS products)',
}


def profile_case(size: int, threads: int, repeats: int, config_name: str = 'light') -> Dict[str, Dict[str, float]]:
    """Stage times (median over ``repeats`` runs after a warm-up) of PFT-light x4 (or the classical PFT x4) on a
    size x size input."""
    from adasr.archs import pft_engine
    from adasr.archs.pft_arch import PFT
    from adasr.ops import config

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    pft = PFT(**(LIGHT_X4 if config_name == 'light' else CLASSICAL_X4)).eval()
    x = torch.rand(1, 3, size, size)
    timer = StageTimer()
    for name, stage in ENGINE_STAGES.items():
        if hasattr(pft_engine, name):
            setattr(pft_engine, name, timer.wrap(getattr(pft_engine, name), stage))
    from adasr.ops import pft_kernels
    for (cls, method), stage in KERNEL_STAGES.items():
        if hasattr(pft_kernels, cls):
            setattr(getattr(pft_kernels, cls), method, timer.wrap(getattr(getattr(pft_kernels, cls), method), stage))
    for name, stage in KERNEL_FUNCTIONS.items():
        if hasattr(pft_kernels, name):
            setattr(pft_kernels, name, timer.wrap(getattr(pft_kernels, name), stage))
    if hasattr(pft_engine, 'DenseScores'):  # the score product of the first top-k layers
        pft_engine.DenseScores.logits = timer.wrap(pft_engine.DenseScores.logits, ENGINE_STAGES['dense_scores'])
    from adasr.archs import pft_arch
    # every linear layer (qkv, proj, ConvFFN's fc1 / fc2) goes through pft_arch._linear (oneDNN at inference)
    pft_arch._linear = timer.wrap(pft_arch._linear, 'linear layers (qkv, proj, ConvFFN fc1 and fc2)')
    timer.hook(pft.conv_first, 'convolutions (first, body, upsampler)')
    timer.hook(pft.conv_after_body, 'convolutions (first, body, upsampler)')
    timer.hook(pft.upsample, 'convolutions (first, body, upsampler)')
    for norm in (pft.patch_embed.norm, pft.norm):
        timer.hook(norm, 'LayerNorm')
    for block in pft.layers:
        timer.hook(block.conv, 'convolutions (first, body, upsampler)')
        for layer in block.residual_group.layers:
            timer.hook(layer.norm1, 'LayerNorm')
            timer.hook(layer.norm2, 'LayerNorm')
            timer.hook(layer.v_LePE, 'LePE (depthwise conv + GELU)')
            timer.hook(layer.convffn, 'ConvFFN (GELU, depthwise conv + GELU, add)')
            timer.hook(layer.attn_win, 'attention glue (tiles, gathers, state)')
    runs: Dict[str, List[float]] = defaultdict(list)
    torch.set_flush_denormal(True)  # as on the tile pool's threads (the tiles run in this thread here)
    with torch.no_grad(), config.options(threads=0):
        for i in range(repeats + 1):
            timer.seconds.clear()
            timer.enter('glue (window order, residuals, padding, rest)')
            t = time.perf_counter()
            pft(x)
            total = time.perf_counter() - t
            timer.exit()
            if i:
                for stage, sec in timer.seconds.items():
                    runs[stage].append(sec)
                runs['total'].append(total)
    return {stage: {'median_s': statistics.median(v)} for stage, v in runs.items()}


def interleaved_table(args) -> None:
    for threads in args.threads:
        res = run_isolated(interleaved_case, size=args.size, threads=threads, repeats=args.net_repeats)
        pft, swin = res['PFT-light'], res['SwinIR-light']
        ratios = [p / s for p, s in zip(pft, swin)]
        print(f'| {threads} | {statistics.median(swin):.2f} | {statistics.median(pft):.2f} | '
              f'{statistics.median(pft) / statistics.median(swin):.2f}x | {statistics.median(ratios):.2f}x '
              f'({min(ratios):.2f}-{max(ratios):.2f}) | {os.getloadavg()[0]:.1f} |', flush=True)


def profile_table(args) -> None:
    for threads in args.threads:
        res = run_isolated(profile_case, size=args.size, threads=threads, repeats=args.net_repeats,
                           config_name=args.config)
        total = res.pop('total')['median_s']
        print(f'\n#### {LAYER_CONFIGS[args.config][4]} x4, {args.size}x{args.size}, {threads} thread(s), attention '
              f'tiles in the calling thread: {total:.2f} s (median of {args.net_repeats})\n')
        print('| stage | s | share |')
        print('|---|---:|---:|')
        for stage, sec in sorted(res.items(), key=lambda kv: -kv[1]['median_s']):
            print(f'| {stage} | {sec["median_s"]:.3f} | {100 * sec["median_s"] / total:.0f}% |', flush=True)


#: one parity of PFT-light's layers: (k of the layer, label); K' of a layer is the k of the one before
LIGHT_PARITY = [(1024, 'dense (0-1)'), (256, 'first top-k 1024 -> 256 (2-3)'), (256, '256 (4-5)'),
                (128, '256 -> 128 (6-7)'), (128, '128 (8-9)'), (128, '128 (10-11)'), (64, '128 -> 64 (12-13)'),
                (64, '64 (14-15)'), (64, '64 (16-17)'), (32, '64 -> 32 (18-19)'), (32, '32 (20-21)'),
                (32, '32 (22-23)')]
#: one parity of the classical PFT's layers (num_topk 1024 x4, 256 x4, 128 x4, 64 x6, 32 x6, 16 x6)
CLASSICAL_PARITY = [(1024, 'dense (0-1)'), (1024, 'dense, by the maps of 0-1 (2-3)'),
                    (256, 'first top-k 1024 -> 256 (4-5)'), (256, '256 (6-7)'), (128, '256 -> 128 (8-9)'),
                    (128, '128 (10-11)'), (64, '128 -> 64 (12-13)'), (64, '64 (14-15)'), (64, '64 (16-17)'),
                    (32, '64 -> 32 (18-19)'), (32, '32 (20-21)'), (32, '32 (22-23)'), (16, '32 -> 16 (24-25)'),
                    (16, '16 (26-27)'), (16, '16 (28-29)')]
#: --config: (parity, heads, head dim, heads of the relative-position table, name)
LAYER_CONFIGS = {'light': (LIGHT_PARITY, 4, 13, 1, 'PFT-light'), 'classical': (CLASSICAL_PARITY, 6, 40, 6, 'PFT')}


def layers_case(windows: int, heads: int, head_dim: int, repeats: int,
                config_name: str = 'light') -> Dict[str, Dict[str, List[float]]]:
    """One parity of PFT-light's (or the classical PFT's) attention layers through ``pft_engine.attend`` (no
    autograd, eval focusing): random q, k, v per layer, each layer fed the state of the one before, the bias as the
    network gives it (a random table, shared by the heads in PFT-light, one per head in PFT, Swin's index:
    :class:`pft_engine.RelativeBias`); the compiled kernels and the PyTorch path (option ``pft_kernel``)
    alternately, ``repeats`` chains each after a warm-up. Returns CPU seconds per layer."""
    from adasr.archs import pft_engine
    from adasr.archs.layers import relative_position_index
    from adasr.ops import config

    parity, _, _, table_heads, _ = LAYER_CONFIGS[config_name]
    g = torch.Generator().manual_seed(0)
    n = 1024
    shape = (windows, heads, n, head_dim)
    qkv = [[torch.randn(shape, generator=g) * (head_dim ** -0.5 if i == 0 else 1) for i in range(3)]
           for _ in parity]
    table, index = torch.randn(table_heads, 63 * 63, generator=g), relative_position_index(32)
    times: Dict[str, Dict[str, List[float]]] = {p: defaultdict(list) for p in ('compiled', 'torch')}
    with torch.no_grad():
        for rep in range(repeats + 1):
            for path in (('compiled', 'torch') if rep % 2 else ('torch', 'compiled')):
                with config.options(pft_kernel='numba' if path == 'compiled' else 'torch'):
                    state = None
                    for (k, label), (q, kk, v) in zip(parity, qkv):
                        bias = pft_engine.RelativeBias(table, index)  # (a layer's own, its index checked once)
                        t = time.process_time()
                        _, state = pft_engine.attend(q, kk, v, bias, None, state, k, False)
                        if rep:
                            times[path][label].append(time.process_time() - t)
    return times


def layers_table(args) -> None:
    parity, heads, head_dim, _, name = LAYER_CONFIGS[args.config]
    heads = args.heads if args.heads is not None else heads
    head_dim = args.head_dim if args.head_dim is not None else head_dim
    res = run_isolated(layers_case, windows=args.windows, heads=heads, head_dim=head_dim,
                       repeats=args.repeats, config_name=args.config)
    rows = args.windows * heads * 1024
    med = {p: {label: statistics.median(v) / rows * 1e6 for label, v in t.items()} for p, t in res.items()}
    dense = {p: med[p]['dense (0-1)'] for p in med}
    print(f'\n### {name} attention layers, {args.windows} windows x {heads} heads x 1024 tokens, head dim '
          f'{head_dim}, CPU time per (window, head, query) row, median of {args.repeats} (paths alternately)\n')
    print(f'| layer ({name}) | compiled, us per row | / compiled dense | PyTorch path, us per row | / PyTorch dense '
          '| compiled speed-up |')
    print('|---|---:|---:|---:|---:|---:|')
    for _, label in parity:
        c, t = med['compiled'][label], med['torch'][label]
        print(f'| {label} | {c:.2f} | {c / dense["compiled"]:.2f} | {t:.2f} | {t / dense["torch"]:.2f} | '
              f'{t / c:.2f}x |', flush=True)
    total = {p: sum(med[p].values()) for p in med}
    print(f'| all {len(parity)} layers of a parity | {total["compiled"]:.2f} | - | {total["torch"]:.2f} | - | '
          f'{total["torch"] / total["compiled"]:.2f}x |')


AGGREGATE_KEYS = (32, 64, 128, 256)


def aggregate_table(args) -> None:
    """The sparse layers' aggregation (sum_t w_t v[idx_t], K kept keys per row): FBGEMM's ``embedding_bag``
    (``adasr.ops.embedding_bag_av``) against ``pft_kernels.aggregate`` on the same operands, called in turns in this
    process (``--repeats`` rounds after a warm-up), ns per key and whether the outputs are equal bit for bit."""
    from adasr.ops import embedding_bag_av, pft_kernels

    torch.set_num_threads(args.threads[0])
    n = 1024
    print(f'\n### Aggregation, {args.windows} windows x {args.heads} heads x {n} rows, head dim {args.head_dim}, '
          f'{args.threads[0]} thread(s), median of {args.repeats} in turns\n')
    print('| keys per row | embedding_bag ns a key | aggregate ns a key | speed-up | equal bit for bit |')
    print('|---:|---:|---:|---:|---|')
    gen = torch.Generator().manual_seed(0)
    for kk in AGGREGATE_KEYS:
        g = args.windows * args.heads
        v = torch.randn(args.windows, args.heads, n, args.head_dim, generator=gen)
        a = torch.rand(args.windows, args.heads, n, kk, generator=gen)
        idx = torch.randint(0, n, (args.windows, args.heads, n, kk), generator=gen).to(torch.int16)
        out = torch.empty(args.windows, n, args.heads, args.head_dim).permute(0, 2, 1, 3)  # the engine's layout
        times = {'ebag': [], 'aggregate': []}
        equal = True
        for r in range(args.repeats + 1):
            t = time.perf_counter()
            want = [embedding_bag_av(a[w], v[w], idx[w]) for w in range(args.windows)]
            t_e = time.perf_counter() - t
            t = time.perf_counter()
            for w in range(args.windows):
                pft_kernels.aggregate(a[w], v[w], idx[w], out[w])
            t_a = time.perf_counter() - t
            equal = equal and all(torch.equal(out[w], want[w]) for w in range(args.windows))
            if r:
                times['ebag'].append(t_e)
                times['aggregate'].append(t_a)
        e, ag = (statistics.median(times[k]) / (g * n * kk) * 1e9 for k in ('ebag', 'aggregate'))
        print(f'| {kk} | {e:.2f} | {ag:.2f} | {e / ag:.2f}x | {"yes" if equal else "NO"} |', flush=True)


def _mb(x):
    return f'{x / 2**20:.0f}'


def attention_table(device, backend, args):
    rows = []
    dense = run_isolated(attention_case, mode='dense', k=1024, windows=args.windows, heads=args.heads,
                         head_dim=args.head_dim, device=device, backend=backend, repeats=args.repeats,
                         dtype=args.dtype)
    print(f'\n### Attention stage, {device} ({backend} backend, {args.dtype}): {args.windows} windows x {args.heads} '
          f'heads x 1024 tokens, head dim {args.head_dim}\n')
    fused = run_isolated(attention_case, mode='fused', k=1024, windows=args.windows, heads=args.heads,
                         head_dim=args.head_dim, device=device, backend=backend, repeats=args.repeats,
                         dtype=args.dtype)
    print('| k | sparse ms | sparse peak MB | dense ms (all 1024 keys) | dense peak MB | dense / sparse time | '
          'fused dense ms (SDPA) | fused / sparse time |')
    print('|---:|---:|---:|---:|---:|---:|---:|---:|')
    for k in KS:
        sp = run_isolated(attention_case, mode='sparse', k=k, windows=args.windows, heads=args.heads,
                          head_dim=args.head_dim, device=device, backend=backend, repeats=args.repeats,
                          dtype=args.dtype)
        rows.append((k, sp))
        print(f'| {k} | {sp["median_s"] * 1e3:.1f} | {_mb(sp["peak_bytes"])} | {dense["median_s"] * 1e3:.1f} | '
              f'{_mb(dense["peak_bytes"])} | {dense["median_s"] / sp["median_s"]:.2f}x | '
              f'{fused["median_s"] * 1e3:.1f} | {fused["median_s"] / sp["median_s"]:.2f}x |', flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', choices=['all', 'cpu', 'cuda'], default='all')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--size', type=int, default=256, help='LR side of the full-network case')
    parser.add_argument('--windows', type=int, default=64)
    parser.add_argument('--heads', type=int, default=None, help="default: 4, or the --config's")
    parser.add_argument('--head-dim', type=int, default=None, help="default: 13, or the --config's")
    parser.add_argument('--dtype', default='float32', choices=['float32', 'float16', 'bfloat16'])
    parser.add_argument('--skip-network', action='store_true')
    parser.add_argument('--skip-attention', action='store_true')
    parser.add_argument('--net-repeats', type=int, default=2, help='timed full-network runs after the warm-up')
    parser.add_argument('--no-malloc-env', action='store_true')
    parser.add_argument('--interleaved', action='store_true',
                        help='only: PFT-light against SwinIR-light, run alternately in one process per thread count')
    parser.add_argument('--profile', action='store_true', help='only: stage-by-stage profile of PFT-light')
    parser.add_argument('--layers', action='store_true',
                        help='only: time per row of each kind of PFT-light attention layer, compiled against PyTorch')
    parser.add_argument('--config', choices=sorted(LAYER_CONFIGS), default='light',
                        help='the released config that --layers (one parity of its layers; classical: 6 heads, head '
                             'dim 40, a bias table per head) and --profile time')
    parser.add_argument('--aggregate', action='store_true',
                        help='only: the aggregation, embedding_bag against pft_kernels.aggregate (first --threads)')
    parser.add_argument('--threads', type=int, nargs='+', default=[1, 2],
                        help='intra-op threads of --interleaved / --profile (one table row / table each)')
    args = parser.parse_args()
    ensure_malloc_env(disable=args.no_malloc_env)
    devices = ['cpu', 'cuda'] if args.device == 'all' else [args.device]
    if 'cuda' in devices and not torch.cuda.is_available():
        devices.remove('cuda')
    print('Environment:', environment_summary())
    print(f'load average before the run: {os.getloadavg()}')
    if not args.layers:
        args.heads = 4 if args.heads is None else args.heads
        args.head_dim = 13 if args.head_dim is None else args.head_dim
    if args.aggregate:
        aggregate_table(args)
        print(f'\nload average after the run: {os.getloadavg()}')
        return
    if args.layers:
        layers_table(args)  # heads and head dim of --config where not given
        print(f'\nload average after the run: {os.getloadavg()}')
        return
    if args.interleaved or args.profile:
        if args.interleaved:
            print(f'\n### PFT-light / SwinIR-light x4, {args.size}x{args.size} CPU fp32, run alternately '
                  f'({args.net_repeats} pairs after a warm-up pair)\n')
            print('| threads | SwinIR-light median s | PFT-light median s | ratio of medians | median pair ratio '
                  '(range) | load after |')
            print('|---:|---:|---:|---:|---:|---:|')
            interleaved_table(args)
        if args.profile:
            profile_table(args)
        print(f'\nload average after the run: {os.getloadavg()}')
        return
    for device in devices:
        backends = ['torch'] if device == 'cpu' else ['triton', 'torch']
        if not args.skip_attention:
            for backend in backends:
                attention_table(device, backend, args)
        if args.skip_network:
            continue
        print(f'\n### Full network, x4, {args.size}x{args.size} input, {device}\n')
        print('| network | backend | dtype | median s | peak MB | / SwinIR-light time |')
        print('|---|---|---|---:|---:|---:|')
        swin = run_isolated(network_case, size=args.size, device=device, backend='torch', repeats=args.net_repeats,
                            arch='SwinIR')
        print(f'| SwinIR-light (basicsr) | - | float32 | {swin["median_s"]:.2f} | {_mb(swin["peak_bytes"])} | 1.00x |',
              flush=True)
        for backend in backends:
            dtypes = ['float32'] if device == 'cpu' else ['float32', 'bfloat16', 'float16']
            for dtype in dtypes:
                res = run_isolated(network_case, size=args.size, device=device, backend=backend,
                                   repeats=args.net_repeats, dtype=dtype)
                print(f'| PFT-light | {backend} | {dtype} | {res["median_s"]:.2f} | {_mb(res["peak_bytes"])} | '
                      f'{res["median_s"] / swin["median_s"]:.2f}x |', flush=True)
        print(f'\nload average after the run: {os.getloadavg()}')


if __name__ == '__main__':
    main()
