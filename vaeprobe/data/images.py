"""Reading images robustly: folders, globs, file lists, Hugging Face datasets, and the builtin photo set.

Every image comes out as float32 RGB in [0, 1], shape HxWx3, with EXIF orientation applied and its size brought
to a multiple of the VAE's downsampling factor. A file that cannot be used is reported (path and reason, one
line each) and skipped; the batch goes on.

The two conversions every layer shares live here too: :func:`to_unit` maps a decoded tensor from the VAE range
[-1, 1] to [0, 1], and :func:`luma` is the BT.601 luma of an RGB tensor.
"""

from __future__ import annotations

import glob as _glob
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vaeprobe.errors import ImageLoadError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".tga"}
DEFAULT_MAX_PIXELS = 64_000_000
"""Images with more pixels are refused as possible decompression bombs (``max_pixels`` changes it)."""

LUMA_WEIGHTS = (0.299, 0.587, 0.114)
"""BT.601 luma weights for R, G, B (:func:`luma`)."""

FIT_POLICIES = ("crop", "resize")
DEFAULT_FIT = "crop"
"""Default fit: center-crop to the largest multiple of the factor (drops at most factor-1 px a side)."""


@dataclass
class LoadedImage:
    """One image ready for a VAE.

    Attributes
    ----------
    name : str
        The file stem (``~1``, ``~2``, ... appended to repeated stems), the photo's name, or the record index.
    array : numpy.ndarray
        float32 HxWx3 in [0, 1], sides multiples of the VAE factor.
    source : str
        Where it came from: the path, ``builtin:SET/NAME`` or ``record I``.
    original_size : (int, int)
        ``(width, height)`` as stored, after EXIF orientation.

    Examples
    --------
    >>> img = LoadedImage("grey", np.full((8, 16, 3), 0.5, np.float32), "memory", (16, 8))
    >>> img.tensor().shape, float(img.tensor().max())
    (torch.Size([1, 3, 8, 16]), 0.0)
    """

    name: str
    array: np.ndarray
    source: str
    original_size: tuple[int, int]  # (width, height) as stored, after EXIF orientation

    def tensor(self):
        """The image as a ``[1, 3, H, W]`` float32 torch tensor in [-1, 1] (VAE input convention).

        Returns
        -------
        torch.Tensor
            A new contiguous tensor, ``2 * array - 1`` with channels first.
        """
        import torch

        return torch.from_numpy(self.array).permute(2, 0, 1)[None].mul(2).sub(1).contiguous()


def to_unit(x):
    """A tensor in the VAE range [-1, 1] mapped to [0, 1], clamped: ``(x.clamp(-1, 1) + 1) / 2``.

    Parameters
    ----------
    x : torch.Tensor
        Any shape; dtype and device are kept (convert first for another precision).

    Returns
    -------
    torch.Tensor
        The same shape, in [0, 1].

    Examples
    --------
    >>> import torch
    >>> to_unit(torch.tensor([-2.0, -1.0, 0.0, 0.5, 3.0])).tolist()
    [0.0, 0.0, 0.5, 0.75, 1.0]
    """
    return (x.clamp(-1, 1) + 1) / 2


def luma(x):
    """BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` (:data:`LUMA_WEIGHTS`) over the channel dimension -3.

    Parameters
    ----------
    x : torch.Tensor
        ``[..., 3, H, W]`` RGB, in any range (the weights sum to 1, so [0, 1] stays [0, 1]).

    Returns
    -------
    torch.Tensor
        ``[..., H, W]``, in the dtype of ``x``.

    Examples
    --------
    >>> import torch
    >>> x = torch.zeros(2, 3, 1, 2, dtype=torch.float64)
    >>> x[0, 0], x[1, 1] = 1.0, 1.0   # pure red, pure green
    >>> luma(x).tolist()
    [[[0.299, 0.299]], [[0.587, 0.587]]]
    """
    wr, wg, wb = LUMA_WEIGHTS
    return wr * x[..., 0, :, :] + wg * x[..., 1, :, :] + wb * x[..., 2, :, :]


