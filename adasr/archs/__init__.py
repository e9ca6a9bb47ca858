"""adasr architectures. Each module registers its classes in BasicSR's ARCH_REGISTRY on import."""
from adasr.archs import bicubic_arch  # noqa: F401
from adasr.archs import pft_arch  # noqa: F401
