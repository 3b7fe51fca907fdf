"""src.data.images: every PIL mode becomes the 8-bit RGB the model should see, EXIF orientation is not
applied (and said once), and a record's width/height must equal the stored image size."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from src.data import images
from src.data.contract import DataError, load_jsonl
from src.data.images import BACKGROUND, check_image_size, check_record_images, load_image, to_rgb

ROOT = Path(__file__).resolve().parents[1]
PALETTE = [0, 0, 0, 10, 20, 30] + [0] * (256 * 3 - 6)  # index 1 = (10, 20, 30)


def filled(mode: str, values: list, size=None):
    """A 1-row image of ``mode`` holding ``values`` (one per pixel), palette modes with PALETTE."""
    im = Image.new(mode, size or (len(values), 1))
    if mode in ("P", "PA"):
        im.putpalette(PALETTE)
    im.putdata(values)
    return im


def rgb(*pixels) -> np.ndarray:
    """Expected ``[1, N, 3]`` uint8 row; a pixel given as one int is grey."""
    return np.array([[p if isinstance(p, tuple) else (p, p, p) for p in pixels]], dtype=np.uint8)


# mode -> (image, expected [1, N, 3] RGB, tolerance). Alpha: a = 128/255 on white gives v*a + 127.
MODE_CASES = {
    "1": lambda: (filled("1", [0, 1]), rgb(0, 255), 0),
    "L": lambda: (filled("L", [0, 100, 255]), rgb(0, 100, 255), 0),
    "P": lambda: (filled("P", [0, 1]), rgb(0, (10, 20, 30)), 0),
    "RGB": lambda: (filled("RGB", [(10, 20, 30)]), rgb((10, 20, 30)), 0),
    "RGBX": lambda: (filled("RGBX", [(10, 20, 30, 99)]), rgb((10, 20, 30)), 0),
    "CMYK": lambda: (filled("CMYK", [(0, 255, 255, 0), (0, 0, 0, 255)]), rgb((255, 0, 0), 0), 0),
    "YCbCr": lambda: (filled("YCbCr", [(76, 85, 255), (128, 128, 128)]), rgb((255, 0, 0), 128), 2),
    "HSV": lambda: (filled("HSV", [(0, 255, 255), (85, 255, 255), (0, 0, 200)]), rgb((255, 0, 0), (0, 255, 0), 200), 1),
    # CIELAB L*=53.24 a*=80.09 b*=67.20 is sRGB red; L* is stored x 255/100, a*/b* offset by 128
    "LAB": lambda: (filled("LAB", [(136, 208, 195), (0, 128, 128), (255, 128, 128)]), rgb((255, 0, 0), 0, 255), 12),
    "I;16": lambda: (filled("I;16", [0, 257, 32768, 65535]), rgb(0, 1, 128, 255), 0),
    "I;16B": lambda: (filled("I;16B", [0, 257, 32768, 65535]), rgb(0, 1, 128, 255), 0),
    "I;16L": lambda: (filled("I;16L", [0, 257, 32768, 65535]), rgb(0, 1, 128, 255), 0),
    "I;16N": lambda: (filled("I;16N", [0, 257, 32768, 65535]), rgb(0, 1, 128, 255), 0),
    "I": lambda: (filled("I", [-5, 0, 32768, 65535, 70000]), rgb(0, 0, 128, 255, 255), 0),
    "F": lambda: (filled("F", [0.0, 0.5, 1.0]), rgb(0, 128, 255), 0),
    "RGBA": lambda: (filled("RGBA", [(0, 0, 0, 0), (200, 0, 0, 255), (200, 0, 0, 128)]), rgb(255, (200, 0, 0), (227, 127, 127)), 1),
    "RGBa": lambda: (filled("RGBa", [(0, 0, 0, 0), (100, 50, 0, 128)]), rgb(255, (227, 177, 127)), 1),
    "LA": lambda: (filled("LA", [(0, 0), (100, 255), (100, 128)]), rgb(255, 100, 177), 1),
    "La": lambda: (filled("La", [(0, 0), (50, 128)]), rgb(255, 177), 1),
    "PA": lambda: (filled("PA", [(1, 0), (1, 255)]), rgb(255, (10, 20, 30)), 0),
}

# (mode, file suffix): formats that store the mode as is (checked on reopening), all lossless
FILE_CASES = [
    ("1", "png"), ("L", "png"), ("P", "png"), ("RGB", "png"), ("RGBA", "png"), ("LA", "png"), ("I;16", "png"),
    ("I;16", "tif"), ("I;16B", "tif"), ("I", "tif"), ("F", "tif"), ("CMYK", "tif"), ("YCbCr", "tif"),
    ("LAB", "tif"), ("PA", "tif"), ("RGBA", "tif"),
]


def assert_rgb(got, expected: np.ndarray, tol: int) -> None:
    assert got.mode == "RGB"
    diff = np.abs(np.asarray(got, dtype=np.int32) - expected.astype(np.int32))
    assert diff.max() <= tol, (np.asarray(got).tolist(), expected.tolist())


def test_every_pil_mode_has_a_rule_and_a_case():
    assert set(Image.MODES) <= images.SUPPORTED_MODES
    assert set(MODE_CASES) == set(Image.MODES)


@pytest.mark.parametrize("mode", sorted(MODE_CASES))
def test_mode_converts_to_the_rgb_the_model_should_see(mode):
    image, expected, tol = MODE_CASES[mode]()
    assert image.mode == mode
    assert_rgb(to_rgb(image), expected, tol)


@pytest.mark.parametrize("mode,suffix", FILE_CASES, ids=[f"{m}-{s}" for m, s in FILE_CASES])
def test_file_round_trip_per_mode(tmp_path, mode, suffix):
    image, expected, tol = MODE_CASES[mode]()
    path = tmp_path / f"x.{suffix}"
    image.save(path)
    with Image.open(path) as reopened:
        assert reopened.mode == mode  # the file really holds that mode
    assert_rgb(load_image(path, "data.jsonl:1"), expected, tol)


def test_16bit_png_is_scaled_not_clipped_to_white(tmp_path):
    """A real 16-bit greyscale PNG (PIL mode I;16): a full 0..65535 ramp. Clipping (PIL's plain
    convert) made 99.6% of it white; scaling keeps the ramp."""
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)[None, :].repeat(4, axis=0)  # [4, 256]
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    with Image.open(tmp_path / "ramp16.png") as im:
        assert im.mode == "I;16"
        assert (np.asarray(im.convert("RGB")) == 255).all(axis=2).mean() > 0.99  # the old behaviour
    got = np.asarray(load_image(tmp_path / "ramp16.png"))
    want = ((ramp.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    assert (got == want[..., None]).all()
    assert (got == 255).all(axis=2).mean() < 0.01


def test_rgba_png_is_composited_on_white(tmp_path):
    """Transparent pixels of a real RGBA PNG become the documented background, not black."""
    px = np.zeros((2, 3, 4), dtype=np.uint8)  # [H, W, RGBA]: transparent black
    px[0, 1] = (200, 0, 0, 255)
    px[0, 2] = (200, 0, 0, 128)
    Image.fromarray(px).save(tmp_path / "a.png")
    got = np.asarray(load_image(tmp_path / "a.png"), dtype=np.int32)
    assert BACKGROUND == (255, 255, 255)
    assert (got[1] == 255).all() and tuple(got[0, 0]) == BACKGROUND
    assert tuple(got[0, 1]) == (200, 0, 0)
    assert np.abs(got[0, 2] - (227, 127, 127)).max() <= 1


@pytest.mark.parametrize("mode,values,transparency,expected", [
    ("P", [0, 1], 1, rgb(0, 255)),  # palette entry 1 transparent
    ("L", [10, 20], 10, rgb(255, 20)),  # a greyscale colour key (PNG tRNS)
    ("RGB", [(1, 2, 3), (4, 5, 6)], (4, 5, 6), rgb((1, 2, 3), 255)),
    ("I;16", [1000, 40000], 1000, rgb(255, 156)),  # the key is in the file's 16-bit units
])
def test_transparency_key_is_composited_on_white(tmp_path, mode, values, transparency, expected):
    filled(mode, values).save(tmp_path / "t.png", transparency=transparency)
    with Image.open(tmp_path / "t.png") as im:
        assert im.mode == mode and "transparency" in im.info
    assert_rgb(load_image(tmp_path / "t.png"), expected, 0)


def test_palette_alpha_bytes_are_composited(tmp_path):
    """A palette PNG with per-entry alpha (tRNS as bytes): PIL's plain RGB conversion drops it."""
    im = filled("P", [0, 1, 2])
    im.putpalette([0, 0, 0, 10, 20, 30, 200, 0, 0] + [0] * (253 * 3))
    im.save(tmp_path / "p.png", transparency=bytes([0, 255, 128]))
    assert_rgb(load_image(tmp_path / "p.png"), rgb(255, (10, 20, 30), (227, 127, 127)), 1)


