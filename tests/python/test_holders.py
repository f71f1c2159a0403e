"""Holders v2: every process that maps any part of a shared segment holds it (a shared flock the
kernel drops when the process unmaps its last view or dies, in any pid namespace); the last one
to leave removes the name, only if the name still names that segment.

These tests run the way users run zcbuf: real subprocesses, fork, pid namespaces, SIGKILL. They
assert what a user can observe: /dev/shm entries and their inodes, opens from third processes,
data, ``zcbuf.ls()`` and /proc/PID/maps.

Other test sessions may run ``zcbuf.gc()`` on this machine at the same time; it removes any
segment nobody holds. So an *unheld* non-persistent segment is never asserted to exist in the
shared /dev/shm, except right where the assertion is about gc itself. Tests that need a dead
producer's leftover to stay until they act on it run in a ``sandbox``: a private /dev/shm in a
mount namespace that only their own processes enter.
"""

from __future__ import annotations

import gc
import itertools
import json
import multiprocessing as mp
import os
import queue
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import zcbuf

SHM = "/dev/shm"
_seq = itertools.count()

# ----------------------------------------------------------------------------------------------
# helpers


def shm(name: str) -> str:
    return f"{SHM}/{name}"


def exists(name: str) -> bool:
    return os.path.exists(shm(name))


def seg(name: str):
    """This name's entry in zcbuf.ls(), or None."""
    return next((s for s in zcbuf.ls() if s.name == name), None)


def seg_until(name: str, ok, tries: int = 10):
    """``seg(name)`` once ``ok(segment)`` holds, or the last one seen. ``holders`` (and, when ls
    derives it from them, ``held``) come from /proc/locks, which the kernel serves a page per
    read(): while other processes take and drop locks, one read of it can miss a live lock (seen
    here under concurrent tests), so such a check looks a few times before it fails."""
    s = None
    for _ in range(tries):
        s = seg(name)
        if s is not None and ok(s):
            return s
        time.sleep(0.05)
    return s


def my_maps(name: str) -> list:
    """Lines of this process's /proc/self/maps that map /dev/shm/NAME (deleted or not)."""
    with open("/proc/self/maps") as f:
        return [ln for ln in f if len(ln.split()) >= 6 and ln.split()[5] == shm(name)]


def collect() -> None:
    gc.collect()
    gc.collect()


def wait_dead(pid: int, timeout: float = 20) -> None:
    """Wait until every thread of ``pid`` has exited: the process is gone or a zombie whose
    other threads are gone too (a zombie leader's threads may still hold the files)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except (FileNotFoundError, ProcessLookupError):
            return
        states = []
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
            except (FileNotFoundError, ProcessLookupError):
                pass
        if all(st in ("Z", "X") for st in states):
            return
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} still alive after {timeout}s")


def children_of(pid: int) -> list:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def run_py(code: str, *args: str, timeout: float = 60) -> str:
    """Run ``PRELUDE + code`` in a fresh interpreter; return its stdout, fail with its stderr."""
    p = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if p.returncode != 0:
        raise AssertionError(f"child failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p.stdout


def open_elsewhere(name: str, dtype: str = "u1") -> int:
    """Open ``name`` from a third process; return the sum of its data as ``dtype``."""
    return int(run_py(
        """
        b = zcbuf.open(sys.argv[1])
        print(int(b.asarray(sys.argv[2]).sum(dtype="u8")))
        """,
        name, dtype,
    ).strip())


# Code every child starts with.
PRELUDE = textwrap.dedent(
    """
    import gc, json, os, sys, time
    import numpy as np
    import zcbuf

    def say(*a):
        print(*a, flush=True)

    def cmd():
        line = sys.stdin.readline()
        if not line:          # the test went away: leave at once
            os._exit(3)
        return line.strip()

    def map_inode(arr):
        \"\"\"(inode, path) of the mapping that holds arr's first byte, from /proc/self/maps.\"\"\"
        addr = arr.__array_interface__["data"][0]
        with open("/proc/self/maps") as f:
            for line in f:
                p = line.split()
                lo, hi = (int(x, 16) for x in p[0].split("-"))
                if lo <= addr < hi:
                    return int(p[4]), " ".join(p[5:])
        return None
    """
)


class Proc:
    """A child process (its own session, so the whole tree can be SIGKILLed) that talks in lines."""

    def __init__(self, argv: list) -> None:
        self.p = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.pid = self.p.pid
        self._lines: "queue.Queue" = queue.Queue()
        self._err: list = []
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._pump_err, daemon=True).start()

    def _pump(self) -> None:
        for line in self.p.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _pump_err(self) -> None:
        for line in self.p.stderr:
            self._err.append(line)

    def stderr(self) -> str:
        return "".join(self._err[-60:])

    def recv(self, timeout: float = 30) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"pid {self.pid}: no reply in {timeout}s; stderr:\n{self.stderr()}")
        if line is None:
            self._lines.put(None)
            self.p.wait(10)
            time.sleep(0.1)
            raise AssertionError(f"pid {self.pid} exited ({self.p.returncode}); stderr:\n{self.stderr()}")
        return line

    def send(self, line: str) -> None:
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()

    def close_stdin(self) -> None:
        try:
            self.p.stdin.close()
        except OSError:
            pass

    def wait(self, timeout: float = 30) -> int:
        return self.p.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the whole process group (the child and anything it started)."""
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.p.wait(30)


class Env:
    """Per-test names and children, all cleaned up at the end."""

    def __init__(self, tag: str) -> None:
        self.prefix = f"zcbuf-t-{os.getpid()}-{tag}-{next(_seq)}-"
        self.procs: list = []
        self.mp_procs: list = []

    def name(self, tag: str = "n") -> str:
        return f"{self.prefix}{tag}{next(_seq)}"

    def spawn(self, code: str, *args: str) -> Proc:
        return self.spawn_argv([sys.executable, "-c", PRELUDE + textwrap.dedent(code), *args])

    def spawn_argv(self, argv: list) -> Proc:
        p = Proc(argv)
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            if p.p.poll() is None:
                try:
                    p.kill()
                except Exception:  # noqa: BLE001
                    pass
        for p in self.mp_procs:
            if p.is_alive():
                p.kill()
            p.join(10)
        collect()
        for n in os.listdir(SHM):
            if n.startswith(self.prefix):
                try:
                    os.unlink(shm(n))
                except FileNotFoundError:
                    pass


@pytest.fixture
def env(request):
    e = Env(request.node.name.split("[")[0].replace("test_", "")[:24])
    try:
        yield e
    finally:
        e.close()


