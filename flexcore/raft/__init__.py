"""Raft for FlexCore: the only package that imports PySyncObj.

`RaftNode` replicates msgpack commands to every node's `StateMachine` and bridges
PySyncObj's tick thread to asyncio; `syncobj.FlexSyncObj` holds the narrow, pinned
corrections to PySyncObj 0.3.17; `wire` keeps pickle from executing anything.
"""

from .node import RaftConfig, RaftNode, RaftStatus

__all__ = ["RaftConfig", "RaftNode", "RaftStatus"]
