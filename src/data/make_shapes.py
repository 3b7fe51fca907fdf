"""Synthetic detection data: coloured shapes on varied backgrounds, written in the JSONL contract (SPEC §2).

    python -m src.data.make_shapes --out data/shapes --num-train 2000 --num-val 200 --seed 0 \\
        [--image-size 128] [--min-shapes 1] [--max-shapes 6] [--kinds rectangle,triangle,pentagon,ellipse]

writes ``DIR/train.jsonl``, ``DIR/val.jsonl`` and ``DIR/images/{train,val}/NNNNN.png``. One line:

    {"id": "train_00000", "images": ["images/train/00000.png"], "width": 128, "height": 128,
     "coords": "pixel", "objects": [{"desc": "red rectangle", "bbox_2d": [12, 30, 60, 71]},
                                    {"desc": "blue triangle", "poly": [40, 5, 90, 20, 55, 48]}],
     "metadata": {"source": "make_shapes", "seed": 0, "background": "gradient"}}

* Coordinates are integer PIXEL coordinates in 0..size-1 (pixel centres, the SPEC §3 frame). A
  rectangle is drawn with ``ImageDraw.rectangle(bbox)``, so it covers pixels x1..x2, y1..y2 inclusive;
  triangles, pentagons and ellipses (a 12-16-vertex polygon) are drawn with ``ImageDraw.polygon`` from
  the very vertex list that is written, in drawing order. Annotation == drawing, by construction.
* Each side of a shape's bounding box is 15-60% of the image side (at most 0.9/sqrt(n) of it in an
  image of n shapes, so crowded images still fit).
* Objects are listed in drawing order: a later object may cover part of an earlier one, but each
  earlier object keeps at least ``MIN_VISIBLE`` of its area visible and no two objects overlap with
  mask IoU above ``MAX_IOU``. Same-coloured objects never touch, so they cannot merge into one blob.
* Shapes are filled with one exact palette colour (``SHAPE_COLORS``); a colour is only used on an image
  when every background pixel is at least ``MIN_COLOR_DISTANCE`` away from it in RGB.
* Deterministic: image ``i`` of a split is drawn from its own stream ``SeedSequence([seed, split, i])``,
  so the same seed gives byte-identical files, train and val are independent, and changing
  ``--num-train`` does not change any val image.
* Files are written atomically (temp name, then rename); each JSONL is written after all of its
  images, so an existing ``train.jsonl`` / ``val.jsonl`` always describes a complete split.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from src.utils.files import atomic_path

RGB = tuple[int, int, int]

KINDS: tuple[str, ...] = ("rectangle", "triangle", "pentagon", "ellipse")
SPLITS: dict[str, int] = {"train": 0, "val": 1}  # split -> stream id in the per-image SeedSequence

SHAPE_COLORS: dict[str, RGB] = {
    "red": (215, 30, 40),
    "green": (30, 160, 60),
    "blue": (35, 75, 225),
    "yellow": (245, 220, 40),
    "purple": (145, 55, 190),
    "orange": (250, 130, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
# Muted base colours for backgrounds (each jittered per image by up to BACKGROUND_JITTER per channel).
BACKGROUND_COLORS: tuple[RGB, ...] = (
    (60, 60, 60), (110, 110, 110), (160, 160, 160), (205, 205, 205), (205, 190, 160),
    (70, 80, 100), (70, 120, 120), (180, 140, 140), (120, 120, 80), (170, 160, 125),
)
BACKGROUNDS: tuple[str, ...] = ("solid", "gradient", "noise")
BACKGROUND_JITTER = 15
MIN_COLOR_DISTANCE = 90.0  # RGB Euclidean distance between a shape colour and every background pixel
MIN_ALLOWED_COLORS = 3  # resample a background that leaves fewer usable shape colours

SIZE_FRAC = (0.15, 0.60)  # side of a shape's bounding box / image side (upper end 0.9/sqrt(n) for n shapes)
ASPECT = {"rectangle": None, "triangle": (0.6, 1.67), "pentagon": (0.8, 1.25), "ellipse": (0.5, 2.0)}  # h/w; None = free
ELLIPSE_VERTICES = (12, 16)  # inclusive range of polygon vertices for an ellipse
MIN_TRIANGLE_ARC = math.radians(70)  # each triangle vertex gap on the circle, so triangles are never slivers
MAX_IOU = 0.3  # reject a placement whose mask IoU with an already placed shape is above this
MIN_VISIBLE = 0.6  # ... or that leaves an earlier shape with less than this fraction visible
TOUCH_MARGIN = 2  # px; same-coloured shapes stay at least this far apart
PLACEMENT_TRIES = 50  # geometry draws per shape before the image is declared full
LAYOUT_TRIES = 20  # whole-image redraws when fewer than min_shapes could be placed


@dataclass(frozen=True)
class Shape:
    """One drawn object. ``values``: integer pixel coords in 0..size-1 — ``[x1, y1, x2, y2]`` (inclusive
    pixel extent) for a rectangle, flat ``[x1, y1, ..., xn, yn]`` in drawing order for the others."""

    kind: str
    color: str
    values: tuple[int, ...]

    @property
    def geometry(self) -> str:
        return "bbox_2d" if self.kind == "rectangle" else "poly"

    @property
    def desc(self) -> str:
        return f"{self.color} {self.kind}"

    def to_json(self) -> dict:
        return {"desc": self.desc, self.geometry: list(self.values)}


# ----------------------------------------------------------------------------- drawing


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, values: Sequence[int], fill) -> None:
    """The one place a shape is rasterised (images and overlap masks both go through here)."""
    if kind == "rectangle":
        draw.rectangle(tuple(values), fill=fill)
    else:
        draw.polygon([(values[i], values[i + 1]) for i in range(0, len(values), 2)], fill=fill)


def shape_mask(kind: str, values: Sequence[int], size: int) -> np.ndarray:
    """Boolean ``[size, size]`` mask of the pixels :func:`draw_shape` paints."""
    img = Image.new("L", (size, size), 0)
    draw_shape(ImageDraw.Draw(img), kind, values, 1)
    return np.asarray(img, dtype=bool)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Square dilation of a ``[H, W]`` bool mask by ``r`` pixels."""
    h, w = mask.shape
    padded = np.pad(mask, r)
    out = np.zeros_like(mask)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= padded[dy:dy + h, dx:dx + w]
    return out


