"""The test command also lints and type-checks: ruff and mypy must be clean."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_ruff_clean() -> None:
    proc = _run("ruff", "check", "flexcore", "tests", "bench", "examples")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_clean() -> None:
    proc = _run("mypy")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _imports(path: Path) -> set[str]:
    """Top-level module names a file imports (absolute imports only)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # Keep the package path for FlexCore's own modules, to check layering.
            top = node.module.split(".")[0]
            names.add(node.module if top == "flexcore" else top)
    return names


def test_only_flexcore_raft_imports_pysyncobj() -> None:
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "flexcore").rglob("*.py")
                 if "pysyncobj" in _imports(p) and p.parent.name != "raft"]
    assert not offenders, offenders


def test_state_machine_is_pure() -> None:
    allowed = {"__future__", "collections", "dataclasses", "typing", "fnmatch", "re",
               "msgpack", "bisect", "heapq", "itertools", "math", "enum", "abc", "functools",
               "zlib"}
    for path in (ROOT / "flexcore" / "statemachine").rglob("*.py"):
        extra = {m for m in _imports(path) - allowed
                 if not m.startswith("flexcore.statemachine")}
        assert not extra, f"{path.name} imports {sorted(extra)}: the state machine is pure"
