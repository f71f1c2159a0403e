"""Regressions found by the adversarial review of kernel-held liveness, each reproduced first."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import zcbuf
from zcbuf._native import ffi, lib
from conftest import run_py

PREFIX = f"zcbuf-rv-{os.getpid()}-"


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIB = os.path.join(ROOT, "target", "release")


def build_c(source: str, tmp_path) -> str:
    """Compile tests/c/SOURCE against the release library (built if missing); its path."""
    if not os.path.exists(os.path.join(LIB, "libzcbuf.so")):
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    exe = str(tmp_path / source.replace(".c", ""))
    subprocess.run(["gcc", "-std=c11", "-O1", "-Wall", "-Wextra", "-Werror", "-pthread",
                    f"-I{ROOT}/include", os.path.join(ROOT, "tests", "c", source),
                    f"-L{LIB}", "-lzcbuf", "-o", exe], check=True)
    return exe


def exists(name: str) -> bool:
    return os.path.exists(f"/dev/shm/{name}")


def holders_of(name: str):
    for s in zcbuf.ls():
        if s.name == name:
            return set(s.holders)
    return None


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_an_open_that_fails_after_its_hold_still_lets_the_name_go():
    """The opener holds for a moment, then its mapping is refused (RLIMIT_AS) while the last real
    holder leaves: the failed opener must run the close protocol, not leave the name behind."""
    name = PREFIX + "failopen"
    buf = zcbuf.create(1 << 36, name=name, reserve=False)  # 64 GiB sparse
    opener = textwrap.dedent(
        """
        import resource, sys, zcbuf
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
        try:
            zcbuf.open(sys.argv[1])
        except zcbuf.OutOfMemoryError:
            print("refused", flush=True)
        """
    )
    # The opener's flock returns 1.5 s late: it holds its shared lock, not yet mapped.
    o = subprocess.Popen(
        ["strace", "-qq", "-o", "/dev/null", "-e", "inject=flock:delay_exit=1500000",
         sys.executable, "-c", opener, name],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.time() + 20
        while time.time() < deadline and len(holders_of(name) or ()) < 2:
            time.sleep(0.02)
        assert len(holders_of(name)) == 2, "the opener never took its hold"
        buf.free()
        del buf  # the Buffer object keeps its mapping (our hold) while it lives
        assert exists(name), "the opener holds it"
        assert o.communicate(timeout=30)[0].split() == ["refused"]
        assert not exists(name), "every mapper is gone: the name must be too"
    finally:
        o.kill()
        if exists(name):
            zcbuf.unlink(name)


@pytest.mark.parametrize(
    "text,itemsize,shape",
    [(b"|O", 8, (4,)), (b"2<f8", 16, (3,)), (b"[('a', '|O')]", 8, (2,))],
)
def test_a_dtype_numpy_cannot_build_is_corrupt_and_leaks_nothing(text, itemsize, shape):
    """A C producer stores a dtype NumPy parses but cannot make an array of: the opener gets
    CorruptError and holds nothing, even while it keeps the exception."""
    name = PREFIX + "dtype"
    out = ffi.new("uint64_t *")
    dims = ffi.new("uint64_t[]", list(shape))
    n = itemsize
    for d in shape:
        n *= d
    assert lib.zcbuf_create_ex(lib.ZCBUF_KIND_SHARED, name.encode(), n, text, itemsize, dims,
                               len(shape), 0, out) == 0
    try:
        code = """
            import gc, os, sys, zcbuf
            from zcbuf._native import lib
            try:
                zcbuf.open(sys.argv[1])
            except zcbuf.CorruptError as e:
                err = e                       # kept, as logging or a retry loop would
            gc.collect()
            held = [os.getpid() in s.holders for s in zcbuf.ls() if s.name == sys.argv[1]]
            maps = sum(sys.argv[1] in line for line in open("/proc/self/maps"))
            print(type(err).__name__, held, maps)
        """
        assert run_py(code, name).split() == ["CorruptError", "[False]", "0"]
    finally:
        lib.zcbuf_free(out[0])
    assert not exists(name)


def test_running_out_of_descriptors_is_not_remembered():
    """EMFILE on the very first zcbuf call (opening /dev/shm itself) must not stick."""
    code = f"""
        import os, resource, zcbuf
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        fds = []
        try:
            while True:
                fds.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        try:
            zcbuf.create(4096, name="{PREFIX}emfile")
        except zcbuf.OutOfMemoryError as e:
            assert "RLIMIT_NOFILE" in str(e), e
            print("refused")
        for fd in fds:
            os.close(fd)
        b = zcbuf.create(4096, name="{PREFIX}emfile")
        print(zcbuf.open(b.name).nbytes, len([s for s in zcbuf.ls() if s.name == b.name]))
        b.free()
    """
    assert run_py(code).split() == ["refused", "4096", "1"]


def test_fork_while_other_threads_open_and_free_never_hangs_the_child():
    name = PREFIX + "forklock"
    keep = zcbuf.create(4096, name=name)
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            zcbuf.open(name).free()

    threads = [threading.Thread(target=churn, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    hung = 0
    try:
        for _ in range(400):
            pid = os.fork()
            if pid == 0:
                signal.alarm(5)  # a hung child dies of SIGALRM
                zcbuf.open(name).free()
                os._exit(0)
            _, st = os.waitpid(pid, 0)
            if os.WIFSIGNALED(st):
                hung += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
        keep.free()
    assert hung == 0, f"{hung} of 400 fork children hung in their first zcbuf call"


@pytest.mark.parametrize("bad", ["a\tb", "a\nb", "x\x7f", "line\r"])
def test_names_with_control_characters_are_refused(bad):
    with pytest.raises(zcbuf.InvalidArgumentError, match="control character"):
        zcbuf.create(64, name=bad)


def test_unlink_removes_what_was_planted_under_a_name():
    name = PREFIX + "planted"
    os.symlink("/nonexistent", f"/dev/shm/{name}")
    zcbuf.unlink(name)
    assert not os.path.lexists(f"/dev/shm/{name}")
    with pytest.raises(zcbuf.NotFoundError):
        zcbuf.unlink(name)


def test_ls_never_takes_the_exclusive_lock():
    """ls must not make a concurrent last holder leave its name behind: it reads /proc/locks."""
    name = PREFIX + "lsrace"
    stop = threading.Event()

    def lister():
        while not stop.is_set():
            zcbuf.ls()

    t = threading.Thread(target=lister, daemon=True)
    t.start()
    left = 0
    try:
        for i in range(300):
            n = f"{name}-{i}"
            # create + free in this process, racing the lister
            b = zcbuf.create(4096, name=n)
            b.free()
            del b  # the Buffer object keeps its mapping (our hold) while it lives
            if exists(n):
                left += 1
                zcbuf.unlink(n)
    finally:
        stop.set()
        t.join()
    assert left == 0, f"{left} of 300 names outlived their last holder while ls ran"


def _wait_then_exit(ev):
    ev.wait(30)


@pytest.mark.parametrize("method", ["fork", "pool"])
def test_fork_workers_that_exit_without_cleanup_do_not_leak_the_name(method):
    """multiprocessing fork workers end with os._exit: the last of them to hold a segment (the
    parent freed first) cannot remove its name. The parent, which left it while they held it,
    removes it on its next look (ls, gc, a create or open after 100 ms, or its exit)."""
    import multiprocessing as mp

    name = PREFIX + "forkexit-" + method
    buf = zcbuf.create(4096, name=name)
    ctx = mp.get_context("fork")
    if method == "fork":
        ev = ctx.Event()
        p = ctx.Process(target=_wait_then_exit, args=(ev,))
        p.start()
        buf.free()
        del buf
        assert exists(name), "the child maps it (inherited)"
        ev.set()
        p.join(30)
    else:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(2, mp_context=ctx) as pool:
            assert list(pool.map(abs, [-1, -2])) == [1, 2]
            buf.free()
            del buf
            assert exists(name)
    assert name not in [s.name for s in zcbuf.ls()], "ls looks again and removes it"
    assert not exists(name)


def test_a_parent_that_exits_normally_removes_what_its_fork_workers_left(tmp_path):
    code = f"""
        import multiprocessing as mp, zcbuf
        def child(ev):
            ev.wait(30)
        if __name__ == "__main__":
            b = zcbuf.create(4096, name="{PREFIX}exit")
            ev = mp.get_context("fork").Event()
            p = mp.get_context("fork").Process(target=child, args=(ev,))
            p.start()
            b.free()
            ev.set()
            p.join()
            print("joined")
    """
    path = tmp_path / "parent.py"
    path.write_text(textwrap.dedent(code))
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["joined"], out.stderr
    assert not exists(PREFIX + "exit"), "the parent's exit looks again and removes it"


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_an_open_racing_the_last_free_of_a_pre_fork_hold_never_deadlocks(tmp_path):
    exe = build_c("adopt_race.c", tmp_path)
    p = subprocess.run([exe, PREFIX + "adopt", "4000"], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, LD_LIBRARY_PATH=LIB))
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_a_call_during_thread_teardown_returns_its_status(tmp_path):
    """zcbuf_release/zcbuf_free from a pthread-key destructor (after Rust's thread-locals are
    gone) used to abort the process."""
    exe = build_c("tls_teardown.c", tmp_path)
    p = subprocess.run([exe], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, LD_LIBRARY_PATH=LIB))
    assert (p.returncode, p.stdout.strip()) == (0, "0"), p.stderr[-2000:]


def test_exceptions_say_each_thing_once_and_show_as_zcbuf():
    with pytest.raises(zcbuf.NotFoundError) as e:
        zcbuf.open(PREFIX + "missing")
    assert type(e.value).__module__ == "zcbuf"
    assert repr(e.value).startswith("NotFoundError(") and "zcbuf.NotFoundError" in str(e.type)
    assert not str(e.value).startswith("not found"), str(e.value)


@pytest.mark.parametrize("cmd", ["ls", "gc"])
def test_cli_subcommand_help_prints_help_and_runs_nothing(cmd):
    name = PREFIX + "clihelp"
    # An unheld leftover: its only holder ends with os._exit, leaving the name.
    code = f"import os, zcbuf; b = zcbuf.create(64, name={name!r}); os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True)
    try:
        out = subprocess.run([sys.executable, "-m", "zcbuf", cmd, "--help"], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.startswith(f"usage: python -m zcbuf {cmd}")
        assert exists(name), f"'{cmd} --help' removed a segment"
    finally:
        if exists(name):
            zcbuf.unlink(name)
    v = subprocess.run([sys.executable, "-m", "zcbuf", "--version"], capture_output=True,
                       text=True, timeout=60)
    assert v.returncode == 0 and v.stdout.startswith("zcbuf ")


def test_every_exported_c_function_is_documented():
    import re
    header = open(os.path.join(ROOT, "include", "zcbuf.h")).read()
    doc = open(os.path.join(ROOT, "docs", "c-api.md")).read()
    names = sorted(set(re.findall(r"\b(zcbuf_[a-z_]+)\(", header)))
    assert names, "no exports found"
    missing = [n for n in names if n not in doc]
    assert not missing, f"not in docs/c-api.md: {missing}"
