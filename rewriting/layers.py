"""Reach one layer of any torch generator by dotted name (baukit nethook style).

A *target layer* is a named module. Its *weight module* is the module itself if it
is a supported weight module, else its unique supported descendant (e.g. ``layer5``,
a block conv -> LeakyReLU -> PixelNorm, has weight module ``layer5.conv`` and weight
parameter ``layer5.conv.weight``). The model is split at the target by hooks, not by
copying or by requiring ``nn.Sequential``: the *context* is everything that runs
before the target, the *rendering* everything after it.

- *keys* are the per-location input vectors of the weight module, [N, C_in, H, W]
  (or [N, C_in] for a linear layer);
- *values* are the output of the target module.

Supported weight modules:

- ``nn.Conv2d``, ``nn.Linear``: weight [out, in, ...], input channels on dim 1.
- ``nn.ConvTranspose2d``: weight [in, out, kh, kw], input channels on dim 0.
- Equalized learning rate (ProGAN, StyleGAN): any module with a ``weight``
  parameter and a float attribute ``weight_gain``; its forward uses the effective
  weight ``weight * weight_gain`` (the stored weight is unit-scale).
- Modulated convolution (StyleGAN2): a module with a ``weight`` parameter
  [out, in, kh, kw], an optional ``weight_gain``, and a method
  ``input_styles(x, *rest) -> Tensor[N, in]`` that, called with the same arguments
  as ``forward``, returns the per-input-channel style ``s``. Its forward must compute
  ``conv(x, weight_gain * weight * s)`` (then optionally demodulate per output
  channel), which equals ``conv(x * s, weight_gain * weight)``: so its keys are
  ``x * s`` and the edited matrix is the shared ``weight_gain * weight``. One that
  does not demodulate may say so (``demodulate = False``): its output is then linear
  in the weight, and the closed form applies (``rewriting.insert.linear_in_weight``).

A custom module may set an int attribute ``in_channel_dim`` if its weight keeps
input channels elsewhere (e.g. 0 for an equalized transposed conv, 2 for a weight
stored as [1, out, in, kh, kw]).

Edits change the stored weight; the effective weight moves by ``weight_gain`` times
as much, along the same input-channel directions.
"""
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from rewriting.errors import UnknownLayer
from rewriting.seeds import latents


class StopForward(Exception):
    """Raised by a hook to end a forward pass early; swallowed by ``Trace``."""


def is_modulated(module):
    return callable(getattr(module, "input_styles", None)) and isinstance(
        getattr(module, "weight", None), nn.Parameter)


def is_weight_module(module):
    """True for the module types whose weight the engine can edit (see module doc)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        return True
    weight = getattr(module, "weight", None)
    return isinstance(weight, nn.Parameter) and weight.dim() in (2, 4, 5) and (
        hasattr(module, "weight_gain") or is_modulated(module))


def weight_gain(module):
    """The constant that the module's forward multiplies its stored weight by (1.0 if none)."""
    gain = getattr(module, "weight_gain", 1.0)
    return float(gain.item() if torch.is_tensor(gain) else gain)


def in_channel_dim(module):
    """The dimension of the stored weight that indexes input channels (key channels)."""
    default = 0 if isinstance(module, nn.ConvTranspose2d) else 1
    return int(getattr(module, "in_channel_dim", default))


def effective_weight(module):
    """The weight the module's forward actually uses (before any modulation)."""
    return module.weight * weight_gain(module)


def kind_of(module):
    if isinstance(module, nn.ConvTranspose2d):
        return "conv_transpose2d"
    if isinstance(module, nn.Conv2d) and not hasattr(module, "weight_gain"):
        return "conv2d"
    if isinstance(module, nn.Linear) and not hasattr(module, "weight_gain"):
        return "linear"
    if is_modulated(module):
        return "modulated_conv2d"
    return "equalized_linear" if module.weight.dim() == 2 else "equalized_conv2d"


