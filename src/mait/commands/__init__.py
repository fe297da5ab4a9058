"""Sub-commands of the ``mait`` command line, one module each (see :mod:`mait.cli`).

Every command runs with the whole public API imported (and the MaiT models registered in timm),
also under ``python -m mait``, where the package leaves that import to the command.
"""

from .. import _api  # noqa: F401
