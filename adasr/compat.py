"""The smallest shim BasicSR 1.4.2 needs on current torchvision.

``basicsr/data/degradations.py`` imports ``torchvision.transforms.functional_tensor``, a module that
torchvision 0.17 renamed to ``torchvision.transforms._functional_tensor``. Because ``basicsr/__init__.py``
imports every sub-package, that one import breaks ``import basicsr`` entirely. We register the old name as
an alias of the renamed module before basicsr is first imported. Nothing else in basicsr is patched here;
the CPU resume fix lives in :mod:`adasr.cli.entry` (``load_resume_state``), where it is used.
"""
import importlib
import sys

_OLD = 'torchvision.transforms.functional_tensor'
_NEW = 'torchvision.transforms._functional_tensor'


def apply_torchvision_shim() -> bool:
    """Alias the removed torchvision module if needed. Returns True when an alias was installed."""
    if _OLD in sys.modules:
        return False
    try:
        importlib.import_module(_OLD)
        return False  # old torchvision: the module still exists
    except ImportError:
        pass
    sys.modules[_OLD] = importlib.import_module(_NEW)
    return True
