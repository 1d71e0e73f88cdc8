"""Consumer groups: members, partition ownership, committed offsets, dead letters.

Owns the ``group.*`` commands (join, leave, release, commit, redrive) and the read side
(``names``, ``view``, ``owned``, ``dead``). Pure data: time is the command's effective
time (``ctx.now_ms``), nothing else.

A group splits the event log into ``partitions`` (fixed when the group is created,
default 16): an event belongs to partition ``events.event_partition(key, id, n)`` — a
CRC-32 of its key (of its id when it has no key), so all events of one key are in one
partition and per-key order is the log's order. Per partition the state keeps:

- ``committed``: every event of the partition at or below this offset is done (handled,
  filtered out, or dead-lettered). The node that takes the partition over starts after
  it, so an event is redelivered until a commit covers it (at-least-once).
- ``owner`` and ``epoch``: the one node allowed to handle and commit the partition, and
  a fencing token. A ``group.commit`` or ``group.release`` from another node, or with an
  older epoch, is refused (``not_owner`` / ``stale_epoch``) and changes nothing, so a
  node that lost the partition (expired while paused, partitioned away) cannot move
  the offset under the new owner. ``epoch`` is the group's ``generation`` counter at the
  moment the partition got its current owner; it only grows.
- ``target``: the owner the assignment wants. Rebalancing never takes a partition away
  from a live owner by itself: the owner sees ``target`` differ, stops handling the
  partition, and commits ``group.release``, which hands it to the target with a new
  epoch (cooperative hand-off: at no time do two live nodes both own a partition, so
  per-key order holds across rebalances). A partition whose owner is no longer a member
  (left, or expired) moves to its target at once.
- ``redrive``: offsets of dead letters an operator sent back, which the owner handles
  again (then reports them done in a commit).

Membership: ``group.join`` adds a member or refreshes its heartbeat (members re-join
every ``session_ms / 3``). Any command on the group first drops members whose last
heartbeat is ``session_ms`` or more behind the command's effective time (lazy expiry,
like queue lease expiry: live members heartbeat, so a dead one is noticed within one
heartbeat period after its session ran out). The session clock stops while the group
sees no command at all for half a session: such silence means nothing could commit
(an election, a lost quorum), not that every member died, so the first command after
it does not expire members that simply could not heartbeat through the outage.

A membership change reassigns targets: each member gets ``partitions // n`` or one
more (the first ``partitions % n`` members in sorted order get the extra one); a
partition keeps its current target while that member is under its quota (sticky), the
rest go, in partition order, to members under quota in sorted order. The result
depends only on committed state.

Dead letters are kept per group, oldest first, at most ``MAX_DEAD`` (the oldest are
dropped beyond it and counted). A dead letter stores the event's offset, id, type,
key, partition, the handler and its last error, not the payload: a redriven dead
letter is read from the log again, so one whose event left retention cannot be
redriven (the owner reports it and it is dropped).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from flexcore.statemachine.component import Handler
from flexcore.statemachine.validation import (
    Invalid,
    Refused,
    check_keys,
    optional_str,
    require_int,
    require_map,
    require_str,
)

GROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
NOT_FOUND = "not_found"
NOT_OWNER = "not_owner"
STALE_EPOCH = "stale_epoch"

MAX_GROUPS = 1000
MAX_MEMBERS = 1000
DEFAULT_PARTITIONS = 16
MAX_PARTITIONS = 256
DEFAULT_SESSION_MS = 10_000
MIN_SESSION_MS, MAX_SESSION_MS = 300, 10 * 60 * 1000
MAX_DEAD = 10_000
MAX_DEAD_PER_COMMIT = 1000
MAX_REDRIVE_BATCH = 10_000
MAX_REDRIVE_PENDING = 10_000       # per partition
MAX_NODE_LENGTH = 256
MAX_ERROR_LENGTH = 2000
_TS_MAX = 2**63 - 1
_TOTALS = ("joins", "leaves", "expired", "rebalances", "handoffs", "commits",
           "dead_lettered", "dead_dropped", "redriven")
_DEAD_FIELDS = ("offset", "id", "type", "key", "partition", "handler", "error",
                "attempts", "dead_ms")


class _Group:
    def __init__(self, name: str, partitions: int, session_ms: int, created_ms: int,
                 start: int) -> None:
        self.name = name
        self.partitions = partitions
        self.session_ms = session_ms
        self.created_ms = created_ms
        self.members: dict[str, int] = {}                  # node -> last heartbeat ms
        self.generation = 0
        self.owner: list[str | None] = [None] * partitions
        self.target: list[str | None] = [None] * partitions
        self.epoch = [0] * partitions
        self.committed = [start] * partitions
        self.redrive: list[list[int]] = [[] for _ in range(partitions)]
        self.dead: dict[int, dict[str, Any]] = {}          # offset -> letter, oldest first
        self.totals = dict.fromkeys(_TOTALS, 0)
        self.last_ms = created_ms                          # last command on the group

    # -- membership and assignment ------------------------------------------------------

    def expire(self, now: int) -> None:
        """Drop members silent for a session (every command on the group calls this
        first). After a silence of the whole group, the session clocks resume rather
        than jump: every heartbeat moves forward by the silent stretch."""
        gap = now - self.last_ms
        self.last_ms = max(self.last_ms, now)
        if gap >= self.session_ms // 2:
            for node in self.members:
                self.members[node] += gap
        gone = [n for n, hb in self.members.items() if now - hb >= self.session_ms]
        for node in gone:
            del self.members[node]
        if gone:
            self.totals["expired"] += len(gone)
            self.rebalance()

    def rebalance(self) -> None:
        """Recompute targets from the members (sticky, balanced), then move every
        partition whose owner is gone to its target."""
        self.totals["rebalances"] += 1
        live = sorted(self.members)
        if live:
            base, extra = divmod(self.partitions, len(live))
            quota = {m: base + (1 if i < extra else 0) for i, m in enumerate(live)}
            load = dict.fromkeys(live, 0)
            target: list[str | None] = [None] * self.partitions
            for p, cur in enumerate(self.target):
                if cur is not None and cur in load and load[cur] < quota[cur]:
                    target[p] = cur
                    load[cur] += 1
            free = iter([m for m in live for _ in range(quota[m] - load[m])])
            for p in range(self.partitions):
                if target[p] is None:
                    target[p] = next(free)
            self.target = target
        else:
            self.target = [None] * self.partitions
        for p in range(self.partitions):
            owner = self.owner[p]
            if owner != self.target[p] and (owner is None or owner not in self.members):
                self.hand_over(p)

    def hand_over(self, p: int) -> None:
        self.owner[p] = self.target[p]
        if self.owner[p] is not None:
            self.generation += 1
            self.epoch[p] = self.generation
            self.totals["handoffs"] += 1

    def fence(self, node: str, p: int, epoch: int) -> None:
        if self.owner[p] != node:
            raise Refused(NOT_OWNER, f"partition {p} of group {self.name} is not owned by "
                                     "this node")
        if epoch != self.epoch[p]:
            raise Refused(STALE_EPOCH, f"partition {p} of group {self.name} is at epoch "
                                       f"{self.epoch[p]}, not {epoch}")

    # -- views ------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "partitions": self.partitions,
                "session_ms": self.session_ms, "generation": self.generation,
                "members": sorted(self.members), "dead": len(self.dead),
                "redrive_pending": sum(len(r) for r in self.redrive)}

    def to_row(self) -> list[Any]:
        return [self.partitions, self.session_ms, self.created_ms, self.generation,
                [[n, self.members[n]] for n in sorted(self.members)],
                list(self.owner), list(self.target), list(self.epoch),
                list(self.committed), [list(r) for r in self.redrive],
                [[d[k] for k in _DEAD_FIELDS] for d in self.dead.values()],
                [self.totals[k] for k in _TOTALS], self.last_ms]

    @classmethod
    def from_row(cls, name: str, row: object) -> _Group:
        if not isinstance(row, list) or len(row) != 13:
            raise ValueError(f"group {name[:64]} must be a 13-item list")
        (partitions, session_ms, created_ms, generation, members, owner, target, epoch,
         committed, redrive, dead, totals, last_ms) = row
        if not (type(partitions) is int and 1 <= partitions <= MAX_PARTITIONS
                and all(type(v) is int for v in (session_ms, created_ms, generation,
                                                 last_ms))):
            raise ValueError(f"group {name[:64]} has bad settings")
        g = cls(name, partitions, session_ms, created_ms, 0)
        g.generation = generation
        g.last_ms = last_ms
        for item in members:
            node, hb = item
            if not isinstance(node, str) or type(hb) is not int:
                raise ValueError(f"group {name[:64]} has a bad member")
            g.members[node] = hb
        lists = (owner, target, epoch, committed, redrive)
        if not all(isinstance(v, list) and len(v) == partitions for v in lists):
            raise ValueError(f"group {name[:64]} has per-partition lists of the wrong size")
        if not all(v is None or isinstance(v, str) for v in owner + target) \
                or not all(type(v) is int for v in epoch + committed) \
                or not all(isinstance(r, list) and all(type(o) is int for o in r)
                           for r in redrive):
            raise ValueError(f"group {name[:64]} has per-partition values of the wrong type")
        g.owner, g.target, g.epoch, g.committed = owner, target, epoch, committed
        g.redrive = redrive
        for letter in dead:
            if not isinstance(letter, list) or len(letter) != len(_DEAD_FIELDS):
                raise ValueError(f"group {name[:64]} has a bad dead letter")
            d = dict(zip(_DEAD_FIELDS, letter, strict=True))
            g.dead[d["offset"]] = d
        if not isinstance(totals, list) or len(totals) != len(_TOTALS):
            raise ValueError(f"group {name[:64]} has bad totals")
        g.totals = dict(zip(_TOTALS, totals, strict=True))
        return g


# --- body checks --------------------------------------------------------------------

def _group_name(body: Mapping[str, Any]) -> str:
    name = require_str(body, "group", "body", max_len=128)
    if not GROUP_NAME.fullmatch(name):
        raise Invalid("body.group must match [A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
    return name


def _node(body: Mapping[str, Any]) -> str:
    return require_str(body, "node", "body", max_len=MAX_NODE_LENGTH)


def _partition(body: Mapping[str, Any], g: _Group) -> int:
    return require_int(body, "partition", "body", minimum=0, maximum=g.partitions - 1)


def _dead_letter(raw: object, where: str, partition: int, now: int) -> dict[str, Any]:
    item = require_map(raw, where)
    check_keys(item, where, required=("offset", "id", "type", "error"),
               optional=("key", "handler", "attempts"))
    return {
        "offset": require_int(item, "offset", where, minimum=1, maximum=_TS_MAX),
        "id": require_str(item, "id", where, max_len=256),
        "type": require_str(item, "type", where, max_len=256),
        "key": optional_str(item, "key", where, max_len=1024, allow_empty=True),
        "partition": partition,
        "handler": optional_str(item, "handler", where, max_len=256),
        "error": require_str(item, "error", where, max_len=MAX_ERROR_LENGTH,
                             allow_empty=True),
        "attempts": require_int(item, "attempts", where, minimum=0, maximum=1_000_000)
        if item.get("attempts") is not None else 0,
        "dead_ms": now,
    }


class ConsumerGroups:
    """Every consumer group of the cluster."""

    def __init__(self) -> None:
        self._groups: dict[str, _Group] = {}

    # --- read side -----------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self._groups)

    def summary(self, name: str) -> dict[str, Any] | None:
        g = self._groups.get(name)
        return None if g is None else g.summary()

    def view(self, name: str) -> dict[str, Any] | None:
        """Everything about one group (members with their last heartbeat, and per
        partition owner, target, epoch, committed offset, pending redrives); None if
        the group does not exist. Expiry is lazy: a member past its session stays
        listed until the next command on the group."""
        g = self._groups.get(name)
        if g is None:
            return None
        return {**g.summary(), "created_ms": g.created_ms,
                "heartbeats": {n: g.members[n] for n in sorted(g.members)},
                "assignment": [{"partition": p, "owner": g.owner[p], "target": g.target[p],
                                "epoch": g.epoch[p], "committed": g.committed[p],
                                "redrive": list(g.redrive[p])}
                               for p in range(g.partitions)],
                "totals": dict(g.totals)}

    def committed(self, name: str) -> list[int] | None:
        g = self._groups.get(name)
        return None if g is None else list(g.committed)

    def owned(self, name: str, node: str) -> list[tuple[int, int, int, bool, tuple[int, ...]]]:
        """Partitions ``node`` owns: ``(partition, epoch, committed, revoking,
        redrive offsets)``; ``revoking`` when the target is another node (the owner
        should stop and release it)."""
        g = self._groups.get(name)
        if g is None:
            return []
        return [(p, g.epoch[p], g.committed[p], g.target[p] != node, tuple(g.redrive[p]))
                for p in range(g.partitions) if g.owner[p] == node]

    def partitions(self, name: str) -> int | None:
        g = self._groups.get(name)
        return None if g is None else g.partitions

    def dead(self, name: str, limit: int) -> list[dict[str, Any]] | None:
        """The oldest ``limit`` dead letters; None if the group does not exist."""
        g = self._groups.get(name)
        if g is None:
            return None
        out: list[dict[str, Any]] = []
        for d in g.dead.values():
            if len(out) >= limit:
                break
            out.append(dict(d))
        return out

    # --- commands (validate everything, then mutate) ---------------------------------

    def commands(self) -> Mapping[str, Handler]:
        return {
            "group.join": lambda body, ctx: self.join(body, ctx.now_ms),
            "group.leave": lambda body, ctx: self.leave(body, ctx.now_ms),
            "group.release": lambda body, ctx: self.release(body, ctx.now_ms),
            "group.commit": lambda body, ctx: self.commit(body, ctx.now_ms),
            "group.redrive": lambda body, ctx: self.redrive(body, ctx.now_ms),
        }

    def _existing(self, name: str) -> _Group:
        g = self._groups.get(name)
        if g is None:
            raise Refused(NOT_FOUND, f"group {name} does not exist")
        return g

    def join(self, body: Mapping[str, Any], now: int) -> dict[str, Any]:
        """``{group, node, partitions?, session_ms?, start_offset?}`` -> ``{group,
        generation, members, owned}``. Creates the group on first use (``partitions``,
        ``session_ms`` and ``start_offset`` — where a new group's offsets begin — only
        count then); adds ``node`` or refreshes its heartbeat."""
        check_keys(body, "body", required=("group", "node"),
                   optional=("partitions", "session_ms", "start_offset"))
        name, node = _group_name(body), _node(body)
        partitions = require_int(body, "partitions", "body", minimum=1,
                                 maximum=MAX_PARTITIONS) \
            if body.get("partitions") is not None else DEFAULT_PARTITIONS
        session = require_int(body, "session_ms", "body", minimum=MIN_SESSION_MS,
                              maximum=MAX_SESSION_MS) \
            if body.get("session_ms") is not None else DEFAULT_SESSION_MS
        start = require_int(body, "start_offset", "body", minimum=0, maximum=_TS_MAX) \
            if body.get("start_offset") is not None else 0
        g = self._groups.get(name)
        if g is None:
            if len(self._groups) >= MAX_GROUPS:
                raise Invalid(f"body.group: the cluster already has {MAX_GROUPS} groups")
            g = self._groups[name] = _Group(name, partitions, session, now, start)
        elif node not in g.members and len(g.members) >= MAX_MEMBERS:
            raise Invalid(f"body.node: group {name} already has {MAX_MEMBERS} members")
        g.expire(now)
        new = node not in g.members
        g.members[node] = now
        if new:
            g.totals["joins"] += 1
            g.rebalance()
        return {"group": name, "generation": g.generation, "members": sorted(g.members),
                "owned": [p for p in range(g.partitions) if g.owner[p] == node]}

    def leave(self, body: Mapping[str, Any], now: int) -> dict[str, Any]:
        """``{group, node}`` -> ``{left: bool}``; the node's partitions move at once."""
        check_keys(body, "body", required=("group", "node"))
        name, node = _group_name(body), _node(body)
        g = self._existing(name)
        g.expire(now)
        left = g.members.pop(node, None) is not None
        if left:
            g.totals["leaves"] += 1
            g.rebalance()
        return {"left": left}

    def release(self, body: Mapping[str, Any], now: int) -> dict[str, Any]:
        """``{group, node, partition, epoch}`` -> ``{partition, owner, epoch}``: the
        owner gives a revoked partition to its target (a no-op when the target is the
        owner again). Fenced like ``commit``."""
        check_keys(body, "body", required=("group", "node", "partition", "epoch"))
        name, node = _group_name(body), _node(body)
        g = self._existing(name)
        p = _partition(body, g)
        epoch = require_int(body, "epoch", "body", minimum=0, maximum=_TS_MAX)
        g.expire(now)
        g.fence(node, p, epoch)
        if g.target[p] != node:
            g.hand_over(p)
        return {"partition": p, "owner": g.owner[p], "epoch": g.epoch[p]}

    def commit(self, body: Mapping[str, Any], now: int) -> dict[str, Any]:
        """``{group, node, partition, epoch, offset?, dead?: [{offset, id, type, key?,
        handler?, error, attempts?}], redriven?: [offset]}`` -> ``{committed}``.

        The partition's owner reports progress in one atomic step: ``offset`` (never
        moves back; a smaller one is ignored), events it gave up on (``dead``: new dead
        letters) and redriven offsets it finished (removed from the redrive list).
        Refused with ``not_owner`` / ``stale_epoch`` from anyone but the current owner
        at the current epoch."""
        check_keys(body, "body", required=("group", "node", "partition", "epoch"),
                   optional=("offset", "dead", "redriven"))
        name, node = _group_name(body), _node(body)
        g = self._existing(name)
        p = _partition(body, g)
        epoch = require_int(body, "epoch", "body", minimum=0, maximum=_TS_MAX)
        offset = require_int(body, "offset", "body", minimum=0, maximum=_TS_MAX) \
            if body.get("offset") is not None else None
        raw_dead = body.get("dead") or []
        if not isinstance(raw_dead, list) or len(raw_dead) > MAX_DEAD_PER_COMMIT:
            raise Invalid(f"body.dead must be a list of at most {MAX_DEAD_PER_COMMIT} items")
        dead = [_dead_letter(d, f"dead[{i}]", p, now) for i, d in enumerate(raw_dead)]
        redriven = body.get("redriven") or []
        if not isinstance(redriven, list) or len(redriven) > MAX_REDRIVE_PENDING \
                or not all(type(o) is int for o in redriven):
            raise Invalid(f"body.redriven must be a list of at most {MAX_REDRIVE_PENDING} "
                          "offsets")
        g.expire(now)
        g.fence(node, p, epoch)
        if offset is not None and offset > g.committed[p]:
            g.committed[p] = offset
        if redriven:
            done = set(redriven)
            g.redrive[p] = [o for o in g.redrive[p] if o not in done]
        for letter in dead:
            g.dead.pop(letter["offset"], None)
            g.dead[letter["offset"]] = letter
            g.totals["dead_lettered"] += 1
        while len(g.dead) > MAX_DEAD:
            del g.dead[next(iter(g.dead))]
            g.totals["dead_dropped"] += 1
        g.totals["commits"] += 1
        return {"committed": g.committed[p]}

    def redrive(self, body: Mapping[str, Any], now: int) -> dict[str, Any]:
        """``{group, max?}`` -> ``{redriven, offsets}``: the oldest dead letters go to
        their partition's redrive list; the owner handles them again."""
        check_keys(body, "body", required=("group",), optional=("max",))
        name = _group_name(body)
        limit = require_int(body, "max", "body", minimum=1, maximum=MAX_REDRIVE_BATCH) \
            if body.get("max") is not None else MAX_REDRIVE_BATCH
        g = self._existing(name)
        g.expire(now)
        moved: list[int] = []
        for offset in list(g.dead):
            if len(moved) >= limit:
                break
            letter = g.dead[offset]
            pending = g.redrive[letter["partition"]]
            if len(pending) >= MAX_REDRIVE_PENDING:
                continue
            del g.dead[offset]
            if offset not in pending:
                pending.append(offset)
            moved.append(offset)
        g.totals["redriven"] += len(moved)
        return {"redriven": len(moved), "offsets": moved}

    # --- snapshot ------------------------------------------------------------------

    def to_snapshot(self) -> dict[str, Any]:
        return {name: self._groups[name].to_row() for name in sorted(self._groups)}

    @classmethod
    def from_snapshot(cls, obj: object) -> ConsumerGroups:
        if not isinstance(obj, dict):
            raise ValueError("groups section must be a map")
        store = cls()
        for name, row in obj.items():
            if not isinstance(name, str) or not GROUP_NAME.fullmatch(name):
                raise ValueError("groups section has a bad group name")
            store._groups[name] = _Group.from_row(name, row)
        return store