def test_float_outside_unit_range_is_clipped_and_nan_is_zero():
    assert_rgb(to_rgb(filled("F", [-3.0, 100.4, 300.0, float("nan")])), rgb(0, 100, 255, 0), 0)


def test_multi_frame_gif_uses_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with Image.open(tmp_path / "anim.gif") as im:
        assert im.n_frames == 2
    assert (np.asarray(load_image(tmp_path / "anim.gif")) == (255, 0, 0)).all()


def test_unsupported_mode_is_a_data_error_naming_the_mode(tmp_path, monkeypatch):
    Image.new("L", (4, 4)).save(tmp_path / "l.png")
    monkeypatch.setattr(images, "SUPPORTED_MODES", images.SUPPORTED_MODES - {"L"})
    with pytest.raises(DataError, match=r"^data.jsonl:3: image .*l\.png has mode 'L', which has no RGB rule"):
        load_image(tmp_path / "l.png", "data.jsonl:3")


def test_missing_and_unreadable_files_name_the_record(tmp_path):
    with pytest.raises(DataError, match=r"^d.jsonl:1: image file not found: .*nope\.png"):
        load_image(tmp_path / "nope.png", "d.jsonl:1")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"^d.jsonl:2: cannot read image .*bad\.png"):
        load_image(tmp_path / "bad.png", "d.jsonl:2")


