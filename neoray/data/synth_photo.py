"""The ``photo`` layout of the synthetic dataset: small vehicles and structures seen from above, in scenes
that behave like aerial photographs rather than like flat shapes on a gradient.

What an image holds (sizes are given at 640x360 and scale with the short side):

- ground: landcover from fractal value noise (sums of octaves of smooth random fields) blended between
  the site's ground colours, fine grain, crop rows in some regions;
- structures that are not objects: roads (curved polylines with lane marks), parking lots with painted
  stalls, buildings (rotated blocks with gable roofs and cast shadows), tree clusters, bushes, sheds and
  rocks of vehicle size (distractors);
- objects: ``car`` (10-34 px long), ``truck`` (cab and trailer, up to 64 px) and ``storage_tank``
  (round, shaded, up to 64 px), oriented along roads, in parking stalls or anywhere, each with shading
  and a shadow cast away from the image's sun. ``classes=K`` labels the first K kinds; the other kinds
  are still drawn, unlabelled, as the hard negatives a real one-class set has (trucks beside the cars);
- occlusion: objects may overlap one another, and tree canopy drawn after them covers some; every
  labelled object keeps at least ``MIN_VISIBLE`` (half) of its pixels visible (an occluder that would
  hide more is not drawn there). Its box is the whole object's (amodal, as aerial sets such as
  VisDrone annotate), tight on the object's pixels; shadows are never part of a box; no object is cut
  by the frame;
- counts: heavy-tailed, log-normal around 18 objects of every kind (10% of images under 6, 10% over 55, at
  most ``MAX_OBJECTS``; fewer where they do not fit), about three quarters of them cars; the caller marks
  some images empty (no object of any kind; the writer: one in 16);
- photometry per image: cloud shadows, an illumination gradient, haze, contrast and brightness, a colour
  cast, blur, sensor noise, and a JPEG quality between 35 and 95.

Validation images come "from a different site" (``SITES["val"]``): another ground palette (arid and
industrial instead of green farmland and suburbs), coarser texture, lighter concrete roads, metal
roofs, more trucks and tanks, longer shadows and more haze: a domain shift like the held-out real set's.

Why it resembles real data: the detector has to find small objects by their shape and shading in
texture that is locally as busy as they are; the negatives (bushes, sheds, rocks, unlabelled kinds)
have the objects' sizes and colours; objects are oriented, clustered along roads and in lots, touch and
hide each other, so one-to-one matching with few queries is strained as on real aerial frames; scale is
shared within an image (one flight height) and varies between images; the validation site shifts the
colours and textures the training set taught; JPEG artefacts, noise and blur hit the small objects
hardest.

Where it does not: the shapes are procedural (a few polygons per kind, no 3-D perspective, no
parallax, nadir view only), textures are noise rather than photographed material, lighting is one
direction plus a gradient, there is no motion blur or rolling shutter, and labels are exact (no
annotator noise, no missed objects, no ambiguous boxes). A detector can still exploit regularities no
real photograph has (e.g. the lane marks' period), so numbers here bound, not predict, those on real
data.

Only numpy and cv2 are imported.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# (id, name, supercategory): non-contiguous ids, as the shapes layout's.
KINDS = [(2, "car", "vehicle"), (5, "truck", "vehicle"), (9, "storage_tank", "structure")]
MIN_VISIBLE = 0.5  # the share of a labelled object's pixels that occluders must leave visible
MAX_OBJECTS = 100  # COCO's maxDets: more objects than a detector may return would cap recall
REFERENCE_SHORT_SIDE = 360  # sizes below are pixels at 640x360
MAX_OBJECT_SIDE = 64
MIN_OBJECT_SIDE = 8
PLACEMENT_TRIES = 12


@dataclass(frozen=True)
class Site:
    """Where the images were "taken": palettes (BGR) and the ranges of everything drawn."""

    ground: tuple  # three ground colours blended by the landcover field
    vegetation: tuple
    road: tuple
    roofs: tuple
    car_colours: tuple
    kind_weights: tuple  # car, truck, tank
    texture_cells: int  # landcover cells along the long side: fewer is coarser
    grain: float  # fine texture amplitude, in grey levels
    roads: tuple  # (min, max) per image
    buildings: tuple
    tree_clusters: tuple
    crop_rows: float  # chance of a crop-row region
    shadow: tuple  # shadow length as a share of an object's width
    haze: tuple
    haze_colour: tuple


SITES = {
    # green farmland and suburbs: dark asphalt, red and grey roofs, cars of every colour
    "train": Site(
        ground=((70, 120, 95), (60, 105, 130), (85, 140, 150)),
        vegetation=(40, 85, 50), road=(75, 78, 80),
        roofs=((50, 70, 150), (60, 80, 120), (110, 110, 115), (70, 75, 85)),
        car_colours=((235, 235, 235), (30, 30, 32), (150, 150, 155), (40, 40, 170), (150, 80, 30),
                     (200, 200, 205), (60, 110, 40), (20, 140, 210)),
        kind_weights=(0.78, 0.14, 0.08), texture_cells=3, grain=9.0, roads=(1, 3), buildings=(2, 9),
        tree_clusters=(4, 14), crop_rows=0.5, shadow=(0.2, 0.45), haze=(0.0, 0.15), haze_colour=(200, 200, 195),
    ),
    # arid and industrial: sand and concrete, light roads, metal roofs, more trucks and tanks, long shadows
    "val": Site(
        ground=((110, 140, 160), (125, 150, 160), (95, 120, 145)),
        vegetation=(60, 95, 85), road=(125, 130, 135),
        roofs=((185, 180, 170), (150, 120, 95), (200, 200, 200), (120, 130, 140)),
        car_colours=((240, 240, 240), (225, 225, 225), (45, 45, 48), (170, 170, 170), (50, 50, 150),
                     (120, 90, 60)),
        kind_weights=(0.70, 0.18, 0.12), texture_cells=2, grain=6.0, roads=(1, 2), buildings=(3, 10),
        tree_clusters=(1, 6), crop_rows=0.1, shadow=(0.35, 0.7), haze=(0.08, 0.3), haze_colour=(215, 220, 225),
    ),
}


@dataclass
class Scene:
    """One rendered image and what is in it. ``owner`` gives, per pixel, the index in ``objects`` of the
    object seen there (-1: none); ``objects`` are ``(category_id, (x1, y1, x2, y2), full_pixels,
    labelled)``, boxes in pixels with x2/y2 exclusive."""

    image: np.ndarray  # uint8 BGR
    objects: list
    owner: np.ndarray
    jpeg_quality: int

    def labelled(self) -> list[tuple[int, tuple[int, int, int, int]]]:
        return [(cat, box) for cat, box, _pixels, labelled in self.objects if labelled]


# ----------------------------------------------------------------------------------------------------
# Fields and drawing helpers
# ----------------------------------------------------------------------------------------------------


def _fractal(rng, w: int, h: int, cells: int, octaves: int, persistence: float = 0.5) -> np.ndarray:
    """Value noise in [0, 1]: octaves of smooth random grids, each twice as fine and ``persistence`` as strong."""
    out = np.zeros((h, w), np.float32)
    amplitude = 1.0
    for octave in range(octaves):
        gw = max(2, cells * 2 ** octave)
        gh = max(2, round(gw * h / w))
        grid = rng.random((gh + 1, gw + 1), dtype=np.float32)
        out += amplitude * cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
        amplitude *= persistence
    lo, hi = float(out.min()), float(out.max())
    return (out - lo) / max(hi - lo, 1e-6)


def _jitter(rng, colour, spread: float) -> np.ndarray:
    return np.clip(np.asarray(colour, np.float32) + rng.normal(0.0, spread, 3), 0, 255).astype(np.float32)


def _polygon_mask(points: np.ndarray):
    """A polygon rasterised: ``(x0, y0, mask)`` with the mask cropped to its own pixels (so the box of
    the drawn object is exactly ``x0, y0, x0 + mask width, y0 + mask height``)."""
    x0, y0 = np.floor(points.min(0)).astype(int) - 1
    x1, y1 = np.ceil(points.max(0)).astype(int) + 2
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(mask, [np.round((points - (x0, y0)) * 16).astype(np.int32)], 1, cv2.LINE_8, shift=4)
    return _crop(x0, y0, mask)


def _disc_mask(cx: float, cy: float, r: float):
    x0, y0 = int(np.floor(cx - r)) - 1, int(np.floor(cy - r)) - 1
    size = int(np.ceil(2 * r)) + 3
    mask = np.zeros((size, size), np.uint8)
    cv2.circle(mask, (round((cx - x0) * 16), round((cy - y0) * 16)), max(1, round(r * 16)), 1, -1, cv2.LINE_8,
               shift=4)
    return _crop(x0, y0, mask)


def _crop(x0: int, y0: int, mask: np.ndarray):
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return x0, y0, mask[:0, :0]
    return x0 + xs.min(), y0 + ys.min(), mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def _rotated_rect(cx: float, cy: float, length: float, width: float, angle: float, cut: float = 0.0) -> np.ndarray:
    """Corners of a rectangle (length along ``angle``), the corners cut by ``cut`` of the width (rounded cars)."""
    u = np.array([np.cos(angle), np.sin(angle)])
    v = np.array([-u[1], u[0]])
    hl, hw, c = length / 2, width / 2, cut * width
    local = [(hl - c, hw), (hl, hw - c), (hl, -hw + c), (hl - c, -hw), (-hl + c, -hw), (-hl, -hw + c),
             (-hl, hw - c), (-hl + c, hw)] if c > 0 else [(hl, hw), (hl, -hw), (-hl, -hw), (-hl, hw)]
    return np.array([(cx, cy) + a * u + b * v for a, b in local])


def _inside(h: int, w: int, x0: int, y0: int, mask: np.ndarray) -> bool:
    return mask.size > 0 and x0 >= 0 and y0 >= 0 and x0 + mask.shape[1] <= w and y0 + mask.shape[0] <= h


def _clipped(h: int, w: int, x0: int, y0: int, mask: np.ndarray):
    """The part of a mask placed at (x0, y0) that lies in the frame: (frame slices, mask part)."""
    ax0, ay0 = max(0, x0), max(0, y0)
    ax1, ay1 = min(w, x0 + mask.shape[1]), min(h, y0 + mask.shape[0])
    if ax1 <= ax0 or ay1 <= ay0:
        return None, None
    part = mask[ay0 - y0:ay1 - y0, ax0 - x0:ax1 - x0].astype(bool)
    return (slice(ay0, ay1), slice(ax0, ax1)), part


class Canvas:
    """The image being drawn (float BGR) with the ownership map that keeps occlusion honest."""

    def __init__(self, image: np.ndarray):
        self.image = image
        self.h, self.w = image.shape[:2]
        self.owner = np.full((self.h, self.w), -1, np.int32)
        self.full: list[int] = []  # pixels of each object
        self.visible: list[int] = []  # of which still seen
        self.blocked = np.zeros((self.h, self.w), bool)  # buildings: no object stands there

    def covers_too_much(self, x0: int, y0: int, mask: np.ndarray) -> bool:
        """Whether drawing over ``mask`` would leave some object less than MIN_VISIBLE of its pixels."""
        where, part = _clipped(self.h, self.w, x0, y0, mask)
        if where is None:
            return False
        under = self.owner[where][part]
        under = under[under >= 0]
        if under.size == 0:
            return False
        counts = np.bincount(under)
        for index in np.nonzero(counts)[0]:
            if self.visible[index] - counts[index] < MIN_VISIBLE * self.full[index]:
                return True
        return False

    def take(self, x0: int, y0: int, mask: np.ndarray, owner: int) -> None:
        """Record that ``owner`` (an object index, or -1 for clutter) is what is now seen over ``mask``."""
        where, part = _clipped(self.h, self.w, x0, y0, mask)
        if where is None:
            return
        region = self.owner[where]
        under = region[part]
        under = under[under >= 0]
        if under.size:
            for index, count in enumerate(np.bincount(under)):
                self.visible[index] -= int(count)
        region[part] = owner
        if owner >= 0:
            self.visible[owner] += int(part.sum())

    def paint(self, x0: int, y0: int, mask: np.ndarray, colour) -> None:
        """``colour``: one BGR colour, or an image of the mask's shape."""
        where, part = _clipped(self.h, self.w, x0, y0, mask)
        if where is None:
            return
        if np.ndim(colour) == 3:
            ay, ax = where[0].start - y0, where[1].start - x0
            colour = colour[ay:ay + part.shape[0], ax:ax + part.shape[1]][part]
        self.image[where][part] = colour

    def darken(self, x0: int, y0: int, mask: np.ndarray, factor: float) -> None:
        where, part = _clipped(self.h, self.w, x0, y0, mask)
        if where is not None:
            self.image[where][part] *= factor


