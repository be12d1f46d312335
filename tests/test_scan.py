"""Perturbation scans scored on ground truth, and `vaeprobe scan` with kill and resume."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from vaeprobe.data.images import load_images
from vaeprobe.probes.scan import DEFAULT_GLOBAL_THRESHOLD, ScanError, exact_scan, select_sites, two_stage_scan
from vaeprobe.probes.geometry import GeometryError, sample_cells
from vaeprobe.models.loading import load_vae

from conftest import REPO, run_and_kill, run_cli
from oracles import brute_sample, zeroed_far_field

CONTROLS = ["planted-direct-fixed", "planted-direct", "planted-groupnorm", "planted-attention", "planted-hidden"]
SCAN_SIZE = 64  # 8x8 latent: 64 exact decodes per image keep the ground-truth tests inside the suite budget


def test_select_sites_forms_and_errors():
    assert len(select_sites("all", (3, 5))) == 15
    norm = torch.zeros(4, 4)
    norm[2, 3] = 5
    norm[0, 1] = 4
    assert [(s.row, s.col) for s in select_sites("top:2", (4, 4), norm=norm)] == [(2, 3), (0, 1)]
    for bad in ("every", "list:9,9", "top:2"):
        with pytest.raises(ScanError):
            select_sites(bad, (4, 4))


def test_exact_scan_matches_the_zeroing_reference(tiny_kl):
    vae = load_vae(tiny_kl)
    x = torch.rand(1, 3, 48, 48) * 2 - 1
    z = vae.encode(x).mean
    sites = select_sites("all", z.shape[-2:])
    df = exact_scan(vae, z, sites, "zero", batch=5).table
    ref = zeroed_far_field(vae, z, [(s.row, s.col) for s in sites], radius=3)
    np.testing.assert_allclose(df.far_l2.to_numpy(), np.array(ref), rtol=1e-4, equal_nan=True)
    med = np.nanmedian(df.far_l2)
    np.testing.assert_allclose(df.global_ratio, df.far_l2 / med, rtol=1e-6)
    # batch size does not change results
    df1 = exact_scan(vae, z, sites[:7], "noise:0.5", batch=1).table
    df3 = exact_scan(vae, z, sites[:7], "noise:0.5", batch=3).table
    pd.testing.assert_frame_equal(df1.drop(columns="global_ratio"), df3.drop(columns="global_ratio"),
                                  check_exact=False, rtol=1e-3, atol=1e-6)


# -- the control sampler (vaeprobe.probes.geometry.sample_cells) ----------------------------------------------

@pytest.mark.parametrize("metric", ["chebyshev", "euclidean"])
def test_sample_cells_matches_the_oracle_draw(metric):
    gen = torch.Generator().manual_seed(5)
    for h, w in [(1, 1), (3, 3), (4, 7), (9, 5), (16, 16)]:
        allowed = torch.rand(h, w, generator=gen) < 0.7
        cells = [(r, c) for r in range(h) for c in range(w)]
        for n in (0, 1, 4, 100):
            for avoid in ([], [cells[0]], [cells[-1], cells[len(cells) // 2]]):
                for radius in (0, 1, 1.5, 2):
                    for mask in (None, allowed):
                        for seed in (0, 11):
                            got = sample_cells(h, w, n, avoid=avoid, radius=radius, allowed=mask, metric=metric,
                                               seed=seed)
                            want = brute_sample(h, w, n, avoid, radius, None if mask is None else mask.tolist(),
                                                metric, seed)
                            assert got == want, (h, w, n, avoid, radius, seed)
                            assert len(set(got)) == len(got)


def test_sample_cells_seeds_generators_and_errors():
    assert sample_cells(8, 8, 5, seed=3) == sample_cells(8, 8, 5, seed=3) != sample_cells(8, 8, 5, seed=4)
    g = torch.Generator().manual_seed(3)
    assert sample_cells(8, 8, 5, seed=g) == sample_cells(8, 8, 5, seed=3)
    assert sample_cells(8, 8, 5, seed=g) != sample_cells(8, 8, 5, seed=3)  # the generator moved on
    assert sample_cells(2, 2, 3, avoid=[(0, 0)], radius=1) == []  # nothing is more than 1 cell away
    for bad in (dict(n=-1), dict(avoid=[(8, 0)]), dict(allowed=torch.ones(4, 8, dtype=torch.bool)),
                dict(metric="manhattan")):
        with pytest.raises(GeometryError):
            sample_cells(8, 8, **{"n": 2, **bad})


def test_two_stage_controls_are_the_documented_draw(tiny_kl):
    vae = load_vae(tiny_kl)
    z = vae.encode(torch.rand(1, 3, 40, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1).mean
    h, w = z.shape[-2:]
    df = two_stage_scan(vae, z, n_norm=3, n_linear=0, n_control=6, seed=7, measures=("far_l2",)).table
    top = torch.topk(z[0].norm(dim=0).flatten(), 3).indices.tolist()
    controls = list(zip(df.row[df.stage == "control"], df.col[df.stage == "control"]))
    assert controls == brute_sample(h, w, 6, [divmod(i, w) for i in top], seed=7)


def _top(df):
    row = df.loc[df.far_l2.idxmax()]
    return int(row.row), int(row.col)


@pytest.mark.slow
@pytest.mark.parametrize("spec", CONTROLS)
def test_exact_and_two_stage_find_the_planted_spot(spec):
    vae = load_vae(f"builtin:{spec}")
    images = load_images("builtin:photos-heldout", size=SCAN_SIZE)
    exact_hits = two_hits = 0
    for img in images:
        x = img.tensor()
        z = vae.encode(x).mean
        gt = vae.ground_truth(x)[0]
        df = exact_scan(vae, z, select_sites("all", z.shape[-2:]), "zero", batch=16).table
        exact_hits += _top(df) == (gt["row"], gt["col"])
        two = two_stage_scan(vae, z, "zero", n_control=8).table
        two_hits += _top(two) == (gt["row"], gt["col"])
        assert len(two) <= 16
    assert exact_hits / len(images) >= 0.95, (spec, exact_hits)
    assert two_hits / len(images) >= 0.95, (spec, two_hits)


@pytest.mark.slow
def test_clean_model_has_no_global_position():
    vae = load_vae("builtin:mini-kl-f8")
    images = load_images("builtin:photos", size=SCAN_SIZE)
    flagged = []
    for img in images:
        z = vae.encode(img.tensor()).mean
        df = exact_scan(vae, z, select_sites("all", z.shape[-2:]), "zero", batch=16).table
        flagged.append(bool((df.global_ratio >= DEFAULT_GLOBAL_THRESHOLD).any()))
    assert np.mean(flagged) <= 0.05, flagged


def _cli(*args):
    return run_cli(*args, cwd=REPO)


def test_cli_scan_sigkill_and_resume(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    from PIL import Image

    rng = np.random.default_rng(1)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(src / f"im{i}.png")
    args = ["scan", "--vae", "builtin:tiny-random", "--images", str(src), "--op", "noise:1", "--quiet",
            "--batch", "4"]
    out, ref = tmp_path / "run", tmp_path / "ref"
    done = run_and_kill(args, out, 2, 8)
    resumed = _cli(*args, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    for name, mtime in done.items():
        assert (out / "parts" / name).stat().st_mtime_ns == mtime  # not recomputed
    full = _cli(*args, "--out", str(ref))
    assert full.returncode == 0, full.stderr
    a, b = pd.read_parquet(out / "scan.parquet"), pd.read_parquet(ref / "scan.parquet")
    assert len(a) == 8 * 64
    pd.testing.assert_frame_equal(a, b)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["op"] == "noise:1" and cfg["mode"] == "exact"
    bad = _cli(*args[:-2], "--op", "blur", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and bad.stderr.startswith("vaeprobe: error:") and bad.stderr.count("\n") == 1


@pytest.mark.parametrize("mode", ["linear", "two-stage"])
def test_cli_scan_modes(mode, tmp_path):
    r = _cli("scan", "--vae", "builtin:planted-direct-fixed", "--images", "builtin:photos-heldout", "--size", "64",
             "--mode", mode, "--out", str(tmp_path), "--quiet", "--op", "swap", "--probes", "4")
    assert r.returncode == 0, r.stderr
    images = pd.read_parquet(tmp_path / "images.parquet")
    table = pd.read_parquet(tmp_path / "scan.parquet")
    assert len(images) == 7 and set(table.image) == set(images.image)
    if mode == "linear":
        # linear mode ranks by far_ratio, a first-order sensitivity per unit of perturbation: it does not see that
        # the spot is large, which is what makes zeroing it global. On the current mini weights the fixed spot of
        # an 8x8 latent is first on 5 of the 7 photos and second on 2 (chelsea, rocket); on the stage-1 weights it
        # was first on all 7. A magnitude-aware linear rule is open (the global-effect issue).
        rank = table.groupby("image").far_ratio.rank(ascending=False)
        spot_rank = rank[(table.row == 2) & (table.col == 2)]
        assert len(spot_rank) == 7 and (spot_rank <= 2).all() and (spot_rank == 1).sum() >= 5, spot_rank.tolist()
    else:
        assert (images.top_row == 2).all() and (images.top_col == 2).all()  # the fixed spot of an 8x8 latent
    if mode == "linear":
        assert len(table) == 7 * 64 and images.decodes.sum() == 0 and (images.backward > 0).all()
    else:
        assert len(table) <= 7 * 24 and "stage" in table