# ----------------------------------------------------------------------------- backgrounds


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, amplitude: float) -> np.ndarray:
    """``[size, size, 3]`` float32 low-frequency noise in ±amplitude (a ``cells``² grid, bilinear)."""
    grid = rng.uniform(-amplitude, amplitude, (cells, cells, 3)).astype(np.float32)
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(grid[..., c])).resize((size, size), Image.BILINEAR)) for c in range(3)]
    return np.stack(chans, axis=-1)


def make_background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """A ``[size, size, 3]`` uint8 background (solid, linear gradient or light textured noise) and its kind."""
    def base() -> np.ndarray:
        c = np.array(BACKGROUND_COLORS[rng.integers(len(BACKGROUND_COLORS))], dtype=np.float32)
        return c + rng.integers(-BACKGROUND_JITTER, BACKGROUND_JITTER + 1, 3)

    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    if kind == "solid":
        img = np.broadcast_to(base(), (size, size, 3))
    elif kind == "gradient":
        c0, c1 = base(), base()
        phi = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
        t = xs * math.cos(phi) + ys * math.sin(phi)
        t = (t - t.min()) / (t.max() - t.min())  # [size, size] in 0..1
        img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    else:  # noise: blotchy texture plus fine grain
        img = base() + _smooth_noise(rng, size, int(rng.integers(3, 9)), 20.0)
        img = img + rng.integers(-6, 7, (size, size, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), kind


def allowed_colors(background: np.ndarray) -> list[str]:
    """Palette colours at least ``MIN_COLOR_DISTANCE`` from every pixel of a ``[H, W, 3]`` background."""
    packed = np.unique(background.reshape(-1, 3).astype(np.int32) @ np.array([65536, 256, 1], dtype=np.int32))
    px = np.stack([packed >> 16, (packed >> 8) & 255, packed & 255], axis=-1).astype(np.float32)  # [P, 3] distinct colours
    pal = np.array(list(SHAPE_COLORS.values()), dtype=np.float32)  # [C, 3]
    d2 = ((px[:, None, :] - pal[None, :, :]) ** 2).sum(axis=-1).min(axis=0)  # [C] squared distance
    return [name for name, d in zip(SHAPE_COLORS, d2) if d >= MIN_COLOR_DISTANCE ** 2]


# ----------------------------------------------------------------------------- geometry


def _template(rng: np.random.Generator, kind: str) -> np.ndarray:
    """``[n, 2]`` unit-scale vertices of a triangle / pentagon / ellipse polygon, in drawing order."""
    if kind == "triangle":
        gaps = MIN_TRIANGLE_ARC + rng.dirichlet(np.ones(3)) * (2 * math.pi - 3 * MIN_TRIANGLE_ARC)
        angles = rng.uniform(0, 2 * math.pi) + np.cumsum(gaps)
    elif kind == "pentagon":
        angles = rng.uniform(0, 2 * math.pi) + np.arange(5) * (2 * math.pi / 5)
    elif kind == "ellipse":
        n = int(rng.integers(ELLIPSE_VERTICES[0], ELLIPSE_VERTICES[1] + 1))
        angles = np.arange(n) * (2 * math.pi / n)
        pts = np.stack([np.cos(angles), rng.uniform(0.5, 1.0) * np.sin(angles)], axis=-1)
        theta = rng.uniform(0, math.pi)
        rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        return pts @ rot.T
    else:
        raise ValueError(f"no polygon template for kind {kind!r}")
    return np.stack([np.cos(angles), np.sin(angles)], axis=-1)


def _polygon_area(values: Sequence[int]) -> float:
    xs, ys = np.asarray(values[0::2], float), np.asarray(values[1::2], float)
    return 0.5 * abs(float(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))))


