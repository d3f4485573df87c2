"""Evaluate the bundled demo edits, two baselines and two controls, on held-out seeds.

    python bench/demo_eval.py [--out DIR] [--samples 500] [--other-samples 100] [--pairs 5]
                              [--edits a,b] [--layers layer4,layer6] [--steps N] [--finetune-steps 300]
                              [--model CANDIDATE.safetensors --requests DIR]

For each edit (demo/requests/eval/<edit>_<i>.json, see demo/examples.py) and each
request pair, at the 8x8 layer (layer4) and the 16x16 layer (layer6) by default:

- ``rank1``: the engine's edit, ``rewriting.edit.run_edit`` with the request's defaults;
- ``random``: control, the same insert with one random direction instead of the context's;
- ``fullrank``: control, the same insert with all key directions (an unconstrained layer);
- ``finetune``: baseline, every generator weight fine-tuned (Adam, L1) to reproduce
  the single pasted image (the paste image rendered with the layer's output replaced by
  the pasted values at layer6, whose pastes render cleanly);
- ``dissect``: baseline, the ``drank`` key units most salient in the context regions
  (``rewriting.values.salient_units``) zeroed in the layer's weight (GAN dissection's
  unit ablation; not defined for adding a tree).

Metrics (rewriting.metrics) on held-out seeds from 1,000,000 up (no request uses them):
edit success, unwanted change outside the source-class region (mean absolute pixel
change on a [0, 1] scale, and the segmenter feature distance at its ``feature_layer``),
and the constraint loss (L1 between the layer's output on the paste image and the
pasted values, over the optimized crop). Dome and spire edits are measured on images
that contain the source class (>= 30 pixels), erase on images with a tree (>= 15
pixels). For add_tree, edit success is the fraction of images that gain >= 15 tree
pixels, and unwanted change is measured outside the tree pixels before and after.

Writes ``results.json`` (per pair; a later run with ``--edits`` replaces only those edits)
and ``summary.md`` (mean +- std over pairs) into ``--out``, and before/after grids to
``docs/img/demo_<edit>.png``. With 500 images for every edit, the three edits other than
dome_to_spire took 21 minutes on these 2 CPU cores when idle, and dome_to_spire alone 55
minutes when they were loaded (docs/demo.md says which settings produced its figures).
"""
import argparse
import copy
import json
import statistics
from dataclasses import replace
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demo.artifacts import GENERATOR_PATH, REQUESTS_DIR, SEGMENTER_PATH, load_weights  # noqa: E402
from demo.examples import EDITS, load_eval_requests  # noqa: E402
from demo.scenes import DOME, SPIRE, TREE  # noqa: E402
from rewriting.delta import applied  # noqa: E402
from rewriting.edit import edit_targets, fit_targets, insert_config, run_edit  # noqa: E402
from rewriting.layers import Trace, editable_layers, get_module, sample_inputs  # noqa: E402
from rewriting.metrics import edit_success, feature_distance, segment, unwanted_pixel_change  # noqa: E402
from rewriting.render import generate, image_grid  # noqa: E402
from rewriting.requests import mask_at, parse_request  # noqa: E402
from rewriting.statistics import compute_second_moment  # noqa: E402
from rewriting.values import salient_units  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("layer4", "layer6")
FINETUNE_LAYER = "layer6"
HELD_OUT_START = 1_000_000
STAT_SEEDS = range(2_000_000, 2_003_000)
# edit -> (source class, target class or None, minimum source pixels for an image to count)
CLASSES_OF = {"dome_to_spire": (DOME, SPIRE, 30), "spire_to_dome": (SPIRE, DOME, 30),
              "erase_trees": (TREE, None, 15), "add_tree": (TREE, None, 0)}


class HeldOut:
    """Held-out images of one edit: seeds, images, labels and segmenter features before any edit."""

    def __init__(self, generator, segmenter, edit, count, batch=50):
        source, _, minimum = CLASSES_OF[edit]
        seeds, images, labels, feats = [], [], [], []
        start = HELD_OUT_START
        while len(seeds) < count:
            block = list(range(start, start + 200))
            start += 200
            x = generate(generator, block, batch)
            lab, f = segment(segmenter, x, batch_size=batch)
            ok = (lab == source).flatten(1).sum(1) >= minimum if minimum else torch.ones(len(block), dtype=torch.bool)
            for i in torch.nonzero(ok).flatten().tolist()[:count - len(seeds)]:
                seeds.append(block[i])
                images.append(x[i])
                labels.append(lab[i])
                feats.append(f[i])
        self.seeds, self.images = seeds, torch.stack(images)
        self.labels, self.features = torch.stack(labels), torch.stack(feats)


