"""Insert a rule into one layer: change its weight along context directions only.

Given goal inputs of the target layer (its captured arguments), the wanted outputs
and context directions ``D`` [r, C_in], find ``W1 = W0 + lam x_in D`` so that the
layer maps the goal inputs to the wanted outputs. Three methods:

- ``projected`` (the paper's): Adam on the whole stored weight; every
  ``projection_interval`` steps (and after the last) the weight is put back on
  ``W0 + span(D)``: its part orthogonal to span(D) along the input-channel
  dimension is held at W0's, its projection on span(D) is kept.
- ``lambda``: Adam on ``lam`` alone in ``W0 + lam x_in D``; no projection needed.
- ``closed_form``: for a target whose output is linear in its weight (the weight
  module itself: linear, conv or transposed conv, plain or equalized; e.g.
  ``layer6.conv`` rather than the block ``layer6``), the least-squares ``lam``. It
  is exact when there are at least as many unknowns as constraints; among the
  exact solutions it takes the least change in the C metric, ``sum over kernel
  taps of ||dW_tap K||^2`` (C = K K^T, given as ``moment``): the paper's
  constrained least squares, ``W1 = W0 + Lambda (C^-1 K*)^T``. With ``D = C^-1 K*``
  (or with all key directions) this is the minimum of ``||W K - W0 K||`` subject
  to ``W K* = V*``; with fewer directions, the best fit along them.

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

Resuming. A stopped optimisation (``should_stop()``) raises ``Cancelled`` carrying an
``InsertState``: the step it stopped before, the directions, the parameter, Adam's
moments and the early-stop bookkeeping. ``insert(..., resume=state)`` goes on from that
step; on the same device the remaining steps are the ones an uninterrupted run takes, bit
for bit. A finished insert's ``InsertResult.state`` is where it ended: resumed from, it
runs no step and returns the same result. The workers keep a state when a stopping worker
hands its job back, the finished one when the insert was done before the stop.

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
from safetensors.torch import load as load_bytes
from torch.func import functional_call

from rewriting.checkpoint import safetensors_bytes, safetensors_metadata
from rewriting.delta import EditDelta, coefficients, expand
from rewriting.directions import regularized
from rewriting.errors import Cancelled, CheckpointError, EditRequestError, IncompatibleError
from rewriting.layers import layer_forward, target_weight
from rewriting.values import crop

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
    # where the optimizer ended (None for closed_form): resumed from, it gives this result
    # again without a step, so a job handed back after its insert does not optimize again
    state: "InsertState | None" = None

    def delta(self, base_sha256, config=None):
        """This result as an ``EditDelta`` for the base checkpoint ``base_sha256``."""
        return EditDelta(layer=self.layer, param=self.param, base_sha256=base_sha256,
                         lam=self.lam.detach().cpu(), directions=self.directions.detach().cpu(),
                         config=dict(config or {}), in_dim=self.in_dim)


STATE_FORMAT = "palimpsest-insert-state/1"


@dataclass
class InsertState:
    """Where an optimising insert stood before step ``step``: enough to go on as if it had
    never stopped. Tensors are on the CPU once saved (``to_bytes``)."""

    method: str
    directions: torch.Tensor  # [r, C_in], the orthonormal basis optimised along
    param: torch.Tensor  # lam (lambda) or the whole stored weight (projected)
    adam: dict  # Adam's state of ``param`` (step, exp_avg, exp_avg_sq); {} before the first step
    kept: float  # lowest loss on W0 + span(D) so far (inf: none yet)
    kept_lam: torch.Tensor | None
    best: float  # plateau bookkeeping
    best_step: int
    losses: list  # one a step done

    @property
    def step(self):
        """The next step to run: steps 0..step-1 are done."""
        return len(self.losses)

    def to_bytes(self):
        tensors = {"directions": self.directions, "param": self.param,
                   "losses": torch.tensor(self.losses, dtype=torch.float64)}
        tensors.update({f"adam.{name}": value for name, value in self.adam.items()})
        if self.kept_lam is not None:
            tensors["kept_lam"] = self.kept_lam
        tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        metadata = {"format": STATE_FORMAT, "method": self.method, "kept": repr(self.kept), "best": repr(self.best),
                    "best_step": str(self.best_step)}
        return safetensors_bytes(tensors, metadata=metadata)

    @classmethod
    def from_bytes(cls, data):
        try:
            tensors = load_bytes(data)
            meta = safetensors_metadata(data)
            if meta.get("format") != STATE_FORMAT:
                raise ValueError(f"format is {meta.get('format')!r}, expected {STATE_FORMAT!r}")
            return cls(method=meta["method"], directions=tensors["directions"], param=tensors["param"],
                       adam={name[5:]: t for name, t in tensors.items() if name.startswith("adam.")},
                       kept=float(meta["kept"]), kept_lam=tensors.get("kept_lam"), best=float(meta["best"]),
                       best_step=int(meta["best_step"]), losses=tensors["losses"].tolist())
        except Exception as e:  # safetensors raises its own types for corrupt data
            raise CheckpointError(f"not an insert state ({e})") from e

    def check(self, config, q, param_shape):
        """Raise ``IncompatibleError`` unless this state continues an insert with ``config``
        along ``q`` (close: the directions may come from another device) on a parameter of
        ``param_shape``."""
        if self.method != config.method:
            raise IncompatibleError(f"the insert state is of method {self.method!r}, not {config.method!r}")
        if tuple(self.param.shape) != tuple(param_shape) or self.directions.shape != q.shape:
            raise IncompatibleError(f"the insert state's parameter {tuple(self.param.shape)} or directions "
                                    f"{tuple(self.directions.shape)} do not fit {tuple(param_shape)}, {tuple(q.shape)}")
        if not torch.allclose(self.directions.to(q), q, atol=1e-4):
            raise IncompatibleError("the insert state was optimised along other directions")
        if self.step > config.steps:
            raise IncompatibleError(f"the insert state stopped at step {self.step} of {config.steps}")


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
           progress=None, should_stop=None, moment=None, output_crop=None, resume=None):
    """Find ``lam`` so that ``layer`` with ``W0 + lam x_in D`` maps ``inputs`` to ``target``.

    ``inputs`` are the target layer's arguments (a tensor or tuple, e.g. ``Trace.inputs``),
    ``target`` the wanted output, ``directions`` D [r, C_in]. ``progress(step, loss)``
    is called after each step; ``should_stop()`` is polled before each step and
    raises ``Cancelled``, which carries an ``InsertState`` (``resume``: go on from one).
    ``moment``: the keys' second moment C, the metric in which
    ``closed_form`` picks the least change (None: Euclidean). ``output_crop``: the
    (t, l, b, r) of the layer's output that ``target`` covers (``EditTargets.output_crop``).
    Returns an ``InsertResult``; the model is left unchanged.
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
        return loss_fn(crop(layer_forward(model, t, args, weight=weight, kwargs=kwargs), output_crop), target)

    start = time.perf_counter()
    with torch.no_grad():
        initial = loss_at(w0).item()
    if config.method == "closed_form":
        if resume is not None:
            raise IncompatibleError("closed_form has no steps to resume")
        lam = closed_form(model, t, [(args, kwargs, target, output_crop)], q, moment)
        steps, stopped, losses, state = 0, False, [], None
    else:
        if resume is not None:
            resume.check(config, q, w0.shape if config.method == "projected" else
                         coefficients(w0, q, t.in_dim).shape)
            q = resume.directions.to(q)  # the basis its parameter is expressed in
        lam, steps, stopped, losses, state = _optimize(config, t, w0, q, loss_at, progress, should_stop, resume)
    with torch.no_grad():
        final = loss_at(w0 + expand(lam, q, t.in_dim)).item()
    return InsertResult(layer=t.layer, param=t.param, in_dim=t.in_dim, lam=lam.detach(),
                        directions=q, loss=final, initial_loss=initial, steps=steps,
                        stopped_early=stopped, seconds=time.perf_counter() - start, losses=losses, state=state)


