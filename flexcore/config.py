"""Node settings: one dataclass, filled from flags, environment and an optional TOML file.

Precedence: command-line flag > ``FLEXCORE_*`` environment variable > ``--config``
TOML file > default. Every flag has an environment variable (``--data-dir`` →
``FLEXCORE_DATA_DIR``) and a TOML key (``data_dir``). With nothing set, a node is a
single-node cluster on 127.0.0.1 keeping its data in ``./.flexcore``.
"""

from __future__ import annotations

import argparse
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOG_LEVELS = ("debug", "info", "warning", "error")
_HOSTPORT = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$")


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names it."""


@dataclass(frozen=True)
class Settings:
    """Everything a FlexCore node needs to start."""

    self_addr: str = "127.0.0.1:7100"
    peers: tuple[str, ...] = ()
    api: str = "127.0.0.1:8100"
    api_url: str | None = None        # advertised to clients; default http://<api>
    data_dir: Path = Path(".flexcore")
    secret: str | None = None
    api_token: str | None = None
    log_level: str = "info"
    fsync: bool = False
    election_timeout: float = 1.0
    propose_timeout: float = 5.0
    max_body_bytes: int = 1024 * 1024
    compaction_min_entries: int = 5000
    max_batch: int = 1000
    windmill_url: str | None = None        # Windmill base URL; None: no Windmill
    windmill_token: str | None = None
    windmill_workspace: str | None = None
    group_session: float = 10.0            # consumer-group session timeout (s)
    plugins_dir: Path | None = None        # extra plugins (besides entry points)

    @property
    def advertised_api(self) -> str:
        return self.api_url or f"http://{self.api}"

    def validate(self) -> Settings:
        check_hostport("--self", self.self_addr)
        check_hostport("--api", self.api)
        for p in self.peers:
            check_hostport("--peers", p)
        if self.log_level not in LOG_LEVELS:
            raise SettingsError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, "
                                f"not {self.log_level!r}")
        if not 0.2 <= self.election_timeout <= 60:
            raise SettingsError("--election-timeout must be between 0.2 and 60 seconds")
        if not 0.1 <= self.propose_timeout <= 300:
            raise SettingsError("--propose-timeout must be between 0.1 and 300 seconds")
        if self.secret is not None and len(self.secret) < 8:
            raise SettingsError("--secret must be at least 8 characters")
        if self.api_token is not None and not self.api_token:
            raise SettingsError("--api-token must not be empty")
        if self.api_url is not None and not re.match(r"^https?://[^/\s]+", self.api_url):
            raise SettingsError(f"--api-url must be an http(s) URL, not {self.api_url!r}")
        if not 1024 <= self.max_body_bytes <= 2 * 1024 * 1024:
            # A command is at most 4 MiB once encoded (codec): keep bodies well below.
            raise SettingsError("--max-body-bytes must be between 1024 and 2097152")
        if self.compaction_min_entries < 2:
            raise SettingsError("--compaction-min-entries must be at least 2")
        if not 1 <= self.max_batch <= 10000:
            raise SettingsError("--max-batch must be between 1 and 10000")
        if self.plugins_dir is not None and not Path(self.plugins_dir).is_dir():
            raise SettingsError(f"--plugins-dir {str(self.plugins_dir)!r} is not a directory")
        if not 0.3 <= self.group_session <= 600:
            raise SettingsError("--group-session must be between 0.3 and 600 seconds")
        if self.windmill_url is not None:
            if not re.match(r"^https?://[^/\s]+", self.windmill_url):
                raise SettingsError(f"--windmill-url must be an http(s) URL, not "
                                    f"{self.windmill_url!r}")
            if not self.windmill_token:
                raise SettingsError("--windmill-token (or WM_TOKEN) is required with "
                                    "--windmill-url")
            if not self.windmill_workspace:
                raise SettingsError("--windmill-workspace (or WM_WORKSPACE) is required "
                                    "with --windmill-url")
        return self


def check_hostport(flag: str, value: str) -> tuple[str, int]:
    m = _HOSTPORT.match(value)
    if not m or not 1 <= int(m.group(2)) <= 65535:
        raise SettingsError(f"{flag} expects HOST:PORT with a port in 1-65535, got {value!r}")
    return m.group(1), int(m.group(2))


def _peers(value: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in value.split(",") if p.strip())


def _bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {value!r}")


# name, type converter, help. The env var is FLEXCORE_<NAME upper>, the flag --name-with-dashes.
_OPTIONS: list[tuple[str, Callable[[str], Any], str]] = [
    ("self_addr", str, "this node's Raft address HOST:PORT (flag --self)"),
    ("peers", _peers, "comma-separated Raft addresses of all members (self may be included)"),
    ("api", str, "admin API listen address HOST:PORT"),
    ("api_url", str, "API URL advertised to other nodes and clients (default http://<api>)"),
    ("data_dir", Path, "folder for the Raft journal and snapshots"),
    ("secret", str, "cluster secret: authenticates and encrypts Raft traffic"),
    ("api_token", str, "bearer token required for API writes"),
    ("log_level", str, "debug | info | warning | error"),
    ("fsync", _bool, "fsync the Raft journal before acknowledging (survives power loss)"),
    ("election_timeout", float, "minimum Raft election timeout in seconds"),
    ("propose_timeout", float, "seconds a write may wait to commit before 503"),
    ("max_body_bytes", int, "largest accepted request body"),
    ("compaction_min_entries", int, "log entries between snapshots"),
    ("max_batch", int, "most commands coalesced into one Raft entry (1 disables group commit)"),
    ("windmill_url", str, "Windmill base URL (e.g. http://windmill:8000); unset: no workflows"),
    ("windmill_token", str, "Windmill API token (Bearer)"),
    ("windmill_workspace", str, "Windmill workspace id"),
    ("plugins_dir", Path, "folder of extra plugins: executables or .py files speaking the "
                          "FlexCore plugin protocol (see README, Plugins and pipelines)"),
    ("group_session", float, "consumer-group session timeout in seconds: a member silent "
                             "this long loses its partitions (it heartbeats 3 times per)"),
]

# Second environment names, as Windmill's own `wmill` client reads them; FLEXCORE_* wins.
_ENV_ALIASES = {"windmill_url": "WM_BASE_URL", "windmill_token": "WM_TOKEN",
                "windmill_workspace": "WM_WORKSPACE"}


def _flag(name: str) -> str:
    return "--self" if name == "self_addr" else "--" + name.replace("_", "-")


def _env(name: str) -> str:
    return "FLEXCORE_" + ("SELF" if name == "self_addr" else name.upper())


def build_parser(prog: str = "python -m flexcore.node") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run one FlexCore node. Every flag also reads FLEXCORE_<NAME> from the "
                    "environment (e.g. FLEXCORE_PEERS) and <name> from the --config TOML file.")
    parser.add_argument("--config", help="TOML file with settings (keys as in --help, "
                                         "dashes as underscores, 'self' for --self)")
    for name, _conv, help_text in _OPTIONS:
        if name == "fsync":
            parser.add_argument(_flag(name), dest=name, nargs="?", const="true", default=None,
                                metavar="BOOL", help=f"{help_text} [env {_env(name)}]")
        else:
            alias = f" or {_ENV_ALIASES[name]}" if name in _ENV_ALIASES else ""
            parser.add_argument(_flag(name), dest=name, default=None,
                                help=f"{help_text} [env {_env(name)}{alias}]")
    return parser


def load_settings(argv: Sequence[str] | None = None,
                  env: Mapping[str, str] | None = None) -> Settings:
    """Parse flags, environment and TOML into validated `Settings`.

    Raises `SettingsError` with a one-line message; argparse's own usage errors exit 2.
    """
    env = os.environ if env is None else env
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    config_path = args.config or env.get("FLEXCORE_CONFIG")
    if config_path:
        values.update(_from_toml(Path(config_path)))
    for name, conv, _ in _OPTIONS:
        where = _env(name)
        raw = env.get(where)
        if (raw is None or raw == "") and name in _ENV_ALIASES:
            where = _ENV_ALIASES[name]
            raw = env.get(where)
        if raw is not None and raw != "":
            values[name] = _convert(name, conv, raw, where)
        flag_value = getattr(args, name)
        if flag_value is not None:
            values[name] = _convert(name, conv, flag_value, _flag(name))
    return Settings(**values).validate()


def _convert(name: str, conv: Callable[[str], Any], raw: Any, where: str) -> Any:
    try:
        return conv(raw) if isinstance(raw, str) else raw
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{where}: {exc}") from None


def _from_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise SettingsError(f"--config: no such file {str(path)!r}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"--config {path}: invalid TOML: {exc}") from None
    known = {name: conv for name, conv, _ in _OPTIONS}
    out: dict[str, Any] = {}
    for key, value in doc.items():
        name = "self_addr" if key == "self" else key.replace("-", "_")
        if name not in known:
            raise SettingsError(f"--config {path}: unknown setting {key!r}")
        if name == "peers" and isinstance(value, list):
            out[name] = tuple(str(v) for v in value)
        elif isinstance(value, str | int | float | bool):
            out[name] = _convert(name, known[name], str(value), f"--config {path}: {key}")
        else:
            raise SettingsError(f"--config {path}: {key} must be a string or number")
    return out
