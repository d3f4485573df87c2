"""Edit requests: which images, which regions, which hyperparameters.

Two JSON formats are accepted (docs/requests.md):

- the native format, naming images by seed:
  ``{"operation": "copy", "copy": {"seed": 11, "mask": [x0, y0, x1, y1]},
  "paste": {"seed": 7, "mask": "data:image/png;base64,..."}, "context": [...],
  "params": {"rank": 1}}``
- the original rewriting app's saved request, unchanged:
  ``{"object": [imgnum, mask], "paste": [imgnum, mask], "key": [[imgnum, mask], ...]}``
  where ``imgnum`` is read as a seed.

A mask is a normalized box ``[x0, y0, x1, y1]`` (x across, y down, in [0, 1]) or a
PNG data URL; ``mask_at(mask, (h, w))`` renders it at any resolution as the fraction
of each cell that the mask covers.

This module uses numpy and PIL only (no torch), so a web front end can validate a
request before queueing it.
"""
import base64
import binascii
import io
import math
import re
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
from PIL import Image

from rewriting.errors import EditRequestError, UnknownLayer

OPERATIONS = ("copy", "erase")
# Copies of rewriting.insert.METHODS and rewriting.directions.KEY_METHODS, kept here so
# that this module needs no torch (tests/engine/test_edit.py checks they agree).
INSERT_METHODS = ("projected", "lambda", "closed_form")
KEY_METHODS = ("zca", "svd", "mean")
MAX_SEED = 2**63 - 1
MAX_MASK_PIXELS = 4096 * 4096  # refuse decompression bombs in mask PNGs
PNG_URL = re.compile(r"^data:image/png;base64,", re.IGNORECASE)


@dataclass(frozen=True)
class EditParams:
    """Hyperparameters of one edit; the defaults follow the paper's code.

    The insert fields mirror ``rewriting.insert.InsertConfig`` (see there).
    """

    # Rank of the update: the number of context directions, or "full": every key direction
    # (the layer unconstrained along its inputs; with closed_form, the paper's constrained
    # least squares at the pasted keys, the least change in the C metric).
    rank: int | str = 1
    lr: float = 0.05  # Adam step size of the insert optimization
    steps: int = 2001  # maximum optimization steps (the plateau stop may end sooner)
    # Insert method (rewriting.insert). "lambda" optimizes W0 + Lambda D^T directly, the
    # paper's equation; on the demo generator the original code's "projected" loses
    # nearly all progress at each projection (dome->spire at layer4: constraint loss
    # 0.68 -> 0.68 projected, 0.68 -> 0.24 lambda).
    method: str = "lambda"
    key_method: str = "zca"  # how context directions are found, see rewriting.directions
    projection_interval: int = 10  # projected method: project onto the context every N steps
    drank: int = 30  # erase: number of most salient key units zeroed
    tight_paste: bool = True  # optimize over the tight crop around the paste (else the whole map)
    # Tight crop: keep the kernel's reach of neighbouring keys around it and fit only the
    # output over the crop, so its border cells see their true neighbours (false: the crop
    # is run alone, its border seen through the layer's padding, as the original code does).
    halo: bool = False
    alpha_area: bool = True  # composite the copied value by its soft mask (else its bounding box)
    loss: str = "l1"  # insert loss between the layer's output and the target values
    lr_scale: str = "weight_rms"  # multiply lr by the weight's RMS ("none": raw lr)
    plateau_patience: int = 200  # stop after this many steps without improvement; 0: never
    plateau_tolerance: float = 1e-3  # relative improvement that counts as progress

    def to_json(self) -> dict:
        return asdict(self)


FULL_RANK = "full"  # EditParams.rank: every key direction

