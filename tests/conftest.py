import contextlib
import io
import logging
import os
import random
import signal
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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


@dataclass
class CliResult:
    """What :func:`run_cli` gives back: the fields of a ``subprocess.CompletedProcess`` run with ``text=True``."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def _log_streams_to(stdout: io.StringIO, stderr: io.StringIO):
    """Point every logging handler that writes to the real stdout/stderr (diffusers', transformers' ...) at the
    capture buffers, as a process's fds would be, and back afterwards."""
    real_out, real_err = (sys.stdout, sys.__stdout__), (sys.stderr, sys.__stderr__)
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    moved = []
    for handler in {h for lg in loggers for h in lg.handlers}:
        if type(handler) is logging.StreamHandler:
            target = stdout if handler.stream in real_out else stderr if handler.stream in real_err else None
            if target is not None:
                moved.append((handler, handler.setStream(target)))
    try:
        yield
    finally:
        for handler, stream in moved:
            handler.setStream(stream)


def run_cli(*args, env: dict[str, str | None] | None = None, cwd: str | Path | None = None) -> CliResult:
    """``vaeprobe ARGS`` in this process: ``vaeprobe.cli.main``, with what a console process would give back.

    stdout and stderr are captured (tqdm, ``print(file=sys.stderr)``, logging handlers and warnings, which a
    process prints once per place with Python's default filters, all land in ``stderr``); ``SystemExit`` (argparse's
    ``--help`` and usage errors) becomes the exit code; an exception that escapes ``main`` (an internal error under
    ``VAEPROBE_DEBUG=1``) is printed as a traceback with exit code 1, as the interpreter would. ``env`` sets (a
    value) or unsets (``None``) environment variables for the call only; ``cwd`` changes the working directory for
    it. Torch runs on ``$OMP_NUM_THREADS`` threads when that is set, as in a fresh process. The process-wide state
    a call may change (the runner's ``COMMAND``, torch's thread count, grad mode and the global random generators)
    is restored afterwards. Use a subprocess only where a process must be killed or a fresh interpreter is the
    point of the test.
    """
    from vaeprobe import cli
    from vaeprobe.jobs import runner

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    caught: list[tuple] = []
    saved_env = {k: os.environ.get(k) for k in (env or {})}
    saved = (runner.COMMAND, torch.get_num_threads(), torch.is_grad_enabled(), torch.random.get_rng_state(),
             random.getstate(), np.random.get_state(), os.getcwd())
    for key, value in (env or {}).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = str(value)
    try:
        if cwd is not None:
            os.chdir(cwd)
        threads = os.environ.get("OMP_NUM_THREADS", "")
        if threads.isdigit() and int(threads) > 0:  # what torch in a fresh process would take
            torch.set_num_threads(int(threads))
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                _log_streams_to(out, err):
            def show(message, category, filename, lineno, file=None, line=None):
                caught.append((message, category, filename, lineno))
                err.write(warnings.formatwarning(message, category, filename, lineno, line))

            warnings.showwarning = show
            warnings.resetwarnings()  # a process's default filters: these four ignored, the rest once per place
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.filterwarnings("ignore", category=category, append=True)
            warnings.filterwarnings("default", append=True)
            try:
                code = cli.main(argv)
            except SystemExit as exc:
                code = exc.code
                if code is not None and not isinstance(code, int):
                    print(code, file=sys.stderr)
                    code = 1
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        runner.COMMAND = saved[0]
        torch.set_num_threads(saved[1])
        torch.set_grad_enabled(saved[2])
        torch.random.set_rng_state(saved[3])
        random.setstate(saved[4])
        np.random.set_state(saved[5])
        os.chdir(saved[6])
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    for message, category, filename, lineno in dict.fromkeys(  # pytest's warnings summary still lists them
            (str(m), c, f, n) for m, c, f, n in caught):
        warnings.warn_explicit(message, category, filename, lineno)
    return CliResult(argv, 0 if code is None else int(code), out.getvalue(), err.getvalue())


def run_and_kill(args: list[str], out: Path, min_parts: int, total: int) -> dict[str, int]:
    """Start ``vaeprobe ARGS --out OUT``, SIGKILL it once ``min_parts`` images are finished, and return the
    finished part files with their modification times (to prove that a resumed run does not redo them).

    A real process, since it must be killed (the other CLI calls of the tests go through :func:`run_cli`); its
    torch uses the thread count of those in-process calls, whose tables the resumed run is compared with."""
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    proc = subprocess.Popen([sys.executable, "-m", "vaeprobe.cli", *args, "--out", str(out)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while len(list((out / "parts").glob("*.json"))) < min_parts and proc.poll() is None and time.time() - t0 < 120:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # an image is finished when its JSON part is written (the last file of an image); files of the image the kill
    # interrupted may exist without it and are rightly redone
    parts = list((out / "parts").glob("*"))
    finished = {p.name.split(".")[0] for p in parts if p.suffix == ".json"}
    done = {p.name: p.stat().st_mtime_ns for p in parts if p.name.split(".")[0] in finished}
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
