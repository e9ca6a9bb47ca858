"""adasr architectures. Each module registers its classes in BasicSR's ARCH_REGISTRY on import; spandrel_support also
adds PFT and AdaFormer to spandrel's registry."""
from adasr.archs import adaformer_arch, baselines_arch, bicubic_arch, pft_arch, spandrel_support  # noqa: F401
