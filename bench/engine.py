"""Engine benchmarks: statistics throughput and insert methods (prints figures).

    python bench/engine.py [--layer layer5] [--samples 512] [--batch 64,256] [--device auto] [--rounds 3]
                           [--latent-threads N]

1. Statistics: samples/s of ``compute_second_moment`` next to, in the same run, the
   bare forward pass to the layer's keys (same latents, same stop) and the full
   forward pass, at each ``--batch`` (default: the engine's for the device). The
   overhead over the bare pass is the price of the moment and of drawing the latents;
   "forward + moment update" (latents already on the device) separates the two.
   Times are the best of ``--rounds`` interleaved rounds; the overhead is the median
   of each round's own ratio. On a CPU it also prints each batch's update time over
   its own forward pass, which stays steady where whole runs drift. At a layer whose
   keys repeat over 2x2 blocks (after an upsampling), "repeat check skipped" feeds the
   update the collapsed keys directly: the gap to "forward + moment update" is the
   price of ``collapse_repeats``' comparisons (on CUDA, two host waits a batch; the
   statistic itself checks on the device, ``repeats_hold``). On CUDA the statistic
   replays a CUDA graph per batch; "eager (graph=False)" is the same without it.
2. Insert: wall time of the projected method (5a, the paper's defaults) and the
   lambda method (5b) on one paste edit, the time 5b needs to reach 5a's final
   loss, and the peak of tensor memory each allocates beyond what exists before it
   (CUDA: max_memory_allocated; CPU: the torch profiler's allocation events, on a
   30-step run, since the peak is reached in the first steps).
3. Closed form: on the same edit at the block's convolution (``layer5.conv``, values
   before the activation), the final MSE and wall time of lambda (rank 1) and of
   closed_form (5c) at rank 1 and along every key direction.

Uses demo/weights/generator.safetensors when present, else the demo Generator
architecture with random (untrained) weights.
"""
import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rewriting.checkpoint import load_model  # noqa: E402
from rewriting.directions import context_directions  # noqa: E402
from rewriting.insert import InsertConfig, insert  # noqa: E402
from rewriting.layers import StopForward, Trace, model_device, sample_inputs  # noqa: E402
from rewriting.seeds import latents  # noqa: E402
from rewriting.statistics import (  # noqa: E402
    SecondMoment, collapse_repeats, compute_second_moment, default_batch_size)

WEIGHTS = ROOT / "demo" / "weights" / "generator.safetensors"


def get_model(device):
    if WEIGHTS.exists():
        return load_model(WEIGHTS, device=device), "demo/weights/generator.safetensors"
    from demo.generator import Generator
    torch.manual_seed(0)
    return Generator().to(device).eval().requires_grad_(False), "demo Generator, random weights (no trained file yet)"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fns, device, repeat=3):
    """Wall times [function][round] over ``repeat`` interleaved rounds, after one warm-up.

    Interleaving keeps the comparison fair on a machine whose load changes: a ratio of
    two functions' times within one round is steadier than a ratio of their bests.
    """
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[i].append(time.perf_counter() - t)
    return times