def step_scale(config, w0):
    """The multiplier of ``lr`` for this layer (see module doc)."""
    if config.lr_scale == "none":
        return 1.0
    rms = w0.detach().double().pow(2).mean().sqrt().item()
    return rms if math.isfinite(rms) and rms > 0 else 1.0


def _optimize(config, t, w0, q, loss_at, progress, should_stop, resume=None):
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
    losses = []
    kept, kept_lam = math.inf, None  # lowest loss on W0 + span(D) so far, and its lam
    best, best_step = math.inf, 0  # plateau bookkeeping (improvements beyond the tolerance)
    if resume is not None:
        with torch.no_grad():
            param.copy_(resume.param)
        if resume.adam:
            opt.state[param] = {name: value.to(param.device) if name != "step" else value.clone()
                                for name, value in resume.adam.items()}
        losses = list(resume.losses)
        kept, best, best_step = resume.kept, resume.best, resume.best_step
        kept_lam = None if resume.kept_lam is None else resume.kept_lam.to(param)

    def state():
        return InsertState(method=config.method, directions=q, param=param.detach().clone(),
                           adam={name: value.clone() for name, value in opt.state[param].items()},
                           kept=kept, kept_lam=kept_lam, best=best, best_step=best_step, losses=list(losses))

    def plateaued(step):
        return config.plateau_patience > 0 and step - best_step >= config.plateau_patience

    stopped = bool(losses) and plateaued(len(losses) - 1)  # a state saved once the plateau had ended it
    for step in range(len(losses), 0 if stopped else config.steps):
        if should_stop is not None and should_stop():
            raise Cancelled(f"insert cancelled before step {step}", state=state())
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
        if plateaued(step):
            stopped = True
            break
        param.grad = grad
        opt.step()
        if projected and (step % config.projection_interval == 0 or step == config.steps - 1):
            with torch.no_grad():
                param.copy_(ortho + expand(coefficients(param, q, t.in_dim), q, t.in_dim))
    ended = state()
    # The result is the last weight (projected once more) or the best one seen, whichever is lower.
    with torch.no_grad():
        if projected:
            param.copy_(ortho + expand(coefficients(param, q, t.in_dim), q, t.in_dim))
        lam = lam_of()
        if kept_lam is not None and kept < loss_at(w0 + expand(lam, q, t.in_dim)).item():
            lam = kept_lam
    return lam, len(losses), stopped, losses, ended


