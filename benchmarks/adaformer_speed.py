"""Where AdaFormer's eval time goes, and how it compares with other implementations in one run.

* :func:`stage_profile`: per-stage wall and CPU time of the eval forward (head, encoder, each TSAB's LayerNorms,
  local and global attention, MLP, the confidence estimator, decoder, tail; the rest is *glue*: token/map
  transposes, residual additions, halting bookkeeping); :func:`paired_stage_profile` does it for this tree's
  network and the authors' (:func:`authors_adaformer`, the same stage labels) in one process, calls in turns.
* :func:`side_by_side`: several implementations on the same seeded weights and input, each in its own process,
  called in turns (round robin, the order rotating every round) so that a shared machine's load hits them alike:
  adasr from this tree, adasr from another tree (e.g. a checkout of ``main``), the authors' code from a folder
  outside the repository (``xiaotongtt/AdaFormer``; never vendored), and SwinIR-light (BasicSR) as the yardstick.

Used by ``scripts/benchmark_adaformer.py --profile`` / ``--compare``.
"""
import multiprocessing as mp
import statistics
import sys
import time
from argparse import Namespace
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

#: the paper configuration of the authors' code (run.sh and option.py), for their ``AdaFormer(args)``
AUTHORS_ARGS = dict(n_feats=64, pspl_depths=6, embed_dim=64, n_resblocks=16, query_num=16, scale=[4],
                    pspl_module='PSPL', attn_module='LightViTAttention', rgb_range=255, res_scale=1)
#: SwinIR-light x4 (options/test/test_SwinIR_light_x4.yml)
SWINIR_LIGHT = dict(upscale=4, in_chans=3, img_size=64, window_size=8, img_range=1.0, depths=[6, 6, 6, 6],
                    embed_dim=60, num_heads=[6, 6, 6, 6], mlp_ratio=2, upsampler='pixelshuffledirect',
                    resi_connection='1conv')


def seeded_adaformer(seed: int = 0, bias: float = 0.0, eps_h: float = 0.05, **overrides):
    """The paper-configuration AdaFormer with seeded random weights (default init plus 0.02 * randn, the recipe of
    the authors' oracle), ``bias`` added to the estimator's last conv (forces a sparsity level), in eval mode."""
    from adasr.archs.adaformer_arch import AdaFormer
    from benchmarks.halting_rates import shift_estimator_bias
    from benchmarks.harness import perturb_weights

    torch.manual_seed(seed)
    net = AdaFormer(**overrides)
    perturb_weights(net)
    shift_estimator_bias(net, bias)
    net.eps_h = eps_h
    return net.eval()


# ------------------------------------------------------------------------------------------------- stage profile


class _StageTimer:
    """Wraps instance methods with wall/CPU timers; nested stages are subtracted from their parents."""

    def __init__(self):
        self.wall: Dict[str, float] = defaultdict(float)
        self.cpu: Dict[str, float] = defaultdict(float)
        self._stack: List[List[float]] = []  # per open stage: [child wall, child cpu]
        self._restore: List[Tuple[Any, str]] = []

    def wrap(self, obj: Any, attr: str, label: str) -> None:
        fn = getattr(obj, attr)

        def timed(*args, **kwargs):
            self._stack.append([0.0, 0.0])
            w0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                dw, dc = time.perf_counter() - w0, time.process_time() - c0
                child_w, child_c = self._stack.pop()
                self.wall[label] += dw - child_w
                self.cpu[label] += dc - child_c
                if self._stack:
                    self._stack[-1][0] += dw
                    self._stack[-1][1] += dc

        setattr(obj, attr, timed)
        self._restore.append((obj, attr))

    def remove(self) -> None:
        """Every timer this object put, last first (also after a wrap that failed part of the way)."""
        while self._restore:
            obj, attr = self._restore.pop()
            try:
                delattr(obj, attr)  # the instance attribute shadowed the class's method
            except AttributeError:
                pass


#: stage labels shared by this tree's network and the authors' (one table compares them)
INPUT = 'input: mean shift + head conv'
ENCODER = 'encoder: 8 ResBlocks (16 conv3x3)'
EMBED = 'AdaM embed + unembed (1x1 convs)'
ESTIMATOR = 'confidence estimator (6x)'
LN1 = 'LayerNorm 1 (6x)'
LOCAL = 'local attention (window gather, qkv, softmax, scatter)'
GLOBAL = 'global attention (gather, qkv, prototypes, scatter)'
MLP = 'LayerNorm 2 + MLP (6x)'
DECODER = 'decoder: 8 ResBlocks (16 conv3x3)'
TAIL = 'tail conv3x3 + pixel shuffle + mean shift'
GLUE = 'glue (padding, transposes, residual adds, halting bookkeeping, crop)'


