"""Pictures of a predictions file: GT and predictions drawn per image, an index.html and a contact sheet.

    python -m src.visualize --pred pred.jsonl --out DIR [--limit N]

Each image is matched with the training matcher at maskIoU gate 0.5 (class-agnostic, as in
``python -m src.eval``'s ``f1@0.5``) and drawn upscaled (longer side >= 512 px):

    GT matched       green, solid          predicted matched   blue, solid
    GT missed (FN)   orange, dashed        predicted FP        red, solid

with each object's ``desc`` as a label and the counts in a footer. Labels never overlap each other
(:func:`place_labels`: next to their object when there is room, else slid to the nearest free spot;
one that finds no room is left out and counted in the footer). Coordinates are pixel edges, so an
outline on the image's right/bottom edge stays on the canvas. Writes ``DIR/NNNNN_<stem>.png``,
``DIR/index.html`` (a grid with per-image counts) and ``DIR/contact_sheet.png``. A relative
``image`` path is read relative to the predictions file's folder.
"""

from __future__ import annotations

import argparse
import html
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from src.data.contract import DataError
from src.data.images import load_image, require_size
from src.eval import ImagePredictions, read_predictions

GATE = 0.5
MIN_SIDE = 512
THUMB = 256
SHEET_COLUMNS = 6
COLOURS = {"gt": (0, 200, 0), "fn": (255, 140, 0), "tp": (30, 90, 255), "fp": (230, 20, 20)}
FOOTER = 28
LINE_WIDTH = 2  # outline width, canvas pixels
LABEL_PAD = 2  # black margin around a label's text, canvas pixels
LABEL_GAP = 2  # between an object's outline and its label, canvas pixels
LABEL_CELL = 4  # grid step of the slide search for a free label spot, canvas pixels


@dataclass(frozen=True)
class ImageCounts:
    matched: int
    fp: int
    fn: int


@dataclass(frozen=True)
class Rect:
    """A half-open rectangle of canvas pixels: columns ``x1 .. x2 - 1``, rows ``y1 .. y2 - 1``."""

    x1: int
    y1: int
    x2: int
    y2: int

    @property
    def width(self) -> int:
        return self.x2 - self.x1

    @property
    def height(self) -> int:
        return self.y2 - self.y1

    def overlaps(self, other: "Rect") -> bool:
        """True when the two rectangles share at least one pixel."""
        return self.x1 < other.x2 and other.x1 < self.x2 and self.y1 < other.y2 and other.y1 < self.y2


@dataclass(frozen=True)
class LabelRequest:
    """A label of ``width`` x ``height`` canvas pixels for the object whose outline spans ``anchor``;
    ``below``: the preferred side (under the object, else over it)."""

    anchor: Rect
    width: int
    height: int
    below: bool


@dataclass(frozen=True)
class PlacedLabel:
    text: str
    rect: Rect
    colour: tuple[int, int, int]


@dataclass(frozen=True)
class _Shape:
    """One object to draw: flat pixel coordinates, outline colour and style, label text and side."""

    geometry: str
    pixels: Sequence[float]
    colour: tuple[int, int, int]
    label: str
    dashed: bool
    label_below: bool


