"""adasr losses. Each module registers its classes in BasicSR's LOSS_REGISTRY on import."""
from adasr.losses import uncertainty_loss  # noqa: F401
