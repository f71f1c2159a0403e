"""Hardening: crashes (SIGKILL), full /dev/shm, hostile headers. Nothing lost, no crash."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import zcbuf
from conftest import run_py

HERE = os.path.dirname(os.path.abspath(__file__))


def shm_exists(name: str) -> bool:
    return os.path.exists(f"/dev/shm/{name}")


def holders(name: str):
    """(held, holder pids) of ``name`` as ``zcbuf.ls()`` reports it, or None when absent."""
    for s in zcbuf.ls():
        if s.name == name:
            return (s.held, set(s.holders))
    return None


class Child:
    """A Python child that runs ``code``, says 'ready' on stdout, then waits to be killed."""

    def __init__(self, code: str, *args: str) -> None:
        self.p = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.p.stdout.readline()
        if not line.startswith("ready"):
            self.p.kill()
            raise AssertionError(f"child did not get ready: {line!r} {self.p.stderr.read()}")
        self.reply = line.split()[1:]

    def kill(self) -> None:
        self.p.send_signal(signal.SIGKILL)
        assert self.p.wait(timeout=30) == -signal.SIGKILL


CREATOR = """
import sys, time, zcbuf, numpy as np
b = zcbuf.empty((1000,), "u4", shared=True)
b.asarray()[:] = np.arange(1000, dtype="u4")
print("ready", b.name, flush=True)
time.sleep(600)
"""

OPENER = """
import sys, time, zcbuf
b = zcbuf.open(sys.argv[1])
a = b.asarray()
a[:10] = 7
print("ready", flush=True)
time.sleep(600)
"""

ARRAY_ONLY = """
import sys, time, zcbuf
a = zcbuf.open(sys.argv[1]).asarray()   # the Buffer is collected at once: only the array is kept
a[10:20] = 9
print("ready", int(a[15]), flush=True)
time.sleep(600)
"""


def test_sigkill_creator_survivor_keeps_data_and_name_until_it_frees():
    c = Child(CREATOR)
    name = c.reply[0]
    mine = zcbuf.open(name)
    arr = mine.asarray()
    assert holders(name) == (True, {os.getpid(), c.p.pid})
    c.kill()
    assert (arr == np.arange(1000, dtype="u4")).all()
    assert shm_exists(name) and holders(name) == (True, {os.getpid()})  # the kernel dropped its lock
    assert name not in zcbuf.gc()  # a live holder remains
    mine.free()
    assert shm_exists(name), "the array still maps it: still held"
    del arr
    assert shm_exists(name), "the freed Buffer object still maps it: still held"
    del mine
    assert not shm_exists(name), "last holder unmapped: name removed"


def test_sigkill_opener():
    buf = zcbuf.empty((1000,), "u4", shared=True)
    c = Child(OPENER, buf.name)
    c.kill()
    assert (buf.asarray()[:10] == 7).all()
    assert holders(buf.name) == (True, {os.getpid()})
    name = buf.name
    buf.free()  # the dead opener does not keep the name
    del buf  # (the Buffer object keeps its mapping, our hold, while it lives)
    assert not shm_exists(name)


def test_sigkill_process_holding_only_arrays():
    """A worker that keeps only an array holds the segment: the name outlives the creator's free
    for as long as the worker lives, and others can still open it."""
    buf = zcbuf.empty((1000,), "u4", shared=True)
    name = buf.name
    c = Child(ARRAY_ONLY, name)
    assert c.reply == ["9"]
    assert holders(name) == (True, {os.getpid(), c.p.pid})
    buf.free()
    del buf  # the creator lets go entirely (the Buffer object kept its mapping while it lived)
    assert shm_exists(name), "the worker's array holds it"
    out = run_py("import sys, zcbuf; print(int(zcbuf.open(sys.argv[1]).asarray()[15]))", name)
    assert out.split() == ["9"]
    c.kill()
    assert shm_exists(name)  # nobody unmapped it cleanly: it stays until gc or a new create
    zcbuf.gc()
    assert not shm_exists(name)


def test_all_holders_killed_then_one_gc_leaves_nothing():
    c = Child(CREATOR)
    name = c.reply[0]
    d = Child(OPENER, name)
    c.kill()
    d.kill()
    assert shm_exists(name) and holders(name) == (False, set())
    zcbuf.gc()  # (another process's gc may have won the race: the name is gone either way)
    assert not shm_exists(name)


def test_sigkill_in_the_middle_of_create_and_free():
    prefix = f"zcbuf-crash-{os.getpid()}-"
    code = """
    import sys, zcbuf
    prefix = sys.argv[1]
    print("ready", flush=True)
    i = 0
    while True:
        b = zcbuf.create((1 << 20) * (1 + i % 8), name=f"{prefix}{i % 4}")
        b.asarray()[::4096] = 1
        b.free()
        i += 1
    """
    for delay in (0.005, 0.02, 0.05, 0.1, 0.2):
        c = Child(code, prefix)
        time.sleep(delay)
        c.kill()
        zcbuf.gc()
        left = [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
        assert not left, f"after kill at {delay}s and one gc: {left}"


def test_header_byte_flips_never_crash():
    """Random byte flips in a real header: every open is a clean result or a zcbuf.Error."""
    buf = zcbuf.empty((64, 3), "<f4", shared=True)
    out = run_py(
        """
        import os, random, sys, zcbuf
        name = sys.argv[1]
        path = "/dev/shm/" + name
        fd = os.open(path, os.O_RDWR)
        orig = os.pread(fd, 1152, 0)      # fixed fields, dtype and shape (not the holder table)
        rnd = random.Random(1234)
        ok = err = 0
        for i in range(3000):
            data = bytearray(orig)
            for _ in range(rnd.randint(1, 4)):
                data[rnd.randrange(len(data))] ^= rnd.randint(1, 255)
            os.pwrite(fd, bytes(data), 0)
            try:
                b = zcbuf.open(name)
                a = b.asarray()
                int(a.view("u1").sum())    # read every byte the header claims
                b.free()
                ok += 1
            except zcbuf.Error:
                err += 1
        os.pwrite(fd, orig, 0)
        print(ok, err)
        """,
        buf.name,
        timeout=300,
    )
    ok, err = map(int, out.split())
    assert ok + err == 3000 and err > 2500, (ok, err)
    assert buf.asarray().shape == (64, 3)
    buf.free()


def test_truncated_and_foreign_segments_are_corrupt(tmp_path):
    buf = zcbuf.create(100000, shared=True)
    os.truncate(f"/dev/shm/{buf.name}", 9000)
    with pytest.raises(zcbuf.CorruptError, match="truncated"):
        zcbuf.open(buf.name)
    buf.free()
    name = f"foreign-{os.getpid()}"
    with open(f"/dev/shm/{name}", "wb") as f:
        f.write(os.urandom(20000))
    with pytest.raises(zcbuf.CorruptError, match="magic"):
        zcbuf.open(name)
    os.unlink(f"/dev/shm/{name}")


needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare to mount a small tmpfs in a private mount namespace",
)


@needs_root
def test_full_dev_shm_and_disk_are_memory_errors_never_sigbus(tmp_path):
    script = textwrap.dedent(
        """
        import os, sys, zcbuf
        # /dev/shm is a 16 MiB tmpfs here, and so is sys.argv[1] (for files)
        for kw in ({"shared": True}, {"path": os.path.join(sys.argv[1], "big")}):
            try:
                zcbuf.create(64 << 20, **kw)
                raise SystemExit("64 MiB on a 16 MiB tmpfs did not fail")
            except MemoryError as e:
                msg = str(e)
                assert "free" in msg and "requested" in msg, msg
            assert not os.path.exists(os.path.join(sys.argv[1], "big")), "half-made file left"
            # fill most of it, then write every byte: reserved pages cannot fault
            b = zcbuf.create(12 << 20, **({"shared": True} if "shared" in kw else {"path": os.path.join(sys.argv[1], "a")}))
            b.asarray()[:] = 1
            try:
                zcbuf.create(8 << 20, **({"shared": True} if "shared" in kw else {"path": os.path.join(sys.argv[1], "b")}))
                raise SystemExit("8 MiB more did not fail")
            except MemoryError:
                pass
            assert int(b.asarray()[::4096].sum()) == (12 << 20) // 4096
            b.free()
            del b  # the Buffer object keeps its mapping (and the name) while it lives
        print("ok", [n for n in os.listdir("/dev/shm")])
        """
    )
    small = tmp_path / "small"
    small.mkdir()
    cmd = (
        f"mount -t tmpfs -o size=16m tmpfs /dev/shm && mount -t tmpfs -o size=16m tmpfs {small} && "
        f"{sys.executable} -c \"$ZCBUF_SCRIPT\" {small}"
    )
    p = subprocess.run(
        ["unshare", "-m", "sh", "-c", cmd],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "ZCBUF_SCRIPT": script},
    )
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)
    assert p.stdout.startswith("ok []"), p.stdout
