"""Sealed buffers and opens that wait for them (issue #10): Buffer.seal(), Buffer.sealed,
zcbuf.open(name, wait=...). Names start with ``seal-``; children are fresh interpreters."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import zcbuf

HERE = os.path.dirname(os.path.abspath(__file__))


def uniq(tag):
    return f"seal-py-{tag}-{os.getpid()}-{time.monotonic_ns()}"


def exists(name):
    return os.path.exists(f"/dev/shm/{name}")


def spawn(code, *args):
    """A fresh interpreter running ``code`` (lines on stdout, stdin a pipe)."""
    return subprocess.Popen(
        [sys.executable, "-u", "-c", textwrap.dedent(code), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def expect(p, word, timeout=30):
    """The first stdout line of ``p`` starting with ``word`` (fails if ``p`` ends first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            raise AssertionError(f"child ended before {word!r}: {p.stderr.read()}")
        if line.startswith(word):
            return line.strip()
    raise AssertionError(f"no {word!r} within {timeout} s")


def stop(p):
    if p.poll() is None:
        p.kill()
    p.communicate(timeout=30)


CONSUMER = """
    import sys, time, zcbuf
    name = sys.argv[1]
    print("WAITING", flush=True)
    t = time.monotonic()
    b = zcbuf.open(name, wait=10)
    a = b.asarray()
    again = zcbuf.open(name).asarray()          # no readonly=: read-only all the same
    print("GOT", round(time.monotonic() - t, 3), b.readonly, b.sealed, a.flags.writeable,
          again.flags.writeable, a.dtype, a.shape, a.tolist(), flush=True)
    try:
        a.setflags(write=True)
        print("WRITABLE", flush=True)
    except ValueError:
        print("LOCKED", flush=True)
"""


def test_consumer_started_first_gets_the_sealed_data_read_only():
    name = uniq("pc")
    consumer = spawn(CONSUMER, name)
    try:
        expect(consumer, "WAITING")
        time.sleep(0.3)  # the consumer waits for a name that does not exist yet
        producer = spawn(
            """
            import sys, zcbuf
            b = zcbuf.empty((2, 3), "i4", name=sys.argv[1])
            a = b.asarray()
            print("CREATED", flush=True)
            sys.stdin.readline()                   # the consumer sees it unsealed meanwhile
            a[:] = [[1, 2, 3], [4, 5, 6]]
            b.seal()
            print("SEALED", b.sealed, b.readonly, b.asarray().flags.writeable, flush=True)
            sys.stdin.readline()
            """,
            name,
        )
        try:
            expect(producer, "CREATED")
            time.sleep(0.3)
            assert consumer.poll() is None, "the consumer must not return before the seal"
            producer.stdin.write("\n")
            producer.stdin.flush()
            assert expect(producer, "SEALED") == "SEALED True True False"
            got = expect(consumer, "GOT").split(" ", 2)[2]
            assert got == "True True False False int32 (2, 3) [[1, 2, 3], [4, 5, 6]]"
            assert expect(consumer, "LOCKED") == "LOCKED"
        finally:
            stop(producer)
    finally:
        stop(consumer)


def test_wait_for_a_name_that_never_comes_times_out():
    name = uniq("never")
    t = time.monotonic()
    with pytest.raises(zcbuf.Timeout) as e:
        zcbuf.open(name, wait=0.5)
    assert time.monotonic() - t >= 0.5
    assert isinstance(e.value, TimeoutError) and isinstance(e.value, zcbuf.Error)
    assert "no segment of that name exists yet" in str(e.value)
    with pytest.raises(zcbuf.Timeout):
        zcbuf.open(name, wait=0)  # looks once


def test_wait_times_out_on_a_held_unsealed_segment():
    name = uniq("unsealed")
    b = zcbuf.create(64, name=name)
    with pytest.raises(zcbuf.Timeout, match="not sealed yet"):
        zcbuf.open(name, wait=0.3)
    b.seal()
    assert zcbuf.open(name, wait=0).readonly


def test_creator_killed_before_sealing_fails_the_waiter_promptly():
    name = uniq("killed")
    creator = spawn(
        """
        import sys, zcbuf
        b = zcbuf.create(4096, name=sys.argv[1])
        print("READY", flush=True)
        sys.stdin.readline()
        """,
        name,
    )
    waiter = spawn(
        """
        import sys, time, zcbuf
        print("WAITING", flush=True)
        t = time.monotonic()
        try:
            zcbuf.open(sys.argv[1], wait=30)
            print("OPENED", flush=True)
        except zcbuf.NotFoundError as e:
            print("NOTFOUND", round(time.monotonic() - t, 3), e, flush=True)
        """,
        name,
    )
    try:
        expect(creator, "READY")
        expect(waiter, "WAITING")
        time.sleep(0.5)  # the waiter sees the segment held and unsealed: it waits
        assert waiter.poll() is None
        killed = time.monotonic()
        creator.send_signal(signal.SIGKILL)
        creator.wait(timeout=30)
        line = expect(waiter, "NOTFOUND")
        assert time.monotonic() - killed < 10, "must not wait out the 30 s timeout"
        assert "killed before sealing" in line, line
        assert not exists(name), "the unsealed orphan is removed, as gc would"
    finally:
        stop(creator)
        stop(waiter)


def test_ctrl_c_interrupts_a_waiting_open():
    name = uniq("sigint")
    waiter = spawn(
        """
        import sys, time, zcbuf
        print("WAITING", flush=True)
        try:
            zcbuf.open(sys.argv[1], wait=60)
        except KeyboardInterrupt:
            print("INTERRUPTED", flush=True)
        """,
        name,
    )
    try:
        expect(waiter, "WAITING")
        time.sleep(0.5)  # inside the wait by now
        sent = time.monotonic()
        waiter.send_signal(signal.SIGINT)
        assert expect(waiter, "INTERRUPTED") == "INTERRUPTED"
        assert time.monotonic() - sent < 1.0
        assert waiter.wait(timeout=30) == 0
    finally:
        stop(waiter)


IDLE = """
    import resource, sys, zcbuf
    def cpu():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    before = cpu()
    try:
        zcbuf.open(sys.argv[1], wait=2.0)
    except zcbuf.Timeout:
        pass
    print("CPU", cpu() - before, flush=True)
"""


@pytest.mark.parametrize("state", ["missing", "held-unsealed"])
def test_an_idle_waiter_uses_little_cpu(state):
    name = uniq("idle")
    b = zcbuf.create(4096, name=name) if state == "held-unsealed" else None
    p = spawn(IDLE, name)
    try:
        used = float(expect(p, "CPU").split()[1])
        assert used < 0.2, f"{used:.3f} s of CPU in a 2 s wait"
    finally:
        stop(p)
        if b is not None:
            b.free()


def test_seal_refuses_private_and_file_buffers(tmp_path):
    with pytest.raises(zcbuf.InvalidArgumentError, match="private"):
        zcbuf.create(16).seal()
    f = zcbuf.create(16, path=str(tmp_path / "f.zcbuf"))
    with pytest.raises(zcbuf.InvalidArgumentError, match="file"):
        f.seal()
    assert not f.sealed and not f.readonly


def test_seal_is_idempotent_and_changes_new_arrays_only():
    name = uniq("idem")
    b = zcbuf.empty((4,), "f8", name=name)
    before = b.asarray()
    early = zcbuf.open(name)  # writable, opened before the seal
    early_arr = early.asarray()
    assert not b.sealed and not early.sealed
    b.seal()
    b.seal()
    assert b.sealed and b.readonly
    after = b.asarray()
    assert not after.flags.writeable
    with pytest.raises(ValueError):
        after.setflags(write=True)
    assert memoryview(b).readonly  # the buffer protocol export is read-only too
    # Arrays made before the seal keep writing (documented: nothing is re-protected).
    before[0] = 5
    early_arr[1] = 6
    assert after.tolist() == [5, 6, 0, 0]
    # The early handle sees the seal (the kernel's mode), and stays writable.
    assert early.sealed and not early.readonly
    # A read-only handle cannot seal: only a writer knows the data is complete.
    other = uniq("idem-ro")
    w = zcbuf.create(8, name=other)
    with pytest.raises(zcbuf.ReadOnlyError):
        zcbuf.open(other, readonly=True).seal()
    assert not w.sealed
    w.free()
    # free() flags both roots: views of either refuse to be shared.
    b.free()
    with pytest.raises(zcbuf.NotFoundError):
        zcbuf.share(before)
    with pytest.raises(zcbuf.NotFoundError):
        zcbuf.share(after)
    with pytest.raises(zcbuf.NotFoundError):
        b.sealed


def test_ls_shows_sealed():
    name = uniq("ls")
    b = zcbuf.create(8, name=name, persist=True)
    try:
        row = [s for s in zcbuf.ls() if s.name == name]
        assert len(row) == 1 and not row[0].sealed
        b.seal()
        row = [s for s in zcbuf.ls() if s.name == name]
        assert row[0].sealed and row[0].persistent
        out = subprocess.run(
            [sys.executable, "-m", "zcbuf", "ls"], capture_output=True, text=True, timeout=60
        ).stdout
        assert any(name in line and line.rstrip().endswith("persistent sealed") for line in out.splitlines()), out
    finally:
        b.free()
        zcbuf.unlink(name)


def test_a_persistent_sealed_segment_outlives_its_producer():
    """The publish-once pattern: a producer that exits after sealing a persistent segment."""
    name = uniq("publish")
    subprocess.run(
        [sys.executable, "-c", textwrap.dedent("""
            import sys, zcbuf
            b = zcbuf.from_array([[1.5, 2.5]], name=sys.argv[1], persist=True)
            b.seal()
        """), name],
        check=True,
        timeout=60,
    )
    try:
        b = zcbuf.open(name, wait=5)
        assert b.sealed and b.readonly and b.asarray().tolist() == [[1.5, 2.5]]
        del b
        assert name not in zcbuf.gc()  # persistent: gc leaves it, sealed or not
        assert exists(name)
    finally:
        zcbuf.unlink(name)


def test_wait_argument_is_checked():
    with pytest.raises(TypeError):
        zcbuf.open("seal-x", wait="1")
    with pytest.raises(zcbuf.InvalidArgumentError):
        zcbuf.open("seal-x", wait=-1)
    with pytest.raises(zcbuf.InvalidArgumentError):
        zcbuf.open("seal-x", wait=float("nan"))
