"""Edit request parsing: both formats, mask rendering, and field-named errors."""
import base64
import io
import json
import math
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rewriting.errors import EditRequestError, UnknownLayer
from rewriting.requests import (
    EditParams,
    check_layer,
    check_rank,
    count_keys,
    mask_at,
    parse_params,
    parse_request,
)


def png_url(pixels: np.ndarray, mode="RGBA") -> str:
    """A PNG data URL painted the way the rewriting app saves masks: white on transparent."""
    if mode == "RGBA":
        alpha = (pixels * 255).astype(np.uint8)
        rgba = np.stack([alpha, alpha, alpha, alpha], axis=-1)
        im = Image.fromarray(rgba, mode="RGBA")
    else:
        im = Image.fromarray((pixels * 255).astype(np.uint8), mode="L")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def rect(size, x0, y0, x1, y1):
    a = np.zeros((size, size), np.float32)
    a[y0:y1, x0:x1] = 1.0
    return a


def test_original_format_decodes_masks_at_layer_resolution():
    # 256x256 masks as saved by the app; rectangle columns 64..128, rows 32..96.
    obj_mask = png_url(rect(256, 64, 32, 128, 96))
    paste_mask = png_url(rect(256, 128, 128, 192, 224))
    request = parse_request({"object": [11, obj_mask], "paste": [960, paste_mask], "query": [3, obj_mask]})
    assert request.operation == "copy"
    assert request.copy.seed == 11 and request.paste.seed == 960
    # key defaults to the paste region
    assert len(request.context) == 1 and request.context[0].seed == 960
    assert request.params == EditParams()
    at8 = mask_at(request.copy.mask, (8, 8))
    expected = np.zeros((8, 8), np.float32)
    expected[1:3, 2:4] = 1.0
    np.testing.assert_allclose(at8, expected, atol=1e-6)
    paste16 = mask_at(request.paste.mask, (16, 16))
    assert paste16.shape == (16, 16)
    assert paste16.sum() == pytest.approx(4 * 6)
    assert paste16[8:14, 8:12].min() == pytest.approx(1.0)


def test_original_format_keys_and_erase():
    m = png_url(rect(64, 0, 0, 32, 32))
    k = png_url(rect(64, 32, 32, 64, 64))
    request = parse_request({"object": [1, m], "paste": [2, m], "key": [[3, k], [4, k]]})
    assert [r.seed for r in request.context] == [3, 4]
    assert request.seeds == {1, 2, 3, 4}
    erase = parse_request({"paste": [2, m], "key": [[3, k]]})
    assert erase.operation == "erase" and erase.copy is None


def test_original_format_from_json_text():
    # Saved files go through json: pairs become lists, and this must parse unchanged.
    m = png_url(rect(32, 4, 4, 20, 20), mode="L")
    text = json.dumps({"object": [5, m], "paste": [6, m], "key": [[7, m]]})
    request = parse_request(json.loads(text))
    assert mask_at(request.context[0].mask, (32, 32)).sum() == pytest.approx(16 * 16)


@pytest.mark.parametrize("size", [(8, 8), (16, 16), (4, 8), (64, 64)])
def test_box_and_png_masks_agree_on_aligned_grid(size):
    # box [0.25, 0.125, 0.75, 0.5] drawn on a 64x64 PNG: columns 16..48, rows 8..32
    box = parse_request({"paste": {"seed": 0, "mask": [0.25, 0.125, 0.75, 0.5]}, "operation": "erase"})
    png = parse_request({"paste": {"seed": 0, "mask": png_url(rect(64, 16, 8, 48, 32))}, "operation": "erase"})
    np.testing.assert_allclose(mask_at(box.paste.mask, size), mask_at(png.paste.mask, size), atol=1e-5)


def test_box_and_png_masks_agree_off_grid():
    box = parse_request({"paste": {"seed": 0, "mask": [0.25, 0.125, 0.75, 0.5]}, "operation": "erase"})
    png = parse_request({"paste": {"seed": 0, "mask": png_url(rect(64, 16, 8, 48, 32))}, "operation": "erase"})
    a, b = mask_at(box.paste.mask, (5, 7)), mask_at(png.paste.mask, (5, 7))
    np.testing.assert_allclose(a, b, atol=0.05)
    assert a.sum() == pytest.approx(5 * 7 * 0.5 * 0.375)


def test_box_coverage_is_fractional():
    request = parse_request({"paste": {"seed": 0, "mask": [0.1, 0.0, 0.5, 1.0]}, "operation": "erase"})
    row = mask_at(request.paste.mask, (1, 4))[0]
    np.testing.assert_allclose(row, [0.6, 1.0, 0.0, 0.0], atol=1e-6)


