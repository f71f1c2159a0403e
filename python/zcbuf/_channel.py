"""Channels: typed messages streamed between processes through shared slots, with a doorbell.

A publisher creates a channel with a message shape and dtype; any number of subscribers open it
by name, in any process of the user, and receive the messages published from then on, each as a
read-only NumPy array over the slot it was written in (no copy). See docs/channels.md.

>>> with zcbuf.publish((480, 640, 3), "u1", name="camera") as pub:      # producer
...     with pub.loan() as frame:            # a writable array over a free slot
...         frame[:] = grab()                # fill it in place; sent when the block ends
>>> for frame in zcbuf.subscribe("camera"):  # consumer, in another process
...     show(frame)                          # read-only, valid as long as you keep it
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from typing import Any, Iterator, List, Optional, Tuple, Union

import numpy as np

from . import _dtype
from ._buffer import ShapeLike, _shape_tuple
from ._errors import ChannelClosed, InvalidArgumentError, NotFoundError, Timeout, check
from ._native import ffi, lib

__all__ = ["Publisher", "Subscriber", "publish", "subscribe"]

# A blocking call waits in native slices of at most this long, so that Python runs signal
# handlers (Ctrl-C) in between; the native side spins briefly, then sleeps on a futex.
_SLICE_US = 50_000
# recv_async polls this long (yielding to the event loop between looks) before it hands the wait
# to a helper thread.
_ASYNC_POLL_S = 50e-6
_ETIMEDOUT = lib.ZCBUF_ETIMEDOUT
_POLICIES = {"block": lib.ZCBUF_POLICY_BLOCK, "latest": lib.ZCBUF_POLICY_LATEST}
_POLICY_NAMES = {v: k for k, v in _POLICIES.items()}

_new = ffi.new
_gc = ffi.gc
_ffi_buffer = ffi.buffer
_from_buffer = ffi.from_buffer
_frombuffer = np.frombuffer
_recv = lib.zcbuf_sub_recv
_release = lib.zcbuf_sub_release
_send_copy = lib.zcbuf_pub_send_copy
_monotonic = time.monotonic


def _slices(timeout: Optional[float]) -> Tuple[int, Optional[float]]:
    """The first slice (µs) and the deadline for a call waiting ``timeout`` seconds."""
    if timeout is None or timeout == math.inf:
        return _SLICE_US, None
    if timeout < 0 or math.isnan(timeout):
        raise InvalidArgumentError(f"timeout must be >= 0 seconds or None, not {timeout}")
    return min(_SLICE_US, int(timeout * 1e6)), _monotonic() + timeout


def _next_slice(deadline: Optional[float]) -> int:
    """The next slice (µs), or -1 when the deadline has passed."""
    if deadline is None:
        return _SLICE_US
    left = deadline - _monotonic()
    if left <= 0:
        return -1
    return min(_SLICE_US, int(left * 1e6))


def _message_type(shape: ShapeLike, dtype: Any) -> Tuple[Tuple[int, ...], np.dtype]:
    shp = _shape_tuple(shape)
    dt = np.dtype(dtype)
    if dt.subdtype is not None:  # ("f4", (3,)): flattened into the shape, as NumPy does
        dt, sub = dt.subdtype
        shp = _shape_tuple(shp + tuple(sub))
    _dtype.check_dtype(dt)
    return shp, dt


def _describe(desc: Any) -> Tuple[Tuple[int, ...], np.dtype, int, int, str]:
    text = ffi.string(desc.dtype).decode("ascii", "replace")
    dt = _dtype.decode(text)
    shape = tuple(desc.shape[i] for i in range(desc.ndim))
    return shape, dt, int(desc.msg_len), int(desc.slots), _POLICY_NAMES.get(desc.policy, "?")


class _Endpoint:
    """What publishers and subscribers share: the channel's name and message type."""

    __slots__ = ()
    _id: int
    _name: str
    _shape: Tuple[int, ...]
    _dtype: np.dtype
    _slots: int
    _policy: str

    @property
    def name(self) -> str:
        """The channel's name (what :func:`subscribe` takes)."""
        return self._name

    @property
    def shape(self) -> Tuple[int, ...]:
        """The shape of every message."""
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        """The dtype of every message."""
        return self._dtype

    @property
    def slots(self) -> int:
        """Number of slots in the ring."""
        return self._slots

    @property
    def policy(self) -> str:
        """``"block"`` or ``"latest"``."""
        return self._policy

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._id == 0