# ----------------------------------------------------------------------------------------------------
# The scene: ground, structures, objects, occluders, photometry
# ----------------------------------------------------------------------------------------------------


def _ground(rng, w: int, h: int, site: Site, s: float) -> tuple[np.ndarray, np.ndarray]:
    """Landcover blended between the site's ground colours, fine grain, crop rows; also the fine grain
    field itself, which roofs and canopy reuse as texture."""
    cover = _fractal(rng, w, h, site.texture_cells, 4)
    second = _fractal(rng, w, h, site.texture_cells + 1, 3)
    g0, g1, g2 = (_jitter(rng, c, 12) for c in site.ground)
    t = np.clip((cover - 0.5) * 3 + 0.5, 0, 1)[..., None]
    img = g0 + t * (g1 - g0)
    u = np.clip((second - 0.6) * 4, 0, 1)[..., None]
    img = img + u * (g2 - img)
    grain = _fractal(rng, w, h, max(8, int(48 * s)), 3) - 0.5
    img += (grain * 2 * site.grain)[..., None]
    img += rng.standard_normal((h, w, 1), dtype=np.float32) * (site.grain / 3)
    if rng.random() < site.crop_rows:  # a field ploughed in rows, in one part of the frame
        angle = rng.uniform(0, np.pi)
        ys, xs = np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]
        rows = np.sin((xs * np.cos(angle) + ys * np.sin(angle)) * (2 * np.pi / (rng.uniform(4, 9) * s)))
        region = (_fractal(rng, w, h, 2, 2) > rng.uniform(0.45, 0.65)).astype(np.float32)
        region = cv2.GaussianBlur(region, (0, 0), 6 * s)
        img += (rows * region * rng.uniform(6, 14))[..., None]
    return img.astype(np.float32), grain