@dataclass(frozen=True)
class Rendering:
    """One picture: the canvas (image area + footer), the matcher counts, the labels drawn (pairwise
    disjoint, inside the image area) and how many found no free room and were left out."""

    image: object  # PIL.Image.Image
    counts: ImageCounts
    labels: tuple[PlacedLabel, ...]
    hidden_labels: int


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _dashed_line(draw, p, q, colour, width: int, dash: float = 8.0) -> None:
    (x1, y1), (x2, y2) = p, q
    length = ((x2 - x1) ** 2 + (y2 - y1) ** 2) ** 0.5
    steps = max(int(length // dash), 1)
    for i in range(0, steps, 2):
        a, b = i / steps, min((i + 1) / steps, 1.0)
        draw.line([(x1 + (x2 - x1) * a, y1 + (y2 - y1) * a), (x1 + (x2 - x1) * b, y1 + (y2 - y1) * b)], fill=colour, width=width)


def _outline(geometry: str, pixels: Sequence[float], scale: float, size: tuple[int, int]) -> list[tuple[float, float]]:
    """Closed outline on the image area: a box's 4 corners or the polygon's points.

    Image coordinates are pixel EDGES (0 = left edge of the first column, ``width`` = right edge of the
    last; the data contract allows 0 <= x <= width), so canvas x = ``x * scale``, clamped to the last
    pixel (``size - 1``): an outline on the image's right/bottom edge is drawn on the last column/row
    instead of off the canvas. ``size``: the image area ``(w, h)`` in canvas pixels."""
    if geometry == "bbox_2d":
        x1, y1, x2, y2 = pixels
        pts = [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]
    else:
        pts = list(zip(pixels[0::2], pixels[1::2]))
    return [(min(x * scale, size[0] - 1), min(y * scale, size[1] - 1)) for x, y in pts]


def _draw_outline(draw, pts: Sequence[tuple[float, float]], colour, dashed: bool) -> None:
    for p, q in zip(pts, [*pts[1:], pts[0]]):
        if dashed:
            _dashed_line(draw, p, q, colour, LINE_WIDTH)
        else:
            draw.line([p, q], fill=colour, width=LINE_WIDTH)


def _bounds(pts: Sequence[tuple[float, float]]) -> Rect:
    """The canvas pixels an outline spans (half-open)."""
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return Rect(int(min(xs)), int(min(ys)), int(max(xs)) + LINE_WIDTH, int(max(ys)) + LINE_WIDTH)


# ------------------------------------------------------------------------------------- label placement


def _window_free(occupied: "np.ndarray", w: int, h: int) -> "np.ndarray":
    """``[H - h + 1, W - w + 1]`` bool: True where a ``w`` x ``h`` window with that top-left corner
    covers no occupied cell (``occupied``: ``[H, W]`` bool). Summed-area table, one vectorised pass."""
    sat = np.zeros((occupied.shape[0] + 1, occupied.shape[1] + 1), dtype=np.int64)
    sat[1:, 1:] = occupied.cumsum(0).cumsum(1)
    covered = sat[h:, w:] - sat[:-h, w:] - sat[h:, :-w] + sat[:-h, :-w]
    return covered == 0


def _nearest_free(free: "np.ndarray", x0: int, y0: int) -> tuple[int, int] | None:
    """The free corner ``(x, y)`` nearest to ``(x0, y0)`` (Manhattan), looking down/right of it first."""
    ys, xs = np.nonzero(free)
    if ys.size == 0:
        return None
    forward = (xs >= x0) & (ys >= y0)
    if forward.any():
        ys, xs = ys[forward], xs[forward]
    k = int(np.argmin(np.abs(xs - x0) + np.abs(ys - y0)))
    return int(xs[k]), int(ys[k])


class _Occupancy:
    """Canvas pixels taken by placed labels, ``[H, W]`` bool, plus a conservative grid of
    ``LABEL_CELL``-pixel cells (a cell is taken when any of its pixels is) for the slide search."""

    def __init__(self, width: int, height: int) -> None:
        self.pixels = np.zeros((height, width), dtype=bool)  # [H, W]
        self.cells = np.zeros((height // LABEL_CELL, width // LABEL_CELL), dtype=bool)  # [H // C, W // C]

    def is_free(self, x: int, y: int, w: int, h: int) -> bool:
        return not self.pixels[y : y + h, x : x + w].any()

    def take(self, r: Rect) -> None:
        self.pixels[r.y1 : r.y2, r.x1 : r.x2] = True
        c = LABEL_CELL
        self.cells[r.y1 // c : -(-r.y2 // c), r.x1 // c : -(-r.x2 // c)] = True

    def nearest_free(self, w: int, h: int, x0: int, y0: int) -> tuple[int, int] | None:
        """A free top-left corner (canvas pixels, on the cell grid) for a ``w`` x ``h`` label near
        ``(x0, y0)``, down/right of it first; None when no cell-aligned room is left."""
        c = LABEL_CELL
        wc, hc = -(-w // c), -(-h // c)
        if wc > self.cells.shape[1] or hc > self.cells.shape[0]:
            return None
        spot = _nearest_free(_window_free(self.cells, wc, hc), -(-x0 // c), -(-y0 // c))
        return None if spot is None else (spot[0] * c, spot[1] * c)


def place_labels(requests: Sequence[LabelRequest], width: int, height: int) -> list[Rect | None]:
    """Greedy, in request order: each label goes to the first free one of (its preferred side of the
    anchor, the other side, just inside the anchor's top-left corner), each shifted into the canvas;
    when all three are taken it slides to the nearest free position down/right of the preferred one
    (anywhere, when nothing down/right is free; searched on a grid of ``LABEL_CELL`` pixels). Returns
    one rectangle per request, pairwise disjoint and inside ``[0, width) x [0, height)``, or None where
    no free room is left (or the label is larger than the canvas). Units: canvas pixels."""
    taken = _Occupancy(width, height)
    placed: list[Rect | None] = []
    for req in requests:
        w, h, a = req.width, req.height, req.anchor
        if not (0 < w <= width and 0 < h <= height):
            placed.append(None)
            continue
        below, above, inside = (a.x1, a.y2 + LABEL_GAP), (a.x1, a.y1 - h - LABEL_GAP), (a.x1 + LINE_WIDTH, a.y1 + LINE_WIDTH)
        tries = [below, above, inside] if req.below else [above, below, inside]
        tries = [(min(max(x, 0), width - w), min(max(y, 0), height - h)) for x, y in tries]
        spot = next(((x, y) for x, y in tries if taken.is_free(x, y, w, h)), None) or taken.nearest_free(w, h, *tries[0])
        if spot is None:
            placed.append(None)
            continue
        rect = Rect(spot[0], spot[1], spot[0] + w, spot[1] + h)
        taken.take(rect)
        placed.append(rect)
    return placed


def _label_size(draw, font, text: str) -> tuple[int, int, int, int]:
    """``(w, h, dx, dy)``: the label box size with padding, and where to draw the text inside it."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left + 2 * LABEL_PAD, bottom - top + 2 * LABEL_PAD, LABEL_PAD - left, LABEL_PAD - top


def _fit_text(draw, font, text: str, max_width: int) -> str:
    """``text``, shortened with "..." when its label would be wider than ``max_width`` canvas pixels."""
    if _label_size(draw, font, text)[0] <= max_width:
        return text
    while len(text) > 1 and _label_size(draw, font, text + "...")[0] > max_width:
        text = text[:-1]
    return text + "..."


def render(im: ImagePredictions) -> Rendering:
    """The annotated picture of one line: outlines first, then every label where
    :func:`place_labels` puts it (GT labels prefer the space under their shape, predictions above)."""
    from PIL import Image, ImageDraw

    from src.config.schema import RolloutMatchingConfig
    from src.rollout_matching.matcher import match_objects
    from src.rollout_matching.stats import match_kwargs

    m = match_objects(im.pred, im.gt, **match_kwargs(RolloutMatchingConfig(), maskiou_gate=GATE))
    matched_gt = {j for _, j in m.matches}
    matched_pred = {i for i, _ in m.matches}
    path = Path(im.image)
    image = load_image(path, im.source)
    require_size(image.size, im.width, im.height, path, im.source)
    scale = max(1.0, MIN_SIDE / max(image.size))
    size = (round(image.width * scale), round(image.height * scale))
    area = image.resize(size, Image.NEAREST)  # outlines and labels are drawn here: nothing spills into the footer
    draw = ImageDraw.Draw(area)
    font = _font(13)

    shapes = [
        *(_Shape(o.geometry, px, COLOURS["gt" if j in matched_gt else "fn"], f"GT {o.desc}", dashed=j not in matched_gt, label_below=True)
          for j, (o, px) in enumerate(zip(im.gt, im.gt_pixels))),
        *(_Shape(o.geometry, px, COLOURS["tp" if i in matched_pred else "fp"], f"{i + 1}. {o.desc}", dashed=False, label_below=False)
          for i, (o, px) in enumerate(zip(im.pred, im.pred_pixels))),
    ]
    texts, requests = [], []
    for shape in shapes:
        pts = _outline(shape.geometry, shape.pixels, scale, size)
        _draw_outline(draw, pts, shape.colour, shape.dashed)
        text = _fit_text(draw, font, shape.label, size[0])
        w, h, _, _ = _label_size(draw, font, text)
        texts.append(text)
        requests.append(LabelRequest(_bounds(pts), w, h, shape.label_below))
    labels = []
    for shape, text, rect in zip(shapes, texts, place_labels(requests, *size)):
        if rect is None:
            continue
        _, _, dx, dy = _label_size(draw, font, text)
        draw.rectangle([rect.x1, rect.y1, rect.x2 - 1, rect.y2 - 1], fill=(0, 0, 0))
        draw.text((rect.x1 + dx, rect.y1 + dy), text, fill=shape.colour, font=font)
        labels.append(PlacedLabel(text, rect, shape.colour))

    counts = ImageCounts(matched=len(m.matches), fp=len(m.fp), fn=len(m.fn))
    hidden = len(shapes) - len(labels)
    footer = f"matched {counts.matched}  FP {counts.fp}  FN {counts.fn}" + ("  [truncated]" if im.truncated else "") + ("  [malformed]" if im.malformed else "")
    if hidden:
        footer += f"  ({hidden} labels left out: no free room)"
    if im.pred_invalid:
        footer += f"  ({im.pred_invalid} invalid predictions not drawn)"  # as src.eval: counted, not scored
    canvas = Image.new("RGB", (size[0], size[1] + FOOTER), (255, 255, 255))
    canvas.paste(area, (0, 0))
    ImageDraw.Draw(canvas).text((6, size[1] + 6), footer, fill=(0, 0, 0), font=_font(15))
    return Rendering(canvas, counts, tuple(labels), hidden)


def contact_sheet(paths: Sequence[Path], out: Path) -> None:
    """Thumbnails of ``paths`` in a grid of SHEET_COLUMNS columns."""
    from PIL import Image

    cols = min(SHEET_COLUMNS, len(paths))
    rows = (len(paths) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * THUMB, rows * THUMB), (255, 255, 255))
    for k, p in enumerate(paths):
        thumb = load_image(p)
        thumb.thumbnail((THUMB, THUMB))
        sheet.paste(thumb, ((k % cols) * THUMB, (k // cols) * THUMB))
    sheet.save(out)


def write_index(entries: Sequence[tuple[str, ImagePredictions, ImageCounts]], out: Path, title: str) -> None:
    cells = []
    for name, im, c in entries:
        caption = f"{html.escape(Path(im.image).name)}<br>GT {len(im.gt)} · pred {len(im.pred)} · matched {c.matched} · FP {c.fp} · FN {c.fn}"
        if im.truncated:
            caption += " · truncated"
        if im.malformed:
            caption += " · malformed"
        cells.append(f'<figure><a href="{html.escape(name)}"><img src="{html.escape(name)}" loading="lazy"></a><figcaption>{caption}</figcaption></figure>')
    legend = ("GT matched: green · GT missed (FN): orange dashed · prediction matched: blue · false positive: red "
              f"(matcher, maskIoU gate {GATE})")
    out.write_text(
        "<!doctype html><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
        "<style>body{font-family:sans-serif}main{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:12px}"
        "img{width:100%}figure{margin:0}figcaption{font-size:13px}</style>"
        f"<h1>{html.escape(title)}</h1><p>{legend}</p><p><a href='contact_sheet.png'>contact sheet</a></p>"
        "<main>" + "".join(cells) + "</main>\n",
        encoding="utf-8",
    )


def visualize(pred: Path, out: Path, limit: int | None = None) -> list[Path]:
    """Draw the first ``limit`` lines of ``pred`` into ``out``; returns the PNG paths."""
    from tqdm import tqdm

    images = read_predictions(pred, limit=limit)
    # a relative image path is relative to the predictions file's folder (as in the data contract)
    images = [im if Path(im.image).is_absolute() else replace(im, image=str(pred.parent / im.image)) for im in images]
    if not images:
        raise DataError(f"{pred}: no predictions (the file is empty)")
    out.mkdir(parents=True, exist_ok=True)
    entries, paths = [], []
    for k, im in enumerate(tqdm(images, desc="visualize", unit="img", file=sys.stderr, disable=None)):
        picture = render(im)
        name = f"{k:05d}_{Path(im.image).stem}.png"
        picture.image.save(out / name)
        entries.append((name, im, picture.counts))
        paths.append(out / name)
    contact_sheet(paths, out / "contact_sheet.png")
    write_index(entries, out / "index.html", f"{pred}")
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m src.visualize", description=__doc__.splitlines()[0])
    ap.add_argument("--pred", required=True, type=Path, help="predictions JSONL (python -m src.infer output)")
    ap.add_argument("--out", required=True, type=Path, help="output folder (created)")
    ap.add_argument("--limit", type=int, help="only the first N images")
    args = ap.parse_args(argv)
    try:
        if args.limit is not None and args.limit < 1:
            raise DataError(f"--limit must be >= 1, got {args.limit}")
        paths = visualize(args.pred, args.out, args.limit)
    except DataError as e:
        print(f"error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} pictures, {args.out / 'index.html'} and {args.out / 'contact_sheet.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