class Sandbox:
    """A private /dev/shm: its own tmpfs in a mount namespace that only this test's processes
    enter (nsenter). Other sessions' ``zcbuf.gc()`` cannot see it, so what a test leaves there on
    purpose (a SIGKILLed producer's segment) stays until the test itself acts on it. Falls back
    to the shared /dev/shm (``isolated`` False) where mount namespaces are not available."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.p = None
        if shutil.which("unshare") and shutil.which("nsenter"):
            try:
                p = subprocess.Popen(
                    ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                     "mount -t tmpfs -o size=4g,mode=1777 tmpfs /dev/shm && echo ready && exec cat"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                )
                if p.stdout.readline().strip() == "ready":
                    self.p = p
                else:
                    p.kill()
                    p.wait()
            except OSError:
                pass
        self.isolated = self.p is not None
        self.root = f"/proc/{self.p.pid}/root{SHM}" if self.p else SHM

    def argv(self, argv: list) -> list:
        return ["nsenter", "-t", str(self.p.pid), "-m", "--", *argv] if self.p else list(argv)

    def spawn(self, code: str, *args: str) -> Proc:
        return self.env.spawn_argv(self.argv([sys.executable, "-c", PRELUDE + textwrap.dedent(code), *args]))

    def run(self, argv: list, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(argv), capture_output=True, text=True, timeout=timeout)

    def run_py(self, code: str, *args: str, timeout: float = 60) -> str:
        p = self.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code), *args], timeout)
        if p.returncode != 0:
            raise AssertionError(f"child failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return p.stdout

    def exists(self, name: str) -> bool:
        return os.path.exists(f"{self.root}/{name}")

    def listdir(self, prefix: str) -> list:
        return sorted(n for n in os.listdir(self.root) if n.startswith(prefix))

    def close(self) -> None:
        if self.p:
            self.p.stdin.close()
            self.p.wait(10)


@pytest.fixture
def sandbox(env):
    sb = Sandbox(env)
    try:
        yield sb
    finally:
        sb.close()


def test_sandbox_is_private(env, sandbox):
    """A segment made in the sandbox is invisible to the shared /dev/shm (and so to other
    sessions' gc), and the sandbox's processes see each other's segments."""
    if not sandbox.isolated:
        pytest.skip("no mount namespaces here")
    name = env.name()
    c = sandbox.spawn(CREATOR, name)
    assert c.recv().startswith("ready")
    assert sandbox.exists(name) and not exists(name)
    assert int(sandbox.run_py("say(int(zcbuf.open(sys.argv[1]).asarray().sum()))", name)) == ARANGE_SUM


# Children used by several tests.

# Creates NAME (1000 x u4 = arange), reports, waits for commands.
CREATOR = """
name = sys.argv[1]
b = zcbuf.empty((1000,), "u4", name=name)
b.asarray()[:] = np.arange(1000, dtype="u4")
say("ready", os.getpid())
while True:
    c = cmd()
    if c == "free":
        b.free()
        del b            # the Buffer object keeps its mapping (the hold) while it lives
        gc.collect()
        say("freed", os.path.exists("/dev/shm/" + name))
    elif c == "exit":
        sys.exit(0)
"""

# Opens NAME, keeps only an array (Buffer freed with .free() or dropped with del), waits.
ARRAY_ONLY = """
name, how = sys.argv[1], sys.argv[2]
b = zcbuf.open(name)
a = b.asarray()
if how == "free":
    b.free()
del b
gc.collect()
ino = map_inode(a)
say(json.dumps({"inode": ino[0], "path": ino[1], "pid": os.getpid()}))
while True:
    c = cmd()
    if c == "sum":
        say(int(a.sum(dtype="u8")))
    elif c == "drop":
        del a
        gc.collect()
        say(os.path.exists("/dev/shm/" + name))
    elif c == "exit":
        sys.exit(0)
"""

ARANGE_SUM = sum(range(1000))


# ----------------------------------------------------------------------------------------------
# 1. A process that keeps only an array is a holder


@pytest.mark.parametrize("how", ["free", "del"])
def test_array_only_worker_keeps_name_after_creator_frees(env, how):
    name = env.name()
    buf = zcbuf.empty((1000,), "u4", name=name)
    buf.asarray()[:] = np.arange(1000, dtype="u4")
    w = env.spawn(ARRAY_ONLY, name, how)
    info = json.loads(w.recv())
    assert info["inode"] == os.stat(shm(name)).st_ino and info["path"] == shm(name)

    buf.free()
    del buf
    collect()
    assert my_maps(name) == [], "this process no longer maps the segment"
    assert exists(name), "the worker's array holds the segment: its name must stay"
    assert name not in zcbuf.gc() and exists(name), "gc must not remove a held segment"
    s = seg_until(name, lambda s: s.held and s.holders == (w.pid,))
    assert s.held and s.holders == (w.pid,), s
    assert open_elsewhere(name, "u4") == ARANGE_SUM, "a third process opens it and sees the data"

    w.send("drop")
    assert w.recv() == "False", "the worker was the last holder: dropping its array removes the name"
    assert not exists(name)
    w.send("exit")
    assert w.wait() == 0


@pytest.mark.parametrize("end", ["drop-then-exit", "exit-holding"])
def test_array_only_worker_survives_creator_sigkill_and_gc(env, end):
    name = env.name()
    c = env.spawn(CREATOR, name)
    assert c.recv().startswith("ready")
    w = env.spawn(ARRAY_ONLY, name, "free")
    json.loads(w.recv())
    c.kill()

    assert name not in zcbuf.gc(), "the worker's array still maps it"
    assert exists(name)
    s = seg_until(name, lambda s: s.held and s.holders == (w.pid,))
    assert s.held and s.holders == (w.pid,), s
    assert open_elsewhere(name, "u4") == ARANGE_SUM
    w.send("sum")
    assert int(w.recv()) == ARANGE_SUM

    if end == "drop-then-exit":
        w.send("drop")
        assert w.recv() == "False"
        w.send("exit")
        assert w.wait() == 0
        assert not exists(name)
    else:
        w.send("exit")  # exits normally with the array still referenced
        assert w.wait() == 0
        zcbuf.gc()  # whether its exit removed the name or not, nothing unheld may stay
        assert not exists(name)


# ----------------------------------------------------------------------------------------------
# 2. Holders in another pid namespace (containers)

_UNSHARE_OK: dict = {}


def unshare_argv(mount_proc: bool, code: str, *args: str) -> list:
    base = ["unshare", "--pid", "--fork"] + (["--mount-proc"] if mount_proc else [])
    return base + [sys.executable, "-c", PRELUDE + textwrap.dedent(code), *args]


def need_unshare(mount_proc: bool) -> None:
    if mount_proc not in _UNSHARE_OK:
        ok = shutil.which("unshare") is not None
        if ok:
            try:
                r = subprocess.run(
                    unshare_argv(mount_proc, "say(os.getpid())"), capture_output=True, text=True, timeout=60
                )
                ok = r.returncode == 0 and r.stdout.strip() == "1"
            except (OSError, subprocess.TimeoutExpired):
                ok = False
        _UNSHARE_OK[mount_proc] = ok
    if not _UNSHARE_OK[mount_proc]:
        pytest.skip("cannot make a pid namespace here (unshare --pid --fork needs root)")


def inner_pid(p: Proc) -> int:
    """The outer pid of the process `unshare --fork` started (pid 1 in its namespace)."""
    for _ in range(200):
        kids = children_of(p.pid)
        if kids:
            return kids[0]
        time.sleep(0.01)
    raise AssertionError("unshare has no child")


NS_HOLDER = """
name = sys.argv[1]
b = zcbuf.open(name)
a = b.asarray()
b.free()
del b
say("ready", os.getpid())
while True:
    c = cmd()          # exits when stdin closes
    if c == "sum":
        say(int(a.sum(dtype="u8")))
"""


@pytest.mark.parametrize("mount_proc", [True, False], ids=["mount-proc", "host-proc"])
def test_holder_in_another_pid_namespace_keeps_name(env, mount_proc):
    need_unshare(mount_proc)
    name = env.name()
    buf = zcbuf.empty((1000,), "u4", name=name)
    buf.asarray()[:] = np.arange(1000, dtype="u4")
    p = env.spawn_argv(unshare_argv(mount_proc, NS_HOLDER, name))
    assert p.recv() == "ready 1", "the holder is pid 1 of its own namespace"
    inner = inner_pid(p)

    buf.free()
    del buf
    collect()
    assert exists(name), "a holder in another pid namespace keeps the name"
    assert name not in zcbuf.gc() and exists(name), "gc must not remove what a container maps"
    s = seg_until(name, lambda s: s.held and inner in s.holders)
    assert s.held and inner in s.holders, (s, inner)
    assert open_elsewhere(name, "u4") == ARANGE_SUM
    p.send("sum")
    assert int(p.recv()) == ARANGE_SUM

    p.kill()  # SIGKILL to unshare and the namespace's pid 1
    wait_dead(inner)
    zcbuf.gc()
    assert not exists(name), "its only holder died: gc removes it"


NS_CREATOR = """
name = sys.argv[1]
b = zcbuf.empty((1000,), "u4", name=name)
b.asarray()[:] = np.arange(1000, dtype="u4")
say("ready", os.getpid())
c = cmd()
if c == "free":
    b.free()
    del b                 # the Buffer object keeps its mapping (the hold) while it lives
    gc.collect()
    say("freed", os.path.exists("/dev/shm/" + name))
    sys.stdin.read()      # until the test closes our stdin; then exit normally
"""


@pytest.mark.parametrize("end", ["free-and-exit", "sigkill"])
@pytest.mark.parametrize("mount_proc", [True, False], ids=["mount-proc", "host-proc"])
def test_creator_in_another_pid_namespace_holder_outside(env, mount_proc, end):
    need_unshare(mount_proc)
    name = env.name()
    p = env.spawn_argv(unshare_argv(mount_proc, NS_CREATOR, name))
    assert p.recv() == "ready 1"
    inner = inner_pid(p)
    mine = zcbuf.open(name)
    a = mine.asarray()
    mine.free()
    del mine  # from here on this process holds it through the array only
    s = seg_until(name, lambda s: s.held and set(s.holders) == {inner, os.getpid()})
    assert s.creator_pid == 1 and s.held and set(s.holders) == {inner, os.getpid()}, s

    if end == "free-and-exit":
        p.send("free")
        assert p.recv() == "freed True", "we hold it from outside the namespace: the name stays"
        p.close_stdin()
        assert p.wait() == 0
    else:
        p.kill()
    wait_dead(inner)

    assert exists(name)
    assert name not in zcbuf.gc() and exists(name)
    assert seg_until(name, lambda s: s.holders == (os.getpid(),)).holders == (os.getpid(),)
    assert open_elsewhere(name, "u4") == ARANGE_SUM
    assert int(a.sum()) == ARANGE_SUM
    del a
    collect()
    assert not exists(name), "the holder outside was the last: its free removes the name"


# ----------------------------------------------------------------------------------------------
# 3. Races: threads and processes on a few names, with gc running; the name is never removed
#    or replaced under a live holder

RACE_WORKER = """
import random, threading
prefix, nnames, seconds, wid, nthreads = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
names = [f"{prefix}{i}" for i in range(nnames)]
SLOTS, SLOT = 64, 64        # u64 slots; slot 0 unused, slot k belongs to one thread of one process
NBYTES = SLOTS * SLOT * 8
stats = {"created": 0, "opened": 0, "exists": 0, "notfound": 0, "checks": 0, "array_only": 0}
bad = []
lock = threading.Lock()

def fail(msg):
    with lock:
        if len(bad) < 20:
            bad.append(msg)

def count(k):
    with lock:
        stats[k] += 1

def check(name, arr, where):
    m = map_inode(arr)
    try:
        st = os.stat("/dev/shm/" + name)
    except FileNotFoundError:
        fail(f"{where}: /dev/shm/{name} is gone while this process maps it ({m})")
        return
    if m is None or m[0] != st.st_ino:
        fail(f"{where}: /dev/shm/{name} is inode {st.st_ino} but this process maps {m}")
    count("checks")

def run(t):
    rnd = random.Random(wid * 1000 + t)
    slot = wid * nthreads + t + 1
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        name = rnd.choice(names)
        try:
            if rnd.random() < 0.5:
                b = zcbuf.create(NBYTES, name=name)
                kind = "created"
            else:
                b = zcbuf.open(name)
                kind = "opened"
        except zcbuf.AlreadyExistsError:
            count("exists")
            continue
        except zcbuf.NotFoundError:
            count("notfound")
            continue
        except Exception as e:
            fail(f"{type(e).__name__}: {e}")
            continue
        count(kind)
        if b.nbytes != NBYTES:
            fail(f"{name}: {b.nbytes} bytes")
        a = b.asarray("u8").reshape(SLOTS, SLOT)
        n += 1
        token = (slot << 40) | n
        a[slot, :] = token
        check(name, a, kind)
        r = rnd.random()
        if r < 0.3:
            b.free()
            b = None
            count("array_only")
        elif r < 0.45:
            b = None          # dropped: collected now, the array stays
            count("array_only")
        time.sleep(rnd.choice([0, 0, 0, 0.0002, 0.001, 0.003]))
        check(name, a, kind + " later")
        if not (a[slot] == token).all():
            fail(f"{name}: slot {slot} was overwritten ({a[slot][:3]}, wanted {token})")
        if b is not None and rnd.random() < 0.5:
            b.free()
        del a, b

threads = [threading.Thread(target=run, args=(t,)) for t in range(nthreads)]
for th in threads:
    th.start()
for th in threads:
    th.join()
say(json.dumps({"stats": stats, "bad": bad}))
"""

GC_LOOP = """
prefix, seconds = sys.argv[1], float(sys.argv[2])
deadline = time.monotonic() + seconds
runs, removed, bad = 0, 0, []
while time.monotonic() < deadline:
    try:
        removed += sum(1 for n in zcbuf.gc() if n.startswith(prefix))
        zcbuf.ls()
        runs += 1
    except Exception as e:
        if len(bad) < 10:
            bad.append(f"{type(e).__name__}: {e}")
say(json.dumps({"runs": runs, "removed": removed, "bad": bad}))
"""


# Leaves segments behind on purpose: a forked child creates or opens a name, then dies holding
# it without running the close protocol (os._exit), so gc and creates find unheld leftovers
# to remove and replace while the workers open them.
LEAKER = """
import random
prefix, nnames, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
names = [f"{prefix}{i}" for i in range(nnames)]
rnd = random.Random(os.getpid())
deadline = time.monotonic() + seconds
leaked = 0
while time.monotonic() < deadline:
    name = rnd.choice(names)
    pid = os.fork()
    if pid == 0:
        try:
            if rnd.random() < 0.5:
                b = zcbuf.create(64 * 64 * 8, name=name)
            else:
                b = zcbuf.open(name)
            b.asarray()[:8] = 1
            os._exit(0)
        except (zcbuf.AlreadyExistsError, zcbuf.NotFoundError):
            os._exit(1)
        except BaseException:
            os._exit(2)
    _, st = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(st)
    if code == 2:
        say("bad")
        break
    leaked += code == 0
    time.sleep(rnd.choice([0, 0.001, 0.005]))
say(json.dumps({"leaked": leaked}))
"""

# Removes names under their holders (by design of unlink): used to show the checker works.
UNLINKER = """
prefix, nnames, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + seconds
n = 0
while time.monotonic() < deadline:
    for i in range(nnames):
        try:
            zcbuf.unlink(f"{prefix}{i}")
            n += 1
        except zcbuf.NotFoundError:
            pass
    time.sleep(0.001)
say(json.dumps({"unlinked": n}))
"""


def run_race(env, nnames, nprocs, nthreads, seconds, extra=(), where=None):
    spawn = where.spawn if where is not None else env.spawn
    workers = [
        spawn(RACE_WORKER, env.prefix, str(nnames), str(seconds), str(w), str(nthreads))
        for w in range(nprocs)
    ]
    others = [spawn(code, env.prefix, *args) for code, args in extra]
    results = [json.loads(w.recv(timeout=seconds + 60)) for w in workers]
    side = [json.loads(o.recv(timeout=seconds + 60)) for o in others]
    for w in workers + others:
        assert w.wait() == 0, w.stderr()
    bad = [b for r in results for b in r["bad"]]
    total = {k: sum(r["stats"][k] for r in results) for k in results[0]["stats"]}
    return bad, total, side


@pytest.mark.parametrize(
    "nnames,nprocs,nthreads,leakers",
    [(1, 3, 3, 0), (3, 4, 2, 0), (2, 3, 2, 2)],
    ids=["1name-3x3", "3names-4x2", "2names-3x2-leakers"],
)
def test_races_never_remove_or_replace_a_held_name(env, sandbox, nnames, nprocs, nthreads, leakers):
    seconds = 6.0
    # With leakers, run in a private /dev/shm: our gc loop, not another session's, meets the
    # leftovers. Without, run in the shared one, next to whatever else runs on this machine.
    where = sandbox if leakers else None
    extra = [(GC_LOOP, (str(seconds),))] + [(LEAKER, (str(nnames), str(seconds)))] * leakers
    bad, total, side = run_race(env, nnames, nprocs, nthreads, seconds, extra, where)
    g = side[0]
    assert bad == [], bad
    assert g["bad"] == [], g
    # the run was a real race: many holds, many refusals, gc ran throughout
    assert total["created"] > 50 and total["opened"] > 50 and total["exists"] > 10, total
    assert total["array_only"] > 20, total
    assert g["runs"] >= 2, g  # gc (and ls) ran during the race; each run lists all of /dev/shm
    if leakers:
        assert sum(s["leaked"] for s in side[1:]) > 20, side
        if sandbox.isolated:
            assert g["removed"] > 0, "gc removed leftovers while the workers raced"
        sandbox.run_py("zcbuf.gc()")  # the leakers' last segments are unheld: only gc removes them
    # every worker left normally after dropping everything: the last holder of each segment
    # removed its name
    left = sandbox.listdir(env.prefix) if leakers else [n for n in os.listdir(SHM) if n.startswith(env.prefix)]
    assert left == [], f"names left behind after every holder left: {left} {total}"


def test_race_checker_sees_a_name_removed_under_its_holder(env):
    """The race test's invariant check is not vacuous: unlink (which removes held names by
    design) makes it report violations."""
    bad, total, side = run_race(env, 1, 2, 2, 2.0, [(UNLINKER, ("1", "2.0"))])
    assert side[0]["unlinked"] > 5, side
    assert any("gone while" in b or "but this process maps" in b for b in bad), (bad, total)


# ----------------------------------------------------------------------------------------------
# 7. unlink: the old holder's last free never deletes the new segment of that name

NEW_CAM = """
name, persist = sys.argv[1], sys.argv[2] == "1"
b = zcbuf.create(4096, name=name, persist=persist)
b.asarray()[:] = 2
say("ready", os.stat("/dev/shm/" + name).st_ino)
if persist:
    b.free()
    sys.exit(0)
cmd()
"""


def _exit_now():
    os._exit(0)


@pytest.mark.parametrize("new", ["held", "persistent"])
@pytest.mark.parametrize("forked", [False, True], ids=["no-fork", "after-fork"])
def test_unlink_then_recreate_old_holder_free_keeps_new(env, new, forked):
    name = env.name("cam")
    old = zcbuf.create(4096, name=name)
    arr_old = old.asarray()
    arr_old[:] = 1
    if forked:  # this process forks after mapping: its close protocol reopens the name
        p = mp.get_context("fork").Process(target=_exit_now)
        p.start()
        p.join(30)
        assert p.exitcode == 0
    run_py("zcbuf.unlink(sys.argv[1])", name)  # another process unlinks the held name
    assert not exists(name)
    b = env.spawn(NEW_CAM, name, "1" if new == "persistent" else "0")
    ino = int(b.recv().split()[1])
    if new == "persistent":
        assert b.wait() == 0
    assert os.stat(shm(name)).st_ino == ino

    assert int(arr_old.sum()) == 4096, "the unlinked segment stays valid for its holder"
    old.free()
    del arr_old, old
    collect()
    assert my_maps(name) == []
    assert exists(name) and os.stat(shm(name)).st_ino == ino, "the new segment must survive"
    assert open_elsewhere(name) == 2 * 4096
    if new == "persistent":
        zcbuf.unlink(name)
        assert not exists(name)


# ----------------------------------------------------------------------------------------------
# 4. fork


def _fork_own_open(conn, box, order):
    # `box` holds this process's only reference to the inherited Buffer object (which keeps
    # its mapping while it lives): popping it lets the child drop the inherited handle entirely.
    buf = box.pop()
    name = buf.name
    if order == "open-then-free":
        own = zcbuf.open(name)
        buf.free()
        del buf
    else:
        buf.free()
        del buf
        own = zcbuf.open(name)
    conn.send("ready")
    conn.recv()
    a = own.asarray()
    conn.send((exists(name), int(a.sum())))
    conn.recv()
    del a
    own.free()
    del own
    collect()
    conn.send(exists(name))
    conn.recv()


def _recv(conn, timeout=30):
    assert conn.poll(timeout), "the forked child did not answer"
    return conn.recv()


@pytest.mark.parametrize("order", ["open-then-free", "free-then-open"])
def test_fork_child_with_own_open_outlives_parent(env, order):
    name = env.name()
    # Kept in `box` only, never in a local of this frame: the fork child has a copy of this
    # frame, and must be able to drop every reference to the Buffer object it inherits.
    box = [zcbuf.empty((100,), "u1", name=name)]
    box[0].asarray()[:] = 3
    ctx = mp.get_context("fork")
    mine, theirs = ctx.Pipe()
    p = ctx.Process(target=_fork_own_open, args=(theirs, box, order), daemon=True)
    p.start()
    env.mp_procs.append(p)
    buf = box.pop()
    assert _recv(mine) == "ready"

    buf.free()
    del buf
    collect()
    assert my_maps(name) == []
    assert exists(name), "the forked child holds it"
    assert name not in zcbuf.gc() and exists(name)
    assert open_elsewhere(name) == 300
    mine.send("go")
    assert _recv(mine) == (True, 300), "the child still sees the data"
    mine.send("free")
    assert _recv(mine) is False, "the child was the last holder: its free removes the name"
    assert not exists(name)
    mine.send("exit")
    p.join(30)
    assert p.exitcode == 0


def _fork_child_frees_first(conn, box):
    buf = box.pop()  # this process's only reference to the inherited Buffer object
    name = buf.name
    a = buf.asarray()
    conn.send(int(a.sum()))
    del a
    buf.free()
    del buf
    collect()
    conn.send(exists(name))


def test_fork_child_leaves_first_parent_still_removes_name_last(env):
    """After a fork, the parent's own close protocol (reopen the name, try exclusive) works."""
    name = env.name()
    # Kept in `box` only, never in a local of this frame: the fork child has a copy of this
    # frame, and must be able to drop every reference to the Buffer object it inherits.
    box = [zcbuf.empty((100,), "u1", name=name)]
    box[0].asarray()[:] = 4
    ctx = mp.get_context("fork")
    mine, theirs = ctx.Pipe()
    p = ctx.Process(target=_fork_child_frees_first, args=(theirs, box), daemon=True)
    p.start()
    env.mp_procs.append(p)
    buf = box.pop()
    assert _recv(mine) == 400
    assert _recv(mine) is True, "the parent still holds it: the child's free must not remove it"
    p.join(30)
    assert p.exitcode == 0
    assert exists(name) and int(buf.asarray().sum()) == 400
    buf.free()
    del buf
    collect()
    assert not exists(name), "the parent was the last holder"


def _fork_inherited_array(conn, box, end):
    buf, arr = box.pop(0), box.pop(0)
    name = buf.name
    buf.free()
    del buf
    conn.send("ready")
    conn.recv()
    conn.send((exists(name), int(arr.sum())))
    if end == "drop":
        del arr
        collect()
        conn.send(exists(name))
        conn.recv()
    # "exit": return with the array still mapped; multiprocessing ends the child with _exit


@pytest.mark.parametrize("end", ["drop", "exit"])
def test_fork_child_keeping_only_inherited_array_holds(env, end):
    name = env.name()
    # Kept in `box` only, never in a local of this frame: the fork child has a copy of this
    # frame, and must be able to drop every reference to the Buffer object it inherits.
    box = [zcbuf.empty((100,), "u1", name=name)]
    box.append(box[0].asarray())
    box[1][:] = 5
    ctx = mp.get_context("fork")
    mine, theirs = ctx.Pipe()
    p = ctx.Process(target=_fork_inherited_array, args=(theirs, box, end), daemon=True)
    p.start()
    env.mp_procs.append(p)
    buf = box[0]
    box.clear()
    assert _recv(mine) == "ready"

    buf.free()
    del buf
    collect()
    assert my_maps(name) == [], "the parent dropped everything"
    assert exists(name), "the child's inherited array holds the segment"
    assert name not in zcbuf.gc() and exists(name)
    assert seg_until(name, lambda s: s.held).held
    assert open_elsewhere(name) == 500
    mine.send("go")
    assert _recv(mine) == (True, 500)
    if end == "drop":
        assert _recv(mine) is False, "the child dropped the last view: name removed"
        mine.send("exit")
        p.join(30)
        assert not exists(name)
    else:
        p.join(30)
        zcbuf.gc()
        assert not exists(name), "its last holder exited: gc removes it"
    assert p.exitcode == 0


# ----------------------------------------------------------------------------------------------
# 5. A process killed at any moment of create / open / free leaves nothing stuck

KILL_LOOP = """
import random
prefix, role, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rnd = random.Random(seed)
names = [f"{prefix}{i}" for i in range(3)]
held = []
say("ready")
while True:
    name = rnd.choice(names)
    try:
        if role == "creator" or rnd.random() < 0.2:
            b = zcbuf.create((1 << 20) * rnd.randint(1, 4), name=name)
        else:
            b = zcbuf.open(name)
    except (zcbuf.AlreadyExistsError, zcbuf.NotFoundError):
        continue
    a = b.asarray()
    a[::4096] = 1
    if rnd.random() < 0.5:
        b.free()
    del b
    held.append(a)
    del a
    while len(held) > rnd.randint(0, 2):
        held.pop(0)          # the last view goes: the close protocol runs here
"""


KILL_CHECK = """
prefix, k = sys.argv[1], int(sys.argv[2])
res = {"leftovers": 0, "bad": []}
for i in range(3):
    name = f"{prefix}{i}"
    path = "/dev/shm/" + name
    if not os.path.exists(path):
        continue
    res["leftovers"] += 1
    try:
        if (k + i) % 2:
            b = zcbuf.open(name)   # a complete, valid segment: never corrupt, never locked
            if b.nbytes <= 0 or b.nbytes % (1 << 20):
                res["bad"].append(f"{name}: opened {b.nbytes} bytes")
            b.free()
            del b            # the Buffer object keeps its mapping (the hold) while it lives
            if os.path.exists(path):
                res["bad"].append(f"{name}: still there after its only holder freed it")
        b = zcbuf.create(4096, name=name)   # replaces an unheld leftover
        b.asarray()[:] = 1
        if os.stat(path).st_size >= 1 << 20:
            res["bad"].append(f"{name}: the name does not name the new segment")
        b.free()
        del b
        if os.path.exists(path):
            res["bad"].append(f"{name}: new segment still there after its only holder freed it")
    except Exception as e:
        res["bad"].append(f"{name}: {type(e).__name__}: {e}")
zcbuf.gc()
res["left"] = sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix))
say(json.dumps(res))
"""


def test_sigkill_at_random_moments_leaves_nothing_stuck(env, sandbox):
    rnd = random.Random(1234)
    delays = [0.0, 0.001, 0.003, 0.01, 0.02, 0.05, 0.1, 0.2] + [rnd.uniform(0, 0.3) for _ in range(4)]
    leftovers = 0
    for k, delay in enumerate(delays):
        procs = [sandbox.spawn(KILL_LOOP, env.prefix, role, str(k * 10 + j))
                 for j, role in enumerate(["creator", "creator", "opener"])]
        for p in procs:
            assert p.recv() == "ready"
        time.sleep(delay)
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
        for p in procs:
            p.wait()
        res = json.loads(sandbox.run_py(KILL_CHECK, env.prefix, str(k)))
        assert res["bad"] == [], f"after a kill at {delay:.3f}s: {res}"
        assert res["left"] == [], f"after a kill at {delay:.3f}s and gc: {res}"
        leftovers += res["leftovers"]
    if sandbox.isolated:
        assert leftovers >= 3, "the kills left segments behind to open and replace"


# ----------------------------------------------------------------------------------------------
# 8. A large creation is never visible half-made

BIG_CREATOR = """
name, seconds = sys.argv[1], float(sys.argv[2])
deadline = time.monotonic() + seconds
made = refused = 0
while time.monotonic() < deadline:
    try:
        b = zcbuf.create(2 << 30, name=name)
    except zcbuf.AlreadyExistsError:
        refused += 1
        time.sleep(0.001)
        continue
    a = b.asarray()
    a[0] = a[-1] = 1
    del a
    b.free()
    del b            # the Buffer object keeps its mapping (the hold) while it lives
    made += 1
say(json.dumps({"made": made, "refused": refused}))
"""

BIG_OPENER = """
name, seconds = sys.argv[1], float(sys.argv[2])
deadline = time.monotonic() + seconds
res = {"ok": 0, "notfound": 0, "bad": []}
while time.monotonic() < deadline:
    try:
        b = zcbuf.open(name)
    except zcbuf.NotFoundError:
        res["notfound"] += 1
        continue
    except Exception as e:
        res["bad"].append(f"{type(e).__name__}: {e}")
        if len(res["bad"]) > 10:
            break
        continue
    if b.nbytes != 2 << 30:
        res["bad"].append(f"nbytes {b.nbytes}")
    res["ok"] += 1
    b.free()
    del b            # the Buffer object keeps its mapping (the hold) while it lives
say(json.dumps(res))
"""


def test_large_creation_never_looks_corrupt(env):
    st = os.statvfs(SHM)
    if st.f_bavail * st.f_frsize < 5 << 30:
        pytest.skip("needs 5 GiB free in /dev/shm")
    with open("/proc/meminfo") as f:
        avail = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f}.get("MemAvailable", 0)
    if avail < 6 << 30:
        pytest.skip("needs 6 GiB of available memory (tmpfs pages are memory)")
    name = env.name("big")
    seconds = 5.0
    c = env.spawn(BIG_CREATOR, name, str(seconds))
    o = env.spawn(BIG_OPENER, name, str(seconds))
    made = json.loads(c.recv(timeout=seconds + 60))
    res = json.loads(o.recv(timeout=seconds + 60))
    assert c.wait() == 0 and o.wait() == 0
    assert res["bad"] == [], res
    assert made["made"] >= 3 and res["ok"] >= 1 and res["notfound"] >= 1, (made, res)
    assert not exists(name)


