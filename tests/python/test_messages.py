"""Error messages say each thing once: their kind at most once, their subject exactly once.

One test per kind of error Python can provoke. Each asserts the exception class, and that the
message (``str(e)``, what users read) repeats neither its kind, nor its subject (the path, name
or id), nor any run of three words.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from typing import Callable, List, Type

import numpy as np
import pytest

import zcbuf

#: the kind each class stands for, in the words the C library uses for it
KINDS = {
    zcbuf.NotFoundError: "not found",
    zcbuf.AlreadyExistsError: "already exists",
    zcbuf.InvalidArgumentError: "invalid argument",
    zcbuf.ReadOnlyError: "read-only",
    zcbuf.CorruptError: "corrupt",
    zcbuf.PermissionDeniedError: "permission denied",
    zcbuf.OutOfMemoryError: "out of memory",
}


def repeated_runs(msg: str, n: int = 3) -> List[str]:
    """Runs of ``n`` words that occur more than once in ``msg`` (case and punctuation ignored)."""
    words = re.findall(r"[\w./-]+", msg.lower())
    seen: set = set()
    again = []
    for i in range(len(words) - n + 1):
        run = " ".join(words[i : i + n])
        if run in seen:
            again.append(run)
        seen.add(run)
    return again


def says_once(msg: str, cls: Type[Exception], subject: str) -> None:
    """The assertions every message must pass."""
    low = msg.lower()
    for kind in KINDS.values():
        assert low.count(kind) <= 1, f"{kind!r} said twice: {msg}"
    assert msg.count(subject) == 1, f"{subject!r} not said exactly once: {msg}"
    assert not repeated_runs(msg), f"repeats {repeated_runs(msg)}: {msg}"
    assert msg.strip(), "empty message"


def raised(fn: Callable[[], object], cls: Type[Exception], subject: str) -> str:
    with pytest.raises(cls) as info:
        fn()
    msg = str(info.value)
    says_once(msg, cls, subject)
    return msg


def test_the_checker_catches_repetition() -> None:
    """The helper itself: the messages of issue #9 would fail it."""
    with pytest.raises(AssertionError):
        says_once("already exists: w.zcbuf already exists", zcbuf.AlreadyExistsError, "w.zcbuf")
    with pytest.raises(AssertionError):
        says_once("not found: not found: buffer 7", zcbuf.NotFoundError, "buffer 7")
    with pytest.raises(AssertionError):
        says_once("open w.zcbuf: open w.zcbuf failed", zcbuf.NotFoundError, "x")
    says_once("w.zcbuf already exists: open it", zcbuf.AlreadyExistsError, "w.zcbuf")


def test_already_exists(tmp_path) -> None:
    path = str(tmp_path / "weights.zcbuf")
    zcbuf.empty((4,), np.uint8, path=path).free()
    msg = raised(lambda: zcbuf.empty((4,), np.uint8, path=path), zcbuf.AlreadyExistsError, "weights.zcbuf")
    assert "already exists" in msg


def test_already_exists_shared() -> None:
    name = f"benchfix-msg-{os.getpid()}"
    b = zcbuf.empty((4,), np.uint8, name=name)
    try:
        raised(lambda: zcbuf.empty((4,), np.uint8, name=name), zcbuf.AlreadyExistsError, name)
    finally:
        b.free()  # the last holder: the name goes with it


def test_not_found(tmp_path) -> None:
    raised(lambda: zcbuf.open_file(str(tmp_path / "missing.zcbuf")), zcbuf.NotFoundError, "missing.zcbuf")
    raised(lambda: zcbuf.open("benchfix-msg-missing"), zcbuf.NotFoundError, "benchfix-msg-missing")
    raised(lambda: zcbuf.get(987654321), zcbuf.NotFoundError, "987654321")
    b = zcbuf.empty((4,), np.uint8)
    b.free()
    raised(b.asarray, zcbuf.NotFoundError, str(b.id))


def test_invalid_argument(tmp_path) -> None:
    raised(lambda: zcbuf.empty((4,), np.uint8, name="benchfix/bad"), zcbuf.InvalidArgumentError, "benchfix/bad")
    raised(lambda: zcbuf.open_file(str(tmp_path)), zcbuf.InvalidArgumentError, str(tmp_path))
    raised(lambda: zcbuf.empty((-1, 4), np.uint8), zcbuf.InvalidArgumentError, "(-1, 4)")


def test_corrupt_header(tmp_path) -> None:
    junk = tmp_path / "junk.zcbuf"
    junk.write_bytes(b"Z" * 8192)
    raised(lambda: zcbuf.open_file(str(junk)), zcbuf.CorruptError, "junk.zcbuf")


def test_out_of_space(tmp_path) -> None:
    msg = raised(
        lambda: zcbuf.empty((1 << 40,), np.uint8, path=str(tmp_path / "huge.zcbuf")),
        zcbuf.OutOfMemoryError,
        "huge.zcbuf",
    )
    assert " free; 1.0 TiB requested" in msg, msg


def _run(code: str, *, as_nobody: bool = False, wrap: str = "") -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter (as uid 65534 when asked), inside ``wrap`` if given."""
    code = textwrap.dedent(code)
    if as_nobody:  # after the imports: the interpreter may live where uid 65534 cannot read
        code = code.replace("# then\n", "import os\nos.setgid(65534)\nos.setuid(65534)\n")
    argv = [sys.executable, "-c", code]
    if wrap:
        argv = ["unshare", "-m", "sh", "-c", wrap + ' && exec "$@"', "sh", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


REPORT = """
import sys, zcbuf
# then
try:
    {call}
except zcbuf.Error as e:
    print(type(e).__name__)
    print(e)
    sys.exit(0)
sys.exit("no error")
"""


def test_permission() -> None:
    """Another user's 0600 segment: PermissionDeniedError, said once (as uid 65534 if root)."""
    root = os.geteuid() == 0
    name = f"benchfix-msg-perm-{os.getpid()}"
    b = zcbuf.empty((4,), np.uint8, name=name)
    try:
        if not root:  # our own segment: make it unreadable to ourselves
            os.chmod(f"/dev/shm/{name}", 0)
        p = _run(REPORT.format(call=f"zcbuf.open({name!r})"), as_nobody=root)
        assert p.returncode == 0, p.stderr
        cls, msg = p.stdout.splitlines()[:2]
        assert cls == "PermissionDeniedError", p.stdout
        says_once(msg, zcbuf.PermissionDeniedError, name)
    finally:
        b.free()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_read_only(tmp_path) -> None:
    """Creating a file on a read-only mount: ReadOnlyError, said once."""
    ro = tmp_path / "ro"
    ro.mkdir()
    target = str(ro / "weights.zcbuf")
    p = _run(
        REPORT.format(call=f"zcbuf.create(16, path={target!r})"),
        wrap=f"mount -t tmpfs -o ro tmpfs '{ro}'",
    )
    assert p.returncode == 0, p.stderr
    cls, msg = p.stdout.splitlines()[:2]
    assert cls == "ReadOnlyError", p.stdout
    says_once(msg, zcbuf.ReadOnlyError, "weights.zcbuf")
