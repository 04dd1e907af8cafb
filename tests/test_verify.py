"""The pixel check of near-duplicate candidates (retrieval.verify) on real photographs and their edited copies."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bench.retrieval import edit
from mae.images import Box, load_pixels
from mae.sources import PHOTOS, load_source
from retrieval.verify import PIXEL_THRESHOLD, SIDE, PixelCheck, aligned_correlation, thumbnail

TEXTURES = {"brick", "grass", "gravel"}  # all fine detail: a 24-pixel thumbnail of them is aliasing, not a picture


def thumb(arr: np.ndarray) -> np.ndarray:
    grey = load_pixels(arr, lambda h, w: Box(0, 0, h, w), (SIDE, SIDE), 1, interpolation="bilinear")[0]
    return grey.astype(np.float32) / 255 if grey.dtype == np.uint8 else grey


@pytest.fixture(scope="module")
def photos():
    source = load_source("photos")
    return {name: source.read(i) for i, name in enumerate(PHOTOS) if name != "chelsea"}  # chelsea is cat


def scores(originals: list[np.ndarray], copies: list[np.ndarray], iterations: int | None = None) -> np.ndarray:
    a, b = np.stack([thumb(x) for x in originals]), np.stack([thumb(x) for x in copies])
    return aligned_correlation(a, b) if iterations is None else aligned_correlation(a, b, iterations)


def test_copies_line_up_and_distinct_photographs_do_not(photos):
    rng = np.random.default_rng(0)
    pictures = [a for name, a in photos.items() if name not in TEXTURES]
    # Measured (README): resized and JPEG-30 copies 17 of 17, recoloured 16 (a page whose white saturates), 90%
    # crops 15, tilted 8 (the black corners a rotation adds count against it).
    for how, at_least in (("resize", 1.0), ("jpeg30", 1.0), ("jitter", 0.9), ("crop90", 0.85), ("rotate", 0.4)):
        copies = [edit(a, how, rng) for a in pictures]
        aligned = scores(pictures, copies)
        assert (aligned >= PIXEL_THRESHOLD).mean() >= at_least, (how, aligned.round(4))
        if how in ("crop90", "rotate"):
            as_they_are = scores(pictures, copies, iterations=0)
            assert (aligned > as_they_are + 0.01).mean() >= 0.75, f"{how}: the fitted transform lines them up"
    names = list(photos)
    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    distinct = scores([photos[names[i]] for i, _ in pairs], [photos[names[j]] for _, j in pairs])
    assert distinct.max() < PIXEL_THRESHOLD - 0.05, max(zip(distinct, pairs))


def test_a_tilted_digit_lines_up_and_a_look_alike_does_not():
    """Digits are where the cosine fails (README): a copy tilted 6 degrees lines up, other 1s hardly ever do."""
    source = load_source("mnist5k")
    ones = [i for i in range(len(source)) if source.labels[i] == 1][:40]
    digit = source.read(ones[0])
    tilted = np.asarray(Image.fromarray(digit).rotate(6, Image.Resampling.BILINEAR))
    assert scores([digit], [tilted])[0] >= PIXEL_THRESHOLD > scores([digit], [tilted], iterations=0)[0]
    others = scores([digit] * 39, [source.read(i) for i in ones[1:]])
    assert (others >= PIXEL_THRESHOLD).mean() <= 0.1, others.round(4)  # 2 of 39 ones pass: 1s are alike


def test_pixel_check_keeps_lined_up_pairs_and_names_unreadable_files(tmp_path, photos):
    files = {}
    for n, name in enumerate(["camera", "coffee", "astronaut"], 1):
        files[n] = tmp_path / f"{name}.png"
        Image.fromarray(photos[name]).save(files[n])
    small = Image.fromarray(photos["camera"])
    files[4] = tmp_path / "camera-small.jpg"
    small.resize((small.width // 2, small.height // 2)).save(files[4], quality=40)
    files[5] = tmp_path / "broken.png"
    files[5].write_bytes(files[2].read_bytes()[:300])
    check = PixelCheck(lambda ids: {i: str(files[i]) for i in ids if i in files})
    kept = check(np.array([[1, 4], [1, 2], [2, 3], [1, 5], [4, 6]]))
    assert kept.tolist() == [True, False, False, False, False]
    assert sorted(check.unreadable) == [5, 6] and "broken.png" in check.unreadable[5]
    assert check.unreadable[6] == "no longer in the index"
    assert set(check.scores) == {(1, 4), (1, 2), (2, 3)} and check.scores[(1, 4)] > 0.99
    assert thumbnail(files[1]).shape == (SIDE, SIDE)
    with pytest.raises(ValueError, match="correlation"):
        PixelCheck(lambda ids: {}, threshold=2.0)
    with pytest.raises(ValueError, match=r"\(P, S, S\)"):
        aligned_correlation(np.zeros((2, 8, 8)), np.zeros((2, 8, 9)))
    assert aligned_correlation(np.zeros((0, 8, 8)), np.zeros((0, 8, 8))).shape == (0,)
