"""The Rust face's examples, run end to end so they cannot rot.

* ``examples/rust_producer.rs`` + ``examples/python_consumer.py``: a typed shared buffer made in
  Rust, opened in Python by name, values checked both ways.
* ``examples/rust_pair.rs``: two Rust processes writing the same pages while both run.

The examples are built once per session with ``cargo build --release --examples`` unless the
binaries in target/release/examples are newer than every Rust source. Names start with
``rustface-``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "target" / "release" / "examples"
SOURCES = [ROOT / "Cargo.toml", *(ROOT / "src").rglob("*.rs"), *(ROOT / "examples").glob("*.rs")]


def shm_exists(name: str) -> bool:
    return os.path.exists(f"/dev/shm/{name}")


@pytest.fixture(scope="session")
def examples() -> Path:
    bins = [EXAMPLES / "rust_producer", EXAMPLES / "rust_pair"]
    newest = max(p.stat().st_mtime for p in SOURCES)
    if all(b.exists() and b.stat().st_mtime >= newest for b in bins):
        return EXAMPLES
    if shutil.which("cargo") is None:
        pytest.skip("cargo is not installed and the examples are not built")
    subprocess.run(
        ["cargo", "build", "--release", "--examples", "--quiet"], cwd=ROOT, check=True, timeout=1800
    )
    return EXAMPLES


@pytest.fixture
def name(request):
    n = f"rustface-pytest-{os.getpid()}-{request.node.name[:40]}"
    yield n
    if shm_exists(n):  # only after a failure: remove what a killed example left
        os.unlink(f"/dev/shm/{n}")


def test_rust_producer_python_consumer(examples: Path, name: str) -> None:
    producer = subprocess.Popen(
        [str(examples / "rust_producer"), name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready = producer.stdout.readline().split()
        assert ready[:2] == ["ready", name], ready
        rows, cols = int(ready[2]), int(ready[3])
        assert shm_exists(name)

        consumer = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "python_consumer.py"), name],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert consumer.returncode == 0, consumer.stderr
        # Rust -> Python: typed from the header, every value checked, the array maps the segment.
        assert f"consumer ok shape={rows}x{cols} dtype=float32 mappings=1" in consumer.stdout
        assert shm_exists(name), "the producer still holds it"

        # Python -> Rust: the producer checks the row the consumer negated in place.
        out, err = producer.communicate("checked\n", timeout=120)
        assert producer.returncode == 0, err
        last_row = [((rows - 1) * cols + k) * 0.25 for k in range(cols)]
        assert f"verified last row negated by the consumer, sum {-sum(last_row):g}" in out, out
    finally:
        if producer.poll() is None:
            producer.kill()
            producer.wait()
    assert not shm_exists(name), "both processes are gone: the name must be removed"


def test_python_sees_producer_writes_without_copy(examples: Path, name: str) -> None:
    """This process opens the producer's buffer: a NumPy view of the same pages, typed."""
    import numpy as np

    import zcbuf

    producer = subprocess.Popen(
        [str(examples / "rust_producer"), name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert producer.stdout.readline().split()[:2] == ["ready", name]
        buf = zcbuf.open(name)
        a = buf.asarray()
        assert a.dtype == np.float32 and a.shape == (48, 64)
        assert a[10, 3] == (10 * 64 + 3) * 0.25
        with open("/proc/self/maps") as f:
            assert any(line.rstrip().endswith(f"/dev/shm/{name}") for line in f)
        a[-1] *= -1
        buf.free()  # retires the id; the array still maps the pages
        assert a[0, 1] == 0.25
        del a, buf  # last view gone: this process unmaps and stops holding the segment
        out, err = producer.communicate("\n", timeout=120)
        assert producer.returncode == 0, err
        assert "verified" in out
    finally:
        if producer.poll() is None:
            producer.kill()
            producer.wait()
    assert not shm_exists(name)


def test_rust_pair(examples: Path, name: str) -> None:
    p = subprocess.run(
        [str(examples / "rust_pair"), name], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    assert f"created {name}" in p.stdout
    # The child read the token the parent wrote after the child had mapped the segment...
    assert "saw the parent's token 0x5eedcafe" in p.stderr
    # ...and the parent read the child's reply and second half.
    assert "pair ok: parent saw the child's reply 0x5eedcaff and its 2048 elements" in p.stdout
    assert not shm_exists(name), "both processes are gone: the name must be removed"


def test_rust_producer_fails_when_nobody_writes_back(examples: Path, name: str) -> None:
    """The producer really checks: without the consumer, its check fails."""
    p = subprocess.run(
        [str(examples / "rust_producer"), name],
        input="\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode != 0
    assert "last row is" in p.stderr
    assert not shm_exists(name)