# Allowed values: choices for strings, (low, high, low inclusive) ranges for numbers.
PARAM_CHOICES = {
    "method": INSERT_METHODS,
    "key_method": KEY_METHODS,
    "loss": ("l1", "mse"),  # rewriting.insert.LOSSES
    "lr_scale": ("weight_rms", "none"),  # rewriting.insert.LR_SCALES
}
PARAM_RANGES = {
    "rank": (1, 100_000, True),
    "lr": (0.0, 100.0, False),
    "steps": (1, 1_000_000, True),
    "projection_interval": (1, 1_000_000, True),
    "drank": (1, 100_000, True),
    "plateau_patience": (0, 1_000_000, True),
    "plateau_tolerance": (0.0, 0.999999, True),
}


@dataclass(frozen=True, eq=False)
class Mask:
    """A region: either ``box`` (normalized x0, y0, x1, y1) or ``image`` (float [H, W] in [0, 1])."""

    box: tuple | None = None
    image: np.ndarray | None = None
    url: str | None = None  # the data URL ``image`` was decoded from, kept for round trips

    def __eq__(self, other):
        return isinstance(other, Mask) and (self.box, self.url) == (other.box, other.url)

    def __hash__(self):
        return hash((self.box, self.url))

    def to_json(self):
        return list(self.box) if self.box is not None else self.url


@dataclass(frozen=True)
class Region:
    """A masked region of the image generated from ``seed``; ``field`` names it in errors."""

    seed: int
    mask: Mask
    field: str

    def to_json(self) -> dict:
        return {"seed": self.seed, "mask": self.mask.to_json()}


@dataclass(frozen=True)
class EditRequest:
    """A parsed edit. ``copy`` is None for an erase; ``context`` defaults to the paste region."""

    operation: str
    paste: Region
    context: tuple
    copy: Region | None = None
    layer: str | None = None
    params: EditParams = EditParams()

    @property
    def seeds(self) -> set:
        """Every seed the edit looks at (held-out evaluation must avoid them)."""
        regions = [self.paste, *self.context] + ([self.copy] if self.copy else [])
        return {r.seed for r in regions}

    def to_json(self) -> dict:
        """The request in the native format (parse_request(r.to_json()) == r)."""
        out = {"operation": self.operation}
        if self.copy is not None:
            out["copy"] = self.copy.to_json()
        out["paste"] = self.paste.to_json()
        out["context"] = [r.to_json() for r in self.context]
        if self.layer is not None:
            out["layer"] = self.layer
        out["params"] = self.params.to_json()
        return out


def parse_request(obj, params=None) -> EditRequest:
    """Parse a request in either format (a dict, as from json.load).

    ``params``, if given, is a dict of hyperparameters overriding the request's own.
    Raises EditRequestError naming the offending field.
    """
    if not isinstance(obj, dict):
        raise EditRequestError("request", "must be a JSON object")
    if "object" in obj or isinstance(obj.get("paste"), (list, tuple)):
        request = _parse_original(obj)
    else:
        request = _parse_native(obj)
    if params:
        merged = {**request.params.to_json(), **params}
        request = replace(request, params=parse_params(merged))
    return request


def _parse_native(obj) -> EditRequest:
    known = {"version", "operation", "copy", "paste", "context", "layer", "params"}
    for key in obj:
        if key not in known:
            raise EditRequestError(key, f"unknown field; expected one of {sorted(known)}")
    if obj.get("version", 1) != 1:
        raise EditRequestError("version", "only version 1 is supported")
    operation = obj.get("operation", "copy")
    if operation not in OPERATIONS:
        raise EditRequestError("operation", f"must be one of {list(OPERATIONS)}, not {operation!r}")
    if "paste" not in obj:
        raise EditRequestError("paste", "is required")
    paste = _parse_region(obj["paste"], "paste")
    copy = None
    if operation == "copy":
        if "copy" not in obj:
            raise EditRequestError("copy", "is required for a copy edit")
        copy = _parse_region(obj["copy"], "copy")
    elif "copy" in obj:
        raise EditRequestError("copy", "an erase edit takes no copy region")
    context = obj.get("context")
    if context is None:
        context = (paste,)
    else:
        if not isinstance(context, list) or not context:
            raise EditRequestError("context", "must be a non-empty list of regions")
        context = tuple(_parse_region(r, f"context[{i}]") for i, r in enumerate(context))
    layer = obj.get("layer")
    if layer is not None and (not isinstance(layer, str) or not layer):
        raise EditRequestError("layer", "must be a layer name (a string)")
    return EditRequest(operation, paste, context, copy, layer, parse_params(obj.get("params", {})))


