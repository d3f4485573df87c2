"""Which torch device a worker runs on: ``PALIMPSEST_DEVICE`` = auto | cpu | cuda.

Imported only inside tasks, so that importing ``workers`` (or the API) never
imports torch.
"""
import torch


def resolve_device(setting: str) -> torch.device:
    """``auto`` means CUDA when this process can see a GPU, else CPU.

    ``cuda`` on a machine without one is a configuration error, reported as such
    rather than left to fail on the first tensor.
    """
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("PALIMPSEST_DEVICE=cuda, but torch sees no CUDA device")
    if setting not in ("cpu", "cuda"):
        raise ValueError(f"PALIMPSEST_DEVICE must be auto, cpu or cuda, not {setting!r}")
    return torch.device(setting)