LINEAR_IN_WEIGHT = ("linear", "equalized_linear", "conv2d", "equalized_conv2d", "conv_transpose2d")


def linear_in_weight(t):
    """Whether the target's output is an affine function of its stored weight: a plain or
    equalized layer, or a modulated conv that says it does not demodulate (``demodulate``
    False; without the attribute it is taken to demodulate, which is not linear)."""
    if t.module is not t.weight_module or t.in_dim not in (0, 1):
        return False
    return t.kind in LINEAR_IN_WEIGHT or (t.kind == "modulated_conv2d"
                                          and getattr(t.weight_module, "demodulate", True) is False)


def closed_form(model, t, cases, q, moment=None):
    """The least-squares ``lam`` over every case at once; where several fit equally (more
    unknowns than constraints), the one of least change: least ``sum_tap ||dW_tap||_C^2``
    when ``moment`` (C) is given, else least Euclidean norm. ``cases``: (args, kwargs,
    target, output_crop) of the target layer ``t``; one for an edit, one a rule for a merge
    (``rewriting.merge``), their rows stacked."""
    if not linear_in_weight(t):
        inner = t.local_param.rpartition(".")[0]
        hint = f"; edit its weight module {t.layer + '.' + inner!r} instead" if inner else ""
        if t.kind == "modulated_conv2d" and not inner:
            hint = " that demodulates (a module that does not sets demodulate = False)"
        raise EditRequestError("method", f"closed_form needs a target whose output is linear in its weight "
                               f"(linear, conv, transposed conv, modulated conv without demodulation); "
                               f"{t.layer!r} is {t.kind} inside {type(t.module).__name__}{hint}")
    w0 = t.weight.detach()
    out_dim = 1 - t.in_dim
    channels = w0.shape[out_dim]
    designs, residuals = [], []
    for args, kwargs, target, output_crop in cases:
        with torch.no_grad():
            base = crop(layer_forward(model, t, args, kwargs=kwargs), output_crop)
            design = _design_matrix(t, args, kwargs, q, output_crop)  # [positions, r * taps], float64
        # each case weighs as one (a merge minimizes the mean of its rules' mean losses),
        # however many positions it has
        scale = design.shape[0] ** -0.5
        designs.append(design * scale)
        residual = (target.reshape(base.shape) - base).double().movedim(1, -1).reshape(-1, channels).cpu()
        residuals.append(residual * scale)
    design, residual = torch.cat(designs), torch.cat(residuals)
    rank, taps = q.shape[0], design.shape[1] // q.shape[0]
    # Least change in the C metric: with Q C Q^T = L L^T, each tap's coefficients are
    # l = L^-T g, and ||dW_tap||_C = ||g||; lstsq's minimum-norm g gives the least change.
    # Cross-tap moments are left out (each tap of a kernel is weighed by C alone).
    if moment is None:
        whiten = torch.eye(rank, dtype=torch.float64)
    else:
        qd = q.double().cpu()
        chol, info = torch.linalg.cholesky_ex(qd @ regularized(moment).cpu() @ qd.T)
        if info.item() != 0:
            raise IncompatibleError("the second moment is not positive definite along the directions")
        whiten = torch.linalg.solve_triangular(chol.T, torch.eye(rank, dtype=torch.float64), upper=True)
    mix = torch.kron(whiten.contiguous(), torch.eye(taps, dtype=torch.float64))  # on (r, tap) coefficients
    g = torch.linalg.lstsq(design @ mix, residual, driver="gelsd").solution
    lam = (mix @ g).T.reshape(channels, rank, *w0.shape[2:]).movedim(0, out_dim)
    return lam.to(device=w0.device, dtype=w0.dtype)


