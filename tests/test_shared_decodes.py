"""Decodes shared between stages (issue 32): what one stage already decoded is reused by the next, and the numbers are
those of decoding it afresh. Each test counts the decodes, so a stage that silently decodes again fails, and compares
the reused values with a fresh computation, so reusing the wrong decodes fails too."""

import math

import numpy as np
import pandas as pd
import torch

from vaeprobe.models.loading import load_vae
from vaeprobe.probes.engine import Engine
from vaeprobe.probes.perturb import Site, Smudge, Zero
from vaeprobe.probes.scan import exact_scan, two_stage_scan
from vaeprobe.probes.verdict import (counterpart_cells, make_donors, matched_controls, matched_controls_many,
                                     receptive_field)


def _latent(vae, seed=3, size=64):
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return vae.encode(x).mean


def test_engine_takes_known_decodes_and_decodes_only_the_rest():
    vae = load_vae("builtin:tiny-random")
    z = _latent(vae)
    sites = [Site(1, 1), Site(2, 5), Site(4, 3)]
    fresh = torch.cat([b.decodes for b in Engine(vae, batch=3).batches(z, sites, Zero())])
    marker = torch.full_like(fresh[1], 7.0)  # a known decode is used as given, not recomputed
    engine = Engine(vae, batch=3)
    got = torch.cat([b.decodes for b in engine.batches(z, sites, Zero(), known={sites[1]: marker})])
    assert engine.decodes == 2 and engine.calls == 1
    assert torch.equal(got[1], marker)
    torch.testing.assert_close(got[[0, 2]], fresh[[0, 2]], rtol=1e-5, atol=1e-6)


def test_two_stage_controls_are_the_reference_cells_without_new_decodes():
    vae = load_vae("builtin:tiny-random")
    z = _latent(vae)
    ref = vae.decode(z)
    field = receptive_field(vae, z, ref, n=6)
    start = vae.decoded
    res = two_stage_scan(vae, z, "smudge", n_norm=2, n_linear=0, n_control=5, ref=ref, field=field,
                         measures=("far_l2", "l2"))
    df = res.table
    candidates = df[df.stage != "control"]
    controls = df[df.stage == "control"]
    assert set(zip(controls.row, controls.col)) == set(field.cells) - set(zip(candidates.row, candidates.col))
    assert res.decodes == len(candidates) == vae.decoded - start  # no control was decoded again
    # the reused rows equal an exact scan of the same cells
    fresh = exact_scan(vae, z, [Site(r, c) for r, c in zip(controls.row, controls.col)], "smudge", ref=ref,
                       measures=("far_l2", "l2")).table
    np.testing.assert_allclose(controls.far_l2.to_numpy(), fresh.far_l2.to_numpy(), rtol=1e-4)
    np.testing.assert_allclose(controls.l2.to_numpy(), fresh.l2.to_numpy(), rtol=1e-4)
    # another operator than the field's removal cannot reuse them: random controls, each decoded
    other = two_stage_scan(vae, z, "zero", n_norm=2, n_linear=0, n_control=5, ref=ref, field=field,
                           measures=("far_l2",))
    assert (other.table.stage == "control").sum() == 5 and other.decodes == len(other.table)


def test_matched_controls_in_one_batch_equal_one_at_a_time_and_reuse_the_removal():
    vae = load_vae("builtin:tiny-random")
    z = _latent(vae, seed=5)
    ref = vae.decode(z)
    field = receptive_field(vae, z, ref, n=5)
    sites = [Site(2, 2), Site(5, 4)]
    single = [matched_controls(vae, z, ref, s, field) for s in sites]
    removed = {s: b.decodes[0] for s in sites for b in Engine(vae).batches(z, [s], Smudge())}
    start = vae.decoded
    many = matched_controls_many(vae, z, ref, sites, field, known=removed)
    assert vae.decoded - start == len(sites) * 2 * 3  # 2 k controls each; the removal itself is known
    for a, b in zip(single, many):
        assert math.isclose(a["matched_ratio"], b["matched_ratio"], rel_tol=1e-4)
        assert math.isclose(a["transplant_ratio"], b["transplant_ratio"], rel_tol=1e-4)
        np.testing.assert_allclose(a["profile"], b["profile"], rtol=1e-4)


