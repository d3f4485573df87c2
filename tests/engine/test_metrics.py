"""Edit metrics on a hand-made segmenter and fixed-image generators, with values worked out by hand."""
import math

import pytest
import torch
from torch import nn

from rewriting.metrics import (
    EditMetrics,
    constraint_loss,
    edit_metrics,
    edit_success,
    feature_distance,
    held_out_seeds,
    segment,
    unwanted_pixel_change,
)
from rewriting.requests import parse_request

DOME, SPIRE, SKY = 3, 4, 0


class ColourSegmenter(nn.Module):
    """Calls a pixel dome if it is red, spire if green, else sky; its features are the pixels."""

    feature_layer = "features"

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(3, 3, 1, bias=False)
        with torch.no_grad():
            self.features.weight.copy_(torch.eye(3)[:, :, None, None])

    def forward(self, images):
        f = self.features(images)
        logits = torch.full((f.shape[0], 6, *f.shape[2:]), -10.0)
        logits[:, SKY] = 0.5
        logits[:, DOME] = f[:, 0]
        logits[:, SPIRE] = f[:, 1]
        return logits


class FixedImage(nn.Module):
    """A 'generator' that draws the same image for every latent."""

    def __init__(self, image):
        super().__init__()
        self.z_dim = 4
        self.image = nn.Parameter(image[None], requires_grad=False)

    def forward(self, z):
        return self.image.expand(z.shape[0], -1, -1, -1)


def scenes():
    # 4x4: left half red (dome), right half black (sky).
    before = torch.full((3, 4, 4), -1.0)
    before[0, :, :2] = 1.0
    after = before.clone()
    after[0, :2, :2] = -1.0  # top of the dome turns green: spire
    after[1, :2, :2] = 1.0
    after[2, 3, 3] = 1.0  # one sky pixel turns blue (still sky): an unwanted change
    return before, after


def test_edit_metrics_known_values():
    before, after = scenes()
    metrics = edit_metrics(FixedImage(before), FixedImage(after), ColourSegmenter(), seeds=[100, 101],
                           source_class=DOME, target_class=SPIRE)
    assert isinstance(metrics, EditMetrics)
    assert metrics.seeds == [100, 101]
    assert metrics.source_pixels == 16  # 8 dome pixels in each of 2 images
    assert metrics.edit_success == pytest.approx(0.5)
    # 8 outside pixels per image, one changed by 2 (of range 2) in 1 of 3 channels.
    assert metrics.unwanted_pixel_change == pytest.approx((1 / 3) / 8)
    # Unit vectors (-1,-1,-1)/sqrt3 -> (-1,-1,1)/sqrt3 differ by 2/sqrt3, at 1 of 8 outside cells.
    assert metrics.unwanted_feature_distance == pytest.approx(2 / math.sqrt(3) / 8, rel=1e-5)
    assert metrics.constraint_loss is None
    assert metrics.to_json()["edit_success"] == pytest.approx(0.5)


def test_no_change_scores_zero():
    before, _ = scenes()
    m = edit_metrics(FixedImage(before), FixedImage(before), ColourSegmenter(), seeds=[5],
                     source_class=DOME, target_class=SPIRE)
    assert m.edit_success == 0.0 and m.unwanted_pixel_change == 0.0
    assert m.unwanted_feature_distance == pytest.approx(0.0, abs=1e-6)


def test_erase_success_counts_any_other_class():
    before, after = scenes()
    labels_before, _ = segment(ColourSegmenter(), before[None])
    labels_after, _ = segment(ColourSegmenter(), after[None])
    assert edit_success(labels_before, labels_after, DOME, None) == (0.5, 8)
    assert edit_success(labels_before, labels_after, SKY, SPIRE) == (0.0, 8)
    assert edit_success(labels_before, labels_after, 5, None) == (None, 0)


def test_feature_layer_is_a_parameter():
    before, after = scenes()
    seg = ColourSegmenter()
    _, feats = segment(seg, before[None])  # the segmenter's own feature_layer
    assert feats.shape == (1, 3, 4, 4)
    _, feats = segment(seg, before[None], feature_layer="features")
    assert feats.shape == (1, 3, 4, 4)
    with pytest.raises(LookupError):
        segment(seg, before[None], feature_layer="encoder.block9")


def test_feature_distance_is_area_weighted_at_lower_resolution():
    before = torch.zeros(1, 2, 2, 2)
    before[:, 0] = 1.0
    after = before.clone()
    after[0, :, 0, 0] = torch.tensor([0.0, 1.0])  # one cell turns 90 degrees: distance sqrt2
    outside = torch.ones(1, 4, 4, dtype=torch.bool)
    outside[0, :1, :2] = False  # half of cell (0, 0) is inside the region
    expected = 0.5 * math.sqrt(2) / (0.5 + 3)
    assert feature_distance(before, after, outside) == pytest.approx(expected, rel=1e-5)
    assert feature_distance(before, after, torch.zeros(1, 4, 4, dtype=torch.bool)) is None
    assert unwanted_pixel_change(before, after, torch.zeros(1, 2, 2, dtype=torch.bool)) is None


def test_held_out_seeds_avoid_the_request():
    request = parse_request({"object": [1000000, [0, 0, 1, 1]], "paste": [1000002, [0, 0, 1, 1]],
                             "key": [[1000003, [0, 0, 0.5, 0.5]]]})
    assert held_out_seeds(request, 3) == [1000001, 1000004, 1000005]
    before, _ = scenes()
    with pytest.raises(ValueError, match="held-out"):
        edit_metrics(FixedImage(before), FixedImage(before), ColourSegmenter(), seeds=[7, 1000002],
                     source_class=DOME, request=request)


def test_constraint_loss_is_mean_absolute_error():
    model = nn.Sequential()
    model.add_module("layer", nn.Conv2d(2, 2, 1, bias=False))
    with torch.no_grad():
        model.layer.weight.copy_(torch.eye(2)[:, :, None, None])
    keys = torch.ones(1, 2, 3, 3)
    values = torch.full((1, 2, 3, 3), 1.5)
    assert constraint_loss(model, "layer", (keys,), values) == pytest.approx(0.5)


def test_constraint_loss_of_a_real_edit():
    from rewriting.delta import applied
    from rewriting.edit import run_edit

    from .edit_fixtures import LAYER, copy_request, engine_device, tiny_generator, tiny_moment

    model = tiny_generator().to(engine_device())
    result = run_edit(model, LAYER, copy_request(steps=50), tiny_moment(model))
    request = parse_request(copy_request())
    seeds = held_out_seeds(request, 2)
    with applied(tiny_generator().to(engine_device()), [result.delta]) as edited:
        m = edit_metrics(model, edited, ColourSegmenter(), seeds, source_class=DOME, target_class=SPIRE,
                         request=request, targets=result.targets)
    assert m.constraint_loss == pytest.approx(result.constraint_loss, rel=1e-4)
    assert m.seeds == seeds and not set(seeds) & request.seeds
    assert m.unwanted_pixel_change > 0  # a real edit changes held-out images somewhat
