import os
import subprocess
import sys
import textwrap

import pytest


def run_py(code: str, *args: str, timeout: float = 60) -> str:
    """Run ``code`` in a fresh interpreter; return its stdout, fail with its stderr."""
    p = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if p.returncode != 0:
        raise AssertionError(f"child failed ({p.returncode}):\n{p.stderr}")
    return p.stdout


@pytest.fixture
def tmp_file(tmp_path):
    return str(tmp_path / "buf.zcbuf")


def mappings_of(name: str) -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if name in line)


def map_count() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
