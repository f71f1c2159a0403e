"""The channel examples, run against each other: Rust -> Python, Python -> Rust, and C -> C.

* ``examples/rust_publisher.rs`` publishes 480x640 uint8 frames (a counter and a pattern) and
  ``examples/python_subscriber.py`` receives and checks every one of them, in order, zero-copy.
* ``examples/python_publisher.py`` publishes 120x160 float32 messages (loan and send) and
  ``examples/rust_subscriber.rs`` receives and checks every one of them.
* ``examples/channel_c.c`` (compiled -std=c11 -Wall -Wextra -Werror) forks: the parent publishes,
  the child subscribes, both check.

Each run must leave nothing in /dev/shm. The Rust examples are built with ``cargo build --release
--examples`` when missing or older than the sources.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

import zcbuf  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
BIN = ROOT / "target" / "release" / "examples"
LIB_DIR = ROOT / "target" / "release"
PREFIX = f"chtest-ex-{os.getpid()}-"
ENV = dict(os.environ)
# Children import the zcbuf this test imported (the installed package, or a development tree
# on PYTHONPATH), never the source tree, which has no built native module.
ENV["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(zcbuf.__file__))] +
                                    ([ENV["PYTHONPATH"]] if ENV.get("PYTHONPATH") else []))
ENV["LD_LIBRARY_PATH"] = os.pathsep.join([str(LIB_DIR)] +
                                         ([ENV["LD_LIBRARY_PATH"]] if ENV.get("LD_LIBRARY_PATH") else []))


def ours() -> List[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(PREFIX))


@pytest.fixture(autouse=True)
def _nothing_left():
    yield
    left = ours()
    for n in left:
        os.unlink(f"/dev/shm/{n}")
    assert not left, f"left in /dev/shm: {left}"


def newest(paths) -> float:
    return max(p.stat().st_mtime for p in paths)


@pytest.fixture(scope="module")
def rust_examples() -> Path:
    exes = [BIN / "rust_publisher", BIN / "rust_subscriber"]
    sources = [*ROOT.joinpath("src").glob("*.rs"), EXAMPLES / "rust_publisher.rs",
               EXAMPLES / "rust_subscriber.rs", ROOT / "Cargo.toml"]
    if not all(e.exists() for e in exes) or min(e.stat().st_mtime for e in exes) < newest(sources):
        if shutil.which("cargo") is None:
            pytest.skip("cargo is not installed and the examples are not built")
        p = subprocess.run(["cargo", "build", "--release", "--examples", "--quiet"], cwd=ROOT,
                           capture_output=True, text=True, timeout=1800)
        assert p.returncode == 0, p.stderr
    return BIN


def start(cmd: List[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(p: subprocess.Popen, what: str) -> str:
    try:
        out, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"{what} hung:\n{out}\n{err}") from None
    assert p.returncode == 0, f"{what} failed ({p.returncode}):\n{out}\n{err}"
    return out.strip()


def test_rust_publisher_to_python_subscriber(rust_examples):
    name = f"{PREFIX}r2p"
    sub = start([sys.executable, str(EXAMPLES / "python_subscriber.py"), name, "120"])
    pub = start([str(rust_examples / "rust_publisher"), name, "120"])
    out_pub = finish(pub, "rust_publisher")
    out_sub = finish(sub, "python_subscriber")
    assert out_pub == f"publisher done frames=120 name={name}"
    assert out_sub.startswith("subscriber ok frames=120 shape=480x640 dtype=uint8 mappings="), out_sub
    assert out_sub.endswith("missed=0")
    assert int(out_sub.split("mappings=")[1].split()[0]) >= 1


def test_rust_publisher_to_two_python_subscribers(rust_examples):
    name = f"{PREFIX}r2pp"
    subs = [start([sys.executable, str(EXAMPLES / "python_subscriber.py"), name, "40"])
            for _ in range(2)]
    pub = start([str(rust_examples / "rust_publisher"), name, "40", "2"])
    assert finish(pub, "rust_publisher") == f"publisher done frames=40 name={name}"
    for s in subs:
        assert finish(s, "python_subscriber").startswith("subscriber ok frames=40 ")


def test_python_publisher_to_rust_subscriber(rust_examples):
    name = f"{PREFIX}p2r"
    sub = start([str(rust_examples / "rust_subscriber"), name, "60"])
    pub = start([sys.executable, str(EXAMPLES / "python_publisher.py"), name, "60"])
    assert finish(pub, "python_publisher") == f"publisher ok frames=60 name={name}"
    out = finish(sub, "rust_subscriber")
    # sum over i < 60 of (120 * 160 * i * 1000 + sum(0 .. 19199)), exact in f64
    want = sum(19200 * i * 1000 + 19199 * 19200 // 2 for i in range(60))
    assert out == f"rust subscriber ok frames=60 shape=120x160 dtype=<f4 sum={want}", out


def test_c_channel_example(tmp_path):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    if not (LIB_DIR / "libzcbuf.so").exists():
        pytest.skip("target/release/libzcbuf.so is not built")
    exe = tmp_path / "channel_c"
    cmd = ["gcc", "-std=c11", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'include'}",
           str(EXAMPLES / "channel_c.c"), f"-L{LIB_DIR}", "-lzcbuf", "-o", str(exe)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    name = f"{PREFIX}c"
    out = finish(start([str(exe), name, "5000"]), "channel_c")
    assert out == "c channel ok messages=5000"
