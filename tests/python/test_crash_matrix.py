"""Crash matrix: kill a zcbuf process at every system call of its create and close paths.

``tests/c/crash_step.c`` runs one deterministic step (create, open+free, ...) with its zcbuf calls
between two ``getppid()`` markers. A dry run under ``strace -f`` records the step's system calls;
then, for every call of the step, the program is run again under

    strace -f -qq -o /dev/null -e inject=SYSCALL:signal=KILL:when=N ./crash_step MODE NAME

which SIGKILLs it on entry to the N-th SYSCALL (before the call runs), and what it left behind is
checked:

* ``create``: a killed creator leaves no name, or a complete, unheld segment that ``zcbuf.open``
  opens (1 MiB, all zero or the full pattern); ``gc`` removes it; a create of the name replaces
  it; no other file appears in /dev/shm.
* ``create_over_leftover``: the same, for a create that first has to replace a segment left by a
  killed creator (``crash_step leave``).
* ``close_while_held``: a killed opener/closer while this process holds the segment: the name
  stays and opens (no dead holder is left); when this process frees it, the name goes.
* ``close_last_holder``: the killed closer was the last holder (this process freed its handle
  after the closer said "ready"): the name is gone, or present, openable and unheld (then ``gc``
  removes it and a create replaces it) -- never an unremovable, unopenable name.

``test_pthread_exit_holder`` checks that a process whose main thread called ``pthread_exit`` (a
zombie main thread in /proc) still counts as a holder.

Other test runs on this machine may call ``zcbuf.gc()`` at any time, which removes any unheld
segment, ours included: checks of unheld leftovers accept "gone" as well. Nothing else touches
names with our prefix.
"""

from __future__ import annotations

import gc as _pygc
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

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


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> Native:
    if not (LIB_DIR / "libzcbuf.so").exists():
        if shutil.which("cargo") is None:
            pytest.skip("target/release/libzcbuf.so is missing and cargo is not installed")
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True, timeout=1800)
    out = tmp_path_factory.mktemp("crash_matrix")
    bins = {}
    for prog, extra in (("crash_step", []), ("pthread_exit_holder", ["-pthread"])):
        exe = out / prog
        cmd = ["gcc", "-std=c11", "-Wall", "-Wextra", "-Werror", *extra, f"-I{ROOT / 'include'}",
               str(C_DIR / f"{prog}.c"), f"-L{LIB_DIR}", "-lzcbuf", "-o", str(exe)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, f"{shlex.join(cmd)} failed:\n{p.stderr}"
        bins[prog] = str(exe)
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        [str(LIB_DIR)] + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else [])
    )
    probe = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "true"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here (ptrace not permitted?): {probe.stderr.strip()}")
    return Native(bins["crash_step"], bins["pthread_exit_holder"], env)


# ---------------------------------------------------------------------------------------------
# /dev/shm helpers


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


def drop(*bufs: Optional[zcbuf.Buffer]) -> None:
    for b in bufs:
        if b is not None:
            b.free()
    _pygc.collect()  # nothing of ours may keep a mapping (and with it the hold) alive


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


# ---------------------------------------------------------------------------------------------
# Scenarios: how to run one step, dry or with a kill


@dataclass
class Outcome:
    rc: int
    ready: bool = True  # close_last_holder: the closer said "ready" before it died
    held_by_us: Optional[zcbuf.Buffer] = None  # close_while_held: our handle, still open
    stderr: str = ""


def _strace(native: Native, strace_args: List[str], mode: str, name: str) -> List[str]:
    return ["strace", "-f", "-qq", *strace_args, native.crash_step, mode, name]


def run_create(native: Native, name: str, strace_args: List[str]) -> Outcome:
    p = subprocess.run(_strace(native, strace_args, "create", name), env=native.env,
                       capture_output=True, text=True, timeout=60)
    return Outcome(p.returncode, stderr=p.stderr)


