"""A procedural fake drone-imagery dataset in the AeroScapes layout, so every stage runs without a download.

Scenes are painted in layers, each drawn with the same geometry on the RGB image and on the label map:
textured ground cover (vegetation, bare earth, water, roads with lane markings), then the shadows of
everything standing on it, tree canopies, and finally buildings, obstacles, vehicles, people, animals,
boats and drones. About half the frames are oblique views with a horizon, distance haze and sky.

The scenes are labelled with AeroScapes' classes and written through its `cachedseg.dataset.Dataset`:
    DIR/JPEGImages/<id>.jpg           RGB, JPEG quality 90
    DIR/SegmentationClass/<id>.png    mode 'L', class indices 0..11 (`cachedseg.dataset.AEROSCAPES`)
    DIR/ImageSets/trn.txt, val.txt    one id per line; whole sequences go to one split
"""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from cachedseg.dataset import AEROSCAPES, DATASET_FILE, Dataset
from cachedseg.dataset_file import load_dataset_file

(BACKGROUND, PERSON, BIKE, CAR, DRONE, BOAT, ANIMAL, OBSTACLE, CONSTRUCTION, VEGETATION, ROAD,
 SKY) = (AEROSCAPES.names.index(name) for name in (
    "background", "person", "bike", "car", "drone", "boat", "animal", "obstacle", "construction",
    "vegetation", "road", "sky"))

MIN_SIDE = 32  # below this the small classes cannot all get a few pixels each
JPEG_QUALITY = 90

# Palettes (RGB); each scene and object jitters them a little so no two look alike.
_GRASS = (((48, 78, 36), (112, 142, 64)), ((70, 84, 40), (140, 146, 82)), ((38, 66, 40), (88, 122, 62)))
_EARTH = (((112, 88, 62), (168, 142, 106)), ((118, 112, 102), (176, 170, 158)), ((128, 96, 66), (190, 160, 118)))
_WATER = ((28, 54, 74), (54, 96, 114))
_ASPHALT = ((66, 67, 71), (104, 104, 108))
_CANOPY = ((22, 46, 22), (62, 98, 42))
_ROOFS = ((165, 78, 58), (120, 62, 48), (88, 88, 92), (172, 170, 165), (212, 206, 196), (96, 108, 122),
          (140, 112, 84))
_CARS = ((236, 236, 236), (26, 26, 30), (160, 162, 166), (172, 32, 30), (32, 62, 142), (72, 74, 78),
         (204, 172, 42), (42, 92, 62))
_CLOTHES = ((200, 40, 40), (40, 70, 160), (232, 232, 222), (32, 32, 32), (232, 182, 40), (60, 122, 60),
            (152, 92, 162))
_HAIR = ((30, 24, 20), (84, 56, 34), (196, 168, 110), (120, 120, 120))
_ANIMALS = ((122, 76, 40), (236, 230, 216), (36, 30, 28), (192, 152, 102))
_BOATS = ((242, 242, 240), (202, 52, 42), (42, 82, 152), (232, 202, 62))
_FENCES = ((110, 84, 60), (150, 150, 146), (70, 70, 72))
_DRONES = ((30, 30, 34), (228, 228, 228), (70, 72, 78))


# Unit-square sample points, scaled to a footprint to check that it is clear of roads and water.
_GRID = np.stack(np.meshgrid(np.linspace(-0.5, 0.5, 6), np.linspace(-0.5, 0.5, 6)), -1).reshape(-1, 2)


class _View(NamedTuple):
    """Frame geometry: size, and for oblique views the (possibly tilted) horizon and the far treeline."""

    width: int
    height: int
    oblique: bool
    horizon_left: float = 0.0   # horizon row at x = 0 (0 for straight-down views)
    horizon_right: float = 0.0  # horizon row at x = width
    band: float = 0.0           # thickness of the distant treeline just below the horizon

    @property
    def unit(self) -> int:
        """Length that object sizes scale with, so scenes look alike from 64 px to 1280 px."""
        return min(self.width, self.height)

    @property
    def top(self) -> float:
        """First row where things may stand (below the horizon and the distant treeline)."""
        return max(self.horizon_left, self.horizon_right) + self.band if self.oblique else 0.0

    def scale(self, y):
        """Perspective size factor at row y: 1 near the camera, shrinking towards the horizon."""
        if not self.oblique:
            return np.ones_like(np.asarray(y, np.float64)) if np.ndim(y) else 1.0
        horizon = min(self.horizon_left, self.horizon_right)
        t = np.clip((np.asarray(y, np.float64) - horizon) / max(self.height - horizon, 1.0), 0.0, 1.0)
        return 0.3 + 0.7 * t if np.ndim(y) else float(0.3 + 0.7 * t)


class _Spots:
    """Random pixel positions drawn from a boolean mask (precomputed so each pick is O(1))."""

    def __init__(self, mask: np.ndarray):
        self.width = mask.shape[1]
        self.index = np.flatnonzero(mask)

    def __bool__(self) -> bool:
        return self.index.size > 0

    def pick(self, rng: np.random.Generator) -> tuple[float, float]:
        """One random (x, y) inside the mask, at the pixel centre."""
        i = int(self.index[rng.integers(self.index.size)])
        return i % self.width + 0.5, i // self.width + 0.5


def _first(*spots: _Spots) -> _Spots:
    """The first non-empty candidate set (fallbacks for scenes where e.g. all water is bridged over)."""
    return next((s for s in spots if s), spots[-1])


