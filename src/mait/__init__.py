"""mait: masked-attention vision transformers (MaiT, arXiv 2207.03006) for PyTorch and timm.

``import mait`` registers the MaiT models in timm; the public API is re-exported here.

Run as a program (``python -m mait``, ``torchrun -m mait``), Python imports this package before
``mait/__main__.py``; the API (and with it torch) is then left to the command that runs, so
``python -m mait --help`` answers as fast as ``mait --help``.  Any use of the API in that
process imports it (PEP 562 ``__getattr__``), and every command imports it before it starts.
"""

import importlib as _importlib
import logging as _logging
import os as _os
import sys as _sys

__version__ = "0.1.0"


def _configure_logging() -> None:
    """``MAIT_LOG_LEVEL=debug`` (or info, warning) prints the library's log, e.g. each layer's attention plan."""
    level = _os.environ.get("MAIT_LOG_LEVEL")
    if not level:
        return
    logger = _logging.getLogger("mait")
    if not isinstance(_logging.getLevelName(level.upper()), int):      # a registered level's name gives its number
        raise ValueError(f"MAIT_LOG_LEVEL must be one of debug, info, warning, error; got {level!r}")
    logger.setLevel(level.upper())
    if not logger.handlers:
        handler = _logging.StreamHandler()
        handler.setFormatter(_logging.Formatter("mait %(levelname)s: %(message)s"))
        logger.addHandler(handler)


def _run_as_program() -> bool:
    """Whether Python imports this package to run it with ``-m mait``: while it looks for the module
    to run, ``sys.argv[0]`` is ``"-m"``, and the interpreter's own arguments name this package."""
    command = getattr(_sys, "orig_argv", [])
    return (getattr(_sys, "argv", [])[:1] == ["-m"]
            and (["-m", __name__] in (command[i:i + 2] for i in range(len(command))) or f"-m{__name__}" in command))


_configure_logging()

if _run_as_program():
    def __getattr__(name: str):
        """The public API, imported on its first use (a probe of a dunder name imports nothing)."""
        if not name.startswith("__"):
            api = _importlib.import_module(f"{__name__}._api")
            if name in api.__all__:
                return getattr(api, name)
            if name in globals():                       # a submodule that importing the API imported
                return globals()[name]
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
else:
    from ._api import *  # noqa: F401,F403  (the public API; it registers the MaiT models in timm)
    from ._api import __all__  # noqa: F401
