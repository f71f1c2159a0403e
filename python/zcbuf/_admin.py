"""Listing and reaping shared segments (``python -m zcbuf ls`` / ``gc``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

from ._errors import check
from ._native import ffi, lib

__all__ = ["Segment", "ChannelState", "Removed", "ls", "gc", "gc_report", "unlink"]


@dataclass(frozen=True)
class ChannelState:
    """What :func:`ls` says of a channel (see :func:`zcbuf.publish`)."""

    dtype: str
    shape: Tuple[int, ...]
    policy: str
    slots: int
    published: int
    """Messages published so far."""
    closed: bool
    """The publisher closed the stream."""
    publisher_pid: int
    publisher_alive: bool
    subscribers: Tuple[Tuple[int, int, int, bool], ...]
    """Each subscriber as (pid, position, missed, alive); its position is the next message it
    reads (``published - position`` messages are waiting for it)."""


def _channel(text: str) -> Optional[ChannelState]:
    if not text:
        return None
    f = text.split(";", 8)
    if len(f) < 9:
        return None
    subs = []
    for item in filter(None, f[6].split(",")):
        pid, pos, missed, alive = item.split(":")
        subs.append((int(pid), int(pos), int(missed), alive == "1"))
    return ChannelState(
        dtype=f[8],
        shape=tuple(int(d) for d in f[7].split(",") if d),
        policy=f[0],
        slots=int(f[1]),
        published=int(f[2]),
        closed=f[3] == "1",
        publisher_pid=int(f[4]),
        publisher_alive=f[5] == "1",
        subscribers=tuple(subs),
    )


@dataclass(frozen=True)
class Segment:
    """A zcbuf segment in /dev/shm, as :func:`ls` reports it."""

    name: str
    nbytes: int
    dtype: str
    shape: Optional[Tuple[int, ...]]
    held: bool
    """True while some process maps it (the kernel holds a lock for it)."""
    holders: Tuple[int, ...]
    """The holders' pids as /proc/locks names them (a holder in a pid namespace this one cannot
    see, or a fork child sharing its parent's open file, is not listed on its own)."""
    persistent: bool
    """Created with ``persist=True``: kept after its last holder until :func:`unlink`."""
    created: float
    """Creation time, seconds since the epoch."""
    creator_pid: int
    problem: str
    """Why the header is unusable ("" when it is valid)."""
    sealed: bool = False
    """Sealed (:meth:`Buffer.seal`): immutable, every open maps it read-only."""
    channel: Optional[ChannelState] = None
    """For a channel: its message type, publisher, subscribers and their positions."""

    @property
    def age(self) -> float:
        """Seconds since creation."""
        return max(0.0, time.time() - self.created) if self.created else 0.0


@dataclass(frozen=True)
class Removed:
    """A segment :func:`gc_report` removed, and why."""

    name: str
    nbytes: int
    reason: str


def _text_call(fn: "Callable[[Any, int, Any], int]") -> str:
    n = ffi.new("size_t *")
    cap = 1 << 16
    while True:
        buf = ffi.new("char[]", cap)
        check(fn(buf, cap, n))
        if n[0] < cap:
            return str(ffi.string(buf).decode("utf-8", "replace"))
        cap = n[0] + (1 << 12)


def ls() -> List[Segment]:
    """The zcbuf segments in /dev/shm visible to this user: size, type, who holds them.

    >>> [(s.name, s.held, s.holders) for s in zcbuf.ls()]
    [('zcbuf-3f2a...', True, (4242,))]
    """
    out = []
    for line in _text_call(lib.zcbuf_list).splitlines():
        f = line.split("\t")
        if len(f) < 10:  # 11 since sealed was added; fields are only ever appended
            continue
        shape = tuple(int(d) for d in f[3].split(",") if d) if f[2] else None
        out.append(
            Segment(
                name=f[0],
                nbytes=int(f[1]),
                dtype=f[2],
                shape=shape,
                held=f[4] == "1",
                holders=tuple(sorted({int(p) for p in f[5].split(",") if p})),
                persistent=f[6] == "1",
                created=int(f[7]) / 1e9,
                creator_pid=int(f[8]),
                problem=f[9],
                sealed=len(f) > 10 and f[10] == "1",
                channel=_channel(f[11]) if len(f) > 11 else None,
            )
        )
    return out


def gc_report() -> List[Removed]:
    """Like :func:`gc`, saying for each segment removed its size and why."""

    # gc is not idempotent (a second call would find nothing): ask once, with room to spare.
    n = ffi.new("size_t *")
    cap = 1 << 20
    buf = ffi.new("char[]", cap)
    check(lib.zcbuf_gc(buf, cap, n, ffi.NULL))
    out = []
    for line in ffi.string(buf).decode("utf-8", "replace").splitlines():
        f = line.split("\t")
        if len(f) == 3:
            out.append(Removed(name=f[0], nbytes=int(f[1]), reason=f[2]))
    return out


def gc() -> List[str]:
    """Remove the segments no process maps any more (their holders exited or were killed),
    except those created with ``persist=True``. Returns the names removed.

    Only files with a valid zcbuf header are judged; nothing a live process maps is removed.

    >>> zcbuf.gc()          # after every worker holding a segment was SIGKILLed
    ['zcbuf-3f2a...']
    """
    return [r.name for r in gc_report()]


def unlink(name: str) -> None:
    """Remove a segment's name now, whoever holds it and persistent or not (arrays over it
    stay valid; new opens by that name fail, and a new segment may take the name).

    >>> zcbuf.unlink("camera-0")
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, not {type(name).__name__}")
    check(lib.zcbuf_unlink(name.encode("utf-8")))