@dataclass
class Skipped:
    """An item that could not be used; ``str()`` gives ``"SOURCE: REASON"``.

    Attributes
    ----------
    source : str
        The path, ``builtin:SET/NAME`` or ``record I``.
    reason : str
        Why it was skipped, one line.
    """

    source: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


@dataclass
class ImageBatch:
    """The result of :func:`load_images`: the good images, and what was skipped and why.

    Iterating, indexing and ``len`` go over ``images``.

    Attributes
    ----------
    images : list of LoadedImage
        The images that loaded, in source order.
    skipped : list of Skipped
        What could not be used, and why.

    Examples
    --------
    >>> batch = ImageBatch([LoadedImage("a", np.zeros((8, 8, 3), np.float32), "memory", (8, 8))],
    ...                    [Skipped("b.png", "no such file")])
    >>> len(batch), batch.names, batch[0].name
    (1, ['a'], 'a')
    >>> print(batch.summary())
    loaded 1 image(s), skipped 1
      skipped b.png: no such file
    """

    images: list[LoadedImage] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[LoadedImage]:
        return iter(self.images)

    def __getitem__(self, i: int) -> LoadedImage:
        return self.images[i]

    @property
    def names(self) -> list[str]:
        """The images' names, in order."""
        return [im.name for im in self.images]

    def summary(self) -> str:
        """One line of counts, then one line per skipped item."""
        lines = [f"loaded {len(self.images)} image(s), skipped {len(self.skipped)}"]
        lines += [f"  skipped {s}" for s in self.skipped]
        return "\n".join(lines)


def to_rgb(img: Image.Image, *, background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """Convert any PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F, 1) to float32 RGB in [0, 1].

    Transparency is composited over ``background``; 16-bit and 32-bit integer data keep their full range.

    Parameters
    ----------
    img : PIL.Image.Image
        The image, in any mode.
    background : (int, int, int), keyword-only
        RGB (0-255) under transparent pixels.

    Returns
    -------
    numpy.ndarray
        float32 HxWx3 in [0, 1].

    Examples
    --------
    >>> from PIL import Image
    >>> float(to_rgb(Image.new("I;16", (2, 2), 65535)).max())
    1.0
    >>> to_rgb(Image.new("RGBA", (1, 1), (0, 0, 0, 0)), background=(255, 0, 0))[0, 0].tolist()
    [1.0, 0.0, 0.0]
    """
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() <= 65535 else float(arr.max())
        gray = np.clip(arr / top, 0.0, 1.0).astype(np.float32)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        top = 1.0 if arr.max() <= 1.0 else (255.0 if arr.max() <= 255.0 else float(arr.max()))
        gray = np.clip(arr / top, 0.0, 1.0)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or img.mode == "RGBA":
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, background + (255,))
        img = Image.alpha_composite(base, rgba)
    rgb = img.convert("RGB")
    return np.asarray(rgb, dtype=np.float32) / 255.0


def fit_to_factor(arr: np.ndarray, factor: int, *, fit: str = DEFAULT_FIT, size: int | None = None) -> np.ndarray:
    """Bring HxWx3 ``arr`` to sides that are multiples of ``factor``.

    Parameters
    ----------
    arr : numpy.ndarray
        float32 HxWx3 in [0, 1].
    factor : int
        The VAE's downsampling factor.
    fit : {"crop", "resize"}, keyword-only
        ``"crop"`` center-crops the remainder (at most ``factor - 1`` pixels); ``"resize"`` resizes to the nearest
        multiples (at least ``factor``).
    size : int, keyword-only
        Instead of ``fit``: resize so the shorter side is ``size`` and center-crop a ``size`` x ``size`` square
        (``size`` must be a multiple of ``factor``).

    Returns
    -------
    numpy.ndarray
        float32, C-contiguous when cropped; ``arr`` itself when nothing changes.

    Raises
    ------
    ValueError
        For an unknown fit, or a ``size`` that is not a multiple of ``factor``.

    Examples
    --------
    >>> import numpy as np
    >>> fit_to_factor(np.zeros((37, 50, 3), np.float32), 8).shape
    (32, 48, 3)
    >>> fit_to_factor(np.zeros((37, 50, 3), np.float32), 8, fit="resize").shape
    (40, 48, 3)
    >>> fit_to_factor(np.zeros((37, 50, 3), np.float32), 8, size=16).shape
    (16, 16, 3)
    """
    if fit not in FIT_POLICIES:
        raise ValueError(f"unknown fit {fit!r}; use one of {FIT_POLICIES}")
    if size is not None:
        if size % factor:
            raise ValueError(f"size {size} is not a multiple of the VAE factor {factor}")
        h, w = arr.shape[:2]
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        arr = resize(arr, nh, nw)
        top, left = (nh - size) // 2, (nw - size) // 2
        return np.ascontiguousarray(arr[top:top + size, left:left + size])
    h, w = arr.shape[:2]
    if fit == "crop":
        nh, nw = h - h % factor, w - w % factor
        top, left = (h - nh) // 2, (w - nw) // 2
        return np.ascontiguousarray(arr[top:top + nh, left:left + nw])
    nh = max(factor, int(round(h / factor)) * factor)
    nw = max(factor, int(round(w / factor)) * factor)
    return arr if (nh, nw) == (h, w) else resize(arr, nh, nw)