class _Loan:
    """The context manager :meth:`Publisher.loan` returns: yields a writable array over a free
    slot; on a normal exit sends it, on an exception gives the slot back unsent."""

    __slots__ = ("_pub", "_timeout", "_slot", "_array")

    def __init__(self, pub: "Publisher", timeout: Optional[float]) -> None:
        self._pub = pub
        self._timeout = timeout
        self._slot = -1
        self._array: Optional[np.ndarray] = None

    def __enter__(self) -> np.ndarray:
        pub = self._pub
        pub._check_open()
        ptr = _new("uint8_t **")
        slot = _new("uint32_t *")
        us, deadline = _slices(self._timeout)
        st = lib.zcbuf_pub_loan(pub._id, us, ptr, slot)
        while st == _ETIMEDOUT:
            us = _next_slice(deadline)
            if us < 0:
                raise pub._full(self._timeout)
            st = lib.zcbuf_pub_loan(pub._id, us, ptr, slot)
        check(st)
        self._slot = int(slot[0])
        # The array keeps the Publisher object (so the native publisher, and the mapping) alive:
        # writing to it can never fault, even after close() or once the publisher object is
        # otherwise gone (the writes then reach a slot nobody reads).
        keep = _gc(ptr[0], lambda _c, p=pub: None)
        a = _frombuffer(_ffi_buffer(keep, pub._nbytes), pub._dtype, pub._count).reshape(pub._shape)
        self._array = a
        return a

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._array = None
        if exc_type is not None:
            lib.zcbuf_pub_cancel(self._pub._id, self._slot)
            return
        seq = _new("uint64_t *")
        check(lib.zcbuf_pub_send(self._pub._id, self._slot, seq))
        self._pub._seq = int(seq[0])