# ----------------------------------------------------------------------------------------------
# 11. A segment truncated under its holders: free never crashes, others get CorruptError

TRUNCATE = """
name, size = sys.argv[1], int(sys.argv[2])
b = zcbuf.create(1 << 20, name=name)
b.asarray()[:] = 7
os.truncate("/dev/shm/" + name, size)
say("truncated")
cmd()
b.free()      # never touches the (now missing) pages
del b         # nor does the unmap (the Buffer object keeps its mapping while it lives)
gc.collect()
say("freed", os.path.exists("/dev/shm/" + name))
"""


@pytest.mark.parametrize("size", [0, 4096, 4096 + 12345])
def test_free_after_truncation_does_not_crash(env, size):
    name = env.name()
    p = env.spawn(TRUNCATE, name, str(size))
    assert p.recv() == "truncated"
    assert os.stat(shm(name)).st_size == size
    out = run_py(
        """
        try:
            zcbuf.open(sys.argv[1])
            print("opened")
        except zcbuf.CorruptError as e:
            print("CorruptError")
        """,
        name,
    )
    assert out.strip() == "CorruptError", "a truncated segment is refused, not mapped"
    assert seg(name) is not None  # ls reads it without faulting
    zcbuf.gc()
    p.send("free")
    assert p.recv() == "freed False", "its only holder left: name removed"
    p.close_stdin()
    assert p.wait() == 0, p.stderr()
    assert not exists(name)


