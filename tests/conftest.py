import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = Path(__file__).parent / "data"

torch.set_num_threads(2)


def shared_or_skip(sub: str) -> Path:
    path = SHARED / sub
    if not path.exists():
        pytest.skip(f"{path} is absent: ../shared (data beside the repo, provided for development and CI) "
                    f"is not in this checkout")
    return path


@pytest.fixture
def tiny_kl():
    from vaeprobe.models.zoo import tiny_random

    return tiny_random(seed=1)


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch):
    # Tests never reach the hub; the loader must fail fast and clearly without it.
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


def run_and_kill(args: list[str], out: Path, min_parts: int, total: int) -> dict[str, int]:
    """Start ``vaeprobe ARGS --out OUT``, SIGKILL it once ``min_parts`` images are finished, and return the
    finished part files with their modification times (to prove that a resumed run does not redo them)."""
    proc = subprocess.Popen([sys.executable, "-m", "vaeprobe.cli", *args, "--out", str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while len(list((out / "parts").glob("*.json"))) < min_parts and proc.poll() is None and time.time() - t0 < 120:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in (out / "parts").glob("*")}
    assert min_parts <= len([n for n in done if n.endswith(".json")]) < total, "the kill came too late to test resume"
    return done


def random_fid_state(seed: int = 0) -> dict:
    """A random-init state dict with the exact keys and shapes of the standard FID Inception (pytorch-fid's
    ``fid_inception_v3``), its convolutions He-scaled so activations stay O(1) (tiny, denormal ones make CPUs
    crawl). No download: the library's loader is handed a random torchvision state."""
    import pytest
    import torch
    from pytorch_fid import inception as lib
    from torchvision.models import inception_v3

    torch.manual_seed(seed)
    seed_state = inception_v3(weights=None, num_classes=1008, aux_logits=False, init_weights=False).state_dict()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lib, "load_state_dict_from_url", lambda *a, **k: seed_state)
        net = lib.fid_inception_v3()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    for k in state:
        if k.endswith("conv.weight"):
            state[k] *= 6 ** 0.5
    return state
