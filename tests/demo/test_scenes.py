"""The procedural world: deterministic by seed, and its rules hold in every scene."""
import torch

from demo.scenes import (BUILDING, CLASSES, DOME, GROUND, SPIRE, TOP_COLOURS, TREE, paint_scenes, render_scenes,
                         sample_scenes)

SEEDS = range(300)
SIZE = 64


def test_images_and_labels_have_the_promised_form():
    images, labels = render_scenes(range(4), SIZE)
    assert images.shape == (4, 3, SIZE, SIZE) and images.dtype == torch.float32
    assert labels.shape == (4, SIZE, SIZE) and labels.dtype == torch.long
    assert images.min() >= -1 and images.max() <= 1
    assert CLASSES == ("sky", "ground", "building", "dome", "spire", "tree")
    _, many = render_scenes(SEEDS, SIZE)
    assert set(many.unique().tolist()) == set(range(len(CLASSES)))


def test_a_scene_depends_on_its_seed_alone():
    a, la = render_scenes([7, 8, 9], SIZE)
    b, lb = render_scenes([9, 7], SIZE)  # another batch, another order
    assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1])
    assert torch.equal(la[2], lb[0]) and torch.equal(la[0], lb[1])
    c, _ = render_scenes([10], SIZE)
    assert not torch.equal(a[0], c[0])


def test_every_building_wears_a_large_top():
    p = sample_scenes(SEEDS)
    _, labels = paint_scenes(p, SIZE)
    x = (torch.arange(SIZE) + 0.5) / SIZE
    checked = 0
    for i in range(len(SEEDS)):
        for b in torch.nonzero(p.building_valid[i]).flatten().tolist():
            width = (p.building_x1[i, b] - p.building_x0[i, b]).item()
            radius = p.top_radius[i, b].item()
            assert width >= 0.2 - 1e-6, "a building at least a fifth of the image wide"
            assert radius >= 0.6 * width - 1e-6, "a dome radius of at least 0.6 of the building's width"
            cx = (p.building_x0[i, b] + p.building_x1[i, b]).item() / 2
            cols = (x >= cx - radius) & (x <= cx + radius)
            top_row = int(p.building_top[i, b].item() * SIZE)
            region = labels[i, :top_row + 1][:, cols]
            cls = SPIRE if p.is_spire[i, b] else DOME
            # At least one 8x8 cell's worth of pixels: the 8x8 feature layer sees every top.
            assert (region == cls).sum() >= 64
            assert (labels[i][:, cols] == BUILDING).any()
            checked += 1
    assert checked > 400


def test_trees_stand_on_the_ground():
    p = sample_scenes(SEEDS)
    _, labels = paint_scenes(p, SIZE)
    trees = on_ground = 0
    for i, k in torch.nonzero(p.tree_valid).tolist():
        base = p.tree_base[i, k].item()
        assert base > p.horizon[i].item()
        col = min(int(p.tree_x[i, k].item() * SIZE), SIZE - 1)
        below = labels[i, min(int(base * SIZE) + 1, SIZE - 1), col]
        assert labels[i, int(base * SIZE) - 1, col] == TREE
        # Below the foot: ground, or a second tree standing in front of this one.
        assert below in (GROUND, TREE)
        on_ground += int(below == GROUND)
        trees += 1
    assert trees > 50 and on_ground >= 0.9 * trees


def test_domes_and_spires_share_one_palette():
    p = sample_scenes(SEEDS)
    colours = p.top_colour[p.building_valid]
    spire = p.is_spire[p.building_valid]
    nearest = torch.cdist(colours, TOP_COLOURS).argmin(1)
    assert set(nearest[spire].tolist()) == set(nearest[~spire].tolist()) == set(range(len(TOP_COLOURS)))
    # About as many of each: shape alone tells them apart, and both are common.
    assert 0.35 < spire.float().mean() < 0.65