class Publisher(_Endpoint):
    """The publishing end of a channel; see :func:`publish`.

    Use it as a context manager, or call :meth:`close`, to end the stream: subscribers receive
    what was sent, then :class:`zcbuf.ChannelClosed`. If the process dies instead, subscribers
    learn it from the kernel (within about 50 ms) after draining what was sent.
    """

    __slots__ = ("_id", "_handle", "_name", "_shape", "_dtype", "_nbytes", "_count", "_slots", "_policy", "_seq", "_seq_pool", "__weakref__")

    def __init__(self, id_: int, desc: Any) -> None:
        self._id = 0
        self._handle = id_  # released by __del__ only: loan arrays keep this object alive
        shape, dt, nbytes, slots, policy = _describe(desc)
        n = _new("size_t *")
        check(lib.zcbuf_pub_name(id_, ffi.NULL, 0, n))
        buf = _new("char[]", n[0] + 1)
        check(lib.zcbuf_pub_name(id_, buf, n[0] + 1, n))
        self._name = ffi.string(buf).decode("utf-8", "surrogateescape")
        self._shape, self._dtype, self._nbytes = shape, dt, nbytes
        self._count = math.prod(shape)
        self._slots, self._policy = slots, policy
        self._seq: Optional[int] = None
        self._seq_pool: List[Any] = []
        self._id = id_

    @property
    def seq(self) -> Optional[int]:
        """Sequence number of the last message sent (None before the first)."""
        return self._seq

    def _check_open(self) -> None:
        if self._id == 0:
            raise ChannelClosed(f"publisher of channel {self._name!r} is closed")

    def _full(self, timeout: Optional[float]) -> Timeout:
        """The error for a full ring after ``timeout`` s, naming what holds it."""
        from ._admin import ls

        why = "received messages still alive pin every slot"
        try:
            (seg,) = [x for x in ls() if x.name == self._name]
            c = seg.channel
            if c is not None and c.subscribers and self._policy == "block":
                pid, pos, _, alive = min(c.subscribers, key=lambda x: x[1])
                if c.published - pos >= self._slots:
                    why = (f"the slowest subscriber (pid {pid}{'' if alive else ', dead'}) is at "
                           f"message {pos}, a whole ring ({self._slots} slots) behind")
        except Exception:  # noqa: BLE001 - the explanation is best effort; the timeout is not
            pass
        return Timeout(f"channel {self._name!r}: no slot came free within {timeout} s: {why}")

    @property
    def subscribers(self) -> int:
        """How many subscribers are receiving now."""
        self._check_open()
        n = _new("uint32_t *")
        check(lib.zcbuf_pub_subscribers(self._id, n))
        return int(n[0])

    def wait_for_subscribers(self, count: int = 1, timeout: Optional[float] = None) -> None:
        """Waits until at least ``count`` subscribers receive (subscribers see the messages
        published after they subscribed: a producer that must not lose the first messages
        waits for its consumers first). Raises :class:`zcbuf.Timeout`."""
        deadline = None if timeout is None else _monotonic() + timeout
        pause = 0.0002
        while self.subscribers < count:
            if deadline is not None and _monotonic() >= deadline:
                raise Timeout(
                    f"channel {self._name!r}: {self.subscribers} of {count} subscribers after "
                    f"{timeout} s"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.01)

    def loan(self, timeout: Optional[float] = None) -> _Loan:
        """A context manager yielding a writable array over a free slot, to fill in place; the
        message is sent when the block ends (and the slot given back unsent on an exception).

        Waits up to ``timeout`` seconds (None: forever) for a free slot: under ``"block"``
        while the slowest subscriber is a whole ring behind, and under either policy while
        arrays received by subscribers still pin every slot. Raises :class:`zcbuf.Timeout`.
        The array must not be used after the block: its slot then belongs to the subscribers.

        >>> with pub.loan() as frame:
        ...     frame[:] = camera.read()
        """
        return _Loan(self, timeout)

    def send(self, array: Any, timeout: Optional[float] = None) -> int:
        """Copies ``array`` (the message's shape and dtype) into a free slot and sends it, in one
        native call; returns its sequence number. Waits like :meth:`loan`."""
        pid = self._id
        if pid == 0:
            self._check_open()
        a = array if type(array) is np.ndarray else np.asarray(array)
        dt = a.dtype
        if a.shape != self._shape or (dt is not self._dtype and dt != self._dtype):
            raise InvalidArgumentError(
                f"channel {self._name!r} carries {self._dtype} arrays of shape {self._shape}, "
                f"not {a.dtype} of shape {a.shape}"
            )
        try:
            src = _from_buffer("uint8_t[]", a)
        except (BufferError, ValueError, TypeError):  # not contiguous
            src = _from_buffer("uint8_t[]", np.ascontiguousarray(a))
        # A result cell per call (sends from several threads each need their own), reused
        # through a pool: list.pop and append are atomic under the GIL, ffi.new is slow.
        pool = self._seq_pool
        seq = pool.pop() if pool else _new("uint64_t *")
        if timeout is None:
            us, deadline = _SLICE_US, None
        else:
            us, deadline = _slices(timeout)
        st = _send_copy(pid, src, self._nbytes, us, seq)
        while st == _ETIMEDOUT:
            us = _next_slice(deadline)
            if us < 0:
                pool.append(seq)
                raise self._full(timeout)
            st = _send_copy(pid, src, self._nbytes, us, seq)
        s = int(seq[0])
        pool.append(seq)
        if st:
            check(st)
        self._seq = s
        return s

    def close(self) -> None:
        """Ends the stream: subscribers receive what was sent, then ``ChannelClosed``.
        Idempotent."""
        if self._id:
            id_, self._id = self._id, 0
            check(lib.zcbuf_pub_close(id_))

    def __enter__(self) -> "Publisher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            lib.zcbuf_pub_free(self._handle)
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass

    def __reduce__(self) -> Any:
        raise TypeError(
            "a Publisher cannot be sent to another process (a channel has one publisher); "
            "send its name and subscribe there"
        )

    def __repr__(self) -> str:
        state = " closed" if self._id == 0 else ""
        return (
            f"<zcbuf.Publisher {self._name!r} {self._dtype} {self._shape} slots={self._slots} "
            f"policy={self._policy}{state}>"
        )


