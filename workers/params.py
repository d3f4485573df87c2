"""A job's ``params``: the edit's hyperparameters plus a few options of the job itself.

``Job.params`` is one JSON object. Its keys are either ``rewriting.requests.EditParams``
fields (rank, lr, steps, ...), which override the request's own ``params``, or these
job options:

- ``samples``: images in the layer statistic (default ``PALIMPSEST_STAT_SAMPLES``);
  the statistic is ``storage.statistics.sample_spec(samples)``;
- ``held_out``: held-out seeds for the metrics and the preview (default 8);
- ``source_class``, ``target_class``: segmenter class names for the edit-success metric
  (default: the class most enriched in the paste region of its image before the edit,
  and for a copy the class most enriched in the copied region; ``workers.jobs.region_class``).

Torch-free, so that the API can validate a job's params before queueing it.
"""
from dataclasses import dataclass

from rewriting.errors import EditRequestError
from rewriting.requests import parse_params
from storage.statistics import MAX_STAT_SAMPLES

MAX_HELD_OUT = 64


@dataclass(frozen=True)
class JobOptions:
    samples: int
    held_out: int = 8
    source_class: str | None = None
    target_class: str | None = None


def _count(params: dict, name: str, default: int, high: int) -> int:
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise EditRequestError(f"params.{name}", f"must be an integer from 1 to {high}, not {value!r}")
    return value


def split_params(params: dict | None, default_samples: int) -> tuple[dict, JobOptions]:
    """(the edit hyperparameters, validated, as a dict; the job options). Raises
    ``EditRequestError`` naming the field (``params.samples``, ``params.rank``, ...)."""
    if params is not None and not isinstance(params, dict):
        raise EditRequestError("params", "must be a JSON object")
    params = dict(params or {})
    options = {name: params.pop(name) for name in ("samples", "held_out", "source_class", "target_class")
               if name in params}
    for name in ("source_class", "target_class"):
        if name in options and not (isinstance(options[name], str) and options[name]):
            raise EditRequestError(f"params.{name}", "must be a class name of the model's segmenter")
    parse_params(params)  # refuses unknown names and bad values, naming params.<field>
    return params, JobOptions(
        samples=_count(options, "samples", default_samples, MAX_STAT_SAMPLES),
        held_out=_count(options, "held_out", 8, MAX_HELD_OUT),
        source_class=options.get("source_class"),
        target_class=options.get("target_class"),
    )
