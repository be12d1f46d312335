"""The spot through a diffusion pipeline (issue 9), on tiny offline pipelines built from configs.

Ground truth: ``builtin:tiny-sd-planted``'s UNet makes its x0 prediction hold a known vector at a known cell from
a known timestep on (:class:`vaeprobe.models.pipelines.ContentUNet`); ``builtin:tiny-sd`` plants nothing.
"""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import REPO, run_and_kill, run_cli
from vaeprobe.jobs.pipeline import (PipelineError, emergence_table, generate, load_pipeline, parse_seeds, read_prompts,
                                    run_pipeline)
from vaeprobe.models.pipelines import PLANTED_CODE, PLANTED_EMERGE_T, ContentUNet, tiny_sd_pipeline
from vaeprobe.models.adapter import VAE

PROMPTS = ["a lighthouse on a cliff", "a red fox in snow", "<script>alert(1)</script> & a \"quoted\" cat"]


def truth(pipe, prompt: str, steps: int, h: int = 8, w: int = 8) -> tuple[int, tuple[int, int]]:
    """(emergence step, cell) by construction: the first step whose timestep is <= the planted timestep, and the
    cell the UNet derives from the conditional prompt embedding."""
    pipe.scheduler.set_timesteps(steps)
    step = next(i for i, t in enumerate(pipe.scheduler.timesteps.tolist()) if t <= PLANTED_EMERGE_T)
    emb = pipe.encode_prompt(prompt, "cpu", 1, True)[0]
    return step, ContentUNet.spot_cell(emb, h, w)


@pytest.fixture(scope="module")
def planted():
    return tiny_sd_pipeline(planted=True)


def test_emergence_matches_the_planted_step_and_cell(planted):
    own = VAE(planted.vae)
    scaled = torch.tensor(PLANTED_CODE) * own.scaling_factor
    for prompt in PROMPTS:
        for seed in (0, 3):
            gen = generate(planted, prompt, seed, steps=10)
            table = emergence_table(gen, own.from_diffusion)
            step, cell = truth(planted, prompt, 10)
            assert table.spot.tolist() == [i >= step for i in range(10)], (prompt, seed, table)
            late = table[table.step >= step]
            assert set(zip(late.row, late.col)) == {cell}
            assert (late.norm_ratio > 20).all() and (table[table.step < step].norm_ratio < 5).all()
            # the captured x0 holds exactly the planted vector at the cell
            assert torch.allclose(gen.x0[-1][0, :, cell[0], cell[1]], scaled, rtol=1e-4)


def test_clean_pipeline_never_shows_a_spot():
    pipe = tiny_sd_pipeline(planted=False)
    own = VAE(pipe.vae)
    for prompt in PROMPTS[:2]:
        table = emergence_table(generate(pipe, prompt, 1, steps=8), own.from_diffusion)
        assert not table.spot.any(), table
        assert table.norm_ratio.iloc[-1] < 5


