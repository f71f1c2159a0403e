"""``python -m zcbuf bench`` in a small /dev/shm, with bad sizes, interrupted, and with nothing
that fits: it sizes the run to its room, says what it skips in one line each, streams results,
and never ends with a traceback or without the results it measured.

The small /dev/shm is a tmpfs mounted over /dev/shm in a private mount namespace (as Docker's
default 64 MiB one); those tests need root and ``unshare``. Every test runs in a temporary
directory, so the bench's default ``bench-results/`` lands there. Nothing here asserts a timing.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

needs_ns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare (a private /dev/shm)"
)

#: runs "$@" with a tmpfs of $SHM_SIZE over /dev/shm, then says what is left in it
IN_SMALL_SHM = (
    'mount -t tmpfs -o size="$SHM_SIZE" tmpfs /dev/shm || exit 99; "$@" & pid=$!; echo "pid $pid" >&2; '
    'wait $pid; rc=$?; echo "shm-left: [$(ls -A /dev/shm | tr "\\n" " ")]" >&2; exit $rc'
)


def bench_argv(*args: str) -> List[str]:
    return [sys.executable, "-m", "zcbuf", "bench", "--no-progress", *args]


def in_small_shm(size: str, argv: List[str]) -> List[str]:
    return ["unshare", "-m", "sh", "-c", IN_SMALL_SHM.replace("$SHM_SIZE", size), "sh", *argv]


def skip_lines(stderr: str) -> "collections.Counter[tuple]":
    """(size, suite) -> how many lines said it was skipped."""
    return collections.Counter(re.findall(r"^skipped (\d+ [KMG]?i?B) in (\w+)", stderr, re.MULTILINE))


def shm_left(stderr: str) -> str:
    m = re.search(r"^shm-left: \[(.*)\]$", stderr, re.MULTILINE)
    assert m, stderr
    return m.group(1).strip()


@needs_ns
def test_docker_sized_dev_shm_runs_what_fits(tmp_path: Path) -> None:
    """64 MiB /dev/shm: 4 KiB runs everywhere; 64 MiB and 1 GiB skip between processes and the
    shared first-touch variants (one line each, naming the room), the private ones run."""
    argv = bench_argv("--sizes", "4KiB,64MiB,1GiB", "--reps", "3", "--suites", "interproc,touch", "--out", "out")
    argv.remove("--no-progress")  # stderr is a pipe: progress must come as plain lines
    p = subprocess.run(in_small_shm("64m", argv), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    # One line per (size, suite) left out, each saying how much room there was.
    skipped = skip_lines(p.stderr)
    assert all(c == 1 for c in skipped.values()), skipped
    assert ("64 MiB", "interproc") in skipped and ("1 GiB", "interproc") in skipped, p.stderr
    for line in p.stderr.splitlines():
        if line.startswith("skipped "):
            assert re.search(r"has \d+\.\d [KMG]iB free|is available", line), line
    assert ("4 KiB", "interproc") not in skipped
    assert "which has 64.0 MiB free" in p.stderr
    # Progress: plain lines naming each step, no carriage returns.
    assert "\r" not in p.stderr
    assert re.search(r"^\[\d+/\d+ \d+s\] between processes 4 KiB: attach$", p.stderr, re.MULTILINE), p.stderr
    # Results: tables for what ran, and the files.
    assert "## 2a. Between processes" in p.stdout and "## 3. First touch" in p.stdout
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (tmp_path / "out" / "results.csv").read_text().count("\n") == len(data["rows"]) + 1
    got = {(r["suite"], r["size"]) for r in data["rows"]}
    assert ("interproc", 4 * KiB) in got
    assert ("interproc", 64 * MiB) not in got and ("interproc", 1 * GiB) not in got
    shared_big = [r for r in data["rows"] if r["suite"] == "touch" and r["method"].startswith("shared")]
    assert all(r["size"] < 64 * MiB for r in shared_big), shared_big
    if ("64 MiB", "touch") in skipped:  # shared variants skipped: the private ones ran
        assert ("touch", 64 * MiB) in got
    assert sorted(data["meta"]["skipped"]) == sorted(line for line in p.stderr.splitlines() if line.startswith("skipped "))
    assert shm_left(p.stderr) == "", "the bench left segments in /dev/shm"


@needs_ns
def test_results_stream_and_sigterm_leaves_results_and_no_segments(tmp_path: Path) -> None:
    """Stdout a pipe: the first suite's table arrives while the second runs; SIGTERM then
    ends the run with the results so far written, no traceback, /dev/shm empty."""
    argv = bench_argv("--sizes", "4KiB,256MiB", "--reps", "3", "--suites", "inproc,interproc", "--out", "out")
    err = open(tmp_path / "stderr.txt", "w+")
    proc = subprocess.Popen(in_small_shm("1g", argv), cwd=tmp_path, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        seen = []
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("(ratios are to zcbuf asarray()"):
                break  # the in-process table is out; between processes runs now
        else:
            pytest.fail("no in-process table before the end:\n" + "".join(seen))
        err.flush()
        pid = int(re.search(r"^pid (\d+)$", (tmp_path / "stderr.txt").read_text(), re.MULTILINE).group(1))  # type: ignore[union-attr]
        os.kill(pid, signal.SIGTERM)
        rest = proc.stdout.read()
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        err.close()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert rc == 130, stderr
    assert "Traceback" not in stderr + rest
    assert "interrupted" in stderr
    assert "## 2a." not in rest  # it stopped before the between-process table
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert {r["size"] for r in rows if r["suite"] == "inproc"} == {4 * KiB, 256 * MiB}
    assert shm_left(stderr) == "", "an interrupted bench left segments in /dev/shm"


@pytest.mark.parametrize("sizes", ["2TiB", "4XB", "garbage", "0", "1.5.5GiB", ","])
def test_bad_sizes_are_a_one_line_error(tmp_path: Path, sizes: str) -> None:
    p = subprocess.run(bench_argv("--sizes", sizes), cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("python -m zcbuf bench: error: argument --sizes: "), p.stderr
    assert not (tmp_path / "bench-results").exists()


@needs_ns
def test_nothing_fits_says_so_and_fails(tmp_path: Path) -> None:
    argv = bench_argv("--sizes", "16MiB,64MiB", "--suites", "interproc")
    p = subprocess.run(in_small_shm("8m", argv), cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    assert skip_lines(p.stderr) == {("16 MiB", "interproc"): 1, ("64 MiB", "interproc"): 1}, p.stderr
    assert "nothing left to measure" in p.stderr and "8.0 MiB free" in p.stderr
    assert not (tmp_path / "bench-results").exists()


def test_channel_suite_smoke(tmp_path: Path) -> None:
    """``--suites channel --smoke``: the channel table against the stdlib peers (and the optional
    ones that are installed, or one line each saying why not), the zcbuf-only figures, and a
    verdict for every channel target; nothing left in /dev/shm. No timing is asserted."""
    before = set(os.listdir("/dev/shm"))
    p = subprocess.run(bench_argv("--suites", "channel", "--smoke", "--out", "out"), cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    assert "FAILED" not in p.stderr, p.stderr
    assert "## 4. Channels: one Python process -> another" in p.stdout
    for row in ("zcbuf channel", "mp.Pipe (send_bytes)", "mp.Queue", "shm ring + Pipe"):
        assert re.search(rf"^\| {re.escape(row)} \| \d", p.stdout, re.MULTILINE), (row, p.stdout)
    for peer, label in (("zmq", "pyzmq"), ("faster_fifo", "faster-fifo"), ("iceoryx2", "iceoryx2")):
        shown = re.search(rf"^\| {label}[ (]", p.stdout, re.MULTILINE) is not None
        said = f"skipped peer {label} in channel" in p.stderr
        assert shown != said, (label, p.stdout, p.stderr)  # measured, or one line saying why not
    assert "64 MiB frame" in p.stdout or "skipped 64 MiB in channel" in p.stderr
    assert "idle subscriber blocked in recv()" in p.stdout
    targets = p.stdout[p.stdout.index("## Targets (this run)"):]
    for what in ("receiver waiting", "asleep", "p99", "ahead of every peer", "throughput", "asyncio", "idle"):
        assert any(what in ln and re.search(r"\b(met|MISSED)\)", ln) for ln in targets.splitlines()), (what, targets)
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    thr = [r for r in rows if r["method"] == "zcbuf channel: throughput"]
    assert thr and thr[0]["extra"]["messages"] > 0
    left = {n for n in set(os.listdir("/dev/shm")) - before if n.startswith("chbench-")}
    assert not left, left