def bench_statistics(model, layer, n, batch, rounds, latent_threads=None):
    device = model_device(model)
    seeds = list(range(n))
    z_all = latents(seeds, model.z_dim).to(device)

    shares = {False: [], True: []}  # CPU, by ``unchecked``: each batch's update time over its forward pass's

    def bare(add=False, unchecked=False):
        """The floor's loop; with ``add``, each batch's keys also go into a SecondMoment.

        ``unchecked``: one key of each repeated block goes in as rows [M, C], which
        ``update`` takes without ``collapse_repeats``: the same product as a repeating
        map's, without the comparisons (the statistic's count is smaller by the repeat
        factor; only the time matters here). The rows take one copy more than a map
        does, so the gap slightly understates what the check costs.

        On a CPU each update is also timed against its own batch's forward pass: the two
        run back to back, so load that drifts over seconds shifts both, and on this shared
        2-core machine that ratio moves by a few percent where whole runs move by tens. On
        CUDA it would need a sync inside each batch, which changes what it measures.
        """
        stat = None
        with Trace(model, layer, stop="keys") as tr, torch.no_grad():
            for i in range(0, n, batch):
                t0 = time.perf_counter()
                try:
                    model(z_all[i:i + batch])
                except StopForward:
                    pass
                if add:
                    t1 = time.perf_counter()
                    stat = stat or SecondMoment(tr.keys.shape[1], device)
                    if unchecked:
                        stat.update(tr.keys[:, :, ::step, ::step].permute(0, 2, 3, 1).reshape(-1, tr.keys.shape[1]))
                    else:
                        stat.update(tr.keys)
                    if device.type == "cpu":
                        shares[unchecked].append((time.perf_counter() - t1) / (t1 - t0))
        return tr

    def full():
        with torch.no_grad():
            for i in range(0, n, batch):
                model(z_all[i:i + batch])

    def latents_only():
        for i in range(0, n, batch):
            latents(seeds[i:i + batch], model.z_dim).to(device)

    def stats():
        return compute_second_moment(model, layer, seeds, batch_size=batch, latent_threads=latent_threads)

    def stats_here():
        return compute_second_moment(model, layer, seeds, batch_size=batch, latent_threads=0)

    def stats_eager():
        return compute_second_moment(model, layer, seeds, batch_size=batch, graph=False,
                                     latent_threads=latent_threads)

    keys = bare().keys
    repeats = collapse_repeats(keys)[1] if keys.dim() == 4 else 1
    step = math.isqrt(repeats)
    fns = [bare, full, lambda: bare(add=True), latents_only, stats, stats_here]
    if repeats > 1:
        fns.append(lambda: bare(add=True, unchecked=True))
    if device.type == "cuda":
        fns.append(stats_eager)
    times = timed(fns, device, rounds)
    t_bare, t_full, t_upd, t_lat, t_stat, t_here = (min(t) for t in times[:6])
    print(f"\n== statistics: layer {layer}, keys {tuple(keys.shape[1:])}, {n} samples, batch {batch}, "
          f"best of {rounds} rounds")
    for name, t in [("full forward pass", t_full), ("bare forward to the keys (floor)", t_bare),
                    ("forward + moment update (latents on the device)", t_upd), ("latents from seeds", t_lat), ("compute_second_moment, latents here", t_here),
                    ("compute_second_moment (default)", t_stat)]:
        print(f"  {name:48s} {n / t:9.1f} samples/s  ({t * 1000:8.1f} ms)")
    if repeats > 1:
        t_unchecked = min(times[6])
        check = statistics.median((u - v) / b for u, v, b in zip(times[2], times[6], times[0]))
        print(f"  {'forward + moment update, repeat check skipped':48s} {n / t_unchecked:9.1f} samples/s  "
              f"({t_unchecked * 1000:8.1f} ms); the check: {100 * check:+.1f}% of the floor (median of rounds)")
    if device.type == "cuda":
        t_eager = min(times[-1])
        eager = statistics.median(e / b - 1 for e, b in zip(times[-1], times[0]))
        print(f"  {'compute_second_moment, eager (graph=False)':48s} {n / t_eager:9.1f} samples/s  "
              f"({t_eager * 1000:8.1f} ms); {100 * eager:+.1f}% over the floor (median of rounds)")
    # Each round's own ratio, then their median: the floor drifts between rounds on a shared machine.
    per_round = [s / b - 1 for s, b in zip(times[4], times[0])]
    overhead = statistics.median(per_round)
    update = statistics.median(u / b - 1 for u, b in zip(times[2], times[0]))
    print(f"  overhead over the floor, median of the rounds' own ratios: {100 * overhead:.1f}% "
          f"(rounds {100 * min(per_round):.1f}% to {100 * max(per_round):.1f}%; goal: <= 10%); "
          f"moment update alone {100 * update:.1f}%")
    for unchecked, label in ((False, ""), (True, ", repeat check skipped")):
        if len(shares[unchecked]) > 1:
            q = statistics.quantiles(shares[unchecked], n=4)
            print(f"  moment update per batch{label}, over that batch's forward pass: median {100 * q[1]:.1f}% "
                  f"(quartiles {100 * q[0]:.1f}% to {100 * q[2]:.1f}%, {len(shares[unchecked])} batches)")
    return {"batch": batch, "floor": n / t_bare, "update": n / t_upd, "stats": n / t_stat,
            "overhead": overhead}


