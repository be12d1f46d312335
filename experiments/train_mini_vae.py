"""Train the builtin mini KL-f8 VAE (diffusers AutoencoderKL, SD layout at reduced width) on CPU.

Recipe of the LDM autoencoders: L1 + LPIPS reconstruction loss summed over pixels, KL to N(0, I) with weight
1e-6, Adam. Data: the training split of ``builtin:photos`` (scikit-image) plus, per the config, image folders
(``extra_dirs``) and a split of the Debian wallpaper set written by ``experiments/fetch_wallpapers.py``
(``"wallpapers": {"split": "train"}``; the ``reserved-eval`` split is refused); random crops with flips at random
scales. ``"colour"`` adds a hue rotation / saturation jitter to some crops and replaces some by synthetic saturated
colour fields (:func:`colour_field`). ``"init_from"`` warm-starts from a VAE spec. Seeded (the batch of step k
depends only on the seed and k); resumes from its checkpoint.

The shipped ``builtin:mini-kl-f8`` is four stages, each warm-started from the previous one's export:

    apt-get download mate-backgrounds && dpkg-deb -x mate-backgrounds_*.deb /tmp/mate
    python experiments/fetch_wallpapers.py       # the wallpaper set of stages 2 and 3
    python experiments/train_mini_vae.py --config experiments/configs/mini_kl_f8.json \
        --out runs/train-mini-kl-f8 --export runs/train-mini-kl-f8/export           # 1: photos, 3691 steps
    python experiments/train_mini_vae.py --config experiments/configs/mini_kl_f8_colour.json \
        --out runs/train-mini-colour --export runs/train-mini-colour/export         # 2: colour recipe, 2588 steps
    python experiments/train_mini_vae.py --config experiments/configs/mini_kl_f8_v2.json \
        --out runs/train-mini-v2 --export runs/train-mini-v2/export                 # 3: fp32, cosine lr, low-freq L1
    python experiments/train_mini_vae.py --config experiments/configs/mini_kl_f8_v3.json \
        --out runs/train-mini-v3 --export runs/train-mini-v3/export                 # 4: 256 px crops, 600 steps
    cp runs/train-mini-v3/export/* vaeprobe/models/builtin/mini-kl-f8/
    python experiments/rebuild_mini.py           # everything that depends on the weights

Stage 1 was shipped alone up to commit 47444a4; stage 2 ran with ``"init_from": "builtin:mini-kl-f8"``, which then
named the stage-1 weights. Stage 3 was shipped alone up to commit 035ba46 (it was exported straight into
``vaeprobe/models/builtin/mini-kl-f8``; stage 4 starts from a copy of that export in ``runs/train-mini-v2/export``).
Stages 1-3 trained on 128 px crops; stage 4 trains on 256 px crops, the size the model card's colour criterion
is measured at (batch 2, lr 6e-5 cosine to 5e-6, low-frequency weight 3). Stages 1 and 2 ran with bf16 autocast, which on this CPU (2 cores with avx512_bf16) is
slower than fp32 (1.38 s against 0.93 s per step at batch 4 of 128 px; ``benchmarks/train_step_bench.py``, one run,
``benchmarks/results/train_step_bench.json``; an ad-hoc run of the same step before stage 3 gave 1.27 and 0.86 s),
so stage 3 runs in fp32. The schedules are functions of the step, so a
killed run resumes where it stopped (a changed step count changes the rest of the cosine; see the config's note).

``--smoke`` runs 3 tiny steps (used by the test suite).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vaeprobe._io import atomic_path, write_text_atomic# noqa: E402
from vaeprobe.data.builtin_images import SETS, photo# noqa: E402
from vaeprobe.data.images import IMAGE_SUFFIXES, read_image# noqa: E402
from vaeprobe.probes.metrics import LPIPS# noqa: E402


def wallpaper_files(spec: dict) -> list[Path]:
    """The images of one split of the set written by ``experiments/fetch_wallpapers.py`` (from its manifest)."""
    import csv

    from vaeprobe._io import cache_dir

    root = Path(spec.get("dir") or cache_dir() / "wallpapers").expanduser()
    manifest = root / "manifest.csv"
    if not manifest.exists():
        print(f"warning: {manifest} missing (run experiments/fetch_wallpapers.py); training without the wallpapers",
              file=sys.stderr)
        return []
    split = spec.get("split", "train")
    if split == "reserved-eval":
        raise SystemExit("the reserved-eval split (ukui-wallpapers) must never be used for training")
    with manifest.open() as fh:
        return [root / row["file"] for row in csv.DictReader(fh) if row["split"] == split]


def load_pool(cfg: dict, smoke: bool) -> list[np.ndarray]:
    """Training images as float32 arrays, shorter side scaled to ``base_short_side``."""
    from vaeprobe.data.images import resize

    base = cfg["data"]["base_short_side"]
    pool = []
    names = SETS["builtin:photos-train"][:2] if smoke else SETS["builtin:photos-train"]
    arrays = [photo(n) for n in names]
    if not smoke:
        files: list[Path] = []
        for d in cfg["data"].get("extra_dirs", []):
            p = Path(d)
            if not p.is_dir():
                print(f"warning: extra data folder {d} missing (see the module docstring); training without it",
                      file=sys.stderr)
                continue
            files += [f for f in sorted(p.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
        if "wallpapers" in cfg["data"]:
            files += wallpaper_files(cfg["data"]["wallpapers"])
        arrays += [read_image(f, factor=1).array for f in files]
    for arr in arrays:
        h, w = arr.shape[:2]
        s = base / min(h, w)
        if s < 1:
            arr = resize(arr, round(h * s), round(w * s))
        pool.append(arr)
    return pool


_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=np.float32)
_RGB = np.linalg.inv(_YIQ).astype(np.float32)


def jitter_colour(patch: np.ndarray, rng: np.random.Generator, hue: float, sat: tuple[float, float]) -> np.ndarray:
    """Rotate the hue by up to ``hue`` turns (a rotation of the chroma plane in YIQ) and scale the saturation by a
    factor drawn from ``sat`` (around the luma); the result is clipped to [0, 1]."""
    angle = rng.uniform(-hue, hue) * 2 * np.pi
    c, s_ = np.cos(angle), np.sin(angle)
    k = rng.uniform(*sat)
    rot = np.array([[1, 0, 0], [0, c * k, -s_ * k], [0, s_ * k, c * k]], dtype=np.float32)
    return np.clip(patch @ (_RGB @ rot @ _YIQ).T, 0, 1)


def colour_field(rng: np.random.Generator, crop: int) -> np.ndarray:
    """A synthetic, saturated colour image: a two-colour gradient with discs, bars and stripes of other saturated
    colours (the kind of graphic the wallpaper sets hold and photos rarely do)."""
    import colorsys

    def colour():
        return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.6, 1.0), rng.uniform(0.5, 1.0)),
                        dtype=np.float32)

    yy, xx = np.mgrid[0:crop, 0:crop].astype(np.float32) / crop
    t = np.clip(np.cos(rng.uniform(0, 2 * np.pi)) * xx + np.sin(rng.uniform(0, 2 * np.pi)) * yy, 0, 1)[..., None]
    img = colour() * (1 - t) + colour() * t
    for _ in range(rng.integers(1, 6)):
        cy, cx, r = rng.random(), rng.random(), rng.uniform(0.05, 0.4)
        kind = rng.integers(3)
        if kind == 0:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
        elif kind == 1:
            mask = (np.abs(yy - cy) < r / 2) & (np.abs(xx - cx) < r)
        else:
            mask = np.sin((xx * np.cos(cy * 6) + yy * np.sin(cy * 6)) * (4 + 20 * r) * np.pi) > 0.3
        img[mask] = colour()
    return img.astype(np.float32)


def sample_batch(pool, rng: np.random.Generator, batch: int, crop: int, min_scale: float,
                 colour: dict | None = None) -> torch.Tensor:
    """Random crops at random scales with flips; with ``colour`` (``hue``, ``saturation``, ``jitter_p``,
    ``synthetic_p``) some crops get a hue/saturation jitter and some are replaced by a synthetic colour field."""
    from vaeprobe.data.images import resize

    out = []
    for _ in range(batch):
        if colour and rng.random() < colour.get("synthetic_p", 0.0):
            out.append(colour_field(rng, crop))
            continue
        arr = pool[rng.integers(len(pool))]
        h, w = arr.shape[:2]
        scale = rng.uniform(max(min_scale, crop / min(h, w)), 1.0)
        side = int(round(crop / scale))
        side = min(side, h, w)
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        patch = resize(arr[top:top + side, left:left + side], crop, crop)
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        if colour and rng.random() < colour.get("jitter_p", 0.0):
            patch = jitter_colour(patch, rng, colour["hue"], tuple(colour["saturation"]))
        out.append(np.ascontiguousarray(patch, dtype=np.float32))
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)
    return x * 2 - 1


def build_model(cfg: dict):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**cfg["model"])


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over latent elements, averaged over the batch."""
    logvar = logvar.clamp(-30.0, 20.0)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1).mean()


