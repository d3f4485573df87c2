"""Images from seeds and PNG grids."""
import io

import numpy as np
import torch
from PIL import Image

from rewriting.render import generate, image_grid, to_pil
from rewriting.seeds import latents

from .tiny_models import build


def test_generate_is_deterministic_per_seed_and_batch_independent():
    model = build("equalized")
    a = generate(model, [3, 4, 5], batch_size=2)
    b = generate(model, [5], batch_size=1)
    assert a.shape == (3, 3, 16, 16) and a.device.type == "cpu"
    assert torch.allclose(a[2], b[0], atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(a, model(latents([3, 4, 5], model.z_dim)), atol=1e-5)


def test_image_grid_layout_before_after_rows():
    before = torch.full((3, 3, 4, 4), -1.0)  # black
    after = torch.full((3, 3, 4, 4), 1.0)  # white
    png = image_grid(torch.cat([before, after]), columns=3, padding=1, scale=2)
    im = np.asarray(Image.open(io.BytesIO(png)))
    # 2 rows x 3 columns of 8x8 tiles with 1px padding.
    assert im.shape == (2 * 9 + 1, 3 * 9 + 1, 3)
    assert (im[1:9, 1:9] == 0).all()  # first row: before (black)
    assert (im[10:18, 1:9] == 255).all()  # second row: after (white)


def test_to_pil_maps_range():
    image = torch.tensor([-1.0, 0.0, 1.0]).view(3, 1, 1)
    assert to_pil(image).getpixel((0, 0)) == (0, 128, 255)