def edit_problem(model, layer, stat):
    """A paste edit: copy the layer's output in a box of seed 0 into seed 1 (cropped, as the paper)."""
    with Trace(model, layer) as tr, torch.no_grad():
        model(sample_inputs(model, [0, 1]))
    h, w = tr.output.shape[2:]
    b = max(2, h // 4)  # box side
    src, dst = (h // 4, w // 4), (h // 2, w // 2)
    target = tr.output[1:2].clone()
    target[:, :, dst[0]:dst[0] + b, dst[1]:dst[1] + b] = tr.output[0:1, :, src[0]:src[0] + b, src[1]:src[1] + b]
    m = 1  # one cell of margin around the paste, inputs and outputs cropped alike
    y0, y1, x0, x1 = dst[0] - m, dst[0] + b + m, dst[1] - m, dst[1] + b + m
    inputs = (tr.inputs[0][1:2, :, y0:y1, x0:x1],)
    target = target[:, :, y0:y1, x0:x1]
    mask = torch.zeros(1, h, w)
    mask[:, dst[0]:dst[0] + b, dst[1]:dst[1] + b] = 1
    directions = context_directions(tr.keys[1:2], mask, stat, rank=1)
    return inputs, target, directions


def peak_cpu_bytes(fn):
    """Peak of live CPU tensor bytes allocated inside ``fn`` (torch profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def run_insert(model, layer, problem, method):
    """One full run (2001 steps, no early stop) for the loss curve, and its peak memory."""
    inputs, target, directions = problem
    device = model_device(model)
    cfg = InsertConfig(method=method, plateau_patience=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    r = insert(model, layer, inputs, target, directions, cfg)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        short = InsertConfig(method=method, steps=30, plateau_patience=0)
        peak = peak_cpu_bytes(lambda: insert(model, layer, inputs, target, directions, short))
    return {"method": method, "loss": r.loss, "initial": r.initial_loss, "losses": r.losses,
            "peak_bytes": peak, "weight_bytes": r.lam.element_size() * model.get_parameter(r.param).numel()}


def bench_insert(model, layer, stat, timing_steps=200):
    device = model_device(model)
    problem = edit_problem(model, layer, stat)
    results = {m: run_insert(model, layer, problem, m) for m in ("projected", "lambda")}
    runs = [lambda m=m: insert(model, layer, *problem, InsertConfig(method=m, steps=timing_steps,
                                                                   plateau_patience=0))
            for m in ("projected", "lambda")]
    for m, t in zip(("projected", "lambda"), timed(runs, device)):
        results[m]["step_seconds"] = min(t) / timing_steps
    a, b = results["projected"], results["lambda"]
    reach = next((i for i, loss in enumerate(b["losses"]) if loss <= a["loss"]), None)
    print(f"\n== insert: layer {layer}, paste edit, rank 1, lr 0.05, 2001 steps, no early stop")
    print(f"  initial loss {a['initial']:.5f}; goal crop {tuple(problem[1].shape)}; "
          f"time per step: best of 3 interleaved {timing_steps}-step runs")
    for r in (a, b):
        n = len(r["losses"])
        print(f"  {r['method']:10s} final loss {r['loss']:.5f}  {1000 * r['step_seconds']:.2f} ms/step, "
              f"{n} steps {n * r['step_seconds']:.2f} s  peak tensor memory {r['peak_bytes'] / 2**20:.2f} MiB")
    if reach is None:
        print(f"  lambda never reached projected's final loss {a['loss']:.5f} (best {min(b['losses']):.5f})")
    else:
        t_reach = (reach + 1) * b["step_seconds"]
        print(f"  lambda reaches projected's final loss {a['loss']:.5f} after {reach + 1} steps, "
              f"{t_reach:.2f} s ({len(a['losses']) * a['step_seconds'] / t_reach:.0f}x less time)")
    print(f"  (stored weight {a['weight_bytes'] / 2**20:.2f} MiB)")
    return results, reach


def bench_closed_form(model, layer, stat):
    """closed_form (5c) on the block's convolution against lambda on the same problem (MSE);
    ``stat``: the block's statistic (its convolution has the same keys)."""
    conv = f"{layer}.conv"
    inputs, target, directions = edit_problem(model, conv, stat)
    full = torch.eye(directions.shape[1], device=directions.device)
    print(f"\n== closed form: layer {conv} (pre-activation values), the same paste edit, MSE; "
          f"goal crop {tuple(target.shape)}")
    rows = [("lambda (5b), rank 1, 2001 steps", InsertConfig(loss="mse", plateau_patience=0), directions),
            ("closed_form (5c), rank 1", InsertConfig(method="closed_form", loss="mse"), directions),
            (f"closed_form (5c), full ({full.shape[0]})", InsertConfig(method="closed_form", loss="mse"), full)]
    for name, cfg, d in rows:
        t0 = time.perf_counter()
        r = insert(model, conv, inputs, target, d, cfg, moment=stat)
        sync(model_device(model))
        print(f"  {name:34s} loss {r.initial_loss:.5f} -> {r.loss:.6f}  {time.perf_counter() - t0:.3f} s")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layer", default="layer5")
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--batch", default=None, help="batch sizes, comma-separated (default: the engine's for the device)")
    p.add_argument("--device", default="auto")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds of the statistics part")
    p.add_argument("--latent-threads", type=int,
                   help="threads drawing latents for the statistic (default: the engine's)")
    p.add_argument("--part", choices=["all", "statistics", "insert"], default="all")
    args = p.parse_args()
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    model, source = get_model(device)
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"model: {source}; device {device} ({what}); torch {torch.__version__}; pid {os.getpid()}")
    if args.part in ("all", "statistics"):
        batches = [int(b) for b in args.batch.split(",")] if args.batch else [default_batch_size(device)]
        rows = [bench_statistics(model, args.layer, args.samples, b, args.rounds, args.latent_threads)
                for b in batches]
        print(f"\n== statistics by batch, layer {args.layer} (samples/s)")
        for r in rows:
            print(f"  batch {r['batch']:5d}: floor {r['floor']:9.1f}, forward + update {r['update']:9.1f}, "
                  f"compute_second_moment {r['stats']:9.1f} ({100 * r['overhead']:+.1f}% time over the floor, median of rounds)")
    if args.part in ("all", "insert"):
        stat = compute_second_moment(model, args.layer, range(256), batch_size=64)
        bench_insert(model, args.layer, stat)
        bench_closed_form(model, args.layer, stat)


if __name__ == "__main__":
    main()
