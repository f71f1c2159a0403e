"""``python -m zcbuf bench``: copy versus zero-copy, against what people use today.

Every figure is the median of several timed repetitions, with the 25th-75th percentile spread;
every comparison is made side by side in the same run and reported as a ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import gc as _gc
import json
import multiprocessing as mp
import os
import platform
import re
import signal
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from . import _buffer
from ._errors import check
from ._native import ffi, lib

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
DEFAULT_SIZES = [4 * KiB, 64 * KiB, 1 * MiB, 16 * MiB, 256 * MiB, 1 * GiB]
SUITES = ("inproc", "interproc", "touch")
#: copying peers are skipped above these sizes (they take seconds and prove nothing new)
JSON_MAX = 16 * MiB
CFFI_MAX = 1 * GiB


@dataclass
class Row:
    """One measured figure."""

    suite: str
    method: str
    size: int
    median_s: float
    p25_s: float
    p75_s: float
    reps: int
    note: str = ""
    extra: Dict[str, float] = field(default_factory=dict)


def fmt_size(n: int) -> str:
    for unit, k in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= k and n % k == 0:
            return f"{n // k} {unit}"
    return f"{n} B"


def fmt_time(s: float) -> str:
    if s != s:  # NaN
        return "-"
    if s < 1e-6:
        return f"{s * 1e9:.0f} ns"
    if s < 1e-3:
        return f"{s * 1e6:.2f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(?:I?B)?|B)?\s*", re.IGNORECASE)
_UNIT = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB}


def parse_size(text: str) -> int:
    """Bytes in ``text``: a number with an optional unit B, K/KB/KiB, M.., G.., T.. (all
    powers of 1024, any case), e.g. ``4KiB``, ``1.5GiB``, ``4096``. Raises ValueError."""
    m = _SIZE.fullmatch(text)
    if not m:
        raise ValueError(f"{text.strip()!r} is not a size (use e.g. 4KiB, 64MiB, 1GiB)")
    n = int(float(m.group(1)) * _UNIT[(m.group(2) or "").upper()])
    if n < 1:
        raise ValueError(f"{text.strip()!r} is less than one byte")
    return n


def sizes_arg(text: str) -> List[int]:
    """The ``--sizes`` option: comma-separated sizes, each at most this machine's memory;
    sorted, without repeats. Raises argparse.ArgumentTypeError (argparse then prints
    ``error: argument --sizes: ...`` and exits with status 2)."""
    total = mem_total()
    out = set()
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            n = parse_size(part)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if n > total:
            raise argparse.ArgumentTypeError(
                f"{part.strip()} is more than this machine's memory ({fmt_bytes(total)}): ask for less"
            )
        out.add(n)
    if not out:
        raise argparse.ArgumentTypeError("no sizes given (use e.g. 4KiB,64MiB,1GiB)")
    return sorted(out)


def fmt_bytes(n: int) -> str:
    """``n`` bytes, rounded to one decimal in the largest fitting unit (for room, not sizes)."""
    for unit, k in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


class Progress:
    """What the benchmark is doing now, on stderr.

    On a terminal: one line, redrawn in place twice a second by a background thread, with a
    bar, the step and how long the whole run and the step have taken. Elsewhere (a pipe, a
    log): one plain line as each step starts, nothing redrawn. ``quiet`` clears the line
    before results are printed, so the two never mix.
    """

    def __init__(self, total: int, enabled: bool, live: bool) -> None:
        self.total, self.done = max(total, 1), 0
        self.enabled, self.live = enabled, enabled and live
        self.t0 = self.t_step = time.perf_counter()
        self.base = self.label = ""
        self.notes: List[str] = []  # lines said on the way (sizes skipped midway)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread: Optional[threading.Thread] = None
        if self.live:
            self.thread = threading.Thread(target=self._refresh, name="zcbuf-bench-progress", daemon=True)
            self.thread.start()

    def step(self, label: str) -> None:
        """A new step starts now (it counts towards the bar)."""
        with self.lock:
            self.done += 1
            self.base = self.label = label
            self.t_step = time.perf_counter()
            if not self.enabled:
                return
            if self.live:
                self._draw()
            else:
                el = time.perf_counter() - self.t0
                sys.stderr.write(f"[{min(self.done, self.total)}/{self.total} {el:.0f}s] {label}\n")
                sys.stderr.flush()

    def detail(self, what: str) -> None:
        """What the current step is doing now (shown on a terminal only; not a new step)."""
        with self.lock:
            self.label = f"{self.base}: {what}"

    def note(self, line: str) -> None:
        """Says ``line`` on stderr at once (clearing the live line first), and keeps it."""
        with self.lock:
            self.notes.append(line)
            if self.live and self.label:
                sys.stderr.write("\r\x1b[K")
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    def _draw(self) -> None:
        width = 24
        done = min(self.done, self.total)
        fill = int(width * max(done - 1, 0) / self.total)
        now = time.perf_counter()
        line = (
            f"[{'#' * fill}{'.' * (width - fill)}] {done}/{self.total} {now - self.t0:4.0f}s  "
            f"{self.label[:52]} ({now - self.t_step:.0f}s)"
        )
        sys.stderr.write(f"\r\x1b[K{line}")
        sys.stderr.flush()

    def _refresh(self) -> None:
        while not self.stop.wait(0.5):
            with self.lock:
                if self.label:
                    self._draw()

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """Clears the live line while results are printed; it comes back at the next refresh."""
        with self.lock:
            if self.live and self.label:
                sys.stderr.write("\r\x1b[K")
                sys.stderr.flush()
            yield

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        with self.lock:
            if self.live and self.label:
                sys.stderr.write("\r\x1b[K")
                sys.stderr.flush()
            self.label = ""


def measure(fn: Callable[[], Any], reps: int, budget: float = 0.02) -> Tuple[float, float, float, int]:
    """Median, p25, p75 seconds per call of ``fn`` over ``reps`` timed batches.

    Fast calls are batched so one batch lasts about ``budget`` seconds; slow ones run singly.
    """
    t = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t, 1e-9)
    batch = max(1, min(100_000, int(budget / one)))
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(batch):
            fn()
        samples.append((time.perf_counter() - t) / batch)
    q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return statistics.median(samples), q[0], q[2], reps


# --------------------------------------------------------------------------------------------
# 1. In one process: an array over memory that native code owns


def suite_inproc(sizes: Sequence[int], reps: int, prog: Progress) -> List[Row]:
    rows: List[Row] = []
    for n in sizes:
        prog.step(f"in-process {fmt_size(n)}")
        with room_guard(prog, "inproc", n):
            rows += _inproc_size(n, reps, prog)
        _gc.collect()
    return rows


def _inproc_size(n: int, reps: int, prog: Progress) -> List[Row]:
    rows: List[Row] = []
    buf = _buffer.create(n)
    ptr = ffi.new("uint8_t **")
    ln = ffi.new("size_t *")
    check(lib.zcbuf_acquire(buf.id, ptr, ln))
    raw = ptr[0]
    try:
        src = buf.asarray()
        src[:] = np.arange(n, dtype=np.uint64).astype(np.uint8) if n <= 16 * MiB else 7

        def zc() -> Any:
            return buf.asarray()

        def floor() -> Any:
            return np.frombuffer(ffi.buffer(raw, n), np.uint8)

        def copy_np() -> Any:
            return np.copy(src)

        def copy_bytes() -> Any:
            return np.frombuffer(ffi.buffer(raw, n)[:], np.uint8)

        def cffi_array() -> Any:
            arr = ffi.new("uint8_t[]", n)
            ffi.memmove(arr, raw, n)
            return np.frombuffer(ffi.buffer(arr), np.uint8)

        methods: List[Tuple[str, Callable[[], Any], int, str]] = [
            ("zcbuf asarray()", zc, reps * 3, ""),
            ("floor: frombuffer(ffi.buffer)", floor, reps * 3, ""),
            ("copy: np.copy", copy_np, reps, ""),
            ("copy: bytes(ffi.buffer)", copy_bytes, reps, ""),
        ]
        if n <= CFFI_MAX:
            methods.append(("copy: ffi.new + memmove", cffi_array, reps, ""))
        if n <= JSON_MAX:
            payload = json.dumps(src.tolist()).encode()

            def via_json() -> Any:
                return np.asarray(json.loads(payload), dtype=np.uint8)

            methods.append(("copy: JSON string parse", via_json, max(3, reps // 2), "parse side only"))
        for name, fn, r, note in methods:
            prog.detail(name)
            med, p25, p75, k = measure(fn, r)
            rows.append(Row("inproc", name, n, med, p25, p75, k, note))
            _gc.collect()
        del src
    finally:
        lib.zcbuf_release(buf.id)
        buf.free()
    return rows


# --------------------------------------------------------------------------------------------
# 2. Between processes


def _consumer(conn: Any) -> None:
    """Runs in the consumer process: answers attach/handoff requests until told to stop."""
    from multiprocessing import shared_memory

    # Ctrl-C reaches the whole process group: the producer stops this process (it is also a
    # daemon), so it must not die midway with a traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    import zcbuf

    try:
        import SharedArray  # type: ignore
    except ImportError:  # pragma: no cover - optional
        SharedArray = None

    while True:
        msg = conn.recv()
        op = msg[0]
        if op == "stop":
            return
        if op == "ping":
            conn.send("pong")
        elif op == "attach":  # time attach + array creation, repeated here
            _, method, name, n, reps = msg
            samples = []
            for _ in range(reps):
                t = time.perf_counter()
                if method == "zcbuf":
                    b = zcbuf.open(name)
                    a = b.asarray()
                    t1 = time.perf_counter()
                    del a
                    b.free()
                    del b  # the Buffer object keeps its memory while it lives: unmap now
                elif method == "shared_memory":
                    shm = shared_memory.SharedMemory(name=name)
                    a = np.ndarray((n,), np.uint8, buffer=shm.buf)
                    t1 = time.perf_counter()
                    del a
                    # This spawned consumer shares the producer's resource tracker, which tracks
                    # the name once and forgets it when the producer unlinks it.
                    shm.close()
                else:  # SharedArray
                    a = SharedArray.attach(f"shm://{name}")
                    t1 = time.perf_counter()
                    del a
                samples.append(t1 - t)
            conn.send(samples)
        elif op == "handoff":  # get an array of the producer's data, answer at once
            _, method, payload, n = msg
            if method == "zcbuf":
                b = zcbuf.open(payload)
                a = b.asarray()
            elif method == "shared_memory":
                shm = shared_memory.SharedMemory(name=payload)
                a = np.ndarray((n,), np.uint8, buffer=shm.buf)
            elif method == "SharedArray":
                a = SharedArray.attach(f"shm://{payload}")
            else:  # pickle: the array itself came through the pipe
                a = payload
            conn.send(("ready", a.nbytes))
            t = time.perf_counter()
            total = int(np.add.reduce(a.view(np.uint64), dtype=np.uint64)) if n % 8 == 0 else int(a.sum())
            red = time.perf_counter() - t
            # Clean up before answering, so unmapping is not billed to the next handoff.
            del a
            if method == "zcbuf":
                b.free()
                del b  # the Buffer object keeps its memory while it lives: unmap now
            elif method == "shared_memory":
                shm.close()
            del payload, msg  # a pickled array arrived in these
            _gc.collect()
            conn.send(("reduced", total, red))


def _peers_available() -> Dict[str, bool]:
    out = {}
    for mod in ("SharedArray", "ray"):
        try:
            __import__(mod)
            out[mod] = True
        except ImportError:
            out[mod] = False
    return out


def suite_interproc(sizes: Sequence[int], reps: int, prog: Progress, peers: Sequence[str]) -> List[Row]:
    from multiprocessing import shared_memory

    avail = _peers_available()
    methods = ["zcbuf", "shared_memory", "pickle"]
    if avail["SharedArray"] and "SharedArray" in peers:
        methods.append("SharedArray")
    prog.step(f"between processes {fmt_size(sizes[0])}: attach")  # and starting the consumer
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_consumer, args=(child,), daemon=True)
    proc.start()
    rows: List[Row] = []
    try:
        parent.send(("ping",))
        parent.recv()
        # the pipe's own round trip, for reference
        def ping() -> Any:
            parent.send(("ping",))
            return parent.recv()

        med, p25, p75, k = measure(ping, reps * 3)
        rows.append(Row("interproc", "pipe round trip (reference)", 0, med, p25, p75, k))
        for i, n in enumerate(sizes):
            if i:
                prog.step(f"between processes {fmt_size(n)}: attach")
            with room_guard(prog, "interproc", n):
                rows += _interproc_size(n, reps, prog, parent, methods)
            _gc.collect()
    finally:
        try:
            parent.send(("stop",))
        except OSError:
            pass  # the consumer is gone already (e.g. the whole group got SIGTERM)
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
    return rows


def _handoff_methods(n: int, methods: Sequence[str]) -> List[str]:
    """The handoff methods measured at ``n`` bytes (pickle stops above 1 GiB: it takes seconds)."""
    return [m for m in methods if not (m == "pickle" and n > 1 * GiB)]


def _interproc_size(n: int, reps: int, prog: Progress, parent: Any, methods: Sequence[str]) -> List[Row]:
    rows: List[Row] = []
    data = np.full(n, 3, np.uint8)
    expect = int(np.add.reduce(data.view(np.uint64), dtype=np.uint64)) if n % 8 == 0 else int(data.sum())
    # Attach: every method's segment exists at once, and the methods take turns in rounds, so
    # that drift and noise hit them alike; hundreds of samples each.
    made: List[Tuple[str, str, Callable[[], None], bool]] = []
    try:
        for m in methods:
            if m != "pickle":
                made.append((m, *_produce(m, data)))  # one at a time: a failure cleans up the rest
        samples_of: Dict[str, List[float]] = {}
        for _ in range(ATTACH_ROUNDS):
            for method, name, _cleanup, attach_ok in made:
                if attach_ok:
                    parent.send(("attach", method, name, n, reps * 20))
                    samples_of.setdefault(method, []).extend(parent.recv())
        for method, samples in samples_of.items():
            q = statistics.quantiles(samples, n=4)
            rows.append(Row("interproc", f"attach: {method}", n, statistics.median(samples), q[0], q[2], len(samples)))
    finally:
        for _m, _name, cleanup, _ok in made:
            cleanup()
    for method in _handoff_methods(n, methods):
        prog.step(f"between processes {fmt_size(n)}: handoff {method}")
        name, cleanup, attach_ok = _produce(method, data)
        try:
            hand = []
            reduce_t = []
            for _ in range(max(3, reps // 2) if n >= 256 * MiB else reps):
                t = time.perf_counter()
                parent.send(("handoff", method, data if method == "pickle" else name, n))
                assert parent.recv()[0] == "ready"
                hand.append(time.perf_counter() - t)
                _, total, red = parent.recv()
                if total != expect:
                    raise RuntimeError(f"{method} handed over wrong data at {n} bytes")
                reduce_t.append(red)
            q = statistics.quantiles(hand, n=4) if len(hand) > 1 else [hand[0]] * 3
            rows.append(
                Row(
                    "interproc",
                    f"handoff: {method}",
                    n,
                    statistics.median(hand),
                    q[0],
                    q[2],
                    len(hand),
                    extra={"reduce_s": statistics.median(reduce_t)},
                )
            )
        finally:
            cleanup()
    return rows


class _RayConsumer:
    """The consumer side for Ray's object store (wrapped with ``ray.remote`` at run time)."""

    def ready(self) -> bool:
        return True

    def attach(self, refs: List[Any], reps: int) -> List[float]:
        import ray

        samples = []
        for _ in range(reps):
            t = time.perf_counter()
            a = ray.get(refs[0])  # zero-copy, read-only view of the object store
            samples.append(time.perf_counter() - t)
            del a
        return samples

    def take(self, refs: List[Any]) -> int:
        import ray

        return int(ray.get(refs[0]).nbytes)

    def reduce(self, refs: List[Any]) -> int:
        import ray

        a = ray.get(refs[0])
        return int(np.add.reduce(a.view(np.uint64), dtype=np.uint64)) if a.nbytes % 8 == 0 else int(a.sum())


