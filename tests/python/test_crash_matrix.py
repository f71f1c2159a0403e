"""Crash matrix: kill a zcbuf process at every system call of its create and close paths.

``tests/c/crash_step.c`` runs one deterministic step (create, open+free, ...) with its zcbuf calls
between two ``getppid()`` markers. A dry run under ``strace -f`` records the step's system calls;
then, for every call of the step, the step is run again under

    strace -f -qq -o TRACE -e inject=SYSCALL:signal=KILL:when=N ./crash_step MODE NAME

which SIGKILLs it on entry to the N-th SYSCALL (before the call runs). The kill run's own trace
must match the dry run up to the kill; then what the dead process left is checked:

* ``create``: a killed creator leaves no name, or a complete, unheld segment that ``zcbuf.open``
  opens (1 MiB, all zero or the full pattern), that ``zcbuf.gc`` removes and that a create of the
  name replaces; no other file of ours appears in /dev/shm.
* ``create_over_leftover``: the same, for a create that first has to replace a segment that a
  killed process left (``crash_step hold_new``, SIGKILLed just before the create starts).
* ``close_while_held``: an opener/closer killed while this process holds the segment: the name
  stays and opens, no dead holder is listed; when this process frees it, the name goes.
* ``close_last_holder``: the killed closer was the last holder (this process freed its handle
  after the closer said "ready"): the name is gone, or present, openable and unheld (then ``gc``
  removes it and a create replaces it) -- never an unremovable, unopenable name.

Each kill point that leaves a segment is run three times, once per way of checking the leftover
(open it, gc it, create over it), since each of them consumes it.

``test_pthread_exit_holder`` checks that a process whose main thread called ``pthread_exit`` (a
zombie main thread in /proc) still counts as a holder.

Other test runs on this machine may call ``zcbuf.gc()`` at any time (some in a tight loop), which
removes any unheld segment, ours included: checks of unheld leftovers accept "gone" as well, and
a create over a leftover that such a gc took first (its trace then leaves the dry run's path) is
run again. Nothing else touches names with our prefix.
"""

from __future__ import annotations

import fcntl
import gc as _pygc
import os
import re
import select
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Set, Union

import numpy as np
import pytest

import zcbuf

ROOT = Path(__file__).resolve().parents[2]
LIB_DIR = ROOT / "target" / "release"
C_DIR = ROOT / "tests" / "c"
MIB = 1 << 20
PATTERN = ((np.arange(MIB, dtype=np.uint64) * 7 + 1) & 0xFF).astype(np.uint8)
PREFIX = f"zcbuf-cm-{os.getpid()}-"
KILLED = -signal.SIGKILL  # strace dies of the signal that killed its tracee

pytestmark = [
    pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed"),
    pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed"),
]

# ---------------------------------------------------------------------------------------------
# Building


@dataclass
class Native:
    crash_step: str
    pthread_exit_holder: str
    env: Dict[str, str]
    tmp: Path


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> Native:
    if not (LIB_DIR / "libzcbuf.so").exists():
        if shutil.which("cargo") is None:
            pytest.skip("target/release/libzcbuf.so is missing and cargo is not installed")
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True,
                       timeout=1800)
    out = tmp_path_factory.mktemp("crash_matrix")
    bins = {}
    for prog, extra in (("crash_step", []), ("pthread_exit_holder", ["-pthread"])):
        exe = out / prog
        cmd = ["gcc", "-std=c11", "-Wall", "-Wextra", "-Werror", *extra, f"-I{ROOT / 'include'}",
               str(C_DIR / f"{prog}.c"), f"-L{LIB_DIR}", "-lzcbuf", "-o", str(exe)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stderr}"
        bins[prog] = str(exe)
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        [str(LIB_DIR)] + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else [])
    )
    probe = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "true"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here (ptrace not permitted?): {probe.stderr.strip()}")
    return Native(bins["crash_step"], bins["pthread_exit_holder"], env, out)


# ---------------------------------------------------------------------------------------------
# /dev/shm and process helpers


def exists(name: str) -> bool:
    return os.path.lexists(f"/dev/shm/{name}")


def ours() -> List[str]:
    try:
        return sorted(n for n in os.listdir("/dev/shm") if n.startswith(PREFIX))
    except FileNotFoundError:
        return []


