"""Sources, splits, decoding of every image mode, and preprocessing."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mae.datasets import ImageDataset, collate_skipping_bad
from mae.images import ImageError, Preprocessing, decode_image, read_image, to_channels
from mae.sources import load_source, stratified_split


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
    from training.augment import PretrainTransform

    s = load_source("digits")
    ds = ImageDataset(s, range(10), PretrainTransform(get_preset("mae_vit_tiny_patch4_32")), seed=3)
    a, b, c = ds[(4, 0)][0], ds[(4, 0)][0], ds[(4, 1)][0]
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------------------------- the uint8 fast path


def _jpeg(arr: np.ndarray, quality: int = 90) -> bytes:
    return _encode(Image.fromarray(arr), "JPEG", quality=quality)


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth, photo-like RGB image (JPEG and resampling errors on noise would say nothing)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    chans = [np.sin(x / rng.uniform(20, 60) + rng.uniform(0, 6)) + np.cos(y / rng.uniform(20, 60)) for _ in range(3)]
    return ((np.stack(chans, -1) + 2) / 4 * 255).clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("channels", [3, 1])
def test_fast_path_equals_general_path_on_the_same_box(channels):
    """uint8 crop + resize (with a reduced-scale JPEG decode) vs the whole image in float: the same box gives the
    same pixels within a few levels of 255."""
    import random

    from mae.images import EncodedImage, load_pixels, random_resized_crop_box

    item = EncodedImage(_jpeg(_photo(600, 800)), "photo.jpg")
    for seed in range(4):
        def box(h, w, seed=seed):
            return random_resized_crop_box(h, w, (0.2, 1.0), (3 / 4, 4 / 3), random.Random(seed))

        fast = load_pixels(item, box, (64, 64), channels, flip=seed % 2 == 1)
        general = load_pixels(item, box, (64, 64), channels, flip=seed % 2 == 1, fast=False)
        assert fast.dtype == np.uint8 and fast.shape == (channels, 64, 64)
        assert general.dtype == np.float32 and general.shape == (channels, 64, 64)
        diff = np.abs(fast / 255.0 - general)
        assert diff.mean() < 1.5 / 255 and diff.max() < 12 / 255, (seed, diff.mean() * 255, diff.max() * 255)


def test_jpeg_draft_decodes_at_reduced_scale_only_when_the_box_allows(monkeypatch):
    from PIL import JpegImagePlugin

    from mae.images import EncodedImage, Preprocessing

    calls = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        got = original(self, mode, size)
        calls.append(got[1][2] / self.size[0] if got else None)  # after draft: scale of the stored image
        return got

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    pre = Preprocessing((3, 32, 32), (0.5,) * 3, (0.5,) * 3, "bicubic", 1.0)
    big = pre.load(EncodedImage(_jpeg(_photo(1000, 1500)), "big.jpg"), draft=True)
    assert calls and calls[-1] is not None, "a 1000 px JPEG cropped to 32 px must be decoded at 1/8 scale"
    calls.clear()
    pre.load(EncodedImage(_jpeg(_photo(40, 50)), "small.jpg"), draft=True)
    assert not calls, "a JPEG barely larger than the output must be decoded at full scale"
    exact = pre.load(EncodedImage(_jpeg(_photo(1000, 1500)), "big.jpg"))  # eval default: full scale, as serving
    assert not calls
    assert np.abs(big.astype(int) - exact.astype(int)).mean() < 2.0  # the DCT-scaled decode is a fine prefilter


@pytest.mark.parametrize("mode,fmt", [("RGB", "JPEG"), ("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"),
                                      ("I;16", "PNG"), ("LA", "PNG"), ("RGB", "WEBP")])
def test_eval_pixels_of_a_file_equal_those_of_its_decoded_array(tmp_path, mode, fmt):
    """What mae embed reads from a file is what the server computes from the decoded upload, bit for bit."""
    from mae.images import EncodedImage

    base = Image.fromarray(_photo(70, 90))
    grey16 = np.asarray(base.convert("L")).astype(np.uint16) * 257
    im = base.convert(mode) if mode != "I;16" else Image.fromarray(grey16)
    data = _encode(im, fmt)
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(data)
    for channels in (3, 1):
        pre = Preprocessing((channels, 32, 32), (0.5,) * channels, (0.25,) * channels, "bicubic", 0.875)
        from_file = pre.load(path)
        assert from_file.dtype == np.uint8
        assert np.array_equal(from_file, pre.load(EncodedImage(data, "x")))
        assert np.array_equal(pre.normalize(from_file), pre(decode_image(data)).numpy())


def test_uint8_transport_and_device_normalisation_match_the_eval_preprocessing():
    """Workers ship uint8; Normalize on the device gives bit-for-bit what Preprocessing (CPU, numpy) gives."""
    from mae.datasets import Normalize

    pre = Preprocessing((3, 24, 24), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic", 0.875)
    s = load_source("photos")
    ds = ImageDataset(s, range(4), pre)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_skipping_bad)
    images, _, skipped = next(iter(loader))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 24, 24) and skipped == 0
    on_device = Normalize(pre.mean, pre.std)(images, "cpu")
    expected = torch.stack([pre(s.read(i)) for i in range(4)])
    assert torch.equal(on_device, expected)
    assert np.array_equal(pre.pixels([s.read(i) for i in range(4)]), expected.numpy())


def test_crops_are_the_same_for_any_worker_count():
    from mae.config import get_preset
    from training.augment import PretrainTransform

    ds = ImageDataset(load_source("digits"), range(16), PretrainTransform(get_preset("mae_vit_tiny_patch4_32")),
                      seed=5)
    keys = [(i, 3) for i in range(16)]

    def batches(workers):
        loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=keys, num_workers=workers,
                                             collate_fn=collate_skipping_bad)
        return torch.cat([b[0] for b in loader])

    one, two = batches(0), batches(2)
    assert one.dtype == torch.uint8 and torch.equal(one, two)
    assert not torch.equal(one, torch.stack([ds[(i, 4)][0] for i in range(16)]))  # another epoch, other crops


def test_gpu_decode_code_runs_on_a_cpu_and_matches_the_cpu_path(tmp_path):
    """data.decode=gpu: workers draw the same boxes and ship JPEG bytes; decode_on_device (nvjpeg on CUDA) is
    exercised here on the CPU and agrees with the CPU path; PNGs fall back to CPU decoding in the worker."""
    import random

    from mae.config import get_preset
    from mae.datasets import JpegCrop, Normalize, PendingDecode, decode_on_device
    from training.augment import PretrainTransform

    cfg = get_preset("mae_vit_tiny_patch4_32")
    (tmp_path / "a.jpg").write_bytes(_jpeg(_photo(120, 160)))
    Image.fromarray(_photo(90, 70, 1)).save(tmp_path / "b.png")
    cpu, gpu = PretrainTransform(cfg), PretrainTransform(cfg.override(["data.decode=gpu"]))
    crop = gpu(tmp_path / "a.jpg", random.Random(1))
    assert isinstance(crop, JpegCrop)
    png = gpu(tmp_path / "b.png", random.Random(2))
    assert isinstance(png, np.ndarray) and png.dtype == np.uint8
    batch, _, _ = collate_skipping_bad([(crop, 0), (torch.from_numpy(png), 1)])
    assert isinstance(batch, PendingDecode)
    decoded = decode_on_device(batch.items, (32, 32), 3, "bicubic", torch.device("cpu"))
    reference = torch.from_numpy(cpu(tmp_path / "a.jpg", random.Random(1))).float() / 255
    assert decoded.shape == (2, 3, 32, 32)
    assert (decoded[0] - reference).abs().mean() < 2 / 255 and (decoded[0] - reference).abs().max() < 16 / 255
    assert torch.equal(decoded[1], torch.from_numpy(png).float() / 255)
    x = Normalize(cpu.mean, cpu.std, (32, 32))(batch, "cpu")
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32


def test_gpu_decode_is_refused_without_a_gpu(tmp_path):
    from tests.conftest import run_cli, tiny_sets

    proc = run_cli("pretrain", "--data", "digits", "--out", str(tmp_path / "r"), "--steps", "1",
                   *tiny_sets("data.decode=gpu"), check=False)
    assert proc.returncode == 1 and "data.decode=gpu" in proc.stderr and "set data.decode=cpu" in proc.stderr
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------------------- bad images


def test_pixel_limit_applies_to_training_decoding(tmp_path):
    """The serving default (40 MP) bounds every decoder, from the header, for images and .npy arrays alike."""
    from mae.images import MAX_IMAGE_PIXELS, EncodedImage, ImageTooLargeError, load_pixels

    assert MAX_IMAGE_PIXELS == 40_000_000
    big = EncodedImage(_encode(Image.new("L", (3000, 2000)), "PNG"), "big.png")
    box = Preprocessing((1, 8, 8), (0.0,), (1.0,), crop_pct=1.0).box
    with pytest.raises(ImageTooLargeError, match="big.png: 3000x2000 pixels is over the limit of 5000000"):
        load_pixels(big, box, (8, 8), 1, max_pixels=5_000_000)
    np.save(tmp_path / "wide.npy", np.zeros((3000, 2000, 2), np.float32))
    with pytest.raises(ImageTooLargeError, match="wide.npy"):
        read_image(tmp_path / "wide.npy", max_pixels=5_000_000)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_arrays_are_bad_images(tmp_path, value):
    arr = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    arr[2, 3, 1] = value
    np.save(tmp_path / "bad.npy", arr)
    with pytest.raises(ImageError, match=r"bad.npy: 1 non-finite value\(s\)"):
        read_image(tmp_path / "bad.npy")


def test_symlink_loop_is_listed_and_skipped(tmp_path):
    import os
    import warnings as w

    (tmp_path / "a").mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), i * 50, np.uint8)).save(tmp_path / "a" / f"{i}.png")
    os.symlink("loop.png", tmp_path / "a" / "loop.png")  # a file symlink to itself
    os.symlink("..", tmp_path / "a" / "up")  # a folder symlink back up the tree
    with w.catch_warnings(record=True) as caught:
        w.simplefilter("always")
        s = load_source(tmp_path)
    assert [p.name for p in s.items] == ["0.png", "1.png", "2.png", "loop.png"]
    assert any("a/up" in str(c.message) for c in caught)
    ds = ImageDataset(s, range(len(s)), Preprocessing((1, 8, 8), (0.0,), (1.0,), crop_pct=1.0))
    with pytest.warns(UserWarning, match="loop.png: cannot read"):
        images, _, skipped = collate_skipping_bad([ds[i] for i in range(len(ds))])
    assert len(images) == 3 and skipped == 1


# ----------------------------------------------------------------------------------------------- sources


def test_folder_listing_is_cached_until_a_folder_changes(tmp_path, monkeypatch):
    import os
    import time

    from mae.sources import folder_listing

    monkeypatch.setenv("MAE_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "data"
    for c in ("x", "y"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / c / f"{i}.png")
    old = time.time() - 60  # a listing of folders modified just now is not trusted (coarse mtime clocks)
    for d in (root, root / "x", root / "y"):
        os.utime(d, (old, old))
    first = folder_listing(root)
    assert not first.cached and len(first.files) == 4 and first.labels == ["x", "x", "y", "y"]
    again = folder_listing(root)
    assert again.cached and again.files == first.files
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "y" / "2.png")  # y's mtime moves
    changed = folder_listing(root)
    assert not changed.cached and len(changed.files) == 5


def test_list_file_source(tmp_path):
    for i in range(4):
        Image.fromarray(np.full((6, 6), i * 60, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "list.txt").write_text("# two classes\n0.png\tcat\n1.png\tdog\n\n" + f"{tmp_path / '2.png'}\tcat\n")
    s = load_source(tmp_path / "list.txt")
    assert len(s) == 3 and s.classes == ["cat", "dog"] and s.labels.tolist() == [0, 1, 0] and s.labelled
    (tmp_path / "mixed.txt").write_text("0.png\tcat\n1.png\n")
    with pytest.raises(ValueError, match="label every line or none"):
        load_source(tmp_path / "mixed.txt")


def test_exif_rotation_is_applied_before_the_box_is_chosen():
    """A phone photo stored sideways (EXIF orientation 6): the fast path chooses its box on the upright image, as
    the general path (decode, rotate, then crop) does."""
    from mae.images import EncodedImage, load_pixels

    upright = _photo(60, 90)  # (H, W) = (60, 90) as people see it
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # stored 90 x 60
    exif = Image.Exif()
    exif[0x0112] = 6
    item = EncodedImage(_encode(stored, "JPEG", quality=95, exif=exif.tobytes()), "phone.jpg")
    assert decode_image(item.data).shape == (60, 90, 3)

    def box(h, w):
        assert (h, w) == (60, 90)
        return (10, 20, 40, 60)

    fast = load_pixels(item, box, (16, 16), 3, engine="torch")
    general = load_pixels(item, box, (16, 16), 3, fast=False)
    assert np.abs(fast / 255.0 - general).mean() < 3 / 255


def test_open_data_joins_image_inputs_and_keeps_label_names(tmp_path):
    """``mae embed`` / ``mae index build`` inputs: folders, lists and single files, in order, labels by name."""
    from mae.errors import NotFoundError, UsageError, UserError
    from mae.sources import list_images, open_data

    for cls in ("b", "c"):
        (tmp_path / "dir" / cls).mkdir(parents=True)
        Image.fromarray(np.zeros((6, 6), np.uint8)).save(tmp_path / "dir" / cls / "x.png")
    Image.fromarray(np.zeros((6, 6), np.uint8)).save(tmp_path / "alone.bin", format="PNG")  # any name: decoding tells
    (tmp_path / "list.txt").write_text("dir/b/x.png\ta\n")
    inputs = [tmp_path / "list.txt", tmp_path / "dir", tmp_path / "alone.bin"]
    s = open_data(inputs, files=True)
    assert s.classes == ["a", "b", "c"] and s.label_names() == ["a", "b", "c", None]
    files = [tmp_path / "dir" / "b" / "x.png", tmp_path / "dir" / "b" / "x.png", tmp_path / "dir" / "c" / "x.png"]
    assert list_images(inputs) == ([*files, tmp_path / "alone.bin"], ["a", "b", "c", None])
    with pytest.raises(NotFoundError, match="bundled dataset, not a folder"):
        open_data(["digits"], files=True)
    with pytest.raises(UsageError, match="only input"):
        open_data([tmp_path / "dir", tmp_path / "x.tar"], files=True)
    with pytest.raises(UsageError, match="streamed"):  # mae data pack / export need items by index
        load_source(tmp_path / "train-{000000..000003}.tar")
    with pytest.raises(UsageError, match="is a file"):  # --data wants a collection, not one image
        open_data(tmp_path / "alone.bin")
    with pytest.raises(UserError):  # what the CLI prints as one line
        load_source(tmp_path / "nope")


def test_split_data_is_the_stratified_split_of_data_config():
    from mae.config import DataConfig
    from mae.sources import split_data

    split = split_data("digits")
    train, val = stratified_split(split.source.labels, DataConfig().val_fraction, DataConfig().split_seed)
    assert np.array_equal(split.train, train) and np.array_equal(split.val, val) and split.val_size == len(val)
    assert not split.sharded and split.labelled and split.num_classes == 10
    other = split_data(split.source, 0.5, 3)
    assert other.val_size == len(stratified_split(split.source.labels, 0.5, 3)[1])
