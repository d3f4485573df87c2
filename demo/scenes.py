"""Procedural scenes: the demo world's dataset, rendered by the project's own code.

A scene is a sky gradient above a ground band, 1 to 3 buildings each topped by a
dome (upper half-disc) or a spire (triangle), and 0 to 2 trees (a green disc on a
trunk) standing on the ground in the free space between buildings.

Rules an edit can change: every building wears a top; a tree stands on the ground.
Domes and spires draw their colour from one palette, so only shape tells them apart.
Tops are large: building width >= 0.2 of the image and dome radius >= 0.6 of the
building width, so a top covers at least one cell of an 8x8 feature map.

Determinism: scene ``s`` is a function of ``torch.rand(N_UNIFORMS)`` drawn from
``torch.Generator().manual_seed(s)`` alone; everything after that is vectorized
tensor code over the batch (and runs on any device).
"""
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

CLASSES = ("sky", "ground", "building", "dome", "spire", "tree")
SKY, GROUND, BUILDING, DOME, SPIRE, TREE = range(6)

MAX_BUILDINGS = 3
MAX_TREES = 2
MARGIN = 0.02  # free border left and right of the row of buildings
N_UNIFORMS = 96  # uniforms per scene; fixed so adding a draw never shifts the others

# Palettes, RGB in [0, 1].
BUILDING_COLOURS = torch.tensor([
    [0.85, 0.83, 0.78], [0.60, 0.60, 0.62], [0.78, 0.66, 0.48], [0.68, 0.30, 0.25],
    [0.85, 0.72, 0.35], [0.60, 0.72, 0.82], [0.86, 0.62, 0.62], [0.45, 0.40, 0.38],
])
TOP_COLOURS = torch.tensor([  # shared by domes and spires
    [0.88, 0.70, 0.18], [0.30, 0.62, 0.55], [0.28, 0.30, 0.42], [0.72, 0.18, 0.18], [0.22, 0.32, 0.72],
])
TOP_COLOUR_NAMES = ("gold", "teal", "slate", "red", "blue")
GROUND_COLOURS = torch.tensor([
    [0.55, 0.45, 0.30], [0.46, 0.41, 0.32], [0.62, 0.56, 0.42], [0.42, 0.36, 0.26], [0.52, 0.50, 0.38],
])
TRUNK_COLOUR = (0.40, 0.25, 0.10)