def sample_geometry(rng: np.random.Generator, kind: str, size: int, max_frac: float) -> tuple[int, ...] | None:
    """Random integer pixel geometry of ``kind`` inside a ``size``² image, or None when rounding
    degenerated it. The bounding box side lies in ``SIZE_FRAC[0] .. max_frac`` of ``size``."""
    lo, hi = SIZE_FRAC[0] * size, max(max_frac, SIZE_FRAC[0]) * size
    w = rng.uniform(lo, hi)
    aspect = ASPECT[kind]
    h = rng.uniform(lo, hi) if aspect is None else float(np.clip(w * math.exp(rng.uniform(*np.log(aspect))), lo, hi))
    if kind == "rectangle":
        rw, rh = int(round(w)), int(round(h))  # covered pixels per axis
        x1, y1 = int(rng.integers(0, size - rw + 1)), int(rng.integers(0, size - rh + 1))
        return x1, y1, x1 + rw - 1, y1 + rh - 1
    pts = _template(rng, kind)
    pts = (pts - pts.min(axis=0)) / (pts.max(axis=0) - pts.min(axis=0))  # bounding box -> [0, 1]²
    pts = pts * np.array([w - 1, h - 1]) + np.array([rng.uniform(0, size - w), rng.uniform(0, size - h)])
    pts = np.rint(pts).astype(int)  # [n, 2], all within 0..size-1
    values = tuple(int(v) for v in pts.reshape(-1))
    if len({tuple(p) for p in pts.tolist()}) < len(pts) or _polygon_area(values) < 0.2 * w * h:
        return None
    return values


# ----------------------------------------------------------------------------- one image


def make_sample(rng: np.random.Generator, size: int, min_shapes: int, max_shapes: int, kinds: Sequence[str]) -> tuple[Image.Image, list[Shape], str]:
    """Draw one image: returns (RGB image, shapes in drawing order, background kind)."""
    for _ in range(LAYOUT_TRIES):
        background, bg_kind = make_background(rng, size)
        colors = allowed_colors(background)
        if len(colors) < MIN_ALLOWED_COLORS:
            continue
        target = int(rng.integers(min_shapes, max_shapes + 1))
        # Crowded images get smaller shapes so that `target` of them can actually be placed.
        max_frac = min(SIZE_FRAC[1], 0.9 / math.sqrt(max(target, 1)))
        shapes = _place_shapes(rng, size, target, kinds, colors, max_frac)
        if len(shapes) >= min_shapes:
            img = Image.fromarray(background)
            draw = ImageDraw.Draw(img)
            for s in shapes:
                draw_shape(draw, s.kind, s.values, SHAPE_COLORS[s.color])
            return img, shapes, bg_kind
    raise RuntimeError(
        f"could not place {min_shapes} shapes in a {size}px image in {LAYOUT_TRIES} layouts; "
        f"lower --min-shapes or raise --image-size"
    )


def _place_shapes(rng: np.random.Generator, size: int, target: int, kinds: Sequence[str], colors: list[str], max_frac: float) -> list[Shape]:
    """Up to ``target`` shapes obeying MAX_IOU / MIN_VISIBLE / TOUCH_MARGIN (stops early when full)."""
    shapes: list[Shape] = []
    masks: list[np.ndarray] = []  # [size, size] bool, full extent of each placed shape
    visible: list[np.ndarray] = []  # [size, size] bool, what is still visible of each placed shape
    for _ in range(target):
        kind = kinds[rng.integers(len(kinds))]
        for _ in range(PLACEMENT_TRIES):
            values = sample_geometry(rng, kind, size, max_frac)
            if values is None:
                continue
            mask = shape_mask(kind, values, size)
            if not _placement_ok(mask, masks, visible):
                continue
            near = _dilate(mask, TOUCH_MARGIN)
            options = [c for c in colors if not any(s.color == c and (near & m).any() for s, m in zip(shapes, masks))]
            if not options:
                continue
            shapes.append(Shape(kind, options[rng.integers(len(options))], values))
            for v in visible:
                v &= ~mask
            masks.append(mask)
            visible.append(mask.copy())
            break
        else:
            break  # no room left for another shape
    return shapes


