"""File buffers that cannot fit fail before anything is created, naming the free space measured,
and a reservation that fails anyway leaves no file behind."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import zcbuf

TiB = 1 << 40


def test_one_tib_file_is_refused_up_front(tmp_path) -> None:
    path = tmp_path / "huge.zcbuf"
    with pytest.raises(zcbuf.OutOfMemoryError) as info:
        zcbuf.empty((TiB,), np.uint8, path=str(path))
    msg = str(info.value)
    assert re.search(r"the file system of \S*huge.zcbuf has \d+\.\d [KMGT]iB free; 1.0 TiB requested "
                     r"\(measured before creating anything", msg), msg
    assert "put the file elsewhere" in msg, msg
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []
    # Without a reservation the file is sparse, so the check does not apply.
    b = zcbuf.create(TiB, path=str(path), reserve=False)
    assert b.nbytes == TiB
    b.free()


def test_failed_reservation_leaves_no_file(tmp_path) -> None:
    """fallocate failing after the free-space check (here: RLIMIT_FSIZE, as a stand-in for
    another writer taking the space meanwhile) leaves the directory as it was."""
    path = tmp_path / "capped.zcbuf"
    code = f"""
        import resource, sys, zcbuf
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        try:
            zcbuf.create(64 << 20, path={str(path)!r})
        except zcbuf.OutOfMemoryError as e:
            print("OutOfMemoryError", e)
            sys.exit(0)
        sys.exit("created beyond RLIMIT_FSIZE")
    """
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.startswith("OutOfMemoryError"), p.stdout
    # A size limit is not a lack of space: the message names the limit, not the free space.
    assert "file size limit" in p.stdout and " free;" not in p.stdout, p.stdout
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


EXT4_CHILD = """
import os, sys, numpy as np, zcbuf
d = sys.argv[1]
names = sorted(os.listdir(d))
before = os.statvfs(d).f_bfree
try:
    zcbuf.empty((1 << 40,), np.uint8, path=os.path.join(d, "huge.zcbuf"))
    sys.exit("1 TiB was created on a 64 MiB file system")
except zcbuf.OutOfMemoryError as e:
    print(e)
assert sorted(os.listdir(d)) == names, os.listdir(d)
assert os.statvfs(d).f_bfree == before, (os.statvfs(d).f_bfree, before)
print("unchanged", before)
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("mkfs.ext4")),
    reason="needs root, unshare and mkfs.ext4",
)
def test_one_tib_on_a_small_ext4(tmp_path) -> None:
    """On a real 64 MiB ext4 (where a failed fallocate keeps its blocks): refused, free blocks
    unchanged, nothing left."""
    img, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True, capture_output=True)
    p = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -o loop '{img}' '{mnt}' || exit 77; exec \"$@\"", "sh",
         sys.executable, "-c", EXT4_CHILD, str(mnt)],
        capture_output=True, text=True, timeout=60,
    )
    if p.returncode == 77:
        pytest.skip(f"cannot loop-mount here: {p.stderr.strip()}")
    assert p.returncode == 0, p.stdout + p.stderr
    first, second = p.stdout.splitlines()[:2]
    assert re.search(r"huge.zcbuf has \d+\.\d [KM]iB free; 1.0 TiB requested", first), first
    assert second.startswith("unchanged"), p.stdout
