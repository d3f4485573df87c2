"""Local engine commands: ``edit``, ``stats`` and ``sample`` (click).

They are added to the ``palimpsest`` group (palimpsest/cli.py) and also run as
``python -m rewriting <command>``. ``edit`` goes through ``rewriting.edit.run_edit``,
the code path the workers use. torch is imported inside the commands only, so
that listing commands or ``--help`` stays fast.
"""
import json
from dataclasses import replace
from pathlib import Path

import click

DEVICE = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                      envvar="PALIMPSEST_DEVICE", help="Where to run: auto picks CUDA when present.")
BATCH_SIZE = click.option("--batch-size", type=click.IntRange(1),
                          help="Images per forward pass of the statistic (default: 256 on CUDA, 64 on a CPU).")
MODEL = click.option("--model", "model_path", required=True, type=click.Path(exists=True, dir_okay=False),
                     help="Generator checkpoint (safetensors, saved by rewriting.checkpoint.save_model).")


def _device(name):
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise click.UsageError("--device cuda: no CUDA device is available")
    return name


def _load(model_path, device):
    from rewriting.checkpoint import file_sha256, load_model

    return load_model(model_path, device=_device(device)), file_sha256(model_path)


def _check_layer(model, layer):
    """The layer's ``LayerInfo``; an error listing the valid names if there is none."""
    from rewriting.layers import editable_layers
    from rewriting.requests import check_layer

    infos = {info.name: info for info in editable_layers(model)}
    check_layer(layer, list(infos))
    return infos[layer]


def _engine_errors(fn):
    """Report the engine's own errors as a one-line message and exit status 1."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from rewriting.errors import EngineError

        try:
            return fn(*args, **kwargs)
        except EngineError as e:
            raise click.ClickException(f"{type(e).__name__}: {e}") from e

    return wrapper


def _stats_progress(done, total):
    # about ten lines per statistic
    step = max(1, total // 10)
    if done == total or done // step != (done - 1) // step:
        click.echo(f"stats: {done}/{total} images", err=True)


def _compute_moment(model, layer, samples, batch_size, model_sha256):
    from rewriting.statistics import compute_second_moment

    return compute_second_moment(model, layer, f"0-{samples - 1}", batch_size=batch_size,
                                 progress=_stats_progress, model_sha256=model_sha256)


@click.command()
@MODEL
@click.option("--layer", help="Layer to edit (default: the request's \"layer\", which this replaces).")
@click.option("--request", "request_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Edit request JSON (native or original rewriting-app format; see docs/requests.md).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Where to write the edited checkpoint.")
@click.option("--delta", "delta_path", type=click.Path(dir_okay=False),
              help="Also write the edit as a delta file (a few KB).")
@click.option("--stats", "stats_path", type=click.Path(exists=True, dir_okay=False),
              help="Second moment of the layer's keys (from `stats`); computed when not given.")
@click.option("--samples", default=1000, show_default=True, type=click.IntRange(1),
              help="Images (seeds 0..N-1) for the statistic when --stats is not given.")
@click.option("--param", "param_items", multiple=True, metavar="NAME=VALUE",
              help="Override a hyperparameter, e.g. --param rank=2 --param lr=0.01 (JSON values).")
@click.option("--preview", "preview_path", type=click.Path(dir_okay=False),
              help="Write a PNG: the request's images before (top row) and after (bottom row).")
@BATCH_SIZE
@DEVICE
@_engine_errors
def edit(model_path, layer, request_path, out_path, delta_path, stats_path, samples, param_items, preview_path,
         batch_size, device):
    """Rewrite one layer of a generator as a request asks; write the edited checkpoint."""
    from rewriting.delta import applied, materialize
    from rewriting.edit import run_edit
    from rewriting.errors import IncompatibleError
    from rewriting.requests import check_rank, parse_request
    from rewriting.statistics import SecondMoment

    try:
        obj = json.loads(Path(request_path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise click.ClickException(f"--request: not JSON ({e})") from e
    request = parse_request(obj, params=_params(param_items))
    if layer is None and request.layer is None:
        raise click.UsageError("give --layer (the request names no layer)")
    if layer is not None and request.layer not in (None, layer):  # the command line wins over the file
        click.echo(f"edit: --layer {layer} instead of the request's {request.layer}", err=True)
    layer = layer or request.layer
    request = replace(request, layer=layer)
    model, sha = _load(model_path, device)
    info = _check_layer(model, layer)
    check_rank(request, info.key_size, info.key_channels)  # before the statistic, not after it
    if stats_path:
        moment = SecondMoment.load(stats_path)
        recorded = moment.metadata.get("model_sha256")
        if recorded and recorded != sha:
            raise IncompatibleError(f"{stats_path} was computed for model {recorded[:12]}, not {sha[:12]}")
    else:
        click.echo(f"stats: computing the second moment of {layer} over {samples} images", err=True)
        moment = _compute_moment(model, layer, samples, batch_size, sha)

    def progress(phase, step, loss):
        if phase == "insert" and (step % 100 == 0) and loss is not None:
            click.echo(f"insert: step {step} loss {loss:.5f}", err=True)
        elif phase not in ("insert", "done"):
            click.echo(f"edit: {phase}", err=True)

    result = run_edit(model, layer, request, moment, progress=progress, base_sha256=sha)
    new_sha = materialize(model_path, [result.delta], out_path)
    if delta_path:
        result.delta.save(delta_path)
    if preview_path:
        import torch

        from rewriting.render import generate, image_grid

        seeds = sorted(request.seeds)
        before = generate(model, seeds)
        with applied(model, [result.delta]):
            after = generate(model, seeds)
        Path(preview_path).write_bytes(image_grid(torch.cat([before, after]), columns=len(seeds)))
    click.echo(json.dumps({
        "layer": layer, "operation": request.operation, "initial_loss": result.initial_loss,
        "constraint_loss": result.constraint_loss, "steps": result.steps, "seconds": round(result.seconds, 3),
        "out": out_path, "out_sha256": new_sha, "delta": delta_path,
        "delta_sha256": result.delta.sha256,
    }))


def _params(items):
    params = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{item!r}: use NAME=VALUE", param_hint="--param")
        try:
            params[name] = json.loads(text)
        except json.JSONDecodeError:
            params[name] = text  # a bare word, e.g. method=lambda
    return params


@click.command()
@MODEL
@click.option("--layer", required=True, help="Layer whose keys to measure.")
@click.option("--samples", required=True, type=click.IntRange(1), help="Number of images: seeds 0..N-1.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Where to write the statistic (safetensors).")
@BATCH_SIZE
@DEVICE
@_engine_errors
def stats(model_path, layer, samples, out_path, batch_size, device):
    """Compute the second moment of a layer's keys over N generated images."""
    model, sha = _load(model_path, device)
    _check_layer(model, layer)
    moment = _compute_moment(model, layer, samples, batch_size, sha)
    moment.save(out_path)
    click.echo(json.dumps({"layer": layer, "count": moment.count, "channels": moment.channels,
                           "seeds": moment.metadata.get("seeds"), "out": out_path}))