class _Canvas:
    """Shapes to draw with identical geometry on image and label map, plus the shadows they cast.

    Shadows are collected separately because they must darken the ground before the objects are drawn.
    """

    def __init__(self, sun: np.ndarray):
        self.sun = sun      # shadow displacement per pixel of object height
        self.shapes = []    # (kind, xy, rgb, cls, width); cls None = image only
        self.shadows = []   # (kind, xy, width)

    def polygon(self, xy, rgb, cls, height: float = 0.0) -> None:
        """A filled polygon; with height > 0 it casts the shadow of its extrusion."""
        self.shapes.append(("polygon", xy, rgb, cls, 0))
        if height > 0:
            dx, dy = self.sun * height
            moved = [(x + dx, y + dy) for x, y in xy]
            # The swept volume's shadow is the moved polygon plus one quad per edge.
            for (a, b), (c, d) in zip(zip(xy, xy[1:] + xy[:1]), zip(moved, moved[1:] + moved[:1])):
                self.shadows.append(("polygon", [a, b, d, c], 0))
            self.shadows.append(("polygon", moved, 0))

    def disc(self, cx: float, cy: float, r: float, rgb, cls, height: float = 0.0) -> None:
        """A filled circle; with height > 0 it casts an elongated shadow."""
        self.shapes.append(("ellipse", [cx - r, cy - r, cx + r, cy + r], rgb, cls, 0))
        if height > 0:
            self.disc_shadow(cx, cy, r, height)

    def disc_shadow(self, cx: float, cy: float, r: float, height: float) -> None:
        """Shadow of a round object of radius r and the given height (trees, heads)."""
        dx, dy = self.sun * height
        self.shadows.append(("ellipse", [cx + dx - r, cy + dy - r, cx + dx + r, cy + dy + r], 0))
        self.shadows.append(("line", [(cx, cy), (cx + dx, cy + dy)], max(1, round(2 * r))))

    def line(self, xy, rgb, cls, width: int, height: float = 0.0) -> None:
        """A thick polyline with round joints; with height > 0 a displaced copy is its shadow."""
        self.shapes.append(("line", xy, rgb, cls, int(width)))
        if height > 0:
            dx, dy = self.sun * height
            self.shadows.append(("line", [(x + dx, y + dy) for x, y in xy], int(width)))

    def shadow_line(self, xy, width: int) -> None:
        """A shadow with no visible caster shape of its own (the long shadow of a thin pole)."""
        self.shadows.append(("line", xy, int(width)))


def _draw(draw: ImageDraw.ImageDraw, kind: str, xy, fill, width: int) -> None:
    """Draw one primitive; the same call on the RGB and the 'L' image rasterises the same pixels."""
    if kind == "polygon":
        draw.polygon(xy, fill=fill)
    elif kind == "ellipse":
        draw.ellipse(xy, fill=fill)
    else:
        draw.line(xy, fill=fill, width=width, joint="curve")


# --- noise and textures -----------------------------------------------------------------------------

def _fbm(rng: np.random.Generator, height: int, width: int, cell: float, octaves: int = 3) -> np.ndarray:
    """Fractal value noise, z-scored: random grids of halving cell size, upsampled smoothly and summed."""
    total = np.zeros((height, width), np.float32)
    amplitude = 1.0
    for _ in range(octaves):
        grid = rng.random((max(2, round(height / cell) + 2), max(2, round(width / cell) + 2)), dtype=np.float32)
        total += amplitude * np.asarray(Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC))
        amplitude *= 0.5
        cell = max(1.0, cell / 2)
    total -= total.mean()
    total /= max(float(total.std()), 1e-6)
    return total


def _mix(dark, light, t: np.ndarray) -> np.ndarray:
    """Blend two colours per pixel by weight t (clipped to [0, 1]) -> float32 [H, W, 3]."""
    dark = np.asarray(dark, np.float32)
    light = np.asarray(light, np.float32)
    return dark + (light - dark) * np.clip(t, 0.0, 1.0)[..., None]


def _vary(rng: np.random.Generator, rgb, amount: float = 0.08) -> tuple[int, int, int]:
    """Jitter a colour's brightness and tint so repeated objects are not identical."""
    out = np.asarray(rgb, np.float64) * rng.uniform(1 - amount, 1 + amount) * rng.uniform(0.96, 1.04, 3)
    return tuple(int(v) for v in np.clip(out, 0, 255))


def _shade(rgb, factor: float) -> tuple[int, int, int]:
    """A lighter (factor > 1) or darker version of a colour."""
    return tuple(int(min(255, max(0, v * factor))) for v in rgb)


def _paint(rng: np.random.Generator, rgb: np.ndarray, lab: np.ndarray, mask: np.ndarray, colours,
           cell: float, grain: float, grain_cell: float, cls: int) -> None:
    """Fill a region with a natural texture (two colours mixed by coarse noise, times fine grain)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return
    # Only texture the region's bounding box: most layers cover a fraction of the frame.
    box = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0]
    sub = mask[box]
    t = np.clip(0.5 + 0.25 * _fbm(rng, h, w, cell)[sub], 0.0, 1.0)
    dark, light = np.asarray(colours[0], np.float32), np.asarray(colours[1], np.float32)
    tex = (dark + (light - dark) * t[:, None]) * (1.0 + grain * _fbm(rng, h, w, grain_cell, octaves=2)[sub])[:, None]
    rgb[box][sub] = tex
    lab[box][sub] = cls


# --- geometry helpers -----------------------------------------------------------------------------

def _place(cx: float, cy: float, local, angle: float) -> list[tuple[float, float]]:
    """Rotate shape-local (x, y) points by angle and move them to (cx, cy)."""
    pts = np.asarray(local, np.float64)
    c, s = math.cos(angle), math.sin(angle)
    x = cx + pts[:, 0] * c - pts[:, 1] * s
    y = cy + pts[:, 0] * s + pts[:, 1] * c
    return list(zip(x.tolist(), y.tolist()))


def _rect(length: float, width: float, x0: float | None = None,
          x1: float | None = None) -> list[tuple[float, float]]:
    """Local corners of an axis-aligned rectangle (optionally only the slab x0..x1 along its length)."""
    x0 = -length / 2 if x0 is None else x0
    x1 = length / 2 if x1 is None else x1
    return [(x0, -width / 2), (x1, -width / 2), (x1, width / 2), (x0, width / 2)]


def _ellipse(rx: float, ry: float, n: int = 14) -> np.ndarray:
    """Local points of an ellipse outline (a polygon, so it can be rotated)."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.column_stack([rx * np.cos(t), ry * np.sin(t)])


