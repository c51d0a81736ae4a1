import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton reads this when it is first imported (by any test):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # its kernels then run on CPU tensors


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
