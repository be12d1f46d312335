import os
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
    from vaeprobe.zoo import tiny_random

    return tiny_random(seed=1)


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch):
    # Tests never reach the hub; the loader must fail fast and clearly without it.
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