def _normals(pts: np.ndarray) -> np.ndarray:
    """Unit normals of a densely sampled polyline."""
    d = np.gradient(pts, axis=0)
    d /= np.maximum(np.hypot(d[:, 0], d[:, 1]), 1e-9)[:, None]
    return np.column_stack([-d[:, 1], d[:, 0]])


def _ribbon(pts: np.ndarray, half: np.ndarray) -> list[tuple[float, float]]:
    """Outline polygon of a band of per-point half-width around a centre line (roads, rivers)."""
    n = _normals(pts) * half[:, None]
    return [tuple(p) for p in np.concatenate([pts + n, (pts - n)[::-1]]).tolist()]


def _dashes(pts: np.ndarray, dash: float):
    """Yield the 'on' pieces of a dashed line along a polyline."""
    arc = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(pts, axis=0).T))])
    on = ((arc // dash) % 2 == 0).astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], on, [0]])))
    for start, stop in zip(edges[::2], edges[1::2]):
        if stop - start >= 2:
            yield [tuple(p) for p in pts[start:stop].tolist()]


def _crossing_curve(rng: np.random.Generator, view: _View) -> np.ndarray:
    """A densely sampled quadratic Bezier that enters and leaves the ground area through two sides."""
    w, h = view.width, view.height
    y0 = min(view.horizon_left, view.horizon_right) if view.oblique else 0.0
    m = 0.05 * view.unit  # start just outside the frame so ends are cut cleanly

    def side_point(side: int) -> tuple[float, float]:
        """A point just beyond one side of the ground rectangle (left, right, top, bottom)."""
        if side == 0:
            return -m, rng.uniform(y0, h)
        if side == 1:
            return w + m, rng.uniform(y0, h)
        if side == 2:
            return rng.uniform(0, w), y0 - m
        return rng.uniform(0, w), h + m

    a, b = rng.choice(4, size=2, replace=False)
    p0, p2 = np.array(side_point(a)), np.array(side_point(b))
    p1 = np.array([rng.uniform(0.2, 0.8) * w, y0 + rng.uniform(0.2, 0.8) * (h - y0)])
    n = int(np.clip((np.hypot(*(p1 - p0)) + np.hypot(*(p2 - p1))) / 3, 16, 800))
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


def _visible(view: _View, pts: np.ndarray, pad: float = 0.0) -> np.ndarray:
    """Indices of polyline points inside the frame and below the horizon (with a margin)."""
    x, y = pts[:, 0], pts[:, 1]
    ok = (x >= pad) & (x < view.width - pad) & (y >= view.top + pad) & (y < view.height - pad)
    return np.flatnonzero(ok[1:-1]) + 1  # interior points, so a tangent exists


def _clear(view: _View, blocked: np.ndarray, points) -> bool:
    """True if none of the points that fall inside the frame is above the ground or on a blocked pixel."""
    return not any(0 <= x < view.width and 0 <= y < view.height and (y < view.top or blocked[int(y), int(x)])
                   for x, y in points)


def _polygon_mask(view: _View, polygons) -> np.ndarray:
    """Boolean mask of the union of some polygons."""
    mask = Image.new("L", (view.width, view.height), 0)
    draw = ImageDraw.Draw(mask)
    for xy in polygons:
        draw.polygon(xy, fill=255)
    return np.asarray(mask) > 0


# --- ground layers --------------------------------------------------------------------------------

def _water_mask(rng: np.random.Generator, view: _View) -> np.ndarray:
    """A river crossing the frame, or a lake with a ragged shore; every scene has one (for boats)."""
    h, w, u = view.height, view.width, view.unit
    if rng.random() < 0.4:
        pts = _crossing_curve(rng, view)
        half = np.maximum(rng.uniform(0.05, 0.1) * u * view.scale(pts[:, 1]), 3.0)
        return _polygon_mask(view, [_ribbon(pts, half)])
    cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(view.top + 0.2 * (h - view.top), h * 0.95)
    rx = max(6.0, rng.uniform(0.14, 0.3) * u * view.scale(cy))
    ry = rx * rng.uniform(0.5, 1.0) * (0.6 if view.oblique else 1.0)
    yy, xx = np.ogrid[:h, :w]
    # Noise added to the elliptic distance makes a natural shoreline.
    dist = ((xx - cx) / rx) ** 2 + ((yy - cy) / max(ry, 4.0)) ** 2 + 0.3 * _fbm(rng, h, w, u * 0.08, 2)
    return dist < 1.0


def _road_masks(view: _View, roads) -> tuple[np.ndarray, np.ndarray]:
    """Asphalt and lane-marking masks: a dashed centre line and solid edge lines on wide roads."""
    size = (view.width, view.height)
    asphalt, marks = Image.new("L", size, 0), Image.new("L", size, 0)
    draw_asphalt, draw_marks = ImageDraw.Draw(asphalt), ImageDraw.Draw(marks)
    for pts, half in roads:
        draw_asphalt.polygon(_ribbon(pts, half), fill=255)
    for pts, half in roads:
        typical = float(np.median(half))
        if typical < 6:  # markings would swamp a narrow road
            continue
        width = max(1, round(typical * 0.07))
        for piece in _dashes(pts, dash=3 * typical):
            draw_marks.line(piece, fill=255, width=width)
        for side in (-1, 1):
            edge = pts + _normals(pts) * (half * 0.82 * side)[:, None]
            draw_marks.line([tuple(p) for p in edge.tolist()], fill=255, width=width)
    road = np.asarray(asphalt) > 0
    return road, road & (np.asarray(marks) > 0)


def _ground(rng: np.random.Generator, view: _View):
    """Ground cover as float RGB + labels: vegetation, bare-earth blobs, water, roads with markings."""
    h, w, u = view.height, view.width, view.unit
    rgb = np.zeros((h, w, 3), np.float32)
    lab = np.zeros((h, w), np.uint8)
    grass = _GRASS[rng.integers(len(_GRASS))]
    _paint(rng, rgb, lab, np.ones((h, w), bool), [_vary(rng, c) for c in grass], u * 0.3, 0.12,
           max(1.5, u / 300), VEGETATION)

    # Bare earth as organic blobs: threshold coarse noise at a random coverage.
    field = _fbm(rng, h, w, u * 0.4)
    bare = field > np.quantile(field[::4, ::4], 1 - rng.uniform(0.1, 0.4))
    earth = _EARTH[rng.integers(len(_EARTH))]
    _paint(rng, rgb, lab, bare, [_vary(rng, c) for c in earth], u * 0.12, 0.1, max(1.5, u / 250), BACKGROUND)

    # Water is labelled background in AeroScapes.
    water = _water_mask(rng, view)
    _paint(rng, rgb, lab, water, [_vary(rng, c, 0.1) for c in _WATER], u * 0.3, 0.03, max(2.0, u / 100),
           BACKGROUND)

    roads = []
    for _ in range(rng.integers(1, 4)):
        pts = _crossing_curve(rng, view)
        roads.append((pts, np.maximum(rng.uniform(0.035, 0.06) * u * view.scale(pts[:, 1]), 2.0)))
    road, marks = _road_masks(view, roads)
    _paint(rng, rgb, lab, road, [_vary(rng, c) for c in _ASPHALT], u * 0.2, 0.1, max(1.5, u / 400), ROAD)
    # Worn paint: mostly white, a little asphalt showing through; still labelled road.
    rgb[marks] = rgb[marks] * 0.3 + np.float32(0.7) * np.array([228, 228, 218], np.float32)
    return rgb, lab, water & ~road, road, roads


# --- objects --------------------------------------------------------------------------------------

def _plan_buildings(rng, view: _View, canvas: _Canvas, spots: _Spots, blocked: np.ndarray, count: int):
    """Houses with gable or flat roofs, away from roads and water and from each other; returns outlines."""
    u, placed, outlines = view.unit, [], []
    grid = rng.uniform(0, np.pi)  # settlements share a street-grid orientation
    for _ in range(count):
        for _attempt in range(12):
            x, y = spots.pick(rng)
            s = view.scale(y)
            length = max(8.0, rng.uniform(0.08, 0.22) * u * s)
            depth = max(6.0, length * rng.uniform(0.45, 0.9))
            radius = math.hypot(length, depth) / 2
            angle = grid + rng.integers(2) * np.pi / 2 + rng.normal(0, 0.05)
            probe = _place(x, y, _GRID * [length, depth], angle)
            if any(math.hypot(x - px, y - py) < radius + pr for px, py, pr in placed):
                continue
            if not _clear(view, blocked, probe):
                continue
            placed.append((x, y, radius))
            outline = _place(x, y, _rect(length, depth), angle)
            outlines.append(outline)
            _building(rng, canvas, x, y, length, depth, angle)
            break
    return outlines


def _building(rng, canvas: _Canvas, x, y, length, depth, angle) -> None:
    """One building: the footprint casts the shadow; roof details are drawn on top."""
    roof = _vary(rng, _ROOFS[rng.integers(len(_ROOFS))], 0.1)
    canvas.polygon(_place(x, y, _rect(length, depth), angle), roof, CONSTRUCTION,
                   height=rng.uniform(0.25, 0.6) * depth)
    if rng.random() < 0.55:
        # Gable roof: the two slopes catch different light, with a ridge between them.
        canvas.polygon(_place(x, y, [(-length / 2, -depth / 2), (length / 2, -depth / 2), (length / 2, 0),
                                     (-length / 2, 0)], angle), _shade(roof, 1.12), CONSTRUCTION)
        canvas.polygon(_place(x, y, [(-length / 2, 0), (length / 2, 0), (length / 2, depth / 2),
                                     (-length / 2, depth / 2)], angle), _shade(roof, 0.78), CONSTRUCTION)
        canvas.line(_place(x, y, [(-length / 2, 0), (length / 2, 0)], angle), _shade(roof, 0.6), CONSTRUCTION,
                    max(1, round(depth * 0.03)))
    else:
        # Flat roof: a parapet rim and a few rooftop units.
        canvas.polygon(_place(x, y, _rect(length * 0.88, depth - length * 0.12), angle), _shade(roof, 0.9),
                       CONSTRUCTION)
        for _ in range(rng.integers(0, 4)):
            side = max(1.5, depth * rng.uniform(0.08, 0.16))
            ux, uy = rng.uniform(-0.3, 0.3) * length, rng.uniform(-0.25, 0.25) * depth
            box = [(ux - side, uy - side), (ux + side, uy - side), (ux + side, uy + side), (ux - side, uy + side)]
            canvas.polygon(_place(x, y, box, angle), _shade(roof, 1.25), CONSTRUCTION, height=side * 0.6)


def _plan_trees(rng, view: _View, canvas: _Canvas, spots: _Spots, blocked: np.ndarray, clusters: int):
    """Clumps of round tree crowns off roads, water and roofs; returns (x, y, r) and queues their shadows."""
    u, trees = view.unit, []
    for _ in range(clusters):
        x, y = spots.pick(rng)
        spread = rng.uniform(0.02, 0.08) * u * view.scale(y)
        for _ in range(rng.integers(1, 10)):
            cx, cy = x + rng.normal(0, spread), y + rng.normal(0, spread)
            if not _clear(view, blocked, [(cx, cy)]):
                continue
            r = max(2.0, rng.uniform(0.012, 0.035) * u * view.scale(cy))
            trees.append((cx, cy, r))
            canvas.disc_shadow(cx, cy, r, height=r * 1.6)
    return trees


def _pick_on_road(rng, view: _View, roads, across: float) -> tuple[float, float, float, float] | None:
    """A point on a random road (offset across it by a fraction of its half-width): x, y, angle, half."""
    for _ in range(8):
        pts, half = roads[rng.integers(len(roads))]
        ok = _visible(view, pts, pad=2.0)
        if ok.size == 0:
            continue
        i = int(ok[rng.integers(ok.size)])
        normal = _normals(pts)[i]
        x, y = pts[i] + normal * half[i] * across
        d = pts[i + 1] - pts[i - 1]
        return float(x), float(y), math.atan2(d[1], d[0]), float(half[i])
    return None


def _fence_path(rng, view: _View, land: _Spots, blocked: np.ndarray):
    """A few straight fence runs with right-angle turns that stay off roads and houses: (points, width) or None."""
    u = view.unit
    for _attempt in range(6):
        x, y = land.pick(rng)
        s = view.scale(y)
        heading = rng.uniform(0, 2 * np.pi)
        pts = [(x, y)]
        for _ in range(rng.integers(1, 4)):
            step = rng.uniform(0.1, 0.3) * u * s
            pts.append((pts[-1][0] + step * math.cos(heading), pts[-1][1] + step * math.sin(heading)))
            heading += rng.choice([-1, 1]) * np.pi / 2
        probe = [(a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1]))
                 for a, b in zip(pts, pts[1:]) for t in np.linspace(0, 1, 9)]
        if _clear(view, blocked, probe):
            return pts, max(2, round(rng.uniform(0.003, 0.006) * u * s))
    return None