def _placement_ok(mask: np.ndarray, masks: list[np.ndarray], visible: list[np.ndarray]) -> bool:
    area = mask.sum()
    for m, v in zip(masks, visible):
        inter = (mask & m).sum()
        if inter / (area + m.sum() - inter) > MAX_IOU:
            return False
        if (v & ~mask).sum() < MIN_VISIBLE * m.sum():
            return False
    return True


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The independent stream of image ``index`` of ``split``."""
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS[split], index]))


# ----------------------------------------------------------------------------- files


def _write_split(out_dir: Path, split: str, num: int, seed: int, image_size: int, min_shapes: int, max_shapes: int,
                 kinds: Sequence[str], progress: bool) -> tuple[Path, Counter]:
    image_dir = out_dir / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(max(num - 1, 0))))
    stats: Counter = Counter()
    lines = []
    indices = range(num)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc=f"shapes {split}", unit="img")
    for i in indices:
        img, shapes, bg_kind = make_sample(sample_rng(seed, split, i), image_size, min_shapes, max_shapes, kinds)
        rel = f"images/{split}/{i:0{width}d}.png"
        with atomic_path(out_dir / rel) as tmp:
            img.save(tmp, format="PNG")
        record = {
            "id": f"{split}_{i:0{width}d}", "images": [rel], "width": image_size, "height": image_size,
            "coords": "pixel", "objects": [s.to_json() for s in shapes],
            "metadata": {"source": "make_shapes", "seed": seed, "background": bg_kind},
        }
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        stats.update({"images": 1, "objects": len(shapes), f"n={len(shapes)}": 1, f"bg {bg_kind}": 1})
        stats.update(f"kind {s.kind}" for s in shapes)
        stats.update(f"color {s.color}" for s in shapes)
    path = out_dir / f"{split}.jsonl"
    with atomic_path(path) as tmp:
        tmp.write_text("".join(lines), encoding="utf-8")
    return path, stats


def _summary(split: str, stats: Counter) -> str:
    def group(prefix: str) -> str:
        return ", ".join(f"{k[len(prefix):]}={v}" for k, v in sorted(stats.items()) if k.startswith(prefix))

    return (f"{split}: {stats['images']} images, {stats['objects']} objects\n"
            f"  kinds: {group('kind ')}\n  colors: {group('color ')}\n"
            f"  shapes/image: {group('n=')}\n  backgrounds: {group('bg ')}")


def check_options(num_train: int, num_val: int, seed: int, image_size: int, min_shapes: int, max_shapes: int,
                  kinds: Sequence[str]) -> tuple[str, ...]:
    """Raise ValueError on a bad option combination; return ``kinds`` de-duplicated, in order."""
    kinds = tuple(dict.fromkeys(kinds))
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {list(KINDS)}, got {list(kinds)}")
    if not (isinstance(seed, int) and seed >= 0):
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train / num_val must be >= 0, got {num_train} / {num_val}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 px, got {image_size}")
    if not 0 <= min_shapes <= max_shapes or max_shapes < 1:
        raise ValueError(f"need 0 <= min_shapes <= max_shapes and max_shapes >= 1, got {min_shapes}..{max_shapes}")
    return kinds


def make_shapes(out_dir: str | Path, num_train: int, num_val: int, seed: int, image_size: int = 128,
                min_shapes: int = 1, max_shapes: int = 6, kinds: Sequence[str] = KINDS,
                verbose: bool = False) -> dict[str, Path]:
    """Write the shapes dataset to ``out_dir``; returns ``{"train": train.jsonl, "val": val.jsonl}``.

    ``verbose`` shows a tqdm bar per split and prints counts per kind / colour (the CLI turns it on).
    """
    kinds = check_options(num_train, num_val, seed, image_size, min_shapes, max_shapes, kinds)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, num in (("train", num_train), ("val", num_val)):
        paths[split], stats = _write_split(out_dir, split, num, seed, image_size, min_shapes, max_shapes, kinds, verbose)
        if verbose:
            print(_summary(split, stats))
    return paths


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (train.jsonl, val.jsonl, images/)")
    p.add_argument("--num-train", type=int, required=True)
    p.add_argument("--num-val", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--image-size", type=int, default=128, help="square image side in pixels")
    p.add_argument("--min-shapes", type=int, default=1, help="0 allows images without objects (answer {})")
    p.add_argument("--max-shapes", type=int, default=6)
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    args = p.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    try:
        check_options(args.num_train, args.num_val, args.seed, args.image_size, args.min_shapes, args.max_shapes, kinds)
    except ValueError as e:
        p.error(str(e))
    return make_shapes(args.out, args.num_train, args.num_val, args.seed, args.image_size,
                       args.min_shapes, args.max_shapes, kinds, verbose=True)


if __name__ == "__main__":
    main()
