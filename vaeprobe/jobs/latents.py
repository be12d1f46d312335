"""The ``vaeprobe latents`` job: latent maps, spot table and dataset statistics over a folder of images."""

from __future__ import annotations
import time
import pandas as pd
from vaeprobe.probes.latents import (DEFAULT_THRESHOLD, LatentStats, SPOT_COLUMNS, find_spots, image_moments, latent_maps)


# -- the `vaeprobe latents` job ------------------------------------------------------------------------------

def _safe(name: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    return keep[:80] or "image"


def run_latents(vae, images, out, size: int | None = None, fit: str = "crop", threshold: float = DEFAULT_THRESHOLD,
                top_k: int = 3, resume: bool = False, overwrite: bool = False, maps: bool = True,
                progress: bool = True, positions_table: bool = True):
    """Encode ``images`` with ``vae``; write maps, spot candidates and dataset statistics to run directory ``out``.

    Files: ``config.json``; ``positions.parquet`` (one row per image and latent position, columns of
    :meth:`LatentMaps.table`); ``images.parquet`` (one row per image, :meth:`LatentMaps.summary` plus
    ``n_spots``); ``spots.parquet`` (:func:`find_spots`); ``summary.json`` (:meth:`LatentStats.summary`, skipped
    inputs); ``maps/NNNNNN-NAME.png`` (image, norm ratio, raw log-variance and KL maps, spots circled). Each
    image's results are first written as a part under ``parts/``; ``resume=True`` skips finished images.
    Returns the :class:`~vaeprobe.jobs.runner.RunDir`.
    """
    from vaeprobe.jobs.runner import RunDir
    from vaeprobe.models.loading import load_vae

    if not hasattr(vae, "encode") or not hasattr(vae, "factor"):
        vae = load_vae(vae)
    config = {"job": "latents", "vae": vae.info(), "images": str(images), "size": size, "fit": fit,
              "threshold": threshold, "top_k": top_k, "maps": maps, "positions_table": positions_table}
    config["vae"].pop("device", None)
    started = time.perf_counter()
    run = RunDir(out, config, resume=resume, overwrite=overwrite)
    skipped: list = []
    stats = LatentStats()
    keys: list[str] = []
    for key, img, done in run.items(images, vae.factor, fit, size, skipped, "latents", progress):
        keys.append(key)
        if not done:
            with run.guard(key, img.name):
                post = vae.encode(img.tensor())
                m = latent_maps(post, [img.name])[0]
                spots = find_spots(m, threshold=threshold, top_k=top_k)
                cells = [(int(r), int(c)) for r, c in spots.loc[spots.is_spot, ["row", "col"]].values]
                summary = {**m.summary(), "n_spots": len(cells), "source": img.source}
                meta = {"image": img.name, "summary": summary, "moments": image_moments(post.mean[0], cells),
                        "spots": cells, "spot_table": spots.to_dict(orient="list")}
                if maps:
                    from vaeprobe.reports.plots import save_latent_maps

                    save_latent_maps(run.path / "maps" / f"{key}-{_safe(img.name)}.png", img.array, m, cells)
                run.write_part(key, m.table() if positions_table else None, meta)
        if not run.is_done(key):
            continue
        meta = run.meta(key)
        stats.add_summary(meta["summary"], meta["moments"], [tuple(c) for c in meta["spots"]])
        run.bar.set_postfix(spots=stats.n_spot_images)
    keys = run.finished(keys)
    if positions_table:
        run.concat("positions.parquet", keys)
    image_rows, spot_frames = [], []
    for key in keys:
        meta = run.meta(key)
        image_rows.append(meta["summary"])
        spot_frames.append(pd.DataFrame(meta["spot_table"], columns=SPOT_COLUMNS))
    run.write_table("images.parquet", pd.DataFrame(image_rows))
    spot_table = pd.concat(spot_frames, ignore_index=True) if spot_frames else pd.DataFrame(columns=SPOT_COLUMNS)
    run.write_table("spots.parquet", spot_table.astype({"image": str}))
    summary = {**stats.summary(), "threshold": threshold, "vae": config["vae"], "images": str(images),
               "skipped": [str(s) for s in skipped], "failed": run.failed}
    run.write_json("summary.json", summary)
    run.finish(time.perf_counter() - started)
    return run
