"""``.ci/run`` runs the README's install and test commands, as written, in a new virtual environment that it
removes afterwards, and fails when either fails, pytest's "no tests ran" (exit status 5) included.

The real run takes minutes (a torch install); here the interpreter is a stand-in whose ``-m venv``
makes an environment of stub ``pip`` and ``python`` programs that log their arguments and exit as told.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CI = ROOT / ".ci" / "run"

STUB = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$CI_STUB_LOG"
case "$(basename "$0") $1" in
    "pip "*) exit "$CI_STUB_PIP" ;;
    "python --version") echo "Python 0.0 (stub)"; exit 0 ;;
    "python -m") [ "$2" = pytest ] && exit "$CI_STUB_PYTEST"; exit 0 ;;
esac
"""

FAKE_INTERPRETER = """#!/usr/bin/env bash
# "$0 -m venv DIR": an environment whose pip and python are the stub
[ "$1 $2" = "-m venv" ] || exit 99
mkdir -p "$3/bin"
cp "$CI_STUB" "$3/bin/pip"
cp "$CI_STUB" "$3/bin/python"
echo "PATH=\\"$3/bin:\\$PATH\\"" > "$3/bin/activate"
"""


def _readme_commands() -> list[str]:
    """The commands of the README's first code block, without their comments."""
    block = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readmes_test_command_verbatim() -> None:
    commands = _readme_commands()
    assert commands[1] == 'pip install -e ".[dev]" && python -m pytest -q', commands
    script = CI.read_text()
    assert re.search(rf"^{re.escape(commands[1])} \|\| status=\$\?", script, re.MULTILINE), script
    assert "-m venv" in script and "trap 'rm -rf" in script


@pytest.mark.parametrize("pip_status, pytest_status, expected", [
    (0, 0, 0),
    (0, 1, 1),           # a failing test
    (0, 5, 5),           # no test ran
    (1, 0, 1),           # the install failed: pytest must not run
])
def test_ci_fails_when_the_install_or_the_tests_fail(tmp_path: Path, pip_status: int, pytest_status: int,
                                                    expected: int) -> None:
    stub, interpreter, log, temporary = tmp_path / "stub", tmp_path / "python", tmp_path / "log", tmp_path / "tmp"
    stub.write_text(STUB)
    interpreter.write_text(FAKE_INTERPRETER)
    for program in (stub, interpreter):
        program.chmod(0o755)
    temporary.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env |= {"PYTHON": str(interpreter), "TMPDIR": str(temporary), "CI_STUB": str(stub), "CI_STUB_LOG": str(log),
            "CI_STUB_PIP": str(pip_status), "CI_STUB_PYTEST": str(pytest_status), "CI": "true"}
    result = subprocess.run(["bash", str(CI)], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == expected, result.stdout + result.stderr
    calls = log.read_text().splitlines()
    ran_tests = ["python -m pytest -q"] if pip_status == 0 else []
    assert calls == ["python --version", 'pip install -e .[dev]', *ran_tests], calls
    assert list(temporary.iterdir()) == []                       # the environment is gone
    if expected:
        why = " (pytest collected no tests)" if expected == 5 else ""
        assert f"ci: FAILED with exit status {expected}{why} after " in result.stderr
    else:
        assert "install and tests passed" in result.stdout
