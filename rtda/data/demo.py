"""The built-in domain pair: procedural street scenes in a "synthetic" and a "real-looking" style.

Both domains are drawn from one scene model (road with a vanishing point, sidewalks, terrain,
buildings with windows, walls, fences, trees, sky, poles carrying signs and lights, cars, trucks,
buses, people, riders on bicycles and motorcycles) so they share the label space and the layout
statistics. They differ the way GTA5 and Cityscapes differ:

* **source** (GTA5-like, 16:9): saturated game palette, flat clean textures, hard sunlight from the
  side, crisp edges, no sensor noise, a higher camera;
* **target** (Cityscapes-like, 2:1): a muted real-world palette under overcast light, a global
  colour cast and gamma of the camera, grainy asphalt and foliage textures, lens blur, sensor noise,
  vignetting, and the ego vehicle's bonnet at the bottom (label id 1, ignored as in Cityscapes).

The pair is written in the real on-disk formats (GTA5: ``images/NNNNN.png`` + indexed-PNG
``labels/NNNNN.png`` holding label ids; Cityscapes: ``leftImg8bit/{split}/CITY/*_leftImg8bit.png`` +
``gtFine/{split}/CITY/*_gtFine_labelIds.png``), so the demo runs through the same readers as real data.

Run by hand with ``python -m rtda.data.demo --root data/demo``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from rtda.data.labels import ID_PALETTE, NAME_TO_ID
from rtda.run.errors import run_cli
from rtda.run.files import build_once, read_lock, release_read_lock

GENERATOR_VERSION = 2
_ID = NAME_TO_ID
CITIES = {"train": ("aachen", "bochum", "bremen"), "val": ("frankfurt", "lindau")}


@dataclass(frozen=True)
class DomainStyle:
    """Everything that differs between the two domains (the "domain gap")."""

    palette: dict  # class name -> list of base RGB colours, one is chosen per instance
    colour_matrix: tuple  # 3x3 camera colour transform (row-major), applied to linear RGB
    gamma: float
    contrast: float
    brightness: float
    saturation: float
    texture: float  # amplitude of per-class grain
    noise: float  # sensor noise std (0..255 scale)
    blur: float  # gaussian blur sigma in pixels at the stored resolution
    vignette: float
    sun: float  # strength of directional light (flat shading gradient)
    horizon: tuple  # range of the horizon row as a fraction of the height (camera pitch / height)
    bonnet: bool  # draw the ego vehicle (label id 1) at the bottom


SOURCE_STYLE = DomainStyle(
    palette={
        "road": [(70, 70, 78), (85, 82, 90)],
        "sidewalk": [(190, 150, 160), (175, 165, 185)],
        "building": [(200, 90, 60), (220, 190, 120), (90, 110, 200), (160, 80, 160), (230, 230, 230)],
        "wall": [(230, 200, 150), (180, 160, 130)],
        "fence": [(120, 80, 40), (200, 200, 210)],
        "pole": [(40, 40, 40), (190, 190, 200)],
        "traffic light": [(20, 20, 20)],
        "traffic sign": [(230, 40, 30), (30, 80, 220), (240, 220, 20)],
        "vegetation": [(40, 170, 40), (70, 200, 30)],
        "terrain": [(150, 210, 60), (180, 160, 90)],
        "sky": [(60, 150, 255), (110, 180, 255)],
        "person": [(230, 60, 60), (40, 200, 230), (250, 200, 0), (140, 60, 220)],
        "rider": [(255, 120, 0), (0, 180, 120)],
        "car": [(220, 20, 20), (20, 60, 220), (250, 220, 0), (240, 240, 240), (20, 180, 60)],
        "truck": [(240, 120, 0), (200, 200, 200)],
        "bus": [(250, 200, 0), (200, 30, 30)],
        "bicycle": [(0, 200, 200)],
        "motorcycle": [(200, 0, 200)],
        "parking": [(110, 100, 110)],
        "ego vehicle": [(0, 0, 0)],
    },
    colour_matrix=(1.05, 0.0, -0.05, 0.0, 1.0, 0.0, -0.05, 0.0, 1.05),
    gamma=0.95,
    contrast=1.25,
    brightness=0.06,
    saturation=1.35,
    texture=6.0,
    noise=0.0,
    blur=0.0,
    vignette=0.0,
    sun=0.35,
    horizon=(0.33, 0.45),
    bonnet=False,
)

REAL_STYLE = DomainStyle(
    palette={
        "road": [(128, 124, 120), (110, 108, 106)],
        "sidewalk": [(150, 140, 135), (135, 130, 128)],
        "building": [(150, 140, 125), (115, 110, 105), (170, 160, 145), (95, 90, 88)],
        "wall": [(160, 150, 135), (130, 125, 118)],
        "fence": [(95, 90, 80), (140, 140, 135)],
        "pole": [(80, 80, 78), (120, 118, 115)],
        "traffic light": [(35, 35, 35)],
        "traffic sign": [(170, 60, 50), (50, 80, 150), (200, 190, 170)],
        "vegetation": [(70, 90, 45), (55, 75, 40)],
        "terrain": [(110, 120, 70), (120, 110, 80)],
        "sky": [(200, 210, 215), (180, 195, 205)],
        "person": [(50, 50, 55), (80, 70, 60), (120, 40, 40), (40, 50, 80)],
        "rider": [(60, 60, 60), (110, 100, 50)],
        "car": [(40, 40, 45), (170, 170, 175), (200, 200, 200), (70, 80, 100), (110, 40, 35)],
        "truck": [(180, 180, 170), (90, 90, 95)],
        "bus": [(200, 190, 160), (60, 90, 120)],
        "bicycle": [(40, 40, 40)],
        "motorcycle": [(50, 50, 60)],
        "parking": [(120, 110, 115)],
        "ego vehicle": [(25, 28, 32)],
    },
    colour_matrix=(0.85, 0.12, 0.03, 0.05, 0.92, 0.03, 0.02, 0.12, 0.86),
    gamma=1.2,
    contrast=0.8,
    brightness=-0.04,
    saturation=0.7,
    texture=14.0,
    noise=5.0,
    blur=0.8,
    vignette=0.35,
    sun=0.05,
    horizon=(0.40, 0.50),
    bonnet=True,
)


def blend_style(a: DomainStyle, b: DomainStyle, t: float) -> DomainStyle:
    """The style a fraction ``t`` of the way from ``a`` to ``b`` (palettes, camera and light alike);
    the camera geometry (horizon range, bonnet) is ``b``'s."""
    def mix(x, y):
        return tuple(float(u) * (1 - t) + float(v) * t for u, v in zip(x, y))

    palette = {}
    for name, colours in a.palette.items():
        other = b.palette[name]
        n = max(len(colours), len(other))
        palette[name] = [mix(colours[i % len(colours)], other[i % len(other)]) for i in range(n)]
    numeric = {f: getattr(a, f) * (1 - t) + getattr(b, f) * t
               for f in ("gamma", "contrast", "brightness", "saturation", "texture", "noise", "blur", "vignette", "sun")}
    return DomainStyle(palette=palette, colour_matrix=mix(a.colour_matrix, b.colour_matrix), horizon=b.horizon,
                       bonnet=b.bonnet, **numeric)