def measure(edit, held, after_model, segmenter, batch=50):
    """(figures, images after, their labels) of ``after_model`` on the held-out seeds."""
    source, target, _ = CLASSES_OF[edit]
    after = generate(after_model, held.seeds, batch)
    labels, feats = segment(segmenter, after, batch_size=batch)
    if edit == "add_tree":
        gained = ((labels == TREE).flatten(1).sum(1) - (held.labels == TREE).flatten(1).sum(1)) >= 15
        success = gained.float().mean().item()
        outside = (held.labels != TREE) & (labels != TREE)
    else:
        success, _ = edit_success(held.labels, labels, source, target)
        outside = held.labels != source
    return {"edit_success": success,
            "pixel_change": unwanted_pixel_change(held.images, after, outside),
            "feature_distance": feature_distance(held.features, feats, outside)}, after, labels


def paste_loss(model, targets, seed):
    """L1 between the layer's output on the paste image and the pasted values (the crop)."""
    with torch.no_grad(), Trace(model, targets.layer, stop=True) as tr:
        model(sample_inputs(model, [seed]))
    out = tr.output
    if targets.value_bounds is not None:
        t, l, b, r = targets.value_bounds
        out = out[:, :, t:b, l:r]
    return F.l1_loss(out, targets.values).item()


def pasted_image(model, targets, seed):
    """The paste image rendered with the layer's output replaced by the pasted values."""
    def replace_output(output):
        if targets.value_bounds is None:
            return targets.values
        out = output.clone()
        t, l, b, r = targets.value_bounds
        out[:, :, t:b, l:r] = targets.values
        return out

    with torch.no_grad(), Trace(model, targets.layer, edit_output=replace_output):
        return model(sample_inputs(model, [seed]))


def finetuned(generator, target_image, seed, steps, lr):
    """A copy of ``generator`` with every weight fine-tuned to draw ``target_image`` for ``seed``."""
    model = copy.deepcopy(generator).requires_grad_(True).train()
    z = sample_inputs(model, [seed])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.l1_loss(model(z), target_image)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


def dissected(generator, layer, moment, request, count):
    """A copy of ``generator`` whose ``layer`` ignores the ``count`` most salient context units."""
    images = {}
    keys, masks = [], []
    info = {i.name: i for i in editable_layers(generator)}[layer]
    for region in request.context:
        if region.seed not in images:
            with torch.no_grad(), Trace(generator, layer, stop=True) as tr:
                generator(sample_inputs(generator, [region.seed]))
            images[region.seed] = tr.keys
        keys.append(images[region.seed])
        masks.append(torch.from_numpy(mask_at(region.mask, info.key_size)).float())
    units = salient_units(keys, masks, torch.diagonal(moment.matrix), count)
    model = copy.deepcopy(generator)
    with torch.no_grad():
        get_module(model, layer).conv.weight[:, units] = 0
    return model


def param_overrides(items):
    """The ``--param NAME=JSON`` arguments of the demo benchmarks as a dict of hyperparameters."""
    return {name: json.loads(value) for name, value in (item.split("=", 1) for item in items)}


def figures_text(figures):
    """'name value' of each figure of one measurement."""
    return "  ".join(f"{k} {v:.4f}" for k, v in figures.items())


def mean_spread(rows):
    """'name mean ± standard deviation' of each figure over ``rows`` (dicts with the same keys)."""
    return "  ".join(f"{k} {statistics.fmean(r[k] for r in rows):.4f} ± {statistics.pstdev(r[k] for r in rows):.4f}"
                     for k in rows[0])


