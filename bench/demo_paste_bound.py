"""Dome to spire: how far a paste at one layer can go, and how far the edit gets on its own image.

    python bench/demo_paste_bound.py [--layers layer4,layer5,layer6] [--samples 200] [--pairs 5] \
        [--rank 1] [--param alpha_area=false ...] [--model CANDIDATE.safetensors --requests DIR]

Part 1, the paste bound, no weight changed: each request pair's copied spire (the layer's
output over the copy box's cells, whole cells) is written into the layer's output over the
largest dome of every held-out image (bottom row and centre aligned, as demo.examples
aligns the requests; ``rewriting.values.paste_value`` keeps it inside the map), and edit
success is measured as bench/demo_eval.py measures it. The paste lands on three regions:
the whole clip; only cells at least a quarter dome; those cells and a ring of one cell
around them (the cells whose 3x3 keys see the dome). A rule keyed on domes can hardly do
better than the last.

Part 2, the fit: each pair's edit (``run_edit``, the request's params, rank ``--rank``)
measured on its own paste image, next to that image rendered with the pasted values
themselves (what the insert is asked to produce). Figures in docs/demo.md; about two minutes
a layer on two CPU cores.
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo.artifacts import SEGMENTER_PATH, load_weights  # noqa: E402
from demo.examples import components, largest_object, load_eval_requests  # noqa: E402
from demo.scenes import DOME, SPIRE  # noqa: E402
from demo_eval import STAT_SEEDS, HeldOut, add_candidate_arguments, param_overrides, pasted_image  # noqa: E402
from rewriting.delta import applied  # noqa: E402
from rewriting.edit import run_edit  # noqa: E402
from rewriting.layers import Trace, sample_inputs  # noqa: E402
from rewriting.metrics import edit_success, segment  # noqa: E402
from rewriting.render import generate  # noqa: E402
from rewriting.requests import mask_at, parse_request  # noqa: E402
from rewriting.statistics import compute_second_moment  # noqa: E402
from rewriting.values import copy_value, paste_value  # noqa: E402

REGIONS = ("whole clip", "dome cells", "dome cells + 1")


def layer_output(model, layer, seed):
    with torch.no_grad(), Trace(model, layer, stop=True) as tr:
        model(sample_inputs(model, [seed]))
    return tr.output


def copied_clip(model, layer, copy):
    """The layer's output over the cells the copy region touches [1, C, h, w], whole cells
    (``rewriting.values.copy_value`` over the region at the layer's resolution)."""
    out = layer_output(model, layer, copy.seed)
    clip, _, _ = copy_value(out, torch.from_numpy(mask_at(copy.mask, out.shape[-2:])))
    return clip


def anchors(domes, px, cells, clip_height):
    """``paste_value``'s centre for each dome box (pixels): the clip's bottom row on the
    dome's bottom cell, its centre column on the dome's."""
    return [(min(y1 // px, cells - 1) - clip_height + 1 + clip_height // 2, ((x0 + x1) // 2) // px)
            for y0, x0, y1, x1 in domes]


def paste_bound(model, segmenter, layer, held, centres, cell_masks, clip, batch=50):
    """Edit success with ``clip`` pasted into the layer's output of each held-out image at its
    centre (``rewriting.values.paste_value``), only where ``cell_masks`` allow (None: everywhere)."""
    after = []
    for start in range(0, len(held.seeds), batch):
        part = slice(start, start + batch)

        def write(output, part=part):
            out = output.clone()
            for j, at in enumerate(centres[part]):
                pasted = paste_value(output[j:j + 1], clip, None, at)[0][0]
                out[j] = pasted if cell_masks is None else torch.where(cell_masks[part][j], pasted, output[j])
            return out

        with Trace(model, layer, edit_output=write):
            after.append(generate(model, held.seeds[part], batch))
    labels, _ = segment(segmenter, torch.cat(after), batch_size=batch)
    return edit_success(held.labels, labels, DOME, SPIRE)[0]


def labels_of(segmenter, image):
    return segment(segmenter, image, batch_size=1)[0]


def spread(values):
    return f"{statistics.fmean(values):.3f} ± {statistics.pstdev(values):.3f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_candidate_arguments(parser)
    parser.add_argument("--layers", default="layer4,layer5,layer6")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--param", action="append", default=[], metavar="NAME=JSON",
                        help="another hyperparameter for the edits, e.g. --param alpha_area=false")
    args = parser.parse_args()
    overrides = param_overrides(args.param)
    G, S = load_weights(args.model), load_weights(SEGMENTER_PATH)
    held = HeldOut(G, S, "dome_to_spire", args.samples)
    domes = [largest_object(ids, labels, DOME)[1] for ids, labels in zip(components(held.labels == DOME), held.labels)]
    requests = [parse_request(raw, {**overrides, "rank": args.rank})
                for raw in load_eval_requests("dome_to_spire", args.requests)[:args.pairs]]
    print(f"{len(held.seeds)} held-out images with a dome, {len(requests)} request pairs; "
          f"edits at rank {args.rank}, params {overrides or 'as requested'}", flush=True)
    for layer in args.layers.split(","):
        cells = layer_output(G, layer, 0).shape[-1]
        px = held.images.shape[-1] // cells
        dome_cells = F.avg_pool2d((held.labels == DOME).float()[:, None], px)[:, 0] >= 0.25
        ring = F.max_pool2d(dome_cells.float()[:, None], 3, 1, 1)[:, 0] > 0
        bounds = {region: [] for region in REGIONS}
        for request in requests:
            clip = copied_clip(G, layer, request.copy)
            centres = anchors(domes, px, cells, clip.shape[-2])
            for region, masks in zip(REGIONS, (None, dome_cells, ring)):
                bounds[region].append(paste_bound(G, S, layer, held, centres, masks, clip))
        print(f"{layer} ({cells}x{cells}) paste bound: " + ", ".join(f"{r} {spread(v)}" for r, v in bounds.items()),
              flush=True)
        moment = compute_second_moment(G, layer, STAT_SEEDS, batch_size=100)
        fit, target = [], []
        for request in requests:
            seed = request.paste.seed
            before = labels_of(S, generate(G, [seed], 1))
            result = run_edit(G, layer, request, moment)
            with applied(G, [result.delta]):
                after = labels_of(S, generate(G, [seed], 1))
            pasted = labels_of(S, pasted_image(G, result.targets, seed).clamp(-1, 1))
            fit.append(edit_success(before, after, DOME, SPIRE)[0])
            target.append(edit_success(before, pasted, DOME, SPIRE)[0])
        print(f"{layer} on its own paste image: the pasted values {spread(target)} "
              f"({' '.join(f'{v:.2f}' for v in target)}), the edit {spread(fit)} ({' '.join(f'{v:.2f}' for v in fit)})",
              flush=True)


if __name__ == "__main__":
    main()
