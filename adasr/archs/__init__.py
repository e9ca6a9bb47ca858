"""adasr architectures. Each module registers its classes in BasicSR's ARCH_REGISTRY on import."""
from adasr.archs import adaformer_arch, bicubic_arch, pft_arch  # noqa: F401