def publish(
    shape: ShapeLike,
    dtype: Any,
    *,
    slots: int = 8,
    name: Optional[str] = None,
    policy: str = "block",
    max_subscribers: int = 64,
) -> Publisher:
    """Creates a channel for messages of ``shape`` and ``dtype`` and returns its publisher.

    ``slots`` messages fit in the ring. ``policy="block"``: every subscriber sees every message,
    and the publisher waits (with its timeout) while the slowest is a whole ring behind.
    ``policy="latest"``: the publisher never waits for subscribers; one that falls behind skips
    to the newest message (``Subscriber.missed`` counts the skipped ones) — the video case.
    ``name`` is generated when not given. Up to ``max_subscribers`` may be subscribed at once.

    >>> pub = zcbuf.publish((1024,), "f4", slots=16)
    >>> pub.send(np.ones(1024, "f4"))
    0
    """
    shp, dt = _message_type(shape, dtype)
    if policy not in _POLICIES:
        raise InvalidArgumentError(f"policy must be 'block' or 'latest', not {policy!r}")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str, not {type(name).__name__}")
    for what, v, hi in (("slots", slots, 1 << 16), ("max_subscribers", max_subscribers, 1024)):
        if not isinstance(v, int) or not 1 <= v <= hi:
            raise InvalidArgumentError(f"{what} must be an int from 1 to {hi}, not {v!r}")
    text = _dtype.encode(dt)
    if len(text) > 128:
        raise InvalidArgumentError(f"dtype {dt} is too complex for a channel (descriptor > 128 bytes)")
    if len(shp) > 16:
        raise InvalidArgumentError(f"a channel's messages have at most 16 dimensions, not {len(shp)}")
    dims = ffi.new("uint64_t[]", list(shp) or [0])
    out = ffi.new("uint64_t *")
    desc = ffi.new("zcbuf_channel_t *")
    check(
        lib.zcbuf_publish(
            name.encode("utf-8") if name is not None else ffi.NULL,
            text,
            dt.itemsize,
            dims,
            len(shp),
            slots,
            _POLICIES[policy],
            max_subscribers,
            out,
            desc,
        )
    )
    return Publisher(out[0], desc)


def _wake(fut: "asyncio.Future[None]") -> None:
    if not fut.done():
        fut.set_result(None)


class _Waiter:
    """A subscriber's helper thread for asyncio: while any task waits, it waits natively until
    there is something to receive (without receiving it) and wakes every waiting task, which
    then look (one takes the message; the others wait again)."""

    def __init__(self, sid: int, name: str) -> None:
        self._sid = sid
        # Arming, disarming and taking the targets happen under this lock, so a wake-up meant
        # for one arming can never erase the next one (at worst it wakes it early, and
        # recv_async looks again).
        self._lock = threading.Lock()
        self._armed = threading.Event()
        self._targets: "List[Tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]" = []
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=f"zcbuf-subscriber-{name}", daemon=True)
        self._thread.start()

    def arm(self, loop: asyncio.AbstractEventLoop) -> "asyncio.Future[None]":
        fut: "asyncio.Future[None]" = loop.create_future()
        with self._lock:
            self._targets.append((loop, fut))
            self._armed.set()
        return fut

    def disarm(self, fut: "asyncio.Future[None]") -> None:
        with self._lock:
            self._targets = [t for t in self._targets if t[1] is not fut]
            if not self._targets:
                self._armed.clear()

    def _wake_all(self) -> None:
        with self._lock:
            targets, self._targets = self._targets, []
            self._armed.clear()
        for loop, fut in targets:
            try:
                loop.call_soon_threadsafe(_wake, fut)
            except RuntimeError:  # the loop was closed meanwhile
                pass

    def stop(self) -> None:
        """Ends the thread, waking every waiting task (which then finds the subscriber closed)."""
        with self._lock:
            self._stopped = True
            self._armed.set()
        self._wake_all()

    def _run(self) -> None:
        while True:
            self._armed.wait()
            if self._stopped:
                return
            st = lib.zcbuf_sub_wait(self._sid, _SLICE_US)
            if st == _ETIMEDOUT:
                continue
            if self._stopped:
                return
            self._wake_all()
            if st:  # the subscriber was closed: nothing more to wait for
                return


