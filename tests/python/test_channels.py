"""Channels from Python: publish/subscribe across processes (spawn, fork, plain subprocesses),
both policies, kept arrays, errors, asyncio, Ctrl-C, idle CPU, and death of either side.

Every channel here is named ``chtest-<pid>-...`` so that nothing else is touched; after each test
no such name may be left in /dev/shm once every endpoint and array is gone.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import multiprocessing as mp
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import List, Optional

import numpy as np
import pytest

import zcbuf

PREFIX = f"chtest-{os.getpid()}-"
_count = itertools.count()
PYENV = dict(os.environ)
# Children import the zcbuf this test imported (the installed package, or a development tree
# on PYTHONPATH), never the source tree, which has no built native module.
PYENV["PYTHONPATH"] = os.pathsep.join(
    [os.path.dirname(os.path.dirname(zcbuf.__file__))] + [p for p in [os.environ.get("PYTHONPATH")] if p])


def fresh(tag: str) -> str:
    return f"{PREFIX}{tag}-{next(_count)}"


def ours() -> List[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(PREFIX))


@pytest.fixture(autouse=True)
def no_leftovers():
    yield
    gc.collect()
    deadline = time.monotonic() + 3
    while ours() and time.monotonic() < deadline:
        time.sleep(0.02)
    left = ours()
    for n in left:
        try:
            zcbuf.unlink(n)
        except zcbuf.Error:
            pass
    assert not left, f"left in /dev/shm after every endpoint closed: {left}"


def reap_leftover(name: str, *pids: int) -> None:
    """After SIGKILLing ``pids`` (the last processes mapping ``name``): the segment they left is
    unheld, and ``zcbuf.gc`` removes it."""
    deadline = time.monotonic() + 10
    for pid in pids:
        while os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z":
            assert time.monotonic() < deadline, f"process {pid} does not die"
            time.sleep(0.01)
    gc.collect()
    if os.path.exists(f"/dev/shm/{name}"):
        removed = zcbuf.gc()
        assert name in removed or not os.path.exists(f"/dev/shm/{name}"), removed


def frame(i: int, shape=(4, 8), dtype="u4") -> np.ndarray:
    return np.full(shape, i, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# child processes speaking a line protocol


class Child:
    """A ``python -c CODE`` child; reads lines from its stdout with a bound."""

    def __init__(self, code: str, *args: str) -> None:
        self.p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                                  env=PYENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, bufsize=1)

    @property
    def pid(self) -> int:
        return self.p.pid

    def line(self, timeout: float = 30) -> str:
        r, _, _ = select.select([self.p.stdout], [], [], timeout)
        if not r:
            self.p.kill()
            raise AssertionError(f"no line from child in {timeout} s; stderr: {self.err()}")
        s = self.p.stdout.readline()
        if not s:
            raise AssertionError(f"child ended (rc {self.p.wait()}): {self.err()}")
        return s.rstrip("\n")

    def expect(self, want: str, timeout: float = 30) -> str:
        s = self.line(timeout)
        assert s.startswith(want), f"child said {s!r}, expected {want!r}; stderr: {self.err()}"
        return s

    def say(self, s: str = "") -> None:
        self.p.stdin.write(s + "\n")
        self.p.stdin.flush()

    def done(self, timeout: float = 30) -> None:
        """Waits for a normal exit (status 0)."""
        rc = self.p.wait(timeout=timeout)
        assert rc == 0, f"child rc {rc}: {self.err()}"

    def err(self) -> str:
        if self.p.poll() is None:
            return "(still running)"
        return self.p.stderr.read()

    def kill(self) -> float:
        self.p.send_signal(signal.SIGKILL)
        t = time.monotonic()
        self.p.wait(timeout=30)
        return t

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(timeout=30)
        for f in (self.p.stdin, self.p.stdout, self.p.stderr):
            f.close()


@pytest.fixture
def children():
    made: List[Child] = []

    def make(code: str, *args: str) -> Child:
        c = Child(code, *args)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


# ---------------------------------------------------------------------------------------------
# cross-process delivery (multiprocessing spawn and fork)


def _mp_subscriber(name: str, q, n: int) -> None:
    import zcbuf as z

    with z.subscribe(name) as sub:
        q.put("ready")
        got = []
        for a in sub:
            got.append((sub.seq, int(a[0, 0]), int(a.sum()), sub.missed))
        q.put(got)


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_cross_process_every_message_in_order(method):
    name = fresh(f"xp-{method}")
    ctx = mp.get_context(method)
    q = ctx.Queue()
    n = 300
    pub = zcbuf.publish((4, 8), "u4", slots=4, name=name)
    p = ctx.Process(target=_mp_subscriber, args=(name, q, n))
    p.start()
    try:
        assert q.get(timeout=60) == "ready"
        for i in range(n):
            if i % 2:
                pub.send(frame(i), timeout=10)
            else:
                with pub.loan(timeout=10) as f:
                    f[:] = i
            assert pub.seq == i
        pub.close()
        got = q.get(timeout=60)
        p.join(30)
        assert p.exitcode == 0
    finally:
        if p.is_alive():
            p.kill()
            p.join()
        pub.close()
    assert got == [(i, i, i * 32, 0) for i in range(n)]


def _mp_many(name: str, q, idx: int) -> None:
    import zcbuf as z

    sub = z.subscribe(name)
    q.put(("ready", idx))
    expect = 0
    bad = None
    for a in sub:
        if sub.seq != expect or not (a == expect).all():
            bad = (expect, sub.seq, int(a[0, 0]))
            break
        expect += 1
    sub.close()
    q.put(("done", idx, expect, bad))


def test_eight_subscriber_processes_each_see_every_message_in_order():
    name = fresh("many")
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    n, k = 400, 8
    pub = zcbuf.publish((4, 8), "u4", slots=4, name=name, max_subscribers=k)
    procs = [ctx.Process(target=_mp_many, args=(name, q, i)) for i in range(k)]
    for p in procs:
        p.start()
    try:
        assert sorted(q.get(timeout=60)[1] for _ in range(k)) == list(range(k))
        with pytest.raises(zcbuf.OutOfMemoryError, match="subscriber"):
            zcbuf.subscribe(name)  # all k entries taken
        for i in range(n):
            pub.send(frame(i), timeout=30)
        pub.close()
        results = sorted(q.get(timeout=60)[1:] for _ in range(k))
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        pub.close()
    assert results == [(i, n, None) for i in range(k)]


# ---------------------------------------------------------------------------------------------
# latest policy


def test_latest_slow_subscriber_skips_to_the_newest():
    name = fresh("latest")
    with zcbuf.publish((2,), "i8", slots=3, name=name, policy="latest") as pub:
        with zcbuf.subscribe(name) as sub:
            for i in range(10):
                pub.send(np.array([i, -i]))
            a = sub.recv(timeout=1)
            assert (sub.seq, a[0], sub.missed) == (9, 9, 9)
            for i in range(10, 15):
                pub.send(np.array([i, -i]))
            b = sub.recv(timeout=1)
            assert (sub.seq, b[0], sub.missed) == (14, 14, 13)
            pub.send(np.array([15, -15]))
            c = sub.recv(timeout=1)
            assert (sub.seq, c[0], sub.missed) == (15, 15, 13)  # not behind: nothing skipped
            assert a[0] == 9 and b[0] == 14  # kept while the publisher went on
            with pytest.raises(zcbuf.Timeout):
                sub.recv(timeout=0)


def test_latest_slow_subscriber_process(children):
    name = fresh("latest-xp")
    with zcbuf.publish((16,), "i8", slots=4, name=name, policy="latest") as pub:
        c = children("""
            import sys, time, zcbuf
            sub = zcbuf.subscribe(sys.argv[1])
            print("ready", flush=True)
            vals = []
            for a in sub:
                vals.append(int(a[0]))
                assert (a == a[0]).all(), "torn message"
                time.sleep(0.01)
            print("got", len(vals), sub.missed, vals[-1],
                  int(all(x < y for x, y in zip(vals, vals[1:]))), flush=True)
        """, name)
        c.expect("ready")
        n = 3000
        for i in range(n):
            pub.send(np.full(16, i))
            if i % 100 == 0:
                time.sleep(0.001)
    _, cnt, missed, last, increasing = c.expect("got").split()
    c.done()
    assert int(missed) > 0 and int(cnt) < n
    assert int(cnt) + int(missed) == n, "every message is either received or counted missed"
    assert int(last) == n - 1, "the last message a slow subscriber gets is the newest"
    assert increasing == "1"


def test_latest_kept_message_survives_and_pins_its_slot():
    name = fresh("keep-latest")
    with zcbuf.publish((256,), "u1", slots=2, name=name, policy="latest") as pub:
        with zcbuf.subscribe(name) as sub:
            pub.send(np.full(256, 7, "u1"))
            kept = sub.recv(timeout=1)
            for i in range(100):
                pub.send(np.full(256, i % 250 + 1, "u1"), timeout=1)
                assert (kept == 7).all(), "a kept message was overwritten"
            last = sub.recv(timeout=1)
            assert last[0] == 99 % 250 + 1
            # Both slots pinned: no loan possible.
            with pytest.raises(zcbuf.Timeout):
                pub.send(np.zeros(256, "u1"), timeout=0.1)
            del kept
            pub.send(np.zeros(256, "u1"), timeout=1)
            del last


# ---------------------------------------------------------------------------------------------
# kept arrays


def test_hundred_kept_frames_are_never_overwritten(children):
    name = fresh("keep100")
    c = children("""
        import sys, numpy as np, zcbuf
        pub = zcbuf.publish((64, 64), "u2", slots=110, name=sys.argv[1])
        print("ready", flush=True)
        sys.stdin.readline()
        for i in range(1000):
            pub.send(np.full((64, 64), i, "u2"), timeout=30)
        pub.close()
        print("sent", flush=True)
    """, name)
    c.expect("ready")
    sub = zcbuf.subscribe(name)
    c.say()
    kept = [sub.recv(timeout=30) for _ in range(100)]
    views = [k[10:20, ::3] for k in kept[::10]]
    rest = 0
    for a in sub:
        assert (a == 100 + rest).all()
        rest += 1
        for j in range(0, 100, 17):
            assert (kept[j] == j).all(), f"kept frame {j} overwritten at message {100 + rest}"
    c.expect("sent")
    c.done()
    assert rest == 900
    for j, k in enumerate(kept):
        assert (k == j).all(), f"kept frame {j} overwritten"
        assert not k.flags.writeable
        with pytest.raises(ValueError):
            k[0, 0] = 1
    del kept
    for j, v in enumerate(views):
        assert (v == 10 * j).all()
    del views, a
    sub.close()


def test_views_kept_after_subscriber_close_stay_valid():
    name = fresh("afterclose")
    pub = zcbuf.publish((1000,), "f8", slots=2, name=name, policy="latest")
    sub = zcbuf.subscribe(name)
    pub.send(np.arange(1000.0))
    a = sub.recv(timeout=1)
    v = a[500:]
    w = a.reshape(10, 100).T
    del a
    sub.close()
    assert sub.closed
    with pytest.raises(zcbuf.ChannelClosed):
        sub.recv(timeout=0)
    for i in range(50):
        pub.send(np.full(1000, -1.0), timeout=1)
    gc.collect()
    assert (v == np.arange(500.0, 1000.0)).all()
    assert (w.T.ravel() == np.arange(1000.0)).all()
    # The one slot left: pinned views keep the other.
    del v
    assert (w[0] == np.arange(0.0, 1000.0, 100)).all()
    del w
    pub.close()


def test_block_soft_pinned_message_kept_across_recv():
    """Under block the last message is held by position only until the next recv: a message kept
    past the next recv must keep its bytes while the publisher laps the ring many times."""
    name = fresh("soft")
    with zcbuf.publish((32,), "u8", slots=3, name=name) as pub:
        with zcbuf.subscribe(name) as sub:
            pub.send(np.full(32, 1, "u8"))
            first = sub.recv(timeout=1)
            for i in range(2, 200):
                pub.send(np.full(32, i, "u8"), timeout=1)
                b = sub.recv(timeout=1)
                assert (b == i).all()
                assert (first == 1).all(), f"kept message overwritten at {i}"
                del b


# ---------------------------------------------------------------------------------------------
# errors


def test_wrong_dtype_or_shape_is_invalid_argument():
    name = fresh("bad")
    with zcbuf.publish((3, 4), "f4", name=name) as pub:
        for bad in (np.zeros((3, 4), "f8"), np.zeros((4, 3), "f4"), np.zeros(12, "f4"),
                    np.zeros((3, 4), ">f4"), [[1, 2]]):
            with pytest.raises(zcbuf.InvalidArgumentError):
                pub.send(bad)
        assert pub.seq is None
        # A non-contiguous and a Fortran-ordered array of the right type are copied as values.
        with zcbuf.subscribe(name) as sub:
            a = np.arange(24, dtype="f4").reshape(3, 8)[:, ::2]
            pub.send(a)
            assert (sub.recv(timeout=1) == a).all()
            f = np.asfortranarray(np.arange(12, dtype="f4").reshape(3, 4))
            pub.send(f)
            assert (sub.recv(timeout=1) == f).all()
    with pytest.raises(zcbuf.InvalidArgumentError):
        zcbuf.publish((3,), "f4", name=fresh("bad"), policy="sometimes")
    with pytest.raises(zcbuf.InvalidArgumentError):
        zcbuf.publish((3,), "f4", name=fresh("bad"), slots=0)
    with pytest.raises(zcbuf.InvalidArgumentError):
        zcbuf.publish((3,), "f4", name=fresh("bad"), slots=1, policy="latest")
    with pytest.raises((zcbuf.InvalidArgumentError, TypeError)):
        zcbuf.publish((3,), object, name=fresh("bad"))


def test_full_ring_times_out():
    name = fresh("full")
    with zcbuf.publish((8,), "u1", slots=2, name=name) as pub:
        sub = zcbuf.subscribe(name)
        pub.send(np.zeros(8, "u1"), timeout=0)
        pub.send(np.ones(8, "u1"), timeout=0)
        t = time.monotonic()
        with pytest.raises(zcbuf.Timeout) as e:
            pub.send(np.ones(8, "u1"), timeout=0.2)
        took = time.monotonic() - t
        assert isinstance(e.value, TimeoutError)
        assert 0.19 <= took < 5
        with pytest.raises(TimeoutError):
            with pub.loan(timeout=0.1):
                pass
        with pytest.raises(zcbuf.Timeout):
            with pub.loan(timeout=0):
                pass
        assert sub.recv(timeout=0)[0] == 0
        pub.send(np.full(8, 2, "u1"), timeout=1)  # room for one again
        assert pub.seq == 2
        sub.close()


def test_loan_exception_gives_the_slot_back():
    name = fresh("cancel")
    with zcbuf.publish((8,), "u1", slots=1, name=name) as pub:
        with zcbuf.subscribe(name) as sub:
            with pytest.raises(RuntimeError):
                with pub.loan(timeout=0) as f:
                    f[:] = 9
                    raise RuntimeError("no")
            with pytest.raises(zcbuf.Timeout):
                sub.recv(timeout=0)  # nothing was sent
            with pub.loan(timeout=0) as f:  # the only slot is free again
                f[:] = 3
            assert pub.seq == 0
            assert (sub.recv(timeout=0) == 3).all()


def test_subscribe_to_a_plain_buffer_or_nothing():
    name = fresh("plain")
    b = zcbuf.create(4096, name=name)
    try:
        with pytest.raises(zcbuf.InvalidArgumentError, match="not a channel"):
            zcbuf.subscribe(name)
    finally:
        b.free()
        del b
    with pytest.raises(zcbuf.NotFoundError):
        zcbuf.subscribe(fresh("nothing"))
    with pytest.raises(TypeError):
        zcbuf.subscribe(b"bytes")  # type: ignore[arg-type]


def test_second_publisher_on_a_held_name():
    name = fresh("second")
    pub = zcbuf.publish((4,), "u1", name=name)
    with pytest.raises(zcbuf.AlreadyExistsError):
        zcbuf.publish((4,), "u1", name=name)
    sub = zcbuf.subscribe(name)
    pub.close()
    # The subscriber still maps it: the name is still held.
    with pytest.raises(zcbuf.AlreadyExistsError):
        zcbuf.publish((4,), "u1", name=name)
    with pytest.raises(zcbuf.ChannelClosed):
        sub.recv(timeout=0)
    sub.close()
    del pub, sub
    gc.collect()
    assert not os.path.exists(f"/dev/shm/{name}")
    with zcbuf.publish((4,), "u1", name=name) as again:  # free once everyone closed
        assert again.name == name


def test_seq_timestamp_missed():
    name = fresh("meta")
    with zcbuf.publish((2, 3), "i2", slots=4, name=name) as pub:
        assert pub.seq is None and pub.name == name
        assert (pub.shape, pub.dtype, pub.slots, pub.policy) == ((2, 3), np.dtype("i2"), 4, "block")
        sub = zcbuf.subscribe(name)
        assert (sub.seq, sub.timestamp, sub.missed) == (None, 0.0, 0)
        assert (sub.shape, sub.dtype, sub.slots, sub.policy) == ((2, 3), np.dtype("i2"), 4, "block")
        for i in range(10):
            t0 = time.time()
            assert pub.send(np.full((2, 3), i, "i2")) == i
            t1 = time.time()
            a = sub.recv(timeout=1)
            assert a.shape == (2, 3) and a.dtype == np.dtype("i2")
            assert sub.seq == i and pub.seq == i and sub.missed == 0
            assert t0 - 0.01 <= sub.timestamp <= t1 + 0.01, (t0, sub.timestamp, t1)
            assert abs(sub.timestamp_ns / 1e9 - sub.timestamp) < 1e-6
        sub.close()


def test_subscriber_sees_only_messages_published_after_it_subscribed():
    name = fresh("late")
    with zcbuf.publish((1,), "u8", slots=4, name=name) as pub:
        pub.send(np.array([1], "u8"))
        with zcbuf.subscribe(name) as sub:
            with pytest.raises(zcbuf.Timeout):
                sub.recv(timeout=0)
            pub.send(np.array([2], "u8"))
            assert sub.recv(timeout=1)[0] == 2 and sub.seq == 1


def test_iteration_ends_at_close():
    name = fresh("iter")
    pub = zcbuf.publish((5,), "i4", slots=8, name=name)
    sub = zcbuf.subscribe(name)
    for i in range(6):
        pub.send(np.arange(5, dtype="i4") + i)
    pub.close()
    with pytest.raises(zcbuf.ChannelClosed):
        pub.send(np.zeros(5, "i4"))
    got = list(sub)
    assert [int(a[0]) for a in got] == list(range(6))
    assert all((a == np.arange(5) + i).all() for i, a in enumerate(got))
    with pytest.raises(zcbuf.ChannelClosed) as e:
        sub.recv(timeout=1)
    assert isinstance(e.value, EOFError) and isinstance(e.value, zcbuf.Error)
    assert "end of stream" in str(e.value)
    assert list(sub) == []
    sub.close()
    assert list(sub) == []


def test_subscriber_entries_come_back():
    name = fresh("entries")
    with zcbuf.publish((1,), "u1", name=name, max_subscribers=2) as pub:
        a, b = zcbuf.subscribe(name), zcbuf.subscribe(name)
        with pytest.raises(zcbuf.OutOfMemoryError):
            zcbuf.subscribe(name)
        pub.send(np.ones(1, "u1"))
        kept = a.recv(timeout=1)
        a.close()
        with pytest.raises(zcbuf.OutOfMemoryError):
            zcbuf.subscribe(name)  # a's entry stays while its array lives
        del kept
        gc.collect()
        c = zcbuf.subscribe(name)
        c.close()
        b.close()


# ---------------------------------------------------------------------------------------------
# asyncio


def test_recv_async_several_subscribers():
    name = fresh("async")
    n, k = 50, 4

    async def consume(sub):
        got = []
        while True:
            try:
                a = await sub.recv_async(timeout=10)
            except zcbuf.ChannelClosed:
                return got
            got.append(int(a[0]))

    async def main():
        pub = zcbuf.publish((3,), "i8", slots=4, name=name)
        subs = [zcbuf.subscribe(name) for _ in range(k)]
        tasks = [asyncio.ensure_future(consume(s)) for s in subs]
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        t = asyncio.ensure_future(ticker())

        def produce():
            for i in range(n):
                pub.send(np.full(3, i), timeout=10)
                time.sleep(0.002)
            pub.close()

        await asyncio.get_running_loop().run_in_executor(None, produce)
        results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        t.cancel()
        for s in subs:
            s.close()
        return results, ticks

    results, ticks = asyncio.run(main())
    assert results == [list(range(n))] * k
    assert ticks > 5, "the event loop did not run while subscribers waited"


def test_recv_async_timeout():
    name = fresh("async-to")
    with zcbuf.publish((1,), "u1", name=name) as pub, zcbuf.subscribe(name) as sub:
        with pytest.raises(zcbuf.Timeout):
            asyncio.run(sub.recv_async(timeout=0))
        t = time.monotonic()
        with pytest.raises(zcbuf.Timeout):
            asyncio.run(sub.recv_async(timeout=0.2))
        assert 0.15 < time.monotonic() - t < 5
        pub.send(np.ones(1, "u1"))
        assert asyncio.run(sub.recv_async(timeout=1))[0] == 1


def test_cancelled_recv_async_loses_no_message(children):
    """``asyncio.wait_for(sub.recv_async(), t)`` that times out must neither swallow the next
    message nor leave a worker thread that keeps ``asyncio.run`` from returning."""
    c = children("""
        import asyncio, sys, time, numpy as np, zcbuf
        name = sys.argv[1]
        pub = zcbuf.publish((1,), "i8", slots=4, name=name)
        sub = zcbuf.subscribe(name)
        async def main():
            try:
                await asyncio.wait_for(sub.recv_async(), 0.1)
            except asyncio.TimeoutError:
                pass
            pub.send(np.array([100]))
            pub.send(np.array([101]))
            await asyncio.sleep(0.2)
            print("next", int(sub.recv(timeout=1)[0]), flush=True)
        t = time.monotonic()
        asyncio.run(main())
        print("returned", round(time.monotonic() - t, 1), flush=True)
        pub.close()
        sub.close()
    """, fresh("async-cancel"))
    assert c.expect("next") == "next 100", "the cancelled recv_async consumed a message"
    c.expect("returned", timeout=5)
    c.done()


# ---------------------------------------------------------------------------------------------
# Ctrl-C, idle CPU


CTRL_C_RECV = """
    import sys, time, zcbuf
    pub = zcbuf.publish((4,), "u1", name=sys.argv[1])
    sub = zcbuf.subscribe(sys.argv[1])
    print("ready", flush=True)
    try:
        sub.recv()
        print("returned", flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
"""

CTRL_C_LOAN = """
    import sys, time, numpy as np, zcbuf
    pub = zcbuf.publish((4,), "u1", slots=1, name=sys.argv[1])
    sub = zcbuf.subscribe(sys.argv[1])
    pub.send(np.zeros(4, "u1"))
    print("ready", flush=True)
    try:
        with pub.loan() as f:
            f[:] = 1
        print("returned", flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    try:
        pub.send(np.zeros(4, "u1"))
    except KeyboardInterrupt:
        print("interrupted", flush=True)
"""


@pytest.mark.parametrize("where", ["recv", "loan"])
def test_ctrl_c_interrupts_a_blocked_call(children, where):
    c = children(CTRL_C_RECV if where == "recv" else CTRL_C_LOAN, fresh(f"sigint-{where}"))
    c.expect("ready")
    for _ in range(2 if where == "loan" else 1):
        time.sleep(0.3)  # in the native wait by now
        t = time.monotonic()
        c.p.send_signal(signal.SIGINT)
        assert c.line(timeout=5) == "interrupted"
        assert time.monotonic() - t < 1.0
    assert c.p.wait(timeout=10) == 0, c.err()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_subscriber_uses_almost_no_cpu(children):
    name = fresh("idle")
    with zcbuf.publish((4,), "u1", name=name) as pub:
        c = children("""
            import sys, zcbuf
            sub = zcbuf.subscribe(sys.argv[1])
            print("ready", flush=True)
            a = sub.recv()
            print("got", int(a[0]), flush=True)
        """, name)
        c.expect("ready")
        time.sleep(0.3)
        before = cpu_seconds(c.pid)
        time.sleep(3)
        used = cpu_seconds(c.pid) - before
        pub.send(np.full(4, 5, "u1"))
        assert c.expect("got") == "got 5"
        c.done()
    assert used < 0.2, f"an idle subscriber used {used:.2f} s of CPU in 3 s"


# ---------------------------------------------------------------------------------------------
# death of either side


PUBLISHER = """
    import os, sys, time, numpy as np, zcbuf
    n = int(sys.argv[2])
    pub = zcbuf.publish((8,), "i8", slots=max(n, 2), name=sys.argv[1])
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(n):
        pub.send(np.full(8, i))
    child = 0
    if len(sys.argv) > 3:   # fork a child that outlives us (and must not keep us "alive")
        child = os.fork()
        if child == 0:
            time.sleep(60)
            os._exit(0)
    print("sent", child, flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("fork_child", [False, True], ids=["alone", "with-fork-child"])
@pytest.mark.parametrize("waiting", [False, True], ids=["drain", "asleep"])
def test_publisher_sigkill(children, fork_child, waiting):
    name = fresh("pubkill")
    n = 0 if waiting else 20
    args = (name, str(n)) + (("fork",) if fork_child else ())
    c = children(PUBLISHER, *args)
    c.expect("ready")
    sub = zcbuf.subscribe(name)
    c.say()
    child = int(c.expect("sent").split()[1])
    try:
        check_publisher_death(c, sub, n, waiting)
    finally:
        if child:
            assert os.path.exists(f"/proc/{child}"), "the fork child should still live"
            os.kill(child, signal.SIGKILL)
            del sub
            reap_leftover(name, child)


def check_publisher_death(c: Child, sub: zcbuf.Subscriber, n: int, waiting: bool) -> None:
    result = {}
    if waiting:
        def blocked():
            try:
                sub.recv()
            except zcbuf.ChannelClosed as e:
                result["t"], result["e"] = time.monotonic(), e
        th = threading.Thread(target=blocked)
        th.start()
        time.sleep(0.3)
        killed = c.kill()
        th.join(10)
        assert not th.is_alive(), "recv() never learnt that the publisher died"
        e, t = result["e"], result["t"]
    else:
        killed = c.kill()
        for i in range(n):
            a = sub.recv(timeout=5)
            assert (a == i).all() and sub.seq == i
        del a
        with pytest.raises(zcbuf.ChannelClosed) as ei:
            sub.recv(timeout=5)
        e, t = ei.value, time.monotonic()
    assert "died" in str(e), str(e)
    assert t - killed < 1.0, f"ChannelClosed came {t - killed:.2f} s after the kill"
    with pytest.raises(zcbuf.ChannelClosed):
        sub.recv(timeout=0)
    sub.close()


def test_publisher_death_seen_while_fork_child_lives(children):
    """The publisher forks; its child lives on (inheriting the role descriptor); the publisher's
    SIGKILL must still be seen by the subscriber."""
    name = fresh("forkpub")
    c = children("""
        import os, sys, time, numpy as np, zcbuf
        pub = zcbuf.publish((8,), "i8", slots=4, name=sys.argv[1])
        print("ready", flush=True)
        sys.stdin.readline()
        pub.send(np.full(8, 1))
        pid = os.fork()
        if pid == 0:
            try:
                pub.send(np.full(8, 2))
                print("child-used-parent-endpoint", flush=True)
            except zcbuf.InvalidArgumentError as e:
                print("child-refused", "fork" in str(e), flush=True)
            time.sleep(60)
            os._exit(0)
        time.sleep(0.2)
        print("forked", pid, flush=True)
        time.sleep(60)
    """, name)
    c.expect("ready")
    sub = zcbuf.subscribe(name)
    c.say()
    assert c.line() == "child-refused True"
    child = int(c.expect("forked").split()[1])
    try:
        killed = c.kill()
        assert sub.recv(timeout=5)[0] == 1
        with pytest.raises(zcbuf.ChannelClosed, match="died"):
            sub.recv(timeout=5)
        assert time.monotonic() - killed < 1.0
        assert os.path.exists(f"/proc/{child}"), "the fork child should still live"
    finally:
        os.kill(child, signal.SIGKILL)
    sub.close()
    del sub
    reap_leftover(name, child)


SUBSCRIBER_HOLDING = """
    import sys, zcbuf
    sub = zcbuf.subscribe(sys.argv[1])
    print("ready", flush=True)
    held = []
    for _ in range(int(sys.argv[2])):
        sys.stdin.readline()
        held.append(sub.recv(timeout=10))
        held.append(held[-1][1:])  # and a view
        print("got", int(held[-1][0]), flush=True)
    sys.stdin.readline()
"""


def test_block_publisher_continues_after_waited_subscriber_is_killed(children):
    name = fresh("subkill-block")
    with zcbuf.publish((8,), "i8", slots=4, name=name, max_subscribers=1) as pub:
        c = children(SUBSCRIBER_HOLDING, name, "2")
        c.expect("ready")
        for i in range(4):
            pub.send(np.full(8, i), timeout=1)
        c.say()
        c.expect("got 0")
        c.say()
        c.expect("got 1")
        # The subscriber is at 2 with 0 and 1 pinned, the ring is full: the publisher waits.
        with pytest.raises(zcbuf.Timeout):
            pub.send(np.full(8, 4), timeout=0.2)
        done = {}

        def send():
            pub.send(np.full(8, 4))
            done["t"] = time.monotonic()

        th = threading.Thread(target=send)
        th.start()
        time.sleep(0.3)
        assert th.is_alive()
        killed = c.kill()
        th.join(10)
        assert not th.is_alive(), "the publisher still waits for a dead subscriber"
        assert done["t"] - killed < 1.0
        # Every slot came back (no pins left), and the dead one's entry is free again.
        for i in range(5, 13):
            pub.send(np.full(8, i), timeout=1)
        with zcbuf.subscribe(name) as s2:
            pub.send(np.full(8, 13), timeout=1)
            assert s2.recv(timeout=1)[0] == 13


def test_latest_publisher_gets_pinned_slots_back_from_a_killed_subscriber(children):
    name = fresh("subkill-latest")
    with zcbuf.publish((8,), "i8", slots=2, name=name, policy="latest") as pub:
        c = children(SUBSCRIBER_HOLDING, name, "2")
        c.expect("ready")
        pub.send(np.full(8, 0))
        c.say()
        c.expect("got 0")
        pub.send(np.full(8, 1))
        c.say()
        c.expect("got 1")
        with pytest.raises(zcbuf.Timeout):  # both slots pinned by the child's views
            pub.send(np.full(8, 2), timeout=0.2)
        killed = c.kill()
        pub.send(np.full(8, 2), timeout=5)
        assert time.monotonic() - killed < 1.0
        pub.send(np.full(8, 3), timeout=1)
        pub.send(np.full(8, 4), timeout=1)


def test_subscriber_death_seen_while_its_fork_child_lives(children):
    name = fresh("forksub")
    with zcbuf.publish((8,), "i8", slots=2, name=name) as pub:
        c = children("""
            import os, sys, time, zcbuf
            sub = zcbuf.subscribe(sys.argv[1])
            pid = os.fork()
            if pid == 0:
                try:
                    sub.recv(timeout=0)
                    print("child-used-parent-endpoint", flush=True)
                except zcbuf.InvalidArgumentError as e:
                    print("child-refused", "fork" in str(e), flush=True)
                time.sleep(60)
                os._exit(0)
            time.sleep(0.2)
            print("forked", pid, flush=True)
            time.sleep(60)
        """, name)
        assert c.line() == "child-refused True"
        child = int(c.expect("forked").split()[1])
        try:
            pub.send(np.full(8, 0), timeout=1)
            pub.send(np.full(8, 1), timeout=1)
            with pytest.raises(zcbuf.Timeout):
                pub.send(np.full(8, 2), timeout=0.1)  # the subscriber is a ring behind
            killed = c.kill()
            pub.send(np.full(8, 2), timeout=5)
            assert time.monotonic() - killed < 1.0
        finally:
            os.kill(child, signal.SIGKILL)
    del pub
    reap_leftover(name, child)


def test_fork_child_cannot_use_parent_endpoints():
    name = fresh("forkuse")
    pub = zcbuf.publish((4,), "u1", slots=4, name=name)
    sub = zcbuf.subscribe(name)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            for i, f in enumerate((lambda: pub.send(np.zeros(4, "u1")),
                                   lambda: pub.loan().__enter__(),
                                   lambda: sub.recv(timeout=0))):
                try:
                    f()
                    code |= 1 << i
                except zcbuf.InvalidArgumentError as e:
                    if "fork" not in str(e):
                        code |= 8
                except BaseException:
                    code |= 16
            try:
                pub.close()  # harmless in the child: must not end the parent's stream
                sub.close()
            except BaseException:
                code |= 32
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, os.WEXITSTATUS(status)
    pub.send(np.full(4, 3, "u1"))
    assert (sub.recv(timeout=1) == 3).all() and sub.seq == 0
    pub.close()
    sub.close()


# ---------------------------------------------------------------------------------------------
# command line, names


def test_ls_with_channels_around():
    name = fresh("ls")
    with zcbuf.publish((480, 640), "u1", name=name) as pub, zcbuf.subscribe(name):
        pub.send(np.zeros((480, 640), "u1"))
        p = subprocess.run([sys.executable, "-m", "zcbuf", "ls"], env=PYENV,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert name in p.stdout
        assert "Traceback" not in p.stderr
        assert any(s.name == name for s in zcbuf.ls())


def test_names_freed_after_everyone_closes(children):
    name = fresh("freed")
    pub = zcbuf.publish((4,), "u1", name=name)
    c = children("""
        import sys, zcbuf
        sub = zcbuf.subscribe(sys.argv[1])
        print("ready", flush=True)
        print("got", list(sub), flush=True)
    """, name)
    c.expect("ready")
    pub.send(np.ones(4, "u1"))
    pub.close()
    c.expect("got")
    assert c.p.wait(timeout=10) == 0
    del pub
    gc.collect()
    assert not os.path.exists(f"/dev/shm/{name}")


def test_cancelled_recv_async_does_not_keep_asyncio_run_waiting(children):
    """After ``wait_for(sub.recv_async(), t)`` times out and no message ever comes (the publisher
    is alive and idle), ``asyncio.run`` must still return: its executor shutdown joins the
    worker thread, which must not sit in a recv without a deadline."""
    c = children("""
        import asyncio, sys, time, zcbuf
        name = sys.argv[1]
        pub = zcbuf.publish((1,), "i8", name=name)
        sub = zcbuf.subscribe(name)
        async def main():
            try:
                await asyncio.wait_for(sub.recv_async(), 0.1)
            except asyncio.TimeoutError:
                print("timed out", flush=True)
        asyncio.run(main())
        print("returned", flush=True)
    """, fresh("async-hang"))
    c.expect("timed out")
    c.expect("returned", timeout=5)
    c.done()


def test_clean_close_is_end_of_stream_even_if_the_publisher_is_gone_at_wake_up():
    """A subscriber asleep in recv when the publisher closes the stream must report "end of
    stream", not "the publisher died", even when the publisher's role lock is gone by the time
    it wakes (its process exits right after close; here: its last reference goes)."""
    died = 0
    for i in range(20):
        name = fresh("cleanclose")
        box = [zcbuf.publish((1,), "u1", name=name)]
        sub = zcbuf.subscribe(name)

        def end():
            p = box.pop()
            p.close()  # a clean end of stream ...
            del p      # ... then the publisher (and its role lock) goes at once

        t = threading.Timer(0.05, end)
        t.start()
        try:
            with pytest.raises(zcbuf.ChannelClosed) as e:
                sub.recv(timeout=5)
        finally:
            t.join()
            sub.close()
        died += "publisher died" in str(e.value)
        del sub, e
    assert died == 0, f"{died} of 20 clean closes were reported as 'the publisher died'"
