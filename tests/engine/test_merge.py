"""Merging edits of one layer: the union of their directions, the joint solve (lambda and
closed form), and each rule's loss merged next to its loss alone."""
from collections import OrderedDict

import pytest
import torch

from rewriting.delta import apply_deltas
from rewriting.edit import EditTargets, run_edit
from rewriting.errors import EditRequestError, IncompatibleError
from rewriting.insert import InsertConfig
from rewriting.layers import layer_forward
from rewriting.merge import Rule, merge_rules, union_basis
from rewriting.values import crop

from .edit_fixtures import LAYER, copy_request, engine_device, erase_request, tiny_generator, tiny_moment


@pytest.fixture(scope="module")
def model():
    return tiny_generator().to(engine_device())


@pytest.fixture(scope="module")
def moment(model):
    return tiny_moment(model)


def copy_between(source, target, **params):
    """Copy the top-left quarter of ``source`` into the bottom-right quarter of ``target``."""
    return {"operation": "copy", "copy": {"seed": source, "mask": [0.0, 0.0, 0.5, 0.5]},
            "paste": {"seed": target, "mask": [0.5, 0.5, 1.0, 1.0]},
            "context": [{"seed": target, "mask": [0.5, 0.5, 1.0, 1.0]}],
            "params": {"steps": 300, **params}}


@pytest.fixture(scope="module")
def edits(model, moment):
    """Three edits made alone, and the rules to merge them."""
    requests = [copy_between(1, 2), copy_between(5, 6), erase_request(steps=300)]
    results = [run_edit(model, LAYER, r, moment) for r in requests]
    rules = [Rule(r.targets, r.delta.directions, alone=r.delta, name=f"rule{i}") for i, r in enumerate(results)]
    return results, rules


def test_union_basis_is_orthonormal_and_spans_every_rule():
    torch.manual_seed(0)
    a, b = torch.linalg.qr(torch.randn(8, 2))[0].T, torch.linalg.qr(torch.randn(8, 3))[0].T
    q = union_basis([a, b, a[:1]])  # a's first row again adds nothing
    assert q.shape == (5, 8) and q.dtype == torch.float64
    assert torch.allclose(q @ q.T, torch.eye(5, dtype=torch.float64), atol=1e-12)
    for d in (a, b):  # every rule's directions lie in the union: projecting changes nothing
        d = d.double()
        assert torch.allclose(d @ q.T @ q, d, atol=1e-10)
    assert union_basis([torch.randn(20, 8)]).shape == (8, 8)  # never more than the channels


def test_union_basis_refuses_non_finite():
    with pytest.raises(EditRequestError, match="directions") as error:
        union_basis([torch.full((1, 8), float("nan"))])
    assert error.value.field == "rank"


def test_merged_rules_each_lower_their_loss_and_beat_the_deltas_stacked(model, edits):
    results, rules = edits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merge_rules(model, LAYER, rules, InsertConfig(steps=600), base_sha256="ab" * 32)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is untouched
    assert merged.rank == sum(r.delta.rank for r in results) and merged.delta.rank == merged.rank
    assert merged.delta.base_sha256 == "ab" * 32 and merged.delta.config["merge"] == ["rule0", "rule1", "rule2"]

    for loss, result in zip(merged.losses, results):
        assert loss.initial_loss == pytest.approx(result.initial_loss, rel=1e-5)
        assert loss.alone_loss == pytest.approx(result.constraint_loss, rel=1e-5)  # the rule's own edit
        assert loss.merged_loss < loss.initial_loss

    # stacking the separately made deltas, each ignoring the others, does worse on the
    # joint objective than solving them together
    t_param = results[0].delta.param
    stacked = apply_deltas({t_param: model.state_dict()[t_param]}, [r.delta for r in results])[t_param]
    from rewriting.insert import _loss_fn

    loss_fn = _loss_fn("l1")
    with torch.no_grad():
        stacked_loss = sum(loss_fn(crop(layer_forward(model, LAYER, r.targets.inputs, weight=stacked,
                                                      kwargs=r.targets.kwargs), r.targets.output_crop),
                                   r.targets.values).item()
                           for r in results) / len(results)
    assert merged.loss < stacked_loss
    assert merged.loss == pytest.approx(sum(x.merged_loss for x in merged.losses) / 3, rel=1e-5)

    report = merged.report()
    assert report["rules"] == 3 and [r["name"] for r in report["per_rule"]] == ["rule0", "rule1", "rule2"]
    assert set(report["per_rule"][0]) == {"name", "initial_loss", "alone_loss", "merged_loss"}


