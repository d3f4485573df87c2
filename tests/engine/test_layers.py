import pytest
import torch
import torch.nn.functional as F

from rewriting.errors import UnknownLayer
from rewriting.layers import (Trace, editable_layers, effective_weight, flat_keys, get_module,
                              layer_forward, sample_inputs, target_weight)
from tests.engine.tiny_models import build


def test_get_module_error_lists_editable_layers():
    model = build("equalized")
    assert get_module(model, "layer2.conv") is model.layer2.conv
    with pytest.raises(LookupError) as e:
        get_module(model, "layer9")
    assert isinstance(e.value, UnknownLayer)
    assert "layer2" in str(e.value) and "layer2.conv" in str(e.value)


def test_block_resolves_to_its_unique_weight_module():
    model = build("equalized")
    t = target_weight(model, "layer2")
    assert t.param == "layer2.conv.weight" and t.local_param == "conv.weight"
    assert t.weight_module is model.layer2.conv and t.kind == "equalized_conv2d"
    assert t.gain == pytest.approx(1 / 72 ** 0.5)
    with pytest.raises(UnknownLayer):
        target_weight(model, "up1")  # no weight at all


@pytest.mark.parametrize("name, layer, kind, key, value, in_dim", [
    ("equalized", "layer2", "equalized_conv2d", (8, (8, 8)), (8, (8, 8)), 1),
    ("equalized", "fc", "equalized_linear", (16, None), (128, None), 1),
    ("plain", "fc", "linear", (16, None), (128, None), 1),
    ("plain", "deconv", "conv_transpose2d", (8, (4, 4)), (8, (8, 8)), 0),
    ("plain", "conv", "conv2d", (8, (8, 8)), (8, (8, 8)), 1),
    ("stylegan2", "layer2", "modulated_conv2d", (8, (8, 8)), (8, (8, 8)), 1),
    ("stylegan2", "layer1.conv", "modulated_conv2d", (8, (4, 4)), (8, (4, 4)), 1),
])
def test_editable_layers_shapes(name, layer, kind, key, value, in_dim):
    infos = {i.name: i for i in editable_layers(build(name))}
    info = infos[layer]
    assert info.kind == kind
    assert (info.key_channels, info.key_size) == key
    assert (info.value_channels, info.value_size) == value
    assert info.in_dim == in_dim


def test_stylegan2_block_owns_its_affine():
    names = {i.name for i in editable_layers(build("stylegan2"))}
    assert {"layer1", "layer1.conv", "layer2", "to_rgb"} <= names
    assert "mapping" not in names  # two weight modules: ambiguous
    assert target_weight(build("stylegan2"), "layer1").param == "layer1.conv.weight"


def test_trace_records_keys_inputs_and_output(device):
    model = build("equalized").to(device)
    z = sample_inputs(model, [0, 1])
    with Trace(model, "layer3") as tr:
        image = model(z)
    seen = {}
    h = model.layer3.register_forward_hook(lambda m, a, o: seen.update(x=a[0], y=o))
    try:
        model(z)
    finally:
        h.remove()
    assert torch.equal(tr.inputs[0], seen["x"]) and torch.equal(tr.keys, seen["x"])
    assert torch.equal(tr.output, seen["y"]) and image.shape == (2, 3, 16, 16)
    assert flat_keys(tr.keys).shape == (2 * 64, 8)


def test_trace_stop_skips_the_rendering_and_hooks_are_removed():
    model = build("equalized")
    calls = []
    h = model.layer4.register_forward_hook(lambda *a: calls.append(1))
    try:
        with Trace(model, "layer2", stop=True) as tr:
            model(sample_inputs(model))
        with Trace(model, "layer2", stop="keys") as tk:
            model(sample_inputs(model))
    finally:
        h.remove()
    assert calls == [] and tr.output is not None and tk.output is None and tk.keys is not None
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_trace_edit_output_renders_from_values_at_the_layer():
    model = build("equalized")
    z = sample_inputs(model, [0, 1])
    with torch.no_grad():
        plain = model(z)
        with Trace(model, "layer2", edit_output=lambda out: out) as same:
            again = model(z)
        with Trace(model, "layer2") as tr:
            model(z)
        value = tr.output.flip(0)  # each image drawn from the other's values at layer2
        with Trace(model, "layer2", edit_output=lambda out: value) as swapped:
            drawn = model(z)
    assert torch.equal(again, plain) and torch.equal(same.output, tr.output)
    assert torch.equal(swapped.output, value) and torch.allclose(drawn, plain.flip(0))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_trace_removes_hooks_on_error():
    model = build("equalized")
    with pytest.raises(RuntimeError):
        with Trace(model, "layer2"):
            model(torch.zeros(1, 5))  # wrong z_dim
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("name, layer", [
    ("equalized", "layer2"), ("equalized", "fc"), ("plain", "deconv"), ("plain", "conv"),
    ("plain", "fc"), ("stylegan2", "layer2"),
])
def test_layer_forward_replays_and_swaps_the_stored_weight(name, layer, device):
    model = build(name).to(device)
    t = target_weight(model, layer)
    with Trace(model, layer) as tr:
        model(sample_inputs(model, [0, 1]))
    assert torch.allclose(layer_forward(model, layer, tr.inputs, kwargs=tr.kwargs), tr.output)
    before = t.weight.detach().clone()
    new = (t.weight * 1.5).requires_grad_(True)
    out = layer_forward(model, layer, tr.inputs, weight=new, kwargs=tr.kwargs)
    out.sum().backward()
    assert new.grad is not None and t.weight.grad is None
    assert torch.equal(t.weight, before)  # the model's weight never changed
    with torch.no_grad():  # the same as really storing the new weight
        t.weight.copy_(new)
        expected = t.module(*tr.inputs, **tr.kwargs)
        t.weight.copy_(before)
    assert torch.allclose(out, expected, atol=1e-6)


def test_equalized_effective_weight_is_stored_times_gain():
    model = build("equalized")
    conv = model.layer2.conv
    x = torch.randn(2, 8, 8, 8)
    assert torch.allclose(conv(x), F.conv2d(x, effective_weight(conv), conv.bias, padding=1))


def test_modulated_keys_are_input_times_style():
    """Without demodulation the output is exactly conv(keys, gain * weight)."""
    model = build("stylegan2", demodulate=False)
    with Trace(model, "layer2.conv") as tr:
        model(sample_inputs(model, [0, 1, 2]))
    x, w = tr.inputs
    assert torch.allclose(tr.keys, x * model.layer2.conv.affine(w)[:, :, None, None])
    conv = model.layer2.conv
    assert torch.allclose(tr.output, F.conv2d(tr.keys, effective_weight(conv), padding=1), atol=1e-5)


def test_conv_transpose_keys_meet_weight_on_dim_0():
    model = build("plain")
    with Trace(model, "deconv") as tr:
        model(sample_inputs(model))
    t = target_weight(model, "deconv")
    assert t.in_dim == 0 and t.weight.shape[t.in_dim] == tr.keys.shape[1]