def segment(name: str) -> Optional[zcbuf.Segment]:
    for s in zcbuf.ls():
        if s.name == name:
            return s
    return None


def settled_segment(name: str, timeout: float = 3.0) -> Optional[zcbuf.Segment]:
    """``name``'s ls entry once no lock is seen on it (or after ``timeout``).

    Another process's ``ls`` or ``gc`` takes the exclusive lock of every segment for a moment to
    probe it, so one look may see an unheld segment as held; a dead holder's lock, though, never
    goes away on its own."""
    deadline = time.monotonic() + timeout
    while True:
        seg = segment(name)
        if seg is None or (not seg.held and not seg.holders) or time.monotonic() > deadline:
            return seg
        time.sleep(0.02)


def gone_soon(name: str, timeout: float = 2.0) -> bool:
    """``name`` is gone, or goes within ``timeout`` (another process's gc may be removing it)."""
    deadline = time.monotonic() + timeout
    while exists(name):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class Interfered(Exception):
    """Another live process (not one of this test's) holds a lock on one of our segments, e.g.
    another run's ls or gc probing it with a delay injected, or a fork child that inherited
    such a probe's lock: what would follow cannot be judged, so the kill point is run again."""


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
    except OSError:
        return "?"


def interference(name: str, ours: Set[int]) -> Optional[str]:
    """Who, other than this process and ``ours`` (the processes of the run being checked), locks
    ``name`` now (after letting probes pass), or None.

    The kernel drops a dead process's locks, so once the run's processes are dead a lock left
    by them is a zcbuf failure, not interference. A lock another process took stays as long
    as some process has its open file: /proc/locks then names the process that took it, even
    if that one has exited and a fork child (which inherited the descriptor) keeps it."""
    return foreign_lockers(settled_segment(name), ours)


def foreign_lockers(seg: Optional[zcbuf.Segment], ours: Set[int]) -> Optional[str]:
    """``interference`` for one ls entry."""
    if seg is None or not (seg.held or seg.holders):
        return None
    name = seg.name
    foreign = [p for p in seg.holders if p != os.getpid() and p not in ours]
    if foreign:
        gone = "exited; a fork child may keep its lock"
        return f"{name} is locked by other process(es) " + "; ".join(
            f"{p} ({cmdline(p) if os.path.exists(f'/proc/{p}') else gone})" for p in foreign)
    if seg.held and not seg.holders:
        return f"{name} is locked by a process /proc/locks does not name (another pid namespace?)"
    return None


def drop(*bufs: Optional[zcbuf.Buffer]) -> None:
    """Free ``bufs``: their ids go at once, but each Buffer object keeps its mapping (and with
    it this process's hold on the segment) for as long as it lives. So every caller also lets
    go of its own references right after, ``drop(b); del b`` (or ``b = None``, or clears the
    field that held it), before it expects the hold or the name to be gone. (A Buffer is in no
    reference cycle: the last reference going unmaps it at once.)"""
    for b in bufs:
        if b is not None:
            b.free()
    _pygc.collect()  # nothing of ours (an array in a cycle) may keep a mapping alive


def unlink_ours() -> None:
    for n in ours():
        try:
            zcbuf.unlink(n)
        except zcbuf.NotFoundError:
            pass


@pytest.fixture(autouse=True)
def _clean_names():
    yield
    _pygc.collect()
    unlink_ours()


_seq = iter(range(1, 1 << 62))


def fresh_name(tag: str) -> str:
    return f"{PREFIX}{tag}-{next(_seq)}"


def make_patterned(name: str) -> zcbuf.Buffer:
    b = zcbuf.create(MIB, name=name)
    b.asarray()[:] = PATTERN
    return b


