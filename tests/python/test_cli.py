"""The command line: ls, gc, and a tiny benchmark run (a smoke test, not a timing test)."""

import json
import os
import subprocess
import sys

import zcbuf


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zcbuf", *args], capture_output=True, text=True, timeout=300)


def test_ls_shows_a_segment_and_gc_keeps_live_ones():
    buf = zcbuf.empty((4, 4), "f8", shared=True)
    p = run("ls")
    assert p.returncode == 0, p.stderr
    line = [l for l in p.stdout.splitlines() if buf.name in l]
    assert line and "<f8" in line[0] and "4x4" in line[0], p.stdout
    p = run("gc")
    assert p.returncode == 0 and buf.name not in p.stdout
    assert os.path.exists(f"/dev/shm/{buf.name}")
    buf.free()


def test_help_and_unknown_command():
    assert run("--help").returncode == 0
    p = run("frobnicate")
    assert p.returncode == 2 and "unknown command" in p.stderr


def test_bench_smoke(tmp_path):
    out = tmp_path / "res"
    # no optional peers (SharedArray, Ray): a smoke test of our own code, quick and hermetic
    p = run("bench", "--sizes", "4KiB,1MiB", "--reps", "3", "--peers", "", "--out", str(out), "--no-progress")
    assert p.returncode == 0, p.stderr
    assert "zcbuf asarray()" in p.stdout and "handoff: zcbuf" in p.stdout and "Targets" in p.stdout
    data = json.loads((out / "results.json").read_text())
    methods = {r["method"] for r in data["rows"]}
    assert {"zcbuf asarray()", "attach: zcbuf", "attach: shared_memory", "handoff: pickle"} <= methods
    assert (out / "results.csv").exists()
    assert all(r["median_s"] > 0 for r in data["rows"])


def test_unlink_removes_persistent_and_held_names_and_reports_missing():
    name = f"cli-unlink-{os.getpid()}"
    held = zcbuf.create(16, name=name + "-held")
    zcbuf.create(16, name=name + "-p", persist=True).free()
    assert os.path.exists(f"/dev/shm/{name}-p")
    p = run("unlink", name + "-p", name + "-held", name + "-missing")
    assert p.returncode == 1
    assert f"removed {name}-p" in p.stdout and f"removed {name}-held" in p.stdout
    assert name + "-missing" in p.stderr and p.stderr.count("\n") == 1
    assert not os.path.exists(f"/dev/shm/{name}-p") and not os.path.exists(f"/dev/shm/{name}-held")
    held.asarray()[0] = 1  # the holder keeps its memory
    held.free()
    assert run("unlink").returncode == 2 and "usage" in run("unlink").stderr
    assert run("unlink", "--help").returncode == 0
