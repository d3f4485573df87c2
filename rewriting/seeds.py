"""Latents from integer seeds.

Convention: the latent of seed ``s`` is
``torch.randn(z_dim, generator=torch.Generator().manual_seed(s))``, drawn on the CPU
in float32, one generator per seed. A latent therefore depends only on its own
seed and ``z_dim``, never on the batch it is drawn in, the device or the order of
seeds, so a statistic over seeds 0-9999 equals the merge of 0-4999 and 5000-9999.
"""
import collections
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import List

import torch

from rewriting.errors import EditRequestError

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed accepts 64-bit values
MAX_SEEDS = 10_000_000  # one spec may not name more seeds than this
SPAN = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def latent(seed, z_dim):
    """The latent vector of one seed: FloatTensor[z_dim] on the CPU."""
    return torch.randn(z_dim, generator=torch.Generator().manual_seed(int(seed)))


def _draw(seeds: List[int], z_dim: int, gen: torch.Generator) -> torch.Tensor:
    out = torch.empty(len(seeds), z_dim)
    for i in range(len(seeds)):
        gen.manual_seed(seeds[i])
        out[i].normal_(0.0, 1.0, generator=gen)  # what randn does inside
    return out


# Scripted, the loop runs without Python's interpreter lock: it is ~1.2x faster than
# the same loop in Python, and threads drawing ahead (latent_batches) leave the
# caller's thread free. TorchScript is deprecated but still the one way to run a loop
# of torch calls outside the lock; the check against torch.randn is in the tests.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    _draw = torch.jit.script(_draw)


def latents(seeds, z_dim):
    """Latents of several seeds, stacked: FloatTensor[len(seeds), z_dim] on the CPU."""
    # The generator comes from here: one made inside the script is one object shared
    # by every call, and threads drawing at once would race on it.
    return _draw([int(s) for s in seeds], int(z_dim), torch.Generator())


def latent_batches(seeds, z_dim, batch_size, threads=0):
    """Yield the latents of ``seeds`` batch by batch, in order.

    Drawing costs ~4-10 µs of CPU a seed, which on a GPU is as long as the forward
    pass it feeds; with ``threads`` > 0, that many threads draw up to two batches
    each ahead, outside the interpreter lock, while the caller launches GPU work.
    One thread draws ~200,000-250,000 seeds/s on an H100 host (docs/benchmarks.md).
    """
    seeds = list(seeds)
    chunks = [seeds[i:i + batch_size] for i in range(0, len(seeds), batch_size)]
    if threads <= 0 or len(chunks) < 2:
        for chunk in chunks:
            yield latents(chunk, z_dim)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="latents") as pool:
        ahead = collections.deque(pool.submit(latents, c, z_dim) for c in chunks[:2 * threads])
        try:
            for following in chunks[2 * threads:] + [None] * len(ahead):
                z = ahead.popleft().result()
                if following is not None:
                    ahead.append(pool.submit(latents, following, z_dim))
                yield z
        finally:
            for future in ahead:
                future.cancel()


def parse_seeds(spec, field="seeds"):
    """Parse ``"0-15,20"`` (inclusive ranges, commas) into a list of ints, in order.

    Also accepts an int or a list of ints. Raises ``EditRequestError(field, ...)``
    for anything else, negative or huge seeds, reversed ranges, duplicates and
    empty specs.
    """
    if isinstance(spec, bool):
        raise EditRequestError(field, "expected seeds such as '0-15,20', not a boolean")
    if isinstance(spec, int):
        seeds = [spec]
    elif isinstance(spec, (list, tuple, range)):
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in spec):
            raise EditRequestError(field, "a list of seeds must hold integers only")
        seeds = list(spec)
    elif isinstance(spec, str):
        seeds = []
        for part in spec.split(","):
            m = SPAN.match(part)
            if not m:
                raise EditRequestError(field, f"cannot read {part.strip()!r}; use e.g. '0-15,20'")
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            if hi < lo:
                raise EditRequestError(field, f"range {lo}-{hi} is reversed")
            if len(seeds) + hi - lo + 1 > MAX_SEEDS:
                raise EditRequestError(field, f"more than {MAX_SEEDS} seeds")
            seeds.extend(range(lo, hi + 1))
    else:
        raise EditRequestError(field, f"expected a string such as '0-15,20', not {type(spec).__name__}")
    if not seeds:
        raise EditRequestError(field, "no seeds given")
    if len(seeds) > MAX_SEEDS:
        raise EditRequestError(field, f"more than {MAX_SEEDS} seeds")
    for s in seeds:
        if s < 0 or s > MAX_SEED:
            raise EditRequestError(field, f"seed {s} is outside 0..{MAX_SEED}")
    if len(set(seeds)) != len(seeds):
        raise EditRequestError(field, "a seed is repeated")
    return seeds


def format_seeds(seeds):
    """The shortest spec for ``seeds`` in the given order: [0, 1, 2, 5] -> "0-2,5"."""
    parts = []
    seeds = [int(s) for s in seeds]
    i = 0
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(str(seeds[i]) if i == j else f"{seeds[i]}-{seeds[j]}")
        i = j + 1
    return ",".join(parts)
