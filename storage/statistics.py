"""Statistic rows: which images a statistic covers (sample specs), and insert-if-absent.

A ``Statistic`` (``storage.models``) is keyed by ``(model_sha256, layer, sample_spec)``
and shared by every job and tenant. The API (``POST /v1/statistics``) and the workers
(a job that needs a statistic) both name it with ``sample_spec`` and both reach the row
with ``insert_statistic``, so two requests for the same images always meet on one row.
Torch-free and Celery-free: the API imports this module, never the worker's.

Sample specs: ``seeds:<start>-<stop>``, the half-open range of seeds start..stop-1
(e.g. ``seeds:100000-105000``, 5000 images). Statistics asked for by a number of
samples start at seed ``STAT_SEED_START`` = 100000, so they stay clear of the small
seeds people name in edit requests, and below the held-out seeds of the edit metrics
(from 1000000 up, ``rewriting.metrics.held_out_seeds``): at most 900000 samples.

A statistic is of the keys of a weight module, so a block and the convolution inside it
(``layer6``, ``layer6.conv``: the same keys) share one row, named by the weight module
(``keys_layer``).
"""
import re

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from storage.models import Statistic, new_id, utcnow

STAT_SEED_START = 100_000
MAX_STAT_SAMPLES = 900_000  # keeps a statistic's seeds below the metrics' held-out seeds (1000000 up)
SPEC = re.compile(r"^seeds:(\d+)-(\d+)$")


def sample_spec(samples: int, start: int = STAT_SEED_START) -> str:
    """The spec of ``samples`` images from ``start``: ``sample_spec(5000)`` = ``"seeds:100000-105000"``."""
    if isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= MAX_STAT_SAMPLES:
        raise ValueError(f"samples must be an integer from 1 to {MAX_STAT_SAMPLES}, not {samples!r}")
    return f"seeds:{start}-{start + samples}"


def parse_sample_spec(spec: str) -> range:
    """The seeds a spec names, as a range; ``ValueError`` for anything but ``seeds:<start>-<stop>``."""
    m = SPEC.match(spec) if isinstance(spec, str) else None
    if not m or int(m.group(1)) >= int(m.group(2)):
        raise ValueError(f"sample spec must be 'seeds:<start>-<stop>' with start < stop, not {spec!r}")
    return range(int(m.group(1)), int(m.group(2)))


def keys_layer(layers: list, layer: str) -> str:
    """The layer a statistic for edits of ``layer`` is named by: the module holding its
    weight, whose input the keys are (``layer6`` -> ``layer6.conv``), when the model's
    layer list (``models.layers``, each with its ``param``) names it; else ``layer``."""
    names = {info["name"]: info for info in layers}
    if layer not in names:
        return layer
    holder = names[layer]["param"].removesuffix(".weight")
    return holder if holder in names else layer


def insert_statistic(session: Session, model_sha256: str, layer: str, spec: str) -> Statistic:
    """The statistic row for this key, inserted as ``pending`` if absent (concurrent
    callers converge on one row, whichever inserts it). The caller commits."""
    parse_sample_spec(spec)
    values = dict(model_sha256=model_sha256, layer=layer, sample_spec=spec)
    dialect = session.get_bind().dialect.name
    insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}[dialect]
    # Core inserts skip the ORM's Python-side defaults, so they are given here.
    now = utcnow()
    stmt = insert(Statistic).values(id=new_id("sts"), status="pending", fencing_token=0, created_at=now,
                                    updated_at=now, **values)
    session.execute(stmt.on_conflict_do_nothing(index_elements=["model_sha256", "layer", "sample_spec"]))
    return session.scalars(select(Statistic).where(*[getattr(Statistic, k) == v for k, v in values.items()])
                           .execution_options(populate_existing=True)).one()
