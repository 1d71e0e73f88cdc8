"""README claims that the machine can check."""

from __future__ import annotations

import re
from pathlib import Path

from flexcore.config import _OPTIONS, _env, _flag

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _code_blocks() -> list[str]:
    return [b.strip() for b in re.findall(r"```sh\n(.*?)```", README, re.S)]


def test_readme_starts_with_run_and_test_commands() -> None:
    blocks = _code_blocks()
    assert "flexcore.cluster up" in blocks[0]
    assert "pytest" in blocks[1]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    test_cmd = _code_blocks()[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines(), "README test command and .ci/run differ"


def test_every_setting_is_documented_with_flag_and_env() -> None:
    for name, _conv, _help in _OPTIONS:
        row = next((ln for ln in README.splitlines() if ln.startswith(f"| `{_flag(name)}`")),
                   None)
        assert row is not None, f"{_flag(name)} missing from the README's configuration table"
        assert _env(name) in row, f"{_env(name)} missing from the row of {_flag(name)}"