def _parse_original(obj) -> EditRequest:
    # Extra fields the app saves (e.g. "query") are ignored: the format is accepted as is.
    if "paste" not in obj:
        raise EditRequestError("paste", "is required")
    paste = _parse_pair(obj["paste"], "paste")
    copy = _parse_pair(obj["object"], "object") if "object" in obj else None
    keys = obj.get("key")
    if keys is None:
        context = (paste,)
    else:
        if not isinstance(keys, (list, tuple)) or not keys:
            raise EditRequestError("key", "must be a non-empty list of [imgnum, mask] pairs")
        context = tuple(_parse_pair(k, f"key[{i}]") for i, k in enumerate(keys))
    # The app's "erase" button used paste and key only; a request without an object is an erase.
    operation = "copy" if copy is not None else "erase"
    return EditRequest(operation, paste, context, copy)


def _parse_pair(pair, field) -> Region:
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
        raise EditRequestError(field, "must be a pair [imgnum, mask]")
    return Region(_parse_seed(pair[0], field + ".imgnum"), _parse_mask(pair[1], field + ".mask"), field)


def _parse_region(obj, field) -> Region:
    if not isinstance(obj, dict):
        raise EditRequestError(field, 'must be an object {"seed": ..., "mask": ...}')
    for key in obj:
        if key not in ("seed", "mask"):
            raise EditRequestError(f"{field}.{key}", "unknown field; expected seed and mask")
    for key in ("seed", "mask"):
        if key not in obj:
            raise EditRequestError(f"{field}.{key}", "is required")
    return Region(_parse_seed(obj["seed"], field + ".seed"), _parse_mask(obj["mask"], field + ".mask"), field)


def _parse_seed(value, field) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise EditRequestError(field, f"must be an integer seed in [0, {MAX_SEED}], not {value!r}")
    return value


def _parse_mask(value, field) -> Mask:
    if isinstance(value, str):
        image = _decode_png_url(value, field)
        if not (image > 0).any():
            raise EditRequestError(field, "mask is empty (no painted pixels)")
        return Mask(image=image, url=value)
    if isinstance(value, (list, tuple)):
        if len(value) != 4 or not all(_is_number(v) for v in value):
            raise EditRequestError(field, "a box mask must be four numbers [x0, y0, x1, y1]")
        box = tuple(float(v) for v in value)
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in box):
            raise EditRequestError(field, f"box coordinates must be finite and in [0, 1], not {list(value)}")
        x0, y0, x1, y1 = box
        if not (x0 < x1 and y0 < y1):
            raise EditRequestError(field, f"mask is empty (box {list(value)} has no area)")
        return Mask(box=box)
    raise EditRequestError(field, "must be a box [x0, y0, x1, y1] or a data:image/png;base64 URL")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _decode_png_url(url, field) -> np.ndarray:
    """Decode a PNG data URL to a float mask in [0, 1]: brightest colour channel times alpha."""
    if not PNG_URL.match(url):
        raise EditRequestError(field, "must be a data:image/png;base64, URL")
    try:
        data = base64.b64decode(PNG_URL.sub("", url), validate=True)
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "PNG":
                raise ValueError("not a PNG")
            if im.width * im.height > MAX_MASK_PIXELS:
                raise EditRequestError(field, f"mask image is too large ({im.width}x{im.height})")
            im = im.convert("RGBA")
            rgba = np.asarray(im, dtype=np.float32) / 255.0
    except EditRequestError:
        raise
    except (binascii.Error, ValueError, OSError, Image.DecompressionBombError) as e:
        raise EditRequestError(field, f"could not decode the PNG mask ({e})") from None
    # The app paints white on transparent; grey masks carry their value in the colour.
    return rgba[..., :3].max(axis=-1) * rgba[..., 3]


