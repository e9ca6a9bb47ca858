"""Checkpoints: weights_only loading, BasicSR and bare layouts, and mismatches reported by key name."""
import os

import pytest
import torch
from torch import nn

from adasr.utils.checkpoint import CheckpointError, check_state_dict, load_checkpoint, load_weights, save_checkpoint


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 3, 1))


def test_layouts_and_fallbacks(tmp_path):
    net = _net()
    sd = net.state_dict()
    (tmp_path / 'bare.pth').write_bytes(b'')
    torch.save(sd, tmp_path / 'bare.pth')
    torch.save({'params': sd}, tmp_path / 'params.pth')
    torch.save({'params_ema': sd, 'params': {k: v + 1 for k, v in sd.items()}}, tmp_path / 'both.pth')
    torch.save({'params': {'module.' + k: v for k, v in sd.items()}}, tmp_path / 'ddp.pth')
    for name in ('bare', 'params', 'ddp'):
        got = load_checkpoint(str(tmp_path / f'{name}.pth'), 'params_ema')
        assert list(got) == list(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    ema = load_checkpoint(str(tmp_path / 'both.pth'), 'params_ema')
    plain = load_checkpoint(str(tmp_path / 'both.pth'), 'params')
    assert torch.equal(ema['0.bias'], sd['0.bias']) and torch.equal(plain['0.bias'], sd['0.bias'] + 1)


class _NotAllowed:
    pass


class _RunsCode:
    def __reduce__(self):
        return os.system, ('echo never run',)


def test_weights_only_refuses_pickled_objects(tmp_path):
    """Named, never built, and without PyTorch's advice to load the file with weights_only=False (which would run
    it)."""
    torch.save({'params': _net().state_dict(), 'extra': _NotAllowed()}, tmp_path / 'evil.pth')
    with pytest.raises(CheckpointError, match=r'evil.pth is not plain data: it asks to build '
                                              r'tests.test_checkpoint._NotAllowed; .*weights_only=True') as err:
        load_checkpoint(str(tmp_path / 'evil.pth'))
    assert 'False' not in str(err.value)
    torch.save({'params': _net().state_dict(), 'extra': _RunsCode()}, tmp_path / 'code.pth')
    with pytest.raises(CheckpointError, match=r'code.pth is not plain data: it asks to build (posix|os).system') as err:
        load_checkpoint(str(tmp_path / 'code.pth'))
    assert 'False' not in str(err.value)


def test_a_checkpoint_damaged_in_the_middle_is_refused_by_its_crc(tmp_path):
    """A flipped byte inside a tensor's record: torch.load reads it without complaint (it does not check the zip
    CRCs); adasr names the file and the record. A file saved without CRCs still loads."""
    sd = {'weight': torch.arange(4096, dtype=torch.float32)}
    torch.save({'params': sd}, tmp_path / 'w.pth')
    data = bytearray((tmp_path / 'w.pth').read_bytes())
    at = data.index(torch.tensor([1000.0, 1001.0]).numpy().tobytes())
    data[at + 2] ^= 0x10
    (tmp_path / 'w.pth').write_bytes(bytes(data))
    assert not torch.equal(torch.load(tmp_path / 'w.pth', weights_only=True)['params']['weight'], sd['weight'])
    with pytest.raises(CheckpointError, match=r'w.pth is damaged: Bad CRC-32 for file .*data/0'):
        load_checkpoint(str(tmp_path / 'w.pth'))
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({'params': sd}, tmp_path / 'nocrc.pth')
    finally:
        torch.serialization.set_crc32_options(True)
    assert torch.equal(load_checkpoint(str(tmp_path / 'nocrc.pth'))['weight'], sd['weight'])


def test_legacy_files_are_left_to_torch_load_and_its_errors_keep_only_the_cause(tmp_path):
    """A legacy-format file (not a zip) whose last bytes look like a zip's end record still loads (zip-ness is
    decided by the first bytes, as torch.load does); a damaged one is refused with PyTorch's cause, without its advice
    to load with weights_only=False."""
    tail = torch.tensor(list(b'PK\x05\x06' + bytes(18)), dtype=torch.uint8)
    torch.save({'params': {'w': tail}}, tmp_path / 'legacy.pth', _use_new_zipfile_serialization=False)
    assert torch.equal(load_checkpoint(str(tmp_path / 'legacy.pth'))['w'], tail)
    data = bytearray((tmp_path / 'legacy.pth').read_bytes())
    data[0] ^= 0xFF
    (tmp_path / 'bad.pth').write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r'cannot read checkpoint .*bad.pth with weights_only=True') as err:
        load_checkpoint(str(tmp_path / 'bad.pth'))
    assert 'False' not in str(err.value) and 'Re-running' not in str(err.value)


