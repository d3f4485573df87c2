"""Copy, paste and erase values on hand-made feature maps."""
import pytest
import torch

from rewriting.values import (
    bounding_box,
    center,
    composite,
    copy_value,
    crop,
    crop_bounds,
    paste_value,
    salient_units,
    zero_units,
)


def box_mask(size, t, l, b, r, value=1.0):
    m = torch.zeros(size)
    m[t:b, l:r] = value
    return m


def test_bounding_box_and_center():
    m = box_mask((8, 8), 2, 3, 5, 7)
    assert bounding_box(m) == (2, 3, 5, 7)
    assert center(m) == (3, 5)
    with pytest.raises(ValueError):
        bounding_box(torch.zeros(4, 4))


def test_copy_value_shapes_and_content():
    values = torch.arange(2 * 8 * 8, dtype=torch.float32).view(1, 2, 8, 8)
    mask = box_mask((8, 8), 1, 2, 4, 6)
    mask[1, 2] = 0.5  # soft corner stays soft in the clip mask
    clip, clip_mask, bounds = copy_value(values, mask)
    assert clip.shape == (1, 2, 3, 4) and clip_mask.shape == (3, 4)
    assert bounds == (1, 2, 4, 6)
    assert torch.equal(clip, values[:, :, 1:4, 2:6])
    assert clip_mask[0, 0] == 0.5


def test_paste_lands_at_paste_region_center():
    base = torch.zeros(1, 3, 16, 16)
    clip = torch.ones(1, 3, 4, 6)
    paste_mask = box_mask((16, 16), 8, 2, 14, 8)  # centre (11, 5)
    target, (t, l, b, r) = paste_value(base, clip, None, center(paste_mask))
    assert (t, l, b, r) == (9, 2, 13, 8)
    assert ((t + b) // 2, (l + r) // 2) == center(paste_mask)
    assert target[:, :, t:b, l:r].eq(1).all()
    assert target.sum() == clip.sum()  # nothing outside the pasted box changed
    assert base.eq(0).all()  # input not modified


def test_paste_is_kept_inside_the_map():
    base = torch.zeros(1, 1, 8, 8)
    clip = torch.ones(1, 1, 4, 4)
    _, bounds = paste_value(base, clip, None, (0, 7))
    assert bounds == (0, 4, 4, 8)


def test_paste_composites_by_soft_mask():
    base = torch.full((1, 1, 8, 8), 2.0)
    clip = torch.full((1, 1, 2, 2), 10.0)
    alpha = torch.tensor([[1.0, 0.5], [0.0, 0.25]])
    target, (t, l, b, r) = paste_value(base, clip, alpha, (4, 4))
    assert torch.allclose(target[0, 0, t:b, l:r], torch.tensor([[10.0, 6.0], [2.0, 4.0]]))


def test_salient_units_ranks_by_normalized_energy():
    # unit 2 is large inside the mask relative to its usual energy; unit 0 is large everywhere.
    keys = torch.zeros(1, 4, 4, 4)
    keys[:, 0] = 3.0
    keys[:, 2, :2, :2] = 2.0
    keys[:, 1] = 0.1
    moment = torch.tensor([9.0, 1.0, 0.25, 1.0])  # E[k^2]: unit 0 is usually 3, unit 2 usually 0.5
    mask = box_mask((4, 4), 0, 0, 2, 2)
    units = salient_units([keys], [mask], moment, 2)
    assert units.tolist() == [2, 0]
    assert zero_units(keys, units)[:, [0, 2]].eq(0).all()
    assert zero_units(keys, units)[:, 1].eq(0.1).all()


def test_composite():
    a, b = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    m = torch.tensor([[1.0, 0.0], [0.5, 0.0]])
    assert torch.equal(composite(a, b, m)[0, 0], m)


@pytest.mark.parametrize(
    "value_bounds, key_size, value_size, expected",
    [
        ((2, 3, 5, 7), (8, 8), (8, 8), ((2, 3, 5, 7), (2, 3, 5, 7))),
        ((3, 3, 5, 6), (4, 4), (8, 8), ((1, 1, 3, 3), (2, 2, 6, 6))),  # upsampling layer
        ((1, 1, 2, 3), (8, 8), (4, 4), ((2, 2, 4, 6), (1, 1, 2, 3))),  # strided layer
    ],
)
def test_crop_bounds_cover_whole_key_cells(value_bounds, key_size, value_size, expected):
    assert crop_bounds(value_bounds, key_size, value_size) == expected
    keys = torch.randn(1, 2, *key_size)
    kb, vb = crop_bounds(value_bounds, key_size, value_size)
    assert crop(keys, kb).shape[2:] == (kb[2] - kb[0], kb[3] - kb[1])