def test_native_round_trip_and_defaults():
    m = png_url(rect(16, 2, 2, 8, 8))
    obj = {
        "operation": "copy",
        "copy": {"seed": 11, "mask": [0.1, 0.1, 0.4, 0.4]},
        "paste": {"seed": 7, "mask": m},
        "context": [{"seed": 8, "mask": [0.0, 0.0, 1.0, 0.5]}, {"seed": 9, "mask": m}],
        "layer": "layer3",
        "params": {"rank": 2, "lr": 0.01, "steps": 50, "method": "lambda"},
    }
    request = parse_request(obj)
    assert request.params == EditParams(rank=2, lr=0.01, steps=50, method="lambda")
    assert request.layer == "layer3"
    again = parse_request(json.loads(json.dumps(request.to_json())))
    assert again == request
    assert again.to_json() == request.to_json()
    # Defaults: copy operation, context = paste.
    short = parse_request({"copy": obj["copy"], "paste": obj["paste"]})
    assert short.operation == "copy" and short.context == (short.paste,)


def test_params_override():
    request = parse_request({"paste": {"seed": 1, "mask": [0, 0, 1, 1]}, "operation": "erase",
                             "params": {"rank": 2}}, params={"lr": 0.5})
    assert request.params.rank == 2 and request.params.lr == 0.5
    # whole-number floats from JSON are accepted as integers
    assert parse_params({"steps": 10.0}).steps == 10
    # zero patience (never stop early) and zero tolerance are allowed
    assert parse_params({"plateau_patience": 0, "plateau_tolerance": 0}).plateau_patience == 0


EMPTY_PNG = png_url(np.zeros((16, 16), np.float32))
BOX = [0.0, 0.0, 0.5, 0.5]


@pytest.mark.parametrize(
    "payload, field",
    [
        ({"copy": {"seed": 1, "mask": BOX}, "paste": {"seed": 2, "mask": [0.5, 0.5, 0.5, 0.9]}}, "paste.mask"),
        ({"copy": {"seed": 1, "mask": BOX}, "paste": {"seed": 2, "mask": EMPTY_PNG}}, "paste.mask"),
        ({"object": [1, EMPTY_PNG], "paste": [2, png_url(rect(16, 0, 0, 4, 4))]}, "object.mask"),
        ({"object": [1, BOX], "paste": [2, BOX], "key": [[3, EMPTY_PNG]]}, "key[0].mask"),
        ({"copy": {"seed": 1, "mask": BOX}, "paste": {"seed": 2, "mask": BOX},
          "context": [{"seed": 3, "mask": BOX}, {"seed": 4, "mask": EMPTY_PNG}]}, "context[1].mask"),
        ({"copy": {"seed": 1, "mask": BOX}, "paste": {"seed": 2, "mask": BOX}, "params": {"lr": math.nan}},
         "params.lr"),
        ({"copy": {"seed": 1, "mask": BOX}, "paste": {"seed": 2, "mask": BOX}, "params": {"lr": math.inf}},
         "params.lr"),
        ({"copy": {"seed": 1, "mask": BOX}, "paste": {"seed": 2, "mask": BOX}, "params": {"rank": 0}},
         "params.rank"),
        ({"copy": {"seed": 1, "mask": BOX}, "paste": {"seed": 2, "mask": BOX}, "params": {"rank": 1.5}},
         "params.rank"),
        ({"copy": {"seed": 1, "mask": BOX}, "paste": {"seed": 2, "mask": BOX}, "params": {"rank": "all"}},
         "params.rank"),
        ({"copy": {"seed": 1, "mask": BOX}, "paste": {"seed": 2, "mask": BOX}, "params": {"rank": True}},
         "params.rank"),
        ({"copy": {"seed": 1, "mask": BOX}, "paste": {"seed": 2, "mask": BOX}, "params": {"method": "x"}},
         "params.method"),
        ({"copy": {"seed": 1, "mask": BOX}, "paste": {"seed": 2, "mask": BOX}, "params": {"bogus": 1}},
         "params.bogus"),
        ({"copy": {"seed": 1, "mask": BOX}, "paste": {"seed": 2, "mask": BOX}, "params": {"lr": 1000}},
         "params.lr"),
        ({"copy": {"seed": 1, "mask": BOX}, "paste": {"seed": 2, "mask": BOX}, "params": {"lr": "0.1"}},
         "params.lr"),
        ({"copy": {"seed": 1, "mask": BOX}, "paste": {"seed": 2, "mask": BOX},
          "params": {"plateau_tolerance": 1.0}}, "params.plateau_tolerance"),
        ({"copy": {"seed": 1, "mask": BOX}, "paste": {"seed": 2, "mask": BOX}, "params": {"loss": "huber"}},
         "params.loss"),
        ({"copy": {"seed": 1, "mask": BOX}, "paste": {"seed": 2, "mask": BOX}, "params": {"tight_paste": 1}},
         "params.tight_paste"),
        ({"copy": {"seed": 1, "mask": BOX}, "paste": {"seed": 2, "mask": [0, 0, 1, math.nan]}}, "paste.mask"),
        ({"copy": {"seed": 1, "mask": BOX}, "paste": {"seed": 2, "mask": [0, 0, 1.5, 1]}}, "paste.mask"),
        ({"copy": {"seed": 1, "mask": BOX}, "paste": {"seed": 2, "mask": "data:image/png;base64,!!!"}},
         "paste.mask"),
        ({"copy": {"seed": 1, "mask": BOX}, "paste": {"seed": 2, "mask": "data:image/png;base64,aGVsbG8="}},
         "paste.mask"),
        ({"copy": {"seed": -1, "mask": BOX}, "paste": {"seed": 2, "mask": BOX}}, "copy.seed"),
        ({"copy": {"seed": True, "mask": BOX}, "paste": {"seed": 2, "mask": BOX}}, "copy.seed"),
        ({"paste": {"seed": 2, "mask": BOX}}, "copy"),
        ({"copy": {"seed": 1, "mask": BOX}}, "paste"),
        ({"copy": {"seed": 1}, "paste": {"seed": 2, "mask": BOX}}, "copy.mask"),
        ({"copy": {"seed": 1, "mask": BOX}, "paste": {"seed": 2, "mask": BOX}, "operation": "smear"}, "operation"),
        ({"copy": {"seed": 1, "mask": BOX}, "paste": {"seed": 2, "mask": BOX}, "extra": 1}, "extra"),
        ({"copy": {"seed": 1, "mask": BOX}, "paste": {"seed": 2, "mask": BOX}, "context": []}, "context"),
        ({"object": [1, BOX], "paste": [2]}, "paste"),
        ([1, 2], "request"),
    ],
)
def test_bad_requests_name_the_field(payload, field):
    with pytest.raises(EditRequestError) as info:
        parse_request(payload)
    assert info.value.field == field
    assert field in str(info.value)