def _plan_obstacles(rng, view: _View, canvas: _Canvas, roads, land: _Spots, blocked: np.ndarray) -> None:
    """Street-light poles beside a road (long thin shadows) and fences around fields."""
    u = view.unit
    for _ in range(rng.integers(2, 7)):
        spot = _pick_on_road(rng, view, roads, across=rng.choice([-1.0, 1.0]) * 1.25)
        x, y = spot[:2] if spot else land.pick(rng)
        s = view.scale(y)
        r = max(1.6, rng.uniform(0.005, 0.009) * u * s)
        dx, dy = canvas.sun * rng.uniform(0.08, 0.15) * u * s
        canvas.shadow_line([(x, y), (x + dx, y + dy)], max(1, round(r)))
        canvas.disc(x, y, r, _vary(rng, (64, 66, 70)), OBSTACLE)
    for _ in range(rng.integers(0, 3)):
        fence = _fence_path(rng, view, land, blocked)
        if fence is None:
            continue
        pts, width = fence
        colour = _vary(rng, _FENCES[rng.integers(len(_FENCES))])
        canvas.line(pts, colour, OBSTACLE, width, height=width * 2.0)
        # Posts along the fence, slightly darker.
        for a, b in zip(pts, pts[1:]):
            n = max(1, int(math.hypot(b[0] - a[0], b[1] - a[1]) / max(6.0, width * 6)))
            for t in np.linspace(0, 1, n + 1):
                px, py = a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1])
                canvas.disc(px, py, width * 0.9, _shade(colour, 0.7), OBSTACLE)