@dataclass
class Road:
    points: np.ndarray  # the centre line, dense
    width: float


def _roads(rng, canvas: Canvas, site: Site, s: float) -> list[Road]:
    w, h = canvas.w, canvas.h
    roads = []
    colour = _jitter(rng, site.road, 8)
    for _ in range(int(rng.integers(site.roads[0], site.roads[1] + 1))):
        # from one edge to another through a bent middle point
        if rng.random() < 0.5:
            ends = [(rng.uniform(-0.05, 0.05) * w, rng.uniform(0, h)), (w * rng.uniform(0.95, 1.05), rng.uniform(0, h))]
        else:
            ends = [(rng.uniform(0, w), -0.05 * h), (rng.uniform(0, w), h * 1.05)]
        mid = ((ends[0][0] + ends[1][0]) / 2 + rng.normal(0, 0.12 * w), (ends[0][1] + ends[1][1]) / 2
               + rng.normal(0, 0.12 * h))
        t = np.linspace(0, 1, 64)[:, None]
        a, m, b = (np.array(p) for p in (ends[0], mid, ends[1]))
        pts = (1 - t) ** 2 * a + 2 * (1 - t) * t * m + t ** 2 * b  # a quadratic Bezier curve
        width = rng.uniform(12, 26) * s
        shoulder = colour * rng.uniform(1.05, 1.25)
        cv2.polylines(canvas.image, [np.round(pts * 16).astype(np.int32)], False, shoulder.tolist(),
                      max(1, round(width * 1.15)), cv2.LINE_AA, shift=4)
        cv2.polylines(canvas.image, [np.round(pts * 16).astype(np.int32)], False, colour.tolist(), max(1, round(width)),
                      cv2.LINE_AA, shift=4)
        mark = np.array([215, 220, 225], np.float32) * rng.uniform(0.8, 1.0)
        for i in range(0, len(pts) - 1, 2):  # dashed centre line
            p, q = pts[i], pts[i] + (pts[i + 1] - pts[i]) * 0.6
            cv2.line(canvas.image, tuple(np.round(p * 16).astype(int)), tuple(np.round(q * 16).astype(int)),
                     mark.tolist(), 1, cv2.LINE_AA, shift=4)
        roads.append(Road(pts, width))
    return roads


