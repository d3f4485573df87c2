from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from rewriting.errors import EditRequestError
from rewriting.seeds import format_seeds, latent, latent_batches, latents, parse_seeds


@pytest.mark.parametrize("z_dim", [12, 128])  # torch draws fewer than 16 normals another way
def test_latent_convention_is_one_generator_per_seed(z_dim):
    z = latents([3, 0, 7], z_dim)
    for row, s in zip(z, [3, 0, 7]):
        assert torch.equal(row, torch.randn(z_dim, generator=torch.Generator().manual_seed(s)))
    assert z.dtype == torch.float32 and z.device.type == "cpu"


def test_latent_does_not_depend_on_batch():
    assert torch.equal(latents(range(10), 8)[4:6], latents([4, 5], 8))
    assert torch.equal(latent(5, 8), latents([5], 8)[0])


@pytest.mark.parametrize("threads", [0, 1, 3])
@pytest.mark.parametrize("n", [1, 5, 23])
def test_latent_batches_are_the_latents_in_order(threads, n):
    batches = list(latent_batches(range(100, 100 + n), 16, 4, threads))
    assert [len(b) for b in batches] == [len(range(i, min(i + 4, n))) for i in range(0, n, 4)]
    assert torch.equal(torch.cat(batches), latents(range(100, 100 + n), 16))


def test_latents_drawn_by_threads_at_once_are_each_their_own():
    starts = range(0, 4000, 200)
    with ThreadPoolExecutor(4) as pool:
        drawn = list(pool.map(lambda s: latents(range(s, s + 200), 128), starts))
    for s, z in zip(starts, drawn):
        assert torch.equal(z, torch.stack([latent(i, 128) for i in range(s, s + 200)]))


@pytest.mark.parametrize("spec, expected", [
    ("0-3,7", [0, 1, 2, 3, 7]),
    (" 5 ", [5]),
    ("10-10", [10]),
    ("2, 4 - 5", [2, 4, 5]),
    (9, [9]),
    ([1, 3], [1, 3]),
])
def test_parse_seeds(spec, expected):
    assert parse_seeds(spec) == expected


@pytest.mark.parametrize("spec", ["", "a", "3-1", "1,1", "-2", "1-", [1, "2"], 1.5, True, [], "0-99999999"])
def test_parse_seeds_rejects(spec):
    with pytest.raises(EditRequestError) as e:
        parse_seeds(spec, field="seeds")
    assert e.value.field == "seeds"


def test_format_seeds_round_trip():
    seeds = [0, 1, 2, 5, 7, 8, 20]
    assert format_seeds(seeds) == "0-2,5,7-8,20"
    assert parse_seeds(format_seeds(seeds)) == seeds