def _design_matrix(t, args, kwargs, q, output_crop=None):
    """The layer's output change per unit of each ``lam`` coefficient of one output
    channel, [positions, r * taps] in float64 (positions: batch and space, flattened).

    Found by probing, so any padding, stride or gain of the weight module is honoured:
    output channel ``o`` depends only on row ``o`` of the weight, so one forward pass
    probes as many coefficients as there are output channels.
    """
    w = t.weight.detach()
    out_dim = 1 - t.in_dim
    channels, rank = w.shape[out_dim], q.shape[0]
    per_channel = rank * (w[0, 0].numel() if w.dim() > 2 else 1)
    params = {name: p.detach().double() for name, p in t.module.named_parameters()}
    params.update({name: b.double() if b.is_floating_point() else b for name, b in t.module.named_buffers()})
    args64 = tuple(a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    qd = q.double()

    def output(lam):  # the output with the stored weight replaced by lam x_in D alone
        weights = dict(params, **{t.local_param: expand(lam.movedim(0, out_dim), qd, t.in_dim)})
        out = crop(functional_call(t.module, weights, args64, kwargs or {}), output_crop)
        return out.movedim(1, -1).reshape(-1, channels)

    lam_shape = (channels, rank, *w.shape[2:])
    bias_only = output(torch.zeros(lam_shape, dtype=torch.float64, device=w.device))
    columns = []
    for first in range(0, per_channel, channels):
        count = min(channels, per_channel - first)
        probe = torch.zeros(channels, per_channel, dtype=torch.float64, device=w.device)
        probe[torch.arange(count), first + torch.arange(count)] = 1
        columns.append((output(probe.reshape(lam_shape)) - bias_only)[:, :count])
    return torch.cat(columns, 1).cpu()
