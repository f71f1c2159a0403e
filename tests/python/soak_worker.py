"""One soak worker process: threads doing random create/open/asarray/write/verify/free on
shared buffers that several such processes publish to each other through a marker directory.
Prints one JSON line of counters. Run by test_soak.py."""

import gc
import json
import os
import random
import sys
import threading
import time
import zlib

import numpy as np

import zcbuf


def pattern(name: str) -> int:
    return zlib.crc32(name.encode()) % 251 + 1


def main() -> None:
    markers, seconds, nthreads, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    deadline = time.monotonic() + seconds
    stats = {"ops": 0, "created": 0, "opened": 0, "verified_bytes": 0, "corrupted": 0, "not_found": 0, "errors": []}
    lock = threading.Lock()

    def bump(key: str, n: int = 1) -> None:
        with lock:
            stats[key] += n

    def check(a: np.ndarray, name: str) -> None:
        bad = int(np.count_nonzero(a != pattern(name)))
        bump("verified_bytes", a.size)
        if bad:
            bump("corrupted", bad)

    def work(tid: int) -> None:
        rnd = random.Random(seed * 100 + tid)
        own = []  # (name, Buffer)
        held = []  # (name, array) kept across free
        k = 0
        try:
            while time.monotonic() < deadline:
                r = rnd.random()
                bump("ops")
                if r < 0.25 or not own:
                    name = f"zcbuf-soak-{os.getpid()}-{tid}-{k}"
                    k += 1
                    b = zcbuf.empty((rnd.randrange(0, 256 << 10),), "u1", name=name)
                    b.asarray()[:] = pattern(name)
                    open(os.path.join(markers, name), "w").close()
                    own.append((name, b))
                    bump("created")
                elif r < 0.4:
                    name, b = own.pop(rnd.randrange(len(own)))
                    os.unlink(os.path.join(markers, name))
                    if rnd.random() < 0.5:
                        held.append((name, b.asarray()))
                    b.free()
                elif r < 0.9:
                    names = os.listdir(markers)
                    if not names:
                        continue
                    name = rnd.choice(names)
                    try:
                        b = zcbuf.open(name, readonly=rnd.random() < 0.3)
                    except zcbuf.NotFoundError:
                        bump("not_found")  # freed by its last holder meanwhile: fine
                        continue
                    a = b.asarray()
                    check(a, name)
                    if not b.readonly and a.size:
                        i = rnd.randrange(a.size)
                        a[i : i + 100] = pattern(name)  # a write that keeps the pattern
                    bump("opened")
                    if rnd.random() < 0.2:
                        held.append((name, a))
                    b.free()
                else:
                    for name, a in held:
                        check(a, name)
                    if len(held) > 20:
                        del held[: len(held) // 2]
            for name, a in held:
                check(a, name)
        except Exception as e:  # noqa: BLE001
            with lock:
                stats["errors"].append(repr(e))
        finally:
            for name, b in own:
                try:
                    os.unlink(os.path.join(markers, name))
                except FileNotFoundError:
                    pass
                b.free()
            held.clear()

    threads = [threading.Thread(target=work, args=(t,)) for t in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gc.collect()
    with open("/proc/self/maps") as f:
        stats["leaked_mappings"] = sum(1 for line in f if "zcbuf-soak" in line)
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
