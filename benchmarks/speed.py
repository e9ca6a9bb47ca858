"""The measurements behind ``scripts/speed_report.py``: one forward configuration (an option file's network, a
precision, AdaFormer's dense mode or a forced halting rate) timed on a real photo, in a fresh process.

Timing is the harness's (:func:`benchmarks.profiling.time_fn`: median wall time and process CPU time of
``repeats`` calls after ``warmup``); the network, its weights and the input come from :mod:`benchmarks.harness`
(option file, seeded random weights when the file names no checkpoint, the centre of a photo mirrored to the size);
the precision from :mod:`adasr.inference.precision`; the halting rate from :mod:`benchmarks.halting_rates`.
"""
from typing import Any, Dict, Optional, Tuple

#: side of the centre crop the halting rate is calibrated on (the timed input itself is too slow to bisect on)
CALIBRATION_SIDE = 96


def time_config(spec: Dict[str, Any], image: str, size: Tuple[int, int], repeats: int, warmup: int,
                threads: Optional[int], precision: str = 'fp32', halted: Optional[float] = None,
                seed: int = 0, device: str = 'cpu') -> Dict[str, Any]:
    """Time one configuration; module-level so that :func:`benchmarks.profiling.run_isolated` can run it.

    Args:
        spec: ``network_g`` (with e.g. ``sparse_eval: false`` for AdaFormer's dense mode), ``scale``,
            ``checkpoint`` (None: seeded with ``seed``, the arch's init plus
            :func:`~benchmarks.harness.perturb_weights`), ``eps_h``.
        image: photo whose centre (mirrored if smaller) is the ``size`` = (h, w) LR input.
        halted: adaptive archs: bias the estimator so that this share of tokens halts per block (calibrated on a
            centre crop of the input), or None to run the weights as they are.

    Returns: median/spread wall seconds, median CPU seconds, the run times, and for adaptive archs the per-block
    halted shares of the timed input (and the estimator offset when ``halted`` is set).
    """
    import torch

    import adasr  # noqa: F401  (registration in a fresh process)
    from adasr.archs.interface import arch_traits
    from adasr.inference.precision import resolve_precision
    from adasr.inference.tile import padded_forward
    from benchmarks.halting_rates import calibrate_on_centre, halted_per_block
    from benchmarks.harness import build_net, latency_input, perturb_weights
    from benchmarks.profiling import timed_no_grad

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    torch.manual_seed(seed)
    net = build_net(spec, dev)
    if not spec.get('checkpoint'):
        perturb_weights(net)
    traits = arch_traits(net, net_opt=spec['network_g'])
    h, w = size
    x = latency_input(image, h, w).to(dev)
    result: Dict[str, Any] = {}
    if halted is not None:
        if not traits.adaptive:
            raise ValueError(f'a halting rate was asked for {type(net).__name__}, which does not halt')
        offset, _ = calibrate_on_centre(net, x, halted, CALIBRATION_SIDE)
        result['estimator_offset'] = offset
    forward = resolve_precision(precision, dev).wrap(padded_forward(net, int(spec['scale']), traits.window))

    timing, _ = timed_no_grad(lambda: forward(x), dev, repeats, warmup)
    result.update(median_s=timing.median, spread=timing.spread, cpu_median_s=timing.cpu_median, times=timing.times)
    if traits.adaptive:
        result['halted'] = halted_per_block(net)
    return result


__all__ = ['CALIBRATION_SIDE', 'time_config']
