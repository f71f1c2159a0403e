"""The Python side of ``examples/rust_producer.rs``: open a Rust-made shared buffer by name.

    python examples/python_consumer.py NAME

Opens NAME with ``zcbuf.open`` (a typed float32 array, dtype and shape from the header the Rust
producer wrote), checks that element ``i`` is ``i * 0.25`` and that the array is a view of the
shared pages (a mapping of /dev/shm/NAME in this process, no copy), then negates the last row in
place for the producer to check. Prints one line, ``consumer ok ...``, and exits non-zero on any
mismatch. ``tests/python/test_rust_face.py`` runs it against the producer.
"""

from __future__ import annotations

import sys

import numpy as np

import zcbuf


def mappings_of(name: str) -> int:
    """How many of this process's mappings are of /dev/shm/NAME."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if line.rstrip().endswith(f"/dev/shm/{name}"))


def main(name: str) -> int:
    buf = zcbuf.open(name)
    a = buf.asarray()
    if a.dtype != np.float32 or a.ndim != 2:
        print(f"expected a 2-d float32 array, got {a.dtype} {a.shape}", file=sys.stderr)
        return 1
    want = (np.arange(a.size, dtype=np.float32) * np.float32(0.25)).reshape(a.shape)
    if not np.array_equal(a, want):
        bad = np.argwhere(a != want)[0]
        print(f"value at {tuple(bad)} is {a[tuple(bad)]}, expected {want[tuple(bad)]}", file=sys.stderr)
        return 1
    maps = mappings_of(name)
    if maps < 1:
        print(f"the array is not a mapping of /dev/shm/{name}", file=sys.stderr)
        return 1
    a[-1] *= -1  # in place: the producer sees it in its own mapping
    print(f"consumer ok shape={a.shape[0]}x{a.shape[1]} dtype={a.dtype} mappings={maps} "
          f"sum={float(a.sum(dtype=np.float64))}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
