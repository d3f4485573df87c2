"""Dome to spire at one layer and several ranks, each next to its random-direction control.

    python bench/demo_rank_sweep.py [--layer layer5] [--ranks 1,3,full] [--pairs 5] [--samples 500] \
        [--param key_method=\"svd\" ...] [--model CANDIDATE.safetensors --requests DIR]

For each rank r and each of the first ``--pairs`` dome_to_spire request pairs
(demo/requests/eval/), the engine's edit (``run_edit`` with the request's params and
``rank=r``) and the control: the same insert along r random key directions (none for
``full``, every key direction, where random directions span the same space). Both are
measured as bench/demo_eval.py measures them (edit success, pixel change and feature
distance outside the domes) on ``--samples`` held-out images with a dome. ``--param
NAME=JSON`` overrides another of the requests' hyperparameters for every run. Prints each
pair and the mean ± standard deviation over pairs. Minutes on a GPU; on two CPU cores an
edit at layer5 and its measurement on 200 images take about 10 s. Figures in docs/demo.md.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo.artifacts import SEGMENTER_PATH, load_weights  # noqa: E402
from demo.examples import load_eval_requests  # noqa: E402
from demo_eval import (  # noqa: E402
    STAT_SEEDS, HeldOut, add_candidate_arguments, figures_text, mean_spread, measure, param_overrides)
from rewriting.delta import applied  # noqa: E402
from rewriting.edit import fit_targets, insert_config, run_edit  # noqa: E402
from rewriting.layers import editable_layers  # noqa: E402
from rewriting.requests import FULL_RANK, parse_request  # noqa: E402
from rewriting.statistics import compute_second_moment  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_candidate_arguments(parser)
    parser.add_argument("--layer", default="layer5")
    parser.add_argument("--ranks", default="1,3")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--param", action="append", default=[], metavar="NAME=JSON",
                        help="another hyperparameter for every run, e.g. --param loss='\"mse\"'")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    overrides = param_overrides(args.param)
    G = load_weights(args.model).to(args.device)
    S = load_weights(SEGMENTER_PATH).to(args.device)
    keys = {i.name: i for i in editable_layers(G)}[args.layer].key_channels
    moment = compute_second_moment(G, args.layer, STAT_SEEDS, batch_size=500)
    held = HeldOut(G, S, "dome_to_spire", args.samples)
    print(f"{args.layer}, {len(held.seeds)} held-out images with a dome, device {args.device}, "
          f"params {overrides or 'as requested'}", flush=True)
    for rank in [r if r == FULL_RANK else int(r) for r in args.ranks.split(",")]:
        rows = {"edit": []} if rank == FULL_RANK else {"edit": [], "random": []}
        for pair, raw in enumerate(load_eval_requests("dome_to_spire", args.requests)[:args.pairs], 1):
            request = parse_request(raw, {**overrides, "rank": rank})
            result = run_edit(G, args.layer, request, moment)
            deltas = [("edit", result.delta)]
            if rank != FULL_RANK:
                directions = torch.randn(rank, keys, generator=torch.Generator().manual_seed(pair)).to(args.device)
                control = fit_targets(G, result.targets, directions, insert_config(request.params), moment)
                deltas.append(("random", control.delta("")))
            for name, delta in deltas:
                with applied(G, [delta]):
                    figures, _, _ = measure("dome_to_spire", held, G, S)
                rows[name].append(figures)
                print(f"  rank {rank} pair {pair} {name:6s} {figures_text(figures)}", flush=True)
        for name, figures in rows.items():
            print(f"rank {rank} {name:6s} {mean_spread(figures)}", flush=True)


if __name__ == "__main__":
    main()
