"""Measurements on a loaded model: latent diagnostics (:mod:`~vaeprobe.probes.latents`), perturbation operators
(:mod:`~vaeprobe.probes.perturb`), responses (:mod:`~vaeprobe.probes.response`) and their geometry
(:mod:`~vaeprobe.probes.geometry`), scans (:mod:`~vaeprobe.probes.scan`, :mod:`~vaeprobe.probes.linear`), mechanism
attribution (:mod:`~vaeprobe.probes.mechanism`), verdicts (:mod:`~vaeprobe.probes.verdict`) and image metrics
(:mod:`~vaeprobe.probes.metrics`). Plain tensors and tables in and out; no files, no run directories.

Imports ``vaeprobe.models`` and ``vaeprobe.data``; nothing above it.
"""
