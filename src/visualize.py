"""Pictures of a predictions file: GT and predictions drawn per image, an index.html and a contact sheet.

    python -m src.visualize --pred pred.jsonl --out DIR [--limit N]

Each image is matched with the training matcher at maskIoU gate 0.5 (class-agnostic, as in
``python -m src.eval``'s ``f1@0.5``) and drawn upscaled (longer side >= 512 px):

    GT matched       green, solid          predicted matched   blue, solid
    GT missed (FN)   orange, dashed        predicted FP        red, solid

with each object's ``desc`` as a label and the counts in a footer. Writes ``DIR/NNNNN_<stem>.png``,
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

from src.data.contract import DataError
from src.data.images import load_image
from src.eval import ImagePredictions, read_predictions

GATE = 0.5
MIN_SIDE = 512
THUMB = 256
SHEET_COLUMNS = 6
COLOURS = {"gt": (0, 200, 0), "fn": (255, 140, 0), "tp": (30, 90, 255), "fp": (230, 20, 20)}
FOOTER = 28


@dataclass(frozen=True)
class ImageCounts:
    matched: int
    fp: int
    fn: int


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


def _outline(geometry: str, pixels: Sequence[float], scale: float) -> list[tuple[float, float]]:
    """Closed outline (scaled pixels): a box's 4 corners or the polygon's points."""
    if geometry == "bbox_2d":
        x1, y1, x2, y2 = pixels
        pts = [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]
    else:
        pts = list(zip(pixels[0::2], pixels[1::2]))
    return [((x + 0.5) * scale, (y + 0.5) * scale) for x, y in pts]  # pixel centres of the upscaled image


def _draw_object(draw, font, geometry: str, pixels: Sequence[float], scale: float, colour, label: str, dashed: bool, below: bool) -> None:
    pts = _outline(geometry, pixels, scale)
    width = 2
    for p, q in zip(pts, pts[1:] + pts[:1]):
        if dashed:
            _dashed_line(draw, p, q, colour, width)
        else:
            draw.line([p, q], fill=colour, width=width)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x, y = min(xs), (max(ys) + 2 if below else min(ys) - 16)
    w, h = draw.im.size
    x, y = min(max(x, 0), w - 60), min(max(y, 0), h - FOOTER - 16)  # keep the label on the picture
    box = draw.textbbox((x, y), label, font=font)
    draw.rectangle(box, fill=(0, 0, 0))
    draw.text((x, y), label, fill=colour, font=font)


def render(im: ImagePredictions):
    """The annotated picture of one line and its counts: ``(PIL.Image, ImageCounts)``."""
    from PIL import Image, ImageDraw

    from src.config.schema import RolloutMatchingConfig
    from src.rollout_matching.matcher import match_objects
    from src.rollout_matching.stats import match_kwargs

    m = match_objects(im.pred, im.gt, **match_kwargs(RolloutMatchingConfig(), maskiou_gate=GATE))
    matched_gt = {j for _, j in m.matches}
    matched_pred = {i for i, _ in m.matches}
    image = load_image(Path(im.image), im.source)
    scale = max(1.0, MIN_SIDE / max(image.size))
    size = (round(image.width * scale), round(image.height * scale))
    canvas = Image.new("RGB", (size[0], size[1] + FOOTER), (255, 255, 255))
    canvas.paste(image.resize(size, Image.NEAREST), (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = _font(13)
    for j, (o, px) in enumerate(zip(im.gt, im.gt_pixels)):  # GT labels below the shape, predictions above
        hit = j in matched_gt
        _draw_object(draw, font, o.geometry, px, scale, COLOURS["gt" if hit else "fn"], f"GT {o.desc}", dashed=not hit, below=True)
    for i, (o, px) in enumerate(zip(im.pred, im.pred_pixels)):
        hit = i in matched_pred
        _draw_object(draw, font, o.geometry, px, scale, COLOURS["tp" if hit else "fp"], f"{i + 1}. {o.desc}", dashed=False, below=False)
    counts = ImageCounts(matched=len(m.matches), fp=len(m.fp), fn=len(m.fn))
    footer = f"matched {counts.matched}  FP {counts.fp}  FN {counts.fn}" + ("  [truncated]" if im.truncated else "")
    draw.text((6, size[1] + 6), footer, fill=(0, 0, 0), font=_font(15))
    return canvas, counts


def contact_sheet(paths: Sequence[Path], out: Path) -> None:
    """Thumbnails of ``paths`` in a grid of SHEET_COLUMNS columns."""
    from PIL import Image

    cols = min(SHEET_COLUMNS, len(paths))
    rows = (len(paths) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * THUMB, rows * THUMB), (255, 255, 255))
    for k, p in enumerate(paths):
        with Image.open(p) as im:
            im.thumbnail((THUMB, THUMB))
            sheet.paste(im, ((k % cols) * THUMB, (k // cols) * THUMB))
    sheet.save(out)


def write_index(entries: Sequence[tuple[str, ImagePredictions, ImageCounts]], out: Path, title: str) -> None:
    cells = []
    for name, im, c in entries:
        caption = f"{html.escape(Path(im.image).name)}<br>GT {len(im.gt)} · pred {len(im.pred)} · matched {c.matched} · FP {c.fp} · FN {c.fn}"
        if im.truncated:
            caption += " · truncated"
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
        picture, counts = render(im)
        name = f"{k:05d}_{Path(im.image).stem}.png"
        picture.save(out / name)
        entries.append((name, im, counts))
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
