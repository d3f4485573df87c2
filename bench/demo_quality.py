"""Quality of the shipped demo generator, measured with the shipped segmenter.

    python bench/demo_quality.py [--samples 1000]

Prints, for generated images (latent seeds 0..N-1) and procedural scenes (scene seeds
0..N-1, never trained on): the share of pixels of each class, the share of images
showing each class, and the Frechet distance between segmenter features (the
``feature_layer`` output, averaged over positions) of the two sets, next to the
distance between two disjoint sets of real scenes of the same size (its noise floor).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demo.artifacts import GENERATOR_PATH, SEGMENTER_PATH, load_weights  # noqa: E402
from demo.scenes import CLASSES, render_scenes  # noqa: E402
from rewriting.metrics import segment  # noqa: E402
from rewriting.render import generate  # noqa: E402


def frechet(a, b):
    """Frechet distance between Gaussians fitted to feature rows ``a`` and ``b``."""
    a, b = a.double(), b.double()
    mu = (a.mean(0) - b.mean(0)).pow(2).sum()
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(ca)
    root_a = v @ torch.diag(w.clamp_min(0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ cb @ root_a).clamp_min(0).sqrt().sum()
    return (mu + ca.trace() + cb.trace() - 2 * cross).item()


def describe(labels):
    pixels = torch.bincount(labels.flatten(), minlength=len(CLASSES)).double() / labels.numel()
    shown = torch.stack([(labels == c).flatten(1).sum(1) >= 20 for c in range(len(CLASSES))], 1).double().mean(0)
    return {c: {"pixels": round(pixels[i].item(), 4), "images": round(shown[i].item(), 3)}
            for i, c in enumerate(CLASSES)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=1000)
    args = parser.parse_args(argv)
    n = args.samples
    G, S = load_weights(GENERATOR_PATH), load_weights(SEGMENTER_PATH)
    fake = generate(G, range(n), 50)
    real, _ = render_scenes(range(n), 64)
    other, _ = render_scenes(range(n, 2 * n), 64)
    (fl, ff), (rl, rf), (_, of) = (segment(S, x, batch_size=50) for x in (fake, real, other))
    report = {
        "samples": n,
        "generated": describe(fl),
        "real": describe(rl),
        "frechet_segmenter_features": {"generated_vs_real": round(frechet(ff.mean((2, 3)), rf.mean((2, 3))), 4),
                                       "real_vs_real": round(frechet(of.mean((2, 3)), rf.mean((2, 3))), 4)},
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