# ----------------------------------------------------------------------------------------------
# 12. Producer restart, held names, persistence


RESTART = """
name = sys.argv[1]
b = zcbuf.create(4000, name=name)      # replaces the dead producer's segment
a = b.asarray("u4")
assert int(a.sum()) == 0, "a fresh segment, not the old data"
a[:] = 2
say("ready")
cmd()
"""


def test_producer_restart_after_sigkill_replaces_segment(env, sandbox):
    name = env.name("producer")
    c = sandbox.spawn(CREATOR, name)
    assert c.recv().startswith("ready")
    c.kill()
    if sandbox.isolated:
        assert sandbox.exists(name), "nobody ran the close protocol: the dead producer's name is left"
    d = sandbox.spawn(RESTART, name)
    assert d.recv() == "ready"
    out = json.loads(sandbox.run_py(
        """
        for _ in range(10):   # /proc/locks can miss a lock while others churn (see seg_until)
            s = [s for s in zcbuf.ls() if s.name == sys.argv[1]][0]
            if s.holders:
                break
            time.sleep(0.05)
        b = zcbuf.open(sys.argv[1])
        say(json.dumps([s.nbytes, s.dtype, list(s.holders), int(b.asarray("u4").sum())]))
        """,
        name,
    ))
    assert out == [4000, "", [d.pid], 2000], out