@dataclass
class SceneParams:
    """Geometry and colours of N scenes, as tensors on one device; coordinates are in
    image fractions (x right, y down). Slots past a scene's count have ``*_valid`` False."""
    horizon: torch.Tensor        # [N]
    sky_top: torch.Tensor        # [N, 3]
    sky_bottom: torch.Tensor     # [N, 3]
    ground: torch.Tensor         # [N, 3]
    building_valid: torch.Tensor  # [N, B] bool
    building_x0: torch.Tensor    # [N, B] left edge of the body
    building_x1: torch.Tensor    # [N, B] right edge of the body
    building_top: torch.Tensor   # [N, B] y of the roof line (the top sits on it)
    building_base: torch.Tensor  # [N, B] y of the foot (below the horizon)
    building_colour: torch.Tensor  # [N, B, 3]
    is_spire: torch.Tensor       # [N, B] bool (else dome)
    top_radius: torch.Tensor     # [N, B] dome radius = spire half-base
    spire_height: torch.Tensor   # [N, B]
    top_colour: torch.Tensor     # [N, B, 3]
    tree_valid: torch.Tensor     # [N, T] bool
    tree_x: torch.Tensor         # [N, T] centre of crown and trunk
    tree_base: torch.Tensor      # [N, T] y of the trunk's foot (below the horizon)
    tree_trunk_height: torch.Tensor  # [N, T]
    tree_trunk_width: torch.Tensor   # [N, T]
    tree_radius: torch.Tensor    # [N, T] crown radius
    tree_colour: torch.Tensor    # [N, T, 3]

    def to(self, device):
        return SceneParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def scene_uniforms(seeds, device="cpu") -> torch.Tensor:
    """[N, N_UNIFORMS] uniforms, row i a function of seeds[i] alone."""
    rows = [torch.rand(N_UNIFORMS, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows).to(device)


def _pick(palette, u, jitter_u, amount):
    """Palette entry chosen by u in [0,1), each channel jittered by +-amount."""
    idx = (u * len(palette)).long().clamp_max(len(palette) - 1)
    colour = palette.to(u.device)[idx] + amount * (2 * jitter_u - 1)
    return colour.clamp(0, 1)


def sample_scenes(seeds, device="cpu") -> SceneParams:
    """Scene parameters for ``seeds``; deterministic by seed, vectorized over the batch."""
    u = scene_uniforms(seeds, device)
    n_scenes, B, T = len(u), MAX_BUILDINGS, MAX_TREES
    nxt = iter(range(N_UNIFORMS))

    def draw(*shape):  # the next uniforms, in a fixed order
        k = 1
        for s in shape:
            k *= s
        cols = [next(nxt) for _ in range(k)]
        return u[:, cols].reshape(n_scenes, *shape)

    horizon = 0.62 + 0.16 * draw()
    sky_top = torch.stack([0.20 + 0.30 * draw(), 0.40 + 0.30 * draw(), 0.80 + 0.20 * draw()], 1)
    sky_bottom = torch.stack([0.70 + 0.20 * draw(), 0.80 + 0.15 * draw(), 0.93 + 0.07 * draw()], 1)
    ground = _pick(GROUND_COLOURS, draw(), draw(3), 0.04)

    # Buildings: count, widths, then a row of non-overlapping slots as wide as their tops.
    count = 1 + (draw() * B).long().clamp_max(B - 1)
    slot = torch.arange(B, device=device)
    valid = slot[None] < count[:, None]
    max_width = torch.tensor([0.28, 0.26, 0.21], device=device)[count - 1]
    width = 0.20 + (max_width[:, None] - 0.20) * draw(B)
    radius = width * (0.60 + 0.08 * draw(B))  # dome radius >= 0.6 of the building width
    slot_width = torch.where(valid, 2 * radius, torch.zeros_like(radius))
    free = 1 - 2 * MARGIN - slot_width.sum(1)
    gap_weight = (0.2 + draw(B + 1)) * torch.cat([torch.ones_like(valid[:, :1]), valid], 1)
    gaps = free[:, None] * gap_weight / gap_weight.sum(1, keepdim=True)  # [N, B+1]
    slot_left = MARGIN + torch.cumsum(gaps[:, :B], 1) + torch.cumsum(slot_width, 1) - slot_width
    centre = slot_left + radius
    is_spire = draw(B) < 0.5
    spire_height = radius * (1.3 + 0.5 * draw(B))
    top_height = torch.where(is_spire, spire_height, radius)
    base = horizon[:, None] + 0.06 * draw(B)
    body = torch.minimum(0.15 + 0.20 * draw(B), base - top_height - 0.03)
    building_colour = _pick(BUILDING_COLOURS, draw(B), draw(B, 3), 0.05)
    top_colour = _pick(TOP_COLOURS, draw(B), draw(B, 3), 0.04)

    # Trees: each wants 0..2, and stands in a gap between slots that is wide enough.
    wanted = (draw() * 3).long()
    tree_radius = 0.06 + 0.03 * draw(T)
    gap_left = torch.cat([torch.full_like(gaps[:, :1], MARGIN), slot_left + slot_width], 1)  # [N, B+1]
    gap_valid = torch.cat([torch.ones_like(valid[:, :1]), valid], 1)
    fits = gap_valid[:, None, :] & (gaps[:, None, :] >= 2 * tree_radius[:, :, None] + 0.02)  # [N, T, B+1]
    score = torch.where(fits, draw(T, B + 1), torch.full_like(fits, -1.0, dtype=u.dtype))
    gap_index = score.argmax(2)
    tree_valid = fits.any(2) & (torch.arange(T, device=device)[None] < wanted[:, None])
    g_left = gap_left.gather(1, gap_index)
    g_width = gaps.gather(1, gap_index)
    tree_x = g_left + 0.01 + tree_radius + (g_width - 2 * tree_radius - 0.02).clamp_min(0) * draw(T)
    tree_base = horizon[:, None] + 0.04 + (0.95 - horizon[:, None] - 0.04) * draw(T)
    trunk_height = 0.05 + 0.05 * draw(T)
    trunk_width = 0.02 + 0.015 * draw(T)
    tree_colour = torch.stack([0.10 + 0.18 * draw(T), 0.42 + 0.25 * draw(T), 0.08 + 0.15 * draw(T)], 2)

    return SceneParams(
        horizon=horizon, sky_top=sky_top, sky_bottom=sky_bottom, ground=ground,
        building_valid=valid, building_x0=centre - width / 2, building_x1=centre + width / 2,
        building_top=base - body, building_base=base, building_colour=building_colour,
        is_spire=is_spire, top_radius=radius, spire_height=spire_height, top_colour=top_colour,
        tree_valid=tree_valid, tree_x=tree_x, tree_base=tree_base, tree_trunk_height=trunk_height,
        tree_trunk_width=trunk_width, tree_radius=tree_radius, tree_colour=tree_colour,
    )


def paint_scenes(p: SceneParams, size: int):
    """Rasterize at ``size`` x ``size`` (pixel centres): (colour [N,3,S,S] in [0,1], labels [N,S,S])."""
    device = p.horizon.device
    n = len(p.horizon)
    c = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    y = c[None, :, None]  # [1, S, 1]
    x = c[None, None, :]  # [1, 1, S]
    shape = (n, size, size)
    labels = torch.full(shape, SKY, dtype=torch.long, device=device)
    t = (y / p.horizon[:, None, None]).clamp(0, 1)[:, None]  # [N,1,S,1]
    colour = (p.sky_top[:, :, None, None] * (1 - t) + p.sky_bottom[:, :, None, None] * t).expand(n, 3, size, size)
    colour = colour.clone()

    def paint(mask, rgb, label):  # mask [N,S,S]; rgb [N,3] or [N,3,S,S]
        if rgb.dim() == 2:
            rgb = rgb[:, :, None, None]
        m = mask[:, None]
        colour.copy_(torch.where(m, rgb.expand_as(colour), colour))
        labels.masked_fill_(mask, label)

    ground_mask = (y >= p.horizon[:, None, None]).expand(shape)
    depth = ((y - p.horizon[:, None, None]) / (1 - p.horizon[:, None, None])).clamp(0, 1)[:, None]
    paint(ground_mask, p.ground[:, :, None, None] * (1 - 0.25 * depth), GROUND)

    for b in range(p.building_valid.shape[1]):
        ok = p.building_valid[:, b, None, None]
        x0, x1 = p.building_x0[:, b, None, None], p.building_x1[:, b, None, None]
        top, base = p.building_top[:, b, None, None], p.building_base[:, b, None, None]
        body = ok & (x >= x0) & (x <= x1) & (y >= top) & (y <= base)
        paint(body, p.building_colour[:, b], BUILDING)
        cx, r = (x0 + x1) / 2, p.top_radius[:, b, None, None]
        dx = (x - cx) / r  # -1..1 across the top
        shade = (1.15 - 0.3 * (dx.clamp(-1, 1) + 1) / 2)[:, None]  # lit from the left
        top_rgb = (p.top_colour[:, b, :, None, None] * shade).clamp(0, 1)
        dome = ok & ~p.is_spire[:, b, None, None] & (y <= top) & ((x - cx) ** 2 + (y - top) ** 2 <= r ** 2)
        h = p.spire_height[:, b, None, None]
        rise = (top - y) / h  # 0 at the roof line, 1 at the apex
        spire = ok & p.is_spire[:, b, None, None] & (rise >= 0) & (rise <= 1) & ((x - cx).abs() <= r * (1 - rise))
        paint(dome, top_rgb, DOME)
        paint(spire, top_rgb, SPIRE)

    trunk_rgb = torch.tensor(TRUNK_COLOUR, device=device).expand(n, 3)
    for k in range(p.tree_valid.shape[1]):
        ok = p.tree_valid[:, k, None, None]
        tx, base = p.tree_x[:, k, None, None], p.tree_base[:, k, None, None]
        th, tw, r = (p.tree_trunk_height[:, k, None, None], p.tree_trunk_width[:, k, None, None],
                     p.tree_radius[:, k, None, None])
        trunk = ok & ((x - tx).abs() <= tw / 2) & (y <= base) & (y >= base - th - r)
        crown_y = base - th - 0.8 * r
        crown = ok & ((x - tx) ** 2 + (y - crown_y) ** 2 <= r ** 2)
        paint(trunk, trunk_rgb, TREE)
        shade = (1.1 - 0.2 * ((x - tx) / r + 1).clamp(0, 2) / 2)[:, None]
        paint(crown, (p.tree_colour[:, k, :, None, None] * shade).clamp(0, 1), TREE)
    return colour, labels


def render_scenes(seeds, size=64, device="cpu"):
    """(images FloatTensor[N,3,size,size] in [-1,1], labels LongTensor[N,size,size]) for ``seeds``.

    Colours are rendered at twice the size and averaged down (anti-aliasing);
    labels are the class at each pixel centre."""
    p = sample_scenes(seeds, device)
    colour, _ = paint_scenes(p, 2 * size)
    _, labels = paint_scenes(p, size)
    images = F.avg_pool2d(colour, 2) * 2 - 1
    return images, labels


def label_colours() -> torch.Tensor:
    """[6, 3] display colour per class, for label maps in grids."""
    return torch.tensor([
        [0.55, 0.75, 1.00], [0.55, 0.40, 0.25], [0.70, 0.70, 0.70], [1.00, 0.80, 0.10], [0.85, 0.10, 0.85],
        [0.10, 0.70, 0.10],
    ])


def nearest_top_colour(images, mask) -> torch.Tensor:
    """[N] index into TOP_COLOURS of the mean colour of each image's ``mask`` pixels
    (images [N,3,H,W] in [-1,1], mask [N,H,W] bool): a generated top's colour family."""
    mask = mask[:, None]
    rgb = ((images + 1) / 2 * mask).sum((2, 3)) / mask.sum((2, 3)).clamp_min(1)
    return torch.cdist(rgb, TOP_COLOURS.to(rgb.device)).argmin(1)
