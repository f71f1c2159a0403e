"""A bounded soak: several processes x threads doing random shared-buffer operations with a
byte-pattern check on every read. ZCBUF_SOAK_SECONDS sets the length (default 15 s)."""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_soak(tmp_path):
    seconds = float(os.environ.get("ZCBUF_SOAK_SECONDS", "15"))
    markers = tmp_path / "markers"
    markers.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.join(HERE, "soak_worker.py"), str(markers), str(seconds), "3", str(seed)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in range(3)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=seconds + 120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    total = {k: sum(r[k] for r in results) for k in ("ops", "created", "opened", "verified_bytes", "corrupted", "leaked_mappings")}
    errors = [e for r in results for e in r["errors"]]
    print("soak:", total)
    assert not errors, errors
    assert total["corrupted"] == 0
    assert total["leaked_mappings"] == 0
    assert total["opened"] > 100 and total["verified_bytes"] > 0
    left = [n for n in os.listdir("/dev/shm") if n.startswith("zcbuf-soak-")]
    assert not left, f"{len(left)} segments left, e.g. {left[:3]}"