def test_create_of_held_name_names_the_holders(env):
    name = env.name()
    buf = zcbuf.create(4000, name=name)
    w = env.spawn(ARRAY_ONLY, name, "free")
    json.loads(w.recv())
    def refusal(pids):
        for _ in range(10):  # the pids come from /proc/locks: see seg_until
            with pytest.raises(zcbuf.AlreadyExistsError) as ei:
                zcbuf.create(64, name=name)
            msg = str(ei.value)
            if all(str(p) in msg for p in pids):
                break
            time.sleep(0.05)
        return msg

    msg = refusal([w.pid, os.getpid()])
    assert str(w.pid) in msg and str(os.getpid()) in msg, msg
    buf.free()
    del buf
    collect()
    msg = refusal([w.pid])
    assert str(w.pid) in msg, msg
    assert seg(name).nbytes == 4000, "the held segment was not replaced"


PERSIST = """
name, ctor = sys.argv[1], sys.argv[2]
if ctor == "create":
    b = zcbuf.create(4096, name=name, persist=True)
    b.asarray()[:] = 9
elif ctor == "empty":
    b = zcbuf.empty((4096,), "u1", name=name, persist=True)
    b.asarray()[:] = 9
else:
    b = zcbuf.from_array(np.full(4096, 9, "u1"), name=name, persist=True)
assert b.persistent
if ctor != "from_array":
    b.free()          # from_array: exit without freeing
say(os.path.exists("/dev/shm/" + name))
"""