@dataclass
class Lot:
    slots: list  # (cx, cy, angle) of each stall


def _parking_lot(rng, canvas: Canvas, site: Site, s: float, car_length: float) -> Lot:
    rows, cols = int(rng.integers(1, 4)), int(rng.integers(4, 14))
    stall_w, stall_l = car_length * rng.uniform(0.6, 0.75), car_length * rng.uniform(1.2, 1.45)
    aisle = car_length * 1.1
    lot_w, lot_h = cols * stall_w, rows * stall_l + (rows - 1) * aisle * 0.5
    angle = rng.uniform(0, np.pi)
    cx, cy = rng.uniform(lot_w / 2, canvas.w - lot_w / 2), rng.uniform(lot_h / 2, canvas.h - lot_h / 2)
    x0, y0, mask = _polygon_mask(_rotated_rect(cx, cy, lot_w * 1.08, lot_h * 1.15, angle))
    canvas.paint(x0, y0, mask, _jitter(rng, site.road, 10) * rng.uniform(0.95, 1.15))
    u, v = np.array([np.cos(angle), np.sin(angle)]), np.array([-np.sin(angle), np.cos(angle)])
    line = (np.array([225, 225, 225], np.float32) * rng.uniform(0.75, 0.95)).tolist()
    slots = []
    for r in range(rows):
        row_offset = -lot_h / 2 + stall_l / 2 + r * (stall_l + aisle * 0.5)
        for c in range(cols + 1):
            along = -lot_w / 2 + c * stall_w
            p = np.array([cx, cy]) + along * u + row_offset * v
            a, b = p - v * stall_l / 2, p + v * stall_l / 2
            cv2.line(canvas.image, tuple(np.round(a * 16).astype(int)), tuple(np.round(b * 16).astype(int)), line, 1,
                     cv2.LINE_AA, shift=4)
            if c < cols:
                centre = p + u * stall_w / 2
                slots.append((centre[0], centre[1], angle + np.pi / 2 + rng.choice([0, np.pi])))
    return Lot(slots)



