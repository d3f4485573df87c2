"""Edit metrics, after the paper's quantitative section, on held-out seeds.

Given the generator before and after an edit and a segmenter (any module mapping
images in [-1, 1] to logits [N, classes, H, W]), over seeds never used as copy,
paste or context:

- edit success: of the pixels the segmenter calls the source class (e.g. dome)
  before the edit, the fraction it calls the target class (e.g. spire) after it
  (or, with no target class, anything but the source class: an erase);
- unwanted change outside the source-class region: the mean absolute pixel change
  (images scaled to [0, 1], averaged over channels), and a feature distance: at each
  location of a named segmenter layer, the distance between the unit-normalized
  feature vectors before and after (as in LPIPS; in [0, 2]), averaged over the
  locations outside the region (weighted by the fraction of each cell outside);
- constraint loss: the mean absolute error between the edited layer's output at
  the pasted keys and the target values (the quantity the insert step minimizes).
"""
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from rewriting.layers import get_module, layer_forward, model_device
from rewriting.render import generate
from rewriting.values import crop


def feature_layer_of(segmenter, feature_layer=None):
    """The segmenter layer compared for the feature distance: ``feature_layer`` if given,
    else the segmenter's own ``feature_layer`` attribute (the demo segmenter sets one)."""
    name = feature_layer or getattr(segmenter, "feature_layer", None)
    if not name:
        raise ValueError("name the segmenter layer for the feature distance (feature_layer=...)")
    return name


@dataclass(frozen=True)
class EditMetrics:
    seeds: list  # the held-out seeds measured
    source_pixels: int  # pixels of the source class before the edit, over all seeds
    edit_success: float | None  # None when no pixel is of the source class
    unwanted_pixel_change: float | None  # None when every pixel is of the source class
    unwanted_feature_distance: float | None
    constraint_loss: float | None = None

    def to_json(self) -> dict:
        return asdict(self)


def held_out_seeds(request, count, start=1_000_000):
    """``count`` seeds from ``start`` up, skipping every seed the request uses."""
    used = request.seeds if request is not None else set()
    seeds, s = [], start
    while len(seeds) < count:
        if s not in used:
            seeds.append(s)
        s += 1
    return seeds


def segment(segmenter, images, feature_layer=None, batch_size=8):
    """Labels [N, H, W] (argmax of the logits) and the ``feature_layer`` output [N, C, h, w], on the CPU.

    The features are read by a forward hook that is removed even on error.
    """
    module = get_module(segmenter, feature_layer_of(segmenter, feature_layer))
    captured = []
    handle = module.register_forward_hook(lambda m, args, out: captured.append(out.detach().float().cpu()))
    device = model_device(segmenter)
    labels = []
    try:
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                logits = segmenter(images[i:i + batch_size].to(device))
                if logits.shape[2:] != images.shape[2:]:  # label every pixel of the image
                    logits = F.interpolate(logits.float(), size=images.shape[2:], mode="bilinear")
                labels.append(logits.argmax(1).cpu())
    finally:
        handle.remove()
    return torch.cat(labels), torch.cat(captured)


def edit_success(before_labels, after_labels, source_class, target_class=None):
    """(fraction of source-class pixels that became the target class, number of source pixels).

    With ``target_class`` None, the fraction that is no longer the source class.
    """
    source = before_labels == source_class
    count = int(source.sum())
    if count == 0:
        return None, 0
    after = after_labels[source]
    hit = (after != source_class) if target_class is None else (after == target_class)
    return hit.float().mean().item(), count


def unwanted_pixel_change(before, after, outside):
    """Mean |after - before| over ``outside`` pixels ([N, H, W] bool), images in [-1, 1] read as [0, 1]."""
    outside = outside.to(before.device)
    if not outside.any():
        return None
    change = (after - before).abs().mean(1) / 2  # [-1, 1] -> [0, 1] scale, mean over channels
    return change[outside].mean().item()


def feature_distance(before, after, outside):
    """Mean distance of unit-normalized features [N, C, h, w] over ``outside`` ([N, H, W] bool).

    ``outside`` is area-averaged to the feature resolution and used as a weight.
    """
    weight = F.adaptive_avg_pool2d(outside.float()[:, None], before.shape[2:])[:, 0]
    if weight.sum() == 0:
        return None
    d = (F.normalize(after, dim=1, eps=1e-10) - F.normalize(before, dim=1, eps=1e-10)).norm(dim=1)
    return ((d * weight).sum() / weight.sum()).item()


def constraint_loss(model, layer, inputs, values, kwargs=None, output_crop=None):
    """Mean absolute error between ``layer``'s output on ``inputs`` (cut to ``output_crop``,
    see ``EditTargets``) and the target ``values``."""
    with torch.no_grad():
        out = crop(layer_forward(model, layer, inputs, kwargs=kwargs), output_crop)
        return F.l1_loss(out, values.to(out)).item()


def edit_metrics(base, edited, segmenter, seeds, source_class, target_class=None,
                 feature_layer=None, request=None, targets=None, batch_size=8):
    """Measure an edit over ``seeds`` (refused if ``request`` uses any of them).

    ``base`` and ``edited`` are the generator before and after; the classes are the
    segmenter's channel indices; ``feature_layer`` defaults to the segmenter's own
    ``feature_layer`` attribute. With ``targets`` (``EditResult.targets``) the
    constraint loss of ``edited`` at the pasted keys is measured too.
    """
    seeds = list(seeds)
    if request is not None and request.seeds & set(seeds):
        raise ValueError(f"seeds {sorted(request.seeds & set(seeds))} are used by the edit; metrics need held-out seeds")
    before = generate(base, seeds, batch_size)
    after = generate(edited, seeds, batch_size)
    before_labels, before_features = segment(segmenter, before, feature_layer, batch_size)
    after_labels, after_features = segment(segmenter, after, feature_layer, batch_size)
    success, count = edit_success(before_labels, after_labels, source_class, target_class)
    outside = before_labels != source_class
    return EditMetrics(
        seeds=seeds,
        source_pixels=count,
        edit_success=success,
        unwanted_pixel_change=unwanted_pixel_change(before, after, outside),
        unwanted_feature_distance=feature_distance(before_features, after_features, outside),
        constraint_loss=None if targets is None else constraint_loss(
            edited, targets.layer, targets.inputs, targets.values, targets.kwargs, targets.output_crop),
    )
