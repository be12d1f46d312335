"""Models: the VAE adapter (:mod:`~vaeprobe.models.adapter`), loading from any spec
(:mod:`~vaeprobe.models.loading`, :mod:`~vaeprobe.models.folders`, LDM single files in :mod:`~vaeprobe.models.ldm`,
TAESD-family pairs in :mod:`~vaeprobe.models.taesd`), the builtin registry (:mod:`~vaeprobe.models.zoo`) and the
planted controls (:mod:`~vaeprobe.models.controls`).

Imports ``vaeprobe.data`` at most; nothing above it.
"""
