"""Jobs: what the CLI commands run. The job runner (:mod:`~vaeprobe.jobs.runner`) owns the run directory, the
per-item loop with progress, resume and per-item failures, and the summary; each job (latents, scan, mechanism,
compare, pipeline, demo) supplies its per-item work.

Imports every layer below it (``reports``, ``probes``, ``models``, ``data``).
"""
