"""The synthetic shapes generator: determinism, the data contract, geometry == drawing, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from src.data import make_shapes as ms
from src.data.contract import load_jsonl
from src.data.serialize import serialize_objects

SIZE = 128


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _mask(obj: dict, size: int) -> np.ndarray:
    """Rasterise an annotation on its own (PIL, independent of the generator's helpers)."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    if "bbox_2d" in obj:
        draw.rectangle(obj["bbox_2d"], fill=1)
    else:
        v = obj["poly"]
        draw.polygon([(v[i], v[i + 1]) for i in range(0, len(v), 2)], fill=1)
    return np.asarray(img, dtype=bool)


def _kind_color(obj: dict) -> tuple[str, str]:
    color, kind = obj["desc"].split(" ")
    return kind, color


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    out = tmp_path_factory.mktemp("shapes")
    return out, ms.make_shapes(out, num_train=16, num_val=6, seed=3, image_size=SIZE)


def test_same_seed_same_bytes_other_seed_differs(dataset, tmp_path):
    out, _ = dataset
    ms.make_shapes(tmp_path / "again", 16, 6, seed=3, image_size=SIZE)
    assert _files(tmp_path / "again") == _files(out)
    ms.make_shapes(tmp_path / "other", 16, 6, seed=4, image_size=SIZE)
    other, ref = _files(tmp_path / "other"), _files(out)
    assert other.keys() == ref.keys()
    assert other["train.jsonl"] != ref["train.jsonl"]
    assert sum(other[k] != ref[k] for k in ref if k.endswith(".png")) >= 20


def test_val_stream_independent_of_num_train(dataset, tmp_path):
    out, _ = dataset
    paths = ms.make_shapes(tmp_path, 3, 6, seed=3, image_size=SIZE)
    assert paths["val"].read_bytes() == (out / "val.jsonl").read_bytes()
    assert (tmp_path / "images/val/00005.png").read_bytes() == (out / "images/val/00005.png").read_bytes()
    train = _files(tmp_path / "images/train")
    assert all(b != (out / "images/val" / name).read_bytes() for name, b in train.items())


def test_every_line_passes_the_contract(dataset):
    _, paths = dataset
    assert set(paths) == {"train", "val"}
    for split, n in (("train", 16), ("val", 6)):
        records, stats = load_jsonl(paths[split])
        assert stats.records == n == len(records) and stats.skipped == 0
        assert [r.id for r in records] == [f"{split}_{i:05d}" for i in range(n)]
        assert all(r.image.is_file() and r.width == r.height == SIZE for r in records)
        assert all(1 <= len(r.objects) <= 6 for r in records)  # min_shapes=1: never an empty image
        with Image.open(records[0].image) as im:
            assert im.size == (SIZE, SIZE) and im.mode == "RGB"


def test_geometry_in_bounds_and_well_formed(dataset):
    _, paths = dataset
    n_vertices = {"triangle": {3}, "pentagon": {5}, "ellipse": set(range(12, 17))}
    for path in paths.values():
        for rec in _lines(path):
            for obj in rec["objects"]:
                kind, color = _kind_color(obj)
                assert color in ms.SHAPE_COLORS
                values = obj.get("bbox_2d") or obj["poly"]
                assert all(isinstance(v, int) and 0 <= v <= SIZE - 1 for v in values)
                if kind == "rectangle":
                    x1, y1, x2, y2 = obj["bbox_2d"]
                    assert x2 > x1 and y2 > y1 and "poly" not in obj
                    extent = (x2 - x1 + 1, y2 - y1 + 1)
                else:
                    assert "bbox_2d" not in obj and len(values) % 2 == 0 and len(values) >= 6
                    assert len(values) // 2 in n_vertices[kind]
                    pts = list(zip(values[0::2], values[1::2]))
                    assert len(set(pts)) == len(pts)
                    extent = (max(values[0::2]) - min(values[0::2]) + 1, max(values[1::2]) - min(values[1::2]) + 1)
                lo, hi = ms.SIZE_FRAC[0] * SIZE, ms.SIZE_FRAC[1] * SIZE
                assert all(lo - 1 <= e <= hi + 1 for e in extent), (obj, extent)


def test_drawn_pixels_match_annotations(dataset):
    """Every visible pixel of a shape has the named colour exactly; no shape colour outside the shapes;
    overlap stays within MAX_IOU / MIN_VISIBLE."""
    out, paths = dataset
    centres_checked = 0
    for path in paths.values():
        for rec in _lines(path):
            pixels = np.asarray(Image.open(out / rec["images"][0]).convert("RGB"), dtype=np.int32)  # [H, W, 3]
            objs = rec["objects"]
            masks = [_mask(o, SIZE) for o in objs]
            for i, (obj, mask) in enumerate(zip(objs, masks)):
                rgb = ms.SHAPE_COLORS[_kind_color(obj)[1]]
                later = np.zeros_like(mask)
                for m in masks[i + 1:]:
                    later |= m
                visible = mask & ~later
                assert (pixels[visible] == rgb).all(), obj
                assert visible.sum() >= ms.MIN_VISIBLE * mask.sum() - 1
                for m in masks[:i]:
                    assert (mask & m).sum() / (mask | m).sum() <= ms.MAX_IOU + 1e-9
                # the brief's check: colour at the box centre / polygon centroid when nothing later covers it
                values = obj.get("bbox_2d") or obj["poly"]
                cx, cy = round(float(np.mean(values[0::2]))), round(float(np.mean(values[1::2])))
                if mask[cy, cx] and not later[cy, cx]:
                    assert tuple(pixels[cy, cx]) == rgb, obj
                    centres_checked += 1
            background = pixels[~np.any(masks, axis=0)] if masks else pixels.reshape(-1, 3)
            for obj in objs:
                rgb = np.array(ms.SHAPE_COLORS[_kind_color(obj)[1]])
                assert np.sqrt(((background - rgb) ** 2).sum(-1)).min() >= ms.MIN_COLOR_DISTANCE, obj
    assert centres_checked >= 22  # at least the last shape of every image


def test_kinds_restriction_and_max_shapes(tmp_path):
    paths = ms.make_shapes(tmp_path, 10, 2, seed=0, kinds=("rectangle",), max_shapes=3)
    for path in paths.values():
        for rec in _lines(path):
            assert 1 <= len(rec["objects"]) <= 3
            assert all(_kind_color(o)[0] == "rectangle" and set(o) == {"desc", "bbox_2d"} for o in rec["objects"])


def test_zero_objects_only_when_min_shapes_is_zero(tmp_path):
    paths = ms.make_shapes(tmp_path, 12, 0, seed=1, min_shapes=0, max_shapes=1)
    records, _ = load_jsonl(paths["train"])
    empty = [r for r in records if not r.objects]
    assert empty and len(empty) < len(records)
    assert serialize_objects(empty[0].objects) == "{}"
    records, _ = load_jsonl(paths["val"])
    assert records == []


def test_atomic_writes_leave_no_temp_files(dataset, tmp_path, monkeypatch):
    out, _ = dataset
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]

    real_save, calls = Image.Image.save, []

    def save_then_crash_on_fifth(self, fp, *args, **kwargs):  # dies with a complete temp file on disk
        real_save(self, fp, *args, **kwargs)
        calls.append(fp)
        if len(calls) == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", save_then_crash_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        ms.make_shapes(tmp_path, 8, 2, seed=0)
    assert not (tmp_path / "train.jsonl").exists() and not (tmp_path / "val.jsonl").exists()
    assert len(list((tmp_path / "images/train").glob("*.png"))) == 4
    assert ".tmp" in Path(calls[-1]).name
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_bad_options_fail_early(tmp_path):
    with pytest.raises(ValueError, match="kinds"):
        ms.make_shapes(tmp_path, 1, 1, seed=0, kinds=("hexagon",))
    with pytest.raises(ValueError, match="min_shapes"):
        ms.make_shapes(tmp_path, 1, 1, seed=0, min_shapes=4, max_shapes=3)
    with pytest.raises(ValueError, match="seed"):
        ms.make_shapes(tmp_path, 1, 1, seed=-1)
    assert not list(tmp_path.iterdir())


def test_cli(tmp_path, capsys):
    paths = ms.main(["--out", str(tmp_path), "--num-train", "4", "--num-val", "2", "--seed", "7",
                     "--kinds", "rectangle", "--max-shapes", "3"])
    assert len(load_jsonl(paths["train"])[0]) == 4
    printed = capsys.readouterr().out
    assert "train: 4 images" in printed and "rectangle=" in printed and "val: 2 images" in printed
    with pytest.raises(SystemExit):
        ms.main(["--out", str(tmp_path), "--num-train", "1", "--num-val", "1", "--seed", "0", "--kinds", "circle"])
