"""The smallest shims BasicSR 1.4.2 needs.

``basicsr/data/degradations.py`` imports ``torchvision.transforms.functional_tensor``, a module that
torchvision 0.17 renamed to ``torchvision.transforms._functional_tensor``. Because ``basicsr/__init__.py``
imports every sub-package, that one import breaks ``import basicsr`` entirely. We register the old name as
an alias of the renamed module before basicsr is first imported (:func:`apply_torchvision_shim`, on import of
adasr). :func:`apply_basicsr_dist_shim` lets ``--launcher pytorch`` run on CPUs; adasr's train/test entry points
apply it. The CPU resume fix lives in :mod:`adasr.cli.entry`, where it is used.
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


def apply_basicsr_dist_shim() -> None:
    """Let BasicSR 1.4.2's ``--launcher pytorch`` run on CPUs (gloo) as well as GPUs (NCCL).

    BasicSR hard-codes the NCCL backend and ``torch.cuda.set_device(RANK % device_count)`` in
    ``basicsr.utils.dist_util._init_dist_pytorch`` (a division by zero without CUDA), and wraps networks in
    ``DistributedDataParallel(device_ids=[torch.cuda.current_device()])`` (no CUDA, no device; and DDP refuses a
    network without trainable parameters, such as ``Bicubic``). Replacements: the process group comes from
    :func:`adasr.utils.distributed.init_from_env` (``cpu:gloo,cuda:nccl`` with CUDA, gloo without; the GPU is
    ``LOCAL_RANK``), a network on the CPU is wrapped without ``device_ids``, and one without trainable parameters
    is not wrapped. The GPU path of ``model_to_device`` and everything else (samplers, rank-0-only saving and
    logging) stay BasicSR's.
    Safe to call more than once.
    """
    from basicsr.models.base_model import BaseModel
    from basicsr.utils import dist_util
    from torch.nn.parallel import DistributedDataParallel

    from adasr.utils.distributed import init_from_env

    if getattr(BaseModel.model_to_device, '_adasr_shim', False):
        return
    basicsr_model_to_device = BaseModel.model_to_device

    def init_dist_pytorch(backend: str = 'nccl', **kwargs) -> None:
        del backend  # BasicSR always passes 'nccl'; the backend follows the hardware instead
        init_from_env(**kwargs)

    def model_to_device(self, net):
        if self.opt['dist'] and not any(p.requires_grad for p in net.parameters()):
            return net.to(self.device)  # nothing to synchronise (Bicubic), and DDP refuses such a module
        if self.opt['dist'] and self.device.type == 'cpu':
            return DistributedDataParallel(net.to(self.device),
                                           find_unused_parameters=self.opt.get('find_unused_parameters', False))
        return basicsr_model_to_device(self, net)

    model_to_device._adasr_shim = True
    dist_util._init_dist_pytorch = init_dist_pytorch
    BaseModel.model_to_device = model_to_device
