"""Compare :class:`~adasr.archs.adaformer_arch.AdaFormer` with an oracle file made by running the authors' code.

An oracle file (``torch.save`` of a dict) holds ``state_dict`` (their parameter names), one or more inputs on the
0..255 scale (``input``, ``input_<suffix>``), and for each input ``eval_outputs<suffix>`` / ``train_outputs<suffix>``
with ``sr``, ``halting_logits``, ``confidence``, ``global_keep_masks``, ``local_keep_masks`` and ``sparsity``
(optionally ``intermediates``). Used by ``scripts/verify_adaformer_oracle.py`` and the oracle tests.

Feeding the authors' 0..255 tensors to our 0..1 network: ``sr255 = net(x255 / 255) * 255``; the halting maps of the
call are in ``net.last_halting`` (padded size, as the authors return them).
"""
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch

# fixture sparsity key -> HaltingInfo.sparsity key
SPARSITY_KEYS = {
    'global_halted_frac_exact': 'global_by_mask',
    'local_halted_frac_exact': 'local_by_mask',
    'global_halted_frac_trainer_formula': 'global_authors',
    'local_halted_frac_trainer_formula': 'local_authors',
}
SR_TOL = 1e-3  # 0..255 scale
LOGIT_TOL = 1e-4
CONF_TOL = 1e-5
SPARSITY_TOL = 1e-6


@dataclass
class Check:
    """One comparison: the largest absolute error (or the number of differing mask entries) against a tolerance."""

    input_key: str
    mode: str
    quantity: str
    error: float
    tolerance: float
    note: str = ''

    @property
    def passed(self) -> bool:
        return self.error <= self.tolerance


def load_oracle(path: str) -> Dict[str, Any]:
    """Read an oracle file with ``weights_only=True`` (its ``config`` may hold a ``TorchVersion``, a str)."""
    from torch.torch_version import TorchVersion

    with torch.serialization.safe_globals([TorchVersion]):
        return torch.load(path, map_location='cpu', weights_only=True)


def oracle_inputs(oracle: Mapping[str, Any]) -> Dict[str, str]:
    """{input key: suffix} for every input tensor in the file (``input`` -> '', ``input_37x45`` -> '_37x45')."""
    return {k: k[len('input'):] for k in oracle
            if k.startswith('input') and isinstance(oracle[k], torch.Tensor)}


def _intermediate_hooks(net, record: Dict[str, torch.Tensor], hw) -> List[Any]:
    """Forward hooks that record the authors' intermediate tensors under their names."""

    def hook(name: str, fn: Callable = lambda o: o):
        def _h(module, inputs, output):
            record[name] = fn(output).detach().clone()  # later blocks update their input in place
        return _h

    def tokens_to_map(t):
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *hw[0])

    handles = [net.shollow_feature_extraction.register_forward_hook(hook('encoder_out')),
               net.body.embed.register_forward_hook(hook('tokens_embed')),
               net.body.register_forward_hook(hook('adam_out', lambda o: o[0])),
               net.deep_feature_extraction.register_forward_hook(hook('decoder_out'))]
    for i, blk in enumerate(net.body.blocks):
        handles.append(blk.register_forward_hook(hook(f'block{i}_out', tokens_to_map)))
        handles.append(blk.attn.register_forward_hook(hook(f'block{i}_attn_out_tokens')))
    return handles


def complete_record(net, x: torch.Tensor, info):
    """The halting record of ``net(x)`` (eval, no grad) with every estimator map complete
    (``complete_halting_maps``), after checking that its masks equal those of ``info`` (the same call's record
    with skipped windows)."""
    was = net.complete_halting_maps
    net.complete_halting_maps = True
    try:
        with torch.no_grad():
            net(x)
    finally:
        net.complete_halting_maps = was
    full = net.last_halting
    for a, b in zip(info.global_keep + info.local_keep, full.global_keep + full.local_keep):
        if not torch.equal(a, b):
            raise AssertionError('complete_halting_maps changed a keep mask')
    return full


