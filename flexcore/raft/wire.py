"""PySyncObj's pickle, made harmless.

PySyncObj (0.3.17) pickles every network frame, every log entry's command and its
journal metadata, and unpickles whatever arrives: anyone who reaches the Raft port
could run code with a crafted frame. `install()` replaces the four functions of
``pysyncobj.pickle`` (and the two names ``pysyncobj.journal`` imported from it) with:

* ``dumps``/``dump``: protocol 5, so bytes, sets and tuples are written as plain
  opcodes and no ``find_class`` lookup is ever needed to read them back;
* ``loads``/``load``: an unpickler whose ``find_class`` refuses every global, so only
  builtin scalars and containers (None, bool, int, float, str, bytes, list, tuple,
  dict, set, frozenset) can be built. A frame naming any class or function fails to
  load; PySyncObj then drops that connection.

FlexCore itself never pickles anything: commands and snapshots are msgpack. The
restriction holds for every node of a FlexCore cluster because they all run this
patch; membership commands are sent as plain ``[op, "host:port"]`` lists for the
same reason (PySyncObj's own ``addNodeToCluster`` would pickle a ``TCPNode``).
"""

from __future__ import annotations

import io
import pickle
from typing import IO, Any

import pysyncobj.journal as _journal
import pysyncobj.pickle as _pspickle

PROTOCOL = 5


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a class or function: not a plain value."""


class PlainUnpickler(pickle.Unpickler):
    """Builds builtin scalars and containers only; refuses every global."""

    def find_class(self, module: str, name: str) -> Any:
        raise RefusedGlobal(
            f"refused to load {module}.{name}: only plain values cross the Raft wire")


def loads(data: bytes | str) -> Any:
    raw = data if isinstance(data, bytes) else data.encode("utf-8")
    return PlainUnpickler(io.BytesIO(raw)).load()


def load(file: IO[bytes]) -> Any:
    return PlainUnpickler(file).load()


def dumps(obj: Any, protocol: int | None = None) -> bytes:
    return pickle.dumps(obj, PROTOCOL)


def dump(obj: Any, file: IO[bytes], protocol: int | None = None) -> None:
    pickle.dump(obj, file, PROTOCOL)


_installed = False


def install() -> None:
    """Patch PySyncObj's pickle module (idempotent; call before any SyncObj exists)."""
    global _installed
    if _installed:
        return
    _pspickle.loads = loads
    _pspickle.load = load
    _pspickle.dumps = dumps
    _pspickle.dump = dump
    _journal.loads = loads
    _journal.dumps = dumps
    _installed = True
