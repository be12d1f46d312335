"""load_images: conversions, fit, sources, and a generated corpus of bad inputs."""

import io

import numpy as np
import pytest
from PIL import Image

from vaeprobe import ImageLoadError, load_images
from vaeprobe.data.images import fit_to_factor, read_image


def _photo(h=40, w=56, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((h, w, 3)) * 255).astype(np.uint8)


@pytest.fixture
def corpus(tmp_path):
    """Good images in every awkward mode, and one file for every kind of bad input."""
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir(), bad.mkdir()
    arr = _photo()
    Image.fromarray(arr).save(good / "rgb.png")
    Image.fromarray(arr).convert("L").save(good / "gray.png")
    Image.fromarray(arr).convert("LA").save(good / "gray_alpha.png")
    rgba = Image.fromarray(arr).convert("RGBA")
    rgba.putalpha(0)  # fully transparent: must come out as the white background
    rgba.save(good / "transparent.png")
    Image.fromarray(arr).convert("P", palette=Image.Palette.ADAPTIVE).save(good / "palette.png")
    pt = Image.fromarray(arr).convert("P", palette=Image.Palette.ADAPTIVE)
    pt.info["transparency"] = 0
    pt.save(good / "palette_transparency.png", transparency=0)
    Image.fromarray((np.linspace(0, 65535, 40 * 56).reshape(40, 56)).astype(np.uint16)).save(good / "sixteen.png")
    Image.fromarray(arr).convert("CMYK").save(good / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW on display
    Image.fromarray(arr).save(good / "rotated.jpg", exif=exif.tobytes())
    Image.fromarray(arr).save(good / "photo.webp")

    (bad / "zero.png").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(_photo(64, 64)).save(buf, "PNG")
    (bad / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    buf = io.BytesIO()
    Image.fromarray(_photo(64, 64)).save(buf, "JPEG")
    (bad / "cut_jpeg.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    (bad / "text.png").write_text("this is not an image\n")
    Image.new("1", (12000, 12000)).save(bad / "bomb.png")  # 144 Mpx in a few KB
    Image.fromarray(_photo(4, 5)).save(bad / "tiny.png")
    (bad / "folder.png").mkdir()
    return good, bad


GOOD = ["rgb", "gray", "gray_alpha", "transparent", "palette", "palette_transparency", "sixteen", "cmyk", "rotated",
        "photo"]
BAD = {"zero": "empty file", "truncated": "truncated", "cut_jpeg": "truncated", "text": "not an image", "bomb": "decompression bomb",
       "tiny": "smaller than one latent cell", "folder": "directory"}


def test_good_modes_convert_to_rgb(corpus):
    good, _ = corpus
    batch = load_images(good, factor=8)
    assert sorted(batch.names) == sorted(GOOD) and not batch.skipped
    for img in batch:
        assert img.array.dtype == np.float32 and img.array.ndim == 3 and img.array.shape[2] == 3
        assert 0.0 <= img.array.min() and img.array.max() <= 1.0
        assert img.array.shape[0] % 8 == 0 and img.array.shape[1] % 8 == 0
    by = {im.name: im for im in batch}
    assert np.allclose(by["transparent"].array, 1.0)  # composited over white
    gray = by["gray"].array
    assert np.array_equal(gray[..., 0], gray[..., 1])
    six = by["sixteen"].array  # 16-bit keeps its range: a ramp from 0 to 1, not clipped at 255/65535
    assert six.min() < 0.01 and six.max() > 0.95 and len(np.unique(six)) > 256
    assert by["rotated"].original_size == (40, 56)  # EXIF orientation applied: 56x40 stored, 40x56 shown
    assert by["rotated"].array.shape[:2] == (56, 40)
    assert np.abs(by["cmyk"].array - by["rgb"].array).mean() < 0.08


def test_every_bad_input_gives_one_line_and_the_batch_goes_on(corpus, tmp_path):
    good, bad = corpus
    files = sorted(str(p) for p in good.iterdir()) + sorted(str(p) for p in bad.iterdir())
    lines = []
    batch = load_images(files, factor=8, max_pixels=100_000_000, report=lambda s: lines.append(str(s)))
    assert sorted(batch.names) == sorted(GOOD)
    assert len(batch.skipped) == len(BAD) == len(lines)
    for s in batch.skipped:
        stem = s.source.rsplit("/", 1)[-1].split(".")[0]
        assert BAD[stem] in s.reason, (stem, s.reason)
    for line in lines:
        assert "\n" not in line and line.startswith(str(bad))
    summary = batch.summary()
    assert summary.splitlines()[0] == f"loaded {len(GOOD)} image(s), skipped {len(BAD)}"


def test_read_image_raises_with_reason(corpus):
    _, bad = corpus
    with pytest.raises(ImageLoadError, match="empty file"):
        read_image(bad / "zero.png")


def test_size_policies():
    a = np.random.default_rng(0).random((37, 50, 3)).astype(np.float32)
    crop = fit_to_factor(a, 8, fit="crop")
    assert crop.shape == (32, 48, 3) and np.array_equal(crop, a[2:34, 1:49])
    assert fit_to_factor(a, 8, fit="resize").shape == (40, 48, 3)
    assert fit_to_factor(a, 8, size=16).shape == (16, 16, 3)
    with pytest.raises(ValueError, match="multiple"):
        fit_to_factor(a, 8, size=20)


def test_glob_and_builtin_and_dataset(corpus):
    good, _ = corpus
    assert len(load_images(str(good / "*.png"), factor=8)) == 7
    held = load_images("builtin:photos-heldout", size=64)
    train = load_images("builtin:photos-train", size=64)
    assert len(held) >= 5 and len(train) >= 5 and not set(held.names) & set(train.names)
    with pytest.raises(ImageLoadError, match="neither"):
        load_images("no/such/place.png")

    import datasets

    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(_photo(seed=i)) for i in range(3)]})
    ds = ds.cast_column("image", datasets.Image())
    batch = load_images(ds, factor=8)
    assert len(batch) == 3 and batch[0].array.shape == (40, 56, 3)
    records = [{"image": Image.fromarray(_photo())}, {"image": "not an image"}, {"other": 1}]
    mixed = load_images(records, factor=8, report=lambda s: None)
    assert len(mixed) == 1 and len(mixed.skipped) == 2
