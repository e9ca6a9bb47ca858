"""adasr datasets. Each module registers its classes in BasicSR's DATASET_REGISTRY on import."""
from adasr.data import paired_dataset  # noqa: F401
