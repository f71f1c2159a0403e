"""A Python publisher for ``examples/rust_subscriber.rs``: typed float32 frames on a channel.

    python examples/python_publisher.py NAME [FRAMES] [SUBSCRIBERS]

Creates channel NAME for 120x160 float32 messages (4 slots, block policy), waits up to 30 s for
SUBSCRIBERS subscribers (default 1), then publishes FRAMES messages (default 50): message ``i``
holds ``i * 1000 + r * 160 + c`` at ``(r, c)`` (exact in float32). Even messages are written in
place in a loaned slot, odd ones copied in with ``send``. Closes the stream and prints
``publisher ok frames=N name=NAME``. ``tests/python/test_channel_examples.py`` runs it.
"""

from __future__ import annotations

import sys

import numpy as np

import zcbuf

SHAPE = (120, 160)


def main(name: str, frames: int = 50, subscribers: int = 1) -> int:
    base = np.arange(SHAPE[0] * SHAPE[1], dtype=np.float32).reshape(SHAPE)
    with zcbuf.publish(SHAPE, "<f4", slots=4, name=name) as pub:
        pub.wait_for_subscribers(subscribers, timeout=30)
        for i in range(frames):
            if i % 2 == 0:
                with pub.loan(timeout=30) as msg:  # written in place: no copy
                    np.add(base, np.float32(i * 1000), out=msg)
            else:
                pub.send(base + np.float32(i * 1000), timeout=30)
            assert pub.seq == i
    print(f"publisher ok frames={frames} name={name}")
    return 0


if __name__ == "__main__":
    if not 2 <= len(sys.argv) <= 4:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], *(int(a) for a in sys.argv[2:])))
