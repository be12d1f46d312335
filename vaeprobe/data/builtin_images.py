"""The builtin offline photo set, from the images scikit-image ships in its wheel (no download).

``builtin:photos`` is every image; ``builtin:photos-train`` and ``builtin:photos-heldout`` are a fixed split.
The held-out images are never used to train the builtin models. Sources and licences: scikit-image's
``skimage/data/README.txt`` (public domain or CC-licensed photographs; see ``docs/data.md``).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from vaeprobe.errors import ImageLoadError

# name -> (skimage.data function, index into a tuple result or None)
_SOURCES: dict[str, tuple[str, int | None]] = {
    "astronaut": ("astronaut", None),
    "hubble_deep_field": ("hubble_deep_field", None),
    "immunohistochemistry": ("immunohistochemistry", None),
    "retina": ("retina", None),
    "moon": ("moon", None),
    "grass": ("grass", None),
    "gravel": ("gravel", None),
    "coins": ("coins", None),
    "coffee": ("coffee", None),
    "chelsea": ("chelsea", None),
    "rocket": ("rocket", None),
    "stereo_motorcycle": ("stereo_motorcycle", 0),
    "camera": ("camera", None),
    "brick": ("brick", None),
    "clock": ("clock", None),
}
TRAIN = ["astronaut", "hubble_deep_field", "immunohistochemistry", "retina", "moon", "grass", "gravel", "coins"]
HELDOUT = ["coffee", "chelsea", "rocket", "stereo_motorcycle", "camera", "brick", "clock"]
SETS = {"builtin:photos": TRAIN + HELDOUT, "builtin:photos-train": TRAIN, "builtin:photos-heldout": HELDOUT}


def photo(name: str) -> np.ndarray:
    """One builtin photo, from the images scikit-image ships (no download).

    Parameters
    ----------
    name : str
        One of the names in :data:`TRAIN` and :data:`HELDOUT` (e.g. ``"camera"``).

    Returns
    -------
    numpy.ndarray
        Float32 RGB ``[H, W, 3]`` in [0, 1], C-contiguous; grayscale photos are replicated to RGB.

    Raises
    ------
    KeyError
        When ``name`` is not a builtin photo.

    Examples
    --------
    >>> img = photo("camera")
    >>> img.shape, img.dtype, float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    ((512, 512, 3), dtype('float32'), True)
    """
    import skimage.data

    fn, idx = _SOURCES[name]
    arr = getattr(skimage.data, fn)()
    if idx is not None:
        arr = arr[idx]
    arr = np.asarray(arr)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    else:
        arr = arr.astype(np.float32)
        arr = arr / max(1.0, float(arr.max()))
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3])


def builtin_photos(spec: str = "builtin:photos") -> Iterator[tuple[str, np.ndarray]]:
    """The photos of a builtin set, one by one (each read when it is reached).

    Parameters
    ----------
    spec : str, optional
        ``"builtin:photos"`` (every photo), ``"builtin:photos-train"`` or ``"builtin:photos-heldout"``.

    Yields
    ------
    name : str
        The photo's name (see :func:`photo`).
    image : numpy.ndarray
        The photo, float32 RGB ``[H, W, 3]`` in [0, 1].

    Raises
    ------
    ImageLoadError
        When ``spec`` is not a builtin set (raised on the first ``next``).

    Examples
    --------
    >>> name, img = next(builtin_photos("builtin:photos-heldout"))
    >>> name, img.shape
    ('coffee', (400, 600, 3))
    """
    if spec not in SETS:
        raise ImageLoadError(f"unknown image set {spec!r}; choose one of {', '.join(SETS)}")
    for name in SETS[spec]:
        yield name, photo(name)