def run_network(net, x255: torch.Tensor, mode: str) -> Dict[str, Any]:
    """Run ``net`` in ``mode`` ('eval' or 'train') on a 0..255 input, without gradients; return the authors'
    output fields (padded-size maps) plus the intermediates."""
    s = net.window_size
    hp, wp = -(-x255.shape[-2] // s) * s, -(-x255.shape[-1] // s) * s
    record: Dict[str, torch.Tensor] = {}
    handles = _intermediate_hooks(net, record, [(hp, wp)])
    was_training = net.training
    net.train(mode == 'train')
    try:
        with torch.no_grad():
            out = net(x255 / 255)
    finally:
        net.train(was_training)
        for h in handles:
            h.remove()
    sr = out[0] if isinstance(out, tuple) else out
    info = net.last_halting
    if not all(info.complete):  # sparse eval skipped dead windows: SR and masks above, whole maps from a rerun
        info = complete_record(net, x255 / 255, info)
    return {'sr': sr * 255, 'halting_logits': info.logits, 'confidence': info.confidence,
            'global_keep_masks': info.global_keep, 'local_keep_masks': info.local_keep,
            'sparsity': info.sparsity, 'intermediates': record}


def _max_err(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


def compare_outputs(ours: Mapping[str, Any], ref: Mapping[str, Any], input_key: str, mode: str) -> List[Check]:
    checks: List[Check] = []
    if 'sr' in ref:
        checks.append(Check(input_key, mode, 'sr', _max_err(ours['sr'], ref['sr']), SR_TOL, '0..255 scale'))
    for key, tol in (('halting_logits', LOGIT_TOL), ('confidence', CONF_TOL)):
        if key in ref:
            for i, (a, b) in enumerate(zip(ours[key], ref[key])):
                checks.append(Check(input_key, mode, f'{key}[{i}]', _max_err(a, b), tol))
    for key in ('global_keep_masks', 'local_keep_masks'):
        if key in ref:
            for i, (a, b) in enumerate(zip(ours[key], ref[key])):
                diff = float((a != b).sum()) if a.shape == b.shape else float('inf')
                checks.append(Check(input_key, mode, f'{key}[{i}]', diff, 0.0, 'entries that differ'))
    for ref_key, our_key in SPARSITY_KEYS.items():
        if ref_key in ref.get('sparsity', {}):
            err = max(abs(a - b) for a, b in zip(ours['sparsity'][our_key], ref['sparsity'][ref_key]))
            checks.append(Check(input_key, mode, f'sparsity.{ref_key}', err, SPARSITY_TOL))
    inter = dict(ref.get('intermediates', {}), **ref.get('intermediates_subset', {}))
    for name, value in inter.items():
        if name in ours['intermediates']:
            tol = SR_TOL * max(1.0, float(value.abs().max()) / 255)  # float32 noise grows with magnitude
            checks.append(Check(input_key, mode, f'intermediates.{name}',
                                _max_err(ours['intermediates'][name], value), tol, 'diagnostic'))
    return checks


def compare_with_oracle(net, oracle: Mapping[str, Any], load: bool = True,
                        modes=('eval', 'train')) -> List[Check]:
    """Load the oracle's ``state_dict`` into ``net`` strictly (``load``) and run every comparison it supports."""
    if load:
        from adasr.utils.checkpoint import check_state_dict

        state = check_state_dict(net, oracle['state_dict'], strict=True, source='oracle state_dict')
        net.load_state_dict(state, strict=True)
    checks: List[Check] = []
    for input_key, suffix in oracle_inputs(oracle).items():
        for mode in modes:
            ref = oracle.get(f'{mode}_outputs{suffix}')
            if ref is None:
                continue
            ours = run_network(net, oracle[input_key], mode)
            checks.extend(compare_outputs(ours, ref, input_key, mode))
    return checks


def format_table(checks: List[Check], only_failures: bool = False) -> str:
    rows = [c for c in checks if not (only_failures and c.passed)]
    lines = ['| input | mode | quantity | max error | tolerance | result |', '|---|---|---|---|---|---|']
    for c in rows:
        lines.append(f'| {c.input_key} | {c.mode} | {c.quantity} | {c.error:.3g} | {c.tolerance:.3g} | '
                     f'{"PASS" if c.passed else "FAIL"}{" (" + c.note + ")" if c.note else ""} |')
    return '\n'.join(lines)


def summary(checks: List[Check]) -> Optional[str]:
    failed = [c for c in checks if not c.passed]
    return f'{len(checks) - len(failed)} of {len(checks)} checks passed' + (
        f'; FAILED: {", ".join(f"{c.input_key}/{c.mode}/{c.quantity}" for c in failed)}' if failed else '')
