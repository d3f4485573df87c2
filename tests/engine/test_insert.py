from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rewriting.delta import expand
from rewriting.directions import covariance_adjusted_keys, regularized
from rewriting.errors import Cancelled, EditRequestError, IncompatibleError
from rewriting.insert import InsertConfig, InsertState, insert, orthonormal_basis
from rewriting.layers import layer_forward
from rewriting.statistics import SecondMoment
from tests.engine.tiny_models import EqualBlock, EqualConv2d, EqualLinear


def linear_problem(n_in=8, n_out=5, n_keys=3, seed=0, layer=None):
    """A linear layer, 'other' keys K (their moment C), new keys K* and wanted values V*."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    fc = layer or nn.Linear(n_in, n_out)
    model = nn.Sequential(OrderedDict(fc=fc)).double().eval().requires_grad_(False)
    mix = torch.eye(n_in, dtype=torch.float64) + 0.2 * torch.randn(n_in, n_in, generator=g, dtype=torch.float64)
    keys = torch.randn(400, n_in, generator=g, dtype=torch.float64) @ mix
    stat = SecondMoment(n_in).update(keys)
    kstar = torch.randn(n_keys, n_in, generator=g, dtype=torch.float64)
    vstar = torch.randn(n_keys, n_out, generator=g, dtype=torch.float64)
    return model, keys, stat, kstar, vstar


def closed_form_weight(model, stat, kstar, vstar):
    d = covariance_adjusted_keys(stat, kstar)  # the paper's D = C^-1 K*
    r = insert(model, "fc", (kstar,), vstar, d, InsertConfig(method="closed_form"))
    # the effective weight: stored weight plus the stored delta, times the layer's gain
    return (model.fc.weight + expand(r.lam, r.directions, 1)) * _gain(model.fc), r


def _gain(m):
    return getattr(m, "weight_gain", 1.0)


@pytest.mark.parametrize("layer", [None, "equalized"])
def test_closed_form_meets_the_constraint(layer):
    model, keys, stat, kstar, vstar = linear_problem(layer=EqualLinear(8, 5) if layer else None)
    w1_eff, r = closed_form_weight(model, stat, kstar, vstar)
    out = kstar @ w1_eff.T + model.fc.bias
    assert ((out - vstar).norm() / vstar.norm()) < 1e-5
    assert r.loss < 1e-6 and r.steps == 0
    # the stored weight moved by lam x D; the layer applied to K* now gives V*
    w1_stored = model.fc.weight + expand(r.lam, r.directions, 1)
    got = layer_forward(model, "fc", (kstar,), weight=w1_stored)
    assert ((got - vstar).norm() / vstar.norm()) < 1e-5


def test_closed_form_minimizes_change_on_other_keys_brute_force():
    """Among all W with W K* = V*, the closed form minimizes ||W K - W0 K||: check by KKT."""
    model, keys, stat, kstar, vstar = linear_problem()
    w1, _ = closed_form_weight(model, stat, kstar, vstar)
    w0, b = model.fc.weight, model.fc.bias
    c = keys.T @ keys  # objective sum ||(W - W0) k||^2 = tr(X C X^T), X = W - W0
    n = c.shape[0]
    m = kstar.shape[0]
    kkt = torch.zeros(n + m, n + m, dtype=torch.float64)
    kkt[:n, :n] = 2 * c
    kkt[:n, n:] = kstar.T
    kkt[n:, :n] = kstar
    rhs = torch.zeros(n + m, w0.shape[0], dtype=torch.float64)
    rhs[n:] = (vstar - kstar @ w0.T - b).clone()
    x = torch.linalg.solve(kkt, rhs)[:n].T  # one independent problem per output row
    brute = w0 + x
    # equal up to the documented ridge (1e-6 of C's mean eigenvalue)
    assert ((w1 - brute).abs().max() / (brute - w0).abs().max()) < 1e-5
    # and any other feasible W does worse
    null = torch.linalg.svd(kstar).Vh[kstar.shape[0]:]  # directions with K* v = 0
    cost = lambda w: ((w - w0) @ keys.T).pow(2).sum()  # noqa: E731
    assert cost(brute) <= cost(w1) <= cost(brute) * (1 + 1e-9)
    for s in range(3):
        other = w1 + torch.randn(w0.shape[0], null.shape[0], dtype=torch.float64) @ null * 0.1
        assert torch.allclose(other @ kstar.T, w1 @ kstar.T)
        assert cost(other) > cost(w1)


def test_delta_has_rank_r_and_rows_in_span_of_d():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(conv=nn.Conv2d(6, 4, 3, padding=1))).double().eval().requires_grad_(False)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    target = layer_forward(model, "conv", (x,)) + 0.3
    d = torch.randn(2, 6, dtype=torch.float64)
    r = insert(model, "conv", (x,), target, d, InsertConfig(steps=50))
    delta = expand(r.lam, r.directions, 1)
    rows = delta.movedim(1, -1).reshape(-1, 6)  # one row per (out, kh, kw): input-channel vectors
    assert torch.linalg.matrix_rank(rows) <= 2
    q = orthonormal_basis(d)
    assert torch.allclose(rows - rows @ q.T @ q, torch.zeros_like(rows), atol=1e-12)
    assert r.loss < r.initial_loss


def test_conv_transpose_delta_acts_on_dim_0():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(up=nn.ConvTranspose2d(6, 4, 4, 2, 1))).eval().requires_grad_(False)
    x = torch.randn(2, 6, 4, 4)
    target = layer_forward(model, "up", (x,)) * 1.2
    d = torch.randn(1, 6)
    r = insert(model, "up", (x,), target, d, InsertConfig(steps=100))
    assert r.in_dim == 0 and r.lam.shape == (1, 4, 4, 4)
    rows = expand(r.lam, r.directions, 0).movedim(0, -1).reshape(-1, 6)
    q = r.directions
    assert torch.allclose(rows - rows @ q.T @ q, torch.zeros_like(rows), atol=1e-6)
    assert r.loss < r.initial_loss


def test_projected_optimization_converges_to_the_closed_form():
    model, keys, stat, kstar, vstar = linear_problem()
    w1, closed = closed_form_weight(model, stat, kstar, vstar)
    d = covariance_adjusted_keys(stat, kstar)
    r = insert(model, "fc", (kstar,), vstar, d,
               InsertConfig(method="projected", steps=3000, lr=0.01, loss="mse", plateau_patience=0))
    w_opt = model.fc.weight + expand(r.lam, r.directions, 1)
    assert ((w_opt - w1).norm() / (w1 - model.fc.weight).norm()) < 1e-3
    lam_fit = insert(model, "fc", (kstar,), vstar, d,
                     InsertConfig(method="lambda", steps=3000, lr=0.01, loss="mse", plateau_patience=0))
    w_lam = model.fc.weight + expand(lam_fit.lam, lam_fit.directions, 1)
    assert ((w_lam - w1).norm() / (w1 - model.fc.weight).norm()) < 1e-3


def test_key_orthogonal_in_c_inverse_metric_keeps_its_value():
    model, keys, stat, kstar, vstar = linear_problem()
    w1, r = closed_form_weight(model, stat, kstar, vstar)
    d = covariance_adjusted_keys(stat, kstar)
    k = torch.randn(8, dtype=torch.float64)
    k = k - d.T @ torch.linalg.lstsq(d.T, k).solution  # now d_j . k = 0 for every j
    c = stat.matrix + 1e-6 * torch.trace(stat.matrix) / 8 * torch.eye(8, dtype=torch.float64)
    assert (kstar @ torch.linalg.solve(c, k)).abs().max() < 1e-10  # k^T C^-1 k*_j = 0
    assert torch.allclose(w1 @ k, model.fc.weight @ k, atol=1e-10)


def conv_problem(kind, seed=0):
    """A 64-channel conv whose target is reachable by a rank-1 change; unit-scale or default init."""
    torch.manual_seed(seed)
    conv = EqualConv2d(64, 64, 3, padding=1) if kind == "equalized" else nn.Conv2d(64, 64, 3, padding=1)
    model = nn.Sequential(OrderedDict(conv=conv, act=nn.LeakyReLU(0.2))).eval().requires_grad_(False)
    x = torch.relu(torch.randn(4, 64, 8, 8))
    stat = SecondMoment(64).update(torch.relu(torch.randn(4000, 64)))
    d = covariance_adjusted_keys(stat, x[:, :, 2:5, 2:5].mean((0, 2, 3)))[None]
    d = d / d.norm()
    lam_true = torch.randn(64, 1, 3, 3) * conv.weight.std() * 4
    with torch.no_grad():
        target = layer_forward(model, "conv", (x,), weight=conv.weight + expand(lam_true, d, 1))
    return model, x, target, d


@pytest.mark.parametrize("kind", ["equalized", "default_init"])
@pytest.mark.parametrize("method", ["projected", "lambda"])
def test_defaults_converge_on_both_kinds_of_layer(kind, method):
    model, x, target, d = conv_problem(kind)
    r = insert(model, "conv", (x,), target, d, InsertConfig(method=method))
    assert r.loss < 0.02 * r.initial_loss
    assert r.losses[0] == pytest.approx(r.initial_loss)


def test_unscaled_original_lr_is_worse_on_default_init():
    """The raw lr 0.05 on a default-initialised conv (weights ~0.02) ends far above the scaled run."""
    model, x, target, d = conv_problem("default_init")
    raw = insert(model, "conv", (x,), target, d, InsertConfig(method="projected", lr_scale="none"))
    scaled = insert(model, "conv", (x,), target, d, InsertConfig(method="projected"))
    assert raw.loss > 5 * scaled.loss
    assert max(raw.losses[:20]) > raw.initial_loss * 0.9  # the first steps overshoot


@pytest.mark.parametrize("method", ["projected", "lambda"])
def test_result_is_never_worse_than_the_unedited_weight(method):
    """An absurd step makes the loss rise; the best weight seen (W0 at worst) is returned."""
    model, x, target, d = conv_problem("default_init")
    r = insert(model, "conv", (x,), target, d, InsertConfig(method=method, lr=50, steps=40,
                                                            lr_scale="none", plateau_patience=0))
    assert max(r.losses) > 10 * r.initial_loss  # it diverged
    assert r.loss <= r.initial_loss


def test_model_is_untouched_progress_is_reported_and_plateau_stops():
    model, x, target, d = conv_problem("equalized")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    r = insert(model, "conv", (x,), target, d, InsertConfig(steps=2001, plateau_patience=50),
               progress=lambda step, loss: seen.append((step, loss)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.conv.weight.grad is None
    assert [s for s, _ in seen] == list(range(r.steps)) and r.stopped_early and r.steps < 2001
    assert [loss for _, loss in seen] == r.losses


def test_cancel_between_steps():
    model, x, target, d = conv_problem("equalized")
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > 5

    with pytest.raises(Cancelled):
        insert(model, "conv", (x,), target, d, InsertConfig(), should_stop=should_stop)
    assert len(calls) == 6


def stopped_at(step, model, x, target, d, config):
    """The state of an insert stopped before ``step``, through its bytes (as the workers keep it)."""
    calls = []
    with pytest.raises(Cancelled) as stopped:
        insert(model, "conv", (x,), target, d, config, should_stop=lambda: calls.append(1) or len(calls) > step)
    assert stopped.value.state.step == step
    return InsertState.from_bytes(stopped.value.state.to_bytes())


@pytest.mark.parametrize("method, patience", [("lambda", 0), ("lambda", 30), ("projected", 0), ("projected", 30)])
def test_a_resumed_insert_ends_as_one_never_stopped_bit_for_bit(method, patience):
    model, x, target, d = conv_problem("equalized")
    # with patience the plateau stop fires far from both the resume points and the step limit
    # (about step 280 for lambda, 210 for projected): CPUs round differently, and at 300 steps
    # and a 1% tolerance lambda's stop fell on one side of the limit on one machine, the other on another
    config = InsertConfig(method=method, steps=400, plateau_patience=patience, plateau_tolerance=0.02,
                          projection_interval=7)
    whole = insert(model, "conv", (x,), target, d, config)
    # stopped twice: before a projection step, and (projected) mid-interval
    state = stopped_at(57, model, x, target, d, config)
    seen = []
    with pytest.raises(Cancelled) as again:
        insert(model, "conv", (x,), target, d, config, resume=state,
               should_stop=lambda: seen.append(1) or len(seen) > 40)
    state = InsertState.from_bytes(again.value.state.to_bytes())
    assert state.step == 97 and state.adam["step"].item() == 97
    steps = []
    resumed = insert(model, "conv", (x,), target, d, config, resume=state,
                     progress=lambda step, loss: steps.append(step))
    assert steps[0] == 97 and steps[-1] == resumed.steps - 1
    assert (resumed.steps, resumed.stopped_early) == (whole.steps, whole.stopped_early)
    assert resumed.losses == whole.losses
    assert torch.equal(resumed.lam, whole.lam) and torch.equal(resumed.directions, whole.directions)
    assert patience == 0 or whole.stopped_early  # the plateau bookkeeping carried over too

    # resumed from where it ended, a finished insert runs no step and gives its result again
    ran = []
    again = insert(model, "conv", (x,), target, d, config, resume=InsertState.from_bytes(whole.state.to_bytes()),
                   progress=lambda step, loss: ran.append(step))
    assert ran == [] and again.state.step == whole.steps
    assert (again.steps, again.stopped_early, again.losses, again.loss) == (
        whole.steps, whole.stopped_early, whole.losses, whole.loss)
    assert torch.equal(again.lam, whole.lam)


def test_a_state_from_before_the_first_step_starts_afresh():
    model, x, target, d = conv_problem("equalized")
    config = InsertConfig(steps=50)
    state = stopped_at(0, model, x, target, d, config)
    assert state.adam == {} and state.losses == []
    resumed = insert(model, "conv", (x,), target, d, config, resume=state)
    assert torch.equal(resumed.lam, insert(model, "conv", (x,), target, d, config).lam)


def test_a_state_that_does_not_fit_is_refused():
    model, x, target, d = conv_problem("equalized")
    state = stopped_at(5, model, x, target, d, InsertConfig(steps=50))
    with pytest.raises(IncompatibleError, match="method"):
        insert(model, "conv", (x,), target, d, InsertConfig(method="projected", steps=50), resume=state)
    other = torch.randn_like(d)
    with pytest.raises(IncompatibleError, match="other directions"):
        insert(model, "conv", (x,), target, other / other.norm(), InsertConfig(steps=50), resume=state)
    with pytest.raises(IncompatibleError, match="step 5 of 3"):
        insert(model, "conv", (x,), target, d, InsertConfig(steps=3), resume=state)
    with pytest.raises(IncompatibleError, match="closed_form"):
        insert(model, "conv", (x,), target, d, InsertConfig(method="closed_form"), resume=state)


@pytest.mark.parametrize("kwargs, field", [
    ({"lr": float("nan")}, "lr"),
    ({"lr": float("inf")}, "lr"),
    ({"lr": 0}, "lr"),
    ({"lr": -0.1}, "lr"),
    ({"lr": 1e6}, "lr"),
    ({"steps": 0}, "steps"),
    ({"steps": 10**9}, "steps"),
    ({"steps": 2.5}, "steps"),
    ({"projection_interval": 0}, "projection_interval"),
    ({"method": "sgd"}, "method"),
    ({"loss": "l3"}, "loss"),
    ({"lr_scale": "auto"}, "lr_scale"),
    ({"plateau_patience": -1}, "plateau_patience"),
    ({"plateau_tolerance": float("nan")}, "plateau_tolerance"),
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(EditRequestError) as e:
        InsertConfig(**kwargs).validate()
    assert e.value.field == field


def test_bad_directions_and_closed_form_on_nonlinear_layer():
    model, x, target, d = conv_problem("equalized")
    with pytest.raises(EditRequestError) as e:
        insert(model, "conv", (x,), target, torch.randn(1, 7))
    assert e.value.field == "rank"
    with pytest.raises(EditRequestError) as e:
        insert(model, "conv", (x,), target, torch.randn(65, 64))
    assert e.value.field == "rank"
    with pytest.raises(EditRequestError) as e:
        insert(model, "conv", (x,), target, torch.ones(2, 64))  # dependent rows
    assert e.value.field == "rank"
    block = nn.Sequential(OrderedDict(block=EqualBlock(64, 64))).eval().requires_grad_(False)
    with pytest.raises(EditRequestError) as e:
        insert(block, "block", (x,), target, d, InsertConfig(method="closed_form"))
    assert e.value.field == "method" and "'block.conv'" in e.value.message


def _conv_layer(kind, c_in, c_out):
    torch.manual_seed(1)
    return {"equalized": lambda: EqualConv2d(c_in, c_out, 3, padding=1),
            "default_init": lambda: nn.Conv2d(c_in, c_out, 3, padding=1),
            "transposed": lambda: nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)}[kind]()


@pytest.mark.parametrize("kind", ["equalized", "default_init", "transposed"])
def test_closed_form_on_a_convolution_reaches_a_reachable_target(kind):
    """A target made by a rank-1 change along D is met exactly, and that change is found."""
    torch.manual_seed(0)
    conv = _conv_layer(kind, 16, 8)
    model = nn.Sequential(OrderedDict(conv=conv)).double().eval().requires_grad_(False)
    x = torch.relu(torch.randn(2, 16, 5, 5, dtype=torch.float64))
    d = orthonormal_basis(torch.randn(1, 16, dtype=torch.float64))
    in_dim = 0 if kind == "transposed" else 1
    lam_true = torch.randn(conv.weight.shape[:in_dim] + (1,) + conv.weight.shape[in_dim + 1:], dtype=torch.float64)
    target = layer_forward(model, "conv", (x,), weight=conv.weight + expand(lam_true, d, in_dim))
    r = insert(model, "conv", (x,), target, d, InsertConfig(method="closed_form", loss="mse"))
    assert r.loss < 1e-20 * r.initial_loss
    assert torch.allclose(r.lam, lam_true, atol=1e-9)


def test_closed_form_on_a_modulated_convolution_without_demodulation():
    """Its output is linear in the shared weight (keys x * s): a reachable target is met
    exactly. With demodulation it is not, and the closed form refuses it, naming why."""
    from tests.engine.tiny_models import ModulatedConv2d

    torch.manual_seed(0)
    conv = ModulatedConv2d(16, 8, 3, w_dim=4, demodulate=False)
    model = nn.Sequential(OrderedDict(conv=conv)).double().eval().requires_grad_(False)
    x = torch.relu(torch.randn(2, 16, 5, 5, dtype=torch.float64))
    w = torch.randn(2, 4, dtype=torch.float64)  # a different style per image
    d = orthonormal_basis(torch.randn(1, 16, dtype=torch.float64))
    lam_true = torch.randn(8, 1, 3, 3, dtype=torch.float64)
    target = layer_forward(model, "conv", (x, w), weight=conv.weight + expand(lam_true, d, 1))
    r = insert(model, "conv", (x, w), target, d, InsertConfig(method="closed_form", loss="mse"))
    assert r.loss < 1e-20 * r.initial_loss
    assert torch.allclose(r.lam, lam_true, atol=1e-9)

    conv.demodulate = True
    with pytest.raises(EditRequestError, match="demodulates") as e:
        insert(model, "conv", (x, w), target, d, InsertConfig(method="closed_form", loss="mse"))
    assert e.value.field == "method"


class Unsaid(nn.Module):
    """A modulated conv that has no ``demodulate`` attribute (it happens not to demodulate)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 16, 3, 3, dtype=torch.float64))

    def input_styles(self, x, s):
        return s

    def forward(self, x, s):
        return F.conv2d(x * s[:, :, None, None], self.weight, padding=1)


