"""Quality of a demo generator (the shipped one by default), measured with the shipped segmenter.

    python bench/demo_quality.py [--samples 1000] [--model demo/weights/generator.safetensors]

Prints, for generated images (latent seeds 0..N-1) and procedural scenes (scene seeds
0..N-1, never trained on): the share of pixels of each class, the share of images
showing each class, and the Frechet distance between segmenter features (the
``feature_layer`` output, averaged over positions) of the two sets, next to the
distance between two disjoint sets of real scenes of the same size (its noise floor).

Also near-duplicates, which the Frechet distance of pooled features hardly sees: the
share of images with another of the same set within an RMS pixel difference of 0.03 and
0.05 (images on [-1, 1]), the median distance to the nearest other image, and, for the
generated twins (pairs within 0.05), the mean cosine between their latents: near 1 when
close latents draw close images, near 0 when unrelated latents draw the same image
(mode collapse); and, block by block, how far apart the twins' features are, as a
fraction of how far apart an image's and a random other image's are: where that
fraction drops is where the generator merges distinct latents.
"""
import argparse
import json
import sys
from contextlib import ExitStack
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demo.artifacts import GENERATOR_PATH, SEGMENTER_PATH, load_weights  # noqa: E402
from demo.scenes import CLASSES, render_scenes  # noqa: E402
from rewriting.layers import Trace, sample_inputs  # noqa: E402
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


TWIN = 0.05  # RMS pixel distance (images on [-1, 1]) within which two images are twins


def nearest_others(images):
    """Each image's RMS pixel distance to its nearest other image in the set, and which one."""
    flat = images.flatten(1).double()
    dist = torch.cdist(flat, flat) / flat.shape[1] ** 0.5
    dist.fill_diagonal_(float("inf"))
    return dist.min(1)


def near_duplicates(nearest, index, latents=None):
    report = {f"share_within_{t}": round((nearest < t).double().mean().item(), 3) for t in (0.03, TWIN)}
    report["median_nearest"] = round(nearest.median().item(), 4)
    twins = (nearest < TWIN).nonzero().flatten()
    if latents is not None and len(twins):
        cosine = torch.cosine_similarity(latents[twins], latents[index[twins]], dim=1)
        report["twin_latent_cosine_mean"] = round(cosine.mean().item(), 3)
    return report


def block_outputs(G, seeds, blocks):
    """{block: its output for ``seeds``, one row per image}, from one forward pass."""
    with ExitStack() as stack, torch.no_grad():
        traces = {name: stack.enter_context(Trace(G, name)) for name in blocks}
        G(sample_inputs(G, seeds))
    return {name: trace.output.flatten(1) for name, trace in traces.items()}


def collapse_by_block(G, nearest, index, max_pairs=200, batch_size=50):
    """Twins' feature distance over random pairs', for each ``layerN`` block of a demo-gan.

    The generated set is latent seeds 0..N-1, so an image's index is its seed. Each
    figure is the median distance from an image to its twin over the median distance
    from the same image to a random other one.
    """
    twins = (nearest < TWIN).nonzero().flatten()[:max_pairs].tolist()
    if not twins:
        return {}
    partners = {"twin": index[twins].tolist(),
                "random": torch.randperm(len(nearest), generator=torch.Generator().manual_seed(0))[:len(twins)].tolist()}
    blocks = [name for name in G.blocks if name.startswith("layer")]
    dists = {kind: {name: [] for name in blocks} for kind in partners}
    for i in range(0, len(twins), batch_size):
        own = block_outputs(G, twins[i:i + batch_size], blocks)
        for kind, seeds in partners.items():
            other = block_outputs(G, seeds[i:i + batch_size], blocks)
            for name in blocks:
                dists[kind][name].append((own[name] - other[name]).norm(dim=1))
    median = {kind: {name: torch.cat(d).median().item() for name, d in by_block.items()}
              for kind, by_block in dists.items()}
    return {name: round(median["twin"][name] / median["random"][name], 3) for name in blocks}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--model", default=str(GENERATOR_PATH), help="a generator checkpoint (demo-gan)")
    args = parser.parse_args(argv)
    n = args.samples
    G, S = load_weights(args.model), load_weights(SEGMENTER_PATH)
    fake = generate(G, range(n), 50)
    real, _ = render_scenes(range(n), 64)
    other, _ = render_scenes(range(n, 2 * n), 64)
    (fl, ff), (rl, rf), (_, of) = (segment(S, x, batch_size=50) for x in (fake, real, other))
    fake_nearest, real_nearest = nearest_others(fake), nearest_others(real)
    report = {
        "samples": n,
        "generated": describe(fl),
        "real": describe(rl),
        "frechet_segmenter_features": {"generated_vs_real": round(frechet(ff.mean((2, 3)), rf.mean((2, 3))), 4),
                                       "real_vs_real": round(frechet(of.mean((2, 3)), rf.mean((2, 3))), 4)},
        "near_duplicates": {"generated": near_duplicates(*fake_nearest, sample_inputs(G, range(n))),
                            "real": near_duplicates(*real_nearest),
                            "twin_over_random_feature_distance": collapse_by_block(G, *fake_nearest)},
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