def resize(arr: np.ndarray, h: int, w: int) -> np.ndarray:
    """Resize a float HxWx3 image in [0, 1] to ``h`` x ``w`` with Lanczos (through 8-bit PIL).

    Parameters
    ----------
    arr : numpy.ndarray
        HxWx3 in [0, 1].
    h, w : int
        The new size in pixels.

    Returns
    -------
    numpy.ndarray
        float32 ``h`` x ``w`` x 3 in [0, 1], quantised to 1/255; ``arr`` itself when it already has that size.

    Examples
    --------
    >>> resize(np.full((4, 6, 3), 0.5, np.float32), 2, 3).shape
    (2, 3, 3)
    """
    if arr.shape[:2] == (h, w):
        return arr
    img = Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return np.asarray(img.resize((w, h), Image.Resampling.LANCZOS), dtype=np.float32) / 255.0


def read_image(path: str | os.PathLike, *, factor: int = 8, fit: str = DEFAULT_FIT, size: int | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Read one image file; raise :class:`ImageLoadError` with the reason if it cannot be used.

    EXIF orientation is applied, any mode is converted by :func:`to_rgb` and the size is fitted by
    :func:`fit_to_factor`.

    Parameters
    ----------
    path : str or os.PathLike
        The image file.
    factor : int, keyword-only
        The VAE's downsampling factor; the sides become multiples of it.
    fit : {"crop", "resize"}, keyword-only
        How the sides become multiples of ``factor`` (:func:`fit_to_factor`).
    size : int, keyword-only
        Resize the shorter side to ``size`` and center-crop a square instead.
    max_pixels : int, keyword-only
        Refuse larger images as possible decompression bombs.

    Returns
    -------
    LoadedImage
        Named after the file stem.

    Raises
    ------
    ImageLoadError
        A missing, empty, unreadable, truncated, too large or too small (under one latent cell) file.

    Examples
    --------
    >>> import tempfile
    >>> folder = tempfile.TemporaryDirectory()
    >>> path = Path(folder.name) / "red.png"
    >>> Image.new("RGB", (50, 37), (255, 0, 0)).save(path)
    >>> img = read_image(path)
    >>> img.name, img.array.shape, img.original_size, img.array[0, 0].tolist()
    ('red', (32, 48, 3), (50, 37), [1.0, 0.0, 0.0])
    >>> read_image(path, factor=16, fit="resize").array.shape
    (32, 48, 3)
    >>> read_image(path, max_pixels=100)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    vaeprobe.errors.ImageLoadError: 50x37 = 1850 pixels exceeds the limit of 100 (possible decompression bomb); ...
    >>> folder.cleanup()
    """
    path = Path(path)
    try:
        if not path.exists():
            raise ImageLoadError("no such file")
        if path.is_dir():
            raise ImageLoadError("is a directory, not an image")
        if path.stat().st_size == 0:
            raise ImageLoadError("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageLoadError(
                        f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} (possible decompression "
                        f"bomb); raise max_pixels if the file is trusted")
                img = ImageOps.exif_transpose(img)
                img.load()
                arr = to_rgb(img)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(f"decompression bomb refused ({exc})") from None
    except UnidentifiedImageError:
        raise ImageLoadError("not an image (format not recognised)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "truncated" in msg.lower() or "broken data" in msg.lower() or "unrecognized data" in msg.lower():
            raise ImageLoadError(f"truncated or corrupt image data ({msg})") from None
        raise ImageLoadError(f"unreadable image ({msg})") from None
    return _finish(path.stem, arr, str(path), factor, fit, size)


def _finish(name: str, arr: np.ndarray, source: str, factor: int, fit: str, size: int | None) -> LoadedImage:
    h, w = arr.shape[:2]
    if h < factor or w < factor:
        raise ImageLoadError(f"{w}x{h} is smaller than one latent cell ({factor}x{factor} pixels)")
    out = fit_to_factor(arr, factor, fit=fit, size=size)
    return LoadedImage(name=name, array=out.astype(np.float32, copy=False), source=source, original_size=(w, h))


def _expand_source(source: Any) -> list[str] | None:
    """Paths for a folder, glob or list of files; None if ``source`` is not path-like."""
    if isinstance(source, (str, os.PathLike)):
        s = str(source)
        p = Path(s)
        if p.is_dir():
            return sorted(str(f) for f in p.iterdir()
                          if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES)
        if any(ch in s for ch in "*?["):
            return sorted(_glob.glob(s, recursive=True))
        return [s]
    if isinstance(source, Sequence) and all(isinstance(x, (str, os.PathLike)) for x in source):
        return [str(x) for x in source]
    return None


def _iter_paths(paths, max_pixels, skip, factor, fit, size):
    """The readable files of ``paths``; a repeated name gets ``~1``, ``~2``, ...; unreadable ones go to ``skip``."""
    seen: dict[str, int] = {}
    for p in paths:
        try:
            img = read_image(p, factor=factor, fit=fit, size=size, max_pixels=max_pixels)
        except ImageLoadError as exc:
            skip(p, str(exc))
            continue
        n = seen.get(img.name, 0)
        seen[img.name] = n + 1
        if n:
            img.name = f"{img.name}~{n}"
        yield img


def _iter_records(source, image_column, max_pixels, skip, factor, fit, size):
    """The images of a dataset's records (``record[image_column]``, a PIL image); bad records go to ``skip``."""
    for i, record in enumerate(source):
        src = f"record {i}"
        try:
            img = record[image_column] if isinstance(record, dict) else record
            if not isinstance(img, Image.Image):
                raise ImageLoadError(f"column {image_column!r} holds {type(img).__name__}, not a PIL image")
            w, h = img.size
            if w * h > max_pixels:
                raise ImageLoadError(f"{w}x{h} exceeds the pixel limit {max_pixels}")
            arr = to_rgb(ImageOps.exif_transpose(img))
            yield _finish(f"{i:06d}", arr, src, factor, fit, size)
        except ImageLoadError as exc:
            skip(src, str(exc))
        except (KeyError, TypeError) as exc:
            skip(src, f"record has no image column {image_column!r} ({exc})")


def iter_images(source: Any, *, factor: int = 8, fit: str = DEFAULT_FIT, size: int | None = None,
                max_pixels: int = DEFAULT_MAX_PIXELS, image_column: str = "image",
                skipped: list[Skipped] | None = None, report=None) -> Iterator[LoadedImage]:
    """Stream images one at a time (memory flat in the number of images); see :func:`load_images`.

    Each skipped item is appended to ``skipped`` and passed to ``report`` (default: one line on stderr).

    Parameters
    ----------
    source : str, os.PathLike, sequence of paths or iterable of records
        A folder, a glob, an image file, a list of files, a Hugging Face ``datasets`` dataset (or any iterable of
        dicts or PIL images) or ``builtin:photos`` (``builtin:NAME`` for the other builtin sets).
    factor, fit, size, max_pixels : keyword-only
        As for :func:`read_image`.
    image_column : str, keyword-only
        The column holding the PIL image in dataset records.
    skipped : list of Skipped, keyword-only
        Each skipped item is appended here.
    report : callable, keyword-only
        Called with each :class:`Skipped` (default: ``vaeprobe: skipped SOURCE: REASON`` on stderr through tqdm).

    Yields
    ------
    LoadedImage
        In source order (sorted paths for a folder or glob).

    Raises
    ------
    ImageLoadError
        When a folder or glob holds no images, or a single path does not exist.

    Examples
    --------
    >>> skipped = []
    >>> images = iter_images(["missing.png"], skipped=skipped, report=lambda s: None)
    >>> list(images), [str(s) for s in skipped]
    ([], ['missing.png: no such file'])
    >>> next(iter_images("builtin:photos-heldout", factor=16, size=32)).array.shape
    (32, 32, 3)
    """
    if report is None:
        def report(s: Skipped) -> None:  # through tqdm, so a progress bar on the same stream stays whole
            from tqdm import tqdm

            tqdm.write(f"vaeprobe: skipped {s}", file=sys.stderr)

    def skip(src: str, reason: str) -> None:
        s = Skipped(src, reason)
        if skipped is not None:
            skipped.append(s)
        report(s)

    if isinstance(source, str) and source.startswith("builtin:"):
        from vaeprobe.data.builtin_images import builtin_photos

        for name, arr in builtin_photos(source):
            try:
                yield _finish(name, arr, f"{source}/{name}", factor, fit, size)
            except ImageLoadError as exc:
                skip(f"{source}/{name}", str(exc))
        return
    paths = _expand_source(source)
    if paths is not None:
        if not paths:
            raise ImageLoadError(f"no images found at {source!r}; give a folder, a glob, or image files")
        if len(paths) == 1 and not Path(paths[0]).exists() and isinstance(source, str):
            raise ImageLoadError(f"{source!r} is neither a file, a folder, a glob nor builtin:photos")
        yield from _iter_paths(paths, max_pixels, skip, factor, fit, size)
        return
    # A Hugging Face ``datasets`` dataset (or any iterable of records holding a PIL image).
    yield from _iter_records(source, image_column, max_pixels, skip, factor, fit, size)


def load_images(source: Any, *, factor: int = 8, fit: str = DEFAULT_FIT, size: int | None = None,
                max_pixels: int = DEFAULT_MAX_PIXELS, image_column: str = "image", report=None) -> ImageBatch:
    """Load images from a folder, a glob, a list of files, a HF ``datasets`` dataset or ``builtin:photos``.

    Sizes become multiples of ``factor`` by ``fit`` (default ``"crop"``: center-crop the remainder;
    ``"resize"``: resize to the nearest multiples); ``size=N`` instead resizes the shorter side to N and
    center-crops N x N. Bad items are skipped with one line each; see :attr:`ImageBatch.skipped`.

    Parameters
    ----------
    source : str, os.PathLike, sequence of paths or iterable of records
        As for :func:`iter_images`.
    factor : int, keyword-only
        The VAE's downsampling factor.
    fit : {"crop", "resize"}, keyword-only
        How the sides become multiples of ``factor``.
    size : int, keyword-only
        Resize the shorter side to ``size`` and center-crop a square instead.
    max_pixels : int, keyword-only
        Refuse larger images (:data:`DEFAULT_MAX_PIXELS`).
    image_column : str, keyword-only
        The column holding the PIL image in dataset records.
    report : callable, keyword-only
        Called with each :class:`Skipped` (default: one line on stderr).

    Returns
    -------
    ImageBatch
        All the images in memory; :func:`iter_images` streams them instead.

    Examples
    --------
    >>> batch = load_images("builtin:photos-heldout", size=64)
    >>> len(batch) > 0 and batch[0].array.shape
    (64, 64, 3)
    >>> from PIL import Image
    >>> records = [{"image": Image.new("RGB", (20, 12))}, {"image": "not an image"}]
    >>> batch = load_images(records, factor=4, report=lambda s: None)
    >>> batch.names, batch[0].array.shape, [str(s) for s in batch.skipped]
    (['000000'], (12, 20, 3), ["record 1: column 'image' holds str, not a PIL image"])
    """
    batch = ImageBatch()
    for img in iter_images(source, factor=factor, fit=fit, size=size, max_pixels=max_pixels,
                           image_column=image_column, skipped=batch.skipped, report=report):
        batch.images.append(img)
    return batch
