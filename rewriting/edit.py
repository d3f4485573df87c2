"""One edit, start to finish: the single code path of the CLI and the workers.

``run_edit`` parses the request, reads keys and values of the target layer from
the images the request names (by seed), builds the target values (copy and paste,
or erase), finds the context directions, inserts the rule and returns the edit as
an ``EditDelta`` (the model itself is never modified).
"""
import hashlib
import json
import time
from dataclasses import dataclass, field, replace

import torch

from rewriting.delta import EditDelta
from rewriting.directions import directions_from_keys, masked_keys
from rewriting.errors import Cancelled, EditRequestError, IncompatibleError
from rewriting.insert import InsertConfig, InsertState, insert
from rewriting.layers import Trace, editable_layers, layer_forward, sample_inputs
from rewriting.requests import FULL_RANK, EditParams, EditRequest, check_layer, check_rank, mask_at, parse_request
from rewriting.values import (
    bounding_box,
    center,
    composite,
    copy_value,
    crop,
    crop_bounds,
    paste_value,
    salient_units,
    zero_units,
)

__all__ = ["EditParams", "EditResult", "EditTargets", "edit_targets", "fit_targets", "run_edit"]


@dataclass
class EditTargets:
    """What the insert step fits: the layer should map ``inputs`` to ``values``."""

    layer: str
    inputs: tuple  # the target layer's arguments over the optimized crop
    kwargs: dict
    values: torch.Tensor  # wanted layer output over the crop
    value_bounds: tuple | None  # (t, l, b, r) of the crop in the value map; None: the whole map
    context_keys: torch.Tensor  # [M, C_in] key rows under the context masks
    context_weights: torch.Tensor  # [M] their mask weights
    erased_units: list = field(default_factory=list)  # erase: the key units zeroed
    # (t, l, b, r) of ``values`` within the layer's output on ``inputs``; None: all of it.
    # The cropped inputs keep a halo of neighbouring keys, so that the output over the
    # crop is the one the whole map gives rather than one seen through zero padding.
    output_crop: tuple | None = None


@dataclass
class EditResult:
    delta: EditDelta
    constraint_loss: float  # insert loss at the pasted keys after the edit
    initial_loss: float  # the same before the edit
    steps: int
    stopped_early: bool
    seconds: float
    targets: EditTargets
    losses: list = field(default_factory=list)
    state: InsertState | None = None  # where the insert ended (None for closed_form)


class _Images:
    """Traces of the target layer on images named by seed, each computed once."""

    def __init__(self, model, layer):
        self.model, self.layer, self.traces = model, layer, {}

    def __getitem__(self, seed):
        if seed not in self.traces:
            with torch.no_grad(), Trace(self.model, self.layer, stop=True) as tr:
                self.model(sample_inputs(self.model, [seed]))
            self.traces[seed] = tr
        return self.traces[seed]


def _mask(region, size, like):
    return torch.from_numpy(mask_at(region.mask, size)).to(device=like.device, dtype=like.dtype)


def _crop_inputs(inputs, key_size, key_bounds):
    """Crop the tensor arguments laid out like the keys; others pass unchanged."""
    return tuple(crop(a, key_bounds) if torch.is_tensor(a) and a.dim() == 4 and tuple(a.shape[2:]) == key_size
                 else a for a in inputs)


