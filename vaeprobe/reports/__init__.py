"""Output: figures (:mod:`~vaeprobe.reports.plots`) and HTML/Markdown reports of a run directory
(:mod:`~vaeprobe.reports.report`, templates in ``templates/``).

Reads tables and ``summary.json``; imports no layer but the package's core (errors, file helpers).
"""