def _wrap_common(timer: _StageTimer, net) -> None:
    """The modules both implementations share by name (the authors' state-dict names)."""
    timer.wrap(net.sub_mean, 'forward', INPUT)
    timer.wrap(net.head, 'forward', INPUT)
    timer.wrap(net.shollow_feature_extraction, 'forward', ENCODER)
    timer.wrap(net.body.embed, 'forward', EMBED)
    timer.wrap(net.body.unembed, 'forward', EMBED)
    timer.wrap(net.body.var, 'forward', ESTIMATOR)
    for blk in net.body.blocks:
        timer.wrap(blk.norm1, 'forward', LN1)
        timer.wrap(blk.attn, 'forward', LOCAL)  # local, with the global branch nested (timed apart)
        timer.wrap(blk.norm2, 'forward', MLP)
        timer.wrap(blk.mlp, 'forward', MLP)
    timer.wrap(net.deep_feature_extraction, 'forward', DECODER)
    timer.wrap(net.tail, 'forward', TAIL)
    timer.wrap(net.add_mean, 'forward', TAIL)
    timer.wrap(net, 'forward', GLUE)


def _wrap_adaformer(timer: _StageTimer, net) -> None:
    _wrap_common(timer, net)
    if hasattr(net, '_tail'):  # (a Winograd tail calls the convolution directly, not the tail module)
        timer.wrap(net, '_tail', TAIL)
    if hasattr(net.body, 'estimate'):  # (the window path calls the convs directly)
        timer.wrap(net.body, 'estimate', ESTIMATOR)
    for name in ('embed_tokens', 'unembed_add'):  # (as linears of the tokens at CPU inference, with the residual)
        if hasattr(net.body, name):
            timer.wrap(net.body, name, EMBED)
    for blk in net.body.blocks:
        for name in ('global_sparse', 'global_dense'):
            timer.wrap(blk.attn, name, GLOBAL)


def _wrap_authors(timer: _StageTimer, net) -> None:
    """The authors' ``AdaFormer`` (xiaotongtt/AdaFormer, ``model/adaformer.py``) under the same stage labels: their
    ``LightViTAttention.forward_local`` / ``forward_global`` are the two branches; their block's token/map
    rearranges, the copy of each block's output and the mask updates fall in the glue."""
    _wrap_common(timer, net)
    for blk in net.body.blocks:
        timer.wrap(blk.attn, 'forward_local', LOCAL)
        timer.wrap(blk.attn, 'forward_global', GLOBAL)


def stage_profile(net, x: torch.Tensor, repeats: int = 3, warmup: int = 1,
                  wrap: Callable[[_StageTimer, Any], None] = _wrap_adaformer) -> Dict[str, Any]:
    """Per-stage time of ``net(x)`` (eval, no grad): for each stage the median over ``repeats`` calls of its wall
    and process-CPU seconds, exclusive of the stages nested in it; ``total`` is the whole call. ``wrap`` puts the
    stage timers on ``net`` (:func:`_wrap_authors` for the authors' model)."""
    return paired_stage_profile([(net, x, wrap)], repeats, warmup)[0]


def paired_stage_profile(models: Sequence[Tuple[Any, torch.Tensor, Callable[[_StageTimer, Any], None]]],
                         repeats: int = 3, warmup: int = 1) -> List[Dict[str, Any]]:
    """:func:`stage_profile` of several ``(net, x, wrap)`` in one process, their calls in turns (round by round, the
    order rotating, so that a shared machine's drift hits them alike); one result per model. ``sparsity`` is the
    network's halting record (None for a network without one)."""
    runs: List[list] = [[] for _ in models]
    with torch.no_grad():
        for net, x, _ in models:
            for _ in range(warmup):
                net(x)
        for r in range(repeats):
            for k in range(len(models)):
                i = (r + k) % len(models)
                net, x, wrap = models[i]
                timer = _StageTimer()
                try:
                    wrap(timer, net)
                    w0, c0 = time.perf_counter(), time.process_time()
                    net(x)
                    total = (time.perf_counter() - w0, time.process_time() - c0)
                finally:
                    timer.remove()
                runs[i].append((dict(timer.wall), dict(timer.cpu), total))
    results = []
    for (net, _, _), rs in zip(models, runs):
        stages = list(dict.fromkeys(s for r in rs for s in r[0]))
        halting = getattr(net, 'last_halting', None)
        results.append({
            'stages': {s: (statistics.median(r[0].get(s, 0.0) for r in rs),
                           statistics.median(r[1].get(s, 0.0) for r in rs)) for s in stages},
            'total': (statistics.median(r[2][0] for r in rs), statistics.median(r[2][1] for r in rs)),
            'sparsity': None if halting is None else halting.sparsity})
    return results


def authors_adaformer(authors_dir: str, net, eps_h: float):
    """The authors' ``AdaFormer`` (their code, imported from ``authors_dir``, a scratch folder outside the
    repository) in eval mode with ``net``'s weights. Call it on 0..255 input; it returns (SR 0..255, logits,
    global masks, local masks)."""
    if authors_dir not in sys.path:
        sys.path.insert(0, authors_dir)
    from model.adaformer import AdaFormer as AuthorsAdaFormer

    theirs = AuthorsAdaFormer(Namespace(threshold_eps=eps_h, **AUTHORS_ARGS)).eval()
    theirs.load_state_dict(net.state_dict(), strict=True)  # their loader: copies every key, raises on unknown ones
    return theirs