@dataclass(frozen=True)
class TargetWeight:
    """Where a target layer's editable weight lives."""

    layer: str  # dotted name of the target module
    module: nn.Module  # the target module (its output is the value)
    weight_module: nn.Module  # the module holding the weight (its input is the key)
    param: str  # dotted name of the stored weight in the model, e.g. "layer5.conv.weight"
    local_param: str  # the same, relative to the target module, e.g. "conv.weight"
    kind: str  # see kind_of
    in_dim: int  # input-channel dimension of the stored weight
    gain: float  # effective weight = stored weight * gain

    @property
    def weight(self):
        return self.weight_module.weight


@dataclass(frozen=True)
class LayerInfo:
    """An editable layer and the shapes of its keys and values (sizes are (h, w) or None)."""

    name: str
    kind: str
    param: str
    key_channels: int
    key_size: tuple | None
    value_channels: int
    value_size: tuple | None
    in_dim: int = 1
    weight_shape: tuple = ()


def weight_modules_under(module, prefix=""):
    """(relative dotted name, module) of the supported weight modules in ``module``.

    The search does not descend into a weight module: a modulated conv's own style
    affine (itself an equalized linear) belongs to the conv, not beside it.
    """
    if is_weight_module(module):
        return [(prefix, module)]
    found = []
    for name, child in module.named_children():
        found.extend(weight_modules_under(child, f"{prefix}.{name}" if prefix else name))
    return found


def candidate_layers(model):
    """Names of modules that resolve to exactly one weight module (static, no forward)."""
    names = []
    for name, module in model.named_modules():
        if name and len(weight_modules_under(module)) == 1:
            names.append(name)
    return names


def get_module(model, name):
    """The submodule called ``name``; raises ``UnknownLayer`` (a LookupError) listing editable names."""
    for n, m in model.named_modules():
        if n == name:
            return m
    raise UnknownLayer(name, candidate_layers(model))


def target_weight(model, layer):
    """Resolve ``layer`` to its weight module and parameter; raises ``UnknownLayer``."""
    module = get_module(model, layer)
    found = weight_modules_under(module)
    if len(found) != 1:
        raise UnknownLayer(layer, candidate_layers(model))
    local, weight_module = found[0]
    local_param = f"{local}.weight" if local else "weight"
    return TargetWeight(layer=layer, module=module, weight_module=weight_module,
                        param=f"{layer}.{local_param}", local_param=local_param,
                        kind=kind_of(weight_module), in_dim=in_channel_dim(weight_module),
                        gain=weight_gain(weight_module))


def keys_from_input(weight_module, args, kwargs):
    """Per-location keys of a weight module from the arguments of its forward call."""
    x = args[0] if args else next(iter(kwargs.values()))
    if is_modulated(weight_module):
        styles = weight_module.input_styles(*args, **kwargs)
        x = x * styles.reshape(styles.shape + (1,) * (x.dim() - styles.dim()))
    if weight_module.weight.dim() == 2 and x.dim() > 2:
        x = x.reshape(-1, x.shape[-1])  # a linear layer over tokens: one key per token
    return x


def flat_keys(keys):
    """Keys as rows, [M, C]: [N, C, H, W] -> [N*H*W, C]; [N, C] unchanged."""
    if keys.dim() == 4:
        return keys.permute(0, 2, 3, 1).reshape(-1, keys.shape[1])
    return keys.reshape(-1, keys.shape[-1])


