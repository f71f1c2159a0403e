"""The Python side of ``examples/rust_publisher.rs``: receive its frames from a channel.

    python examples/python_subscriber.py NAME [FRAMES]

Subscribes to channel NAME (waiting up to 30 s for the publisher to create it) and receives
until the end of the stream. Each frame is a read-only 480x640 uint8 array over the shared slot
(no copy: this process maps /dev/shm/NAME); frame ``i`` must carry sequence number ``i``, the
counter ``i`` in its first 8 bytes and ``(r + c + i) % 256`` elsewhere. The first frame is kept
to the end and must not change meanwhile (the publisher never reuses a slot a live array shows).
Prints ``subscriber ok frames=N ...`` and exits non-zero on any mismatch (or if FRAMES is given
and a different number came). ``tests/python/test_channel_examples.py`` runs it.
"""

from __future__ import annotations

import sys
import time

import numpy as np

import zcbuf


def mappings_of(name: str) -> int:
    """How many of this process's mappings are of /dev/shm/NAME."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if line.rstrip().endswith(f"/dev/shm/{name}"))


def subscribe(name: str, timeout: float = 30) -> zcbuf.Subscriber:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return zcbuf.subscribe(name)
        except (zcbuf.NotFoundError, zcbuf.InvalidArgumentError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def expected(i: int, shape) -> np.ndarray:
    rows, cols = shape
    want = ((np.arange(rows)[:, None] + np.arange(cols)[None, :] + i) & 0xFF).astype(np.uint8)
    want[0, :8] = np.frombuffer(int(i).to_bytes(8, "little"), np.uint8)
    return want


def main(name: str, frames: int = -1) -> int:
    sub = subscribe(name)
    if sub.shape != (480, 640) or sub.dtype != np.uint8:
        print(f"expected 480x640 uint8 frames, got {sub.dtype} {sub.shape}", file=sys.stderr)
        return 1
    first = None
    n = 0
    for a in sub:
        counter = int(a[0, :8].view("<u8")[0])
        if sub.seq != n or counter != n:
            print(f"frame {n} has sequence {sub.seq} and counter {counter}", file=sys.stderr)
            return 1
        if not np.array_equal(a, expected(n, a.shape)):
            print(f"frame {n} holds the wrong pixels", file=sys.stderr)
            return 1
        if a.flags.writeable:
            print("a received frame is writable", file=sys.stderr)
            return 1
        if first is None:
            first = a
        elif not np.array_equal(first, expected(0, first.shape)):
            print(f"the kept first frame changed by frame {n}", file=sys.stderr)
            return 1
        n += 1
    maps = mappings_of(name)
    if n and maps < 1:
        print(f"the frames are not a mapping of /dev/shm/{name}", file=sys.stderr)
        return 1
    if frames >= 0 and n != frames:
        print(f"{n} frames came, {frames} expected", file=sys.stderr)
        return 1
    print(f"subscriber ok frames={n} shape={a.shape[0]}x{a.shape[1]} dtype={a.dtype} "
          f"mappings={maps} missed={sub.missed}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) == 3 else -1))
