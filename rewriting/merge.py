"""Merge several edits of one layer into one low-rank update, solved jointly.

Each rule ``i`` was made alone: the layer should map its inputs ``K_i`` to its target
values ``V_i`` (``rewriting.edit.EditTargets``), changing the weight only along its
context directions ``D_i`` [r_i, C_in]. Applying the rules' deltas one after another
lets each undo part of the others where their directions overlap. The merge instead
solves them together, over the union of their subspaces:

    D = orthonormal basis of the rows of [D_1; D_2; ...]    (SVD; rank R <= sum r_i, <= C_in)
    W = W0 + Lambda x_in D,  Lambda minimizing  mean_i loss(layer_W(K_i), V_i)

with the engine's own optimizer (``rewriting.insert``'s ``lambda`` method: Adam on
Lambda, the plateau stop, the lowest-loss Lambda kept), or in closed form (least
squares over all rules' keys at once) when the target layer is linear in its weight.
Given the layer's key statistic, the closed form takes, among the weights that fit, the
least change in its C metric, as one edit does; without it, the least Euclidean change.
Each rule counts equally in the objective, whatever the size of its region.

``merge_rules`` reports, for every rule, its constraint loss with the unedited weight,
with its own delta applied alone (if given) and with the merged weight, in the rule's
loss. The model is never modified; the result is an ``EditDelta`` for the base.
"""
import time
from dataclasses import dataclass, field

import torch

from rewriting.delta import EditDelta, coefficients, expand
from rewriting.directions import DIRECTION_TOLERANCE, moment_matrix
from rewriting.errors import EditRequestError, IncompatibleError
from rewriting.insert import InsertConfig, _loss_fn, _optimize, closed_form
from rewriting.layers import layer_forward, target_weight
from rewriting.values import crop



@dataclass
class Rule:
    """One edit to merge: what the layer should map (``targets``, an EditTargets) and the
    context directions it was made with. ``alone``: its own EditDelta, to report its loss
    when applied alone. ``name`` labels it in the report (a custom id, a job id)."""

    targets: object
    directions: torch.Tensor  # [r, C_in]
    alone: EditDelta | None = None
    name: str = ""


@dataclass
class RuleLoss:
    name: str
    initial_loss: float  # the unedited weight
    alone_loss: float | None  # its own delta alone (None: not given)
    merged_loss: float  # the merged weight


@dataclass
class MergeResult:
    delta: EditDelta
    rank: int  # dimension of the union of the rules' directions
    losses: list = field(default_factory=list)  # RuleLoss, in the rules' order
    loss: float = 0.0  # the joint objective, merged
    initial_loss: float = 0.0  # the joint objective, unedited
    steps: int = 0
    stopped_early: bool = False
    seconds: float = 0.0

    def report(self) -> dict:
        """JSON-ready summary (the worker's merge report)."""
        return {
            "layer": self.delta.layer, "rank": self.rank, "rules": len(self.losses),
            "initial_loss": self.initial_loss, "merged_loss": self.loss, "steps": self.steps,
            "stopped_early": self.stopped_early, "seconds": round(self.seconds, 3),
            "per_rule": [vars(loss) for loss in self.losses],
        }


def union_basis(directions, tolerance=DIRECTION_TOLERANCE):
    """Orthonormal rows [R, C] spanning the rows of every tensor in ``directions`` (float64)."""
    stacked = torch.cat([d.detach().to(torch.float64).cpu().reshape(-1, d.shape[-1]) for d in directions])
    if stacked.shape[0] == 0 or not torch.isfinite(stacked).all():
        raise EditRequestError("rank", "the rules' context directions are empty or not finite")
    _, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    return vh[s > tolerance * s[0]]


