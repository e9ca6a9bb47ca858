"""Shared test fixtures. Tests run on the CPU by default; GPU tests are marked ``gpu`` and skip without CUDA."""
import os
import os.path as osp
import random

import numpy as np
import pytest
import torch

import adasr  # noqa: F401  (shim + registration before anything imports basicsr)

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
# the CLIs called in this process (and the processes tests start) keep glibc's malloc as it is: tuning it would
# change memory figures across tests; tests/test_malloc.py checks the tuning with an environment of its own
os.environ.setdefault('ADASR_MALLOC', 'default')


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def repo_root() -> str:
    return REPO


@pytest.fixture
def torch_threads():
    """``torch_threads(n)`` sets PyTorch's intra-op thread count for the test; the count is restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture
def reference_dir() -> str:
    """Folder with the authors' oracle outputs (``*_oracle.pt``): set ADASR_REFERENCE_DIR to run these tests.

    The files are too large to commit (12-18 MB); the committed fixtures under tests/data guard the same numbers at
    small sizes, and were produced by code checked against these oracles (see scripts/make_test_fixtures.py).
    """
    path = os.environ.get('ADASR_REFERENCE_DIR')
    if not path or not osp.isdir(path):
        pytest.skip('ADASR_REFERENCE_DIR is not set: oracle tests need the reference outputs of the authors\' code')
    return path


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA GPU')
    for item in items:
        if 'gpu' in item.keywords:
            item.add_marker(skip)


def make_pairs(root: str, names=('astronaut', 'coffee'), size: int = 48, scale: int = 4, split: str = 'train'):
    """Write tiny HR crops of the bundled demo photos and their MATLAB-bicubic LR to ``root/{HR,LR}``."""
    import cv2

    from adasr.utils.matlab_resize import imresize_uint8

    os.makedirs(osp.join(root, 'HR'), exist_ok=True)
    os.makedirs(osp.join(root, 'LR'), exist_ok=True)
    for i, name in enumerate(names):
        img = cv2.imread(osp.join(REPO, 'datasets', 'demo', split, 'HR', f'{name}.png'), cv2.IMREAD_COLOR)
        top = 40 + 16 * i
        hr = np.ascontiguousarray(img[top:top + size, 60:60 + size])
        cv2.imwrite(osp.join(root, 'HR', f'{name}.png'), hr)
        cv2.imwrite(osp.join(root, 'LR', f'{name}.png'), imresize_uint8(hr, 1 / scale))
    return osp.join(root, 'HR'), osp.join(root, 'LR')


@pytest.fixture
def tiny_pairs(tmp_path):
    """(HR folder, LR folder) with two 48x48 / 12x12 real-photo pairs at x4."""
    return make_pairs(str(tmp_path / 'pairs'))