def test_a_stopped_merge_resumed_ends_as_one_never_stopped_bit_for_bit(model, edits):
    from rewriting.errors import Cancelled
    from rewriting.insert import InsertState

    _, rules = edits
    config = InsertConfig(steps=120, plateau_patience=0)
    whole = merge_rules(model, LAYER, rules, config)
    polls = []
    with pytest.raises(Cancelled) as stopped:
        merge_rules(model, LAYER, rules, config, should_stop=lambda: polls.append(1) or len(polls) > 50)
    state = InsertState.from_bytes(stopped.value.state.to_bytes())  # as a worker keeps it
    assert state.step == 50
    resumed = merge_rules(model, LAYER, rules, config, resume=state)
    assert (resumed.steps, resumed.loss) == (whole.steps, whole.loss)
    assert torch.equal(resumed.delta.lam, whole.delta.lam)
    with pytest.raises(IncompatibleError):  # another set of rules spans other directions
        merge_rules(model, LAYER, rules[:2], config, resume=state)


def test_merging_one_rule_is_the_rule_alone(model, moment):
    result = run_edit(model, LAYER, copy_request(), moment)
    merged = merge_rules(model, LAYER, [Rule(result.targets, result.delta.directions, alone=result.delta)],
                         InsertConfig(steps=300))
    (loss,) = merged.losses
    assert merged.rank == result.delta.rank
    assert loss.merged_loss == pytest.approx(result.constraint_loss, rel=1e-3)


def test_merged_delta_applies_like_any_delta(model, edits):
    _, rules = edits
    merged = merge_rules(model, LAYER, rules[:2], InsertConfig(steps=100))
    state = model.state_dict()
    edited = apply_deltas(state, [merged.delta])
    changed = [k for k in state if not torch.equal(state[k], edited[k])]
    assert changed == [merged.delta.param]
    round_trip = type(merged.delta).from_bytes(merged.delta.to_bytes())
    assert torch.equal(round_trip.lam, merged.delta.lam) and round_trip.config == merged.delta.config


def linear_rule(w_true, directions, keys, name):
    values = keys @ w_true.T
    targets = EditTargets(layer="fc", inputs=(keys,), kwargs={}, values=values, value_bounds=None,
                          context_keys=keys, context_weights=torch.ones(keys.shape[0]))
    return Rule(targets, directions, name=name)


def test_closed_form_recovers_a_joint_linear_update():
    torch.manual_seed(0)
    net = torch.nn.Sequential(OrderedDict(fc=torch.nn.Linear(6, 4, bias=False)))
    w0 = net.fc.weight.detach().clone()
    d1, d2 = torch.eye(6)[:1], torch.eye(6)[1:3]
    # the wanted weight differs from W0 only along d1 and d2: the joint solve finds it exactly
    w_true = w0 + torch.randn(4, 1) @ d1 + torch.randn(4, 2) @ d2
    rules = [linear_rule(w_true, d1, torch.randn(5, 6), "a"), linear_rule(w_true, d2, torch.randn(5, 6), "b")]
    merged = merge_rules(net, "fc", rules, InsertConfig(method="closed_form", loss="mse"))
    assert merged.rank == 3 and merged.steps == 0
    assert all(loss.merged_loss < 1e-10 < loss.initial_loss for loss in merged.losses)
    edited = apply_deltas({"fc.weight": w0}, [merged.delta])["fc.weight"]
    assert torch.allclose(edited, w_true, atol=1e-5)


