"""Example requests found in labelled images: here the procedural scenes, whose labels are exact."""
import pytest
import torch

from demo.examples import EDITS, REQUEST_SEEDS, build_requests, find_examples
from demo.scenes import TOP_COLOURS, nearest_top_colour, render_scenes, sample_scenes
from rewriting.requests import parse_request

SIZE = 64


@pytest.fixture(scope="module")
def found():
    return find_examples(*render_scenes(REQUEST_SEEDS, SIZE))


def test_nearest_top_colour_names_each_palette_entry():
    images = (TOP_COLOURS[:, :, None, None].expand(-1, -1, 8, 8) + 0.03) * 2 - 1
    mask = torch.zeros(len(TOP_COLOURS), 8, 8, dtype=torch.bool)
    mask[:, 2:5, 3:6] = True
    images[:, :, 0, 0] = 1  # outside the mask: ignored
    assert nearest_top_colour(images, mask).tolist() == list(range(len(TOP_COLOURS)))


def test_default_pairs_take_the_biggest_tops_first(found):
    requests = build_requests(found, size=SIZE)
    assert set(requests) == set(EDITS) and all(len(pairs) == 5 for pairs in requests.values())
    biggest_dome = max(found["dome"], key=lambda s: (found["dome"][s][0], -s))
    assert requests["dome_to_spire"][0]["paste"]["seed"] == biggest_dome


@pytest.mark.parametrize("edit, src, dst", [("dome_to_spire", "dome", "spire"), ("spire_to_dome", "spire", "dome")])
def test_pairs_across_colours_cover_the_families(found, edit, src, dst):
    pairs = build_requests(found, size=SIZE, across_colours=True)[edit]
    colour = found["colour"]
    paste = [colour[src][r["paste"]["seed"]] for r in pairs]
    copy = [colour[dst][r["copy"]["seed"]] for r in pairs]
    # The scenes draw every palette colour alike, so 5 pairs take 5 families each way.
    assert sorted(paste) == sorted(copy) == list(range(len(TOP_COLOURS)))
    for r, family in zip(pairs, paste):
        assert [colour[src][c["seed"]] for c in r["context"]] == [family] * 3
        assert r["context"][0]["seed"] == r["paste"]["seed"]
        parse_request({**r, "layer": "layer4"})
    seeds = [r["copy"]["seed"] for r in pairs] + [c["seed"] for r in pairs for c in r["context"]]
    assert len(seeds) == len(set(seeds))  # no image serves twice


def test_found_tops_have_their_scenes_colour(found):
    # Read back from its pixels, a scene's largest dome has the palette colour it was drawn with.
    seeds = list(found["dome"])[:40]
    p = sample_scenes(seeds)
    for n, seed in enumerate(seeds):
        _, (y0, x0, y1, x1) = found["dome"][seed]
        centre = (p.building_x0[n] + p.building_x1[n]) / 2 * SIZE
        under = p.building_valid[n] & ~p.is_spire[n] & (centre >= x0) & (centre <= x1 + 1)
        drawn = torch.cdist(p.top_colour[n][under], TOP_COLOURS).argmin(1)
        assert found["colour"]["dome"][seed] in drawn.tolist(), seed
