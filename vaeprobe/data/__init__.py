"""Inputs: image loading (:mod:`vaeprobe.data.images`) and the builtin photo sets (:mod:`vaeprobe.data.builtin_images`).

Imports only :mod:`vaeprobe.errors` and :mod:`vaeprobe._io` from the package.
"""
