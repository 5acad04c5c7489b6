"""Preprocessing matches the reference byte for byte; pixel mapping metadata; bad files give one-line errors."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from dust3r_ns.conventions import pixel_orig_to_net
from dust3r_ns.images import ImageError, images_from_arrays, load_images


def test_golden_preprocessing(golden_dir):
    ref = np.load(golden_dir / "load_images_uint8.npz")
    cases = json.loads((golden_dir / "golden.json").read_text())["load_images"]
    assert len(cases) == 12
    for key, info in cases.items():
        name, size = key.split("@")
        view = load_images([golden_dir / "images" / name], size=int(size))[0]
        assert view.rgb.shape == np.asarray(ref[key]).reshape(view.rgb.shape).shape
        assert np.array_equal(view.rgb, np.asarray(ref[key]).reshape(view.rgb.shape)), key
        assert list(view.img.shape) == info["shape"]
        assert view.true_shape.tolist() == info["true_shape"]
        expect = torch.from_numpy(view.rgb).permute(2, 0, 1)[None].float() / 255 * 2 - 1
        assert torch.allclose(view.img, expect, atol=1e-6)


@pytest.mark.parametrize("size,wh,full", [(512, (640, 480), False), (512, (333, 777), False), (224, (640, 480), False),
                                          (224, (300, 1024), False), (224, (640, 480), True), (224, (300, 1024), True)])
def test_transform_maps_original_pixels(size, wh, full):
    """A bright block at a known original position lands where `transform` says."""
    W, H = wh
    img = np.zeros((H, W, 3), np.uint8)
    u0, v0 = int(W * 0.55), int(H * 0.45)
    img[v0 - 6 : v0 + 7, u0 - 6 : u0 + 7] = 255
    view = images_from_arrays([img], size=size, full_frame=full)[0]
    mass = view.rgb[..., 0].astype(np.float64)
    vs, us = np.nonzero(mass > 0)
    w = mass[vs, us]
    centre_net = np.array([(us * w).sum() / w.sum(), (vs * w).sum() / w.sum()])
    predicted = pixel_orig_to_net(np.array([u0, v0], np.float64), view.transform)
    assert np.abs(centre_net - predicted).max() < 0.5
    assert tuple(view.orig_size) == (W, H)


def test_full_frame_keeps_the_sides_that_the_224_square_crop_drops():
    """full_frame at 224: short side 224, long side cropped to a multiple of 16 only (a 4:3 photo: 224x288 instead of
    224x224), so a mark near the left edge survives; square photos and size 512 are unchanged."""
    img = np.zeros((480, 640, 3), np.uint8)
    img[230:250, 40:60] = 255                                   # 40 px from the left edge: outside the square crop
    square, full = (images_from_arrays([img], size=224, full_frame=f)[0] for f in (False, True))
    assert square.rgb.shape == (224, 224, 3) and full.rgb.shape == (224, 288, 3)
    assert square.rgb.max() == 0 and full.rgb.max() > 200
    assert full.transform[2] == (299 - 288) // 2 and full.transform[3] == 0
    sq = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    for a, size in ((sq, 224), (img, 512), (sq, 512)):
        ref, ff = (images_from_arrays([a], size=size, full_frame=f)[0] for f in (False, True))
        assert np.array_equal(ref.rgb, ff.rgb) and np.array_equal(ref.transform, ff.transform)


def test_folder_skips_bad_files_with_warning(tmp_path):
    Image.fromarray(np.full((40, 60, 3), 128, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((40, 60, 3), 50, np.uint8)).save(tmp_path / "b.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "fake.png").write_text("not an image")
    (tmp_path / "notes.txt").write_text("ignored")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        views = load_images(tmp_path, size=224)
    assert [v.name for v in views] == ["a.png", "b.jpg"]
    assert [v.idx for v in views] == [0, 1]
    msgs = " ".join(str(w.message) for w in caught)
    assert "empty.jpg" in msgs and "fake.png" in msgs


@pytest.mark.parametrize("make,match", [
    (lambda p: p.write_bytes(b""), "empty file"),
    (lambda p: p.write_text("hello"), "not a readable image"),
    (lambda p: Image.fromarray(np.zeros((10, 30, 3), np.uint8)).save(p), "too small"),
    (lambda p: p.write_bytes(open(p.parent / "good.png", "rb").read()[:60]), "not a readable image"),
])
def test_bad_explicit_files_raise(tmp_path, make, match):
    Image.fromarray(np.full((64, 64, 3), 9, np.uint8)).save(tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    make(bad)
    with pytest.raises(ImageError, match=match) as e:
        load_images([tmp_path / "good.png", bad], size=224)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


def test_empty_folder_and_missing_file(tmp_path):
    with pytest.raises(ImageError, match="no images found"):
        load_images(tmp_path, size=512)
    with pytest.raises(ImageError, match="no such file"):
        load_images([tmp_path / "nope.jpg"], size=512)


def test_exif_orientation_applied(tmp_path):
    img = Image.fromarray(np.tile(np.arange(80, dtype=np.uint8)[None, :, None], (48, 1, 3)))  # 80 wide, 48 tall
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    view = load_images([tmp_path / "rot.jpg"], size=512)[0]
    assert tuple(view.orig_size) == (48, 80)  # upright: portrait
    assert view.true_shape[0, 0] > view.true_shape[0, 1]


def test_bad_size_and_arrays():
    img = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="224 or 512"):
        images_from_arrays([img], size=256)
    with pytest.raises(ImageError, match="too small"):
        images_from_arrays([np.zeros((8, 64, 3), np.uint8)], size=224)
    with pytest.raises(ImageError, match="uint8"):
        images_from_arrays([np.zeros((64, 64), np.float32)], size=224)
    views = images_from_arrays([img, img], size=224)
    assert [v.name for v in views] == ["image_000.png", "image_001.png"] and views[1].idx == 1


def test_extreme_aspect_named_and_skipped_in_folder(tmp_path):
    Image.fromarray(np.full((40, 60, 3), 128, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((20, 1200, 3), 128, np.uint8)).save(tmp_path / "strip.png")  # 512x9 after resize
    with pytest.raises(ImageError, match="aspect ratio") as e:
        load_images([tmp_path / "strip.png"], size=512)
    assert "strip.png" in str(e.value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        views = load_images(tmp_path, size=512)
    assert [v.name for v in views] == ["a.png"] and "strip.png" in str(caught[0].message)


def test_heic_without_extra_is_clear(tmp_path, monkeypatch):
    import dust3r_ns.images as images

    monkeypatch.setattr(images, "register_heif", lambda: False)
    (tmp_path / "x.heic").write_bytes(b"\0" * 64)
    with pytest.raises(ImageError, match="HEIC") as e:
        load_images([tmp_path / "x.heic"], size=512)
    assert "x.heic" in str(e.value)


def test_rgba_and_grayscale_become_rgb(tmp_path):
    Image.fromarray(np.full((48, 64, 4), 200, np.uint8), "RGBA").save(tmp_path / "a.png")
    Image.fromarray(np.full((48, 64), 77, np.uint8), "L").save(tmp_path / "b.bmp")
    a, b = load_images(tmp_path, size=224)
    assert a.rgb.shape == (224, 224, 3) and b.rgb.shape == (224, 224, 3)
    assert abs(int(b.rgb[100, 100, 0]) - 77) <= 1 and b.rgb[..., 0].tolist() == b.rgb[..., 2].tolist()


@pytest.mark.parametrize("ext,kw", [(".webp", {"lossless": True}), (".tiff", {}), (".bmp", {}), (".jpeg", {"quality": 100})])
def test_formats_decode(tmp_path, ext, kw):
    yy, xx = np.mgrid[0:48, 0:64]
    arr = np.stack([xx * 4, yy * 5, 255 - xx * 2], -1).astype(np.uint8)  # smooth: JPEG keeps it
    Image.fromarray(arr).save(tmp_path / f"x{ext.upper()}", **kw)  # upper-case extension is found too
    (view,) = load_images(tmp_path, size=224)
    ref = images_from_arrays([arr], size=224)[0]
    tol = 0 if ext != ".jpeg" else 3
    assert np.abs(view.rgb.astype(int) - ref.rgb.astype(int)).mean() <= tol
    assert view.name == f"x{ext.upper()}"
