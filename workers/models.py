"""Generator checkpoints: validate before use, register local files (the demo).

``inspect_file`` is the one check every checkpoint passes before a job may use it:

1. it is safetensors: the 8-byte header length and the JSON header are read by hand, so
   a pickle (or a torch zip) renamed ``.safetensors`` is refused without ever being
   unpickled or handed to a parser that could execute it;
2. its architecture is one of ``rewriting.checkpoint.ARCHITECTURES`` (given, or named in
   the file's metadata; the two must agree);
3. ``Class(**config)`` builds, first on the ``meta`` device (no memory), and its
   state dict matches the file's tensors by name and shape, so a config cannot make the
   worker allocate more than the file holds; then the weights load strictly;
4. every floating tensor is finite (no NaN or inf);
5. a generator (``z_dim``) with at least one editable layer; ``layers`` lists them.

A refusal raises ``ModelRefused`` with a message that names the field to blame.

Checkpoint keys: ``tenants/<tenant>/models/<sha256>/model.safetensors``, or
``shared/models/<sha256>/model.safetensors`` for shared models (the demo); segmenters
likewise under ``segmenters/``. The module top is torch-free; torch is loaded inside.
"""
import json
import logging
import os
from dataclasses import dataclass

from celery import shared_task
from sqlalchemy import select, update

from storage.db import session_scope
from storage.models import Model
from storage.objects import ObjectNotFound, StorageUnavailable
from workers import deliveries
from workers.artifacts import ChecksumMismatch, cache_dir, fetch, file_sha256, put_file
from workers.retry import STORE_ERRORS, retry_call

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


class ModelRefused(ValueError):
    """A checkpoint that cannot be used; ``field`` names what is wrong."""

    code = "invalid_model"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Inspection:
    architecture: str
    config: dict
    layers: list  # JSON-ready, see layer_json
    has_z_dim: bool