def _building(rng, canvas: Canvas, site: Site, s: float, sun: np.ndarray, grain: np.ndarray) -> None:
    length, width = rng.uniform(26, 110) * s, rng.uniform(20, 60) * s
    angle = rng.uniform(0, np.pi)
    cx, cy = rng.uniform(0, canvas.w), rng.uniform(0, canvas.h)
    corners = _rotated_rect(cx, cy, length, width, angle)
    height = rng.uniform(0.25, 0.6) * width
    sx, sy = sun * height
    hull = cv2.convexHull(np.concatenate([corners, corners + (sx, sy)]).astype(np.float32))[:, 0]
    canvas.darken(*_polygon_mask(hull.astype(np.float64)), rng.uniform(0.45, 0.6))  # the block's shadow
    roof = _jitter(rng, site.roofs[int(rng.integers(0, len(site.roofs)))], 10)
    u = np.array([np.cos(angle), np.sin(angle)])
    v = np.array([-u[1], u[0]])
    lit = 1.0 + 0.18 * np.sign(float(v @ -sun) or 1.0)  # the half facing the sun is brighter
    for side, factor in ((1, lit), (-1, 2.0 - lit)):
        half = _rotated_rect(cx + side * v[0] * width / 4, cy + side * v[1] * width / 4, length, width / 2, angle)
        hx, hy, mask = _polygon_mask(half)
        texture = roof * factor + (grain[max(0, hy):hy + mask.shape[0], max(0, hx):hx + mask.shape[1]].mean()) * 20
        canvas.paint(hx, hy, mask, np.clip(texture, 0, 255))
        canvas.take(hx, hy, mask, -1)
        where, part = _clipped(canvas.h, canvas.w, hx, hy, mask)
        if where is not None:
            canvas.blocked[where] |= part


def _tree_mask(rng, cx: float, cy: float, radius: float):
    """A canopy: a union of discs around (cx, cy)."""
    blobs = int(rng.integers(3, 9))
    centres = np.array([cx, cy]) + rng.normal(0, radius * 0.6, (blobs, 2))
    radii = radius * rng.uniform(0.45, 0.9, blobs)
    x0 = int(np.floor((centres[:, 0] - radii).min())) - 1
    y0 = int(np.floor((centres[:, 1] - radii).min())) - 1
    x1 = int(np.ceil((centres[:, 0] + radii).max())) + 2
    y1 = int(np.ceil((centres[:, 1] + radii).max())) + 2
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    for (bx, by), r in zip(centres, radii):
        cv2.circle(mask, (round((bx - x0) * 16), round((by - y0) * 16)), max(1, round(r * 16)), 1, -1, cv2.LINE_8,
                   shift=4)
    return _crop(x0, y0, mask)


def _tree(rng, canvas: Canvas, site: Site, cx: float, cy: float, radius: float, sun: np.ndarray, grain: np.ndarray,
          mask=None) -> None:
    x0, y0, mask = mask if mask is not None else _tree_mask(rng, cx, cy, radius)
    sx, sy = np.round(sun * radius * rng.uniform(0.6, 1.0)).astype(int)
    canvas.darken(x0 + sx, y0 + sy, mask, rng.uniform(0.5, 0.65))
    base = _jitter(rng, site.vegetation, 10)
    ys, xs = np.mgrid[0:mask.shape[0], 0:mask.shape[1]].astype(np.float32)
    # lit on the side away from the shadow, with leafy texture from the grain field
    shade = 1.0 - 0.25 * ((xs - xs.mean()) * sun[0] + (ys - ys.mean()) * sun[1]) / max(radius, 1.0)
    leaves = rng.normal(0.0, 0.12, mask.shape).astype(np.float32)
    colour = base * np.clip(shade + leaves, 0.5, 1.4)[..., None]
    canvas.paint(x0, y0, mask, np.clip(colour, 0, 255))
    canvas.take(x0, y0, mask, -1)


