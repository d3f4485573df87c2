import pytest
import torch

from workers.device import resolve_device


def test_cpu():
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_follows_cuda_availability():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="PALIMPSEST_DEVICE=cuda"):
        resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_with_gpu():
    assert resolve_device("cuda").type == "cuda"


def test_unknown_device():
    with pytest.raises(ValueError, match="PALIMPSEST_DEVICE"):
        resolve_device("tpu")