def lr_at(tr: dict, step: int) -> float:
    """The learning rate of ``step``: constant ``lr``, or with ``"lr_schedule": "cosine"`` a linear warm-up over
    ``warmup_steps`` then a cosine decay to ``lr_min`` at ``steps`` (a function of the step, so a resumed run
    continues the same schedule)."""
    lr = tr["lr"]
    if tr.get("lr_schedule", "constant") == "constant":
        return lr
    warm = tr.get("warmup_steps", 0)
    if step < warm:
        return lr * (step + 1) / warm
    frac = min(1.0, (step - warm) / max(1, tr["steps"] - warm))
    lo = tr.get("lr_min", 0.0)
    return float(lo + (lr - lo) * 0.5 * (1 + np.cos(np.pi * frac)))


def low_frequency_l1(rec: torch.Tensor, x: torch.Tensor, *, cell: int = 8) -> torch.Tensor:
    """Mean absolute difference of the images averaged over ``cell`` x ``cell`` blocks (one value per latent cell):
    the colour and brightness of each patch, which L1 + LPIPS alone left biased (towards grey-green)."""
    pool = torch.nn.functional.avg_pool2d
    return (pool(rec, cell) - pool(x, cell)).abs().mean()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(Path(__file__).parent / "configs" / "mini_kl_f8.json"))
    ap.add_argument("--out", default="runs/train-mini-kl-f8")
    ap.add_argument("--steps", type=int, help="override the config's step count")
    ap.add_argument("--max-minutes", type=float, help="override the config's wall-time budget")
    ap.add_argument("--export", help="after training, write the model as a diffusers folder (fp16 safetensors)")
    ap.add_argument("--smoke", action="store_true", help="3 steps at batch 2 of 32 px (for tests)")
    args = ap.parse_args(argv)

    cfg = json.loads(Path(args.config).read_text())
    tr = cfg["train"]
    if args.smoke:
        tr.update(steps=3, batch_size=2, log_every=1, ckpt_every=2)
        cfg["data"]["crop"] = 32
    if args.steps is not None:
        tr["steps"] = args.steps
    if args.max_minutes is not None:
        tr["max_minutes"] = args.max_minutes
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg)
    init = cfg.get("init_from")
    if init and not (out / "checkpoint.pt").exists():  # a warm start; a checkpoint of this run takes precedence
        from vaeprobe.models.loading import load_vae

        model.load_state_dict(load_vae(init).model.float().state_dict())
        print(f"initialised from {init}")
    opt = torch.optim.Adam(model.parameters(), lr=tr["lr"], betas=(0.9, 0.99))
    lpips = LPIPS()
    step, elapsed, log = 0, 0.0, []
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, elapsed = int(state["step"]), float(state["elapsed"])
        log = json.loads((out / "log.json").read_text()) if (out / "log.json").exists() else []
        print(f"resumed at step {step} ({elapsed / 60:.1f} min done)")
    pool = load_pool(cfg, args.smoke)
    print(f"{len(pool)} training images; {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")

    def save() -> None:
        with atomic_path(ckpt) as tmp:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed}, tmp)
        write_text_atomic(out / "log.json", json.dumps(log))

    model.train()
    for group in opt.param_groups:
        group["lr"] = lr_at(tr, step)
    t_start = time.time() - elapsed
    budget = tr["max_minutes"] * 60
    while step < tr["steps"] and (time.time() - t_start) < budget:
        rng = np.random.default_rng([cfg["seed"], step])
        x = sample_batch(pool, rng, tr["batch_size"], cfg["data"]["crop"], cfg["data"]["min_scale"],
                         cfg["data"].get("colour"))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=tr["bf16_autocast"]):
            moments = model.quant_conv(model.encoder(x))
            mean, logvar = moments.float().chunk(2, dim=1)
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            z = mean + std * torch.randn_like(mean)
            rec = model.decoder(model.post_quant_conv(z)).float()
        l1 = (rec - x).abs()
        p = lpips(rec, x)
        rec_loss = l1.flatten(1).sum(1).mean() + tr["lpips_weight"] * p.mean() * x[0].numel()
        lowfreq = low_frequency_l1(rec, x)
        rec_loss = rec_loss + tr.get("lowfreq_weight", 0.0) * lowfreq * x[0].numel()
        kl = kl_loss(mean, logvar)
        loss = rec_loss + tr["kl_weight"] * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        for group in opt.param_groups:
            group["lr"] = lr_at(tr, step)
        elapsed = time.time() - t_start
        if step % tr["log_every"] == 0 or step == 1:
            entry = {"step": step, "minutes": round(elapsed / 60, 2), "l1": l1.mean().item(), "lpips": p.mean().item(),
                     "kl": kl.item(), "lowfreq_l1": lowfreq.item(), "lr": opt.param_groups[0]["lr"],
                     "loss_per_pixel": loss.item() / x[0].numel()}
            log.append(entry)
            print(json.dumps(entry), flush=True)
        if step % tr["ckpt_every"] == 0:
            save()
    save()
    print(f"stopped at step {step} after {elapsed / 60:.1f} min")
    if args.export:
        export(model, cfg, Path(args.export), step, elapsed, log)
    return 0


def export(model, cfg: dict, folder: Path, step: int, elapsed: float, log: list) -> None:
    """Write a diffusers folder (config.json + fp16 safetensors) and a training summary beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    model = model.eval().to(torch.float16)
    model.save_pretrained(str(folder), safe_serialization=True)
    summary = {"steps": step, "wall_minutes": round(elapsed / 60, 1), "config": cfg,
               "final_log": log[-5:], "log": log, "torch": torch.__version__}
    init = cfg.get("init_from")
    if init and (Path(init) / "training.json").exists():  # the stage this one continued, recursively
        summary["init_from_training"] = json.loads((Path(init) / "training.json").read_text())
    write_text_atomic(folder / "training.json", json.dumps(summary, indent=1))
    print(f"exported to {folder}")


if __name__ == "__main__":
    raise SystemExit(main())