def _trees(rng, canvas: Canvas, site: Site, s: float, sun: np.ndarray, grain: np.ndarray) -> None:
    for _ in range(int(rng.integers(site.tree_clusters[0], site.tree_clusters[1] + 1))):
        cx, cy = rng.uniform(0, canvas.w), rng.uniform(0, canvas.h)
        for _tree_index in range(int(rng.integers(1, 7))):
            radius = rng.uniform(5, 16) * s
            _tree(rng, canvas, site, cx + rng.normal(0, 18 * s), cy + rng.normal(0, 18 * s), radius, sun, grain)


def _distractor(rng, canvas: Canvas, site: Site, s: float, car_length: float, sun: np.ndarray, grain) -> None:
    """Clutter of an object's size and colours that is never labelled: a bush, a shed or a rock."""
    cx, cy = rng.uniform(0, canvas.w), rng.uniform(0, canvas.h)
    kind = rng.choice(["bush", "shed", "rock"], p=[0.45, 0.3, 0.25])
    size = car_length * rng.uniform(0.6, 1.6)
    if kind == "bush":
        _tree(rng, canvas, site, cx, cy, size / 2, sun, grain)
        return
    if kind == "shed":
        corners = _rotated_rect(cx, cy, size, size * rng.uniform(0.6, 1.0), rng.uniform(0, np.pi))
        colour = _jitter(rng, site.roofs[int(rng.integers(0, len(site.roofs)))], 25)
    else:
        angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(5, 9))))
        radii = size / 2 * rng.uniform(0.6, 1.0, angles.size)
        corners = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)
        colour = np.full(3, rng.uniform(110, 210), np.float32) + rng.normal(0, 8, 3).astype(np.float32)
    x0, y0, mask = _polygon_mask(corners)
    sx, sy = np.round(sun * size * 0.3).astype(int)
    canvas.darken(x0 + sx, y0 + sy, mask, 0.6)
    canvas.paint(x0, y0, mask, np.clip(colour, 0, 255))
    canvas.take(x0, y0, mask, -1)


# ---- objects ----



def _shape_of(rng, kind: int, cx: float, cy: float, angle: float, car_length: float, s: float, site: Site,
              sun: np.ndarray):
    """The object's mask (cropped) and its colour image: windows, cab and trailer, or a shaded tank."""
    name = KINDS[kind][1]
    if name == "storage_tank":
        radius = min(MAX_OBJECT_SIDE * s, max(MIN_OBJECT_SIDE, car_length * rng.uniform(0.9, 2.2))) / 2
        x0, y0, mask = _disc_mask(cx, cy, radius)
        ys, xs = np.mgrid[0:mask.shape[0], 0:mask.shape[1]].astype(np.float32)
        dx, dy = (xs - (cx - x0)) / radius, (ys - (cy - y0)) / radius
        lit = 1.0 - 0.3 * (dx * sun[0] + dy * sun[1])  # the dome's side toward the sun is brighter
        rim = np.where(np.hypot(dx, dy) > 0.82, 0.75, 1.0)
        base = _jitter(rng, site.roofs[int(rng.integers(0, len(site.roofs)))], 10) * 1.15
        colour = base * (lit * rim)[..., None]
        height = radius * rng.uniform(0.6, 1.2)
        return x0, y0, mask, np.clip(colour, 0, 255), height
    if name == "car":
        length = min(MAX_OBJECT_SIDE * s, max(MIN_OBJECT_SIDE, car_length * rng.uniform(0.88, 1.12)))
        width = max(4.0, length * rng.uniform(0.42, 0.5))
    else:  # truck
        length = min(MAX_OBJECT_SIDE * s, max(MIN_OBJECT_SIDE, car_length * rng.uniform(1.8, 2.6)))
        width = max(4.0, car_length * rng.uniform(0.52, 0.62))
    corners = _rotated_rect(cx, cy, length, width, angle, cut=0.18 if name == "car" else 0.05)
    x0, y0, mask = _polygon_mask(corners)
    body = _jitter(rng, site.car_colours[int(rng.integers(0, len(site.car_colours)))], 8)
    colour = np.empty(mask.shape + (3,), np.float32)
    colour[:] = body
    u = np.array([np.cos(angle), np.sin(angle)])
    origin = np.array([x0, y0], np.float64)

    def band(start: float, end: float, inset: float, value) -> None:
        """Fill the part of the body between ``start`` and ``end`` (shares of the length from the rear),
        ``inset`` of the width in from each side, clipped to the body by the final mask."""
        c = np.array([cx, cy]) + u * length * ((start + end) / 2 - 0.5)
        part = _rotated_rect(c[0], c[1], length * (end - start), width * (1 - 2 * inset), angle) - origin
        cv2.fillPoly(colour, [np.round(part * 16).astype(np.int32)], np.asarray(value, np.float64).tolist(),
                     cv2.LINE_AA, shift=4)

    glass = np.array([35, 32, 30], np.float32) * rng.uniform(0.8, 1.3)
    if name == "car":
        band(0.62, 0.8, 0.12, glass)  # windscreen
        band(0.12, 0.24, 0.15, glass)  # rear window
        band(0.3, 0.6, 0.16, body * rng.uniform(0.85, 1.12))  # roof
    else:
        band(0.78, 1.0, 0.0, _jitter(rng, site.car_colours[int(rng.integers(0, len(site.car_colours)))], 8))  # cab
        band(0.86, 0.93, 0.1, glass)
        band(0.74, 0.78, 0.0, glass * 0.8)  # the gap between cab and trailer
        band(0.0, 0.74, 0.04, np.clip(body * rng.uniform(1.0, 1.25), 0, 255))  # trailer
    ys, xs = np.mgrid[0:mask.shape[0], 0:mask.shape[1]].astype(np.float32)
    lit = 1.0 - 0.15 * (((xs - (cx - x0)) * sun[0] + (ys - (cy - y0)) * sun[1]) / max(width, 1.0))
    colour *= lit[..., None]
    height = width * (0.55 if name == "car" else 0.9)
    return x0, y0, mask, np.clip(colour, 0, 255), height