def summarize(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def add_candidate_arguments(parser):
    """``--model`` and ``--requests``: measure a candidate generator on the requests that
    ``python -m demo.examples --model M --out DIR`` found in its own images."""
    parser.add_argument("--model", default=str(GENERATOR_PATH), help="the generator to edit (demo-gan checkpoint)")
    parser.add_argument("--requests", default=str(REQUESTS_DIR), help="a request folder as demo.examples writes it")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_candidate_arguments(parser)
    parser.add_argument("--out", default=str(ROOT / "bench" / "demo_eval_out"))
    parser.add_argument("--samples", type=int, default=500, help="held-out images for dome_to_spire")
    parser.add_argument("--other-samples", type=int, default=100, help="held-out images for the other edits")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--edits", default=",".join(EDITS))
    parser.add_argument("--layers", default=",".join(LAYERS), help="layers to edit, comma-separated")
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--drank", type=int, default=30)
    parser.add_argument("--steps", type=int, help="insert steps for every edit and control (default: the request's)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    G, S = load_weights(args.model), load_weights(SEGMENTER_PATH)
    infos = {i.name: i for i in editable_layers(G)}
    t0 = time.time()
    layers = args.layers.split(",")
    moments = {layer: compute_second_moment(G, layer, STAT_SEEDS, batch_size=100)
               for layer in {*layers, FINETUNE_LAYER}}
    print(f"statistics of {sorted(moments)} over {len(STAT_SEEDS)} seeds: {time.time() - t0:.0f}s", flush=True)
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}

    for edit in args.edits.split(","):
        count = args.samples if edit == "dome_to_spire" else args.other_samples
        t_edit = time.time()
        held = HeldOut(G, S, edit, count)
        print(f"{edit}: {len(held.seeds)} held-out images ({time.time() - t_edit:.0f}s)", flush=True)
        rows = []
        grid_after = {}
        for pair, raw in enumerate(load_eval_requests(edit, args.requests)[:args.pairs], 1):
            request = parse_request(raw)
            if args.steps:
                request = replace(request, params=replace(request.params, steps=args.steps))
            assert not request.seeds & set(held.seeds)
            targets6 = edit_targets(G, infos[FINETUNE_LAYER], request, moments[FINETUNE_LAYER])
            ft = finetuned(G, pasted_image(G, targets6, request.paste.seed), request.paste.seed,
                           args.finetune_steps, args.finetune_lr)
            measured = {}
            for layer in layers:
                moment = moments[layer]
                t = time.time()
                result = run_edit(G, layer, request, moment)
                targets = result.targets
                config = insert_config(request.params)
                gen = torch.Generator().manual_seed(pair)
                random_dir = torch.randn(1, infos[layer].key_channels, generator=gen)
                conditions = {
                    "rank1": ("delta", result.delta),
                    "random": ("delta", fit_targets(G, targets, random_dir, config, moment).delta("")),
                    "fullrank": ("delta", fit_targets(G, targets, torch.eye(infos[layer].key_channels), config,
                                                      moment).delta("")),
                    "finetune": ("model", ft),
                }
                if edit != "add_tree":
                    conditions["dissect"] = ("model", dissected(G, layer, moment, request, args.drank))
                for name, (kind, obj) in conditions.items():
                    if kind == "delta":
                        with applied(G, [obj]):
                            figures, after, _ = measure(edit, held, G, S)
                            loss = paste_loss(G, targets, request.paste.seed)
                    else:
                        if id(obj) not in measured:  # the fine-tuned model serves both layers
                            measured[id(obj)] = measure(edit, held, obj, S)
                        figures, after, _ = measured[id(obj)]
                        loss = paste_loss(obj, targets, request.paste.seed)
                    row = {"edit": edit, "pair": pair, "layer": layer, "method": name, **figures,
                           "constraint_loss": loss, "initial_loss": result.initial_loss}
                    rows.append(row)
                    if pair == 1:
                        grid_after[(layer, name)] = after[:8]
                    print(json.dumps(row), flush=True)
                print(f"  pair {pair} {layer}: {time.time() - t:.0f}s", flush=True)
        results[edit] = {"samples": len(held.seeds), "seeds": f"{held.seeds[0]}..{held.seeds[-1]}",
                         "insert_steps": request.params.steps, "finetune_steps": args.finetune_steps,
                         "rows": rows, "seconds": round(time.time() - t_edit, 1)}
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        # Rows: before; the rank-1 edit at each layer; the fine-tuning baseline.
        rows_img = [held.images[:8]] + [grid_after[(layer, "rank1")] for layer in layers]
        rows_img.append(grid_after[(layers[-1], "finetune")])
        (ROOT / "docs" / "img" / f"demo_{edit}.png").write_bytes(image_grid(torch.cat(rows_img), columns=8, scale=2))
    write_summary(results, out / "summary.md")
    print((out / "summary.md").read_text())


def write_summary(results, path):
    lines = ["| edit | layer | method | edit success | pixel change outside | feature distance outside "
             "| constraint loss |", "|---|---|---|---|---|---|---|"]
    for edit, res in results.items():
        keys = []
        for r in res["rows"]:
            if (r["layer"], r["method"]) not in keys:
                keys.append((r["layer"], r["method"]))
        for layer, method in keys:
            rows = [r for r in res["rows"] if r["layer"] == layer and r["method"] == method]
            cells = []
            for metric, fmt in (("edit_success", "{:.3f}"), ("pixel_change", "{:.4f}"),
                                ("feature_distance", "{:.3f}"), ("constraint_loss", "{:.3f}")):
                s = summarize([r[metric] for r in rows])
                cells.append("n/a" if s is None else f"{fmt.format(s['mean'])} ± {fmt.format(s['std'])}")
            lines.append(f"| {edit} | {layer} | {method} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
