"""Insert a rule into one layer: change its weight along context directions only.

Given goal inputs of the target layer (its captured arguments), the wanted outputs
and context directions ``D`` [r, C_in], find ``W1 = W0 + lam x_in D`` so that the
layer maps the goal inputs to the wanted outputs. Three methods:

- ``projected`` (the paper's): Adam on the whole stored weight; every
  ``projection_interval`` steps (and after the last) the weight is put back on
  ``W0 + span(D)``: its part orthogonal to span(D) along the input-channel
  dimension is held at W0's, its projection on span(D) is kept.
- ``lambda``: Adam on ``lam`` alone in ``W0 + lam x_in D``; no projection needed.
- ``closed_form``: for a linear target layer (nn.Linear or an equalized linear,
  the target being the weight module itself), the least-squares ``lam``, exact
  when r >= number of keys and the keys are independent. With
  ``D = C^-1 K*`` this is the minimum of ``||W K - W0 K||`` subject to ``W K* = V*``.

Step size. The original lr (0.05 on the raw weight) assumes unit-scale stored
weights (equalized learning rate). With ``lr_scale="weight_rms"`` (default) the
step is multiplied by the RMS of the stored weight, so the same lr works on
default-initialised layers, whose weights are ~1/sqrt(fan_in) in size (for
``lambda`` the step is on ``lam``, in the same units). ``lr_scale="none"`` gives
the raw original behaviour.

Early stop: the best loss must improve by ``plateau_tolerance`` (relative) within
``plateau_patience`` steps. For ``projected`` only losses measured on a weight that
lies on ``W0 + span(D)`` (the step after each projection) count, since in between
the weight drifts off the subspace and its loss says little about the result.

Both optimisers return the lowest-loss weight on ``W0 + span(D)`` they met (the
last one, or an earlier one if the loss rose), so the result is never worse than
the unedited weight. The default is ``lambda``: on the demo generator it reaches
the projected method's final loss in a small fraction of the steps and ends
lower (docs/benchmarks.md).

The model is never modified: the optimisation runs on a copy of the weight through
a functional call; apply the result with ``rewriting.delta``.
"""
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from rewriting.delta import EditDelta, coefficients, expand
from rewriting.errors import Cancelled, EditRequestError
from rewriting.layers import layer_forward, target_weight

METHODS = ("projected", "lambda", "closed_form")
LOSSES = ("l1", "mse")
LR_SCALES = ("weight_rms", "none")
MAX_STEPS = 1_000_000


@dataclass(frozen=True)
class InsertConfig:
    method: str = "lambda"  # measured faster and lower than "projected" (docs/benchmarks.md)
    steps: int = 2001  # most optimisation steps; the plateau stop may end sooner
    lr: float = 0.05  # Adam step, in units of the stored weight's RMS (see lr_scale)
    projection_interval: int = 10  # projected: put the weight back on W0 + span(D) every N steps
    lr_scale: str = "weight_rms"
    loss: str = "l1"
    plateau_patience: int = 200  # stop after this many steps without improvement; 0: never
    plateau_tolerance: float = 1e-3  # relative improvement of the best loss that counts

    def validate(self):
        """Return self, or raise ``EditRequestError`` naming the bad field."""
        _choice("method", self.method, METHODS)
        _choice("loss", self.loss, LOSSES)
        _choice("lr_scale", self.lr_scale, LR_SCALES)
        _int("steps", self.steps, 1, MAX_STEPS)
        _int("projection_interval", self.projection_interval, 1, MAX_STEPS)
        _int("plateau_patience", self.plateau_patience, 0, MAX_STEPS)
        _number("lr", self.lr, positive=True)
        _number("plateau_tolerance", self.plateau_tolerance, positive=False)
        if self.lr > 100:
            raise EditRequestError("lr", f"{self.lr} is absurdly large (at most 100)")
        if self.plateau_tolerance >= 1:
            raise EditRequestError("plateau_tolerance", "must be below 1")
        return self

    def as_dict(self):
        return asdict(self)


