"""Shared pieces of the edit front-end tests: a tiny generator, its statistic, requests, a checkpoint.

The tiny generator is ``tiny_models.EqualizedGAN`` (z -> 4x4 -> layer1 .. layer4, each
an EqualConv2d with ``weight`` and float ``weight_gain`` -> LeakyReLU -> PixelNorm;
layer2/layer3 at 8x8, layer4 at 16x16). The CLI needs an architecture that
``rewriting.checkpoint`` knows, so its checkpoint is a tiny ``demo-gan`` instead.
"""
import os

import torch

from rewriting.checkpoint import save_model
from rewriting.statistics import compute_second_moment

from .tiny_models import build

LAYER = "layer3"  # 8x8 keys and values, 8 channels


def engine_device():
    """As the ``device`` fixture (conftest.py), for module-scoped fixtures: CUDA if asked for and present."""
    wanted = os.environ.get("PALIMPSEST_DEVICE", "cpu")
    return torch.device("cuda" if wanted in ("cuda", "auto") and torch.cuda.is_available() else "cpu")


def tiny_generator(seed=0):
    return build("equalized", seed=seed)


def tiny_moment(model, layer=LAYER, seeds="100-163"):
    return compute_second_moment(model, layer, seeds, batch_size=32)


def copy_request(**params):
    """Copy the top-left quarter of seed 1 into the bottom-right of seed 2; context in seeds 2 and 3."""
    return {
        "operation": "copy",
        "copy": {"seed": 1, "mask": [0.0, 0.0, 0.5, 0.5]},
        "paste": {"seed": 2, "mask": [0.5, 0.5, 1.0, 1.0]},
        "context": [{"seed": 2, "mask": [0.5, 0.5, 1.0, 1.0]}, {"seed": 3, "mask": [0.25, 0.25, 0.75, 0.75]}],
        "params": {"steps": 300, **params},
    }


def erase_request(**params):
    return {
        "operation": "erase",
        "paste": {"seed": 4, "mask": [0.25, 0.25, 0.75, 0.75]},
        "context": [{"seed": 4, "mask": [0.25, 0.25, 0.75, 0.75]}],
        "params": {"steps": 300, "drank": 3, **params},
    }


def save_tiny_checkpoint(path, seed=0):
    """A tiny demo-gan (16x16, 8 channels; layers layer1..layer6) saved with save_model."""
    from demo.generator import Generator

    config = {"z_dim": 8, "resolution": 16, "channels": [8, 8, 8]}
    torch.manual_seed(seed)
    model = Generator(**config).eval()
    save_model(model, path, "demo-gan", config)
    return model