def test_closed_form_weighs_each_rule_as_one_whatever_its_size():
    # two rules that conflict along their shared direction, one key against fifty: the
    # solve minimizes the mean of the rules' mean losses, as the lambda optimizer does
    torch.manual_seed(0)
    net = torch.nn.Sequential(OrderedDict(fc=torch.nn.Linear(6, 4, bias=False))).double()
    w0 = net.fc.weight.detach().clone()
    d = torch.eye(6, dtype=torch.float64)[:1]
    keys_a, keys_b = torch.randn(1, 6, dtype=torch.float64), torch.randn(50, 6, dtype=torch.float64)
    rules = [linear_rule(w0 + torch.randn(4, 1, dtype=torch.float64) @ d, d, keys_a, "a"),
             linear_rule(w0 + torch.randn(4, 1, dtype=torch.float64) @ d, d, keys_b, "b")]
    merged = merge_rules(net, "fc", rules, InsertConfig(method="closed_form", loss="mse"))
    lam = merged.delta.lam.double()

    def joint(lam):
        w = w0 + lam @ d
        return sum(((r.targets.inputs[0] @ w.T - r.targets.values) ** 2).mean() for r in rules) / 2

    lam = lam.requires_grad_(True)
    loss = joint(lam)
    loss.backward()
    assert lam.grad.abs().max() < 1e-8 and abs(loss.item() - merged.loss) < 1e-10


def test_closed_form_merges_convolution_rules():
    # Each rule a 3x3 conv's input over its own crop; the wanted weight differs from W0 along
    # the rules' directions only, so the joint solve over both crops' rows meets both exactly.
    torch.manual_seed(0)
    net = torch.nn.Sequential(OrderedDict(conv=torch.nn.Conv2d(4, 3, 3, padding=1, bias=False)))
    w0 = net.conv.weight.detach().clone()
    d1, d2 = torch.eye(4)[:1], torch.eye(4)[1:3]
    w_true = w0.clone()
    w_true[:, 0] += torch.randn(3, 3, 3)  # along d1
    w_true[:, 1:3] += torch.randn(3, 2, 3, 3)  # along d2
    rules = []
    for name, d in (("a", d1), ("b", d2)):
        x = torch.randn(1, 4, 6, 6)
        values = torch.nn.functional.conv2d(x, w_true, padding=1)
        targets = EditTargets(layer="conv", inputs=(x,), kwargs={}, values=values, value_bounds=None,
                              context_keys=x[0].flatten(1).T, context_weights=torch.ones(36))
        rules.append(Rule(targets, d, name=name))
    merged = merge_rules(net, "conv", rules, InsertConfig(method="closed_form", loss="mse"))
    assert merged.rank == 3
    assert all(loss.merged_loss < 1e-10 < loss.initial_loss for loss in merged.losses)
    edited = apply_deltas({"conv.weight": w0}, [merged.delta])["conv.weight"]
    assert torch.allclose(edited, w_true, atol=1e-5)


@pytest.mark.parametrize("config, field", [(InsertConfig(method="projected"), "method")])
def test_merge_refuses_other_methods(model, edits, config, field):
    with pytest.raises(EditRequestError) as error:
        merge_rules(model, LAYER, edits[1], config)
    assert error.value.field == field


def test_merge_refuses_nothing_and_other_layers(model, edits):
    with pytest.raises(EditRequestError):
        merge_rules(model, LAYER, [])
    with pytest.raises(IncompatibleError, match="layer2"):
        merge_rules(model, "layer2", edits[1])


def test_closed_form_merge_takes_the_least_change_in_the_moments_metric(model, moment):
    """Given the layer's statistic, a merge's closed form picks the same weight as one edit
    does (the least change in the C metric among exact fits), so merging one rule gives back
    its own delta; without it, the least Euclidean change, a different weight."""
    result = run_edit(model, LAYER + ".conv", copy_between(1, 2, method="closed_form", rank=2, loss="mse",
                                                          halo=True), moment)
    assert result.constraint_loss < 1e-6 * result.initial_loss  # more unknowns than constraints
    rule = Rule(result.targets, result.delta.directions, alone=result.delta, name="one")
    config = InsertConfig(method="closed_form", loss="mse")
    in_c = merge_rules(model, LAYER + ".conv", [rule], config, moment=moment)
    euclidean = merge_rules(model, LAYER + ".conv", [rule], config)
    alone = result.delta.update(torch.float64)
    assert torch.allclose(in_c.delta.update(torch.float64), alone, rtol=1e-4, atol=1e-6 * alone.abs().max())
    assert not torch.allclose(euclidean.delta.update(torch.float64), alone, rtol=1e-2)
    assert in_c.losses[0].merged_loss < 1e-6 * in_c.losses[0].initial_loss


def test_merge_refuses_a_moment_of_other_channels(model, edits):
    with pytest.raises(IncompatibleError, match="channels"):
        merge_rules(model, LAYER, edits[1], moment=torch.eye(5, dtype=torch.float64))
