"""Seconds per training step of the mini VAE on CPU: bf16 autocast against fp32 (why stage 3 trains in fp32).

    python benchmarks/train_step_bench.py [--repeats 3] [--out benchmarks/results/train_step_bench.json]

One step = encoder + decoder forward on the posterior mean, L1 + LPIPS, backward, Adam, on random inputs (no data
loading), for batch 4 of 128 px and batch 16 of 64 px, after one warm-up step. Run it on an idle machine.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from train_mini_vae import build_model  # noqa: E402

from vaeprobe._io import write_text_atomic# noqa: E402
from vaeprobe.probes.metrics import LPIPS# noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "experiments" / "configs"
                                            / "mini_kl_f8_v2.json"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = build_model(json.loads(Path(args.config).read_text()))
    lpips = LPIPS()
    opt = torch.optim.Adam(model.parameters(), 1e-4)

    def step(x: torch.Tensor, bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            mean = model.quant_conv(model.encoder(x)).float().chunk(2, 1)[0]
            rec = model.decoder(model.post_quant_conv(mean)).float()
        loss = (rec - x).abs().mean() + lpips(rec, x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    rows = []
    for batch, crop in ((4, 128), (16, 64)):
        x = torch.rand(batch, 3, crop, crop) * 2 - 1
        for bf16 in (True, False):
            step(x, bf16)
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                step(x, bf16)
            rows.append({"batch": batch, "crop": crop, "bf16_autocast": bf16,
                         "seconds_per_step": (time.perf_counter() - t0) / args.repeats})
            print(json.dumps(rows[-1]), flush=True)
    res = {"threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}
    if args.out:
        write_text_atomic(args.out, json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
