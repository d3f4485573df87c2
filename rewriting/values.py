"""Target values for an edit: what the layer should output at the pasted keys.

Pure functions over tensors [1, C, H, W] (one image) and float masks [H, W]:

- copy: the object region's layer output, cropped to the region's bounding box,
  with the region's soft mask over that box;
- paste: that clip placed at the centre of the paste region of another image,
  composited by the object's soft mask;
- erase: the same layer's output with its most salient key units zeroed,
  composited into the paste region by its soft mask;
- crop: the tight crop of keys and target values around the change, the part
  of the map that the insert step optimizes over.
"""
import math

import torch


def bounding_box(mask):
    """(top, left, bottom, right) of the cells where ``mask`` [H, W] is positive, bottom/right exclusive."""
    rows = torch.nonzero(mask.sum(1) > 0)
    cols = torch.nonzero(mask.sum(0) > 0)
    if len(rows) == 0:
        raise ValueError("empty mask has no bounding box")
    return rows.min().item(), cols.min().item(), rows.max().item() + 1, cols.max().item() + 1


def center(mask):
    """The (row, column) centre of the bounding box of ``mask`` (rounded down)."""
    t, l, b, r = bounding_box(mask)
    return (t + b) // 2, (l + r) // 2


def copy_value(values, mask):
    """The object: ``values`` [1, C, H, W] inside the bounding box of ``mask`` [H, W].

    Returns (clip [1, C, h, w], clip_mask [h, w], bounds).
    """
    t, l, b, r = bounding_box(mask)
    return values[:, :, t:b, l:r], mask[t:b, l:r], (t, l, b, r)


def paste_value(values, clip, clip_mask, at):
    """Paste ``clip`` into ``values`` centred on ``at`` = (row, column), kept inside the map.

    Composited by ``clip_mask`` (soft, [h, w]); None replaces the whole box.
    Returns (target [1, C, H, W], bounds (t, l, b, r) of the pasted box).
    """
    (h, w), (H, W) = clip.shape[2:], values.shape[2:]
    t = max(0, min(H - h, at[0] - h // 2))
    l = max(0, min(W - w, at[1] - w // 2))
    b, r = t + h, l + w
    target = values.clone()
    if clip_mask is None:
        target[:, :, t:b, l:r] = clip
    else:
        alpha = clip_mask.to(values)[None, None]
        target[:, :, t:b, l:r] = (1 - alpha) * values[:, :, t:b, l:r] + alpha * clip
    return target, (t, l, b, r)


def salient_units(keys, masks, unit_moment, count):
    """The ``count`` key units most unusually active inside the masked regions.

    Score of unit u: the mask-weighted mean of k_u^2 / E[k_u^2] over every masked
    location of ``keys`` (list of [1, C, H, W]) and ``masks`` (list of [H, W]);
    ``unit_moment`` [C] is E[k_u^2] over the generator's distribution (the diagonal of
    the keys' second moment). Returns LongTensor[count], most salient first.
    """
    scale = unit_moment.to(keys[0]).clamp_min(1e-20)
    total = torch.zeros_like(scale)
    weight = 0.0
    for k, m in zip(keys, masks):
        m = m.to(k)
        total += (k[0].pow(2) * m[None]).sum((1, 2)) / scale
        weight += m.sum()
    score = total / weight
    count = min(count, score.numel())
    return score.topk(count).indices


def zero_units(keys, units):
    """A copy of ``keys`` [1, C, ...] with channels ``units`` set to zero."""
    out = keys.clone()
    out[:, units] = 0
    return out


def composite(values, replacement, mask):
    """``values`` with ``replacement`` blended in by ``mask`` [H, W] (soft)."""
    alpha = mask.to(values)[None, None]
    return (1 - alpha) * values + alpha * replacement


def crop_bounds(value_bounds, key_size, value_size):
    """Matching crops of the key map and value map around ``value_bounds``.

    The two maps may differ by an integer factor (an upsampling or strided layer);
    the crop is widened so that it covers whole key cells. Returns (key_bounds,
    value_bounds), each (t, l, b, r).
    """
    t, l, b, r = value_bounds
    (hk, wk), (hv, wv) = key_size, value_size
    if hv >= hk:
        fy, fx = hv // hk, wv // wk
        kt, kl, kb, kr = t // fy, l // fx, math.ceil(b / fy), math.ceil(r / fx)
        return (kt, kl, kb, kr), (kt * fy, kl * fx, kb * fy, kr * fx)
    fy, fx = hk // hv, wk // wv
    return (t * fy, l * fx, b * fy, r * fx), (t, l, b, r)


def crop(tensor, bounds):
    """``tensor`` [..., H, W] cropped to (t, l, b, r); all of it for None."""
    if bounds is None:
        return tensor
    t, l, b, r = bounds
    return tensor[..., t:b, l:r]
