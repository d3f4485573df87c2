import pytest
import torch

from rewriting.directions import (RIDGE, context_directions, covariance_adjusted_keys,
                                  directions_from_keys, masked_keys, resize_masks, zca_matrix)
from rewriting.errors import EditRequestError
from rewriting.statistics import SecondMoment


def moment_of(n=500, c=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(c, dtype=torch.float64) + 0.3 * torch.randn(c, c, generator=g, dtype=torch.float64)
    keys = torch.randn(n, c, generator=g, dtype=torch.float64) @ mix + 0.5
    return SecondMoment(c).update(keys), keys


def test_covariance_adjusted_keys_solve_c():
    stat, keys = moment_of()
    k = keys[:5]
    d = covariance_adjusted_keys(stat, k)
    c = stat.matrix
    # C d = k up to the ridge: 1e-6 of the mean eigenvalue times d
    assert ((d @ c - k).abs().max() / k.abs().max()) < 1e-5
    exact = torch.linalg.solve(c, k.T).T
    assert (d - exact).abs().max() < 1e-4 * exact.abs().max()
    assert torch.allclose(covariance_adjusted_keys(stat, k[0]), d[0])


def test_ridge_keeps_a_singular_moment_solvable():
    keys = torch.randn(100, 4, dtype=torch.float64)
    keys[:, 3] = 0  # a channel that never fires
    stat = SecondMoment(4).update(keys)
    d = covariance_adjusted_keys(stat, keys[:3])
    assert torch.isfinite(d).all()
    assert torch.allclose(d[:, :3] @ stat.matrix[:3, :3], keys[:3, :3], rtol=1e-4, atol=1e-8)


def test_zca_whitens():
    stat, _ = moment_of()
    z = zca_matrix(stat)
    assert torch.allclose(z, z.T)
    assert torch.allclose(z @ stat.matrix @ z, torch.eye(6, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("method", ["zca", "svd", "mean"])
def test_directions_are_orthonormal_and_sign_aligned(method):
    stat, keys = moment_of()
    sel = keys[:30]
    rank = 1 if method == "mean" else 3
    d = directions_from_keys(sel, torch.ones(30, dtype=torch.float64), stat, rank=rank, method=method)
    assert d.shape == (rank, 6)
    assert torch.allclose(d @ d.T, torch.eye(rank, dtype=torch.float64), atol=1e-10)
    assert (d @ sel.mean(0) > 0).all()


def test_rank_one_directions_from_a_single_key_are_c_inverse_k():
    """Every method gives the paper's d = C^-1 k* (normalized) for one key."""
    stat, keys = moment_of()
    k = keys[7:8]
    expected = covariance_adjusted_keys(stat, k[0])
    expected = expected / expected.norm()
    for method in ("zca", "svd", "mean"):
        d = directions_from_keys(k, torch.ones(1, dtype=torch.float64), stat, rank=1, method=method)[0]
        assert torch.allclose(d, expected, atol=1e-8), method


def test_zca_directions_span_c_inverse_of_dominant_keys():
    """With rank = number of keys, the span is exactly span(C^-1 K*)."""
    stat, keys = moment_of()
    sel = keys[:3]
    d = directions_from_keys(sel, torch.ones(3, dtype=torch.float64), stat, rank=3)
    adjusted = covariance_adjusted_keys(stat, sel)
    residual = adjusted - adjusted @ d.T @ d
    assert residual.norm() < 1e-8 * adjusted.norm()


def test_masks_weight_and_select_keys():
    keys = torch.randn(2, 4, 8, 8)
    masks = torch.zeros(2, 32, 32)
    masks[0, :16, :16] = 1  # top-left quarter of image 0 only
    rows, w = masked_keys(keys, masks)
    assert rows.shape == (16, 4) and torch.allclose(w, torch.ones(16))
    assert torch.equal(rows, keys[0, :, :4, :4].permute(1, 2, 0).reshape(-1, 4))
    half = resize_masks(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), (1, 1))
    assert torch.allclose(half, torch.tensor([[[0.5]]]))


def test_context_directions_from_masks():
    stat, _ = moment_of(c=4)
    keys = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    masks = torch.zeros(2, 8, 8)
    masks[:, 2:4, 2:4] = 1
    d = context_directions(keys, masks, stat, rank=2)
    assert d.shape == (2, 4) and d.dtype == torch.float64


@pytest.mark.parametrize("kwargs, field", [
    ({"rank": 5}, "rank"),  # more than the 4 selected keys
    ({"rank": 0}, "rank"),
    ({"rank": 1.0}, "rank"),
    ({"rank": 2, "method": "mean"}, "rank"),
    ({"method": "nope"}, "key_method"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    stat, keys = moment_of()
    with pytest.raises(EditRequestError) as e:
        directions_from_keys(keys[:4], torch.ones(4), stat, **kwargs)
    assert e.value.field == field


def test_empty_mask_is_an_error():
    stat, _ = moment_of(c=4)
    with pytest.raises(EditRequestError) as e:
        context_directions(torch.randn(1, 4, 8, 8), torch.zeros(1, 8, 8), stat)
    assert e.value.field == "context"
    assert RIDGE == 1e-6


@pytest.mark.parametrize("method", ["zca", "svd"])
def test_rank_above_the_independent_keys_is_refused(method):
    # after a nearest upsample each 2x2 block repeats one key: 8 cells, 2 distinct keys
    stat, keys = moment_of()
    repeated = keys[:2].repeat_interleave(4, 0)
    ones = torch.ones(8, dtype=torch.float64)
    assert directions_from_keys(repeated, ones, stat, rank=2, method=method).shape == (2, 6)
    with pytest.raises(EditRequestError, match="2 independent keys") as error:
        directions_from_keys(repeated, ones, stat, rank=3, method=method)
    assert error.value.field == "rank"
