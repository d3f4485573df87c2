import pytest
import torch

from rewriting.checkpoint import file_sha256, load_state, save_model
from rewriting.delta import EditDelta, applied, apply_deltas, coefficients, expand, materialize, remove_delta
from rewriting.errors import CheckpointError, IncompatibleError
from rewriting.insert import InsertConfig, insert
from rewriting.layers import Trace, sample_inputs, target_weight
from tests.engine.tiny_models import build

BASE = "0" * 64


def random_delta(model, layer, rank=1, seed=0, base=BASE):
    g = torch.Generator().manual_seed(seed)
    t = target_weight(model, layer)
    shape = list(t.weight.shape)
    c = shape[t.in_dim]
    shape[t.in_dim] = rank
    q, _ = torch.linalg.qr(torch.randn(c, rank, generator=g))
    return EditDelta(layer=layer, param=t.param, base_sha256=base, lam=torch.randn(shape, generator=g) * 0.3,
                     directions=q.T.contiguous(), config={"seed": seed}, in_dim=t.in_dim)


def test_expand_and_coefficients_are_inverse_on_the_span():
    q, _ = torch.linalg.qr(torch.randn(6, 2, dtype=torch.float64))
    d = q.T
    lam = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    assert torch.allclose(coefficients(expand(lam, d, 1), d, 1), lam)
    lam0 = torch.randn(2, 4, 3, 3, dtype=torch.float64)  # ConvTranspose2d: r on dim 0
    assert expand(lam0, d, 0).shape == (6, 4, 3, 3)


def test_delta_from_a_real_edit_round_trips_in_a_few_kb(tmp_path):
    model = build("equalized")
    with Trace(model, "layer2") as tr:
        model(sample_inputs(model, [0]))
    result = insert(model, "layer2", tr.inputs, tr.output * 1.1, torch.randn(1, 8), InsertConfig(steps=20))
    delta = result.delta("ab" * 32, config={"why": "test"})
    path = tmp_path / "d.safetensors"
    delta.save(path)
    assert path.stat().st_size < 4096
    back = EditDelta.load(path)
    assert back.layer == "layer2" and back.param == "layer2.conv.weight" and back.base_sha256 == "ab" * 32
    assert torch.equal(back.lam, delta.lam) and torch.equal(back.directions, delta.directions)
    assert back.config == {"why": "test"} and back.in_dim == 1 and back.sha256 == delta.sha256


def test_corrupt_delta_is_refused(tmp_path):
    with pytest.raises(CheckpointError):
        EditDelta.from_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CheckpointError):
        EditDelta.from_bytes(b"nonsense")


def test_apply_changes_only_the_layer_by_a_rank_r_update():
    model = build("plain")
    state = model.state_dict()
    delta = random_delta(model, "deconv", rank=2)
    out = apply_deltas(state, [delta])
    for k in state:
        assert (k == "deconv.weight") != torch.equal(out[k], state[k])
    change = (out["deconv.weight"] - state["deconv.weight"]).double()
    assert torch.allclose(change, delta.update(), atol=1e-6)
    # rank 2 up to the float32 rounding of the stored weight
    assert torch.linalg.matrix_rank(change.movedim(0, -1).reshape(-1, 8), rtol=1e-5) == 2


def test_compose_in_order_and_remove_by_rebuilding():
    model = build("equalized")
    base = model.state_dict()
    d1, d2, d3 = (random_delta(model, layer, seed=s) for s, layer in enumerate(["layer2", "layer2", "layer3"]))
    chain = apply_deltas(base, [d1, d2, d3])
    without = remove_delta(base, [d1, d2, d3], 1)
    rebuilt = apply_deltas(base, [d1, d3])
    assert all(torch.equal(without[k], rebuilt[k]) for k in base)  # bit for bit
    assert not torch.equal(without["layer2.conv.weight"], chain["layer2.conv.weight"])
    # subtracting instead would leave float32 rounding residue somewhere: this is why we rebuild
    subtracted = (chain["layer2.conv.weight"].double() - d2.update()).float()
    assert torch.allclose(subtracted, rebuilt["layer2.conv.weight"], atol=1e-5)
    assert not torch.equal(subtracted, rebuilt["layer2.conv.weight"])


def test_base_mismatch_and_shape_mismatch_are_refused():
    model = build("equalized")
    state = model.state_dict()
    with pytest.raises(IncompatibleError):
        apply_deltas(state, [random_delta(model, "layer2", base="1" * 64)], base_sha256=BASE)
    other = random_delta(build("equalized", channels=4), "layer2")
    with pytest.raises(IncompatibleError):
        apply_deltas(state, [other])
    gone = random_delta(model, "layer2")
    gone.param = "nope.weight"
    with pytest.raises(IncompatibleError):
        apply_deltas(state, [gone])


def test_applied_context_restores_exactly_even_on_error():
    model = build("equalized")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    z = sample_inputs(model, [0])
    delta = random_delta(model, "layer2")
    plain = model(z)
    with pytest.raises(RuntimeError):
        with applied(model, [delta]):
            edited = model(z)
            raise RuntimeError("boom")
    assert not torch.equal(edited, plain)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_materialized_checkpoint_differs_only_in_the_layer(tmp_path):
    model = build("equalized")
    base_path = tmp_path / "base.safetensors"
    save_model(model, base_path, "tiny-equalized", {})
    sha = file_sha256(base_path)
    delta = random_delta(model, "layer3", base=sha)
    out_path = tmp_path / "edited.safetensors"
    out_sha = materialize(base_path, [delta], out_path)
    assert out_sha == file_sha256(out_path)
    base, _ = load_state(base_path)
    edited, meta = load_state(out_path)
    assert [k for k in base if not torch.equal(base[k], edited[k])] == ["layer3.conv.weight"]
    assert meta["base_sha256"] == sha and delta.sha256 in meta["edits"]
    with applied(model, [delta]):
        assert torch.equal(model.layer3.conv.weight, edited["layer3.conv.weight"])
    with pytest.raises(IncompatibleError):
        materialize(base_path, [random_delta(model, "layer3")], tmp_path / "x.safetensors")
