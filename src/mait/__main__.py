"""``python -m mait`` is the ``mait`` command line."""

from .cli import main

raise SystemExit(main())
