"""adasr: adaptive, sparse super-resolution transformers (AdaFormer, PFT) as a BasicSR plugin.

Importing this package applies the torchvision shim that BasicSR 1.4.2 needs (see :mod:`adasr.compat`) and
then registers every arch, loss, dataset and model that adasr adds into BasicSR's registries, by explicit
imports (no folder scanning).
"""
__version__ = '0.1.0'

from adasr.compat import apply_torchvision_shim

apply_torchvision_shim()

from adasr import archs, data, losses, models  # noqa: E402,F401  (registration happens on import)
