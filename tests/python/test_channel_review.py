"""Reproductions from the channels' adversarial review, kept as tests: each failed before its fix."""

import asyncio
import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import zcbuf


def uname(tag):
    return f"chrev-{tag}-{os.getpid()}"


@pytest.mark.parametrize("policy", ["block", "latest"])
def test_fork_child_dropping_an_inherited_message_cannot_free_the_parents(policy):
    """A fork child's copy of a message must not change the shared words when it goes: the
    parent still holds the original."""
    name = uname(f"fork-{policy}")
    pub = zcbuf.publish((4,), "i8", slots=2, name=name, policy=policy)
    sub = zcbuf.subscribe(name)
    pub.send(np.full(4, 100, "i8"))
    kept = sub.recv(timeout=1)
    pid = os.fork()
    if pid == 0:  # the child drops its copy and exits through the interpreter
        del kept
        gc.collect()
        os._exit(0)
    os.waitpid(pid, 0)
    for v in range(200, 206):
        try:
            pub.send(np.full(4, v, "i8"), timeout=0.05)
        except zcbuf.Timeout:
            pass  # block: the kept message holds the ring; latest: the other slot cycles
        if policy == "latest":
            sub.recv(timeout=1)
    assert kept.tolist() == [100] * 4, "the parent's live message was overwritten"
    del kept
    sub.close()
    pub.close()


def test_a_channel_cannot_be_sealed_and_subscribers_still_work():
    name = uname("seal")
    with zcbuf.publish((4,), "u1", name=name) as pub:
        b = zcbuf.open(name)
        with pytest.raises(zcbuf.InvalidArgumentError, match="is a channel"):
            b.seal()
        b.free()
        del b
        code = f"import zcbuf; s = zcbuf.subscribe({name!r}); print('ok', s.slots)"
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and p.stdout.startswith("ok"), p.stderr
        assert pub.subscribers == 0


def test_release_from_another_thread_is_not_blocked_by_a_waiting_recv():
    """A recv waiting in one thread must not hold the lock that releasing a message needs:
    here the release is the only thing that can free the ring."""
    name = uname("rel")
    pub = zcbuf.publish((1,), "i8", slots=2, name=name)
    sub = zcbuf.subscribe(name)
    pub.send(np.array([0], "i8"))
    pub.send(np.array([1], "i8"))
    a0, a1 = sub.recv(timeout=1), sub.recv(timeout=1)  # both slots pinned
    got = []
    t = threading.Thread(target=lambda: got.append(int(sub.recv(timeout=10)[0])))
    t.start()
    time.sleep(0.1)  # the thread waits in recv
    t0 = time.monotonic()
    del a0  # its release must not wait for the recv
    gc.collect()
    pub.send(np.array([2], "i8"), timeout=5)
    t.join(10)
    assert got == [2] and time.monotonic() - t0 < 2
    del a1
    sub.close()
    pub.close()


def test_two_threads_receiving_get_each_message_once():
    name = uname("two")
    pub = zcbuf.publish((1,), "i8", slots=64, name=name)
    sub = zcbuf.subscribe(name)
    seen = []
    lock = threading.Lock()

    def rx():
        for a in sub:
            with lock:
                seen.append(int(a[0]))

    ts = [threading.Thread(target=rx) for _ in range(2)]
    for t in ts:
        t.start()
    for i in range(5000):
        pub.send(np.array([i], "i8"), timeout=10)
    pub.close()
    for t in ts:
        t.join(30)
    assert sorted(seen) == list(range(5000))