def suite_ray(sizes: Sequence[int], reps: int, prog: Progress) -> List[Row]:
    """Ray's object store: ``ray.put`` in the producer, ``ray.get`` in an actor process."""
    import ray

    store = int(min(max(3 * max(sizes), 512 * MiB), mem_available() // 3))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=store,
             ignore_reinit_error=True)
    rows: List[Row] = []
    try:
        actor_class: Any = ray.remote(_RayConsumer)
        consumer: Any = actor_class.remote()
        ray.get(consumer.ready.remote())
        for n in sizes:
            prog.step(f"ray {fmt_size(n)}")
            data = np.full(n, 3, np.uint8)
            expect = int(np.add.reduce(data.view(np.uint64), dtype=np.uint64)) if n % 8 == 0 else int(data.sum())
            ref = ray.put(data)
            samples = ray.get(consumer.attach.remote([ref], reps * 3))
            if ray.get(consumer.reduce.remote([ref])) != expect:
                raise RuntimeError(f"ray handed over wrong data at {n} bytes")
            del ref
            q = statistics.quantiles(samples, n=4)
            rows.append(Row("interproc", "attach: ray", n, statistics.median(samples), q[0], q[2], len(samples)))
            hand = []
            for _ in range(max(3, reps // 2) if n >= 256 * MiB else reps):
                t = time.perf_counter()
                ref = ray.put(data)  # what a Ray user does: the put copies into the store
                assert ray.get(consumer.take.remote([ref])) == n
                hand.append(time.perf_counter() - t)
                del ref
            q = statistics.quantiles(hand, n=4)
            rows.append(Row("interproc", "handoff: ray", n, statistics.median(hand), q[0], q[2], len(hand)))
            del data
            _gc.collect()
    finally:
        ray.shutdown()
    return rows


ATTACH_ROUNDS = 5


def _produce(method: str, data: np.ndarray) -> Tuple[str, Callable[[], None], bool]:
    """Put ``data`` where ``method`` shares it; returns (name, cleanup, has-attach)."""
    from multiprocessing import shared_memory

    n = data.nbytes
    if method == "zcbuf":
        buf = _buffer.create(n, shared=True)
        np.copyto(buf.asarray(), data)
        return buf.name or "", buf.free, True
    if method == "shared_memory":
        # Its segment is sparse: in a full /dev/shm the copy below would die of SIGBUS, so
        # refuse here what does not fit (zcbuf reserves its pages and says so itself).
        free = shm_free()
        if n + SHM_MARGIN > free:
            raise MemoryError(f"/dev/shm has {fmt_bytes(free)} free; shared_memory needs {fmt_size(n)}")
        shm = shared_memory.SharedMemory(create=True, size=max(n, 1))
        np.ndarray((n,), np.uint8, buffer=shm.buf)[:] = data

        def done() -> None:
            shm.close()
            shm.unlink()

        return shm.name, done, True
    if method == "SharedArray":
        import SharedArray  # type: ignore

        name = f"zcbuf-bench-sa-{os.getpid()}"
        a = SharedArray.create(f"shm://{name}", n, np.uint8)
        a[:] = data
        return name, lambda: SharedArray.delete(f"shm://{name}"), True
    return "", lambda: None, False


# --------------------------------------------------------------------------------------------
# 3. First touch


TOUCH_VARIANTS: List[Tuple[str, Dict[str, bool]]] = [
    ("shared, reserved (default)", dict(shared=True)),
    ("shared, reserved + populate", dict(shared=True, populate=True)),
    ("shared, no reserve", dict(shared=True, reserve=False)),
    ("shared + huge pages", dict(shared=True, huge_pages=True)),
    ("private (default)", dict()),
    ("private + populate", dict(populate=True)),
    ("private + huge pages", dict(huge_pages=True)),
    ("private + huge pages + populate", dict(huge_pages=True, populate=True)),
]
TOUCH_MIN = 1 * MiB


def touch_variants(shared: bool) -> List[Tuple[str, Dict[str, bool]]]:
    """The first-touch variants to run: all, or the private ones only (no room in /dev/shm)."""
    return [v for v in TOUCH_VARIANTS if shared or not v[1].get("shared")]


def suite_touch(sizes: Sequence[int], reps: int, prog: Progress, shared_at: Sequence[int]) -> List[Row]:
    """Create + first write versus rewrite; the shared variants only at the sizes ``shared_at``."""
    rows: List[Row] = []
    for n in sizes:
        if n < TOUCH_MIN:
            continue
        for label, kw in touch_variants(n in shared_at):
            prog.step(f"first touch {fmt_size(n)} {label}")
            with room_guard(prog, f"touch ({label})", n):
                rows.append(_touch_one(n, reps, label, kw))
        _gc.collect()
    return rows


def _touch_one(n: int, reps: int, label: str, kw: Dict[str, bool]) -> Row:
    create_t, first_t, again_t = [], [], []
    for _ in range(max(3, reps // 2)):
        t = time.perf_counter()
        buf = _buffer.create(n, **kw)  # type: ignore[arg-type]
        try:
            a = buf.asarray()
            t1 = time.perf_counter()
            a.fill(1)
            t2 = time.perf_counter()
            a.fill(2)
            t3 = time.perf_counter()
            create_t.append(t1 - t)
            first_t.append(t2 - t1)
            again_t.append(t3 - t2)
            del a
        finally:
            buf.free()
    med = statistics.median
    return Row(
        "touch",
        label,
        n,
        med(create_t) + med(first_t),
        min(c + f for c, f in zip(create_t, first_t)),
        max(c + f for c, f in zip(create_t, first_t)),
        len(create_t),
        extra={"create_s": med(create_t), "first_write_s": med(first_t), "rewrite_s": med(again_t)},
    )


# --------------------------------------------------------------------------------------------
# Report


def _by(rows: List[Row], suite: str, method: str, size: int) -> Optional[Row]:
    for r in rows:
        if r.suite == suite and r.method == method and r.size == size:
            return r
    return None


def spread(r: Row) -> str:
    """The interquartile half-range as a percentage of the median, e.g. " ±3%"."""
    if r.median_s <= 0 or r.reps < 2:
        return ""
    return f" ±{50 * (r.p75_s - r.p25_s) / r.median_s:.0f}%"


def table(rows: List[Row], footer: bool = True) -> str:
    """The tables of ``rows`` in Markdown; with ``footer``, the note on ± and the targets."""
    out: List[str] = []
    sizes = sorted({r.size for r in rows if r.size})

    def grid(title: str, suite: str, methods: List[str], ref: Optional[str], ratio_label: str) -> None:
        present = [m for m in methods if any(r.suite == suite and r.method == m for r in rows)]
        if not present:
            return
        out.append(f"\n## {title}\n")
        head = ["method"] + [fmt_size(s) for s in sizes if any(r.size == s and r.suite == suite for r in rows)]
        cols = [s for s in sizes if any(r.size == s and r.suite == suite for r in rows)]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for m in present:
            cells = [m]
            for s in cols:
                r = _by(rows, suite, m, s)
                if r is None:
                    cells.append("-")
                    continue
                cell = fmt_time(r.median_s) + spread(r)
                if ref and m != ref:
                    rr = _by(rows, suite, ref, s)
                    if rr and rr.median_s > 0:
                        cell += f" ({r.median_s / rr.median_s:.3g}x)"
                cells.append(cell)
            out.append("| " + " | ".join(cells) + " |")
        if ratio_label:
            out.append(f"\n{ratio_label}")

    inproc_methods = sorted({r.method for r in rows if r.suite == "inproc"}, key=lambda m: (not m.startswith("zcbuf"), not m.startswith("floor"), m))
    grid(
        "1. In one process: make a NumPy array of native memory (median per handoff)",
        "inproc",
        inproc_methods,
        "zcbuf asarray()",
        "(ratios are to zcbuf asarray() at the same size)",
    )
    attach = sorted({r.method for r in rows if r.suite == "interproc" and r.method.startswith("attach")})
    grid("2a. Between processes: open by name + make the array, in the consumer", "interproc", attach, "attach: zcbuf", "(ratios are to zcbuf)")
    hand = sorted({r.method for r in rows if r.suite == "interproc" and r.method.startswith("handoff")})
    grid(
        "2b. Between processes: producer's data -> array in the consumer (incl. one pipe round trip)",
        "interproc",
        hand,
        "handoff: zcbuf",
        "(ratios are to zcbuf)",
    )
    ping = [r for r in rows if r.method == "pipe round trip (reference)"]
    if ping:
        out.append(f"\npipe round trip alone: {fmt_time(ping[0].median_s)}")
    touch = [r for r in rows if r.suite == "touch"]
    if touch:
        out.append("\n## 3. First touch: create + first write versus rewrite (median)\n")
        out.append("| size | variant | create | first write | rewrite | create+first per GiB |")
        out.append("|---|---|---|---|---|---|")
        for r in touch:
            e = r.extra
            out.append(
                f"| {fmt_size(r.size)} | {r.method} | {fmt_time(e['create_s'])} | {fmt_time(e['first_write_s'])} | "
                f"{fmt_time(e['rewrite_s'])} | {fmt_time((e['create_s'] + e['first_write_s']) * GiB / r.size)} |"
            )
    if footer:
        out.append("\n(± is half the interquartile range, as a percentage of the median)")
        out.append("\n" + "\n".join(targets(rows)))
    return "\n".join(out)


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def targets(rows: List[Row]) -> List[str]:
    """The issue's targets, checked against this run's figures (reported, never enforced)."""
    lines = ["## Targets (this run)"]
    sizes = sorted({r.size for r in rows if r.suite == "inproc"})
    if sizes:
        worst = 0.0
        for s in sizes:
            z, f = _by(rows, "inproc", "zcbuf asarray()", s), _by(rows, "inproc", "floor: frombuffer(ffi.buffer)", s)
            if z and f:
                worst = max(worst, z.median_s / f.median_s)
        lines.append(f"- asarray() / floor, worst size: {worst:.2f}x (target <= 1.5x: {_verdict(worst <= 1.5)})")
        lo, hi = _by(rows, "inproc", "zcbuf asarray()", sizes[0]), _by(rows, "inproc", "zcbuf asarray()", sizes[-1])
        if lo and hi:
            lines.append(
                f"- asarray() at {fmt_size(sizes[-1])} / at {fmt_size(sizes[0])}: {hi.median_s / lo.median_s:.2f}x "
                f"(target <= 1.3x: {_verdict(hi.median_s / lo.median_s <= 1.3)})"
            )
    big = max((r.size for r in rows if r.suite == "interproc"), default=0)
    if big:
        ratios, strict = [], []
        for s in sorted({r.size for r in rows if r.suite == "interproc"}):
            za, sa = _by(rows, "interproc", "attach: zcbuf", s), _by(rows, "interproc", "attach: shared_memory", s)
            if za and sa:
                ratios.append((s, za.median_s / sa.median_s))
                # shared_memory is bimodal (its resource tracker's pipe): also against its
                # lower quartile, i.e. its fast mode, the conservative comparison
                strict.append(za.median_s / sa.p25_s)
        if ratios:
            rs = sorted(r for _, r in ratios)
            per = ", ".join(f"{fmt_size(s)} {r:.2f}x" for s, r in ratios)
            lines.append(
                f"- attach, zcbuf / shared_memory over all sizes: median {statistics.median(rs):.2f}x, "
                f"worst {rs[-1]:.2f}x ({per}; target <= 0.8x: "
                f"{_verdict(statistics.median(rs) <= 0.8)}); against shared_memory's lower "
                f"quartile: median {statistics.median(strict):.2f}x, worst {max(strict):.2f}x"
            )
        zs = [r for r in rows if r.method == "attach: zcbuf"]
        if len(zs) > 1:
            zs.sort(key=lambda r: r.size)
            lines.append(f"- attach flatness: {fmt_size(zs[-1].size)} / {fmt_size(zs[0].size)} = {zs[-1].median_s / zs[0].median_s:.2f}x")
        zh, ph = _by(rows, "interproc", "handoff: zcbuf", big), _by(rows, "interproc", "handoff: pickle", big)
        if zh and ph:
            lines.append(
                f"- handoff of {fmt_size(big)}: pickle/Pipe {fmt_time(ph.median_s)} vs zcbuf {fmt_time(zh.median_s)} = "
                f"{ph.median_s / zh.median_s:.0f}x (target >= 1000x at 1 GiB: "
                f"{_verdict(ph.median_s / zh.median_s >= 1000) if big >= GiB else 'not measured at 1 GiB in this run'})"
            )
    return lines


def plot(rows: List[Row], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [("inproc", "In one process: array of native memory", lambda m: True)]
    if any(r.suite == "interproc" for r in rows):
        panels.append(("interproc", "Between processes: handoff to consumer", lambda m: m.startswith("handoff")))
        panels.append(("interproc", "Between processes: attach + array", lambda m: m.startswith("attach")))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8), squeeze=False)
    for ax, (suite, title, keep) in zip(axes[0], panels):
        methods = sorted({r.method for r in rows if r.suite == suite and r.size and keep(r.method)})
        for m in methods:
            pts = sorted((r.size, r.median_s, r.p25_s, r.p75_s) for r in rows if r.suite == suite and r.method == m and r.size)
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            err = [[max(p[1] - p[2], 0) for p in pts], [max(p[3] - p[1], 0) for p in pts]]
            style = "-o" if "zcbuf" in m else "--s" if "floor" in m else ":^"
            ax.errorbar(xs, ys, yerr=err, fmt=style, label=m, capsize=2, linewidth=2 if "zcbuf" in m else 1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("size (bytes)")
        ax.set_ylabel("time per handoff (s, median; bars p25-p75)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def machine() -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["mem_total_kib"] = int(f.readline().split()[1])
    except OSError:
        pass
    return info


def _meminfo(key: str) -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * KiB
    except OSError:
        pass
    return 1 << 62


def mem_available() -> int:
    """Memory the kernel can give without swapping (``MemAvailable``), in bytes."""
    return _meminfo("MemAvailable")


def mem_total() -> int:
    """This machine's memory (``MemTotal``), in bytes."""
    return _meminfo("MemTotal")


# --------------------------------------------------------------------------------------------
# Sizing: run what fits in the room this machine (or container) has


SHM_DIR = "/dev/shm"
PAGE = 4096
#: kept free in /dev/shm and in memory besides what each figure needs (others use them too)
SHM_MARGIN = 1 * MiB
RAM_MARGIN = 128 * MiB


def shm_free() -> int:
    """Bytes free in /dev/shm (``statvfs``); 0 when there is none."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def _pages(n: int) -> int:
    return -(-n // PAGE) * PAGE


def needs(suite: str, n: int, shm_methods: int = 2) -> Tuple[int, int]:
    """(bytes of /dev/shm, bytes of memory) that measuring ``n`` bytes in ``suite`` takes at
    its peak, copies included. /dev/shm pages are memory too, so they count in both.

    - inproc: the buffer, one copy being made and the last one not yet freed; the JSON
      method (up to 16 MiB) holds a Python list of every byte, its text and the parsed list.
    - interproc: every shared method's segment at once (attach), the producer's array, and
      for pickle the pickled bytes on both sides of the pipe plus the consumer's array.
    - touch (shared variants): one segment; private variants need memory only (see
      ``needs("touch-private", n)``).
    - ray: the producer's array and the object store's copies.
    """
    seg = _pages(n) + PAGE  # data pages + zcbuf's header page
    if suite == "inproc":
        return 0, 3 * n + (24 * n if n <= JSON_MAX else 0)
    if suite == "interproc":
        shm = shm_methods * seg
        return shm, n + shm + (3 * n if n <= 1 * GiB else 0)
    if suite == "touch":
        return seg, 2 * seg
    if suite == "touch-private":
        return 0, n + 2 * MiB  # a huge page of rounding
    if suite == "ray":
        return 0, 4 * n
    raise ValueError(suite)


@dataclass
class Room:
    """Free /dev/shm and available memory, in bytes, measured once before the run."""

    shm: int
    ram: int

    @classmethod
    def now(cls) -> "Room":
        return cls(shm_free(), mem_available())

    def lack(self, shm: int, ram: int) -> Optional[str]:
        """Why (``shm``, ``ram``) does not fit, or None when it does."""
        if shm and shm + SHM_MARGIN > self.shm:
            return (
                f"needs {fmt_bytes(shm + SHM_MARGIN)} of {SHM_DIR}, which has {fmt_bytes(self.shm)} free "
                f"(enlarge it: docker run --shm-size=...)"
            )
        if ram + RAM_MARGIN > self.ram:
            return f"needs {fmt_bytes(ram + RAM_MARGIN)} of memory, and {fmt_bytes(self.ram)} is available"
        return None


@dataclass
class Plan:
    """Which sizes each suite measures, and one line for each (suite, size) left out."""

    sizes: Dict[str, List[int]] = field(default_factory=dict)
    touch_shared: List[int] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)

    def steps(self, handoffs: Callable[[int], int]) -> int:
        total = len(self.sizes.get("inproc", []))
        total += sum(1 + handoffs(n) for n in self.sizes.get("interproc", []))
        total += len(self.sizes.get("ray", []))
        total += sum(len(touch_variants(n in self.touch_shared)) for n in self.sizes.get("touch", []))
        return total


def make_plan(suites: Sequence[str], sizes: Sequence[int], room: Room, shm_methods: int) -> Plan:
    plan = Plan()
    for suite in suites:
        keep: List[int] = []
        for n in sizes:
            if suite == "touch" and n < TOUCH_MIN:
                continue  # first touch is measured from 1 MiB (not a skip: by design)
            if suite == "touch":
                why = room.lack(*needs("touch-private", n))
                shared_why = room.lack(*needs("touch", n))
                if why is None:
                    keep.append(n)
                    if shared_why is None:
                        plan.touch_shared.append(n)
                    else:
                        plan.skipped.append(
                            f"skipped {fmt_size(n)} in touch for its shared variants (the private ones "
                            f"run): {shared_why}"
                        )
                    continue
            else:
                why = room.lack(*needs(suite, n, shm_methods))
                if why is None:
                    keep.append(n)
                    continue
            plan.skipped.append(f"skipped {fmt_size(n)} in {suite}: {why}")
        if keep:
            plan.sizes[suite] = keep
    return plan


def out_of_room(e: BaseException) -> bool:
    """Whether ``e`` says memory, /dev/shm or disk ran out (zcbuf's OutOfMemoryError is a
    MemoryError)."""
    return isinstance(e, MemoryError) or (
        isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.ENOMEM, errno.EDQUOT)
    )


@contextlib.contextmanager
def room_guard(prog: Progress, suite: str, n: int) -> Iterator[None]:
    """Runs one size of a suite; if the room ran out meanwhile (others took it), says so in
    one line and goes on with the next (the figures of that size are dropped)."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - only out-of-room errors are kept from the caller
        if not out_of_room(e):
            raise
        prog.note(f"skipped {fmt_size(n)} in {suite}: ran out of room midway ({e})")
        _gc.collect()


# --------------------------------------------------------------------------------------------
# Command line


def _write_results(out: str, rows: List[Row], meta: Dict[str, Any]) -> Tuple[str, str]:
    js, cs = os.path.join(out, "results.json"), os.path.join(out, "results.csv")
    with open(js, "w") as f:
        json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=1)
    with open(cs, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["suite", "method", "size", "median_s", "p25_s", "p75_s", "reps", "note", "extra"])
        for r in rows:
            w.writerow([r.suite, r.method, r.size, r.median_s, r.p25_s, r.p75_s, r.reps, r.note, json.dumps(r.extra)])
    return js, cs


def _on_sigterm(_sig: int, _frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds through every cleanup, as Ctrl-C does


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zcbuf bench", description=__doc__)
    p.add_argument("--sizes", type=sizes_arg, default=",".join(fmt_size(s).replace(" ", "") for s in DEFAULT_SIZES),
                   help="comma-separated sizes, e.g. 4KiB,1MiB,1GiB (default: %(default)s); sizes that do "
                        "not fit in /dev/shm or memory are skipped, one line each")
    p.add_argument("--reps", type=int, default=7, help="timed repetitions per figure (default: %(default)s)")
    p.add_argument("--suites", default=",".join(SUITES), help=f"which suites: {','.join(SUITES)}")
    p.add_argument("--peers", default="SharedArray,ray",
                   help="optional peers to include when installed (default: %(default)s)")
    p.add_argument("--out", default="bench-results", help="directory for results.json, results.csv, bench.png")
    p.add_argument("--quick", action="store_true", help="small sizes and few repetitions (a smoke run)")
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    a = p.parse_args(argv)
    sizes: List[int] = a.sizes
    reps = a.reps
    if a.quick:
        sizes, reps = [4 * KiB, 1 * MiB, 16 * MiB], 5
    if reps < 3:
        p.error("--reps must be at least 3")
    suites = [s.strip() for s in a.suites.split(",") if s.strip()]
    for s in suites:
        if s not in SUITES:
            p.error(f"unknown suite {s!r}; choose from {', '.join(SUITES)}")
    peers = [x.strip() for x in a.peers.split(",") if x.strip()]
    avail = _peers_available()
    inter_methods = ["zcbuf", "shared_memory", "pickle"] + (["SharedArray"] if avail["SharedArray"] and "SharedArray" in peers else [])
    use_ray = "interproc" in suites and "ray" in peers and avail["ray"]
    order = [s for s in ("inproc", "interproc", "ray", "touch") if s in suites or (s == "ray" and use_ray)]
    room = Room.now()
    plan = make_plan(order, sizes, room, shm_methods=len(inter_methods) - 1)
    for line in plan.skipped:
        print(line, file=sys.stderr)
    if not plan.sizes:
        print(
            f"nothing left to measure: no size of {', '.join(fmt_size(s) for s in sizes)} fits "
            f"({SHM_DIR}: {fmt_bytes(room.shm)} free, memory: {fmt_bytes(room.ram)} available); "
            f"ask for smaller --sizes or make room",
            file=sys.stderr,
        )
        return 1
    try:
        os.makedirs(a.out, exist_ok=True)
    except OSError as e:
        p.error(f"argument --out: cannot create {a.out}: {e.strerror}")

    info = machine()
    meta: Dict[str, Any] = {"machine": info, "elapsed_s": 0.0, "reps": reps, "sizes": sizes,
                            "peers_available": avail, "room": {"shm_free": room.shm, "mem_available": room.ram},
                            "skipped": plan.skipped}
    print(f"# zcbuf benchmark ({info.get('cpu', '?')}, {info['cpus']} CPUs, "
          f"Python {info['python']}, NumPy {info['numpy']})", flush=True)
    prog = Progress(plan.steps(lambda n: len(_handoff_methods(n, inter_methods))),
                    enabled=not a.no_progress, live=sys.stderr.isatty())
    old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    rows: List[Row] = []
    t0 = time.perf_counter()
    interrupted = False
    try:
        for suite in order:
            sz = plan.sizes.get(suite)
            if not sz:
                continue
            if suite == "inproc":
                got = suite_inproc(sz, reps, prog)
            elif suite == "interproc":
                got = suite_interproc(sz, reps, prog, peers)
            elif suite == "ray":
                got = suite_ray(sz, reps, prog)
            else:
                got = suite_touch(sz, reps, prog, plan.touch_shared)
            rows += got
            meta["elapsed_s"] = time.perf_counter() - t0
            meta["skipped"] = plan.skipped + prog.notes
            _write_results(a.out, rows, meta)
            if got:
                with prog.quiet():
                    print(table(got, footer=False), flush=True)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        prog.close()
        signal.signal(signal.SIGTERM, old_term)
    elapsed = time.perf_counter() - t0
    meta["elapsed_s"] = elapsed
    meta["skipped"] = plan.skipped + prog.notes
    if not rows:
        print("nothing was measured" + (": interrupted" if interrupted else ": every size ran out of room"),
              file=sys.stderr)
        return 130 if interrupted else 1
    js, cs = _write_results(a.out, rows, meta)
    print("\n(± is half the interquartile range, as a percentage of the median)")
    print("\n" + "\n".join(targets(rows)))
    missing = [k for k, v in avail.items() if not v]
    if missing:
        print(f"\nnot installed, so not compared: {', '.join(missing)} (pip install to include)")
    png = os.path.join(a.out, "bench.png")
    if plot(rows, png):
        print(f"\nplot: {png}")
    else:
        print("\nno plot: matplotlib is not installed (pip install 'zcbuf[plot]' or matplotlib)")
    skipped = len(meta["skipped"])
    print(f"results: {js}, {cs} ({elapsed:.0f} s" + (f"; {skipped} skipped, see above" if skipped else "") + ")")
    print("registry micro-benchmarks (acquire/release, create/free, open): cargo bench --bench registry", flush=True)
    if interrupted:
        print("interrupted: the results above are those measured so far", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