@pytest.mark.parametrize("ctor", ["create", "empty", "from_array"])
def test_persistent_segment_outlives_holders_until_unlink(env, ctor):
    name = env.name("persist")
    try:
        assert run_py(PERSIST, name, ctor).strip() == "True"
        assert exists(name), "persistent: kept after its creator left"
        zcbuf.gc()
        assert exists(name), "gc leaves persistent segments"
        s = seg(name)
        assert s.persistent and not s.held and s.holders == () and s.nbytes == 4096, s
        assert abs(s.created - time.time()) < 120 and s.creator_pid > 0 and s.problem == "", s
        with pytest.raises(zcbuf.AlreadyExistsError, match="persistent"):
            zcbuf.create(64, name=name)
        assert open_elsewhere(name) == 9 * 4096
        assert exists(name), "the last holder leaving does not remove a persistent segment"
        b = zcbuf.open(name)
        assert b.persistent
        b.free()
        assert exists(name)
        zcbuf.unlink(name)
        assert not exists(name)
        with pytest.raises(zcbuf.NotFoundError):
            zcbuf.unlink(name)
    finally:
        try:
            zcbuf.unlink(name)
        except zcbuf.Error:
            pass


# ----------------------------------------------------------------------------------------------
# 1,000 holder processes of one segment

THOUSAND = """
import ctypes, signal
prctl = ctypes.CDLL(None, use_errno=True).prctl
name, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if mode == "inherit":
    b = zcbuf.open(name)
    a = b.asarray()
ready_r, ready_w = os.pipe()
kids = []
gc.disable()
gc.freeze()        # the children's collections must not touch (and so copy) every object
for i in range(n):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 2
        try:
            prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG: never outlive the helper
            if mode == "open":
                b = zcbuf.open(name)
                a = b.asarray()
            a[i] = i + 1
            os.write(ready_w, b"x")
            os.read(r, 1)
            code = 0 if a[i] == i + 1 else 1
            b.free()
            del b, a     # the Buffer object keeps its mapping (the hold) while it lives
        finally:
            os._exit(code)
    os.close(r)
    kids.append((pid, w))
got = 0
while got < n:
    got += len(os.read(ready_r, n - got))
if mode == "inherit":
    b.free()
    del b, a
say(json.dumps([pid for pid, _ in kids]))
cmd()
gone_early, bad = [], []
for i, (pid, w) in enumerate(kids):
    os.write(w, b"x")
    _, status = os.waitpid(pid, 0)
    if status:
        bad.append((i, status))
    if i < n - 1 and not os.path.exists("/dev/shm/" + name):
        gone_early.append(i)
say(json.dumps({"bad": bad[:10], "gone_early": gone_early[:10], "exists_at_end": os.path.exists("/dev/shm/" + name)}))
"""


