"""FlexCore: a self-coordinating Python cluster.

Nodes form a Raft group (PySyncObj) with no external coordinator and replicate one
deterministic state machine. Run a node with ``python -m flexcore.node``, a local
cluster with ``python -m flexcore.cluster up``, or embed one with `FlexCore`.

Names are imported lazily so that ``import flexcore.statemachine`` (pure) or
``flexcore.api`` does not drag in the Raft stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import FlexCore
    from .config import Settings
    from .di import Clock, FakeClock
    from .events import Event, Retry
    from .node import FlexNode

__all__ = ["Clock", "Event", "FakeClock", "FlexCore", "FlexNode", "Retry", "Settings"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "Settings":
        from .config import Settings
        return Settings
    if name == "FlexCore":
        from .app import FlexCore
        return FlexCore
    if name == "FlexNode":
        from .node import FlexNode
        return FlexNode
    if name in ("Event", "Retry"):
        from . import events
        return getattr(events, name)
    if name in ("Clock", "FakeClock"):
        from . import di
        return getattr(di, name)
    raise AttributeError(f"module 'flexcore' has no attribute {name!r}")
