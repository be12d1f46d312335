"""The project's vocabulary: verdict names, column groups and summary keys, on the ground floor.

Probes, controls, jobs, reports, the CLI and experiments read these names from here instead of writing them
again. Words with one meaning each:

- **verdict**: the class of one scanned cell (:data:`VERDICTS`), from :class:`vaeprobe.probes.verdict.VerdictRules`.
  What ``compare`` says of a candidate VAE against the reference is its *assessment* (``compare.parquet``
  column ``verdict`` keeps its name for existing readers; docs/outputs.md says so).
- **far field**: the pixels beyond the image's receptive field (``erf`` cells from the cell); the measures of
  :mod:`vaeprobe.probes.response` that use a fixed ``radius`` instead say so in their name (``far_l2``,
  ``far_fraction``: beyond ``radius`` cells).
- **fit**: how image sides become multiples of the VAE's factor (``--fit`` and the ``fit`` keyword of every
  loader and job; the loaders called it ``policy`` before).

>>> GLOBAL_INFORMATION in GLOBAL_VERDICTS and ORDINARY not in GLOBAL_VERDICTS
True
>>> set(DECIDING_COLUMNS) <= set(PROFILE_COLUMNS + EVIDENCE_COLUMNS)
True
"""

ORDINARY = "ordinary"
HIGH_NORM = "high-norm"
WIDE_LOCAL = "wide-local"
GLOBAL = "global"
GLOBAL_INFORMATION = "global-information"

VERDICTS = (ORDINARY, HIGH_NORM, WIDE_LOCAL, GLOBAL, GLOBAL_INFORMATION)
"""Every cell verdict, from the most ordinary to the most global."""
GLOBAL_VERDICTS = (GLOBAL, GLOBAL_INFORMATION)
"""The verdicts for which ``is_global`` is true."""

SITE_COLUMNS = ("row", "col", "size", "channel", "op")
"""The columns that name a perturbation in every table (channel -1: all channels)."""

PROFILE_COLUMNS = ("norm_ratio", "dz2", "near_levels", "far_levels", "band_levels", "far_plateau",
                   "far_plateau_lo", "far_plateau_hi", "decay_exponent", "decay_exponent_lo", "far_excess",
                   "excess_ratio", "ordinary_plateau", "tail_share", "far_abs", "far_rel")
"""The measures of removing one cell (:func:`vaeprobe.probes.verdict.profile_columns`)."""
EVIDENCE_COLUMNS = ("swap_corr", "swap_slope", "swap_structure_corr", "swap_structure_slope", "matched_ratio",
                    "transplant_ratio", "frozen_removed")
"""The evidence measured for some cells only (the swap test, matched controls, the frozen-pathway share)."""
DECIDING_COLUMNS = ("far_plateau_lo", "ordinary_plateau", "decay_exponent_lo", "band_levels", "excess_ratio",
                    "norm_ratio", "swap_corr", "swap_slope", "swap_structure_corr", "swap_structure_slope")
"""The columns the verdict rule reads (:meth:`vaeprobe.probes.verdict.VerdictRules.verdict`); the rest are
evidence shown beside it."""
VERDICT_COLUMNS = ("verdict", "is_global", "below_visibility", "erf")
"""What the verdicts add to a scan table besides the measures."""

SHOWN_EVIDENCE = ("norm_ratio", "far_plateau", "far_plateau_lo", "far_plateau_hi", "decay_exponent", "band_levels",
                  "far_excess", "swap_corr", "swap_slope", "swap_structure_slope", "frozen_removed", "matched_ratio",
                  "transplant_ratio")
"""The measures a report shows beside each non-ordinary verdict."""
RESPONSE_COLUMNS = ("global_ratio", "far_ratio", "far_l2", "far_fraction", "radius90", "far_dy", "l2", "psnr",
                    "far_sensitivity", "stage")
"""The response measures and scan columns a report lists after the verdict's (:mod:`vaeprobe.probes.response`)."""
SCAN_SHOWN = (("verdict",) + ("norm_ratio", "far_plateau", "far_plateau_lo", "far_plateau_hi", "decay_exponent",
                              "below_visibility", "near_levels", "far_levels", "band_levels", "far_excess")
              + EVIDENCE_COLUMNS[:4] + EVIDENCE_COLUMNS[4:] + RESPONSE_COLUMNS)
"""The columns a report shows for a kept cell, in order, where present."""

SUMMARY_KEYS = ("n_images", "global_rate", "verdicts", "decodes", "seconds", "skipped", "failed")
"""Keys every scan summary (``summary.json``) holds; ``global_rate`` is the share of images with at least one
cell whose verdict is in :data:`GLOBAL_VERDICTS`."""


def global_cell_phrase() -> str:
    """How reports and the CLI name a global cell.

    Examples
    --------
    >>> global_cell_phrase()
    'a global cell (verdict global or global-information)'
    """
    return f"a global cell (verdict {' or '.join(GLOBAL_VERDICTS)})"