class Subscriber(_Endpoint):
    """The receiving end of a channel; see :func:`subscribe`.

    ``recv()`` returns a read-only array over the slot the message was written in: no copy,
    and the publisher never reuses that slot while the array (or any view of it) is alive, so
    keeping a message is safe. Iterating receives until the end of the stream.
    """

    __slots__ = ("_id", "_name", "_shape", "_dtype", "_nbytes", "_count", "_flat", "_slots", "_policy", "_last", "_out_pool", "_waiter", "__weakref__")

    def __init__(self, id_: int, name: str, desc: Any) -> None:
        self._id = 0
        shape, dt, nbytes, slots, policy = _describe(desc)
        self._name = name
        self._shape, self._dtype, self._nbytes = shape, dt, nbytes
        self._count = math.prod(shape)
        self._slots, self._policy = slots, policy
        self._flat = len(shape) == 1
        self._last: Any = None
        self._out_pool: List[Any] = []
        self._waiter: Optional[_Waiter] = None
        self._id = id_

    @property
    def seq(self) -> Optional[int]:
        """Sequence number of the last message received (None before the first)."""
        return None if self._last is None else int(self._last.seq)

    @property
    def timestamp(self) -> float:
        """Publish time of the last message received, in seconds since the epoch (like
        ``time.time()``; 0.0 before the first)."""
        return self.timestamp_ns / 1e9

    @property
    def timestamp_ns(self) -> int:
        """Publish time of the last message received, in ns since the epoch."""
        return 0 if self._last is None else int(self._last.timestamp_ns)

    @property
    def missed(self) -> int:
        """Messages skipped so far because this subscriber was behind (policy ``"latest"``)."""
        return 0 if self._last is None else int(self._last.missed)


    def recv(self, timeout: Optional[float] = None) -> np.ndarray:
        """The next message, as a read-only array over its slot.

        Waits up to ``timeout`` seconds (None: forever; 0: only look): spinning briefly, then
        asleep on the channel's doorbell, without the GIL, waking for Ctrl-C. Raises
        :class:`zcbuf.Timeout`, and :class:`zcbuf.ChannelClosed` once every message sent
        before the publisher closed the stream (or died) has been received.
        """
        # A message struct per call (recv from several threads must not share one), reused
        # through a pool: list.pop and append are atomic under the GIL, ffi.new is slow.
        pool = self._out_pool
        return self._recv_into(timeout, pool.pop() if pool else _new("zcbuf_message_t *"))

    def _recv_into(self, timeout: Optional[float], out: Any) -> np.ndarray:
        sid = self._id
        if sid == 0:
            raise ChannelClosed(f"subscriber of channel {self._name!r} is closed")
        us, deadline = _slices(timeout)
        st = _recv(sid, us, out)
        while st == _ETIMEDOUT:
            us = _next_slice(deadline)
            if us < 0:
                self._out_pool.append(out)
                raise Timeout(f"channel {self._name!r}: no message came within {timeout} s")
            if self._id == 0:  # closed by another thread between two slices
                raise ChannelClosed(f"subscriber of channel {self._name!r} was closed")
            st = _recv(sid, us, out)
        if st:
            self._out_pool.append(out)
            check(st)
        return self._view(sid, out)

    def _poll(self) -> Optional[np.ndarray]:
        """The next message if one is there now, else None (no exception: cheap to repeat)."""
        sid = self._id
        if sid == 0:
            raise ChannelClosed(f"subscriber of channel {self._name!r} is closed")
        pool = self._out_pool
        out = pool.pop() if pool else _new("zcbuf_message_t *")
        st = _recv(sid, 0, out)
        if st:
            pool.append(out)
            if st == _ETIMEDOUT:
                return None
            check(st)
        return self._view(sid, out)

    def _view(self, sid: int, out: Any) -> np.ndarray:
        slot = out.slot
        ptr = out.ptr  # both read before `out` can be handed to another call
        prev, self._last = self._last, out  # seq, timestamp and missed are read from it
        if prev is not None:
            self._out_pool.append(prev)
        # The slot stays pinned until this array and every view of it are gone.
        cd = _gc(ptr, lambda _c: _release(sid, slot))
        a = _frombuffer(memoryview(_ffi_buffer(cd, self._nbytes)).toreadonly(), self._dtype, self._count)
        return a if self._flat else a.reshape(self._shape)

    def __iter__(self) -> Iterator[np.ndarray]:
        """Receives until the end of the stream."""
        while True:
            try:
                yield self.recv()
            except ChannelClosed:
                return

    async def recv_async(self, timeout: Optional[float] = None) -> np.ndarray:
        """:meth:`recv` for asyncio: returns at once when a message is waiting; else a helper
        thread of this subscriber waits natively (spinning briefly, then on the doorbell) and
        wakes the event loop, which receives the message itself. The loop never blocks."""
        now = _monotonic()
        deadline = None if timeout is None else now + timeout
        # First a short poll that gives the loop back between looks (other tasks run): a reply
        # that comes within microseconds is taken without any thread hop or wake-up.
        poll_until = now + _ASYNC_POLL_S if deadline is None else min(deadline, now + _ASYNC_POLL_S)
        while True:
            m = self._poll()
            if m is not None:
                return m
            if _monotonic() >= poll_until:
                break
            await asyncio.sleep(0)
        while True:
            m = self._poll()
            if m is not None:
                return m
            left = None if deadline is None else deadline - _monotonic()
            if left is not None and left <= 0:
                raise Timeout(f"channel {self._name!r}: no message came for {timeout} s, the timeout")
            w = self._waiter
            if w is None:
                if self._id == 0:
                    raise ChannelClosed(f"subscriber of channel {self._name!r} is closed")
                w = self._waiter = _Waiter(self._id, self._name)
            fut = w.arm(asyncio.get_running_loop())
            try:
                await asyncio.wait_for(fut, left)
            except asyncio.TimeoutError:
                w.disarm(fut)
            except BaseException:  # cancelled: this task no longer waits
                w.disarm(fut)
                raise

    def close(self) -> None:
        """Stops receiving: a ``"block"`` publisher no longer waits for this subscriber.
        Arrays received stay valid. Idempotent."""
        if self._id:
            id_, self._id = self._id, 0
            if self._waiter is not None:
                self._waiter.stop()  # tasks in recv_async wake, and find the subscriber closed
                self._waiter = None
            check(lib.zcbuf_sub_close(id_))

    def __enter__(self) -> "Subscriber":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if self._waiter is not None:
                self._waiter.stop()
            if self._id:
                lib.zcbuf_sub_close(self._id)
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass

    def __reduce__(self) -> Any:
        raise TypeError("a Subscriber cannot be sent to another process: send the channel's name")

    def __repr__(self) -> str:
        state = " closed" if self._id == 0 else ""
        return (
            f"<zcbuf.Subscriber {self._name!r} {self._dtype} {self._shape} "
            f"policy={self._policy} seq={self.seq}{state}>"
        )


