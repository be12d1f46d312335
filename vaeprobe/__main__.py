"""``python -m vaeprobe``: the console script."""

from vaeprobe.cli import main

raise SystemExit(main())
