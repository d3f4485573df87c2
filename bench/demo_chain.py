"""A demo edit as successive edits at several layers, each fitted on the model edited so far.

    python bench/demo_chain.py [--edit dome_to_spire] [--layers layer5.conv,layer6.conv] [--pairs 5] \
        [--samples 500] [--param rank=8 ...] [--strengths 1.25,2] [--grid docs/img/x.png] \
        [--model CANDIDATE.safetensors --requests DIR]

For each of the first ``--pairs`` request pairs of ``--edit`` (demo/requests/eval/), one
edit per layer, in order: ``run_edit`` of the pair's request on the model with the earlier
edits applied, with that model's own statistic of the layer (``STAT_SEEDS``), so that each
layer fits what the layers before it left undone. Edits are ``closed_form`` with the halo,
every key direction and the MSE loss unless ``--param NAME=JSON`` says otherwise. After
each layer the chain so far is measured as bench/demo_eval.py measures an edit (edit
success, pixel change and feature distance outside the source class, on ``--samples``
held-out images chosen as it chooses them: with a dome for dome_to_spire, and so on).
``--strengths`` also measures the whole chain with every edit's Lambda multiplied by each
factor (1: the fit itself), to see how far past the fit the rule still gains. ``--grid
PATH`` writes a PNG of the first pair's first 8 held-out images, before and after each
layer of the chain (a row each). Prints each pair and the mean ± standard deviation over
pairs; for dome_to_spire and spire_to_dome also the whole chain's success by the colour
of the held-out tops (each image's source-class pixels, by their mean colour's nearest
entry in the scenes' palette), where a rule that reaches only tops of its paste's colour
shows (docs/demo.md). About 2 minutes for two layers and 500 images on two idle CPU cores. Figures in
docs/demo.md.
"""
import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo.artifacts import SEGMENTER_PATH, load_weights  # noqa: E402
from demo.examples import EDITS, load_eval_requests  # noqa: E402
from demo.scenes import TOP_COLOUR_NAMES, nearest_top_colour  # noqa: E402
from demo_eval import (  # noqa: E402
    CLASSES_OF, STAT_SEEDS, HeldOut, add_candidate_arguments, figures_text, mean_spread, measure, param_overrides)
from rewriting.delta import applied  # noqa: E402
from rewriting.edit import run_edit  # noqa: E402
from rewriting.render import image_grid  # noqa: E402
from rewriting.requests import parse_request  # noqa: E402
from rewriting.metrics import edit_success  # noqa: E402
from rewriting.statistics import compute_second_moment  # noqa: E402

CHAIN_PARAMS = {"method": "closed_form", "halo": True, "rank": "full", "loss": "mse"}


def success_by_colour(held, colours, labels, source, target):
    """{colour: edit success over the source pixels of the images whose tops have that colour}."""
    return {name: edit_success(held.labels[colours == k], labels[colours == k], source, target)[0]
            for k, name in enumerate(TOP_COLOUR_NAMES) if (colours == k).any()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_candidate_arguments(parser)
    parser.add_argument("--edit", default="dome_to_spire", choices=EDITS)
    parser.add_argument("--layers", default="layer5.conv,layer6.conv")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--param", action="append", default=[], metavar="NAME=JSON",
                        help="a hyperparameter for every edit of the chain, e.g. --param rank=8")
    parser.add_argument("--strengths", default="", help="factors on every edit's Lambda, e.g. 1.25,2")
    parser.add_argument("--grid", type=Path, help="before/after PNG of the first pair")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    params = {**CHAIN_PARAMS, **param_overrides(args.param)}
    layers = args.layers.split(",")
    strengths = [float(f) for f in args.strengths.split(",") if f]
    G = load_weights(args.model).to(args.device)
    S = load_weights(SEGMENTER_PATH).to(args.device)
    held = HeldOut(G, S, args.edit, args.samples)
    print(f"{args.edit}: chain {' -> '.join(layers)}, {len(held.seeds)} held-out images, device {args.device}, "
          f"params {params}", flush=True)
    source, target, _ = CLASSES_OF[args.edit]
    colours = nearest_top_colour(held.images, held.labels == source) if target is not None else None
    if colours is not None:
        print("held-out tops by colour: " + ", ".join(
            f"{name} {int((colours == k).sum())}" for k, name in enumerate(TOP_COLOUR_NAMES)), flush=True)
    by_colour = []
    rows = {i: [] for i in range(len(layers))}
    scaled = {f: [] for f in strengths}
    grid_rows = [held.images[:8]] if args.grid else None
    for pair, raw in enumerate(load_eval_requests(args.edit, args.requests)[:args.pairs], 1):
        request = parse_request(raw, params)
        deltas = []
        for i, layer in enumerate(layers):
            with applied(G, deltas):
                moment = compute_second_moment(G, layer, STAT_SEEDS, batch_size=500)
                deltas.append(run_edit(G, layer, request, moment).delta)
            with applied(G, deltas):
                figures, after, labels = measure(args.edit, held, G, S)
            rows[i].append(figures)
            if pair == 1 and args.grid:
                grid_rows.append(after[:8])
            print(f"  pair {pair} through {layer:12s} {figures_text(figures)}", flush=True)
        if colours is not None:  # ``labels`` are the whole chain's
            by_colour.append(success_by_colour(held, colours, labels, source, target))
            print(f"  pair {pair} success by top colour: "
                  + " ".join(f"{name} {v:.3f}" for name, v in by_colour[-1].items()), flush=True)
        for factor in strengths:
            with applied(G, [replace(delta, lam=delta.lam * factor) for delta in deltas]):
                figures, _, _ = measure(args.edit, held, G, S)
            scaled[factor].append(figures)
            print(f"  pair {pair} strength {factor:<8g} {figures_text(figures)}", flush=True)
        if pair == 1 and args.grid:
            args.grid.write_bytes(image_grid(torch.cat(grid_rows).cpu(), columns=8, scale=2))
    for i, figures in rows.items():
        print(f"through {' -> '.join(layers[:i + 1])}: {mean_spread(figures)}", flush=True)
    for factor, figures in scaled.items():
        print(f"the chain at strength {factor:g}: {mean_spread(figures)}", flush=True)
    if by_colour:
        print("the chain's success by top colour, mean over pairs: " + " ".join(
            f"{name} {sum(p[name] for p in by_colour) / len(by_colour):.3f}" for name in by_colour[0]), flush=True)


if __name__ == "__main__":
    main()