def safetensors_header(path) -> dict:
    """The JSON header of a safetensors file, read without any deserializer.

    Layout: 8 bytes little-endian header length n, then n bytes of JSON, then data."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelRefused("file", "too short to be a safetensors file")
        n = int.from_bytes(head, "little")
        if n < 2 or n > min(MAX_HEADER_BYTES, size - 8):
            raise ModelRefused("file", "not a safetensors file (a pickle or torch.save file is refused, never "
                                       "loaded; convert it with safetensors.torch.save_file)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelRefused("file", "not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ModelRefused("file", "not a safetensors file (its header is not a JSON object)")
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= size - 8 - n):
            raise ModelRefused("file", f"tensor {name!r} has a malformed entry in the safetensors header")
    return header


def layer_json(info) -> dict:
    """A ``rewriting.layers.LayerInfo`` as stored in ``models.layers``."""
    size = (lambda s: list(s) if s is not None else None)
    return {"name": info.name, "kind": info.kind, "param": info.param,
            "key_channels": info.key_channels, "key_size": size(info.key_size),
            "value_channels": info.value_channels, "value_size": size(info.value_size)}


def inspect_file(path, architecture: str | None = None, config: dict | None = None,
                 generator: bool = True) -> Inspection:
    """Validate a checkpoint (see the module doc); raises ``ModelRefused``."""
    import torch

    from rewriting.checkpoint import ARCHITECTURES, build_model, load_state, model_class
    from rewriting.errors import CheckpointError
    from rewriting.layers import editable_layers

    header = safetensors_header(path)
    meta = header.get("__metadata__") or {}
    named = meta.get("architecture")
    if architecture and named and architecture != named:
        raise ModelRefused("architecture", f"{architecture!r} was given, but the file says {named!r}")
    architecture = architecture or named
    if not architecture:
        raise ModelRefused("architecture", "not given, and the file's metadata names none")
    if architecture not in ARCHITECTURES:
        raise ModelRefused("architecture", f"unknown architecture {architecture!r}; known: {sorted(ARCHITECTURES)}")
    if config is None:
        try:
            config = json.loads(meta.get("config", "{}"))
        except json.JSONDecodeError:
            raise ModelRefused("config", "the file's config metadata is not JSON") from None
    if not isinstance(config, dict):
        raise ModelRefused("config", "must be a JSON object of the architecture's keyword arguments")

    cls = model_class(architecture)
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated
            skeleton = cls(**config)
    except (TypeError, ValueError) as e:
        raise ModelRefused("config", f"{architecture} cannot be built from it: {e}") from None
    expected = {k: list(v.shape) for k, v in skeleton.state_dict().items()}
    found = {k: v.get("shape") for k, v in header.items() if k != "__metadata__"}
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
    if missing or unexpected or wrong:
        parts = [f"{what} {names[:5]}" for what, names in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if names]
        raise ModelRefused("file", f"the weights do not fit {architecture} with this config: {'; '.join(parts)}")
    has_z_dim = isinstance(getattr(skeleton, "z_dim", None), int)
    if generator and not has_z_dim:
        raise ModelRefused("architecture", f"{architecture} is not a generator (it has no z_dim)")

    try:
        state, _ = load_state(path)
    except CheckpointError as e:
        raise ModelRefused("file", str(e)) from None
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ModelRefused("file", f"tensor {name!r} holds NaN or infinite values")
    try:
        model = build_model(state, {"architecture": architecture, "config": json.dumps(config)})
    except CheckpointError as e:
        raise ModelRefused("file", str(e)) from None
    layers = [layer_json(info) for info in editable_layers(model)] if generator else []
    if generator and not layers:
        raise ModelRefused("architecture", f"{architecture} has no layer the engine can edit")
    return Inspection(architecture, config, layers, has_z_dim)


# --- the inspect_model task -----------------------------------------------------------------

def process_model(session_factory, store, settings, model_id: str) -> str | None:
    """The body of ``inspect_model``: validate an uploaded checkpoint; its final status.

    Only a ``pending`` model is inspected (a second delivery does nothing). Whatever
    building or inspecting the tenant's checkpoint raises marks it ``failed`` with the
    reason in ``error``. A store that stays unreachable for ``PALIMPSEST_STORAGE_RETRY_SECONDS``
    raises ``StorageUnavailable`` and leaves the model pending (its ``error`` says so; the
    reconciler sends it again). Deliveries are counted (``workers.deliveries``): past
    ``PALIMPSEST_JOB_MAX_ATTEMPTS`` of them (a checkpoint that kills its worker) it fails
    ``worker_lost`` without being inspected again."""
    with session_scope(session_factory) as session:
        model = session.get(Model, model_id)
        if model is None or model.status != "pending":
            return None if model is None else model.status
    with deliveries.counted(session_factory, Model, model_id, settings.db_retry_seconds) as number:
        if deliveries.given_up(number, settings.job_max_attempts):
            values = dict(status="failed", error=deliveries.lost_message("its inspection", number, model.error))
        else:
            try:
                values = _inspect(store, settings, model)
            except StorageUnavailable as e:
                with session_scope(session_factory) as session:  # still pending: say why it waits
                    session.execute(update(Model).where(Model.id == model_id, Model.status == "pending")
                                    .values(error=f"file: the store is unavailable ({e}); inspection will be retried"))
                raise
        with session_scope(session_factory) as session:
            session.execute(update(Model).where(Model.id == model_id, Model.status == "pending").values(**values))
            return session.get(Model, model_id, populate_existing=True).status


def _inspect(store, settings, model: Model) -> dict:
    """The model's new columns: ready with its layers, or failed with the reason."""
    path = None
    try:
        path = retry_call(lambda: fetch(store, model.object_key, cache_dir(settings.data_dir), model.sha256),
                          budget_s=settings.storage_retry_seconds, errors=STORE_ERRORS,
                          what=f"model {model.id}: fetch")
        found = inspect_file(path, model.architecture or None, model.config or None)
        return dict(status="ready", architecture=found.architecture, config=found.config, layers=found.layers,
                    error=None)
    except StorageUnavailable:
        raise
    except ObjectNotFound:
        return dict(status="failed", error=f"file: no object at {model.object_key} (the upload is missing)")
    except ChecksumMismatch as e:
        return dict(status="failed", error=f"file: {e}")
    except ModelRefused as e:
        error = str(e)
    except Exception as e:  # the tenant's config runs the architecture's code: any error is theirs to see
        log.warning("model %s: inspection raised", model.id, exc_info=True)
        error = f"config: the checkpoint cannot be built or inspected with it ({type(e).__name__}: {e})"
    if path is not None:
        path.unlink(missing_ok=True)  # keep no refused file in the cache
    return dict(status="failed", error=error)


