"""`python -m flexcore.node` as a user runs it: flags, env, config file, signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flexcore.cluster import free_ports, http_json, wait_for


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None,
         timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flexcore.node", *args], cwd=cwd,
                          env=dict(os.environ, **(env or {})), capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("args, env, needle", [
    (["--self", "nonsense"], {}, "--self"),
    (["--api", "127.0.0.1:99999"], {}, "--api"),
    (["--election-timeout", "abc"], {}, "--election-timeout"),
    (["--log-level", "loud"], {}, "--log-level"),
    (["--secret", "short"], {}, "--secret"),
    ([], {"FLEXCORE_PEERS": "a:1,b"}, "--peers"),
    ([], {"FLEXCORE_FSYNC": "maybe"}, "FLEXCORE_FSYNC"),
    (["--config", "missing.toml"], {}, "--config"),
])
def test_bad_settings_exit_2_with_one_clear_line(tmp_path: Path, args: list[str],
                                                env: dict[str, str], needle: str) -> None:
    proc = _run(args, tmp_path, env)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_flag_exits_2(tmp_path: Path) -> None:
    proc = _run(["--bogus"], tmp_path)
    assert proc.returncode == 2 and "unrecognized arguments" in proc.stderr


def test_unknown_config_key_exits_2(tmp_path: Path) -> None:
    (tmp_path / "node.toml").write_text('peers = ["127.0.0.1:7100"]\nfoo = 1\n')
    proc = _run(["--config", "node.toml"], tmp_path)
    assert proc.returncode == 2 and "unknown setting 'foo'" in proc.stderr


def _start(args: list[str], cwd: Path, env: dict[str, str] | None = None
           ) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "flexcore.node", *args], cwd=cwd,
                            env=dict(os.environ, **(env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_env_and_toml_configure_the_node_and_sigterm_stops_it_cleanly(tmp_path: Path) -> None:
    raft, api = free_ports(2)
    (tmp_path / "node.toml").write_text(f'self = "127.0.0.1:{raft}"\nlog_level = "info"\n')
    proc = _start(["--config", "node.toml"], tmp_path,
                  {"FLEXCORE_API": f"127.0.0.1:{api}", "FLEXCORE_DATA_DIR": "d"})
    try:
        url = f"http://127.0.0.1:{api}"
        wait_for("node ready", lambda: http_json("GET", url + "/ready")[0] == 200 or None, 20)
        _code, view = http_json("GET", url + "/v1/cluster")
        assert view["node"] == f"127.0.0.1:{raft}" and view["leader"] == view["node"]
        assert (tmp_path / "d" / "raft.journal").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert "becomes leader" in out or "leader is" in out
    assert "stopped" in out


def test_busy_api_port_is_a_clear_error(tmp_path: Path) -> None:
    import socket
    raft, = free_ports(1)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _run(["--self", f"127.0.0.1:{raft}", "--api", f"127.0.0.1:{port}",
                     "--data-dir", "d"], tmp_path)
    assert proc.returncode == 1
    assert f"cannot listen for the API on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_no_flags_is_a_single_node_cluster_in_dot_flexcore(tmp_path: Path) -> None:
    proc = _start([], tmp_path)
    try:
        url = "http://127.0.0.1:8100"
        wait_for("default node ready",
                 lambda: http_json("GET", url + "/ready")[0] == 200 or None, 20)
        code, _body = http_json("POST", url + "/v1/events", {"type": "hello"})
        assert code == 201
        assert (tmp_path / ".flexcore" / "raft.journal").exists()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=20)
    assert proc.returncode == 0
