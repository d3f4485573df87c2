"""Images from seeds, and PNG grids of them (e.g. a before row above an after row)."""
import io

import numpy as np
import torch
from PIL import Image

from rewriting.layers import sample_inputs


def generate(model, seeds, batch_size=16):
    """Images of ``seeds`` from a generator: FloatTensor[N, 3, H, W] in [-1, 1] on the CPU."""
    seeds = list(seeds)
    out = []
    with torch.no_grad():
        for i in range(0, len(seeds), batch_size):
            out.append(model(sample_inputs(model, seeds[i:i + batch_size])).float().cpu())
    return torch.cat(out).clamp(-1, 1)


def to_pil(image):
    """One image [3, H, W] in [-1, 1] as an RGB PIL image."""
    array = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).numpy(), mode="RGB")


def image_grid(images, columns=8, padding=2, scale=1):
    """PNG bytes of ``images`` [N, 3, H, W] in [-1, 1], row-major, ``columns`` per row.

    For before/after rows, pass ``torch.cat([before, after])`` with ``columns=len(before)``.
    ``scale`` enlarges each image by an integer factor (nearest neighbour) for tiny models.
    """
    n, _, h, w = images.shape
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    h, w = h * scale, w * scale
    canvas = np.full((rows * (h + padding) + padding, columns * (w + padding) + padding, 3), 255, np.uint8)
    for i in range(n):
        im = to_pil(images[i])
        if scale != 1:
            im = im.resize((w, h), resample=Image.Resampling.NEAREST)
        y, x = padding + (i // columns) * (h + padding), padding + (i % columns) * (w + padding)
        canvas[y:y + h, x:x + w] = np.asarray(im)
    buf = io.BytesIO()
    Image.fromarray(canvas, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()