def _car(rng, canvas: _Canvas, x, y, angle, length, width) -> None:
    """A car from above: body, darker windscreen and rear window."""
    colour = _vary(rng, _CARS[rng.integers(len(_CARS))], 0.06)
    glass = _vary(rng, (38, 44, 54))
    canvas.polygon(_place(x, y, _rect(length, width), angle), colour, CAR, height=width * 0.6)
    canvas.polygon(_place(x, y, _rect(length, width * 0.8, 0.08 * length, 0.3 * length), angle), glass, CAR)
    canvas.polygon(_place(x, y, _rect(length, width * 0.8, -0.38 * length, -0.26 * length), angle), glass, CAR)


def _plan_cars(rng, view: _View, canvas: _Canvas, roads, land: _Spots, count: int) -> None:
    """Cars driving in the right-hand lane of the roads, plus the odd one parked off-road."""
    u, placed = view.unit, []
    for k in range(count):
        for _attempt in range(6):
            lane = rng.choice([-1.0, 1.0])
            spot = _pick_on_road(rng, view, roads, across=lane * rng.uniform(0.35, 0.55))
            if spot is None or (k > 0 and rng.random() < 0.15):
                x, y = land.pick(rng)
                angle = rng.uniform(0, 2 * np.pi)
            else:
                x, y, angle, _ = spot
                angle += np.pi if lane < 0 else 0.0  # traffic direction follows the lane
            length = max(7.0, rng.uniform(0.045, 0.07) * u * view.scale(y))
            if any(math.hypot(x - px, y - py) < (length + pl) * 0.55 for px, py, pl in placed):
                continue
            placed.append((x, y, length))
            _car(rng, canvas, x, y, angle, length, max(4.0, length * rng.uniform(0.42, 0.5)))
            break


def _person(rng, canvas: _Canvas, x, y, size, angle) -> None:
    """A person from above: shoulders (clothes colour) and a head."""
    canvas.polygon(_place(x, y, _ellipse(size / 2, size * 0.3, 10), angle),
                   _vary(rng, _CLOTHES[rng.integers(len(_CLOTHES))]), PERSON, height=size * 1.6)
    canvas.disc(x, y, max(0.8, size * 0.22), _vary(rng, _HAIR[rng.integers(len(_HAIR))]), PERSON)


def _plan_people(rng, view: _View, canvas: _Canvas, spots: _Spots, groups: int) -> None:
    """People alone or in small groups, standing anywhere on open ground, grass or road."""
    u = view.unit
    for _ in range(groups):
        x, y = spots.pick(rng)
        size = max(3.0, rng.uniform(0.012, 0.02) * u * view.scale(y))
        for _ in range(1 if rng.random() < 0.5 else rng.integers(2, 6)):
            px, py = x + rng.normal(0, size * 1.5), y + rng.normal(0, size * 1.5)
            _person(rng, canvas, px, py, size, rng.uniform(0, np.pi))