@pytest.mark.parametrize("mode", ["open", "inherit"])
def test_thousand_holder_processes(env, mode):
    n = 1000
    name = env.name("k")
    buf = zcbuf.empty((n,), "u4", name=name)
    h = env.spawn(THOUSAND, name, str(n), mode)
    pids = json.loads(h.recv(timeout=120))
    assert len(pids) == n
    assert (buf.asarray() == np.arange(1, n + 1, dtype="u4")).all(), "every child wrote its slot"
    s = seg_until(name, lambda s: s.held and (mode != "open" or set(pids) <= set(s.holders)))
    assert s.held
    if mode == "open":
        assert set(pids) <= set(s.holders) and len(s.holders) >= n, len(s.holders)
    buf.free()
    del buf
    collect()
    assert my_maps(name) == []
    assert exists(name), "the children hold it"
    assert name not in zcbuf.gc() and exists(name)

    h.send("release")
    res = json.loads(h.recv(timeout=120))
    assert res["bad"] == [], res
    assert res["gone_early"] == [], "the name went while children still held it"
    assert res["exists_at_end"] is False, "the last child's free removes the name"
    assert not exists(name)
    h.close_stdin()
    assert h.wait() == 0


# ----------------------------------------------------------------------------------------------
# gc judges only what it can prove is a v2 zcbuf segment


