"""Warm workers: a bounded LRU of loaded models and statistics per worker process; N jobs
on one model and layer load each once, and never change the cached model."""
import pytest
import torch
from safetensors.torch import load_file

from job_fixtures import STAT_LAYER, SAMPLES, database_url, tiny_model, world  # noqa: F401  (fixtures)
from palimpsest.config import load_settings
from storage.db import session_scope
from storage.models import Model
from storage.statistics import insert_statistic, sample_spec
from workers.cache import LRU, WorkerCache
from workers.jobs import process_job
from workers.statistics import process_statistic


def test_lru_keeps_the_most_recently_used():
    lru = LRU(2)
    made = []
    load = lambda name: lambda: made.append(name) or name.upper()  # noqa: E731
    assert lru.get("a", load("a")) == "A"
    assert lru.get("b", load("b")) == "B"
    assert lru.get("a", load("a")) == "A"  # hit: a is now the most recent
    assert lru.get("c", load("c")) == "C"  # evicts b, the least recently used
    assert "a" in lru and "c" in lru and "b" not in lru and len(lru) == 2
    assert lru.get("b", load("b")) == "B"
    assert made == ["a", "b", "c", "b"] and (lru.loads, lru.hits) == (4, 1)


def test_lru_of_size_zero_keeps_nothing():
    lru = LRU(0)
    assert [lru.get("a", lambda: object()) is not None for _ in range(3)] == [True] * 3
    assert (len(lru), lru.loads, lru.hits) == (0, 3, 0)


def test_worker_cache_sizes_come_from_settings(tmp_path):
    from workers.celery_app import make_celery

    settings = load_settings({"PALIMPSEST_DATA_DIR": str(tmp_path), "PALIMPSEST_CACHE_MODELS": "3",
                              "PALIMPSEST_CACHE_STATISTICS": "0"})
    cache = make_celery(settings).cache
    assert (cache.models.capacity, cache.statistics.capacity) == (3, 0)
    assert load_settings({}).cache_models == 2 and load_settings({}).cache_statistics == 16


@pytest.mark.parametrize("value", ["-1", "two"])
def test_cache_sizes_are_checked(value):
    with pytest.raises(ValueError, match="PALIMPSEST_CACHE_MODELS"):
        load_settings({"PALIMPSEST_CACHE_MODELS": value})


@pytest.fixture
def loads(monkeypatch):
    """Count checkpoint and statistic loads from disk (the engine's own functions, wrapped)."""
    import rewriting.checkpoint
    import rewriting.statistics

    counts = {"model": 0, "statistic": 0}
    real_model, real_load = rewriting.checkpoint.load_model, rewriting.statistics.SecondMoment.load.__func__

    def load_model(*args, **kwargs):
        counts["model"] += 1
        return real_model(*args, **kwargs)

    def load_moment(cls, *args, **kwargs):
        counts["statistic"] += 1
        return real_load(cls, *args, **kwargs)

    monkeypatch.setattr(rewriting.checkpoint, "load_model", load_model)
    monkeypatch.setattr("workers.jobs.load_model", load_model)  # the segmenter's, imported by name there
    monkeypatch.setattr(rewriting.statistics.SecondMoment, "load", classmethod(load_moment))
    return counts


def ready_statistic(world, model_id):
    """The job's statistic, computed beforehand by another worker (its own cache)."""
    with session_scope(world.session_factory) as session:
        sha = session.get(Model, model_id).sha256
        stat_id = insert_statistic(session, sha, STAT_LAYER, sample_spec(SAMPLES)).id
    assert process_statistic(world.session_factory, world.store, world.settings, stat_id,
                             warm=WorkerCache(1, 1)) == "ready"


JOBS = 4


def test_jobs_on_one_model_and_layer_load_it_and_its_statistic_once(world, tiny_model, loads):  # noqa: F811
    ready_statistic(world, tiny_model.model_id)
    loads.update(model=0, statistic=0)
    warm = WorkerCache(models=2, statistics=4)
    jobs = [world.job(tiny_model.tenant_id, tiny_model.model_id) for _ in range(JOBS)]
    for job_id in jobs:
        assert process_job(world.session_factory, world.store, world.settings, job_id, warm=warm) == "succeeded"
    # one generator and one segmenter, one statistic: for all four jobs
    assert loads == {"model": 2, "statistic": 1}
    assert (warm.models.loads, warm.models.hits) == (2, 2 * (JOBS - 1))
    assert (warm.statistics.loads, warm.statistics.hits) == (1, JOBS - 1)

    # the cached generator was never changed by the jobs it served
    with session_scope(world.session_factory) as session:
        sha = session.get(Model, tiny_model.model_id).sha256
    cached = warm.models.get(sha, lambda: pytest.fail("evicted"))
    on_disk = load_file(tiny_model.path)
    state = cached.state_dict()
    assert state.keys() == on_disk.keys()
    assert all(torch.equal(state[k].cpu(), on_disk[k]) for k in state)
    assert not any(p.requires_grad and p.grad is not None for p in cached.parameters())


def test_without_a_warm_cache_every_job_loads_again(world, tiny_model, loads):  # noqa: F811
    ready_statistic(world, tiny_model.model_id)
    loads.update(model=0, statistic=0)
    for _ in range(2):
        job_id = world.job(tiny_model.tenant_id, tiny_model.model_id)
        assert process_job(world.session_factory, world.store, world.settings, job_id) == "succeeded"
    assert loads == {"model": 4, "statistic": 2}


def test_edits_from_a_warm_worker_match_a_cold_one(world, tiny_model):  # noqa: F811
    """Same job, cold and warm (after other jobs used the cached model): the same update."""
    from safetensors.torch import load
    from sqlalchemy import select

    from storage.models import Artifact

    ready_statistic(world, tiny_model.model_id)
    warm = WorkerCache(models=2, statistics=2)
    for _ in range(2):
        job_id = world.job(tiny_model.tenant_id, tiny_model.model_id)
        assert process_job(world.session_factory, world.store, world.settings, job_id, warm=warm) == "succeeded"
    cold = world.job(tiny_model.tenant_id, tiny_model.model_id)
    assert process_job(world.session_factory, world.store, world.settings, cold) == "succeeded"
    with session_scope(world.session_factory) as session:
        keys = {a.job_id: a.object_key for a in session.scalars(select(Artifact).where(Artifact.name == "delta"))}
    warm_delta, cold_delta = load(world.read(keys[job_id])), load(world.read(keys[cold]))
    assert warm_delta.keys() == cold_delta.keys() == {"lam", "directions"}
    assert all(torch.equal(warm_delta[k], cold_delta[k]) for k in warm_delta)
