"""Standard FID features and Fréchet distance, through ``pytorch-fid`` with its weights read from a local file.

rFID compares the Inception pool features (2048-d) of the originals and of their reconstructions. To be comparable
with published numbers it must use *the* FID Inception network: the TensorFlow ``inception-2015-12-05`` graph as
ported by ``pytorch-fid`` (:class:`pytorch_fid.inception.InceptionV3` with ``use_fid_inception=True``; 1008
classes, TensorFlow's pooling quirks), its bilinear resize to 299x299 and its input scaling from [0, 1] to [-1, 1].
torchvision's ImageNet Inception-v3 is a different network with different weights and is refused.

The weights file is ``pt_inception-2015-12-05-6726825d.pth`` (:data:`FID_WEIGHTS_FILE`), published at
:data:`FID_WEIGHTS_URL`. Nothing is downloaded: :func:`find_fid_weights` looks, in this order, at the path given,
at ``$VAEPROBE_INCEPTION``, and at torch hub's checkpoint cache (``torch.hub.get_dir()/checkpoints/``, where
``pytorch-fid`` itself would have cached it). The file is read with ``torch.load(..., weights_only=True)``;
``pytorch-fid``'s own loader (``torch.hub.load_state_dict_from_url``, which would download the file when it is
absent and unpickles it with ``weights_only=False``) is replaced for the construction, so the library only builds the
network and checks, strictly, that every key and shape of the file fits it.

Conventions: images are torch ``[N, 3, H, W]`` in [-1, 1] (as vaeprobe's VAEs take and give them); features are
float64 numpy ``[N, 2048]``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import threading
import warnings
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from vaeprobe.data.images import to_unit
from vaeprobe.errors import SetupError

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
ENV_VAR = "VAEPROBE_INCEPTION"
FID_DIMS = 2048

_BUILD_LOCK = threading.Lock()  # the library's loader is swapped out while a network is built


class FIDWeightsError(SetupError, ValueError):
    """A weights file that is not the FID Inception state dict (or cannot be read as one)."""


# -- finding the weights -------------------------------------------------------------------------------------------

def _hub_file() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE


def _candidate(path: str | os.PathLike | None) -> Path:
    """The one file that decides: the path given, else ``$VAEPROBE_INCEPTION``, else the torch hub cache file.

    A directory stands for :data:`FID_WEIGHTS_FILE` inside it. An explicit choice (argument or variable) is never
    replaced by the cache when it is missing, so a typo is reported rather than silently ignored.
    """
    if path is None or str(path) == "":
        path = os.environ.get(ENV_VAR) or None
    if path is None:
        return _hub_file()
    p = Path(path).expanduser()
    return p / FID_WEIGHTS_FILE if p.is_dir() else p


def find_fid_weights(path: str | os.PathLike | None = None) -> Path | None:
    """The local FID Inception weights file, or ``None`` when it is absent (nothing is downloaded).

    Parameters
    ----------
    path : str or path-like, optional
        A weights file, or a directory holding :data:`FID_WEIGHTS_FILE`. When not given, ``$VAEPROBE_INCEPTION``
        is used the same way, and when that is unset too, ``torch.hub.get_dir()/checkpoints/`` is searched.

    Returns
    -------
    pathlib.Path or None
        The file to load, or ``None`` when the place looked at has no such file (then
        :func:`missing_fid_weights_reason` says so in one line).

    Examples
    --------
    >>> find_fid_weights("/nonexistent/pt_inception.pth") is None
    True
    """
    p = _candidate(path)
    return p if p.is_file() else None


def missing_fid_weights_reason(path: str | os.PathLike | None = None) -> str:
    """One line for a run summary when :func:`find_fid_weights` found nothing: what is missing, where, what to do.

    Examples
    --------
    >>> missing_fid_weights_reason("/nonexistent/dir/w.pth")  # doctest: +NORMALIZE_WHITESPACE
    'not computed: no FID Inception weights (pt_inception-2015-12-05-6726825d.pth) at /nonexistent/dir/w.pth;
     pass --inception PATH or set VAEPROBE_INCEPTION'
    """
    return (f"not computed: no FID Inception weights ({FID_WEIGHTS_FILE}) at {_candidate(path)}; "
            f"pass --inception PATH or set {ENV_VAR}")


# -- the network ---------------------------------------------------------------------------------------------------

def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling, zip and EOF errors alike: the file is not a plain tensor state dict
        detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise FIDWeightsError(f"{path} cannot be read as a state dict with torch.load(weights_only=True) ({detail}); "
                              f"pass the FID Inception weights {FID_WEIGHTS_FILE}") from None
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in state.items()):
        raise FIDWeightsError(f"{path} holds a {type(state).__name__}, not a state dict of tensors; "
                              f"pass the FID Inception weights {FID_WEIGHTS_FILE}")
    return dict(state)


def _load_errors(exc: BaseException) -> str:
    """``load_state_dict``'s multi-line complaint in a few words: how many keys are missing, unexpected, misshapen.

    >>> _load_errors(RuntimeError('Error(s) in loading state_dict for Inception3:\\n\\tMissing key(s) in state_dict: '
    ...                           '"a.weight", "b.bias". \\n\\tsize mismatch for fc.weight: copying a param ...'))
    'keys: 2 missing (e.g. a.weight), 1 misshapen (e.g. fc.weight)'
    """
    counts: dict[str, list[str]] = {"missing": [], "unexpected": [], "misshapen": []}
    for line in str(exc).splitlines()[1:]:
        head, _, rest = line.strip().partition(":")
        if head.startswith("Missing key"):
            counts["missing"] += re.findall(r'"([^"]+)"', rest)
        elif head.startswith("Unexpected key"):
            counts["unexpected"] += re.findall(r'"([^"]+)"', rest)
        elif head.startswith("size mismatch for "):
            counts["misshapen"].append(head[len("size mismatch for "):])
    parts = [f"{len(v)} {k} (e.g. {v[0]})" for k, v in counts.items() if v]
    return "keys: " + ", ".join(parts) if parts else ""


def _not_fid_message(path: Path, state: Mapping[str, torch.Tensor], exc: BaseException) -> str:
    fc = state.get("fc.weight")
    if any(k.startswith("AuxLogits.") for k in state) or (fc is not None and tuple(fc.shape) == (1000, 2048)):
        what = "torchvision's ImageNet Inception-v3 (1000 classes), not the FID Inception network"
    else:
        detail = _load_errors(exc)
        what = "not the FID Inception state dict" + (f" ({detail})" if detail else "")
    return f"{path} is {what}; pass the FID Inception weights {FID_WEIGHTS_FILE} (pytorch-fid's)"


def build_fid_inception(weights_path: str | os.PathLike) -> torch.nn.Module:
    """``pytorch_fid.inception.InceptionV3`` (FID variant, pool3 2048-d output, resize to 299, [0, 1] input) with
    the weights from ``weights_path`` (``weights_only=True``), in eval mode on the CPU.

    Raises
    ------
    FIDWeightsError
        When the file cannot be read as a state dict or does not fit the FID network exactly (strict loading).
    """
    from pytorch_fid import inception as fid_inception

    path = Path(weights_path)
    state = _read_state_dict(path)

    def from_file(*_args, **_kwargs):  # stands in for torch.hub.load_state_dict_from_url: no download, no pickle
        return state

    with _BUILD_LOCK:
        if not hasattr(fid_inception, "load_state_dict_from_url"):  # fail closed rather than let it download
            raise SetupError("this pytorch-fid version loads its weights differently; install pytorch-fid 0.3.x")
        original = fid_inception.load_state_dict_from_url
        fid_inception.load_state_dict_from_url = from_file
        try:
            net = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[FID_DIMS]],
                                            resize_input=True, normalize_input=True, use_fid_inception=True)
        except RuntimeError as exc:  # load_state_dict(strict=True): missing/unexpected keys, size mismatches
            raise FIDWeightsError(_not_fid_message(path, state, exc)) from None
        finally:
            fid_inception.load_state_dict_from_url = original
    return net.eval()


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class FIDFeatures:
    """Standard FID pool features (2048-d) of images in [-1, 1], from a local weights file.

    Parameters
    ----------
    weights_path : str or path-like
        The FID Inception weights, :data:`FID_WEIGHTS_FILE` (see :func:`find_fid_weights`).
    device : str or torch.device, optional
        Where the network runs; CUDA when available, else the CPU.
    batch_size : int, optional
        Images per forward pass (default 32).

    Raises
    ------
    FIDWeightsError
        When the file is not the FID Inception state dict (e.g. torchvision's ImageNet Inception-v3).

    Notes
    -----
    ``images`` are clamped to [-1, 1] and mapped to [0, 1] by ``(x + 1) / 2``; ``pytorch-fid``'s network then
    resizes them bilinearly to 299x299 and scales them to [-1, 1] itself. They are not quantised to 8 bits.

    Examples
    --------
    With the real weights on disk (not shipped, so not run here):

    >>> feats = FIDFeatures(find_fid_weights(), device="cpu")              # doctest: +SKIP
    >>> feats(torch.rand(4, 3, 64, 64) * 2 - 1).shape                       # doctest: +SKIP
    (4, 2048)
    """

    def __init__(self, weights_path: str | os.PathLike, *, device: str | torch.device | None = None,
                 batch_size: int = 32):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.weights_path = Path(weights_path)
        self.device = torch.device(device) if device is not None else _default_device()
        self.batch_size = int(batch_size)
        self.net = build_fid_inception(self.weights_path).to(self.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """``images`` ``[N, 3, H, W]`` in [-1, 1] -> float64 ``[N, 2048]`` pool features."""
        images = torch.as_tensor(images)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"FID features need images shaped [N, 3, H, W], not {list(images.shape)}")
        out = np.empty((images.shape[0], FID_DIMS), dtype=np.float64)
        for start in range(0, images.shape[0], self.batch_size):
            x = images[start:start + self.batch_size].to(self.device, torch.float32)
            pooled = self.net(to_unit(x))[0]                              # [B, 2048, 1, 1]
            out[start:start + len(x)] = pooled.flatten(1).double().cpu().numpy()
        return out


# -- the distance --------------------------------------------------------------------------------------------------

def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    # tr((S1 S2)^(1/2)) as the sum of the square roots of the eigenvalues of S1 S2 (real and >= 0 up to rounding)
    return float(np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).real.sum())


def _low_rank_fid(a: np.ndarray, b: np.ndarray) -> float:
    # S = A^T A with A the centred rows / sqrt(n - 1); the nonzero eigenvalues of S_a S_b are the squared singular
    # values of A_a A_b^T, so tr((S_a S_b)^(1/2)) is their sum: exact, and an (N x M) problem instead of (D x D)
    ca = (a - a.mean(0)) / np.sqrt(len(a) - 1)
    cb = (b - b.mean(0)) / np.sqrt(len(b) - 1)
    diff = a.mean(0) - b.mean(0)
    cross = np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
    return float(diff @ diff + (ca * ca).sum() + (cb * cb).sum() - 2 * cross)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of two feature sets ``[N, D]``, each taken as a Gaussian (mean, sample covariance).

    ``||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``, computed by
    :func:`pytorch_fid.fid_score.calculate_frechet_distance` (the library's notice about a near-singular product,
    which it then regularises, is silenced). With SciPy 1.18 or later, which that function no longer runs on, the
    trace term is taken from the eigenvalues of ``S_a S_b`` instead. With fewer rows than dimensions in either set
    (singular covariances: any rFID on under 2048 images) the trace term is computed exactly from the singular
    values of the centred features' cross product, an ``N x M`` problem: the library's ``D x D`` matrix square
    root takes about 20 s per pair at D = 2048 on two CPU cores and is ill-conditioned there.

    Parameters
    ----------
    a, b : array-like, shape (N, D) and (M, D)
        Features (e.g. from :class:`FIDFeatures`), at least two rows each.

    Returns
    -------
    float

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(500, 3))
    >>> abs(frechet_distance(x, x)) < 1e-6
    True
    >>> round(frechet_distance(x, x + 2.0), 6)          # a pure shift: ||(2, 2, 2)||^2
    12.0
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be [N, D] with the same D, not {list(a.shape)} and {list(b.shape)}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"a Fréchet distance needs at least 2 feature rows per set, not {len(a)} and {len(b)}")
    if min(len(a), len(b)) <= a.shape[1]:
        return _low_rank_fid(a, b)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    from pytorch_fid.fid_score import calculate_frechet_distance

    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore", DeprecationWarning)   # scipy >= 1.16: sqrtm's `disp` (the library's)
            warnings.simplefilter("ignore", RuntimeWarning)
            return float(calculate_frechet_distance(mu1, s1, mu2, s2))
    except TypeError as exc:  # scipy >= 1.18 removed sqrtm(disp=...), which pytorch-fid 0.3.0 passes
        if "disp" not in str(exc):
            raise
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * _trace_sqrt_product(s1, s2))