# ------------------------------------------------------------------------------------------- EXIF


def jpeg_with_orientation(path: Path, value: int) -> Path:
    px = np.zeros((20, 40, 3), dtype=np.uint8)  # [H, W, 3]: wide, left half bright
    px[:, :20] = 220
    exif = Image.Exif()
    exif[images.ORIENTATION_TAG] = value
    Image.fromarray(px).save(path, exif=exif, quality=95)
    return path


def test_exif_orientation_is_not_applied_and_warned_once_per_file(tmp_path, caplog):
    path = jpeg_with_orientation(tmp_path / "rot.jpg", 6)  # a viewer would rotate it 90 degrees clockwise
    with Image.open(path) as im:
        stored = np.asarray(im.convert("RGB"))  # [20, 40, 3]
    with caplog.at_level(logging.WARNING, logger="src.data.images"):
        first = load_image(path, "d.jsonl:1")
        second = load_image(path, "d.jsonl:2")
    assert first.size == second.size == (40, 20)
    assert (np.asarray(first) == stored).all() and (np.asarray(second) == stored).all()
    warnings = [r for r in caplog.records if r.name == "src.data.images"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert str(path) in warnings[0].getMessage() and "Orientation=6" in warnings[0].getMessage()


def test_upright_exif_is_not_warned(tmp_path, caplog):
    path = jpeg_with_orientation(tmp_path / "up.jpg", 1)
    with caplog.at_level(logging.WARNING, logger="src.data.images"):
        load_image(path)
    assert not [r for r in caplog.records if r.name == "src.data.images"]


# ------------------------------------------------------------------------------------------ size


def test_size_mismatch_is_refused_with_both_sizes(tmp_path):
    Image.new("RGB", (640, 427)).save(tmp_path / "a.png")
    check_image_size(tmp_path / "a.png", 640, 427, "d.jsonl:4")  # matching: no error
    with pytest.raises(DataError) as e:
        check_image_size(tmp_path / "a.png", 1248, 832, "d.jsonl:4")
    assert str(e.value) == (
        f"d.jsonl:4: the record says 1248x832 (width x height) but {tmp_path / 'a.png'} is 640x427 (stored pixels, "
        "EXIF orientation not applied); fix the record's width/height or the image"
    )
    with pytest.raises(DataError, match="says 427x640"):  # width and height swapped
        check_image_size(tmp_path / "a.png", 427, 640, "d.jsonl:4")


def test_size_check_reads_the_header_only(tmp_path):
    """A PNG whose pixel data is cut off passes the size check (no decoding) but not the pixel load."""
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    check_image_size(tmp_path / "cut.png", 64, 64, "d.jsonl:1")
    with pytest.raises(DataError, match="cannot read image"):
        load_image(tmp_path / "cut.png", "d.jsonl:1")


def test_check_record_images_names_the_line(tmp_path):
    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    good = '{"images": ["a.png"], "width": 64, "height": 48, "objects": []}'
    (tmp_path / "d.jsonl").write_text(good + "\n" + good.replace('"width": 64', '"width": 65') + "\n")
    records, _ = load_jsonl(tmp_path / "d.jsonl")
    check_record_images(records[:1])
    with pytest.raises(DataError, match=r"d\.jsonl:2: the record says 65x48 \(width x height\) but .*a\.png is 64x48"):
        check_record_images(records)


def test_images_module_does_not_import_torch_or_transformers():
    code = (
        "import sys, src.data.images; "
        "bad = [m for m in ('transformers', 'torch') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
