"""``python -m mait`` (and ``torchrun -m mait``) is the ``mait`` command line."""

from mait_cli import main

raise SystemExit(main())