def test_an_entry_that_is_not_a_tensor_is_named(tmp_path):
    sd = dict(_net().state_dict())
    sd['1.bias'] = 'hello'
    torch.save({'params_ema': sd}, tmp_path / 'strval.pth')
    with pytest.raises(CheckpointError, match=r'strval.pth: entries that are not tensors \(1\): 1.bias'):
        load_checkpoint(str(tmp_path / 'strval.pth'), 'params_ema')


def test_missing_file_and_wrong_entries(tmp_path):
    with pytest.raises(CheckpointError, match='not found'):
        load_checkpoint(str(tmp_path / 'nope.pth'))
    with pytest.raises(CheckpointError, match='is a folder, not a file'):
        load_checkpoint(str(tmp_path))
    torch.save({'optimizer': {'lr': 1.0}, 'epoch': 3}, tmp_path / 'state.pth')
    with pytest.raises(CheckpointError, match="top-level keys are \\['epoch', 'optimizer'\\]"):
        load_checkpoint(str(tmp_path / 'state.pth'))
    # an entry asked for by name (a typo, say) is not replaced by another; params and params_ema stand in for each other
    torch.save({'params': _net().state_dict()}, tmp_path / 'params.pth')
    with pytest.raises(CheckpointError, match="no entry 'parmas'; its top-level keys are \\['params'\\]"):
        load_checkpoint(str(tmp_path / 'params.pth'), 'parmas')
    (tmp_path / 'zero.pth').write_bytes(b'')
    with pytest.raises(CheckpointError, match='is empty'):
        load_checkpoint(str(tmp_path / 'zero.pth'))


def test_mismatch_names_keys_and_shapes(tmp_path):
    net = _net()
    sd = net.state_dict()
    sd['2.weight'] = sd.pop('1.weight')
    sd['0.bias'] = torch.zeros(5)
    with pytest.raises(CheckpointError) as err:
        check_state_dict(net, sd, strict=True, source='ckpt.pth')
    msg = str(err.value)
    assert 'missing keys (1): 1.weight' in msg
    assert 'unexpected keys (1): 2.weight' in msg
    assert '0.bias (5,) vs (4,)' in msg
    kept = check_state_dict(net, sd, strict=False)
    assert '0.bias' not in kept and '0.weight' in kept
    # strict_load false with nothing that loads (another prefix, say) is a wrong file, not a fine-tuning start
    prefixed = {f'generator.{k}': v for k, v in net.state_dict().items()}
    with pytest.raises(CheckpointError, match=r'ckpt.pth does not match Sequential: none of its 4 entries loads '
                                              r'\(4 of the network\'s 4 missing, e.g. 0.bias, 0.weight, 1.bias, '
                                              r'\.\.\. \(1 more\); unexpected: generator.0.bias'):
        check_state_dict(net, prefixed, strict=False, source='ckpt.pth')


def test_load_weights_roundtrip(tmp_path):
    a, b = _net(), _net()
    torch.save({'params': a.state_dict()}, tmp_path / 'a.pth')
    load_weights(b, str(tmp_path / 'a.pth'))
    x = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_load_weights_strips_the_authors_model_prefix_only_when_nothing_matches(tmp_path):
    """The AdaFormer authors' trainer saves ``model.<name>``: every loader (training, upscale, benchmark) reads it."""
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    torch.save({f'model.{k}': v for k, v in a.state_dict().items()}, tmp_path / 'authors.pt')
    load_weights(b, str(tmp_path / 'authors.pt'))
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    # a network whose own names begin with "model." keeps the keys as they are
    wrapped, other = nn.Module(), nn.Module()
    wrapped.model, other.model = nn.Linear(3, 2), nn.Linear(3, 2)
    torch.save(wrapped.state_dict(), tmp_path / 'wrapped.pt')
    load_weights(other, str(tmp_path / 'wrapped.pt'))
    assert torch.equal(wrapped.model.weight, other.model.weight)


def test_nonfinite_checkpoint_is_refused_by_key(tmp_path):
    sd = _net().state_dict()
    sd['0.weight'][0, 0, 0, 0] = float('nan')
    sd['1.bias'][0] = float('-inf')
    torch.save({'params': sd}, tmp_path / 'nan.pth')
    with pytest.raises(CheckpointError, match=r'nan\.pth holds non-finite .* 2 tensor\(s\): 0\.weight, 1\.bias'):
        load_checkpoint(str(tmp_path / 'nan.pth'))


def test_save_checkpoint_is_atomic_and_names_the_file(tmp_path, monkeypatch):
    dst = tmp_path / 'net_g_5.pth'
    save_checkpoint({'params': _net().state_dict()}, str(dst))
    old = dst.read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        f.write(b'partial')
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(torch, 'save', disk_full)
    with pytest.raises(CheckpointError, match=f'cannot save {dst}: .*No space left'):
        save_checkpoint({'params': {}}, str(dst))
    assert dst.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ['net_g_5.pth']
