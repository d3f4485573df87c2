"""Latents from integer seeds.

Convention: the latent of seed ``s`` is
``torch.randn(z_dim, generator=torch.Generator().manual_seed(s))``, drawn on the CPU
in float32, one generator per seed. A latent therefore depends only on its own
seed and ``z_dim``, never on the batch it is drawn in, the device or the order of
seeds, so a statistic over seeds 0-9999 equals the merge of 0-4999 and 5000-9999.
"""
import re

import torch

from rewriting.errors import EditRequestError

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed accepts 64-bit values
MAX_SEEDS = 10_000_000  # one spec may not name more seeds than this
SPAN = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def latent(seed, z_dim):
    """The latent vector of one seed: FloatTensor[z_dim] on the CPU."""
    return torch.randn(z_dim, generator=torch.Generator().manual_seed(int(seed)))


def latents(seeds, z_dim):
    """Latents of several seeds, stacked: FloatTensor[len(seeds), z_dim] on the CPU."""
    seeds = list(seeds)
    out = torch.empty(len(seeds), z_dim)
    gen = torch.Generator()
    for i, s in enumerate(seeds):
        gen.manual_seed(int(s))
        torch.randn(z_dim, generator=gen, out=out[i])
    return out


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