def _object_count(rng) -> int:
    """Heavy-tailed: log-normal around 18 (10% under 6, 10% over 55), at least 1, at most MAX_OBJECTS."""
    return int(min(MAX_OBJECTS, max(1, round(rng.lognormal(np.log(18), 0.9)))))


def _position(rng, kind_name: str, roads: list[Road], lots: list[Lot], canvas: Canvas):
    """(cx, cy, angle): along a road in a lane, in a parking stall, or anywhere."""
    mode = rng.choice(["road", "lot", "free"], p=[0.45, 0.35, 0.2]) if kind_name != "storage_tank" else "free"
    if mode == "road" and roads:
        road = roads[int(rng.integers(0, len(roads)))]
        i = int(rng.integers(0, len(road.points) - 1))
        p, q = road.points[i], road.points[i + 1]
        t = rng.random()
        d = (q - p) / max(float(np.hypot(*(q - p))), 1e-6)
        normal = np.array([-d[1], d[0]])
        side = rng.choice([-1.0, 1.0])
        c = p + t * (q - p) + normal * side * road.width * rng.uniform(0.15, 0.32)
        angle = np.arctan2(d[1], d[0]) + (np.pi if side < 0 else 0.0) + rng.normal(0, 0.05)
        return c[0], c[1], angle
    if mode == "lot" and lots and kind_name == "car":
        lot = lots[int(rng.integers(0, len(lots)))]
        if lot.slots:
            cx, cy, angle = lot.slots.pop(int(rng.integers(0, len(lot.slots))))
            return cx, cy, angle + rng.normal(0, 0.06)
    return rng.uniform(0, canvas.w), rng.uniform(0, canvas.h), rng.uniform(0, 2 * np.pi)


def _place_objects(rng, canvas: Canvas, site: Site, s: float, car_length: float, sun: np.ndarray, classes: int,
                   roads: list[Road], lots: list[Lot]) -> list:
    objects = []
    weights = np.asarray(site.kind_weights) / sum(site.kind_weights)
    for _ in range(_object_count(rng)):
        kind = int(rng.choice(len(KINDS), p=weights))
        for _attempt in range(PLACEMENT_TRIES):
            cx, cy, angle = _position(rng, KINDS[kind][1], roads, lots, canvas)
            x0, y0, mask, colour, height = _shape_of(rng, kind, cx, cy, angle, car_length, s, site, sun)
            if not _inside(canvas.h, canvas.w, x0, y0, mask) or max(mask.shape) > max(MAX_OBJECT_SIDE * s, 12):
                continue  # cut by the frame, or a long truck across the diagonal: its box over 64 px
            where, part = _clipped(canvas.h, canvas.w, x0, y0, mask)
            if (canvas.blocked[where] & part).any() or canvas.covers_too_much(x0, y0, mask):
                continue
            sx, sy = np.round(sun * height * rng.uniform(*site.shadow) * 2).astype(int)
            canvas.darken(x0 + sx, y0 + sy, mask, rng.uniform(0.45, 0.62))
            canvas.paint(x0, y0, mask, colour)
            index = len(canvas.full)
            canvas.full.append(int(mask.sum()))
            canvas.visible.append(0)
            canvas.take(x0, y0, mask, index)
            box = (x0, y0, x0 + mask.shape[1], y0 + mask.shape[0])
            objects.append((KINDS[kind][0], box, int(mask.sum()), kind < classes))
            break
    return objects