def subscribe(name: str, *, wait: Optional[float] = None) -> Subscriber:
    """Subscribes to channel ``name`` (any process of the same user): receives the messages
    published from now on.

    Without ``wait``, a channel that does not exist is ``NotFoundError`` and one whose stream
    has ended (its publisher closed it, or died) is ``ChannelClosed``. With ``wait`` (seconds),
    both are waited out — a consumer started before its producer, or reconnecting after the
    producer restarted — until the channel is there with a live publisher, else
    :class:`zcbuf.Timeout`.

    >>> with zcbuf.subscribe("camera", wait=30) as sub:
    ...     for frame in sub:           # ends when the publisher closes the stream (or dies)
    ...         process(frame)
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, not {type(name).__name__}")
    deadline = None if wait is None or wait == math.inf else _monotonic() + wait
    pause = 0.0005
    while True:
        out = ffi.new("uint64_t *")
        desc = ffi.new("zcbuf_channel_t *")
        try:
            check(lib.zcbuf_subscribe(name.encode("utf-8"), out, desc))
            return Subscriber(out[0], name, desc)
        except (NotFoundError, ChannelClosed) as e:
            if wait is None:
                raise
            if deadline is not None and _monotonic() >= deadline:
                raise Timeout(f"channel {name!r}: no live channel of that name within {wait} s "
                              f"({e})") from None
        time.sleep(pause if deadline is None else max(0.0, min(pause, deadline - _monotonic())))
        pause = min(pause * 2, 0.02)


Channel = Union[Publisher, Subscriber]