def test_counterpart_search_reuses_the_donors_removals():
    vae = load_vae("builtin:tiny-random")
    z = _latent(vae, seed=1)
    donors = make_donors(vae, [torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(s)) * 2 - 1
                               for s in (11, 12)])
    site = Site(3, 3)
    start = vae.decoded
    first = counterpart_cells(vae, z, site, donors, 1.5)
    made = vae.decoded - start
    again = counterpart_cells(vae, z, site, donors, 1.5)
    assert again == first and vae.decoded - start == made  # the second search decodes nothing
    assert 0 < made == len(donors.removed) <= 2 * len(first)
    # the cached energies are those of removing the cell in the donor's latent
    (j, rc, _), e = next(iter(donors.removed.items()))
    dec = next(Engine(vae).batches(donors.latents[j][None], [Site(*rc)], Smudge())).decodes
    want = (dec[0] - donors.decodes[j]).double().pow(2).sum(0).numpy()
    # float32 decodes in batches of another size differ by ~1e-7, a few 1e-4 of these small squared differences
    np.testing.assert_allclose(e.numpy(), want, rtol=1e-3, atol=1e-3 * float(want.max()))


def test_mechanism_job_records_once_and_measures_the_same(tmp_path):
    from vaeprobe.jobs.mechanism import run_mechanism
    from vaeprobe.probes.mechanism import attention_mass, groupnorm_droplets, record_pathways

    vae = load_vae("builtin:tiny-random")
    z = _latent(vae, seed=2)
    _, rec = record_pathways(vae, z, droplets=True)
    start = vae.decoded
    shared = attention_mass(vae, z, record=rec)
    drops = groupnorm_droplets(vae, z, record=rec)
    assert vae.decoded == start  # both read the record
    fresh = attention_mass(vae, z)
    assert [m.layer for m in shared] == [m.layer for m in fresh]
    for a, b in zip(shared, fresh):
        torch.testing.assert_close(a.mass, b.mass, rtol=1e-5, atol=1e-7)
    pd.testing.assert_frame_equal(drops, groupnorm_droplets(vae, z), rtol=1e-5)
    run = run_mechanism(vae, "builtin:photos-heldout", tmp_path / "m", size=64, figures=False, progress=False)
    # per image: one recorded clean decode + live and three frozen variants at top:1, nothing else
    per_image = [m["decodes"] for _, m in run.metas()]
    start = vae.decoded
    run_mechanism(vae, "builtin:photos-heldout", tmp_path / "m2", size=64, figures=False, progress=False)
    assert vae.decoded - start == sum(per_image) == 5 * len(per_image)


def test_a_random_removal_is_reused_only_with_the_same_seed():
    """noise:S names the same operator for every seed: reusing the reference cells' draws for another seed's scan
    would mix two perturbations, so only the same operator (seed included) reuses them."""
    from vaeprobe.probes.perturb import Noise

    vae = load_vae("builtin:tiny-random")
    z = _latent(vae, seed=4)
    ref = vae.decode(z)
    field = receptive_field(vae, z, ref, n=6, removal="noise:0.5")
    same = two_stage_scan(vae, z, Noise(0.5), n_norm=2, n_linear=0, n_control=5, ref=ref, field=field,
                          measures=("far_l2",))
    assert same.decodes == (same.table.stage != "control").sum()  # the field's draws reused
    other = two_stage_scan(vae, z, Noise(0.5, seed=3), n_norm=2, n_linear=0, n_control=5, ref=ref, field=field,
                           measures=("far_l2",))
    assert (other.table.stage == "control").sum() == 5 and other.decodes == len(other.table)
