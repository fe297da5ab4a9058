"""The command line's own machinery: it answers --help without importing torch, its config options are
TrainConfig's fields, its output files are written atomically, and progress bars stay off pipes."""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mait.commands._output import new_file
from mait.errors import UserError
from mait.train import TrainConfig
from mait.train.logs import progress_bar
from mait_cli import build_parser
from mait_cli.config_keys import config_keys
from mait_cli.options import COMMANDS

SRC = Path(__file__).resolve().parents[1] / "src"


def test_help_and_wrong_options_import_neither_torch_nor_timm_nor_mait() -> None:
    light = list(COMMANDS)
    script = textwrap.dedent(f"""
        import contextlib, io, sys
        from mait_cli import main
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            codes = [main(["--help"]), main([])] + [main([name, "--help"]) for name in {light!r}]
            codes += [main(["export", "--checkpoint", "x", "--format", "tflite"]),
                      main(["train", "--epoch-count", "3"])]
        assert codes == [0] * {len(light) + 2} + [2, 2], codes
        heavy = sorted(name for name in ("torch", "timm", "mait", "numpy") if name in sys.modules)
        assert not heavy, heavy
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr


def _python(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, *arguments], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def _imported(importtime: str) -> set[str]:
    """The modules named by ``python -X importtime``'s report."""
    return {line.rsplit("|", 1)[1].strip() for line in importtime.splitlines() if line.startswith("import time:")}


def test_python_m_mait_help_imports_neither_torch_nor_the_api(tmp_path: Path) -> None:
    result = _python("-X", "importtime", "-m", "mait", "--help", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("usage: mait [-h] COMMAND"), result.stderr[-2000:]
    imported = _imported(result.stderr)
    assert {"mait", "mait_cli"} <= imported, sorted(imported)
    heavy = sorted(name for name in imported if name.split(".")[0] in ("torch", "timm", "numpy")
                   or name in ("mait._api", "mait.models"))
    assert not heavy, heavy
    result = _python("-X", "importtime", "-c", "import mait", cwd=tmp_path)      # a plain import stays eager
    assert result.returncode == 0 and {"torch", "timm", "mait._api", "mait.models"} <= _imported(result.stderr)


def test_python_m_mait_runs_commands_with_the_whole_api(tmp_path: Path) -> None:
    """Under ``python -m mait`` a command still finds the models registered in timm and the API in the package."""
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent("""
        import sys, timm
        import mait, mait.commands
        print(mait.__version__, "mait_nano4_8" in timm.list_models("mait_*"), mait.MaskedAttention.__name__,
              mait.backends.__name__)
        try:
            mait.no_such_name
        except AttributeError as error:
            print(error)
    """))
    result = _python("-m", "mait", "flops", "mait_nano4_8", cwd=tmp_path)
    assert result.returncode == 0 and "mait_nano4_8" in result.stdout, result.stderr[-2000:]
    result = _python("-c", f"import runpy, sys; sys.argv = ['-m']; sys.orig_argv = ['python', '-m', 'mait']; "
                           f"import mait; sys.argv = ['probe']; runpy.run_path({str(script)!r})", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["0.1.0 True MaskedAttention mait.backends",
                                          "module 'mait' has no attribute 'no_such_name'"]


def test_config_options_are_the_fields_of_train_config() -> None:
    fields = {item.name: item for item in dataclasses.fields(TrainConfig)}
    assert [key.name for key in config_keys()] == list(fields)
    defaults = TrainConfig()
    for key in config_keys():
        assert key.is_switch == (fields[key.name].type in (bool, "bool", "Optional[bool]")), key.name
        assert key.default == getattr(defaults, key.name), key.name


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_declares_options_and_help(command: str) -> None:
    parser, command_parser = build_parser(command)
    assert command_parser is not None and command_parser.prog == f"mait {command}"
    assert command_parser.format_help().startswith(f"usage: mait {command}")


def test_a_new_file_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "model.pt2"
    with pytest.raises(RuntimeError, match="the export failed"):
        with new_file(path, (".pt2",)) as written:
            written.write_bytes(b"half a file")
            raise RuntimeError("the export failed")
    assert not path.exists() and list(path.parent.iterdir()) == []
    with new_file(path, (".pt2",)) as written:
        assert written.parent == path.parent and written.suffix == ".pt2" and written.is_file()
        written.write_bytes(b"whole")
    assert path.read_bytes() == b"whole" and list(path.parent.iterdir()) == [path]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(UserError, match="exists; give --force"):
        with new_file(path, (".pt2",)):
            pass
    with pytest.raises(RuntimeError):
        with new_file(path, (".pt2",), force=True) as written:
            written.write_bytes(b"broken")
            raise RuntimeError
    assert path.read_bytes() == b"whole"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_only_on_terminals() -> None:
    piped, terminal = io.StringIO(), _Terminal()
    for _ in progress_bar(True, range(3), file=piped):
        pass
    for _ in progress_bar(True, range(3), file=terminal):
        pass
    for _ in progress_bar(False, range(3), file=_Terminal()):
        pass
    assert piped.getvalue() == "" and "3/3" in terminal.getvalue()