class _Canvas:
    """Label-id map plus a per-pixel base colour, painted back to front."""

    def __init__(self, height: int, width: int):
        self.h, self.w = height, width
        self.ids = np.full((height, width), _ID["sky"], dtype=np.uint8)
        self.rgb = np.zeros((height, width, 3), dtype=np.float32)
        self.yy, self.xx = np.mgrid[0:height, 0:width].astype(np.float32)

    def box(self, y0, y1, x0, x1):
        """Integer slice bounds clipped to the canvas (None when empty)."""
        y0, y1 = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)), self.h)
        x0, x1 = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)), self.w)
        if y1 <= y0 or x1 <= x0:
            return None
        return slice(y0, y1), slice(x0, x1)

    def paint(self, mask, name, colour, region=None):
        region = region or (slice(None), slice(None))
        ids, rgb = self.ids[region], self.rgb[region]
        ids[mask] = _ID[name]
        rgb[mask] = colour

    def rect(self, y0, y1, x0, x1, name, colour):
        region = self.box(y0, y1, x0, x1)
        if region is not None:
            self.ids[region] = _ID[name]
            self.rgb[region] = colour

    def ellipse(self, cy, cx, ry, rx, name, colour):
        region = self.box(cy - ry, cy + ry + 1, cx - rx, cx + rx + 1)
        if region is None:
            return
        yy, xx = self.yy[region], self.xx[region]
        mask = ((yy - cy) / max(ry, 0.5)) ** 2 + ((xx - cx) / max(rx, 0.5)) ** 2 <= 1.0
        self.paint(mask, name, colour, region)