def mask_at(mask: Mask, size) -> np.ndarray:
    """Render ``mask`` as float32 [h, w] in [0, 1]: the fraction of each cell it covers.

    A box gives its exact area coverage; an image is area-averaged when shrinking
    (so a box and a PNG of that box agree) and bilinearly interpolated when growing.
    """
    h, w = size
    if mask.box is not None:
        x0, y0, x1, y1 = mask.box
        rows = _coverage(y0, y1, h)
        cols = _coverage(x0, x1, w)
        return np.outer(rows, cols).astype(np.float32)
    H, W = mask.image.shape
    if (H, W) == (h, w):
        return mask.image.astype(np.float32, copy=True)
    resample = Image.Resampling.BOX if (h <= H and w <= W) else Image.Resampling.BILINEAR
    im = Image.fromarray(mask.image.astype(np.float32), mode="F").resize((w, h), resample=resample)
    return np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)


def _coverage(lo, hi, n) -> np.ndarray:
    """Fraction of each of n equal cells of [0, 1] that lies inside [lo, hi]."""
    edges = np.arange(n + 1, dtype=np.float64) / n
    return np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0.0, None) * n


def parse_params(obj, field="params") -> EditParams:
    """Validate hyperparameters (a dict) against EditParams; unknown names are errors."""
    if not isinstance(obj, dict):
        raise EditRequestError(field, "must be a JSON object")
    types = {f.name: f.type for f in fields(EditParams)}
    values = {}
    for name, value in obj.items():
        where = f"{field}.{name}"
        if name not in types:
            raise EditRequestError(where, f"unknown parameter; expected one of {sorted(types)}")
        kind = types[name]
        if name == "rank":  # a count, or the word FULL_RANK
            if value == FULL_RANK:
                values[name] = value
                continue
            if not _is_number(value):
                raise EditRequestError(where, f"must be a positive integer or {FULL_RANK!r}, not {value!r}")
            kind = int
        if kind is bool:
            if not isinstance(value, bool):
                raise EditRequestError(where, f"must be true or false, not {value!r}")
        elif kind is str:
            if value not in PARAM_CHOICES[name]:
                raise EditRequestError(where, f"must be one of {list(PARAM_CHOICES[name])}, not {value!r}")
        else:
            if not _is_number(value):
                raise EditRequestError(where, f"must be a number, not {value!r}")
            if not math.isfinite(value):
                raise EditRequestError(where, f"must be finite, not {value}")
            if kind is int:
                if isinstance(value, float) and not value.is_integer():
                    raise EditRequestError(where, f"must be an integer, not {value!r}")
                value = int(value)
            else:
                value = float(value)
            low, high, inclusive = PARAM_RANGES[name]
            if value > high or value < low or (value == low and not inclusive):
                bound = f"at least {low}" if inclusive else f"above {low}"
                raise EditRequestError(where, f"must be {bound} and at most {high}, not {value}")
        values[name] = value
    return EditParams(**values)


def check_layer(name, valid_names) -> None:
    """Raise UnknownLayer (listing the valid names, field "layer") unless ``name`` is valid."""
    if name not in valid_names:
        error = UnknownLayer(name, valid_names)
        error.field = "layer"  # like EditRequestError, so callers can point at the field
        raise error


def count_keys(request: EditRequest, key_size) -> int:
    """Number of context key vectors (cells with mask > 0 at the key resolution)."""
    if key_size is None:  # a Linear layer: one key per context image
        return len(request.context)
    return int(sum((mask_at(r.mask, key_size) > 0).sum() for r in request.context))


def check_rank(request: EditRequest, key_size, key_channels) -> None:
    """The update's rank can exceed neither the number of context keys nor their dimension
    ("full" takes every key direction, whatever the context)."""
    rank = request.params.rank
    if rank == FULL_RANK:
        return
    keys = count_keys(request, key_size)
    if rank > keys:
        raise EditRequestError("params.rank", f"rank {rank} is above the number of context keys ({keys})")
    if rank > key_channels:
        raise EditRequestError("params.rank", f"rank {rank} is above the key dimension ({key_channels})")
