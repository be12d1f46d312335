"""Output: figures (:mod:`~vaeprobe.reports.plots`) and HTML/Markdown reports of a run directory
(:mod:`~vaeprobe.reports.report`, templates in ``templates/``).

Reads tables and ``summary.json``; imports only the package's core (errors, file helpers) and ``vaeprobe.data``
(image conversion), never the models or probes.
"""