def test_a_modulated_convolution_that_does_not_say_is_taken_to_demodulate():
    model = nn.Sequential(OrderedDict(conv=Unsaid())).eval().requires_grad_(False)
    x, s = torch.randn(2, 16, 5, 5, dtype=torch.float64), torch.rand(2, 16, dtype=torch.float64)
    d = orthonormal_basis(torch.randn(1, 16, dtype=torch.float64))
    target = layer_forward(model, "conv", (x, s))
    with pytest.raises(EditRequestError, match="demodulates"):
        insert(model, "conv", (x, s), target, d, InsertConfig(method="closed_form", loss="mse"))
    model.conv.demodulate = False
    insert(model, "conv", (x, s), target, d, InsertConfig(method="closed_form", loss="mse"))


def test_closed_form_on_a_convolution_takes_the_least_change_in_the_c_metric():
    """All key directions, more unknowns than constraints: the solve meets W K* = V* at every
    output location, and among all such weights it minimizes sum_tap tr(dW_tap C dW_tap^T),
    checked against the KKT solution built from the unfolded keys (not the probing)."""
    g = torch.Generator().manual_seed(3)
    c_in, c_out = 6, 4
    conv = EqualConv2d(c_in, c_out, 3, padding=1)
    model = nn.Sequential(OrderedDict(conv=conv)).double().eval().requires_grad_(False)
    mix = torch.eye(c_in, dtype=torch.float64) + 0.5 * torch.randn(c_in, c_in, generator=g, dtype=torch.float64)
    stat = SecondMoment(c_in).update(torch.randn(500, c_in, generator=g, dtype=torch.float64) @ mix)
    x = torch.randn(1, c_in, 3, 3, generator=g, dtype=torch.float64)  # 9 constraints per output channel
    target = torch.randn(1, c_out, 3, 3, generator=g, dtype=torch.float64)
    r = insert(model, "conv", (x,), target, torch.eye(c_in, dtype=torch.float64),
               InsertConfig(method="closed_form", loss="mse"), moment=stat)
    assert r.loss < 1e-20
    dw = expand(r.lam, r.directions, 1)  # [c_out, c_in, 3, 3], stored units
    # brute force: out change = gain * U^T vec(dW_o), U the unfolded keys [c_in * 9, 9]
    u = conv.weight_gain * F.unfold(x, 3, padding=1)[0]
    # the objective's metric on (c_in, tap): C with the engine's documented ridge
    h = torch.kron(regularized(stat), torch.eye(9, dtype=torch.float64))
    residual = (target - layer_forward(model, "conv", (x,))).reshape(c_out, 9)
    hu = torch.linalg.solve(h, u)
    best = (hu @ torch.linalg.solve(u.T @ hu, residual.T)).T  # H^-1 U (U^T H^-1 U)^-1 r, per output row
    assert torch.allclose(dw.reshape(c_out, -1), best, rtol=1e-7, atol=1e-9 * best.abs().max())
    # and the metric matters: the Euclidean least change is another, costlier weight
    plain = insert(model, "conv", (x,), target, torch.eye(c_in, dtype=torch.float64),
                   InsertConfig(method="closed_form", loss="mse"))
    cost = lambda w: torch.einsum("oa,ab,ob->", w.reshape(c_out, -1), h, w.reshape(c_out, -1))  # noqa: E731
    assert cost(expand(plain.lam, plain.directions, 1)) > 1.01 * cost(dw)


def test_insert_runs_on_the_model_device(device):
    model, x, target, d = conv_problem("equalized")
    model.to(device)
    r = insert(model, "conv", (x,), target, d, InsertConfig(steps=30))
    assert r.lam.device.type == device.type and r.loss < r.initial_loss
