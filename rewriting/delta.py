"""Edits as low-rank deltas of one stored weight.

An edit changes the stored weight ``W`` of one layer by ``expand(lam, D, in_dim)``:
``D`` [r, C_in] holds orthonormal context directions along the weight's
input-channel dimension ``in_dim``, and ``lam`` has the weight's shape with that
dimension of size r (a conv weight [out, in, kh, kw] gets lam [out, r, kh, kw]; a
ConvTranspose2d weight [in, out, kh, kw] gets lam [r, out, kh, kw]). ``lam`` is in
stored-weight units (for an equalized-lr layer the effective weight moves by
``weight_gain`` times as much).

A delta file is safetensors (tensors ``lam`` and ``directions``) with metadata
``format``, ``layer``, ``param``, ``base_sha256`` (sha256 of the base checkpoint
file), ``in_dim`` and ``config`` (JSON). Several deltas compose in order on one
base. Removing one rebuilds from the base without it, never subtracts, so the
result is bit for bit what applying the remaining deltas gives.
"""
import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_bytes

from rewriting.checkpoint import file_sha256, load_state, safetensors_bytes, safetensors_metadata, save_state
from rewriting.errors import CheckpointError, IncompatibleError

FORMAT = "palimpsest.delta/1"


def expand(lam, directions, in_dim):
    """The full update ``lam x_in D``: lam's ``in_dim`` axis (size r) becomes C_in."""
    return (lam.movedim(in_dim, -1) @ directions).movedim(-1, in_dim)


def coefficients(weight, directions, in_dim):
    """Coordinates of ``weight`` along orthonormal ``directions`` on ``in_dim`` (the lam of its projection)."""
    return (weight.movedim(in_dim, -1) @ directions.T).movedim(-1, in_dim)


def project(weight, directions, in_dim):
    """Orthogonal projection of ``weight``'s input-channel rows onto span(D) (D orthonormal)."""
    return expand(coefficients(weight, directions, in_dim), directions, in_dim)


@dataclass
class EditDelta:
    layer: str  # target layer name, e.g. "layer5"
    param: str  # stored weight in the state dict, e.g. "layer5.conv.weight"
    base_sha256: str  # sha256 of the base checkpoint file the edit was made for
    lam: torch.Tensor  # weight-shaped, r on in_dim, stored-weight units
    directions: torch.Tensor  # [r, C_in], orthonormal rows
    config: dict = field(default_factory=dict)  # how it was made (JSON-serializable)
    in_dim: int = 1  # input-channel dimension of the stored weight

    @property
    def rank(self):
        return self.directions.shape[0]

    def update(self, dtype=torch.float64):
        """The dense update of the stored weight, in ``dtype``."""
        return expand(self.lam.to(dtype), self.directions.to(dtype), self.in_dim)

    def _metadata(self):
        return {"format": FORMAT, "layer": self.layer, "param": self.param,
                "base_sha256": self.base_sha256, "in_dim": str(self.in_dim),
                "config": json.dumps(self.config, sort_keys=True)}

    def _tensors(self):
        return {"lam": self.lam.detach().cpu().contiguous(),
                "directions": self.directions.detach().cpu().contiguous()}

    def to_bytes(self):
        return safetensors_bytes(self._tensors(), metadata=self._metadata())

    @property
    def sha256(self):
        """Identity of the delta: sha256 of its sorted metadata and its tensors' dtype, shape and bytes.

        (Not of the file's bytes, so that it does not depend on their encoding.)
        """
        h = hashlib.sha256(json.dumps(self._metadata(), sort_keys=True).encode())
        for name, t in sorted(self._tensors().items()):
            h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def save(self, path):
        with open(path, "wb") as f:
            f.write(self.to_bytes())

    @classmethod
    def from_bytes(cls, data):
        try:
            tensors = load_bytes(data)
            meta = safetensors_metadata(data)
        except Exception as e:  # safetensors raises its own types for corrupt data
            raise CheckpointError(f"not a delta file ({e})") from e
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"delta format is {meta.get('format')!r}, expected {FORMAT!r}")
        try:
            delta = cls(layer=meta["layer"], param=meta["param"], base_sha256=meta["base_sha256"],
                        lam=tensors["lam"], directions=tensors["directions"],
                        config=json.loads(meta.get("config", "{}")), in_dim=int(meta["in_dim"]))
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"delta file lacks or garbles {e}") from e
        d, lam = delta.directions, delta.lam
        if d.dim() != 2 or not 0 <= delta.in_dim < lam.dim() or lam.shape[delta.in_dim] != d.shape[0]:
            raise CheckpointError("delta tensors have inconsistent shapes")
        return delta

    @classmethod
    def load(cls, path):
        with open(path, "rb") as f:
            return cls.from_bytes(f.read())


def check_fits(delta, weight):
    """Raise ``IncompatibleError`` unless the delta's update has ``weight``'s shape."""
    shape = list(delta.lam.shape)
    shape[delta.in_dim] = delta.directions.shape[1]
    if tuple(shape) != tuple(weight.shape):
        raise IncompatibleError(f"delta for {delta.param} has shape {tuple(shape)}, "
                                f"the weight {tuple(weight.shape)}")


def apply_deltas(state, deltas, base_sha256=None):
    """A new state dict with ``deltas`` applied in order (unchanged tensors are shared).

    Each step adds the update in float64 and rounds once to the weight's dtype.
    If ``base_sha256`` is given, every delta must have been made for that base.
    """
    out = dict(state)
    for delta in deltas:
        if base_sha256 is not None and delta.base_sha256 != base_sha256:
            raise IncompatibleError(f"delta {delta.sha256[:12]} was made for base "
                                    f"{delta.base_sha256[:12]}, not {base_sha256[:12]}")
        if delta.param not in out:
            raise IncompatibleError(f"the checkpoint has no tensor {delta.param!r}")
        w = out[delta.param]
        check_fits(delta, w)
        out[delta.param] = (w.to(torch.float64) + delta.update().to(w.device)).to(w.dtype)
    return out


def remove_delta(base_state, deltas, index, base_sha256=None):
    """The state of ``deltas`` without ``deltas[index]``, rebuilt from the base."""
    deltas = list(deltas)
    del deltas[index]
    return apply_deltas(base_state, deltas, base_sha256)


@contextmanager
def applied(model, deltas):
    """Temporarily apply deltas to ``model``'s weights; the originals come back exactly."""
    params = dict(model.named_parameters())
    touched = {d.param for d in deltas}
    missing = touched - params.keys()
    if missing:
        raise IncompatibleError(f"the model has no parameter {sorted(missing)[0]!r}")
    saved = {name: params[name].detach().clone() for name in touched}
    try:
        with torch.no_grad():
            edited = apply_deltas(saved, deltas)
            for name in touched:
                params[name].copy_(edited[name])
        yield model
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


def materialize(base_path, deltas, out_path, base_sha256: str | None = None):
    """Write the base checkpoint with ``deltas`` applied; returns the new file's sha256.

    Only the edited layers' tensors differ from the base; the metadata is the base's
    plus ``edits`` (JSON list of the deltas' sha256, in order) and ``base_sha256``
    (hashed here unless the caller already knows it, e.g. from a verified download).
    """
    state, meta = load_state(base_path)
    base_sha = base_sha256 or file_sha256(base_path)
    state = apply_deltas(state, deltas, base_sha256=base_sha)
    meta = {**meta, "base_sha256": base_sha, "edits": json.dumps([d.sha256 for d in deltas])}
    save_state(state, out_path, meta)
    return file_sha256(out_path)