class Trace:
    """Record one target layer during a forward pass; hooks always removed on exit.

    After ``model(z)`` inside ``with Trace(model, layer) as tr:``, ``tr.inputs`` and
    ``tr.kwargs`` are the target module's arguments, ``tr.keys`` its weight module's
    keys and ``tr.output`` its output (all detached). ``stop=True`` ends the forward
    pass once the target has run; ``stop="keys"`` ends it as soon as the keys are
    known (the cheapest pass for statistics). The ``with`` block swallows the stop.

    ``edit_output=fn`` replaces the target's output by ``fn(output)`` for the rest of the
    pass (``tr.output`` is then the replacement): the rendering part of the split, which
    draws an image from values of one's choosing at the layer (a paste, say).
    """

    def __init__(self, model, layer, stop=False, edit_output=None):
        if stop not in (False, True, "keys"):
            raise ValueError("stop must be False, True or 'keys'")
        self.target = target_weight(model, layer)
        self.stop = stop
        self.edit_output = edit_output
        self.inputs = self.kwargs = self.keys = self.output = None
        module, weight_module = self.target.module, self.target.weight_module
        self.handles = [
            module.register_forward_pre_hook(self._record_inputs, with_kwargs=True),
            weight_module.register_forward_pre_hook(self._record_keys, with_kwargs=True),
            module.register_forward_hook(self._record_output),
        ]

    def _record_inputs(self, module, args, kwargs):
        self.inputs = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
        self.kwargs = {k: v.detach() if torch.is_tensor(v) else v for k, v in kwargs.items()}

    def _record_keys(self, module, args, kwargs):
        with torch.no_grad():
            self.keys = keys_from_input(module, args, kwargs).detach()
        if self.stop == "keys":
            raise StopForward()

    def _record_output(self, module, args, output):
        if self.edit_output is not None:
            output = self.edit_output(output)
        self.output = output.detach() if torch.is_tensor(output) else output
        if self.stop is True:
            raise StopForward()
        return output  # the forward pass goes on with it (unchanged without edit_output)

    def close(self):
        for h in reversed(self.handles):
            h.remove()
        self.handles = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)


def layer_forward(model, layer, inputs, weight=None, kwargs=None):
    """Run the target module alone on captured ``inputs`` (a tensor or tuple of args).

    ``weight`` optionally replaces the *stored* weight for this call only (a
    functional call: the model's parameter is neither changed nor given a grad), so
    gradients flow to ``weight``.
    """
    target = layer if isinstance(layer, TargetWeight) else target_weight(model, layer)
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    kwargs = kwargs or {}
    if weight is None:
        return target.module(*args, **kwargs)
    return functional_call(target.module, {target.local_param: weight}, args, kwargs)


def model_device(model):
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def model_dtype(model):
    p = next(model.parameters(), None)
    return p.dtype if p is not None else torch.float32


def sample_inputs(model, seeds=(0,)):
    """Latents for ``seeds`` on the model's device and dtype (the model must have ``z_dim``)."""
    z_dim = getattr(model, "z_dim", None)
    if not isinstance(z_dim, int):
        raise TypeError("the model needs an int attribute z_dim to draw latents from seeds")
    return latents(seeds, z_dim).to(device=model_device(model), dtype=model_dtype(model))


def _size(t):
    return tuple(t.shape[2:]) if t.dim() == 4 else None


def editable_layers(model, inputs=None):
    """Every editable layer with its key and value shapes, from one forward pass.

    ``inputs`` default to the seed-0 latent. Layers that the pass does not reach,
    or whose output is not a tensor, are left out.
    """
    if inputs is None:
        inputs = sample_inputs(model)
    names = candidate_layers(model)
    traces = []
    try:
        for name in names:
            traces.append(Trace(model, name))
        with torch.no_grad():
            model(inputs)
    finally:
        for tr in traces:
            tr.close()
    infos = []
    for tr in traces:
        t = tr.target
        if tr.keys is None or not torch.is_tensor(tr.output):
            continue
        infos.append(LayerInfo(
            name=t.layer, kind=t.kind, param=t.param,
            key_channels=int(tr.keys.shape[1] if tr.keys.dim() == 4 else tr.keys.shape[-1]),
            key_size=_size(tr.keys),
            value_channels=int(tr.output.shape[1]), value_size=_size(tr.output),
            in_dim=t.in_dim, weight_shape=tuple(t.weight.shape)))
    return infos