@pytest.mark.parametrize("kind", ["dpm", "v_prediction"])
def test_x0_capture_for_other_schedulers(kind):
    """DPM-Solver returns no pred_original_sample (x0 is computed from alphas_cumprod); a v-prediction model goes
    through DDIM's own x0. Both must recover the planted vector exactly, and the scheduler is left unpatched."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    pipe = tiny_sd_pipeline(planted=True)
    own = VAE(pipe.vae)
    if kind == "dpm":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    else:
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
        code = [v * own.scaling_factor for v in PLANTED_CODE]
        pipe.unet.setup(pipe.scheduler.alphas_cumprod, pipe.vae, "v_prediction", spot=code)
    gen = generate(pipe, PROMPTS[0], 0, steps=6)
    _, cell = truth(pipe, PROMPTS[0], 6)
    assert "step" not in vars(pipe.scheduler)
    x0 = gen.x0[-1][0, :, cell[0], cell[1]]
    assert torch.allclose(x0, torch.tensor(PLANTED_CODE) * own.scaling_factor, rtol=1e-3), x0
    assert emergence_table(gen, own.from_diffusion).spot.iloc[-1]


def test_run_pipeline_end_to_end(tmp_path, planted):
    """Emergence, interventions (final latent and from step k) and the VAE swap on the planted pipeline, with a
    planted-control VAE, a latent-compatible fine-tune and an incompatible VAE; then the report."""
    out = tmp_path / "run"
    steps, k = 8, 6
    summary = run_pipeline(planted, PROMPTS, "0,1", out, steps=steps, controls=6, ablate_from=[k], step_controls=2,
                           vaes=["builtin:planted-direct", "builtin:mini-kl-f8-ft-mse"], progress=False).summary
    n = len(PROMPTS) * 2
    assert summary["n_samples"] == n and summary["emerged"] == f"{n}/{n}"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["prompts"] == PROMPTS and cfg["seeds"] == [0, 1] and cfg["steps"] == steps
    assert cfg["vaes"][1:] == ["builtin:planted-direct", "builtin:mini-kl-f8-ft-mse"]
    assert (out / "run.json").exists() and (out / "figures" / "emergence.png").exists()

    em = pd.read_parquet(out / "emergence.parquet")
    assert len(em) == n * steps
    for (prompt, seed), grp in em.groupby(["prompt", "seed"]):
        step, cell = truth(planted, prompt, steps)
        assert grp.sort_values("step").spot.tolist() == [i >= step for i in range(steps)]
        assert (int(grp.row.iloc[-1]), int(grp.col.iloc[-1])) == cell

    inter = pd.read_parquet(out / "interventions.parquet")
    final = inter[inter.when == "final"]
    assert len(final) == n * 3 * 7  # 3 VAEs x (spot + 6 controls)
    direct = final[final.vae == "builtin:planted-direct"]
    for key, grp in direct.groupby("key"):
        spot, ctrl = grp[grp.kind == "spot"].iloc[0], grp[grp.kind == "control"]
        assert (spot.row, spot.col) == truth(planted, grp.prompt.iloc[0], steps)[1]
        # the planted decoder reads the colour at the spot: erasing it moves the whole image, random cells do not
        assert spot.far_l2 > 100 * ctrl.far_l2.max(), grp
        # a uniform colour shift of the whole far field (the code's offset is 1.5 in [-1, 1] units), not a local edit
        assert abs(spot.far_dy) > 0.5 and ctrl.far_dy.abs().max() < 0.1
    stepk = inter[(inter.from_step == k) & (inter.vae == "builtin:planted-direct")]
    assert set(stepk.kind) == {"spot", "control"} and len(stepk) == n * 3
    for key, grp in stepk.groupby("key"):
        assert grp[grp.kind == "spot"].far_l2.iloc[0] > 100 * grp[grp.kind == "control"].far_l2.max()

    swap = pd.read_parquet(out / "swap.parquet")
    ft = swap[swap.vae == "builtin:mini-kl-f8-ft-mse"]
    assert ft.compatible.all() and ft.lpips.between(1e-4, 0.3).all() and ft.d_mean_luma.notna().all()
    bad = swap[swap.vae == "builtin:planted-direct"]
    assert (~bad.compatible).all() and bad.lpips.isna().all() and bad.d_mean_luma.isna().all()
    assert bad.note.str.startswith("not latent-compatible").all()
    own = swap[swap.vae_index == 0]
    assert (own.lpips == 0).all()

    from vaeprobe.reports.report import build_report

    rep = build_report([out], out=tmp_path / "report")
    html = rep["html"].read_text()
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "spot emergence over the denoising steps" in html
    assert html.count("data:image/jpeg;base64") + html.count("data:image/png;base64") >= n * 3 * 4
    heads = [h for h in rep["headlines"] if h["job"] == "pipeline"]
    assert heads[0]["value"].startswith(f"{n}/{n}; emerged and stayed in {n}/{n}")
    assert any(h["model"] == "builtin:planted-direct" and f"in {n}/{n}" in h["value"] for h in heads)
    assert (tmp_path / "report" / "tables").exists()


def test_same_command_twice_gives_the_same_numbers(tmp_path):
    kwargs = dict(prompts=PROMPTS[:1], seeds="5", steps=4, controls=3, ablate_from=[2], step_controls=1,
                  vaes=["builtin:mini-kl-f8-ft-mse"], progress=False)
    run_pipeline("builtin:tiny-sd-planted", out=tmp_path / "a", **kwargs)
    run_pipeline("builtin:tiny-sd-planted", out=tmp_path / "b", **kwargs)
    for name in ("emergence.parquet", "interventions.parquet", "swap.parquet"):
        a, b = pd.read_parquet(tmp_path / "a" / name), pd.read_parquet(tmp_path / "b" / name)
        pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_batched_generation_keeps_each_sample(tmp_path, planted):
    """--batch: samples generated together start from their own seeded noise and give the one-sample run's tables
    (the UNet's batched kernels round differently: equal to 1e-5, and the detected spots are the same cells)."""
    from vaeprobe.jobs.pipeline import generate_batch

    gens = generate_batch(planted, PROMPTS[:2] * 2, [3, 3, 4, 4], steps=4)
    for g in gens:
        one = generate(planted, g.prompt, g.seed, steps=4)
        assert torch.allclose(g.latents, one.latents, atol=1e-5) and len(g.x0) == len(one.x0) == 4
    assert not torch.allclose(gens[0].latents, gens[2].latents)       # another seed, other noise
    kwargs = dict(prompts=PROMPTS[:2], seeds="0-2", steps=4, controls=2, lpips=False, progress=False)
    run_pipeline("builtin:tiny-sd-planted", out=tmp_path / "one", **kwargs)
    with pytest.raises(PipelineError, match="--batch 0: give the number of samples"):
        run_pipeline("builtin:tiny-sd-planted", out=tmp_path / "zero", batch=0, **kwargs)
    run = run_pipeline("builtin:tiny-sd-planted", out=tmp_path / "four", batch=4, **kwargs)
    assert run.summary["n_samples"] == 6
    for name in ("emergence.parquet", "interventions.parquet"):
        a, b = pd.read_parquet(tmp_path / "one" / name), pd.read_parquet(tmp_path / "four" / name)
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-4, atol=1e-5)
        assert (a[["row", "col"]].to_numpy() == b[["row", "col"]].to_numpy()).all()