@shared_task(bind=True, name="workers.models.inspect_model")
def inspect_model(self, model_id: str) -> None:
    """Validate an uploaded checkpoint and list its editable layers. Queue ``cpu``."""
    process_model(self.app.session_factory, self.app.store, self.app.settings, model_id)


# --- registering local files ----------------------------------------------------------------

def register_model_file(session_factory, store, path, *, tenant_id: str | None = None, name: str,
                        architecture: str | None = None, config: dict | None = None,
                        segmenter_path=None) -> str:
    """Register a checkpoint on this machine as a ready model; its id.

    The file is inspected, then streamed into the store under its content key (and the
    segmenter, if any, likewise). Idempotent by (tenant, sha256): a file registered
    before returns the existing model's id. ``tenant_id`` None shares it with every tenant.
    Raises ``ModelRefused`` for a checkpoint that cannot be used.
    """
    sha256 = file_sha256(path)
    with session_scope(session_factory) as session:
        existing = session.scalars(select(Model).where(
            Model.tenant_id.is_(None) if tenant_id is None else Model.tenant_id == tenant_id,
            Model.sha256 == sha256, Model.status == "ready").order_by(Model.created_at).limit(1)).first()
    if existing is not None:
        # The row may outlive its objects (a store wiped or replaced): put them back.
        # Keys are content-addressed, so the same bytes land at the keys the row names.
        if not store.exists(existing.object_key):
            put_file(session_factory, store, path, tenant_id, "models", "model.safetensors",
                     "application/octet-stream")
        if segmenter_path is not None and not (existing.segmenter_object_key
                                               and store.exists(existing.segmenter_object_key)):
            # lost from the store, or registered before a segmenter existed: (re)attach it
            segmenter = inspect_file(segmenter_path, generator=False)
            key = put_file(session_factory, store, segmenter_path, tenant_id, "segmenters",
                           "segmenter.safetensors", "application/octet-stream").key
            with session_scope(session_factory) as session:
                session.execute(update(Model).where(Model.id == existing.id).values(
                    segmenter_object_key=key, segmenter_architecture=segmenter.architecture))
        return existing.id
    found = inspect_file(path, architecture, config)
    stored = put_file(session_factory, store, path, tenant_id, "models", "model.safetensors",
                      "application/octet-stream")
    segmenter_key = segmenter_architecture = None
    if segmenter_path is not None:
        segmenter = inspect_file(segmenter_path, generator=False)
        segmenter_key = put_file(session_factory, store, segmenter_path, tenant_id, "segmenters",
                                 "segmenter.safetensors", "application/octet-stream").key
        segmenter_architecture = segmenter.architecture
    with session_scope(session_factory) as session:
        model = Model(tenant_id=tenant_id, name=name, architecture=found.architecture, config=found.config,
                      sha256=stored.sha256, size=stored.size, object_key=stored.key, layers=found.layers,
                      segmenter_object_key=segmenter_key, segmenter_architecture=segmenter_architecture,
                      status="ready")
        session.add(model)
        session.flush()
        return model.id


def register_demo(session_factory, store) -> str:
    """Register the bundled demo generator (and its segmenter, when trained) for every tenant."""
    from demo.artifacts import GENERATOR_PATH, SEGMENTER_PATH

    if not GENERATOR_PATH.exists():
        raise FileNotFoundError(f"{GENERATOR_PATH} is missing: the demo generator has not been trained yet")
    return register_model_file(session_factory, store, GENERATOR_PATH, name="demo",
                               segmenter_path=SEGMENTER_PATH if SEGMENTER_PATH.exists() else None)
