"""The bundled example edits, found in generated images with the segmenter.

    python -m demo.examples [--pairs 5]     # rewrites demo/requests/*.json
    python -m demo.examples --model CANDIDATE.safetensors --out DIR   # a candidate generator's own requests
    python -m demo.examples --across-colours --out DIR   # top pairs spread over colour families

Four edits, each as request files in the native format (docs/requests.md), with
normalized boxes:

- ``dome_to_spire``: copy a spire, paste it over a dome (bottoms aligned), context:
  domes in three images;
- ``spire_to_dome``: the reverse;
- ``add_tree``: copy a tree, paste it on the ground beside a building, context: such
  free spots beside buildings in three images;
- ``erase_trees``: erase a tree, context: trees in three images.

``demo/requests/<edit>.json`` is the first pair, ready for the command line;
``demo/requests/eval/<edit>_<i>.json`` are the pairs the evaluation
(bench/demo_eval.py) averages over. Every request takes its images from
REQUEST_SEEDS, far below the evaluation's held-out seeds (1,000,000 and up).
"""
import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from demo.artifacts import GENERATOR_PATH, REQUESTS_DIR, SEGMENTER_PATH, load_weights
from demo.scenes import BUILDING, DOME, GROUND, SKY, SPIRE, TREE, nearest_top_colour
from rewriting.render import generate

REQUEST_SEEDS = range(0, 400)
EDITS = ("dome_to_spire", "spire_to_dome", "add_tree", "erase_trees")
DEFAULT_LAYER = "layer4"  # the 8x8 layer; docs/demo.md compares it with layer6 (16x16)


def components(mask):
    """Connected components (8-neighbour) of a bool mask [N, H, W]: ids [N, H, W], 0 outside."""
    n, h, w = mask.shape
    ids = torch.arange(1, n * h * w + 1, dtype=torch.float32).view(n, h, w) * mask
    while True:  # every pixel takes the largest id among its neighbours inside the mask
        grown = F.max_pool2d(ids[:, None], 3, 1, 1)[:, 0]
        grown = grown * mask
        if torch.equal(grown, ids):
            return ids.long()
        ids = grown


def largest_object(ids_one, labels_one, cls):
    """(area, (y0, x0, y1, x1) inclusive pixel box) of the largest ``cls`` component, or None."""
    ids = ids_one[labels_one == cls]
    if ids.numel() == 0:
        return None
    values, counts = ids.unique(return_counts=True)
    best = values[counts.argmax()]
    ys, xs = torch.nonzero(ids_one == best, as_tuple=True)
    return int(counts.max()), (int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max()))


def norm_box(y0, x0, y1, x1, size, pad=1):
    """Inclusive pixel box -> normalized [x0, y0, x1, y1], padded by ``pad`` pixels, clipped."""
    b = [max(x0 - pad, 0), max(y0 - pad, 0), min(x1 + 1 + pad, size), min(y1 + 1 + pad, size)]
    return [round(v / size, 4) for v in b]


def free_spot(labels_one, height, width):
    """A pixel box (y0, x0, y1, x1) of ``height`` x ``width`` on the ground beside a building, holding
    only sky and ground, its bottom rows on ground; the one nearest a building, or None."""
    size = labels_one.shape[0]
    building_cols = ((labels_one == BUILDING) | (labels_one == DOME) | (labels_one == SPIRE)).any(0)
    cols = torch.nonzero(building_cols).flatten()
    if cols.numel() == 0:
        return None
    ground_rows = (labels_one == GROUND).float().mean(1) > 0.5
    if not ground_rows.any():
        return None
    horizon = int(torch.nonzero(ground_rows).flatten()[0])
    y1 = min(horizon + 4, size - 1)
    y0 = y1 - height + 1
    if y0 < 0:
        return None
    best = None
    for x0 in range(0, size - width + 1):
        x1 = x0 + width - 1
        patch = labels_one[y0:y1 + 1, x0:x1 + 1]
        if not ((patch == SKY) | (patch == GROUND)).all() or not (labels_one[y1, x0:x1 + 1] == GROUND).all():
            continue
        distance = torch.minimum((cols - x0).abs(), (cols - x1).abs()).min().item()
        if distance <= 10 and (best is None or distance < best[0]):
            best = (distance, (y0, x0, y1, x1))
    return None if best is None else best[1]


