"""The basicsr shim and what ``import adasr`` registers."""
import subprocess
import sys

from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, LOSS_REGISTRY, MODEL_REGISTRY

import adasr
from adasr.compat import apply_torchvision_shim

EXPECTED = {
    ARCH_REGISTRY: ['Bicubic', 'SwinIR'],
    MODEL_REGISTRY: ['AdaSRModel'],
    DATASET_REGISTRY: ['PairedSRDataset', 'PairedImageDataset'],
    LOSS_REGISTRY: ['L1Loss'],
}


def test_every_name_registered():
    for registry, names in EXPECTED.items():
        for name in names:
            assert name in registry, f'{name} missing from {registry._name}'


def test_version_is_static_string():
    # pyproject reads the version statically from adasr/__init__.py: keep it a plain string literal
    assert isinstance(adasr.__version__, str) and adasr.__version__.count('.') == 2


def test_shim_aliases_renamed_module_and_is_idempotent():
    import torchvision.transforms._functional_tensor as renamed

    assert sys.modules['torchvision.transforms.functional_tensor'] is renamed
    assert apply_torchvision_shim() is False  # already applied
    from basicsr.data import degradations

    assert degradations.rgb_to_grayscale is renamed.rgb_to_grayscale


def test_basicsr_import_needs_the_shim_and_adasr_provides_it():
    code = 'import {first}; import basicsr.data.degradations; print("ok")'
    bare = subprocess.run([sys.executable, '-c', code.format(first='torch')], capture_output=True, text=True)
    assert bare.returncode != 0 and 'functional_tensor' in bare.stderr
    shimmed = subprocess.run([sys.executable, '-c', code.format(first='adasr')], capture_output=True, text=True)
    assert shimmed.returncode == 0, shimmed.stderr
    assert shimmed.stdout.strip() == 'ok'
