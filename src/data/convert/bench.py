"""Converter speed on a synthetic COCO-like file (a printed benchmark, not a test).

    python -m src.data.convert.bench [--images 20000] [--out output/bench/convert]

Writes a COCO-style ``instances.json`` with ``--images`` images (640x480, 0-20 objects each, 8.6 on
average (COCO train2017: 7.3); one polygon each, 15% with a second part, 1% crowd RLE regions) plus
empty image files, then runs ``python -m src.data.convert coco`` on it in a child process for each
geometry, with and without the token counts, and prints wall time, images/s and the child's peak
resident memory (its own ``ru_maxrss``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def synthetic_coco(num_images: int, seed: int = 0) -> dict:
    """A COCO-like annotation dict (80 categories, 0-20 objects per image, 8.6 on average)."""
    rng = np.random.default_rng(seed)
    cats = [{"id": i + 1, "name": f"category {i + 1}"} for i in range(80)]
    images, anns = [], []
    for i in range(num_images):
        images.append({"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "width": 640, "height": 480})
        for _ in range(int(rng.choice(21, p=np.r_[np.full(11, 0.06), np.full(10, 0.034)]))):
            cx, cy, r = rng.uniform(0, 640), rng.uniform(0, 480), rng.uniform(4, 120)
            k = int(rng.integers(6, 20))
            ang = np.sort(rng.uniform(0, 2 * np.pi, k))
            poly = np.round(np.c_[cx + r * np.cos(ang), cy + r * np.sin(ang)].ravel(), 2).tolist()
            seg = [poly, (np.asarray(poly) + 3).round(2).tolist()] if rng.random() < 0.15 else [poly]
            xs, ys = poly[0::2], poly[1::2]
            ann = {"id": len(anns) + 1, "image_id": i + 1, "category_id": int(rng.integers(1, 81)), "iscrowd": 0,
                   "bbox": [min(xs), min(ys), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)],
                   "area": round(float(r * r * 2.5), 2), "segmentation": seg}
            if rng.random() < 0.01:
                ann.update(iscrowd=1, segmentation={"size": [480, 640], "counts": [1000, 400, 306800]})
            anns.append(ann)
    return {"images": images, "annotations": anns, "categories": cats}


CHILD = (
    "import resource, sys\n"
    "from src.data.convert.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    "raise SystemExit(rc)\n"
)


def run(args: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of ``python -m src.data.convert ARGS`` in a fresh child."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CHILD, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    kib = next(int(line.split()[1]) for line in r.stderr.splitlines() if line.startswith("peak_rss_kib"))
    return wall, kib / 1024  # ru_maxrss is in KiB on Linux


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m src.data.convert.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--out", type=Path, default=Path("output/bench/convert"))
    args = ap.parse_args(argv)
    img_dir = args.out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    data = synthetic_coco(args.images)
    for img in data["images"]:
        (img_dir / img["file_name"]).touch()
    ann = args.out / "instances.json"
    ann.write_text(json.dumps(data))
    print(f"{args.images:,} images, {len(data['annotations']):,} annotations, {ann.stat().st_size / 2**20:.0f} MiB JSON")
    for geometry, tokens in (("bbox", True), ("bbox", False), ("poly", False)):
        extra = [] if tokens else ["--no-token-stats"]
        wall, peak = run(["coco", "--ann", str(ann), "--images", str(img_dir), "--out", str(args.out / f"{geometry}.jsonl"),
                          "--geometry", geometry, *extra])
        print(f"  --geometry {geometry:<4} tokens {'on ' if tokens else 'off'}: {wall:6.1f} s  {args.images / wall:7.0f} images/s"
              f"  peak RSS {peak:6.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
