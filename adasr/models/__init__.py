"""adasr model classes. Each module registers its classes in BasicSR's MODEL_REGISTRY on import."""
from adasr.models import adaformer_model, adasr_model  # noqa: F401