def merge_rules(model, layer, rules, config=None, base_sha256="", progress=None, should_stop=None, moment=None,
                resume=None):
    """Solve ``rules`` (a list of ``Rule`` on ``layer``) jointly; a ``MergeResult``.

    ``config`` (InsertConfig): ``method`` ``lambda`` (default) or ``closed_form`` (a target
    linear in its weight, as for one edit), steps, lr and loss as for one edit. ``moment``
    (the layer's ``SecondMoment`` or its matrix): the closed form's metric for the least
    change, as in ``rewriting.insert.insert``; None: the least Euclidean change. The
    ``lambda`` method does not use it. ``progress(step, loss)``, ``should_stop()`` (its
    ``Cancelled`` carries an ``InsertState``) and ``resume`` (go on from one: the same rules
    and settings) as in ``rewriting.insert.insert``.
    """
    config = (config or InsertConfig()).validate()
    if config.method not in ("lambda", "closed_form"):
        raise EditRequestError("method", f"a merge is solved with 'lambda' or 'closed_form', not {config.method!r}")
    if not rules:
        raise EditRequestError("rules", "nothing to merge")
    start = time.perf_counter()
    t = target_weight(model, layer)
    w0 = t.weight.detach()
    for rule in rules:
        if rule.targets.layer != t.layer:
            raise IncompatibleError(f"rule {rule.name!r} edits {rule.targets.layer!r}, not {t.layer!r}")
        if rule.directions.shape[-1] != w0.shape[t.in_dim]:
            raise IncompatibleError(f"rule {rule.name!r} has directions over {rule.directions.shape[-1]} "
                                    f"channels; {t.layer!r} has {w0.shape[t.in_dim]}")
        if rule.alone is not None and rule.alone.param != t.param:
            raise IncompatibleError(f"rule {rule.name!r}'s delta is of {rule.alone.param!r}, not {t.param!r}")
    if moment is not None:
        moment = moment_matrix(moment)  # once: a SecondMoment's matrix is divided out on each read
        if moment.shape[0] != w0.shape[t.in_dim]:
            raise IncompatibleError(f"the second moment is over {moment.shape[0]} channels; "
                                    f"{t.layer!r} has {w0.shape[t.in_dim]}")
    q = union_basis([rule.directions for rule in rules]).to(device=w0.device, dtype=w0.dtype)
    loss_fn = _loss_fn(config.loss)
    cases = [(tuple(a.to(w0.device) if torch.is_tensor(a) else a for a in _args(rule.targets.inputs)),
              rule.targets.kwargs, rule.targets.values.detach().to(w0.device), rule.targets.output_crop)
             for rule in rules]

    def rule_loss(i, weight):
        args, kwargs, values, output_crop = cases[i]
        return loss_fn(crop(layer_forward(model, t, args, weight=weight, kwargs=kwargs), output_crop), values)

    def joint_loss(weight):
        return sum(rule_loss(i, weight) for i in range(len(cases))) / len(cases)

    with torch.no_grad():
        initial = joint_loss(w0).item()
    if config.method == "closed_form":
        if resume is not None:
            raise IncompatibleError("closed_form has no steps to resume")
        lam = closed_form(model, t, cases, q, moment)  # every rule's rows stacked
        steps, stopped = 0, False
    else:
        if resume is not None:
            resume.check(config, q, coefficients(w0, q, t.in_dim).shape)
            q = resume.directions.to(q)  # the basis its parameter is expressed in
        lam, steps, stopped, _, _ = _optimize(config, t, w0, q, joint_loss, progress, should_stop, resume)
    merged = w0 + expand(lam, q, t.in_dim)
    losses = []
    with torch.no_grad():
        for i, rule in enumerate(rules):
            alone = None
            if rule.alone is not None:
                update = rule.alone.update(torch.float64).to(device=w0.device)
                alone = rule_loss(i, (w0.to(torch.float64) + update).to(w0.dtype)).item()
            losses.append(RuleLoss(rule.name, rule_loss(i, w0).item(), alone, rule_loss(i, merged).item()))
        final = joint_loss(merged).item()
    delta = EditDelta(layer=t.layer, param=t.param, base_sha256=base_sha256, lam=lam.detach().cpu(),
                      directions=q.detach().cpu(), in_dim=t.in_dim, config={
                          "merge": [rule.name for rule in rules], "method": config.method, "rank": q.shape[0],
                          "initial_loss": initial, "constraint_loss": final, "steps": steps,
                          "rule_deltas": [rule.alone.sha256 if rule.alone is not None else None for rule in rules]})
    return MergeResult(delta=delta, rank=q.shape[0], losses=losses, loss=final, initial_loss=initial, steps=steps,
                       stopped_early=stopped, seconds=time.perf_counter() - start)


def _args(inputs):
    return inputs if isinstance(inputs, tuple) else (inputs,)