def run_create_over_leftover(native: Native, name: str, strace_args: List[str]) -> Outcome:
    p = subprocess.run([native.crash_step, "leave", name], env=native.env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == KILLED, f"crash_step leave {name}: rc {p.returncode} {p.stderr}"
    return run_create(native, name, strace_args)


def run_close_while_held(native: Native, name: str, strace_args: List[str]) -> Outcome:
    b = make_patterned(name)
    try:
        p = subprocess.run(_strace(native, strace_args, "open_free", name), env=native.env,
                           capture_output=True, text=True, timeout=60)
    except BaseException:
        drop(b)
        raise
    return Outcome(p.returncode, held_by_us=b, stderr=p.stderr)


def run_close_last_holder(native: Native, name: str, strace_args: List[str]) -> Outcome:
    b: Optional[zcbuf.Buffer] = make_patterned(name)
    p = subprocess.Popen(_strace(native, strace_args, "open_wait_free", name), env=native.env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready = read_line(p) == "ready\n"
        if ready:
            drop(b)  # the closer is now the last holder
            b = None
            if not exists(name):
                # Correct only if the closer died before our free (a kill at its read of stdin,
                # right after "ready"): then we were the last holder.
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    raise AssertionError(f"{name}: removed while the closer still held it")
                ready = False
            else:
                try:
                    p.stdin.write(b"go\n")
                    p.stdin.close()
                except BrokenPipeError:
                    pass  # it died (was killed) meanwhile
        rc = p.wait(timeout=60)
        err = p.stderr.read().decode()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        for f in (p.stdin, p.stdout, p.stderr):
            if f and not f.closed:
                f.close()
        if b is not None:
            drop(b)  # it died while opening: we were, and now stop being, the last holder
    return Outcome(rc, ready=ready, stderr=err)


RUNNERS: Dict[str, Callable[[Native, str, List[str]], Outcome]] = {
    "create": run_create,
    "create_over_leftover": run_create_over_leftover,
    "close_while_held": run_close_while_held,
    "close_last_holder": run_close_last_holder,
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
# Dry runs

_LINE = re.compile(r"^(?:\[pid\s+\d+\]\s+|\d+\s+)?([a-z_][a-z0-9_]*)\(")


@dataclass
class Step:
    syscall: str
    n: int  # this is the n-th call of `syscall` since the program started (strace's when=N)
    line: str
    name_exists: bool  # whether the step's name exists when this call is entered


@dataclass
class DryRun:
    scenario: str
    steps: List[Step] = field(default_factory=list)

    def of(self, syscall: str) -> List[Step]:
        if syscall == "other":
            return [s for s in self.steps if s.syscall not in PATH_SYSCALLS_SET[self.scenario]]
        return [s for s in self.steps if s.syscall == syscall]


PATH_SYSCALLS_SET = {k: set(v) for k, v in PATH_SYSCALLS.items()}


def parse_trace(text: str, name: str, initial: bool) -> List[Step]:
    calls: List[Tuple[str, int, str]] = []
    counts: Dict[str, int] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        sc = m.group(1)
        counts[sc] = counts.get(sc, 0) + 1
        calls.append((sc, counts[sc], line))
    marks = [i for i, c in enumerate(calls) if c[0] == "getppid"]
    assert len(marks) == 2, f"expected two getppid markers in the dry run:\n{text}"
    steps = []
    present = initial
    quoted = f'"{name}"'
    for sc, n, line in calls[marks[0] + 1: marks[1]]:
        steps.append(Step(sc, n, line, present))
        ok = re.search(r"\)\s+=\s+0\s*$", line) is not None
        if ok and quoted in line and sc in ("linkat", "link", "renameat", "renameat2"):
            present = True
        elif ok and quoted in line and sc in ("unlinkat", "unlink"):
            present = False
    return steps


_dry: Dict[str, DryRun] = {}


def dry_run(native: Native, scenario: str, tmp_path_factory) -> DryRun:
    if scenario not in _dry:
        trace = tmp_path_factory.mktemp("dry") / f"{scenario}.trace"
        name = fresh_name(f"dry-{scenario}")
        out = RUNNERS[scenario](native, name, ["-o", str(trace)])
        try:
            assert out.rc == 0, f"dry run of {scenario} failed (rc {out.rc}): {out.stderr}"
        finally:
            drop(out.held_by_us)
        assert not exists(name), f"dry run of {scenario} left {name} behind"
        text = trace.read_text()
        d = DryRun(scenario, parse_trace(text, name, INITIAL[scenario]))
        assert d.steps, f"no system calls between the markers:\n{text}"
        _dry[scenario] = d
    return _dry[scenario]


# ---------------------------------------------------------------------------------------------
# Checks of what a killed step left


def data_ok_create(a: np.ndarray) -> bool:
    # Killed before the pattern was written: zeros; after: the pattern (writing it makes no
    # system call, so no kill lands in the middle of it).
    return bool((a == 0).all() or (a == PATTERN).all())


def data_ok_pattern(a: np.ndarray) -> bool:
    return bool((a == PATTERN).all())


def fresh_create_then_gone(name: str) -> None:
    """A create of ``name`` succeeds (replacing any unheld leftover) and gives a fresh, zeroed
    segment; freeing it removes the name."""
    try:
        b = zcbuf.create(MIB, name=name)
    except zcbuf.Error as e:
        raise AssertionError(f"create of {name} after the kill: {type(e).__name__}: {e}") from None
    try:
        a = b.asarray()
        assert a.nbytes == MIB and not a.any(), f"create of {name} did not give a fresh segment"
        del a
    finally:
        drop(b)
    assert not exists(name), f"{name} still exists after its only holder freed it"


def check_leftover(name: str, method: str, data_ok: Callable[[np.ndarray], bool]) -> bool:
    """``name`` was left by a killed process and nobody holds it. Returns whether it existed.

    method "open": zcbuf.open gives a 1 MiB segment with good data; freeing it (we are the last
    holder) removes the name. "gc": zcbuf.gc() removes it. "replace": a create replaces it.
    Then a create of the name succeeds in every case.
    """
    if not exists(name):
        fresh_create_then_gone(name)
        return False
    seg = segment(name)
    if seg is not None:  # else removed meanwhile by someone's gc
        assert seg.problem == "" and seg.nbytes == MIB and not seg.persistent, f"ls: {seg}"
        assert not seg.held and not seg.holders, f"{name}: a dead process still holds it: {seg}"
    if method == "open":
        try:
            b = zcbuf.open(name)
        except zcbuf.NotFoundError:
            assert not exists(name), f"open of {name} says not found while the name exists"
        except zcbuf.Error as e:
            raise AssertionError(f"open of leftover {name}: {type(e).__name__}: {e}") from None
        else:
            try:
                a = b.asarray()
                assert b.nbytes == MIB and a.nbytes == MIB, f"{name}: {b.nbytes} bytes"
                assert data_ok(a), f"{name}: unexpected data {a[:8]}..."
                del a
            finally:
                drop(b)
            assert not exists(name), f"{name}: still there after its last holder (us) freed it"
    elif method == "gc":
        try:
            removed = zcbuf.gc()
        except zcbuf.Error as e:
            raise AssertionError(f"gc with leftover {name}: {type(e).__name__}: {e}") from None
        assert not exists(name), f"gc did not remove unheld leftover {name} (removed {removed})"
    elif method == "replace":
        pass  # fresh_create_then_gone below replaces it
    else:
        raise ValueError(method)
    fresh_create_then_gone(name)
    return True


def command(native: Native, scenario: str, syscall: str, n: int, name: str) -> str:
    mode = {"create": "create", "create_over_leftover": "create",
            "close_while_held": "open_free", "close_last_holder": "open_wait_free"}[scenario]
    env = f"LD_LIBRARY_PATH={LIB_DIR}"
    return (f"{env} strace -f -qq -o /dev/null -e inject={syscall}:signal=KILL:when={n} "
            f"{native.crash_step} {mode} {name}")


def kill_once(native: Native, scenario: str, step: Step, method: str) -> Tuple[bool, str]:
    """Kill the step at ``step`` once and check what is left. Returns (leftover seen, name)."""
    name = fresh_name(f"{scenario[:9]}-{step.syscall}-{step.n}")
    args = ["-o", "/dev/null", "-e", f"inject={step.syscall}:signal=KILL:when={step.n}"]
    out = RUNNERS[scenario](native, name, args)
    try:
        cmd = command(native, scenario, step.syscall, step.n, name)
        assert out.rc == KILLED, (
            f"not killed (rc {out.rc}): the step no longer makes call {step.n} of "
            f"{step.syscall}? {out.stderr.strip()}"
        )
        stray = [n for n in ours() if n != name]
        assert not stray, f"stray files in /dev/shm: {stray}"
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
                assert set(seg.holders) <= {os.getpid()}, f"a dead holder is listed: {seg}"
            finally:
                drop(b2)
            assert exists(name), f"{name} removed while our first handle still holds it"
            out.held_by_us = None
            drop(b)
            assert not exists(name), f"{name} left after its last holder (us) freed it"
            return False, name
        if scenario == "close_last_holder" and not out.ready:
            # Killed while opening; we freed our handle after it died: we were the last holder.
            assert not exists(name), f"{name} left after the last live holder (us) freed it"
            return False, name
        if not step.name_exists:
            assert not exists(name), f"{name} exists, though the kill came before it was named"
            fresh_create_then_gone(name)
            return False, name
        data_ok = data_ok_pattern if scenario == "close_last_holder" else data_ok_create
        return check_leftover(name, method, data_ok), name
    except AssertionError as e:
        raise AssertionError(f"{scenario}: {cmd}\n    killed before: {step.line}\n    {e}") from None
    finally:
        drop(out.held_by_us)


def run_matrix(native: Native, scenario: str, syscall: str, tmp_path_factory) -> None:
    d = dry_run(native, scenario, tmp_path_factory)
    steps = d.of(syscall)
    if not steps:
        pytest.skip(f"the {scenario} step makes no {syscall} call now")
    failures = []
    for step in steps:
        for method in ("open", "gc", "replace"):
            # A create over a leftover can race another run's gc removing the leftover first
            # (the step then takes another path): one retry tells that from a real failure.
            tries = 2 if scenario == "create_over_leftover" else 1
            for attempt in range(tries):
                try:
                    leftover, _ = kill_once(native, scenario, step, method)
                    break
                except AssertionError as e:
                    unlink_ours()
                    if attempt + 1 == tries:
                        failures.append(f"[{method}] {e}")
                        leftover = False
            if not leftover:
                break  # nothing was left to open, gc or replace: one run is enough
    assert not failures, f"{len(failures)} kill point(s) failed:\n" + "\n".join(failures)


MATRIX = [(sc, s) for sc, calls in PATH_SYSCALLS.items() for s in [*calls, "other"]]


@pytest.mark.parametrize("scenario,syscall", MATRIX, ids=[f"{a}-{b}" for a, b in MATRIX])
def test_crash_matrix(native, scenario, syscall, tmp_path_factory):
    run_matrix(native, scenario, syscall, tmp_path_factory)


def test_dry_runs_cover_the_paths(native, tmp_path_factory):
    """The paths make the calls the matrix names (a call zcbuf stops making is noticed here)."""
    for scenario, calls in PATH_SYSCALLS.items():
        made = {s.syscall for s in dry_run(native, scenario, tmp_path_factory).steps}
        missing = [c for c in calls if c not in made]
        assert not missing, f"{scenario}: no {missing} calls any more; update PATH_SYSCALLS"


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
    p = subprocess.Popen([native.pthread_exit_holder, name], env=native.env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
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

        p.stdin.write(b"go\n")
        p.stdin.close()
        rc = p.wait(timeout=60)
        assert rc == 0, f"pthread_exit_holder rc {rc}: {p.stderr.read().decode()}"
        assert not exists(name), "the name stayed after its last holder freed it and exited"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        for f in (p.stdin, p.stdout, p.stderr):
            if f and not f.closed:
                f.close()
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
    assert r.returncode == KILLED
    if exists(name):  # (unless another run's gc got it first)
        b = zcbuf.open(name)
        try:
            assert data_ok_pattern(b.asarray())
        finally:
            drop(b)
    assert not exists(name)
    b = make_patterned(name)
    h = subprocess.Popen([native.crash_step, "hold", name], env=native.env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert read_line(h) == "ready\n"
        drop(b)
        b = None
        assert exists(name)
        r = subprocess.run([native.crash_step, "open_free", name], env=native.env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        h.stdin.write(b"\n")
        h.stdin.close()
        assert h.wait(timeout=60) == 0, h.stderr.read().decode()
        assert not exists(name)
    finally:
        if h.poll() is None:
            h.kill()
            h.wait()
        for f in (h.stdin, h.stdout, h.stderr):
            if f and not f.closed:
                f.close()
        drop(b)