def _choice(name, value, options):
    if value not in options:
        raise EditRequestError(name, f"must be one of {options}, not {value!r}")


def _int(name, value, lo, hi):
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise EditRequestError(name, f"must be an integer in {lo}..{hi}, not {value!r}")


def _number(name, value, positive):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EditRequestError(name, f"must be a finite number, not {value!r}")
    if value < 0 or (positive and value == 0):
        raise EditRequestError(name, f"must be {'positive' if positive else 'non-negative'}, not {value!r}")


@dataclass
class InsertResult:
    layer: str
    param: str
    in_dim: int
    lam: torch.Tensor  # stored-weight units, weight-shaped with r on in_dim
    directions: torch.Tensor  # [r, C_in] orthonormal basis actually used
    loss: float  # final loss, with the final (projected) weight
    initial_loss: float  # loss with the unedited weight
    steps: int  # optimisation steps run (0 for closed_form)
    stopped_early: bool
    seconds: float
    losses: list = field(default_factory=list)  # loss at each step

    def delta(self, base_sha256, config=None):
        """This result as an ``EditDelta`` for the base checkpoint ``base_sha256``."""
        return EditDelta(layer=self.layer, param=self.param, base_sha256=base_sha256,
                         lam=self.lam.detach().cpu(), directions=self.directions.detach().cpu(),
                         config=dict(config or {}), in_dim=self.in_dim)


def orthonormal_basis(directions):
    """Orthonormal rows spanning the rows of ``directions`` (QR, signs kept); raises if dependent."""
    q, r = torch.linalg.qr(directions.to(torch.float64).T)
    diag = torch.diagonal(r)
    if (diag.abs() <= 1e-10 * diag.abs().max().clamp_min(1e-300)).any():
        raise EditRequestError("rank", "the context directions are linearly dependent")
    return (q * torch.sign(diag)).T


def _loss_fn(name):
    return F.l1_loss if name == "l1" else F.mse_loss


def insert(model, layer, inputs, target, directions, config=None, kwargs=None,
           progress=None, should_stop=None):
    """Find ``lam`` so that ``layer`` with ``W0 + lam x_in D`` maps ``inputs`` to ``target``.

    ``inputs`` are the target layer's arguments (a tensor or tuple, e.g. ``Trace.inputs``),
    ``target`` the wanted output, ``directions`` D [r, C_in]. ``progress(step, loss)``
    is called after each step; ``should_stop()`` is polled before each step and
    raises ``Cancelled``. Returns an ``InsertResult``; the model is left unchanged.
    """
    config = (config or InsertConfig()).validate()
    t = target_weight(model, layer)
    w0 = t.weight.detach()
    if directions.dim() != 2 or directions.shape[1] != w0.shape[t.in_dim]:
        raise EditRequestError("rank", f"directions of shape {tuple(directions.shape)} do not fit "
                               f"{w0.shape[t.in_dim]} input channels")
    if directions.shape[0] > directions.shape[1]:
        raise EditRequestError("rank", f"rank {directions.shape[0]} exceeds {directions.shape[1]} channels")
    if not torch.isfinite(directions).all():
        raise EditRequestError("rank", "the context directions are not finite")
    q = orthonormal_basis(directions).to(device=w0.device, dtype=w0.dtype)
    args = tuple(a.to(w0.device) if torch.is_tensor(a) else a
                 for a in (inputs if isinstance(inputs, tuple) else (inputs,)))
    target = target.detach().to(w0.device)
    loss_fn = _loss_fn(config.loss)

    def loss_at(weight):
        return loss_fn(layer_forward(model, t, args, weight=weight, kwargs=kwargs), target)

    start = time.perf_counter()
    with torch.no_grad():
        initial = loss_at(w0).item()
    if config.method == "closed_form":
        lam = _closed_form(model, t, args, kwargs, target, q)
        steps, stopped, losses = 0, False, []
    else:
        lam, steps, stopped, losses = _optimize(config, t, w0, q, loss_at, progress, should_stop)
    with torch.no_grad():
        final = loss_at(w0 + expand(lam, q, t.in_dim)).item()
    return InsertResult(layer=t.layer, param=t.param, in_dim=t.in_dim, lam=lam.detach(),
                        directions=q, loss=final, initial_loss=initial, steps=steps,
                        stopped_early=stopped, seconds=time.perf_counter() - start, losses=losses)