def test_half_precision_pipeline_runs_on_cpu(tmp_path):
    """The GPU path (bf16 UNet and text encoder) at tiny scale on CPU; measured decodes stay float32."""
    pipe = load_pipeline("builtin:tiny-sd-planted", dtype="bf16")
    assert pipe.unet.dtype == torch.bfloat16
    summary = run_pipeline(pipe, PROMPTS[:1], "0", tmp_path / "bf16", steps=6, controls=3, lpips=False,
                           progress=False).summary
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["vae_dtype"] == "fp32"
    assert summary["final_spot_rate"] == 1.0
    inter = pd.read_parquet(tmp_path / "bf16" / "interventions.parquet")
    assert np.isfinite(inter.far_l2).all()


def test_pipeline_from_a_local_folder(tmp_path):
    from diffusers import UNet2DConditionModel

    from vaeprobe.models.pipelines import TINY_UNET

    pipe = tiny_sd_pipeline()
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel(**TINY_UNET).eval()  # a stock diffusers UNet, loadable by class name
    pipe.register_modules(unet=pipe.unet)
    pipe.save_pretrained(tmp_path / "sd")
    loaded = load_pipeline(str(tmp_path / "sd"))
    assert type(loaded).__name__ == "StableDiffusionPipeline"
    a = generate(pipe, "a boat", 2, steps=3).latents
    b = generate(loaded, "a boat", 2, steps=3).latents
    assert torch.equal(a, b)