def edit_targets(model, info, request, moment, params=None):
    """The inputs, target values and context keys of an edit on layer ``info`` (a LayerInfo)."""
    params = params or request.params
    images = _Images(model, info.name)
    if info.value_size is None or info.key_size is None:
        raise EditRequestError("layer", f"{info.name!r} has no spatial map; copy, paste and erase "
                               "need a convolutional layer")

    # Context keys: the key rows under each context mask, weighted by the mask.
    rows, weights, masks, keys = [], [], [], []
    for region in request.context:
        k = images[region.seed].keys
        m = _mask(region, info.key_size, k)
        r, w = masked_keys(k, m[None])
        rows.append(r)
        weights.append(w)
        masks.append(m)
        keys.append(k)
    context_keys, context_weights = torch.cat(rows), torch.cat(weights)

    host = images[request.paste.seed]
    paste_mask = _mask(request.paste, info.value_size, host.output)
    units = []
    if request.operation == "copy":
        obj = images[request.copy.seed]
        clip, clip_mask, _ = copy_value(obj.output, _mask(request.copy, info.value_size, obj.output))
        target, bounds = paste_value(host.output, clip, clip_mask if params.alpha_area else None,
                                     center(paste_mask))
    else:
        diag = torch.diagonal(moment.matrix if hasattr(moment, "matrix") else moment)
        units = salient_units(keys, masks, diag, params.drank).tolist()
        x = host.inputs[0]
        if x.shape[1] != info.key_channels:
            raise EditRequestError("operation", f"erase needs the first input of {info.name!r} to carry "
                                   f"its {info.key_channels} key channels")
        with torch.no_grad():
            erased = layer_forward(model, info.name, (zero_units(x, units), *host.inputs[1:]),
                                   kwargs=host.kwargs)
        target = composite(host.output, erased, paste_mask)
        bounds = bounding_box(paste_mask)

    inputs, values, value_bounds, output_crop = host.inputs, target, None, None
    croppable = tuple(host.inputs[0].shape[2:]) == info.key_size
    if params.tight_paste and croppable:
        key_bounds, value_bounds = crop_bounds(bounds, info.key_size, info.value_size)
        if params.halo:
            key_bounds, output_crop = _with_halo(key_bounds, info)
        inputs = _crop_inputs(host.inputs, info.key_size, key_bounds)
        values = crop(target, value_bounds)
    return EditTargets(layer=info.name, inputs=inputs, kwargs=host.kwargs, values=values.detach(),
                       value_bounds=value_bounds, context_keys=context_keys,
                       context_weights=context_weights, erased_units=units, output_crop=output_crop)


def _with_halo(key_bounds, info):
    """Widen a key crop by the kernel's reach (within the map) and say where the value crop
    lies in the layer's output on it. Only for layers whose keys and values share one grid
    (a stride-1 'same' convolution); others keep the plain crop and no output crop."""
    reach = info.weight_shape[-1] // 2 if len(info.weight_shape) == 4 else 0
    if info.key_size != info.value_size or reach == 0:
        return key_bounds, None
    t, l, b, r = key_bounds
    h, w = info.key_size
    wide = (max(t - reach, 0), max(l - reach, 0), min(b + reach, h), min(r + reach, w))
    return wide, (t - wide[0], l - wide[1], b - wide[0], r - wide[1])


def _params_field(error):
    """Errors from the math core name bare parameters ("rank"); point them into params."""
    names = {f for f in EditParams.__dataclass_fields__}
    if isinstance(error, EditRequestError) and error.field in names:
        return EditRequestError(f"params.{error.field}", error.message)
    return error


def insert_config(params):
    """The ``InsertConfig`` that an edit's ``EditParams`` ask for (``run_edit`` uses it; so
    do the benchmarks' controls, which must optimize exactly as the edit does)."""
    return InsertConfig(method=params.method, steps=params.steps, lr=params.lr,
                        projection_interval=params.projection_interval, lr_scale=params.lr_scale,
                        loss=params.loss, plateau_patience=params.plateau_patience,
                        plateau_tolerance=params.plateau_tolerance)


def fit_targets(model, targets, directions, config, moment, progress=None, should_stop=None, resume=None):
    """The insert step of an edit: the rule mapping ``targets`` (an ``EditTargets``) along
    ``directions``, compared over its output crop, with ``moment`` as closed_form's metric.
    ``run_edit`` uses it; so do the benchmarks' controls, which must fit as the edit does."""
    return insert(model, targets.layer, targets.inputs, targets.values, directions, config,
                  kwargs=targets.kwargs, progress=progress, should_stop=should_stop, moment=moment,
                  output_crop=targets.output_crop, resume=resume)