def _pick(rng, style: DomainStyle, name: str) -> np.ndarray:
    options = style.palette[name]
    base = np.array(options[rng.integers(len(options))], dtype=np.float32)
    return np.clip(base * rng.uniform(0.85, 1.15) + rng.normal(0, 6, 3), 0, 255)


def _scene(rng, height: int, width: int, style: DomainStyle) -> tuple[np.ndarray, np.ndarray]:
    """Draw one scene; returns (label ids HxW uint8, base colour HxWx3 float32)."""
    c = _Canvas(height, width)
    yy, xx = c.yy, c.xx
    horizon = height * rng.uniform(*style.horizon)
    vx = width * rng.uniform(0.4, 0.6)
    depth = np.maximum(yy - horizon, 0.0)  # pixels below the horizon: proportional to 1/distance
    road_half = width * rng.uniform(0.28, 0.42)  # road half-width at the bottom row
    slope = road_half / (height - horizon)
    walk = rng.uniform(0.35, 0.6)  # sidewalk width relative to the road half-width
    ppm = 2 * road_half / 9.0 / (height - horizon)  # pixels per metre per pixel of depth (9 m road)

    c.rgb[:] = _pick(rng, style, "sky")
    c.rgb[:] += (yy[..., None] / height) * 30.0  # sky brighter near the horizon

    dx = np.abs(xx - vx)
    below = yy > horizon
    road = below & (dx <= depth * slope)
    side = below & ~road & (dx <= depth * slope * (1 + walk))
    c.paint(road, "road", _pick(rng, style, "road"))
    c.paint(side, "sidewalk", _pick(rng, style, "sidewalk"))
    edge = walk  # facades stand at this multiple of the road half-width
    if rng.random() < 0.6:  # grass strip between sidewalk and facades
        edge = walk + rng.uniform(0.2, 0.5)
        verge = below & ~road & ~side & (dx <= depth * slope * (1 + edge))
        c.paint(verge, "terrain", _pick(rng, style, "terrain"))
    if rng.random() < 0.3:  # a parking bay on one side (ignored class)
        sgn = rng.choice([-1, 1])
        bay = below & road & ((xx - vx) * sgn > depth * slope * 0.75)
        c.paint(bay, "parking", _pick(rng, style, "parking"))

    # Facades: segments along x; a segment's top falls towards the vanishing point.
    outer = ~(below & (dx <= depth * slope * (1 + edge)))
    x = 0.0
    while x < width:
        seg_w = width * rng.uniform(0.08, 0.2)
        centre = x + seg_w / 2
        gap = width * 0.04
        if abs(centre - vx) > gap:
            dist = abs(centre - vx) / width
            top = horizon - height * (0.15 + 1.6 * dist) * rng.uniform(0.6, 1.3)
            kind = rng.choice(["building", "vegetation", "wall"], p=[0.62, 0.28, 0.10])
            region = c.box(top, height, x, x + seg_w + 1)
            if region is not None:
                m = outer[region]
                if kind == "wall":
                    wall_top = horizon - 0.15 * (horizon - top)  # a low wall, not a facade
                    m = m & (yy[region] >= min(wall_top, horizon - 2))
                    c.paint(m, "wall", _pick(rng, style, "wall"), region)
                elif kind == "vegetation":
                    bumps = top + height * 0.05 * np.sin(xx[region] / max(seg_w / 5, 1) + rng.uniform(0, 6))
                    c.paint(m & (yy[region] >= bumps), "vegetation", _pick(rng, style, "vegetation"), region)
                else:
                    colour = _pick(rng, style, "building")
                    c.paint(m, "building", colour, region)
                    # windows: darker cells, same class (texture shared by both domains)
                    wy, wx = yy[region], xx[region]
                    cell = max(3.0, seg_w / rng.integers(3, 7))
                    win = m & ((wy - top) % cell < cell * 0.55) & ((wx - x) % cell < cell * 0.5) & (wy < horizon)
                    c.rgb[region][win] = colour * 0.45
        x += seg_w
    if rng.random() < 0.5:  # a ~1.2 m fence standing on the facade line of one side
        sgn = rng.choice([-1, 1])
        foot = horizon + dx / (slope * (1 + edge))
        fence = ((xx - vx) * sgn > width * 0.04) & (yy <= foot) & (yy >= foot - 1.2 * ppm * (foot - horizon))
        c.paint(fence, "fence", _pick(rng, style, "fence"))

    objects = []  # (foot row, painter) drawn far to near
    for _ in range(rng.integers(3, 7)):  # poles with signs / lights on the sidewalks
        foot = horizon + (height - horizon) * rng.uniform(0.15, 0.9)
        d = foot - horizon
        sgn = rng.choice([-1, 1])
        px = vx + sgn * d * slope * (1 + walk * rng.uniform(0.3, 0.9))
        objects.append((foot, "pole", px, d))
    for _ in range(rng.integers(3, 9)):  # pedestrians on the sidewalks
        foot = horizon + (height - horizon) * rng.uniform(0.1, 0.95)
        d = foot - horizon
        sgn = rng.choice([-1, 1])
        px = vx + sgn * d * slope * (1 + walk * rng.uniform(0.15, 0.85))
        objects.append((foot, "person", px, d))
    for _ in range(rng.integers(1, 6)):  # vehicles on the road
        foot = horizon + (height - horizon) * rng.uniform(0.08, 0.85)
        d = foot - horizon
        px = vx + rng.uniform(-0.75, 0.75) * d * slope
        kind = rng.choice(["car", "truck", "bus"], p=[0.8, 0.1, 0.1])
        objects.append((foot, kind, px, d))
    for _ in range(rng.integers(0, 3)):  # riders near the kerb
        foot = horizon + (height - horizon) * rng.uniform(0.3, 0.95)
        d = foot - horizon
        px = vx + rng.choice([-1, 1]) * d * slope * rng.uniform(0.7, 0.95)
        objects.append((foot, "rider", px, d))

    for foot, kind, px, d in sorted(objects, key=lambda o: o[0]):
        s = d * ppm  # pixels per metre at this depth
        if kind == "pole":
            pw, ph = max(2.0, 0.4 * s), 5.5 * s  # thicker than real poles: learnable at the demo's size
            c.rect(foot - ph, foot, px - pw / 2, px + pw / 2, "pole", _pick(rng, style, "pole"))
            if rng.random() < 0.55:
                r = max(2.5, 0.6 * s)
                c.ellipse(foot - ph + r, px, r, r, "traffic sign", _pick(rng, style, "traffic sign"))
            else:
                lw, lh = max(3.0, 0.6 * s), max(6.0, 1.5 * s)
                c.rect(foot - ph, foot - ph + lh, px - lw / 2, px + lw / 2, "traffic light", _pick(rng, style, "traffic light"))
                lamp = rng.integers(3)  # one lit lamp: red, amber or green (same class)
                lit = c.box(foot - ph + lh * lamp / 3, foot - ph + lh * (lamp + 1) / 3, px - lw / 4, px + lw / 4)
                if lit is not None:
                    c.rgb[lit] = [(255, 40, 30), (255, 190, 0), (40, 255, 90)][lamp]
        elif kind == "person":
            bw, bh = max(2.0, 0.65 * s), 1.8 * s
            colour = _pick(rng, style, "person")
            c.ellipse(foot - bh * 0.62, px, bh * 0.3, bw / 2, "person", colour)
            c.rect(foot - bh * 0.38, foot, px - bw * 0.35, px + bw * 0.35, "person", colour * 0.6)
            c.ellipse(foot - bh * 0.92, px, bh * 0.08, bw * 0.3, "person", np.array([200.0, 160, 130]))
        elif kind == "rider":
            bw, bh = max(2.0, 0.6 * s), 1.7 * s
            bike = "bicycle" if rng.random() < 0.6 else "motorcycle"
            wheel = 0.35 if bike == "bicycle" else 0.5  # seen from behind: a narrow upright wheel
            c.ellipse(foot - wheel * s, px, wheel * s, max(1.5, 0.2 * s), bike, _pick(rng, style, bike))
            c.rect(foot - 1.0 * s, foot - 0.7 * s, px - 0.35 * s, px + 0.35 * s, bike, _pick(rng, style, bike))
            c.ellipse(foot - bh * 0.8, px, bh * 0.28, bw / 2, "rider", _pick(rng, style, "rider"))
        else:
            w_m, h_m = {"car": (1.8, 1.5), "truck": (2.5, 3.4), "bus": (2.6, 3.2)}[kind]
            w, h = w_m * s, h_m * s
            colour = _pick(rng, style, kind)
            if kind == "car":
                c.rect(foot - h * 0.6, foot - 0.15 * s, px - w / 2, px + w / 2, "car", colour)
                c.rect(foot - h, foot - h * 0.6, px - w * 0.36, px + w * 0.36, "car", colour * 0.5 + 40)
            else:
                c.rect(foot - h, foot - 0.2 * s, px - w / 2, px + w / 2, kind, colour)
                c.rect(foot - h * 0.85, foot - h * 0.55, px - w * 0.42, px + w * 0.42, kind, colour * 0.4 + 60)
            for wx in (px - w * 0.35, px + w * 0.35):  # wheels
                c.rect(foot - 0.3 * s, foot, wx - 0.15 * s, wx + 0.15 * s, kind, np.array([15.0, 15, 15]))

    if style.bonnet:
        top = height * rng.uniform(0.9, 0.94)
        bonnet = yy >= top + ((xx - width / 2) / (width / 2)) ** 2 * height * 0.05
        c.paint(bonnet, "ego vehicle", _pick(rng, style, "ego vehicle"))
    return c.ids, c.rgb


