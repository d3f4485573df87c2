"""Covariance-adjusted keys, ZCA whitening and low-rank context directions.

All linear algebra runs in float64. ``C`` is the uncentered second moment of the
layer's keys (a ``SecondMoment`` or a [C, C] tensor). It is never inverted
explicitly: ``C^-1 k`` comes from a Cholesky solve, and whitening from ``eigh``.
Both add a ridge of ``RIDGE`` times the mean eigenvalue (``trace(C) / C``) to the
diagonal, so that channels that never fire (a singular ``C``) stay solvable while
well-conditioned directions move by about one part in a million.

Context directions ``D`` [rank, C] are orthonormal rows spanning the input-channel
subspace that an edit may change; they come from the keys under a mask:

- ``zca`` (default): whiten the weighted keys (``C^-1/2 k``), take the top right
  singular vectors, map them back to row space (``C^-1/2`` again, so they span
  ``C^-1`` times the dominant keys), orthonormalize (QR);
- ``svd``: top singular vectors of the covariance-adjusted keys ``C^-1 k``;
- ``mean``: ``C^-1`` times the weighted mean key (rank 1 only).

Signs are chosen so that each direction has a positive dot product with the
weighted mean key (the selected keys respond positively).
"""
import torch
import torch.nn.functional as F

from rewriting.errors import EditRequestError, IncompatibleError

RIDGE = 1e-6
KEY_METHODS = ("zca", "svd", "mean")
DIRECTION_TOLERANCE = 1e-6  # singular values below this (relative to the largest) add no direction


def moment_matrix(moment):
    """The [C, C] float64 second-moment matrix of a ``SecondMoment`` or a tensor."""
    c = moment.matrix if hasattr(moment, "matrix") else moment
    if c.dim() != 2 or c.shape[0] != c.shape[1]:
        raise IncompatibleError(f"a second moment must be square, not {tuple(c.shape)}")
    return c.to(torch.float64)


def regularized(c):
    """``C + RIDGE * (trace(C) / n) * I`` (float64)."""
    c = moment_matrix(c)
    n = c.shape[0]
    scale = torch.trace(c).clamp_min(0) / n
    if not torch.isfinite(scale) or scale <= 0:
        raise IncompatibleError("the second moment is zero or not finite; collect statistics again")
    return c + RIDGE * scale * torch.eye(n, dtype=c.dtype, device=c.device)


def covariance_adjusted_keys(moment, keys):
    """``C^-1 k`` for each row of ``keys`` [M, C] (or one key [C]), by a Cholesky solve."""
    c = regularized(moment)
    one = keys.dim() == 1
    k = (keys[None] if one else keys).to(device=c.device, dtype=torch.float64)
    _check_channels(c, k)
    chol, info = torch.linalg.cholesky_ex(c)
    if info.item() != 0:
        raise IncompatibleError("the second moment is not positive definite even with the ridge")
    out = torch.cholesky_solve(k.T, chol).T
    out = out.to(device=keys.device, dtype=keys.dtype)
    return out[0] if one else out


def zca_matrix(moment):
    """The symmetric whitening matrix ``C^-1/2`` (float64), from ``eigh`` with the ridge."""
    c = regularized(moment)
    vals, vecs = torch.linalg.eigh(c)
    # eigh may return tiny negative values for a PSD matrix; the ridge keeps them positive.
    vals = vals.clamp_min(RIDGE * torch.trace(c) / c.shape[0] * 1e-3)
    return (vecs * vals.rsqrt()) @ vecs.T


def resize_masks(masks, size):
    """Masks [N, h, w] (or [h, w]) in [0, 1] resampled to the layer's (H, W), float.

    Prefer rendering masks at the layer's size directly (``rewriting.requests.mask_at``).
    """
    m = masks.float()
    if m.dim() == 2:
        m = m[None]
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    # Shrinking averages the mask over each layer cell (the fraction of it covered);
    # growing repeats the nearest mask cell.
    shrink = m.shape[-2] >= size[0] and m.shape[-1] >= size[1]
    return F.interpolate(m[:, None], size=tuple(size), mode="area" if shrink else "nearest")[:, 0]