def _plan_bikes(rng, view: _View, canvas: _Canvas, roads, spots: _Spots, count: int) -> None:
    """Bicycles and motorbikes at the road edge or on open ground, often with a rider."""
    u = view.unit
    for _ in range(count):
        spot = _pick_on_road(rng, view, roads, across=rng.choice([-1.0, 1.0]) * 0.75) if rng.random() < 0.6 else None
        x, y, angle = spot[:3] if spot else (*spots.pick(rng), rng.uniform(0, 2 * np.pi))
        length = max(6.0, rng.uniform(0.02, 0.032) * u * view.scale(y))
        frame = _vary(rng, _CARS[rng.integers(len(_CARS))])
        wheel = max(1.0, length * 0.2)
        for end in (-0.5, 0.5):  # tyres
            (wx, wy), = _place(x, y, [((length / 2 - wheel) * end * 2, 0)], angle)
            canvas.disc(wx, wy, wheel, (28, 28, 30), BIKE)
        canvas.line(_place(x, y, [(-length * 0.4, 0), (length * 0.4, 0)], angle), frame, BIKE,
                    max(2, round(length * 0.12)), height=length * 0.3)
        canvas.line(_place(x, y, [(length * 0.3, -length * 0.2), (length * 0.3, length * 0.2)], angle), frame,
                    BIKE, max(1, round(length * 0.08)))
        if rng.random() < 0.6:
            _person(rng, canvas, x, y, max(3.0, length * 0.45), angle + np.pi / 2)


def _plan_animals(rng, view: _View, canvas: _Canvas, spots: _Spots, blocked: np.ndarray, herds: int) -> None:
    """Grazing animals in loose herds on grass: an elliptic body and a head, all facing roughly one way."""
    u = view.unit
    for _ in range(herds):
        x, y = spots.pick(rng)
        colour = _ANIMALS[rng.integers(len(_ANIMALS))]
        heading = rng.uniform(0, 2 * np.pi)
        size = rng.uniform(0.02, 0.035) * u * view.scale(y)
        for k in range(rng.integers(1, 7)):
            length = max(5.0, size * rng.uniform(0.85, 1.15))
            ax, ay = (x, y) if k == 0 else (x + rng.normal(0, length * 2), y + rng.normal(0, length * 2))
            if not _clear(view, blocked, [(ax, ay)]):  # strays stay off roads, water and roofs
                continue
            angle = heading + rng.normal(0, 0.5)
            body = _vary(rng, colour, 0.1)
            canvas.polygon(_place(ax, ay, _ellipse(length / 2, max(1.5, length * 0.22)), angle), body, ANIMAL,
                           height=length * 0.4)
            (hx, hy), = _place(ax, ay, [(length * 0.55, 0)], angle)
            canvas.disc(hx, hy, max(1.0, length * 0.14), _shade(body, 0.85), ANIMAL)


def _plan_boats(rng, view: _View, canvas: _Canvas, spots: _Spots, dry: np.ndarray, count: int) -> None:
    """Boats on the water: a pointed hull, a cabin, and a V-shaped wake (labelled as water)."""
    u = view.unit
    for _ in range(count):
        for _attempt in range(12):  # look for open water, so hull and wake stay off the shore
            x, y = spots.pick(rng)
            length = max(7.0, rng.uniform(0.04, 0.08) * u * view.scale(y))
            width = max(3.0, length * rng.uniform(0.3, 0.4))
            angle = rng.uniform(0, 2 * np.pi)
            wakes = [_place(x, y, [(-length * 0.45, 0), (-length * 1.6, side * width * 1.2)], angle)
                     for side in (-1, 1)]
            hull = [(-length / 2, -width / 2), (length * 0.2, -width / 2), (length / 2, 0), (length * 0.2, width / 2),
                    (-length / 2, width / 2)]
            afloat = _clear(view, dry, _place(x, y, hull, angle) + wakes[0] + wakes[1])
            if afloat:
                break
        for wake in wakes if afloat else []:
            canvas.line(wake, (196, 212, 218), BACKGROUND, max(1, round(width * 0.15)))
        colour = _vary(rng, _BOATS[rng.integers(len(_BOATS))])
        canvas.polygon(_place(x, y, hull, angle), colour, BOAT, height=width * 0.3)
        canvas.polygon(_place(x, y, _rect(length, width * 0.55, -length * 0.3, 0.0), angle), _shade(colour, 0.75),
                       BOAT)


def _drone(rng, canvas: _Canvas, x, y, arm: float, height: float) -> None:
    """A quadcopter from above: an X of arms, four rotor discs and a body."""
    colour = _vary(rng, _DRONES[rng.integers(len(_DRONES))])
    angle = rng.uniform(0, np.pi / 2)
    width = max(2, round(arm * 0.2))
    for a in (angle, angle + np.pi / 2):
        canvas.line(_place(x, y, [(-arm, 0), (arm, 0)], a), colour, DRONE, width, height=height)
    rotor = max(1.2, arm * 0.3)
    for k in range(4):
        (rx, ry), = _place(x, y, [(arm, 0)], angle + k * np.pi / 2)
        canvas.disc(rx, ry, rotor, (150, 152, 156), DRONE, height=height)  # spinning props look grey
        canvas.disc(rx, ry, rotor * 0.35, colour, DRONE)
    canvas.disc(x, y, max(1.0, arm * 0.3), _shade(colour, 0.8), DRONE)


def _plan_drones(rng, view: _View, canvas: _Canvas, sky_canvas: _Canvas, spots: _Spots) -> None:
    """One drone (sometimes two): against the sky in oblique views, else low over the ground with a far shadow."""
    u = view.unit
    for _ in range(1 if rng.random() < 0.75 else 2):
        if view.oblique and rng.random() < 0.6:
            x = rng.uniform(0.05, 0.95) * view.width
            y = rng.uniform(0.2, 0.8) * min(view.horizon_left, view.horizon_right)
            _drone(rng, sky_canvas, x, y, max(3.0, rng.uniform(0.012, 0.025) * u), 0.0)
        else:
            x, y = spots.pick(rng)
            _drone(rng, canvas, x, y, max(3.0, rng.uniform(0.015, 0.03) * u * view.scale(y)), 0.12 * u)