def _gauss_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return img
    r = max(1, int(round(2.5 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(img, ((r, r), (0, 0), (0, 0)), mode="edge")
    img = sum(k[i] * pad[i : i + img.shape[0]] for i in range(2 * r + 1))
    pad = np.pad(img, ((0, 0), (r, r), (0, 0)), mode="edge")
    return sum(k[i] * pad[:, i : i + img.shape[1]] for i in range(2 * r + 1))


def _render(rng, ids: np.ndarray, base: np.ndarray, style: DomainStyle) -> np.ndarray:
    """Turn the flat base colours into a photo of the domain's look."""
    h, w = ids.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = base.copy()
    # grain: a per-class multiplicative texture (asphalt, foliage, plaster), not on the sky
    grain = rng.normal(0.0, 1.0, (h, w)).astype(np.float32)
    coarse = _gauss_blur(rng.normal(0.0, 1.0, (h // 4 + 1, w // 4 + 1, 1)).astype(np.float32), 1.0)
    coarse = np.repeat(np.repeat(coarse[..., 0], 4, 0), 4, 1)[:h, :w] * 3.0
    textured = (ids != _ID["sky"])[..., None]
    img += textured * (grain + coarse)[..., None] * style.texture
    # lighting: a directional sun (hard, game-like) or soft overcast
    sun_dir = rng.choice([-1.0, 1.0])
    img *= (1.0 + style.sun * sun_dir * (xx / w - 0.5))[..., None]
    img = np.clip(img / 255.0, 0, 1)
    # camera: colour matrix, saturation, contrast, gamma, brightness, vignetting, blur, noise
    img = img @ np.array(style.colour_matrix, dtype=np.float32).reshape(3, 3).T
    grey = img.mean(axis=2, keepdims=True)
    img = grey + (img - grey) * style.saturation
    img = (img - 0.5) * style.contrast + 0.5 + style.brightness
    img = np.clip(img, 0, 1) ** style.gamma
    if style.vignette:
        r2 = ((xx / w - 0.5) ** 2 + (yy / h - 0.5) ** 2) / 0.5
        img *= (1 - style.vignette * r2)[..., None]
    img = _gauss_blur(img * 255.0, style.blur)
    if style.noise:
        img = img + rng.normal(0.0, style.noise, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def render_sample(seed: int, height: int, width: int, style: DomainStyle) -> tuple[np.ndarray, np.ndarray]:
    """One (RGB image uint8 HxWx3, label ids uint8 HxW) pair, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    ids, base = _scene(rng, height, width, style)
    return _render(rng, ids, base, style), ids


@dataclass(frozen=True)
class DemoSpec:
    """Sizes of the built-in pair. Stored resolutions are scaled-down GTA5 (16:9) and Cityscapes (2:1)."""

    seed: int = 0
    source_count: int = 500
    source_size: tuple = (288, 512)  # H, W (GTA5 is 720 x 1280 after the usual resize)
    target_train_count: int = 500
    target_val_count: int = 100
    target_size: tuple = (256, 512)  # H, W (Cityscapes is 1024 x 2048)
    gap: float = 0.4  # 0: the target looks like the source (but for camera geometry), 1: the full "real" look


def _write_pair(job: tuple) -> None:
    """Render and write one sample; a top-level function so a process pool can run it."""
    kind, seed, size, gap, image_path, label_path = job
    style = SOURCE_STYLE if kind == "source" else blend_style(SOURCE_STYLE, REAL_STYLE, gap)
    image, ids = render_sample(seed, *size, style)
    Image.fromarray(image).save(image_path, compress_level=1)
    if kind == "source":  # GTA5 ships indexed PNGs in the Cityscapes palette
        label = Image.fromarray(ids, mode="P")
        label.putpalette(ID_PALETTE.flatten().tolist())
    else:  # Cityscapes ships greyscale *_gtFine_labelIds.png
        label = Image.fromarray(ids, mode="L")
    label.save(label_path, compress_level=1)


def _jobs(root: Path, spec: DemoSpec) -> list[tuple]:
    jobs = []
    src = root / "gta5"
    (src / "images").mkdir(parents=True, exist_ok=True)
    (src / "labels").mkdir(parents=True, exist_ok=True)
    for i in range(spec.source_count):
        name = f"{i + 1:05d}.png"
        jobs.append(("source", spec.seed * 1_000_003 + i, spec.source_size, spec.gap, src / "images" / name, src / "labels" / name))
    counts = {"train": spec.target_train_count, "val": spec.target_val_count}
    offset = {"train": 500_000_000, "val": 700_000_000}
    for split, count in counts.items():
        cities = CITIES[split]
        for i in range(count):
            city = cities[i % len(cities)]
            stem = f"{city}_{i // len(cities):06d}_{19:06d}"
            img_dir = root / "cityscapes" / "leftImg8bit" / split / city
            gt_dir = root / "cityscapes" / "gtFine" / split / city
            img_dir.mkdir(parents=True, exist_ok=True)
            gt_dir.mkdir(parents=True, exist_ok=True)
            seed = offset[split] + spec.seed * 1_000_003 + i
            jobs.append(("target", seed, spec.target_size, spec.gap, img_dir / f"{stem}_leftImg8bit.png", gt_dir / f"{stem}_gtFine_labelIds.png"))
    return jobs


def ensure_demo(root: str | Path, **spec_kwargs) -> Path:
    """Generate the demo pair under ``root/{gta5,cityscapes}`` unless an identical one is there.

    A ``demo.json`` stamp records the spec and generator version; a different spec regenerates. Built
    with :func:`rtda.run.files.build_once`: concurrent runs on a fresh data folder generate it once (the others
    wait and reuse it), and an interrupted generation never leaves half a dataset under ``root``. Inside a run
    (:func:`rtda.run.files.holding_read_locks`) the demo it uses is never replaced under it by a run of another spec.
    """
    root = Path(root)
    spec = DemoSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec_kwargs.items()})
    stamp = json.loads(json.dumps({"version": GENERATOR_VERSION, **asdict(spec)}))

    def is_complete(folder: Path) -> bool:
        try:
            return json.loads((folder / "demo.json").read_text()) == stamp
        except (OSError, json.JSONDecodeError):
            return False

    def build(tmp: Path) -> None:
        start = time.perf_counter()
        jobs = _jobs(tmp, spec)
        workers = min(len(jobs) // 50 + 1, os.cpu_count() or 1, 4)
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                list(pool.map(_write_pair, jobs, chunksize=16))
        else:
            for job in jobs:
                _write_pair(job)
        (tmp / "demo.json").write_text(json.dumps(stamp, indent=2))  # the stamp last: it marks the folder complete
        print(f"rtda: wrote the demo domain pair to {root} in {time.perf_counter() - start:.1f} s")

    # a run holds a read lock on the demo it trains on; a run asking for another spec (a sweep over the gap,
    # say) builds its copy meanwhile and swaps it in only when no run reads the old one any more
    while True:
        build_once(root, is_complete, build, readers=True)
        if not read_lock(root) or is_complete(root):
            return root
        release_read_lock(root)  # replaced by a run of another spec between the build and the lock: again


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data/demo", help="output folder (default: data/demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gap", type=float, default=DemoSpec.gap, help="domain gap strength in [0, 1]")
    parser.add_argument("--source-count", type=int, default=DemoSpec.source_count)
    parser.add_argument("--target-train-count", type=int, default=DemoSpec.target_train_count)
    parser.add_argument("--target-val-count", type=int, default=DemoSpec.target_val_count)
    args = parser.parse_args(argv)
    run_cli(lambda: ensure_demo(
        args.root,
        seed=args.seed,
        gap=args.gap,
        source_count=args.source_count,
        target_train_count=args.target_train_count,
        target_val_count=args.target_val_count,
    ))


if __name__ == "__main__":
    main()