@click.command()
@MODEL
@click.option("--seeds", default="0-15", show_default=True, help="Seeds, e.g. 0-15,20.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="PNG file to write.")
@click.option("--delta", "delta_paths", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Apply these edits (in order) and add a second row of the edited images.")
@click.option("--columns", default=8, show_default=True, type=click.IntRange(1),
              help="Images per row (ignored with --delta: one row before, one after).")
@click.option("--scale", default=1, show_default=True, type=click.IntRange(1, 16),
              help="Enlarge each image by this factor.")
@DEVICE
@_engine_errors
def sample(model_path, seeds, out_path, delta_paths, columns, scale, device):
    """Draw the images of some seeds as a PNG grid (before/after rows with --delta)."""
    import torch

    from rewriting.delta import EditDelta, applied
    from rewriting.render import generate, image_grid
    from rewriting.seeds import parse_seeds

    seeds = parse_seeds(seeds, field="--seeds")
    model, sha = _load(model_path, device)
    images = generate(model, seeds)
    if delta_paths:
        deltas = [EditDelta.load(p) for p in delta_paths]
        stale = [p for p, d in zip(delta_paths, deltas) if d.base_sha256 and d.base_sha256 != sha]
        if stale:
            click.echo(f"warning: {', '.join(stale)} made for another base checkpoint", err=True)
        with applied(model, deltas):
            images = torch.cat([images, generate(model, seeds)])
        columns = len(seeds)
    Path(out_path).write_bytes(image_grid(images, columns=columns, scale=scale))
    click.echo(json.dumps({"seeds": len(seeds), "out": out_path}))


@click.group()
def main():
    """The rewriting engine's commands (also under `palimpsest`)."""


main.add_command(edit)
main.add_command(stats)
main.add_command(sample)
