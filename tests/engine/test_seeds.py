import pytest
import torch

from rewriting.errors import EditRequestError
from rewriting.seeds import format_seeds, latent, latents, parse_seeds


def test_latent_convention_is_one_generator_per_seed():
    z = latents([3, 0, 7], 12)
    for row, s in zip(z, [3, 0, 7]):
        assert torch.equal(row, torch.randn(12, generator=torch.Generator().manual_seed(s)))
    assert z.dtype == torch.float32 and z.device.type == "cpu"


def test_latent_does_not_depend_on_batch():
    assert torch.equal(latents(range(10), 8)[4:6], latents([4, 5], 8))
    assert torch.equal(latent(5, 8), latents([5], 8)[0])


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
