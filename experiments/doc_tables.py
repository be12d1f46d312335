"""Print the documentation's calibration tables from the results files, as Markdown.

    python experiments/doc_tables.py            # after python experiments/rebuild_mini.py

docs/latents.md (spot threshold), docs/scan.md (far-field radius and global-effect threshold) and
docs/mechanism.md (pathway attribution on the controls) quote these tables; paste them there when the weights
change, and check the prose around them against the new numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict | None:
    p = RESULTS / name
    return json.loads(p.read_text()) if p.exists() else None


def latents_table(d: dict) -> list[str]:
    out = ["| model | size | largest per-image max ratio | 99.9th percentile over all positions | lowest raw logvar |",
           "|---|---|---|---|---|"]
    for spec, per in d["models"].items():
        for size, e in per.items():
            lv = e["min_raw_logvar"]
            out.append(f"| `{spec.removeprefix('builtin:')}` | {size} px | {e['largest']:.2f} | "
                       f"{e['q999_all_positions']:.2f} | {'—' if lv is None else f'{lv:.1f}'} |")
    return out


def scan_table(d: dict) -> list[str]:
    out = [f"At {d['size']} px ({d['positions']} plus the planted cell):", "",
           "| model | radius90 of ordinary positions: median / 90th / 99th pct | largest ratio of an ordinary "
           "position (image) | smallest ratio of the planted spot |", "|---|---|---|---|"]
    for spec, m in d["models"].items():
        worst = max(m["images"], key=lambda r: r["ordinary_max_ratio"])
        planted = [r for r in m["images"] if r["truth"]]
        smallest = "—"
        if planted:
            # the ratio at the planted cell is the top ratio when the spot is found; report the top ratio
            smallest = f"{min(r['top_ratio'] for r in planted):,.0f}".replace(",", " ")
        out.append(f"| `{spec}` | {m['radius90_median']:g} / {m['radius90_q90']:g} / {m['radius90_q99']:g} | "
                   f"{worst['ordinary_max_ratio']:,.0f} ({worst['image']}) | {smallest} |".replace(",", " "))
    return out


def mechanism_table(d: dict) -> list[str]:
    out = ["| model | dominant pathway at the spot | median shares at the spot: GN / attention / residual | "
           "far-field energy left with both frozen: median / max | spot far_l2 (median) | ordinary cells: median "
           "shares GN / attention / residual, median far_l2 |", "|---|---|---|---|---|---|"]
    for name, m in d["models"].items():
        s, o = m["spot"], m.get("ordinary") or {}
        dom = ", ".join(f"{k} {v}" for k, v in sorted(s["dominant"].items(), key=lambda kv: -kv[1]))
        sh = " / ".join(f"{s['median_shares'][k]:.3f}" for k in ("groupnorm", "attention", "residual"))
        osh = " / ".join(f"{o['median_shares'][k]:.2f}" for k in ("groupnorm", "attention", "residual")) \
            if o.get("median_shares") else "—"
        out.append(f"| `{name}` | {dom} | {sh} | {s['median_both_frozen_over_live']:.1%} / "
                   f"{s['max_both_frozen_over_live']:.1%} | {s['median_far_l2_live']:.3g} | {osh}"
                   + (f", {o['median_far_l2_live']:.2g} |" if o.get("median_far_l2_live") is not None else " |"))
    return out


def main() -> None:
    import argparse
    import contextlib
    import io

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="also write the tables to this Markdown file")
    args = ap.parse_args()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        tables()
    print(buf.getvalue(), end="")
    if args.out:
        from vaeprobe._io import write_text_atomic

        write_text_atomic(args.out, "# Calibration tables for the current mini weights\n\nWritten by "
                                    "`python experiments/doc_tables.py` from `experiments/results/`.\n\n"
                          + buf.getvalue())


def tables() -> None:
    for title, name, fn in (("docs/latents.md: spot threshold", "latent_norm_ratios.json", latents_table),
                            ("docs/scan.md: defaults (64 px)", "scan_defaults_64.json", scan_table),
                            ("docs/scan.md: defaults (128 px)", "scan_defaults.json", scan_table),
                            ("docs/mechanism.md: what it measured", "mechanism_controls.json", mechanism_table)):
        d = _load(name)
        print(f"## {title} ({name})\n")
        print("\n".join(fn(d)) if d else f"(missing: run python experiments/rebuild_mini.py)")
        print()


if __name__ == "__main__":
    main()