def test_bad_inputs_give_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(PipelineError, match="no prompts found"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(PipelineError, match="no such prompt file"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "p.json").write_text('{"a": 1}')
    with pytest.raises(PipelineError, match="list of strings"):
        read_prompts(tmp_path / "p.json")
    with pytest.raises(PipelineError, match="bad seed"):
        parse_seeds("1,x")
    assert parse_seeds("3-5,1") == [3, 4, 5, 1]
    with pytest.raises(PipelineError, match="model_index.json"):
        load_pipeline(str(tmp_path))
    with pytest.raises(PipelineError, match="unknown builtin pipeline"):
        load_pipeline("builtin:nope")
    with pytest.raises(PipelineError, match="pass the local folder"):
        load_pipeline("someone/not-a-pipeline")
    with pytest.raises(PipelineError, match="outside 0..3"):
        run_pipeline("builtin:tiny-sd", ["x"], "0", tmp_path / "r", steps=4, ablate_from=[4], progress=False)
    (tmp_path / "prompts.txt").write_text("a cat\n")
    res = run_cli("pipeline", "--model", "builtin:tiny-sd", "--prompts", tmp_path / "prompts.txt", "--op", "blur",
                  "--out", tmp_path / "c", cwd=REPO)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0
    assert res.stderr.startswith("vaeprobe: error: unknown operator 'blur'")


def test_a_failing_sample_is_reported_and_the_run_goes_on(tmp_path, monkeypatch):
    import vaeprobe.jobs.pipeline as vp

    real = vp.generate

    def flaky(pipe, prompt, seed, **kw):
        if prompt == "boom":
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(pipe, prompt, seed, **kw)

    monkeypatch.setattr(vp, "generate", flaky)
    summary = run_pipeline("builtin:tiny-sd", ["a cat", "boom", "a dog"], "0", tmp_path / "r", steps=3, controls=2,
                           lpips=False, progress=False).summary
    assert summary["n_samples"] == 2
    assert [(f["key"], f["image"]) for f in summary["failed"]] == [("p0001-s0", "p0001-s0")]
    assert [(f["prompt"], f["seed"], f["error"]) for f in summary["failed"]] == [
        ("boom", 0, "RuntimeError: CUDA out of memory (simulated)")]
    assert set(pd.read_parquet(tmp_path / "r" / "emergence.parquet").prompt) == {"a cat", "a dog"}
    with pytest.raises(PipelineError, match="multiple of the VAE factor 8"):
        run_pipeline("builtin:tiny-sd", ["x"], "0", tmp_path / "s", size=60, progress=False)


def test_cli_resume_after_kill(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na lighthouse\na red fox\n")
    args = ["pipeline", "--model", "builtin:tiny-sd-planted", "--vae", "builtin:planted-direct", "--prompts",
            str(prompts), "--seeds", "0-1", "--steps", "4", "--controls", "3", "--no-lpips", "--quiet"]
    full = tmp_path / "full"
    res = run_cli(*args, "--out", full, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert "4 samples (2 prompts x 2 seeds, 4 steps)" in res.stdout and "builtin:planted-direct" in res.stdout
    killed = tmp_path / "killed"
    done = run_and_kill(args, killed, min_parts=1, total=4)  # the one run that must be a process: it is killed
    res = run_cli(*args, "--out", killed, "--resume", cwd=REPO)
    assert res.returncode == 0, res.stderr
    for name, mtime in done.items():  # finished samples were not recomputed
        assert (killed / "parts" / name).stat().st_mtime_ns == mtime
    for name in ("emergence.parquet", "interventions.parquet", "swap.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(full / name), pd.read_parquet(killed / name))


def test_pipeline_noise_means_what_it_means_in_scan(tmp_path):
    """``--op noise:S`` is S x the perturbed latent's robust per-channel std in ``pipeline`` as in ``scan`` (it was
    raw latent units in ``pipeline``; issue 31): the pipeline's final-latent interventions equal an exact scan of
    the same latent with the same operator."""
    from vaeprobe.probes.latents import robust_channel_stats
    from vaeprobe.probes.perturb import Site
    from vaeprobe.probes.scan import exact_scan

    pipe = tiny_sd_pipeline(planted=False)
    prompt, steps = "a red fox in snow", 3
    run_pipeline(pipe, [prompt], "0", tmp_path / "run", steps=steps, controls=3, op="noise:0.5", lpips=False,
                 progress=False)
    own = VAE(pipe.vae)
    z = own.from_diffusion(generate(pipe, prompt, 0, steps=steps).latents).float()
    std = robust_channel_stats(z)["std"]
    assert (std - 1).abs().max() > 0.2, std  # raw units would differ: the test can tell them apart
    inter = pd.read_parquet(tmp_path / "run" / "interventions.parquet")
    mine = inter[(inter.vae_index == 0) & (inter.when == "final")]
    sites = [Site(int(r), int(c)) for r, c in zip(mine.row, mine.col)]
    from vaeprobe.probes.perturb import Noise

    scan_op = Noise(0.5, std=std, seed=0)  # what the scan job has always built: the image's robust std
    ref = exact_scan(own, z, sites, scan_op, measures=("l2", "far_l2"), batch=len(sites)).table
    assert np.allclose(mine.l2.to_numpy(), ref.l2.to_numpy(), rtol=1e-4)
    assert np.allclose(mine.far_l2.to_numpy(), ref.far_l2.to_numpy(), rtol=1e-4, atol=1e-12)
    raw = exact_scan(own, z, sites, Noise(0.5, std=1.0, seed=0), measures=("l2",), batch=len(sites)).table
    assert not np.allclose(mine.l2.to_numpy(), raw.l2.to_numpy(), rtol=0.05)  # the old meaning fails