def test_unknown_layer_lists_valid_ones():
    with pytest.raises(UnknownLayer) as info:
        check_layer("layer9", ["layer1", "layer2"])
    assert info.value.field == "layer" and info.value.code == "unknown_layer"
    assert "layer1, layer2" in str(info.value)
    check_layer("layer2", ["layer1", "layer2"])


def test_rank_above_number_of_keys():
    # A quarter-image box at 4x4 covers 4 key locations: rank 4 is fine, 5 is not.
    ok = parse_request({"paste": {"seed": 2, "mask": BOX}, "operation": "erase", "params": {"rank": 4}})
    assert count_keys(ok, (4, 4)) == 4
    check_rank(ok, (4, 4), key_channels=16)
    bad = parse_request({"paste": {"seed": 2, "mask": BOX}, "operation": "erase", "params": {"rank": 5}})
    with pytest.raises(EditRequestError) as info:
        check_rank(bad, (4, 4), key_channels=16)
    assert info.value.field == "params.rank" and "4" in str(info.value)
    with pytest.raises(EditRequestError) as info:
        check_rank(ok, (8, 8), key_channels=3)
    assert info.value.field == "params.rank"
    # "full" takes every key direction, however few context keys there are
    full = parse_request({"paste": {"seed": 2, "mask": BOX}, "operation": "erase", "params": {"rank": "full"}})
    assert full.params.rank == "full" and full.to_json()["params"]["rank"] == "full"
    check_rank(full, (4, 4), key_channels=16)


def test_requests_module_does_not_import_torch():
    # The web front end validates requests and must never import torch.
    import subprocess
    import sys

    code = "import sys, rewriting.requests; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_parameter_is_documented_with_its_default():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "requests.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| ([^|]+) \|", doc, re.M))
    for name, default in asdict(EditParams()).items():
        assert name in rows, f"{name} is missing from docs/requests.md's parameter table"
        assert rows[name].strip() == _doc_value(default), f"{name}: the table says {rows[name].strip()}"


def _doc_value(value):
    """How the table writes a default: strings as `"word"`, true/false and numbers bare."""
    if isinstance(value, str):
        return f'`"{value}"`'
    return json.dumps(value)