# --- whole frames ---------------------------------------------------------------------------------

def _make_view(rng: np.random.Generator, width: int, height: int, oblique: bool | None) -> _View:
    """Straight-down or oblique camera; oblique views get a slightly tilted horizon."""
    if oblique is None:
        oblique = bool(rng.random() < 0.5)
    if not oblique:
        return _View(width, height, False)
    horizon = rng.uniform(0.18, 0.35) * height
    tilt = rng.uniform(-0.04, 0.04) * height
    return _View(width, height, True, horizon - tilt, horizon + tilt, max(2.0, 0.04 * height))


def _treeline(rng: np.random.Generator, view: _View) -> np.ndarray:
    """The distant forest just below an oblique view's horizon, with a ragged near edge."""
    h, w = view.height, view.width
    x = np.arange(w)
    horizon = view.horizon_left + (view.horizon_right - view.horizon_left) * x / w
    thickness = view.band * np.clip(0.7 + 0.3 * _fbm(rng, 1, w, view.unit * 0.03)[0], 0.2, 1.0)
    y = np.arange(h)[:, None]
    return (y >= horizon - 2) & (y < horizon + thickness)


def _sky(rng: np.random.Generator, view: _View, rgb: np.ndarray, lab: np.ndarray) -> None:
    """Haze towards the horizon, then a blue-to-pale sky with soft clouds above it."""
    h, w = view.height, view.width
    horizon_low = min(view.horizon_left, view.horizon_right)
    # Aerial perspective: distant ground fades towards a pale blue-grey.
    distance = np.clip((np.arange(h, dtype=np.float32) - horizon_low) / (h - horizon_low), 0, 1)
    fog = (rng.uniform(0.35, 0.6) * np.exp(-4.0 * distance))[:, None, None]
    rgb *= 1 - fog
    rgb += fog * np.array(_vary(rng, (188, 200, 212), 0.05), np.float32)

    rows = int(math.ceil(max(view.horizon_left, view.horizon_right))) + 1
    yy, xx = np.ogrid[:rows, :w]
    horizon = view.horizon_left + (view.horizon_right - view.horizon_left) * xx / w
    sky = yy < horizon
    colour = _mix(_vary(rng, (64, 124, 204), 0.1), _vary(rng, (196, 216, 236), 0.04),
                  (yy / np.maximum(horizon, 1.0)) ** 0.7)
    clouds = np.clip(0.35 * (_fbm(rng, rows, w, view.unit * 0.25) - rng.uniform(-0.5, 1.0)), 0, 0.85)
    colour += (np.float32(245) - colour) * clouds[..., None]
    rgb[:rows][sky] = colour[sky]
    lab[:rows][sky] = SKY


def _cast_shadows(rng, view: _View, rgb: np.ndarray, shadows) -> None:
    """Darken the ground under the queued shadow shapes, with slightly soft edges."""
    mask = Image.new("L", (view.width, view.height), 0)
    draw = ImageDraw.Draw(mask)
    for kind, xy, width in shadows:
        _draw(draw, kind, xy, 255, width)
    mask = np.asarray(mask.filter(ImageFilter.BoxBlur(max(0.5, view.unit / 500))), np.float32)
    rgb *= (1 - rng.uniform(0.3, 0.5) / 255 * mask)[..., None]


def _plant_trees(rng, view: _View, rgb: np.ndarray, lab: np.ndarray, trees) -> None:
    """Paint the tree crowns (and an oblique view's distant forest) with a clumpy canopy texture."""
    crowns = Image.new("L", (view.width, view.height), 0)
    draw = ImageDraw.Draw(crowns)
    for cx, cy, r in trees:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    canopy = np.asarray(crowns) > 0
    if view.oblique:
        canopy = canopy | _treeline(rng, view)
    u = view.unit
    _paint(rng, rgb, lab, canopy, [_vary(rng, c) for c in _CANOPY], max(2.0, u / 60), 0.15, max(1.5, u / 250),
           VEGETATION)


def _draw_shapes(rgb: np.ndarray, lab: np.ndarray, shapes) -> tuple[Image.Image, Image.Image]:
    """Draw queued shapes onto the image and (unless image-only) the same pixels onto the label map."""
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    labels = Image.fromarray(lab)
    draw_image, draw_labels = ImageDraw.Draw(image), ImageDraw.Draw(labels)
    for kind, xy, fill, cls, width in shapes:
        _draw(draw_image, kind, xy, fill, width)
        if cls is not None:
            _draw(draw_labels, kind, xy, cls, width)
    return image, labels