def _canopy(rng, canvas: Canvas, site: Site, s: float, sun: np.ndarray, grain, objects: list) -> None:
    """Trees drawn over the objects (roadside trees, parks), each only where it leaves every object at
    least MIN_VISIBLE of its pixels: the partial occlusion a real aerial frame has."""
    if not objects:
        return
    for _ in range(int(rng.integers(0, max(1, len(objects) // 3) + 1))):
        _cat, (x1, y1, x2, y2), _pixels, _labelled = objects[int(rng.integers(0, len(objects)))]
        radius = rng.uniform(0.5, 1.0) * max(x2 - x1, y2 - y1) / 2 + 2 * s
        cx = x1 + (x2 - x1) / 2 + rng.choice([-1, 1]) * (x2 - x1) * rng.uniform(0.4, 0.9)
        cy = y1 + (y2 - y1) / 2 + rng.choice([-1, 1]) * (y2 - y1) * rng.uniform(0.4, 0.9)
        mask = _tree_mask(rng, cx, cy, radius)
        if not canvas.covers_too_much(*mask):
            _tree(rng, canvas, site, cx, cy, radius, sun, grain, mask=mask)


def _photometry(rng, img: np.ndarray, site: Site, s: float) -> np.ndarray:
    h, w = img.shape[:2]
    if rng.random() < 0.35:  # cloud shadows
        clouds = _fractal(rng, w, h, 2, 3)
        shade = np.clip((clouds - rng.uniform(0.55, 0.75)) * 6, 0, 1)
        img *= (1.0 - rng.uniform(0.2, 0.4) * shade)[..., None]
    ys, xs = np.arange(h, dtype=np.float32)[:, None] / h - 0.5, np.arange(w, dtype=np.float32)[None, :] / w - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    ramp = xs * np.cos(angle) + ys * np.sin(angle)
    img *= (1.0 + rng.uniform(-0.35, 0.35) * ramp)[..., None]  # illumination gradient
    haze = rng.uniform(*site.haze)
    img = img * (1 - haze) + np.asarray(site.haze_colour, np.float32) * haze
    mean = img.mean()
    contrast, brightness = rng.uniform(0.75, 1.25), rng.uniform(-20, 20)
    cast = rng.normal(1.0, 0.05, 3).astype(np.float32)  # colour cast
    img = (img * contrast + (mean * (1 - contrast) + brightness)) * cast  # contrast, brightness, cast
    sigma = rng.choice([0.0, rng.uniform(0.4, 1.4)], p=[0.4, 0.6]) * max(s, 0.5)
    if sigma > 0:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    img += rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(1.0, 6.0)  # sensor noise
    return np.clip(img, 0, 255).round().astype(np.uint8)


def render(rng: np.random.Generator, w: int, h: int, site: Site, classes: int, empty: bool = False) -> Scene:
    """One image of ``site``: the scene, its objects (the first ``classes`` kinds labelled) and its JPEG
    quality. ``empty``: no object of any kind (a frame of clutter only)."""
    s = min(w, h) / REFERENCE_SHORT_SIDE
    car_length = float(np.exp(rng.uniform(np.log(10), np.log(34)))) * s  # one flight height per image
    sun_angle = rng.uniform(0, 2 * np.pi)
    sun = np.array([np.cos(sun_angle), np.sin(sun_angle)])  # the direction shadows fall
    ground, grain = _ground(rng, w, h, site, s)
    canvas = Canvas(ground)
    roads = _roads(rng, canvas, site, s)
    lots = [_parking_lot(rng, canvas, site, s, car_length) for _ in range(int(rng.integers(0, 3)))]
    for _ in range(int(rng.integers(site.buildings[0], site.buildings[1] + 1))):
        _building(rng, canvas, site, s, sun, grain)
    _trees(rng, canvas, site, s, sun, grain)
    for _ in range(int(rng.integers(4, 30))):
        _distractor(rng, canvas, site, s, car_length, sun, grain)
    objects = [] if empty else _place_objects(rng, canvas, site, s, car_length, sun, classes, roads, lots)
    _canopy(rng, canvas, site, s, sun, grain, objects)
    image = _photometry(rng, canvas.image, site, s)
    return Scene(image, objects, canvas.owner, int(rng.integers(35, 96)))


__all__ = ["KINDS", "MIN_VISIBLE", "SITES", "Scene", "Site", "render"]
