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


def _verdict_forms():
    sys.path.insert(0, str(ROOT / "experiments"))
    import verdict_forms

    return verdict_forms


def test_ring_excess_is_one_for_an_ordinary_shape_and_large_for_a_flat_effect():
    """verdict_forms.ring_excess compares a cell's ring profile with its image's reference shape: an effect
    shaped like the reference (at any scale) gives 1 wherever it is averaged; a flat floor left where the
    reference has died gives a ratio that grows towards the outer rings; the reference's last value stands in
    past its end."""
    vf = _verdict_forms()
    shape = [4.0, 0.2, 0.01, 1e-3, 1e-4, 1e-4, 1e-4, 1e-4, 1e-4, 1e-4]
    field = json.dumps({"erf": 2.0, "shape": shape, "profile": [1.0], "band": [0.1]})
    ordinary = {"field": field, "profile": [30.0 * v for v in shape]}
    for where in ("erf", "2erf", "outer"):
        assert abs(vf.ring_excess(ordinary, where) - 1.0) < 1e-12
    flat = {"field": field, "profile": [4.0, 0.2, 0.04, 0.04, 0.04, 0.04, 0.04, 0.04, 0.04, 0.04, 0.04, 0.04]}
    near, outer = vf.ring_excess(flat, "erf"), vf.ring_excess(flat, "outer")
    assert near > 50 and outer > 300 and outer > near  # 0.04 / 1e-4 = 400 in the outer rings, less near erf
    assert abs(outer - 400.0) < 1e-9  # the rings past the reference's end (10, 11) use its last value, 1e-4
    empty = {"field": field, "profile": []}
    assert vf.ring_excess(empty, "erf") != vf.ring_excess(empty, "erf")  # nan


def test_internal_alpha_builds_the_control_with_the_weight_asked_for():
    """The sweep's variants are the shipped control but for alpha: the same decoder, whose output GroupNorm
    weighs the cell with that alpha (the shipped INTERNAL_ALPHA reuses the calibration rows)."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import internal_alpha

    from vaeprobe.models.controls import INTERNAL_ALPHA

    assert INTERNAL_ALPHA in internal_alpha.GRID and internal_alpha.GRID == tuple(sorted(internal_alpha.GRID))
    model = internal_alpha.build(0.4)("internal")
    assert model.alpha == 0.4 and model.decoder.conv_norm_out.alpha == 0.4
    assert internal_alpha.label(0.35) == "-a0.35"