def masked_keys(keys, masks):
    """Rows and weights of the keys a mask selects.

    ``keys`` [N, C, H, W] with ``masks`` [N, h, w] (resized to (H, W)), or keys
    [N, C] with per-key weights [N]. Returns (keys [M, C], weights [M]) for the M
    locations of positive weight.
    """
    if keys.dim() == 4:
        if masks.dim() == 2:
            masks = masks[None].expand(keys.shape[0], -1, -1)
        if masks.shape[0] != keys.shape[0]:
            raise EditRequestError("context", f"{masks.shape[0]} masks for {keys.shape[0]} images")
        w = resize_masks(masks, keys.shape[2:]).to(keys.device).reshape(-1)
        rows = keys.permute(0, 2, 3, 1).reshape(-1, keys.shape[1])
    else:
        w = masks.reshape(-1).to(keys.device, torch.float32)
        rows = keys.reshape(-1, keys.shape[-1])
        if w.shape[0] != rows.shape[0]:
            raise EditRequestError("context", f"{w.shape[0]} weights for {rows.shape[0]} keys")
    keep = w > 0
    return rows[keep], w[keep]


def directions_from_keys(keys, weights, moment, rank=1, method="zca", field="context"):
    """Orthonormal context directions D [rank, C] from weighted key rows [M, C]."""
    if method not in KEY_METHODS:
        raise EditRequestError("key_method", f"must be one of {KEY_METHODS}, not {method!r}")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise EditRequestError("rank", f"must be a positive integer, not {rank!r}")
    if method == "mean" and rank != 1:
        raise EditRequestError("rank", "key_method 'mean' gives one direction; use rank 1")
    c = moment_matrix(moment)
    k = keys.to(device=c.device, dtype=torch.float64)
    _check_channels(c, k)
    w = weights.to(device=c.device, dtype=torch.float64).reshape(-1)
    if k.shape[0] == 0 or not (w > 0).any():
        raise EditRequestError(field, "the mask selects no location at this layer's resolution")
    keep = w > 0
    k, w = k[keep], w[keep]
    if rank > min(k.shape[0], k.shape[1]):
        raise EditRequestError("rank", f"rank {rank} exceeds the {k.shape[0]} selected keys "
                               f"or the {k.shape[1]} key channels")
    mean_key = (w[:, None] * k).sum(0) / w.sum()
    if method == "mean":
        d = covariance_adjusted_keys(c, mean_key)[None]
        q = d.T / d.norm()
    elif method == "svd":
        adjusted = covariance_adjusted_keys(c, w[:, None] * k)
        _, s, vh = torch.linalg.svd(adjusted, full_matrices=False)
        _check_independent(s, rank, field)
        q = vh[:rank].T
    else:
        z = zca_matrix(c)
        whitened = (w[:, None] * k) @ z
        _, s, vh = torch.linalg.svd(whitened, full_matrices=False)
        _check_independent(s, rank, field)
        q, _ = torch.linalg.qr(z @ vh[:rank].T)  # back to row space, then orthonormal
    signs = torch.sign(q.T @ mean_key)
    signs[signs == 0] = 1
    return (q * signs).T.to(device=keys.device, dtype=keys.dtype if keys.is_floating_point() else torch.float32)


def context_directions(keys, masks, moment, rank=1, method="zca"):
    """Context directions from a layer's keys and the masks over them (see module doc)."""
    rows, w = masked_keys(keys, masks)
    return directions_from_keys(rows, w, moment, rank=rank, method=method)


def _check_independent(singular_values, rank, field):
    # Keys can repeat (after a nearest upsample, each 2x2 block holds one key): directions
    # past the keys' own rank would be numerical noise, different on every run.
    independent = int((singular_values > DIRECTION_TOLERANCE * singular_values[0]).sum())
    if rank > independent:
        raise EditRequestError("rank", f"rank {rank} exceeds the {independent} independent keys that the {field} "
                               "selects at this layer (repeated keys count once); lower the rank or widen the "
                               f"{field}")


def _check_channels(c, k):
    if k.shape[-1] != c.shape[0]:
        raise IncompatibleError(f"keys have {k.shape[-1]} channels, the second moment {c.shape[0]}")
