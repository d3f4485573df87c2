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
from safetensors.torch import save as save_bytes
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


def _sorted_json(header):
    return json.dumps(json.loads(header), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def safetensors_bytes(tensors, metadata=None):
    """safetensors' encoding of ``tensors`` with str ``metadata``, the same bytes for the
    same content: safetensors writes metadata keys in hash order, so the header is
    written again with its keys sorted, and a file's sha256 names what it holds."""
    data = save_bytes(tensors, metadata=metadata)
    n = int.from_bytes(data[:8], "little")
    header = _sorted_json(data[8:8 + n])
    header += b" " * (-len(header) % 8)  # the tensor data stays 8-byte aligned
    return len(header).to_bytes(8, "little") + header + memoryview(data)[8 + n:]


def safetensors_metadata(data):
    """The str metadata of safetensors ``data`` (bytes): an 8-byte little-endian header
    length, then a JSON header whose ``__metadata__`` holds it."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]).get("__metadata__", {})


def write_safetensors(tensors, path, metadata=None):
    """``safetensors_bytes`` into a file, without holding the encoding in memory: the
    header is sorted in place (the same keys in the same length)."""
    save_file(tensors, str(path), metadata=metadata)
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = _sorted_json(f.read(n))
        if len(header) > n:  # never seen: safetensors escaped the JSON differently from Python
            data = safetensors_bytes(tensors, metadata)
            f.seek(0)
            f.write(data)
            f.truncate(len(data))
            return
        f.seek(8)
        f.write(header + b" " * (n - len(header)))


def save_state(state, path, metadata=None):
    """Write a state dict (tensors are copied to contiguous CPU memory) with str metadata."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    write_safetensors(tensors, path, metadata={k: str(v) for k, v in (metadata or {}).items()})


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
