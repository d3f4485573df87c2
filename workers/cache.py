"""Warm workers: the models and statistics a worker process loaded, kept for its next jobs.

A batch's members share a checkpoint and a layer. Without this cache each member would
read the checkpoint from disk, build the model, move it to the device and load the
statistic again; with it, a worker pays each load once. ``WorkerCache`` holds two
bounded LRU maps, sized by ``PALIMPSEST_CACHE_MODELS`` and
``PALIMPSEST_CACHE_STATISTICS`` (entries; 0 keeps nothing). Keys name content, never a
mutable name, so an entry cannot go stale:

- models by the sha256 of the checkpoint file (a segmenter, which has no recorded
  sha256, by its content-addressed object key, which contains it);
- statistics by (statistic id, sha256 of the statistic file).

Cached objects are shared by every job the process runs, so nobody may modify them:
``rewriting.edit.run_edit`` optimizes a copy of the weight through a functional call,
evaluation applies deltas to a deep copy, statistics are computed under hooks that
remove themselves, and edited checkpoints are materialized from the state dict on disk
(``rewriting.delta.materialize``). A ``SecondMoment`` from here is only read.

One cache per worker process (``PalimpsestCelery.cache``, built lazily, so each prefork
child has its own). ``LRU`` is also the API's cache of ready models (``api.models``), whose
gunicorn threads share it: its map is locked, never while a value loads.
"""
import logging
import threading
from collections import OrderedDict

log = logging.getLogger(__name__)


class LRU:
    """At most ``capacity`` values, the least recently used dropped first; counts loads and hits."""

    def __init__(self, capacity: int, what: str = "entry"):
        self.capacity = capacity
        self.what = what
        self.loads = 0
        self.hits = 0
        self._values = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, load):
        """The value under ``key``; ``load()`` makes (and keeps) it on a miss. A ``load`` that
        raises keeps nothing; two threads missing the same key at once both load it."""
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                self.hits += 1
                return self._values[key]
        value = load()
        self.loads += 1
        log.info("loaded %s %s (%d cached)", self.what, _short(key), min(len(self._values) + 1, self.capacity))
        self.put(key, value)
        return value

    def put(self, key, value) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._values[key] = value
            self._values.move_to_end(key)
            while len(self._values) > self.capacity:
                self._values.popitem(last=False)  # the model's memory goes with its last reference

    def discard(self, key) -> None:
        with self._lock:
            self._values.pop(key, None)

    def __contains__(self, key) -> bool:
        return key in self._values

    def __len__(self) -> int:
        return len(self._values)


def _short(key) -> str:
    parts = key if isinstance(key, tuple) else (key,)
    return "/".join(str(p)[:16] for p in parts)


class WorkerCache:
    """``models`` and ``statistics``: the two LRU maps of one worker process."""

    def __init__(self, models: int = 0, statistics: int = 0):
        self.models = LRU(models, "model")
        self.statistics = LRU(statistics, "statistic")

    @classmethod
    def from_settings(cls, settings) -> "WorkerCache":
        return cls(settings.cache_models, settings.cache_statistics)

    def model(self, key: str, load):
        """The model whose checkpoint is ``key`` (its sha256), loaded by ``load()`` on a miss."""
        return self.models.get(key, load)

    def statistic(self, statistic_id: str, sha256: str, load):
        """The ``SecondMoment`` of statistic ``statistic_id`` stored as ``sha256``."""
        return self.statistics.get((statistic_id, sha256), load)

    def keep_statistic(self, statistic_id: str, sha256: str, moment) -> None:
        """Keep a statistic this worker just computed, so its next job does not read it back."""
        self.statistics.put((statistic_id, sha256), moment)