# ---------------------------------------------------------------------------------------------------- side by side


def _build(kind: str, tree: Optional[str], authors_dir: Optional[str], size: Tuple[int, int], seed: int,
           eps_h: float) -> Callable[[], torch.Tensor]:
    """The timed call of one contender; every call returns SR on the 0..1 scale."""
    if tree:
        sys.path.insert(0, tree)  # this process imports adasr from there
    import adasr  # noqa: F401 (registers the archs)

    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(seed + 1))
    if kind == 'swinir-light':
        from basicsr.archs.swinir_arch import SwinIR

        from adasr.archs.layers import pad_to_multiple

        torch.manual_seed(seed)
        net = SwinIR(**SWINIR_LIGHT).eval()

        def call():
            y = net(pad_to_multiple(x, 8, mode='reflect')[0])
            return y[..., :4 * size[0], :4 * size[1]]
        return call
    net = seeded_adaformer(seed, eps_h=eps_h)
    if kind == 'adasr' or kind.startswith('adasr:'):
        if kind != 'adasr':
            net.conv3x3 = kind.split(':', 1)[1]
        return lambda: net(x)
    if kind != 'authors':
        raise ValueError(f'unknown contender kind {kind!r}')
    theirs = authors_adaformer(authors_dir, net, eps_h)
    x255 = x * 255
    return lambda: theirs(x255)[0] / 255


def _worker(conn, kind: str, tree: Optional[str], authors_dir: Optional[str], size: Tuple[int, int], seed: int,
            eps_h: float, threads: Optional[int]) -> None:
    try:
        if threads:
            torch.set_num_threads(threads)
        call = _build(kind, tree, authors_dir, size, seed, eps_h)
        with torch.no_grad():
            out = call()  # warm-up
            conn.send(('ready', out))
            while conn.recv() == 'run':
                w0, c0 = time.perf_counter(), time.process_time()
                call()
                conn.send(('time', (time.perf_counter() - w0, time.process_time() - c0)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        import traceback

        conn.send(('error', f'{exc}\n{traceback.format_exc()}'))


def side_by_side(contenders: Sequence[Tuple[str, str, Optional[str]]], size: Tuple[int, int] = (270, 480),
                 repeats: int = 3, seed: int = 0, eps_h: float = 0.05, threads: Optional[int] = None,
                 authors_dir: Optional[str] = None, progress: Optional[Callable[[str], None]] = None
                 ) -> Dict[str, Dict[str, Any]]:
    """Time the contenders ``(label, kind, tree)`` in turns; ``kind`` is ``'adasr'`` or ``'adasr:METHOD'`` (its
    convolutions by ``conv3x3=METHOD``, e.g. ``'adasr:winograd'``; ``tree``: the repository
    root to import adasr from, None = this one), ``'authors'`` (their code from ``authors_dir``) or
    ``'swinir-light'``. Each runs in its own spawned process: one warm-up call, then ``repeats`` rounds.

    Returns per label: ``wall`` / ``cpu`` (lists of seconds), and ``sr_diff_vs_first`` (largest |SR difference|
    on the 0..255 scale against the first AdaFormer contender; None for SwinIR-light).
    """
    ctx = mp.get_context('spawn')
    procs, conns, first_sr = {}, {}, None
    results: Dict[str, Dict[str, Any]] = {}
    try:
        for label, kind, tree in contenders:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, kind, tree, authors_dir, tuple(size), seed, eps_h,
                                                     threads), daemon=True)
            proc.start()
            procs[label], conns[label] = proc, parent
        for label, kind, _ in contenders:  # warm-ups, one at a time
            status, payload = conns[label].recv()
            if status == 'error':
                raise RuntimeError(f'{label} failed:\n{payload}')
            diff = None
            if kind != 'swinir-light':
                if first_sr is None:
                    first_sr = payload
                diff = float((payload.double() - first_sr.double()).abs().max()) * 255
            results[label] = {'wall': [], 'cpu': [], 'sr_diff_vs_first': diff}
            if progress:
                progress(f'{label}: ready')
        labels = [c[0] for c in contenders]
        for r in range(repeats):
            order = labels[r % len(labels):] + labels[:r % len(labels)]
            for label in order:
                conns[label].send('run')
                status, payload = conns[label].recv()
                if status == 'error':
                    raise RuntimeError(f'{label} failed:\n{payload}')
                results[label]['wall'].append(payload[0])
                results[label]['cpu'].append(payload[1])
                if progress:
                    progress(f'round {r + 1}: {label} {payload[0]:.2f} s wall, {payload[1]:.2f} s CPU')
    finally:
        for label, conn in conns.items():
            try:
                conn.send('stop')
            except (BrokenPipeError, OSError):
                pass
        for proc in procs.values():
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    return results
