"""run_edit end to end on a tiny equalized-lr generator, and the values it fits."""
from dataclasses import replace

import pytest
import torch

from rewriting.delta import apply_deltas
from rewriting.edit import EditParams, edit_targets, run_edit
from rewriting.errors import Cancelled, EditRequestError, IncompatibleError, UnknownLayer
from rewriting.layers import Trace, editable_layers, layer_forward, sample_inputs
from rewriting.metrics import constraint_loss
from rewriting.requests import parse_request
from rewriting.values import center, crop

from .edit_fixtures import LAYER, copy_request, engine_device, erase_request, tiny_generator, tiny_moment


@pytest.fixture(scope="module")
def model():
    return tiny_generator().to(engine_device())


@pytest.fixture(scope="module")
def moment(model):
    return tiny_moment(model)


@pytest.fixture(scope="module")
def info(model):
    return {i.name: i for i in editable_layers(model)}[LAYER]


def test_copy_targets_shapes_and_paste_centre(model, moment, info):
    request = parse_request(copy_request())
    t = edit_targets(model, info, request, moment)
    # copy box = top-left 4x4 of the 8x8 map, pasted centred on the bottom-right 4x4.
    assert t.values.shape == (1, 8, 4, 4)
    assert t.value_bounds == (4, 4, 8, 8)
    assert t.inputs[0].shape == (1, 8, 4, 4) and t.output_crop is None
    # with a halo the keys keep one more cell for the 3x3 kernel, cut off by the map's edge
    halo = edit_targets(model, info, parse_request(copy_request(halo=True)), moment)
    assert halo.inputs[0].shape == (1, 8, 5, 5) and halo.output_crop == (1, 1, 5, 5)
    assert torch.equal(halo.values, t.values)
    tb, lb, bb, rb = t.value_bounds
    assert ((tb + bb) // 2, (lb + rb) // 2) == (6, 6)
    # context: 16 cells of seed 2 and 16 of seed 3
    assert t.context_keys.shape == (32, 8) and t.context_weights.shape == (32,)
    # the pasted values are the object's values (hard box: alpha 1 everywhere)
    with torch.no_grad(), Trace(model, LAYER, stop=True) as tr:
        model(sample_inputs(model, [1]))
    assert torch.allclose(t.values, tr.output[:, :, :4, :4])


def test_the_crop_sees_true_neighbours(model, moment, info):
    """With a halo, the layer's output over the crop is the whole map's, bit for bit
    (zero padding at the crop's edge changes the border cells: the test would fail without it)."""
    request = parse_request(copy_request(alpha_area=False, halo=True)
                            | {"paste": {"seed": 2, "mask": [0.25, 0.25, 0.75, 0.75]}})
    t = edit_targets(model, info, request, moment)
    assert t.value_bounds == (2, 2, 6, 6) and t.inputs[0].shape == (1, 8, 6, 6) and t.output_crop == (1, 1, 5, 5)
    with torch.no_grad(), Trace(model, LAYER, stop=True) as tr:
        model(sample_inputs(model, [2]))
    with torch.no_grad():
        on_crop = layer_forward(model, LAYER, t.inputs, kwargs=t.kwargs)
    assert torch.equal(on_crop[:, :, 1:5, 1:5], tr.output[:, :, 2:6, 2:6])
    alone = edit_targets(model, info, replace(request, params=replace(request.params, halo=False)), moment)
    with torch.no_grad():
        assert not torch.allclose(layer_forward(model, LAYER, alone.inputs, kwargs=alone.kwargs),
                                  tr.output[:, :, 2:6, 2:6])


def test_paste_lands_at_paste_region_centre_when_sizes_differ(model, moment, info):
    request = parse_request({"copy": {"seed": 1, "mask": [0.0, 0.0, 0.25, 0.25]},  # 2x2 object
                             "paste": {"seed": 2, "mask": [0.25, 0.5, 1.0, 1.0]},  # rows 4..8, cols 2..8
                             "params": {"tight_paste": True}})
    t = edit_targets(model, info, request, moment)
    assert t.values.shape == (1, 8, 2, 2)
    paste_mask = torch.zeros(8, 8)
    paste_mask[4:8, 2:8] = 1
    tb, lb, bb, rb = t.value_bounds
    assert ((tb + bb) // 2, (lb + rb) // 2) == center(paste_mask) == (6, 5)


def test_whole_map_without_tight_paste(model, moment, info):
    request = parse_request(copy_request(tight_paste=False))
    t = edit_targets(model, info, request, moment)
    assert t.values.shape == (1, 8, 8, 8) and t.value_bounds is None


def test_erase_targets(model, moment, info):
    request = parse_request(erase_request())
    t = edit_targets(model, info, request, moment)
    assert len(t.erased_units) == 3 and len(set(t.erased_units)) == 3
    assert t.values.shape == (1, 8, 4, 4) and t.value_bounds == (2, 2, 6, 6)
    with torch.no_grad():
        before = crop(model.layer3(t.inputs[0]), t.output_crop)
    assert not torch.allclose(before, t.values)  # erasing changes the target


def test_run_edit_lowers_constraint_loss_and_changes_only_the_target(model, moment):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    phases = []
    result = run_edit(model, LAYER, copy_request(), moment, base_sha256="ab" * 32,
                      progress=lambda phase, step, loss: phases.append((phase, step, loss)))
    assert result.constraint_loss < 0.5 * result.initial_loss
    assert result.steps >= 1 and len(result.losses) == result.steps
    # the model itself is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    delta = result.delta
    assert delta.layer == LAYER and delta.param == "layer3.conv.weight"
    assert delta.base_sha256 == "ab" * 32 and delta.rank == 1
    assert delta.config["constraint_loss"] == pytest.approx(result.constraint_loss)
    edited = apply_deltas(before, [delta])
    changed = [k for k in before if not torch.equal(before[k], edited[k])]
    assert changed == ["layer3.conv.weight"]
    # the change is rank one along the input channels
    update = (edited["layer3.conv.weight"].cpu() - before["layer3.conv.weight"].cpu()).permute(0, 2, 3, 1).reshape(-1, 8)
    assert torch.linalg.matrix_rank(update.double(), rtol=1e-6).item() == 1
    # the edited weight reproduces the reported loss at the pasted keys
    model.load_state_dict(edited)
    try:
        t = result.targets
        assert constraint_loss(model, LAYER, t.inputs, t.values, output_crop=t.output_crop) == pytest.approx(
            result.constraint_loss, rel=1e-4)
    finally:
        model.load_state_dict(before)
    assert [p for p, _, _ in phases[:3]] == ["values", "directions", "insert"]
    assert phases[-1][0] == "done"
    assert sum(1 for p, _, loss in phases if p == "insert" and loss is not None) == result.steps


def test_run_edit_erase_and_rank_two(model, moment):
    result = run_edit(model, LAYER, erase_request(rank=2, method="projected"), moment)
    assert result.delta.rank == 2
    assert result.constraint_loss < result.initial_loss


def test_should_stop_cancels(model, moment):
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > 5

    with pytest.raises(Cancelled):
        run_edit(model, LAYER, copy_request(), moment, should_stop=should_stop)


@pytest.mark.parametrize(
    "layer, request_obj, error, field",
    [
        ("layer9", copy_request(), UnknownLayer, "layer"),
        (LAYER, copy_request(rank=17), EditRequestError, "params.rank"),  # 32 keys, 8 channels
        (LAYER, {**copy_request(), "context": [{"seed": 3, "mask": [0, 0, 0.125, 0.125]}],
                 "params": {"rank": 2}}, EditRequestError, "params.rank"),  # one key
        (LAYER, {**copy_request(), "layer": "layer2"}, EditRequestError, "layer"),
    ],
)
def test_run_edit_rejects(model, moment, layer, request_obj, error, field):
    with pytest.raises(error) as info:
        run_edit(model, layer, request_obj, moment)
    assert info.value.field == field
    if error is UnknownLayer:
        assert "layer1" in str(info.value) and "layer4" in str(info.value)


def test_statistic_of_another_layer_is_refused(model):
    other = tiny_moment(model, "layer2", seeds="0-3")
    with pytest.raises(IncompatibleError):
        run_edit(model, LAYER, copy_request(), other)


def test_params_override_the_request(model, moment):
    result = run_edit(model, LAYER, copy_request(), moment, params=EditParams(steps=3, plateau_patience=0))
    assert result.steps == 3 and result.delta.config["params"]["steps"] == 3


def test_run_edit_accepts_the_original_app_format(model, moment):
    import base64
    import io

    import numpy as np
    from PIL import Image

    def url(x0, y0, x1, y1):  # a 256x256 white-on-transparent stroke, as the app saves
        a = np.zeros((256, 256, 4), np.uint8)
        a[y0:y1, x0:x1] = 255
        buf = io.BytesIO()
        Image.fromarray(a, mode="RGBA").save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    original = {"object": [1, url(0, 0, 128, 128)], "paste": [2, url(128, 128, 256, 256)],
                "key": [[2, url(128, 128, 256, 256)], [3, url(64, 64, 192, 192)]]}
    boxes = copy_request()
    a = run_edit(model, LAYER, original, moment, params=EditParams(steps=20, plateau_patience=0))
    b = run_edit(model, LAYER, boxes, moment, params=EditParams(steps=20, plateau_patience=0))
    # the same regions as copy_request(): the same targets and the same edit
    assert torch.equal(a.targets.values, b.targets.values)
    assert torch.allclose(a.delta.lam, b.delta.lam, atol=1e-6)
    assert torch.allclose(a.delta.directions, b.delta.directions, atol=1e-6)


def test_request_choices_and_defaults_agree_with_the_math_core():
    # requests.py keeps torch-free copies of these; they must not drift.
    from rewriting import directions, insert, requests
    from rewriting.insert import InsertConfig

    assert requests.INSERT_METHODS == insert.METHODS
    assert requests.KEY_METHODS == directions.KEY_METHODS
    assert requests.PARAM_CHOICES["loss"] == insert.LOSSES
    assert requests.PARAM_CHOICES["lr_scale"] == insert.LR_SCALES
    defaults = EditParams()
    for name, value in InsertConfig().as_dict().items():
        assert getattr(defaults, name) == value, name


def test_closed_form_edits_the_weight_module_with_the_blocks_statistic(model, moment):
    """layer3.conv has layer3's keys, so layer3's statistic serves it; the solve is exact at
    the pasted keys (more unknowns than constraints), in pre-activation values."""
    result = run_edit(model, LAYER + ".conv", copy_request(method="closed_form", rank=2, loss="mse", halo=True),
                      moment)
    assert result.steps == 0 and result.delta.param == "layer3.conv.weight"
    assert result.constraint_loss < 1e-6 * result.initial_loss
    # rank "full": every key direction, the least change in the C metric; exact at the paste
    full = run_edit(model, LAYER + ".conv", copy_request(method="closed_form", rank="full", loss="mse"), moment)
    assert full.delta.rank == 8 and full.constraint_loss < 1e-6 * full.initial_loss
    with pytest.raises(EditRequestError) as e:  # the block's output is not linear in its weight
        run_edit(model, LAYER, copy_request(method="closed_form"), moment)
    assert e.value.field == "params.method" and "'layer3.conv'" in e.value.message
