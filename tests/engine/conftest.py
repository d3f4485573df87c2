import os

import pytest
import torch


@pytest.fixture
def device():
    """The device engine tests run on: PALIMPSEST_DEVICE=cuda selects the GPU when present."""
    wanted = os.environ.get("PALIMPSEST_DEVICE", "cpu")
    if wanted in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")