def test_gc_never_removes_files_it_cannot_prove_are_zcbuf(env):
    tmp = env.name("real")
    b = zcbuf.create(4096, name=tmp)
    with open(shm(tmp), "rb") as f:
        real = f.read()
    b.free()
    assert real[:8] == b"ZCBUFhdr" and struct.unpack_from("<I", real, 8)[0] == 2
    v1 = bytearray(real)
    struct.pack_into("<I", v1, 8, 1)
    files = {
        "junk": os.urandom(8192),
        "empty": b"",
        "v1": bytes(v1),
        "magiconly": b"ZCBUFhdr" + bytes(56),
        "truncated": real[:2048],
    }
    names = {k: env.name(k) for k in files}
    for k, data in files.items():
        with open(shm(names[k]), "wb") as f:
            f.write(data)
    control = env.name("control")  # a valid v2 segment nobody holds: gc may remove it
    with open(shm(control), "wb") as f:
        f.write(real)

    removed = zcbuf.gc()
    for k, n in names.items():
        assert exists(n), f"gc removed the {k} file"
        assert n not in removed
    assert not exists(control), "a valid unheld v2 segment is removed"

    listed = {s.name: s for s in zcbuf.ls()}
    for k, n in names.items():
        assert n in listed and listed[n].problem, (k, listed.get(n))
    assert "version 1" in listed[names["v1"]].problem
    with pytest.raises(zcbuf.CorruptError, match="version 1"):
        zcbuf.open(names["v1"])
    for k in ("junk", "v1", "empty"):
        with pytest.raises(zcbuf.AlreadyExistsError):
            zcbuf.create(64, name=names[k])
    p = subprocess.run([sys.executable, "-m", "zcbuf", "gc"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    for k, n in names.items():
        assert exists(n) and n not in p.stdout, k


# ----------------------------------------------------------------------------------------------
# ls / gc on the command line


def test_cli_ls_shows_holder_pid(env):
    name = env.name()
    buf = zcbuf.create(4096, name=name)
    w = env.spawn(ARRAY_ONLY, name, "free")
    json.loads(w.recv())
    buf.free()
    del buf  # the Buffer object keeps its mapping (our hold) while it lives
    collect()
    for _ in range(5):  # the pids come from /proc/locks: see seg_until
        p = subprocess.run([sys.executable, "-m", "zcbuf", "ls"], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith(name + " ")]
        assert len(lines) == 1, p.stdout
        held_by = re.search(r" pid ([0-9,]+) ", lines[0][len(name):])
        if held_by and held_by.group(1) == str(w.pid):
            break
    assert held_by and held_by.group(1) == str(w.pid), lines[0]


LOCK_CHURN = """
import fcntl
d, n, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
fds = [os.open(f"{d}/f{i}", os.O_RDWR | os.O_CREAT, 0o600) for i in range(n)]
say("ready")
end = time.monotonic() + seconds
rounds = 0
while time.monotonic() < end:
    for f in fds:
        fcntl.flock(f, fcntl.LOCK_SH)
    for f in fds:
        fcntl.flock(f, fcntl.LOCK_UN)
    rounds += 1
say(rounds)
"""


def test_ls_sees_holders_while_other_locks_churn(env, tmp_path):
    """/proc/locks is served a page per read() and resumes by position: while other processes
    take and drop many locks, a naive reader skips live entries. ls (and gc) must not."""
    name = env.name()
    buf = zcbuf.create(4096, name=name)
    w = env.spawn(ARRAY_ONLY, name, "free")
    json.loads(w.recv())
    buf.free()
    del buf  # the Buffer object keeps its mapping (our hold) while it lives
    collect()
    churn = env.spawn(LOCK_CHURN, str(tmp_path), "1500", "3")
    assert churn.recv() == "ready"
    calls, wrong = 0, []
    end = time.monotonic() + 2.5
    while time.monotonic() < end:
        s = seg(name)
        calls += 1
        if s is None or not s.held or s.holders != (w.pid,):
            wrong.append(s)
        assert name not in zcbuf.gc()
    assert int(churn.recv()) > 0
    assert calls > 10 and wrong == [], f"{len(wrong)} of {calls} ls() calls wrong, e.g. {wrong[:2]}"
    assert exists(name)


def test_cli_gc_says_what_it_removed_and_why(env, sandbox):
    # In the shared /dev/shm another session's gc may remove the leftover first: then try again.
    for attempt in range(1 if sandbox.isolated else 8):
        name = env.name("gc")
        c = sandbox.spawn(CREATOR, name)
        assert c.recv().startswith("ready")
        c.kill()
        if sandbox.isolated:
            assert sandbox.exists(name)
        p = sandbox.run([sys.executable, "-m", "zcbuf", "gc"])
        assert p.returncode == 0, p.stderr
        assert not sandbox.exists(name)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith(f"removed {name} (")]
        if lines:
            assert len(lines) == 1 and re.fullmatch(rf"removed {re.escape(name)} \([^)]*\d[^)]*\): .*\S.*", lines[0]), lines
            assert "no process maps it" in lines[0], lines[0]
            return
    pytest.fail(f"gc did not report the dead producer's segment: {p.stdout!r}")


def test_gc_report_gives_name_size_and_reason(env, sandbox):
    if not sandbox.isolated:
        pytest.skip("needs a private /dev/shm: in the shared one another session's gc may win")
    dead = env.name("dead")
    c = sandbox.spawn(CREATOR, dead)
    assert c.recv().startswith("ready")
    live = env.name("live")
    h = sandbox.spawn(CREATOR, live)
    assert h.recv().startswith("ready")
    c.kill()
    out = json.loads(sandbox.run_py(
        "say(json.dumps([[r.name, r.nbytes, r.reason] for r in zcbuf.gc_report()]))"
    ))
    mine = [r for r in out if r[0].startswith(env.prefix)]
    assert [r[:2] for r in mine] == [[dead, 4000]], out
    assert "no process maps it" in mine[0][2], mine
    assert not sandbox.exists(dead) and sandbox.exists(live)


# ----------------------------------------------------------------------------------------------
# RLIMIT_NOFILE: running out of descriptors is an error, never a crash or a leftover

FD_OPENS = """
import resource
names = sys.argv[1].split(",")
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
bufs, err = [], None
for i, n in enumerate(names):
    try:
        bufs.append(zcbuf.open(n))
    except zcbuf.Error as e:
        err = [i, type(e).__name__, str(e)]
        break
res = {"opened": len(bufs), "err": err}
if err:
    for b in bufs[:5]:
        b.free()
        del b        # the Buffer object keeps its mapping (and descriptor) while it lives
    del bufs[:5]
    gc.collect()
    more = [zcbuf.open(names[i]) for i in range(err[0], err[0] + 3)]
    res["more"] = [int(b.asarray().sum()) for b in more]
say(json.dumps(res))
"""


def test_rlimit_nofile_opens(env):
    names = [env.name() for _ in range(100)]
    bufs = []
    for n in names:
        b = zcbuf.create(4096, name=n)
        b.asarray()[:1] = 1
        bufs.append(b)
    p = env.spawn(FD_OPENS, ",".join(names))
    res = json.loads(p.recv(timeout=60))
    assert p.wait() == 0, p.stderr()
    assert res["err"], f"64 descriptors were enough for 100 opens? {res}"
    i, kind, msg = res["err"]
    assert 20 < i < 64, res
    assert kind in ("OutOfMemoryError", "IOFailedError"), res
    assert "open files" in msg.lower() or "descriptor" in msg.lower(), msg
    assert res["more"] == [1, 1, 1], "after freeing some, opens work again"
    assert sorted(n for n in os.listdir(SHM) if n.startswith(env.prefix)) == sorted(names)
    for b in bufs:
        b.free()
    del b, bufs  # the Buffer objects keep their mappings (our holds) while they live
    assert [n for n in os.listdir(SHM) if n.startswith(env.prefix)] == []


FD_CREATES = """
import resource
prefix = sys.argv[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
bufs, err = [], None
for i in range(200):
    try:
        bufs.append(zcbuf.create(4096, name=f"{prefix}{i}"))
    except zcbuf.Error as e:
        err = [i, type(e).__name__, str(e)]
        break
# (stat needs no descriptor; listing the directory would)
res = {"created": len(bufs), "err": err,
       "listed": [f"{prefix}{j}" for j in range(201) if os.path.exists(f"/dev/shm/{prefix}{j}")]}
if err:
    for b in bufs[:5]:
        b.free()
        del b        # the Buffer object keeps its mapping (and descriptor) while it lives
    del bufs[:5]
    gc.collect()
    more = [zcbuf.create(4096, name=f"{prefix}more{j}") for j in range(3)]
    res["more"] = [b.nbytes for b in more]
    bufs += more
    del more
for b in bufs:
    b.free()
    del b
del bufs
gc.collect()
res["after"] = sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix))
say(json.dumps(res))
"""


def test_rlimit_nofile_creates_leave_nothing(env):
    p = env.spawn(FD_CREATES, env.prefix)
    res = json.loads(p.recv(timeout=60))
    assert p.wait() == 0, p.stderr()
    assert res["err"], res
    i, kind, msg = res["err"]
    assert kind in ("OutOfMemoryError", "IOFailedError"), res
    assert "open files" in msg.lower() or "descriptor" in msg.lower(), msg
    assert res["more"] == [4096] * 3, res
    assert f"{env.prefix}{i}" not in res["listed"], f"the failed create left {env.prefix}{i} behind"
    assert len(res["listed"]) == res["created"], res
    assert res["after"] == [], res


FD_FIRST_CALL = """
import resource
name = sys.argv[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
junk = []
try:
    while True:
        junk.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
res = {}
try:
    zcbuf.open(name)
    res["first"] = "ok"
except zcbuf.Error as e:
    res["first"] = type(e).__name__ + ": " + str(e)
for fd in junk[:10]:
    os.close(fd)
for what, f in [("open", lambda: int(zcbuf.open(name).asarray().sum())),
                ("create", lambda: zcbuf.create(64, shared=True).nbytes),
                ("ls", lambda: [s.name for s in zcbuf.ls()].count(name)),
                ("gc", lambda: len(zcbuf.gc()) >= 0)]:
    try:
        res[what] = f()
    except zcbuf.Error as e:
        res[what] = type(e).__name__ + ": " + str(e)
say(json.dumps(res))
"""


def test_rlimit_nofile_first_call_failure_is_not_sticky(env):
    name = env.name()
    buf = zcbuf.create(16, name=name)
    buf.asarray()[:] = 1
    p = env.spawn(FD_FIRST_CALL, name)
    res = json.loads(p.recv(timeout=60))
    assert p.wait() == 0, p.stderr()
    assert "open files" in res["first"].lower(), res
    assert res["open"] == 16 and res["create"] == 64 and res["ls"] == 1 and res["gc"] is True, res


# ----------------------------------------------------------------------------------------------
# A hostile process holding the locks: bounded waits, zcbuf.Timeout

HOSTILE_FLOCK = """
import fcntl
fd = os.open("/dev/shm/" + sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
say("ready")
cmd()
"""

# An OFD write lock on the whole file (l_len 0): it covers whichever byte zcbuf uses to
# serialise name removals.
HOSTILE_OFD = """
import fcntl, struct
fd = os.open("/dev/shm/" + sys.argv[1], os.O_RDWR)
fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
say("ready")
cmd()
"""

TIMED = """
op, name = sys.argv[1], sys.argv[2]
t0 = time.monotonic()
try:
    if op == "open":
        zcbuf.open(name)
    else:
        zcbuf.unlink(name)
    r = "ok"
except Exception as e:
    r = type(e).__name__ + ("+TimeoutError" if isinstance(e, TimeoutError) else "") + ": " + str(e)
say(json.dumps([time.monotonic() - t0, r]))
"""


@pytest.mark.parametrize("lock", ["flock-exclusive", "ofd-name-lock"])
def test_hostile_lock_gives_timeout_not_hang(env, lock):
    name = env.name("hostile")
    b = zcbuf.create(4096, name=name, persist=True)  # unheld but kept: the hostile can lock it
    b.free()
    del b  # (the Buffer object keeps its mapping, our hold, while it lives)
    try:
        h = env.spawn(HOSTILE_FLOCK if lock == "flock-exclusive" else HOSTILE_OFD, name)
        assert h.recv() == "ready"
        op = "open" if lock == "flock-exclusive" else "unlink"
        t, r = json.loads(run_py(TIMED, op, name, timeout=30))
        assert r.startswith("Timeout+TimeoutError: "), r
        assert 1.5 <= t <= 5, f"{op} waited {t:.2f}s"
        t0 = time.monotonic()
        zcbuf.gc()
        s = seg(name)
        assert time.monotonic() - t0 < 1.95, "gc and ls never wait for a lock (2 s)"
        assert s is not None and s.persistent and exists(name)
        h.close_stdin()
        h.wait()
    finally:
        try:
            zcbuf.unlink(name)
        except zcbuf.Error:
            pass
    assert not exists(name)
