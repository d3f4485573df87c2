"""The demo world's shipped files: where they live, how they are saved and loaded.

Weights are saved and loaded by ``rewriting.checkpoint`` (safetensors with metadata
``architecture`` and ``config``; the model is ``Class(**config)``), like any model
the service edits.
"""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rewriting.checkpoint import load_model, save_model

WEIGHTS_DIR = Path(__file__).parent / "weights"
GENERATOR_PATH = WEIGHTS_DIR / "generator.safetensors"
SEGMENTER_PATH = WEIGHTS_DIR / "segmenter.safetensors"
REQUESTS_DIR = Path(__file__).parent / "requests"


def pick_device(name="auto") -> torch.device:
    """"auto" means CUDA when one is present, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA device")
    return torch.device(name)


def device_name(device) -> str:
    """For training records: "cuda (NVIDIA H100 ...)" or "cpu (2 threads)"."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def save_weights(model, path, architecture, config, extra=None):
    """Save ``model`` with the agreed metadata, plus ``extra`` strings (e.g. iterations)."""
    save_model(model, path, architecture, config, metadata=extra)


def load_weights(path, device="cpu"):
    """The demo model stored at ``path``, in eval mode, without gradients."""
    return load_model(path, device)


def to_uint8(images):
    """[N,3,H,W] in [-1,1] -> uint8 array [N,H,W,3]."""
    return ((images.detach().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def save_grid(images, path, nrow=8, pad=2):
    """Save images [N,3,H,W] in [-1,1] as one PNG grid, ``nrow`` per row."""
    arr = to_uint8(images)
    n, h, w, _ = arr.shape
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = arr[i]
    Image.fromarray(grid).save(path)