def render_scene(rng: np.random.Generator, width: int, height: int,
                 oblique: bool | None = None) -> tuple[Image.Image, np.ndarray]:
    """Paint one random drone-view scene and its pixel-exact label map.

    Args:
        rng: The only source of randomness; the same generator state gives the same scene.
        width: Image width in pixels (at least 32).
        height: Image height in pixels (at least 32).
        oblique: Force an oblique view with sky (True) or a straight-down one (False);
            None flips a coin.

    Returns:
        The RGB image and a uint8 label array [height, width] of class indices 0..11.
    """
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ValueError(f"image size must be at least {MIN_SIDE}x{MIN_SIDE} pixels, got {width}x{height}")
    view = _make_view(rng, width, height, oblique)
    u = view.unit
    area = width * height / u ** 2  # object counts grow with the frame's aspect ratio
    urban = rng.random()           # 0 = fields and herds, 1 = houses and traffic
    sun_angle = rng.uniform(0, 2 * np.pi)
    canvas = _Canvas(np.array([math.cos(sun_angle), math.sin(sun_angle)]))
    rgb, lab, water, road, roads = _ground(rng, view)

    # Where things may go: `blocked` (road, water, sky) is off-limits to houses, `occupied` adds the houses.
    below = np.arange(height)[:, None] >= view.top
    blocked = road | water | ~below
    open_land = _Spots(~blocked)
    outlines = _plan_buildings(rng, view, canvas, open_land, blocked, round(area * (1 + 7 * urban)))
    occupied = blocked | _polygon_mask(view, outlines)
    land = _first(_Spots(~occupied), open_land, _Spots(below))  # every scene has land below the horizon
    walkable = _first(_Spots(below & ~(occupied & ~road)), land)  # roads are fine for people and drones
    grass = _first(_Spots((lab == VEGETATION) & ~occupied), land)
    trees = _plan_trees(rng, view, canvas, land, occupied, round(area * (2 + 10 * (1 - urban))))
    _plan_obstacles(rng, view, canvas, roads, land, occupied)
    _plan_cars(rng, view, canvas, roads, land, round(area * (1 + 8 * urban)))
    _plan_bikes(rng, view, canvas, roads, walkable, round(1 + area * 2 * rng.random()))
    _plan_people(rng, view, canvas, walkable, round(1 + area * 4 * rng.random()))
    _plan_animals(rng, view, canvas, grass, occupied, round(1 + area * 2 * (1 - urban) * rng.random()))
    _plan_boats(rng, view, canvas, _first(_Spots(water & below), _Spots(water), land), ~water,
                round(1 + area * rng.random()))
    sky_canvas = _Canvas(canvas.sun)  # drones seen against the sky are drawn after it
    _plan_drones(rng, view, canvas, sky_canvas, walkable)

    # Shadows darken the ground before tree crowns and objects are painted over it.
    _cast_shadows(rng, view, rgb, canvas.shadows)
    _plant_trees(rng, view, rgb, lab, trees)
    image, labels = _draw_shapes(rgb, lab, canvas.shapes)
    if view.oblique:  # haze and sky go over the ground objects, drones in the sky over them
        rgb, lab = np.asarray(image, np.float32).copy(), np.array(labels)
        _sky(rng, view, rgb, lab)
        image, labels = _draw_shapes(rgb, lab, sky_canvas.shapes)

    # Sensor noise on everything, including the flat-coloured objects.
    pixels = np.asarray(image, np.float32) + rng.normal(0, 2.5, (height, width, 1)).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), np.array(labels, np.uint8)


# --- dataset --------------------------------------------------------------------------------------

def _check(name: str, value, minimum: int) -> None:
    """Raise ValueError unless value is an integer >= minimum."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")


def _sequence_length(count: int) -> int:
    """Frames per pseudo video sequence: up to 5, fewer for small sets so both splits get whole sequences."""
    return min(5, max(1, count // 4))


def _split(ids: list[str], sequence_length: int, val_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic trn/val split by whole sequences (no frame of a sequence leaks across), both non-empty."""
    sequences = math.ceil(len(ids) / sequence_length)
    n_val = min(sequences - 1, max(1, round(val_fraction * sequences)))
    val_sequences = {(k + 1) * sequences // n_val - 1 for k in range(n_val)}  # evenly spread, incl. the last
    trn, val = [], []
    for i, image_id in enumerate(ids):
        (val if i // sequence_length in val_sequences else trn).append(image_id)
    return trn, val


def synthesize(root: str | Path, count: int = 24, width: int = 1280, height: int = 720, seed: int = 0,
               val_fraction: float = 0.25, progress: Callable[[int], None] | None = None,
               dataset_file: str | Path | None = None) -> list[str]:
    """Write a generated drone-imagery dataset in the AeroScapes layout (or in a dataset file's).

    Ids look like AeroScapes' `<sequence>_<frame>` (e.g. `000001_003`); frames are grouped into
    sequences of up to five, which alternate between straight-down and oblique views, and whole
    sequences go to one split. Image i is drawn from `np.random.default_rng([seed, i])`, so the same
    arguments always write byte-identical files. Existing files of the same names are overwritten.

    Args:
        root: Folder to write into (created if missing).
        count: Number of images, at least 2 (both splits get at least one).
        width: Image width in pixels, at least 32.
        height: Image height in pixels, at least 32.
        seed: Non-negative random seed.
        val_fraction: Approximate fraction of images in the val split, strictly between 0 and 1.
        progress: Called with 1 after each image is written (drives a progress bar).
        dataset_file: Write in this dataset file's layout, classes and mask encoding instead, and copy the file
            into `root` as `dataset.toml`. The scenes' 12 classes are folded onto its K classes by index (label
            modulo K); a split by `val_fraction` is the file's own, by hash.

    Returns:
        The image ids in generation order.

    Raises:
        ValueError: If an argument is out of range.
    """
    _check("count", count, 2)
    _check("width", width, MIN_SIDE)
    _check("height", height, MIN_SIDE)
    _check("seed", seed, 0)
    if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be strictly between 0 and 1, got {val_fraction!r}")

    dataset = Dataset(Path(root), AEROSCAPES)
    if dataset_file is not None:
        dataset = load_dataset_file(dataset_file, root=root)
        Path(root).mkdir(parents=True, exist_ok=True)
        if Path(dataset_file).resolve() != (Path(root) / DATASET_FILE).resolve():
            shutil.copyfile(dataset_file, Path(root) / DATASET_FILE)
        dataset = replace(dataset, file=Path(root) / DATASET_FILE)
    per_sequence = _sequence_length(count)
    trn, val = _split(list(range(count)), per_sequence, val_fraction)
    split_of = {**{i: "trn" for i in trn}, **{i: "val" for i in val}}
    ids = [dataset.new_id(i // per_sequence + 1, i % per_sequence + 1, split_of[i]) for i in range(count)]
    for i, image_id in enumerate(ids):
        rng = np.random.default_rng([int(seed), i])
        image, labels = render_scene(rng, int(width), int(height), oblique=(i // per_sequence) % 2 == 1)
        if len(dataset.classes) < len(AEROSCAPES):
            labels %= len(dataset.classes)
        dataset.write_sample(image_id, image, labels, jpeg_quality=JPEG_QUALITY)
        if progress is not None:
            progress(1)
    dataset.write_splits({"trn": [ids[i] for i in trn], "val": [ids[i] for i in val]})
    return ids