def run_edit(model, layer, request, moment, params=None, progress=None, should_stop=None, base_sha256="",
             resume=None):
    """Make one edit of ``model`` at ``layer`` and return it as an ``EditResult``.

    ``request``: an EditRequest or a JSON dict in either request format.
    ``layer``: the target layer name (None: the request's ``layer``).
    ``moment``: the layer keys' second moment (``SecondMoment``; see rewriting.statistics).
    ``params``: EditParams overriding the request's own.
    ``progress(phase, step, loss)``: phases "values", "directions", "insert" (step and
    loss of each optimization step) and "done"; loss is None outside "insert".
    ``should_stop()``: polled between phases and insert steps; raises ``Cancelled``, which
    carries the insert's ``InsertState`` once it has begun.
    ``resume``: an ``InsertState`` of the same edit to go on from (``rewriting.insert``);
    ``IncompatibleError`` if it does not fit.
    ``base_sha256``: the sha256 of the base checkpoint file, recorded in the delta.
    """
    start = time.perf_counter()
    if not isinstance(request, EditRequest):
        request = parse_request(request)
    params = params or request.params
    request = replace(request, params=params)
    if layer is None:
        layer = request.layer
    if layer is None:
        raise EditRequestError("layer", "no layer given")
    if request.layer is not None and request.layer != layer:
        raise EditRequestError("layer", f"the request names layer {request.layer!r} but the edit is of {layer!r}")
    infos = {info.name: info for info in editable_layers(model)}
    check_layer(layer, list(infos))
    info = infos[layer]
    check_rank(request, info.key_size, info.key_channels)
    channels = moment.channels if hasattr(moment, "channels") else moment.shape[0]
    if channels != info.key_channels:
        raise IncompatibleError(f"the statistic has {channels} channels; layer {layer!r} has "
                                f"{info.key_channels} key channels")
    # A block and its weight module (layer6, layer6.conv) share their keys, so their statistic.
    stat_layer = getattr(moment, "metadata", {}).get("layer")
    if stat_layer is not None and stat_layer != layer and (
            stat_layer not in infos or infos[stat_layer].param != info.param):
        raise IncompatibleError(f"the statistic is of layer {stat_layer!r}, not {layer!r}")

    def phase(name):
        if should_stop is not None and should_stop():
            raise Cancelled(f"edit cancelled before {name}")
        if progress is not None:
            progress(name, 0, None)

    try:
        phase("values")
        targets = edit_targets(model, info, request, moment, params)
        phase("directions")
        if params.rank == FULL_RANK:
            directions = torch.eye(info.key_channels, device=targets.context_keys.device)
        else:
            directions = directions_from_keys(targets.context_keys, targets.context_weights, moment,
                                              rank=params.rank, method=params.key_method, field="context")
        phase("insert")
        config = insert_config(params)
        report = None if progress is None else (lambda step, loss: progress("insert", step, loss))
        result = fit_targets(model, targets, directions, config, moment, progress=report, should_stop=should_stop,
                             resume=resume)
    except EditRequestError as e:
        raise _params_field(e) from e
    delta = result.delta(base_sha256, config={
        "operation": request.operation,
        "seeds": sorted(request.seeds),
        "request_sha256": request_sha256(request),
        "params": params.to_json(),
        "statistic": {k: getattr(moment, "metadata", {}).get(k) for k in ("seeds", "model_sha256")},
        "statistic_count": getattr(moment, "count", None),
        "initial_loss": result.initial_loss,
        "constraint_loss": result.loss,
        "steps": result.steps,
        "erased_units": targets.erased_units,
    })
    if progress is not None:
        progress("done", result.steps, result.loss)
    return EditResult(delta=delta, constraint_loss=result.loss, initial_loss=result.initial_loss,
                      steps=result.steps, stopped_early=result.stopped_early,
                      seconds=time.perf_counter() - start, targets=targets, losses=result.losses,
                      state=result.state)


def request_sha256(request):
    """A stable identity of the request (native JSON, sorted keys)."""
    return hashlib.sha256(json.dumps(request.to_json(), sort_keys=True).encode()).hexdigest()
