"""The claims experiment (experiments/claims.py) runs from a config on any VAE spec and writes its results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_claims_experiment_on_a_planted_control(tmp_path):
    sys.path.insert(0, str(ROOT / "experiments"))
    import claims

    cfg = json.loads((ROOT / "experiments" / "configs" / "claims" / "builtin.json").read_text())
    cfg.update(name="tiny", models=["builtin:planted-groupnorm", "builtin:decoy-high-norm"], size=64, n_images=2,
               n_ordinary=2)
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg))
    done = claims.main([str(path), "--out", str(tmp_path / "out" / "tiny")])
    spot, decoy = done["models"]["builtin:planted-groupnorm"], done["models"]["builtin:decoy-high-norm"]
    # both have a black hole at a huge cell; only the one the decoder reads moves the far field when smudged
    for m in (spot, decoy):
        assert m["spot_rate"] == 1.0 and m["a_candidate_at_clamp"] == 2 and m["b_sigma_over_zero_candidate_median"] < 1e-5
    assert spot["a_smudge_colour_shift_candidate_median"] > 100 * decoy["a_smudge_colour_shift_candidate_median"]
    assert spot["c_candidate_verdicts"] == {"global": 2} and decoy["c_candidate_verdicts"] == {"high-norm": 2}
    assert spot["b_matched_ratio_candidate_median"] > 1 > decoy["b_matched_ratio_candidate_median"]
    assert (tmp_path / "out" / "tiny-logvar.png").stat().st_size > 0
    assert (tmp_path / "out" / "tiny-profiles.png").stat().st_size > 0
    table = (tmp_path / "out" / "tiny.md").read_text()
    assert "planted-groupnorm" in table and "high-norm 2" in table
    # a rerun with the same config skips the models already written
    again = claims.main([str(path), "--out", str(tmp_path / "out" / "tiny")])
    assert again["models"]["builtin:planted-groupnorm"]["seconds"] == spot["seconds"]