def step_scale(config, w0):
    """The multiplier of ``lr`` for this layer (see module doc)."""
    if config.lr_scale == "none":
        return 1.0
    rms = w0.detach().double().pow(2).mean().sqrt().item()
    return rms if math.isfinite(rms) and rms > 0 else 1.0


def _optimize(config, t, w0, q, loss_at, progress, should_stop):
    lr = config.lr * step_scale(config, w0)
    coef0 = coefficients(w0, q, t.in_dim)
    projected = config.method == "projected"
    if projected:
        ortho = w0 - expand(coef0, q, t.in_dim)  # held fixed
        param = w0.clone().requires_grad_(True)
        weight_of = lambda: param  # noqa: E731
        lam_of = lambda: coefficients(param.detach(), q, t.in_dim) - coef0  # noqa: E731
    else:
        param = torch.zeros_like(coef0).requires_grad_(True)
        weight_of = lambda: w0 + expand(param, q, t.in_dim)  # noqa: E731
        lam_of = lambda: param.detach().clone()  # noqa: E731
    opt = torch.optim.Adam([param], lr=lr)
    losses, stopped, step = [], False, 0
    kept, kept_lam = math.inf, None  # lowest loss on W0 + span(D) so far, and its lam
    best, best_step = math.inf, 0  # plateau bookkeeping (improvements beyond the tolerance)
    for step in range(config.steps):
        if should_stop is not None and should_stop():
            raise Cancelled("insert cancelled")
        with torch.enable_grad():
            loss = loss_at(weight_of())
            (grad,) = torch.autograd.grad(loss, param)
        value = loss.item()
        losses.append(value)
        if progress is not None:
            progress(step, value)
        # Between projections the projected weight drifts off the subspace; only losses of
        # weights on it (step 0 and the step after each projection) describe a result.
        if not projected or step == 0 or (step - 1) % config.projection_interval == 0:
            if value < kept:
                kept, kept_lam = value, lam_of()
            if value < best * (1 - config.plateau_tolerance):
                best, best_step = value, step
        if config.plateau_patience and step - best_step >= config.plateau_patience:
            stopped = True
            break
        param.grad = grad
        opt.step()
        if projected and (step % config.projection_interval == 0 or step == config.steps - 1):
            with torch.no_grad():
                param.copy_(ortho + expand(coefficients(param, q, t.in_dim), q, t.in_dim))
    # The result is the last weight (projected once more) or the best one seen, whichever is lower.
    with torch.no_grad():
        if projected:
            param.copy_(ortho + expand(coefficients(param, q, t.in_dim), q, t.in_dim))
        lam = lam_of()
        if kept_lam is not None and kept < loss_at(w0 + expand(lam, q, t.in_dim)).item():
            lam = kept_lam
    return lam, len(losses), stopped, losses


def _closed_form(model, t, args, kwargs, target, q):
    if t.module is not t.weight_module or t.weight.dim() != 2:
        raise EditRequestError("method", f"closed_form needs a linear target layer; {t.layer!r} "
                               f"is {t.kind} inside {type(t.module).__name__}")
    w0 = t.weight.detach()
    with torch.no_grad():
        base = layer_forward(model, t, args, kwargs=kwargs)
    keys = args[0].reshape(-1, w0.shape[1]).double().cpu()
    residual = (target.reshape(base.shape) - base).reshape(-1, w0.shape[0]).double().cpu()
    # output moves by keys @ (gain * lam @ D)^T, linear in lam: solve (gain K D^T) lam^T = R
    a = t.gain * keys @ q.double().cpu().T
    lam_t = torch.linalg.lstsq(a, residual, driver="gelsd").solution
    return lam_t.T.to(device=w0.device, dtype=w0.dtype)
