"""``python -m vaeprobe``: the console script."""

from .cli import main

raise SystemExit(main())
