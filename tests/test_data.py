"""Sources, splits, decoding of every image mode, and preprocessing."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mae.data import (
    ImageDataset,
    ImageError,
    Preprocessing,
    collate_skipping_bad,
    decode_image,
    load_source,
    read_image,
    stratified_split,
    to_channels,
)


@pytest.mark.parametrize("name,count,shape,classes", [
    ("mnist5k", 5000, (28, 28), 10), ("digits", 1797, (8, 8), 10), ("photos", 21, None, 0),
])
def test_bundled_sources(name, count, shape, classes):
    s = load_source(name)
    assert len(s) == count and len(s.classes) == classes
    img = s.read(0)
    assert img.dtype == np.uint8
    if shape:
        assert img.shape == shape
    assert len(set(s.ids)) == count


def test_stratified_split_is_seeded_and_stratified():
    labels = load_source("mnist5k").labels
    train, val = stratified_split(labels, 0.2, seed=0)
    assert len(train) == 4000 and len(val) == 1000
    assert set(train).isdisjoint(val)
    assert np.bincount(labels[val]).tolist() == [100] * 10
    again = stratified_split(labels, 0.2, seed=0)
    assert np.array_equal(again[1], val)
    assert not np.array_equal(stratified_split(labels, 0.2, seed=1)[1], val)


def test_folder_source_with_class_subfolders(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls / "deep").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((10, 12, 3), i * 40, np.uint8)).save(tmp_path / cls / "deep" / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    s = load_source(tmp_path)
    assert len(s) == 6 and s.classes == ["cat", "dog"] and s.labelled
    assert sorted(s.labels.tolist()) == [0, 0, 0, 1, 1, 1]


def test_folder_without_subfolders_is_unlabelled(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    s = load_source(tmp_path)
    assert s.classes == [] and s.labels.tolist() == [-1]


def test_missing_source_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a bundled set"):
        load_source(tmp_path / "nope")


def _encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode,fmt,expect_shape", [
    ("L", "PNG", (6, 5)), ("LA", "PNG", (6, 5, 2)), ("P", "PNG", (6, 5, 3)), ("RGBA", "PNG", (6, 5, 4)),
    ("CMYK", "JPEG", (6, 5, 3)), ("I;16", "PNG", (6, 5)), ("1", "PNG", (6, 5)), ("RGB", "WEBP", (6, 5, 3)),
])
def test_decode_every_mode(mode, fmt, expect_shape):
    im = Image.new(mode, (5, 6))
    arr = decode_image(_encode(im, fmt), name="x")
    assert arr.dtype == np.uint8 and arr.shape == expect_shape
    for channels in (1, 3):
        t = to_channels(arr, channels)
        assert t.shape == (channels, 6, 5) and float(t.min()) >= 0 and float(t.max()) <= 1


def test_decode_sixteen_bit_scales_to_full_range():
    arr = np.array([[0, 65535]], np.uint16)
    im = Image.fromarray(arr)
    out = decode_image(_encode(im))
    assert out.tolist() == [[0, 255]]


def test_decode_animated_takes_first_frame():
    frames = [Image.new("RGB", (4, 4), c) for c in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    arr = decode_image(buf.getvalue())
    assert arr.shape == (4, 4, 3) and arr[0, 0, 0] > 200 and arr[0, 0, 2] < 50


@pytest.mark.parametrize("data,message", [
    (b"definitely not an image", "not a recognised image format"),
    (_encode(Image.new("RGB", (64, 64), "red"))[:80], "corrupt or truncated"),
])
def test_bad_bytes_raise_image_error(data, message):
    with pytest.raises(ImageError, match=message):
        decode_image(data, name="upload.png")


def test_pixel_limit():
    with pytest.raises(ImageError, match="over the limit"):
        decode_image(_encode(Image.new("L", (100, 100))), max_pixels=5000)


def test_npy_multichannel(tmp_path):
    arr = np.random.default_rng(0).random((10, 12, 5)).astype(np.float32)
    np.save(tmp_path / "x.npy", arr)
    t = to_channels(read_image(tmp_path / "x.npy"), 5)
    assert t.shape == (5, 10, 12) and torch.allclose(t, torch.from_numpy(arr).permute(2, 0, 1))
    with pytest.raises(ImageError, match="5 channels; the model takes 3"):
        to_channels(arr, 3)


def test_preprocessing_resizes_and_crops_from_config():
    pre = Preprocessing((3, 32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.875)
    out = pre(np.full((50, 100), 255, np.uint8))
    assert out.shape == (3, 32, 32) and torch.allclose(out, torch.ones_like(out))
    wide = Preprocessing((1, 16, 48), (0.0,), (1.0,), "bilinear", 1.0)
    assert wide(np.zeros((30, 30, 3), np.uint8)).shape == (1, 16, 48)


def test_corrupt_file_is_skipped_and_counted(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((8, 8), i * 50, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    s = load_source(tmp_path)
    ds = ImageDataset(s, range(len(s)), Preprocessing((1, 8, 8), (0.0,), (1.0,), crop_pct=1.0))
    with pytest.warns(UserWarning, match="3.png"):
        batch = [ds[i] for i in range(len(ds))]
    images, labels, skipped = collate_skipping_bad(batch)
    assert images.shape == (3, 1, 8, 8) and skipped == 1
    images, labels, skipped = collate_skipping_bad([None, None])  # an all-bad batch is empty (the loop decides)
    assert len(images) == 0 and len(labels) == 0 and skipped == 2


def test_augmentation_is_seeded_per_sample_and_epoch():
    from mae.config import get_preset
    from mae.data import PretrainTransform

    s = load_source("digits")
    ds = ImageDataset(s, range(10), PretrainTransform(get_preset("mae_vit_tiny_patch4_32")), seed=3)
    a, b, c = ds[(4, 0)][0], ds[(4, 0)][0], ds[(4, 1)][0]
    assert torch.equal(a, b) and not torch.equal(a, c)
