"""Sub-commands of the ``mait`` command line, one module each (see :mod:`mait.cli`)."""
