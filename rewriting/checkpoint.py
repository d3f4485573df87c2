"""Model checkpoints as safetensors, never pickles.

A checkpoint holds the state dict plus string metadata: ``format``,
``architecture`` (a key of ``ARCHITECTURES``) and ``config`` (JSON keyword
arguments of the class). ``load_model`` builds ``Class(**config)`` for a known
architecture only, so a file cannot make the loader import arbitrary code.
"""
import hashlib
import importlib
import json

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rewriting.errors import CheckpointError

FORMAT = "palimpsest.model/1"
ARCHITECTURES = {
    "demo-gan": "demo.generator:Generator",
    "demo-segmenter": "demo.segmenter:Segmenter",
}


def file_sha256(path):
    """Hex sha256 of a file's bytes (identifies a base model, a statistic or a delta)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_state(state, path, metadata=None):
    """Write a state dict (tensors are copied to contiguous CPU memory) with str metadata."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    save_file(tensors, str(path), metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_state(path, device="cpu"):
    """(state dict, metadata) of a safetensors file."""
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors reports bad files with its own error types
        raise CheckpointError(f"{path}: not a safetensors checkpoint ({e})") from e
    return state, meta


def save_model(model, path, architecture, config, metadata=None):
    """Save ``model``'s state dict with the architecture name and its JSON config."""
    meta = {**(metadata or {}), "format": FORMAT, "architecture": architecture,
            "config": json.dumps(config, sort_keys=True)}
    save_state(model.state_dict(), path, meta)


def model_class(architecture, architectures=None):
    table = ARCHITECTURES if architectures is None else architectures
    if architecture not in table:
        raise CheckpointError(f"unknown architecture {architecture!r}; known: {sorted(table)}")
    module_name, _, class_name = table[architecture].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_model(state, meta, device="cpu", architectures=None):
    """Construct the model a checkpoint describes and load its weights (eval, no grads)."""
    # files written by other tools may lack "format"; one that names another format is refused
    if meta.get("format", FORMAT) != FORMAT:
        raise CheckpointError(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
    if "architecture" not in meta:
        raise CheckpointError("the checkpoint's metadata names no architecture")
    try:
        config = json.loads(meta.get("config", "{}"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"config metadata is not JSON ({e})") from e
    if not isinstance(config, dict):
        raise CheckpointError("config metadata must be a JSON object")
    model = model_class(meta.get("architecture"), architectures)(**config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"weights do not fit the architecture: {e}") from e
    return model.to(device).eval().requires_grad_(False)


def load_model(path, device="cpu", architectures=None):
    """The model saved at ``path`` by ``save_model``, on ``device``."""
    state, meta = load_state(path)
    return build_model(state, meta, device, architectures)