def label_generated(generator, segmenter, seeds=REQUEST_SEEDS):
    """(images [N,3,H,W], label maps [N,H,W]) of ``seeds``: the generator's images, the segmenter's labels."""
    images = generate(generator, seeds, batch_size=50)
    with torch.no_grad():
        labels = torch.cat([segmenter(images[i:i + 50]).argmax(1) for i in range(0, len(images), 50)])
    return images, labels


def find_examples(images, labels, seeds=REQUEST_SEEDS, min_area=40):
    """Per seed: its largest dome, spire and tree (area, box), its tops' colour families and
    its label map, from images [N,3,H,W] and their label maps [N,H,W] (one per seed)."""
    size = images.shape[-1]
    found = {}
    for cls, name, area in ((DOME, "dome", min_area), (SPIRE, "spire", min_area), (TREE, "tree", min_area // 2)):
        ids = components(labels == cls)
        found[name] = {}
        for s, i, l in zip(seeds, ids, labels):
            obj = largest_object(i, l, cls)
            # One object, not two neighbours grown together: at most 3/8 of the image wide.
            if obj is not None and obj[0] >= area and obj[1][3] - obj[1][1] < size * 3 // 8:
                found[name][s] = obj
    # Each top's colour family: generated tops of one colour are edited alike and others
    # hardly at all (docs/demo.md), so requests can draw their pairs across families.
    row = {s: j for j, s in enumerate(seeds)}
    found["colour"] = {}
    for name, cls in (("dome", DOME), ("spire", SPIRE)):
        chosen = [row[s] for s in found[name]]
        mask = torch.zeros(len(chosen), size, size, dtype=torch.bool)
        for j, (y0, x0, y1, x1) in enumerate(box for _, box in found[name].values()):
            mask[j, y0:y1 + 1, x0:x1 + 1] = True
        family = nearest_top_colour(images[chosen], mask & (labels[chosen] == cls))
        found["colour"][name] = dict(zip(found[name], family.tolist()))
    found["labels"] = dict(zip(seeds, labels))
    return found


def _take(pool, used, count):
    """The first ``count`` seeds of ``pool`` (biggest object first) not yet used."""
    out = [s for s in pool if s not in used][:count]
    if len(out) < count:
        raise RuntimeError("not enough example images in REQUEST_SEEDS")
    used.update(out)
    return out


def colour_pools(found, name, by_area, min_count):
    """``name``'s seeds split by their top's colour family, biggest object first in each,
    the commonest family first; only families with at least ``min_count`` seeds."""
    pools = {}
    for s in by_area[name]:
        pools.setdefault(found["colour"][name][s], []).append(s)
    return [pool for pool in sorted(pools.values(), key=len, reverse=True) if len(pool) >= min_count]


def build_requests(found, pairs=5, size=64, across_colours=False):
    """{edit: [request dict, ...]} with ``pairs`` requests per edit.

    By default each pair takes the biggest unused objects, which in a mode-collapsed
    generator are all of one colour combination. ``across_colours`` makes pair i of
    dome_to_spire and spire_to_dome copy a top of the i-th commonest colour family and
    paste it over one of the i-th commonest family of the other shape (context: two more
    tops of the paste's family), so the pairs' spread covers the generator's colours."""
    by_area = {k: sorted(found[k], key=lambda s: (-found[k][s][0], s)) for k in ("dome", "spire", "tree")}
    out = {edit: [] for edit in EDITS}
    for src, dst, edit in (("dome", "spire", "dome_to_spire"), ("spire", "dome", "spire_to_dome")):
        used = set()
        copy_pools = colour_pools(found, dst, by_area, 1) if across_colours else [by_area[dst]]
        paste_pools = colour_pools(found, src, by_area, 3) if across_colours else [by_area[src]]
        for i in range(pairs):
            (copy_seed,) = _take(copy_pools[i % len(copy_pools)], used, 1)
            paste_seed, *others = _take(paste_pools[i % len(paste_pools)], used, 3)
            _, (cy0, cx0, cy1, cx1) = found[dst][copy_seed]
            _, (py0, px0, py1, px1) = found[src][paste_seed]
            h, w = cy1 - cy0 + 1, cx1 - cx0 + 1
            centre = (px0 + px1) // 2
            # The copied top sits on the same roof line as the one it replaces.
            paste = (py1 - h + 1, centre - w // 2, py1, centre - w // 2 + w - 1)
            out[edit].append({
                "version": 1, "operation": "copy",
                "copy": {"seed": copy_seed, "mask": norm_box(cy0, cx0, cy1, cx1, size)},
                "paste": {"seed": paste_seed, "mask": norm_box(*paste, size)},
                "context": [{"seed": s, "mask": norm_box(*found[src][s][1], size)} for s in (paste_seed, *others)],
            })
    used = set()
    for _ in range(pairs):
        paste_seed, *others = _take(by_area["tree"], used, 3)
        out["erase_trees"].append({
            "version": 1, "operation": "erase",
            "paste": {"seed": paste_seed, "mask": norm_box(*found["tree"][paste_seed][1], size)},
            "context": [{"seed": s, "mask": norm_box(*found["tree"][s][1], size)} for s in (paste_seed, *others)],
        })
    tree_seeds = [s for s in by_area["tree"] if s not in used]
    for i in range(pairs):
        tree_seed = tree_seeds[i]
        _, (ty0, tx0, ty1, tx1) = found["tree"][tree_seed]
        h, w = ty1 - ty0 + 1, tx1 - tx0 + 1
        hosts = []
        for s, labels in found["labels"].items():
            if s in used or s in tree_seeds[:pairs] or len(hosts) == 3:
                continue
            spot = free_spot(labels, h, w)
            if spot is not None:
                hosts.append((s, spot))
        used.update(s for s, _ in hosts)
        out["add_tree"].append({
            "version": 1, "operation": "copy",
            "copy": {"seed": tree_seed, "mask": norm_box(ty0, tx0, ty1, tx1, size)},
            "paste": {"seed": hosts[0][0], "mask": norm_box(*hosts[0][1], size, pad=0)},
            "context": [{"seed": s, "mask": norm_box(*spot, size, pad=0)} for s, spot in hosts],
        })
    return out


def write_requests(requests, folder=REQUESTS_DIR, layer=DEFAULT_LAYER):
    folder = Path(folder)
    (folder / "eval").mkdir(parents=True, exist_ok=True)
    for edit, items in requests.items():
        for i, req in enumerate(items, 1):
            (folder / "eval" / f"{edit}_{i}.json").write_text(json.dumps(req, indent=1) + "\n")
        (folder / f"{edit}.json").write_text(json.dumps({**items[0], "layer": layer}, indent=1) + "\n")


def load_eval_requests(edit, folder=REQUESTS_DIR):
    """The evaluation pairs of ``edit`` in ``folder``, as request dicts (no layer: the caller chooses)."""
    paths = sorted((Path(folder) / "eval").glob(f"{edit}_*.json"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if not paths:
        raise FileNotFoundError(f"no {edit} requests in {Path(folder) / 'eval'} (python -m demo.examples writes them)")
    return [json.loads(p.read_text()) for p in paths]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--model", default=str(GENERATOR_PATH), help="the generator to find examples in")
    parser.add_argument("--out", default=str(REQUESTS_DIR), help="the request folder to write")
    parser.add_argument("--across-colours", action="store_true",
                        help="draw the dome and spire pairs across the tops' colour families")
    args = parser.parse_args(argv)
    found = find_examples(*label_generated(load_weights(args.model), load_weights(SEGMENTER_PATH)))
    print({k: len(v) for k, v in found.items() if k != "colour"})
    write_requests(build_requests(found, args.pairs, across_colours=args.across_colours), args.out)


if __name__ == "__main__":
    main()