def test_sends_from_several_threads_each_get_their_sequence_number():
    name = uname("seq")
    pub = zcbuf.publish((1,), "u1", slots=8, name=name, policy="latest")
    seqs = []
    lock = threading.Lock()

    def tx():
        mine = [pub.send(np.zeros(1, "u1")) for _ in range(2000)]
        with lock:
            seqs.extend(mine)

    ts = [threading.Thread(target=tx) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert sorted(seqs) == list(range(8000))
    pub.close()


def test_close_from_another_thread_ends_a_waiting_iteration():
    name = uname("close")
    pub = zcbuf.publish((1,), "u1", name=name)
    sub = zcbuf.subscribe(name)
    result = []

    def rx():
        try:
            for _ in sub:
                pass
            result.append("ended")
        except Exception as e:  # noqa: BLE001 - the test reports what came
            result.append(repr(e))

    t = threading.Thread(target=rx)
    t.start()
    time.sleep(0.1)
    sub.close()
    t.join(5)
    assert result == ["ended"]
    pub.close()


def test_dropped_async_subscribers_leave_no_threads():
    name = uname("threads")
    pub = zcbuf.publish((1,), "u1", name=name)

    async def once():
        sub = zcbuf.subscribe(name)
        with pytest.raises(zcbuf.Timeout):
            await sub.recv_async(timeout=0.01)

    before = threading.active_count()
    for _ in range(20):
        asyncio.run(once())
    gc.collect()
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert threading.active_count() == before
    pub.close()


def test_infinite_timeouts_mean_no_limit():
    name = uname("inf")
    with zcbuf.publish((1,), "u1", name=name) as pub, zcbuf.subscribe(name) as sub:
        pub.send(np.zeros(1, "u1"), timeout=float("inf"))
        assert sub.recv(timeout=float("inf"))[0] == 0


def test_recv_async_cancelled_many_times_loses_nothing():
    """Timeouts of recv_async (the waiter disarmed while it may be waking) must never lose a
    later wake-up or a message."""
    name = uname("async")
    pub = zcbuf.publish((1,), "i8", slots=256, name=name)
    sub = zcbuf.subscribe(name)

    def producer():
        for i in range(300):
            time.sleep(0.002 if i % 3 else 0.0)
            pub.send(np.array([i], "i8"), timeout=5)

    async def main():
        got = []
        while len(got) < 300:
            try:
                a = await asyncio.wait_for(sub.recv_async(), 0.001 if len(got) % 2 else 5)
                got.append(int(a[0]))
            except asyncio.TimeoutError:
                pass
        return got

    t = threading.Thread(target=producer)
    t.start()
    got = asyncio.run(asyncio.wait_for(main(), 60))
    t.join()
    assert got == list(range(300))
    sub.close()
    pub.close()


# -- from the new-user trial -----------------------------------------------------------------

PRODUCER = """
import sys, time, numpy as np, zcbuf
pub = zcbuf.publish((4,), "i8", slots=4, name=sys.argv[1])
print("up", flush=True)
i = 0
while True:
    pub.send(np.full(4, i, "i8"), timeout=60)
    i += 1
    time.sleep(0.002)
"""


def test_restarted_producer_replaces_a_channel_its_consumers_still_hold():
    """A producer killed with -9 and started again publishes under the same name while the old
    consumer still holds the old channel (its Subscriber and last frame); the consumer learns
    the old stream died, and reconnects with subscribe(wait=)."""
    name = uname("restart")

    def start():
        p = subprocess.Popen([sys.executable, "-c", PRODUCER, name], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline() == "up\n"
        return p

    p1 = start()
    sub = zcbuf.subscribe(name, wait=10)
    last = sub.recv(timeout=10)
    p1.kill()
    p1.wait()
    with pytest.raises(zcbuf.ChannelClosed, match="died"):
        while True:
            last = sub.recv(timeout=10)
    # The old channel is still held here (sub, last): a new producer replaces its name anyway.
    p2 = start()
    try:
        with pytest.raises(zcbuf.ChannelClosed, match="died"):
            sub.recv(timeout=1)  # the old stream stays over
        sub2 = zcbuf.subscribe(name, wait=10)
        first = sub2.recv(timeout=10)
        assert first.shape == (4,) and last.shape == (4,)
        sub2.close()
    finally:
        p2.kill()
        p2.wait()
    sub.close()
    del last, first


def test_subscribe_waits_for_a_producer_that_starts_later():
    name = uname("later")
    got = []
    t = threading.Thread(target=lambda: got.append(zcbuf.subscribe(name, wait=10)))
    t.start()
    time.sleep(0.2)
    with zcbuf.publish((1,), "u1", name=name) as pub:
        t.join(10)
        assert got and got[0].name == name
        pub.send(np.ones(1, "u1"))
        assert got[0].recv(timeout=5)[0] == 1
        got[0].close()
    with pytest.raises(zcbuf.Timeout):
        zcbuf.subscribe(uname("never"), wait=0.1)
    with pytest.raises(zcbuf.NotFoundError):
        zcbuf.subscribe(uname("never"))


def test_close_wakes_a_task_in_recv_async_and_two_tasks_may_wait():
    name = uname("aclose")
    pub = zcbuf.publish((1,), "u1", slots=4, name=name)
    sub = zcbuf.subscribe(name)

    async def main():
        a = asyncio.ensure_future(sub.recv_async())
        b = asyncio.ensure_future(sub.recv_async())
        await asyncio.sleep(0.1)
        pub.send(np.array([1], "u1"))
        pub.send(np.array([2], "u1"))
        got = sorted(int(x[0]) for x in await asyncio.wait_for(asyncio.gather(a, b), 5))
        c = asyncio.ensure_future(sub.recv_async())
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        sub.close()
        with pytest.raises(zcbuf.ChannelClosed):
            await asyncio.wait_for(c, 5)
        return got, time.monotonic() - t0

    got, took = asyncio.run(main())
    assert got == [1, 2] and took < 1
    pub.close()


def test_timeouts_say_the_callers_timeout_and_who_holds_the_ring():
    name = uname("tmo")
    pub = zcbuf.publish((1,), "u1", slots=2, name=name)
    slow = zcbuf.subscribe(name)
    with pytest.raises(zcbuf.Timeout, match=r"within 0\.3 s"):
        slow.recv(timeout=0.3)
    pub.send(np.zeros(1, "u1"))
    pub.send(np.zeros(1, "u1"))
    with pytest.raises(zcbuf.Timeout, match=rf"within 0\.3 s: the slowest subscriber \(pid {os.getpid()}\)"):
        pub.send(np.zeros(1, "u1"), timeout=0.3)
    slow.close()
    pub.close()