def popen(native: Native, cmd: List[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=native.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def read_line(p: subprocess.Popen, timeout: float = 60) -> str:
    """One line from ``p``'s stdout (binary pipe), or "" at EOF."""
    fd = p.stdout.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            p.kill()
            raise AssertionError(f"no line from {p.args!r} in {timeout} s (got {data!r})")
        chunk = os.read(fd, 1)
        if not chunk:
            break
        data += chunk
    return data.decode()


def say(p: subprocess.Popen, line: bytes = b"\n") -> None:
    try:
        p.stdin.write(line)
        p.stdin.close()
    except BrokenPipeError:
        pass  # it died (was killed) meanwhile


def finish(p: Optional[subprocess.Popen]) -> None:
    if p is None:
        return
    if p.poll() is None:
        p.kill()
        p.wait()
    for f in (p.stdin, p.stdout, p.stderr):
        if f and not f.closed:
            f.close()


# ---------------------------------------------------------------------------------------------
# Scenarios: how to run one step, dry or with a kill


@dataclass
class Outcome:
    rc: int
    ready: bool = True  # close_last_holder: the closer said "ready" before it died
    held_by_us: Optional[zcbuf.Buffer] = None  # close_while_held: our handle, still open
    stderr: str = ""
    pids: Set[int] = field(default_factory=set)  # the run's processes (other than this one)


def traced_pids(strace_args: List[str]) -> Set[int]:
    """The pids in the trace that ``strace_args`` wrote (``-o FILE``)."""
    path = strace_args[strace_args.index("-o") + 1]
    try:
        with open(path) as f:
            return {int(m.group(1)) for m in map(re.compile(r"^(\d+)\s").match, f) if m}
    except OSError:
        return set()


def _strace(native: Native, strace_args: List[str], mode: str, name: str) -> List[str]:
    return ["strace", "-f", "-qq", *strace_args, native.crash_step, mode, name]


def run_create(native: Native, name: str, strace_args: List[str]) -> Outcome:
    p = subprocess.run(_strace(native, strace_args, "create", name), env=native.env,
                       capture_output=True, text=True, timeout=60)
    return Outcome(p.returncode, stderr=p.stderr, pids=traced_pids(strace_args))


def run_create_over_leftover(native: Native, name: str, strace_args: List[str]) -> Outcome:
    # The leftover is made unheld (its holder SIGKILLed) only once the traced creator waits at
    # its cue, so that another process's gc has microseconds, not milliseconds, to take it.
    h = popen(native, [native.crash_step, "hold_new", name])
    c = None
    try:
        assert read_line(h) == "ready\n", f"hold_new {name}: {h.stderr.read().decode()}"
        c = popen(native, _strace(native, strace_args, "create_on_cue", name))
        assert read_line(c) == "ready\n", f"create_on_cue {name}: {c.stderr.read().decode()}"
        h.kill()
        h.wait(timeout=60)
        say(c)
        rc = c.wait(timeout=60)
        err = c.stderr.read().decode()
    finally:
        finish(h)
        finish(c)
    return Outcome(rc, stderr=err, pids=traced_pids(strace_args) | {h.pid})


def run_close_while_held(native: Native, name: str, strace_args: List[str]) -> Outcome:
    b = make_patterned(name)
    try:
        p = subprocess.run(_strace(native, strace_args, "open_free", name), env=native.env,
                           capture_output=True, text=True, timeout=60)
    except BaseException:
        drop(b)
        del b
        raise
    return Outcome(p.returncode, held_by_us=b, stderr=p.stderr, pids=traced_pids(strace_args))


def run_close_last_holder(native: Native, name: str, strace_args: List[str]) -> Outcome:
    b: Optional[zcbuf.Buffer] = make_patterned(name)
    p = popen(native, _strace(native, strace_args, "open_wait_free", name))
    try:
        ready = read_line(p) == "ready\n"
        if ready:
            drop(b)  # the closer is now the last holder
            b = None
            if exists(name):
                say(p)
            else:
                # Right only if the closer died before our free (a kill at its read of stdin,
                # right after "ready"): then we were the last holder.
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    raise AssertionError(
                        f"{name}: removed while the closer still held it") from None
                ready = False
        rc = p.wait(timeout=60)
        err = p.stderr.read().decode()
    finally:
        finish(p)
        if b is not None:
            drop(b)  # it died while opening: we were, and now stop being, the last holder
            b = None
    return Outcome(rc, ready=ready, stderr=err, pids=traced_pids(strace_args))


RUNNERS: Dict[str, Callable[[Native, str, List[str]], Outcome]] = {
    "create": run_create,
    "create_over_leftover": run_create_over_leftover,
    "close_while_held": run_close_while_held,
    "close_last_holder": run_close_last_holder,
}

MODES = {
    "create": "create",
    "create_over_leftover": "create_on_cue",
    "close_while_held": "open_free",
    "close_last_holder": "open_wait_free",
}

SETUP = {
    "create": "",
    "create_over_leftover": "(NAME made by `crash_step hold_new NAME`, SIGKILLed once this "
                            "step says ready; then a newline on stdin)",
    "close_while_held": "(NAME created with the pattern and held by the pytest process, which "
                        "frees it after the kill)",
    "close_last_holder": "(NAME created with the pattern by the pytest process, which frees it "
                         "when the step says ready, then sends a newline)",
}

# Whether the step's name exists when the step starts (per the dry run's own state).
INITIAL = {
    "create": False,
    "create_over_leftover": True,
    "close_while_held": True,
    "close_last_holder": True,
}

# The system calls zcbuf makes in each step, as observed; every other call the step makes is
# killed at too, under the "other" parameter (so nothing is missed if zcbuf starts using more).
PATH_SYSCALLS = {
    "create": ["open", "openat", "flock", "pwrite64", "fallocate", "fstat", "linkat", "mmap",
               "close", "munmap", "fcntl", "newfstatat", "unlinkat"],
    "create_over_leftover": ["open", "openat", "flock", "pwrite64", "fallocate", "fstat",
                             "linkat", "pread64", "fcntl", "newfstatat", "unlinkat", "close",
                             "mmap", "munmap"],
    "close_while_held": ["open", "openat", "flock", "fstat", "pread64", "mmap", "munmap", "close"],
    "close_last_holder": ["open", "openat", "flock", "fstat", "pread64", "mmap", "munmap",
                          "fcntl", "newfstatat", "unlinkat", "close"],
}

# ---------------------------------------------------------------------------------------------
# Traces

_LINE = re.compile(r"^(?:\[pid\s+\d+\]\s+|\d+\s+)?([a-z_][a-z0-9_]*)\(")
_RESULT = re.compile(r"\)\s+=\s+(\S+)(?:\s+(E[A-Z0-9]+))?(?:\s+\(.*\))?\s*$")


@dataclass
class Step:
    syscall: str
    n: int  # the n-th call of `syscall` since the program started (strace's when=N)
    line: str
    result: str  # "ok", an errno name, or "?" (no result: killed or unfinished)
    index: int = 0  # position in the step
    name_exists: bool = False  # whether the step's name exists when this call is entered


def path_of(text: str) -> List[Step]:
    """The calls between the two getppid markers (or after the first, for a killed run)."""
    calls: List[Step] = []
    counts: Dict[str, int] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        sc = m.group(1)
        counts[sc] = counts.get(sc, 0) + 1
        r = _RESULT.search(line)
        result = "?" if r is None or r.group(1) == "?" else (r.group(2) or "ok")
        calls.append(Step(sc, counts[sc], line, result))
    marks = [i for i, c in enumerate(calls) if c.syscall == "getppid"]
    if not marks:
        return []
    end = marks[1] if len(marks) > 1 else len(calls)
    path = calls[marks[0] + 1: end]
    for i, s in enumerate(path):
        s.index = i
    return path


@dataclass
class DryRun:
    scenario: str
    name: str
    steps: List[Step] = field(default_factory=list)

    def of(self, syscall: str) -> List[Step]:
        if syscall == "other":
            known = set(PATH_SYSCALLS[self.scenario])
            return [s for s in self.steps if s.syscall not in known]
        return [s for s in self.steps if s.syscall == syscall]


def parse_dry(text: str, name: str, initial: bool) -> List[Step]:
    steps = path_of(text)
    present = initial
    quoted = f'"{name}"'
    for s in steps:
        s.name_exists = present
        if s.result == "ok" and quoted in s.line:
            if s.syscall in ("linkat", "link", "renameat", "renameat2"):
                present = True
            elif s.syscall in ("unlinkat", "unlink"):
                present = False
    return steps


def deviation(dry: DryRun, text: str, upto: int) -> Optional[str]:
    """Where a kill run's trace left the dry run's path before its kill at step ``upto``."""
    got = path_of(text)
    for w in dry.steps[: upto + 1]:
        if w.index >= len(got):
            return f"the run's step ended after {len(got)} calls, before the dry run's {w.line!r}"
        g = got[w.index]
        if g.syscall != w.syscall or (w.index < upto and g.result != w.result):
            return f"call {w.index + 1} of the step was {g.line!r}, in the dry run {w.line!r}"
    if len(got) > upto + 1:
        return f"the run went on past the kill point, to {got[upto + 1].line!r}"
    return None


def replaced_leftover(steps: List[Step]) -> bool:
    """The create removed the leftover's name and then named its own segment (the name went from
    present to absent to present): no other process's gc took the leftover first."""
    gone = False
    for s in steps:
        gone |= not s.name_exists
        if gone and s.name_exists:
            return True
    return False


_dry: Dict[str, Union[DryRun, str]] = {}


def dry_run(native: Native, scenario: str) -> DryRun:
    """The scenario run once without faults, traced (cached; so is a failure)."""
    if scenario not in _dry:
        try:
            # A create over a leftover races other processes' gc (see run_matrix): retried.
            deadline = time.monotonic() + 20
            pause = 0.02
            while True:
                try:
                    d = _dry_run(native, scenario)
                    if scenario != "create_over_leftover" or replaced_leftover(d.steps):
                        break
                    why = "another process's gc removed the leftover first"
                except Interfered as e:
                    why = str(e)
                unlink_ours()
                if time.monotonic() + pause > deadline:
                    raise AssertionError(f"other processes interfered in every run for 20 s "
                                         f"(last: {why})")
                time.sleep(pause)
                pause = min(pause * 2, 2.0)
            _dry[scenario] = d
        except AssertionError as e:
            unlink_ours()
            _dry[scenario] = f"dry run of {scenario} failed: {e}"
    d = _dry[scenario]
    if isinstance(d, str):
        pytest.fail(d, pytrace=False)
    return d


def _dry_run(native: Native, scenario: str) -> DryRun:
    trace = native.tmp / f"dry-{scenario}.trace"
    name = fresh_name(f"dry-{scenario}")
    out = RUNNERS[scenario](native, name, ["-o", str(trace)])
    try:
        if scenario == "create_over_leftover" and out.rc == 2 and "(already exists)" in out.stderr:
            raise Interfered(f"the create raced another process's gc: {out.stderr.strip()}")
        assert out.rc == 0, f"rc {out.rc}: {out.stderr}"
        if out.held_by_us is not None:
            assert exists(name), f"{name} went when the other process freed it, though we hold it"
    finally:
        drop(out.held_by_us)
        out.held_by_us = None
    assert not exists(name), f"{name} left behind after its last holder freed it"
    text = trace.read_text()
    d = DryRun(scenario, name, parse_dry(text, name, INITIAL[scenario]))
    assert d.steps, f"no system calls between the markers:\n{text}"
    return d


# ---------------------------------------------------------------------------------------------
# Checks of what a killed step left


def data_ok_create(a: np.ndarray) -> bool:
    # Killed before the pattern was written: zeros; after: the pattern (writing it makes no
    # system call, so no kill lands in the middle of it).
    return bool((a == 0).all() or (a == PATTERN).all())


def data_ok_pattern(a: np.ndarray) -> bool:
    return bool((a == PATTERN).all())


def fresh_create_then_gone(name: str, ours: Set[int] = frozenset()) -> None:
    """A create of ``name`` succeeds (replacing any unheld leftover) and gives a fresh, zeroed
    segment; freeing it removes the name."""
    for attempt in range(5):
        try:
            b = zcbuf.create(MIB, name=name)
            break
        except zcbuf.AlreadyExistsError as e:
            who = interference(name, ours)
            if who:
                raise Interfered(who) from None
            seg = segment(name)
            if attempt < 4 and (seg is None or not seg.held):
                # Nobody holds it: another process's gc held its exclusive lock while removing
                # it, which create reports as "already exists" (see
                # test_create_waits_for_a_remover_instead_of_already_exists). Try again.
                time.sleep(0.05)
                continue
            raise AssertionError(f"create of {name} after the kill: {type(e).__name__}: {e}; "
                                 f"ls: {seg}") from None
        except zcbuf.Error as e:
            raise AssertionError(
                f"create of {name} after the kill: {type(e).__name__}: {e}") from None
    try:
        a = b.asarray()
        assert a.nbytes == MIB and not a.any(), f"create of {name} did not give a fresh segment"
        del a
    finally:
        drop(b)
        del b
    assert not exists(name), f"{name} still exists after its only holder freed it"


def check_leftover(name: str, method: str, data_ok: Callable[[np.ndarray], bool],
                   ours: Set[int]) -> bool:
    """``name`` may have been left by a killed process that was its last holder. Returns whether
    it existed.

    If it does: ls shows a valid, unheld 1 MiB segment, and per ``method``, "open": zcbuf.open
    gives the 1 MiB with good data, and our free (as the last holder) removes the name; "gc":
    zcbuf.gc() removes it; "replace": a create replaces it. In every case a create of the name
    then succeeds.
    """
    if not exists(name):
        fresh_create_then_gone(name, ours)
        return False
    seg = settled_segment(name)
    who = foreign_lockers(seg, ours)
    if who:
        raise Interfered(who)
    # What ls says is noted, not asserted at once: the checks below say what that means for
    # open, gc and create, which makes a failure's report complete.
    notes = []
    if seg is not None:  # else removed meanwhile by someone's gc
        if seg.problem or seg.nbytes != MIB or seg.persistent:
            notes.append(f"ls: {seg}")
        if seg.held or seg.holders:
            notes.append(f"a dead process still holds it: {seg}")
    try:
        if method == "open":
            _open_leftover(name, data_ok, ours)
        elif method == "gc":
            _gc_leftover(name, ours)
        elif method != "replace":  # "replace": fresh_create_then_gone below replaces it
            raise ValueError(method)
        fresh_create_then_gone(name, ours)
    except AssertionError as e:
        raise AssertionError("\n    ".join(notes + [str(e)])) from None
    assert not notes, "\n    ".join(notes)
    return True


def _open_leftover(name: str, data_ok: Callable[[np.ndarray], bool], ours: Set[int]) -> None:
    try:
        b = zcbuf.open(name)
    except zcbuf.NotFoundError:
        assert not exists(name), f"open of {name} says not found while the name exists"
        return
    except zcbuf.Timeout as e:
        # Someone held the exclusive lock for 2 s: not the run's processes (dead) and not
        # this one, so another process.
        raise Interfered(interference(name, ours) or f"open of {name}: {e}") from None
    except zcbuf.Error as e:
        raise AssertionError(f"open of leftover {name}: {type(e).__name__}: {e}") from None
    try:
        a = b.asarray()
        assert b.nbytes == MIB and a.nbytes == MIB, f"{name}: {b.nbytes} bytes"
        assert data_ok(a), f"{name}: unexpected data {a[:8]}..."
        del a
    finally:
        drop(b)
        del b
    if exists(name):
        who = interference(name, ours)
        if who:
            raise Interfered(who)
    assert not exists(name), f"{name}: still there after its last holder (us) freed it"


def _gc_leftover(name: str, ours: Set[int]) -> None:
    try:
        removed = zcbuf.gc()
    except zcbuf.Error as e:
        raise AssertionError(f"gc with leftover {name}: {type(e).__name__}: {e}") from None
    # (If another process's gc was removing it at that moment, ours skipped it.)
    if name not in removed and not gone_soon(name):
        who = interference(name, ours)
        if who:
            raise Interfered(who)
    assert name in removed or not exists(name), (
        f"gc did not remove unheld leftover {name} (removed {removed}); ls: {segment(name)}"
    )


class Deviated(Exception):
    """A kill run's step took another path than the dry run's."""


def command(native: Native, scenario: str, step: Step, name: str) -> str:
    return (f"LD_LIBRARY_PATH={LIB_DIR} strace -f -qq -o /dev/null -e "
            f"inject={step.syscall}:signal=KILL:when={step.n} {native.crash_step} "
            f"{MODES[scenario]} {name} {SETUP[scenario]}").rstrip()


def kill_once(native: Native, d: DryRun, step: Step, method: str) -> bool:
    """Kill the scenario's step at ``step`` once and check what is left; returns whether a
    segment was left behind. Raises AssertionError, or Deviated (after checking what it could)
    when the run left the dry run's path before the kill."""
    scenario = d.scenario
    name = fresh_name(f"{scenario[:9]}-{step.syscall}-{step.n}")
    trace = native.tmp / "kill.trace"
    args = ["-o", str(trace), "-e", f"inject={step.syscall}:signal=KILL:when={step.n}"]
    cmd = command(native, scenario, step, name)
    out = RUNNERS[scenario](native, name, args)
    try:
        dev = deviation(d, trace.read_text() if trace.exists() else "", step.index)
        stray = [n for n in ours() if n != name]
        assert not stray, f"stray files in /dev/shm: {stray}"
        if dev is not None:
            if scenario != "create_over_leftover":
                raise AssertionError(f"the step left the dry run's path: {dev}")
            # Another process's gc took the leftover first, or was removing it when the create
            # came (which create reports as "already exists": see
            # test_create_waits_for_a_remover_instead_of_already_exists). What is left must
            # still be sound.
            if out.rc == 2 and "(already exists)" in out.stderr:
                raise Interfered(f"the create raced another process's gc: {out.stderr.strip()}")
            assert out.rc in (KILLED, 0), f"rc {out.rc}: {out.stderr.strip()}"
            check_leftover(name, method, data_ok_create, out.pids)
            raise Deviated(dev)
        assert out.rc == KILLED, f"not killed (rc {out.rc}): {out.stderr.strip()}"
        if scenario == "close_while_held":
            b = out.held_by_us
            assert exists(name), f"{name} vanished while we hold it"
            b2 = zcbuf.open(name)
            try:
                a = b2.asarray()
                assert b2.nbytes == MIB and data_ok_pattern(a), "data changed"
                del a
                seg = segment(name)
                assert seg is not None and seg.held, f"ls: {seg}"
                dead = [p for p in seg.holders
                        if p != os.getpid() and not os.path.exists(f"/proc/{p}")]
                assert not dead, f"a dead holder is listed: {seg}"
            finally:
                drop(b2)
                del b2
            assert exists(name), f"{name} removed while our first handle still holds it"
            out.held_by_us = None
            drop(b)
            del b
            assert not exists(name), f"{name} left after its last holder (us) freed it"
            return False
        if scenario == "close_last_holder" and not out.ready:
            # Killed while opening; we freed our handle after it died: we were the last holder.
            assert not exists(name), f"{name} left after the last live holder (us) freed it"
            return False
        if not step.name_exists:
            assert not exists(name), f"{name} exists, though the kill came before it was named"
            fresh_create_then_gone(name, out.pids)
            return False
        data_ok = data_ok_pattern if scenario == "close_last_holder" else data_ok_create
        return check_leftover(name, method, data_ok, out.pids)
    except AssertionError as e:
        raise AssertionError(
            f"{scenario}: {cmd}\n    killed before: {step.line}\n    {e}") from None
    finally:
        drop(out.held_by_us)
        out.held_by_us = None


def run_matrix(native: Native, scenario: str, syscall: str) -> None:
    d = dry_run(native, scenario)
    steps = d.of(syscall)
    if not steps:
        pytest.skip(f"the {scenario} step makes no {syscall} call now")
    failures = []
    for step in steps:
        # One kill run per way of checking a leftover (each consumes it); one run is enough
        # when nothing was left.
        methods = ("open",) if scenario == "close_while_held" else ("open", "gc", "replace")
        for method in methods:
            leftover = True
            # A create over a leftover races other processes' gc removing the leftover first
            # (the step then takes another path), and any leftover may be locked for a while
            # by another process's probe: such runs are repeated, spread over up to 20 s (a
            # busy neighbour runs gc in a loop for seconds).
            deadline = time.monotonic() + 20
            pause = 0.02
            while True:
                try:
                    leftover = kill_once(native, d, step, method)
                    break
                except (Deviated, Interfered) as e:
                    unlink_ours()
                    if time.monotonic() + pause > deadline:
                        failures.append(f"[{method}] {scenario}: killed before {step.line}: "
                                        f"other processes interfered in every run for 20 s "
                                        f"(last: {e})")
                        break
                    time.sleep(pause)
                    pause = min(pause * 2, 2.0)
                except AssertionError as e:
                    unlink_ours()
                    failures.append(f"[{method}] {e}")
                    break  # and go on with the other checks: report all that is wrong
            if not leftover:
                break
    assert not failures, f"{len(failures)} kill point(s) failed:\n" + "\n".join(failures)


MATRIX = [(sc, s) for sc, calls in PATH_SYSCALLS.items() for s in [*calls, "other"]]


@pytest.mark.parametrize("scenario,syscall", MATRIX, ids=[f"{a}-{b}" for a, b in MATRIX])
def test_crash_matrix(native, scenario, syscall):
    run_matrix(native, scenario, syscall)


def test_dry_runs_cover_the_paths(native):
    """The paths make the calls the matrix names (a call zcbuf stops making is noticed here)."""
    for scenario, calls in PATH_SYSCALLS.items():
        made = {s.syscall for s in dry_run(native, scenario).steps}
        missing = [c for c in calls if c not in made]
        assert not missing, f"{scenario}: no {missing} calls any more; update PATH_SYSCALLS"


# ---------------------------------------------------------------------------------------------
# A remover at work is not a holder


def test_create_waits_for_a_remover_instead_of_already_exists(native):
    """A create that meets a remover at work on an unheld leftover (gc, another create) waits
    for it instead of reporting the name as held."""
    name = fresh_name("remover")
    h = popen(native, [native.crash_step, "hold_new", name])
    try:
        assert read_line(h) == "ready\n"
    finally:
        finish(h)  # SIGKILL: NAME is now a complete segment that nobody holds
    try:
        fd = os.open(f"/dev/shm/{name}", os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        pytest.skip("another process's gc removed the leftover first")
    try:
        # What zcbuf.gc() (or a create replacing the leftover) does before it removes the name:
        # take the exclusive lock. This remover lets go after 0.3 s without removing it.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pytest.skip("another process's gc is on this leftover right now")
    release = threading.Timer(0.3, os.close, (fd,))
    release.start()
    try:
        b = zcbuf.create(MIB, name=name)  # wanted: wait for the remover, then replace
    finally:
        release.join()
    drop(b)
    del b
    assert not exists(name)


# ---------------------------------------------------------------------------------------------
# A holder whose main thread exited


def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("State:"):
                return line.split()[1]
    return "?"


def test_pthread_exit_holder(native):
    name = fresh_name("pthread")
    b: Optional[zcbuf.Buffer] = make_patterned(name)
    p = popen(native, [native.pthread_exit_holder, name])
    try:
        assert read_line(p) == "ready\n", p.stderr.read().decode() if p.poll() is not None else ""
        deadline = time.monotonic() + 10
        while proc_state(p.pid) != "Z":
            assert time.monotonic() < deadline, f"main thread not a zombie: {proc_state(p.pid)}"
            time.sleep(0.01)
        assert p.poll() is None, "the process ended with its main thread"

        drop(b)
        b = None
        assert exists(name), "the name went while a process (zombie main thread) maps it"
        removed = zcbuf.gc()
        assert name not in removed and exists(name), f"gc removed a held segment: {removed}"
        seg = segment(name)
        assert seg is not None and seg.held, f"ls does not show it held: {seg}"
        assert p.pid in seg.holders, f"ls holders {seg.holders}, wanted {p.pid}"

        third = subprocess.run([native.crash_step, "open_free", name], env=native.env,
                               capture_output=True, text=True, timeout=60)
        assert third.returncode == 0, f"a third process cannot open it: {third.stderr}"
        assert exists(name), "the name went while the zombie-main process still maps it"
        assert proc_state(p.pid) == "Z" and p.poll() is None

        say(p)
        rc = p.wait(timeout=60)
        assert rc == 0, f"pthread_exit_holder rc {rc}: {p.stderr.read().decode()}"
        assert not exists(name), "the name stayed after its last holder freed it and exited"
    finally:
        finish(p)
        drop(b)


def test_crash_step_modes_work(native):
    """Without faults, each mode does what the matrix assumes."""
    name = fresh_name("plain")
    r = subprocess.run([native.crash_step, "create", name], env=native.env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert not exists(name), "create + free as the only holder removes the name"
    r = subprocess.run([native.crash_step, "leave", name], env=native.env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == KILLED, r.stderr
    if exists(name):  # (unless another run's gc got it first)
        try:
            b = zcbuf.open(name)
        except (zcbuf.NotFoundError, zcbuf.Timeout):  # (or another process's probe locks it)
            b = None
            unlink_ours()
        if b is not None:
            try:
                assert data_ok_pattern(b.asarray())
            finally:
                drop(b)
                b = None
    assert not exists(name)
    b = make_patterned(name)
    h = popen(native, [native.crash_step, "hold", name])
    try:
        assert read_line(h) == "ready\n"
        drop(b)
        b = None
        assert exists(name), "hold keeps it"
        r = subprocess.run([native.crash_step, "open_free", name], env=native.env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        say(h)
        assert h.wait(timeout=60) == 0, h.stderr.read().decode()
        assert not exists(name)
    finally:
        finish(h)
        drop(b)
