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
SUITES = ("inproc", "interproc", "touch", "channel")
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
# 4. Channels: messages from one Python process to another, against what people use today
#
# The producer (this process) and a spawned consumer exchange messages through one "way" at a
# time: a zcbuf channel, or a peer. Every message carries a counter in its first 8 bytes (and,
# for one-way timing, the send time in the next 8: time.perf_counter_ns() is CLOCK_MONOTONIC,
# one clock for every process on Linux), so every figure comes with a check that every message
# arrived, in order. Names passed to anything start with "chbench-".

#: message sizes of the latency figures (the throughput figure is at the first)
CHANNEL_SIZES = (64, 4 * KiB)
CHANNEL_FRAME = 64 * MiB
CHANNEL_FRAME_SLOTS = 4
#: slots (and the peers' queue depth) for latency, and for throughput (as examples/channel_rust.rs)
CHANNEL_SLOTS = 8
CHANNEL_THR_SLOTS = 256
#: the sender waits this long before each message of the "after sleeping" figures
CHANNEL_GAP = 0.002
#: counter value that ends a throughput stream
_END = (1 << 64) - 1
#: the zcbuf row of the channel tables, and the optional peers (module to import, label)
CHANNEL_ZC = "zcbuf channel"
CHANNEL_OPTIONAL = {"pyzmq": ("zmq", "pyzmq (ipc://)"), "faster-fifo": ("faster_fifo", "faster-fifo"),
                    "iceoryx2": ("iceoryx2", "iceoryx2 (pub-sub + event)")}


@dataclass
class ChannelPlan:
    """How much of each channel figure to take (``--quick`` takes less)."""

    rounds: int = 20_000  # ping-pong round trips per size
    stamps: int = 1_000  # one-way messages after sleeping, per size
    thr_s: float = 2.0  # seconds of throughput (at least 1)
    frames: int = 24  # 64 MiB frames per variant
    async_rounds: int = 3_000
    idle_s: float = 10.0

    @classmethod
    def quick(cls) -> "ChannelPlan":
        return cls(rounds=2_000, stamps=200, thr_s=1.0, frames=8, async_rounds=300, idle_s=2.0)


def _hdr(m: Any) -> Tuple[int, int]:
    """(counter, send time) from the first 16 bytes of a received message (bytes, an ndarray,
    or a ctypes array)."""
    return int.from_bytes(m[0:8], "little"), int.from_bytes(m[8:16], "little")


class _Tx:
    """The sending end of one direction: ``send(message)``, ``close()``, and ``connected()``
    (called once the other side is there, for ways that must learn of it)."""

    def __init__(self, send: Callable[[Any], Any], close: Callable[[], Any] = lambda: None,
                 connected: Callable[[], Any] = lambda: None) -> None:
        self.send, self.close, self.connected = send, close, connected


class _Rx:
    """The receiving end of one direction: ``recv()`` returns the message, ``close()``."""

    def __init__(self, recv: Callable[[], Any], close: Callable[[], Any] = lambda: None) -> None:
        self.recv, self.close = recv, close


class _Way:
    """One way of sending messages between the two processes. ``shared()`` makes (in the
    producer) what the consumer must inherit at spawn; each process then builds a ``_Way`` over
    it and makes ends per test: ``tx``/``rx`` for direction ``d`` ("ping": producer to
    consumer, "pong": back) of a test named ``key``."""

    label = ""

    @staticmethod
    def shared(key: str) -> Any:
        return None

    def __init__(self, side: str, shared: Any) -> None:
        self.side, self.sh = side, shared

    def prepare(self, key: str, n: int, slots: int) -> Callable[[], None]:
        """Producer side, before a test: makes what the test's ends open; returns its cleanup."""
        return lambda: None

    def after_spawn(self) -> None:
        """Producer side: drops its copies of the consumer's ends (so a dead consumer is EOF)."""

    def tx(self, d: str, key: str, n: int, slots: int) -> _Tx:
        raise NotImplementedError

    def rx(self, d: str, key: str, n: int, slots: int) -> _Rx:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _ZcbufWay(_Way):
    label = CHANNEL_ZC

    def tx(self, d: str, key: str, n: int, slots: int) -> _Tx:
        import zcbuf

        pub = zcbuf.publish((n,), np.uint8, slots=slots, name=f"chbench-{key}-{d}", policy="block")
        return _Tx(pub.send, pub.close)

    def rx(self, d: str, key: str, n: int, slots: int) -> _Rx:
        import zcbuf

        sub = zcbuf.subscribe(f"chbench-{key}-{d}")
        return _Rx(sub.recv, sub.close)


class _PipeWay(_Way):
    """``multiprocessing.Pipe()`` (duplex), ``send_bytes``/``recv_bytes``."""

    label = "mp.Pipe (send_bytes)"

    @staticmethod
    def shared(key: str) -> Any:
        return mp.get_context("spawn").Pipe()

    def _conn(self) -> Any:
        return self.sh[0] if self.side == "producer" else self.sh[1]

    def after_spawn(self) -> None:
        self.sh[1].close()

    def tx(self, d: str, key: str, n: int, slots: int) -> _Tx:
        return _Tx(self._conn().send_bytes)

    def rx(self, d: str, key: str, n: int, slots: int) -> _Rx:
        return _Rx(self._conn().recv_bytes)

    def close(self) -> None:
        self._conn().close()


def _as_bytes(m: Any) -> bytes:
    return m if type(m) is bytes else bytes(m)


class _QueueWay(_Way):
    """``multiprocessing.Queue``, one per direction, bounded like the zcbuf ring (a sender
    waits when it is full, as under "block"); the message as ``bytes`` (a pickled object is
    sent later by the queue's feeder thread: an array could change meanwhile)."""

    label = "mp.Queue"

    @staticmethod
    def shared(key: str) -> Any:
        ctx = mp.get_context("spawn")
        return {"ping": ctx.Queue(CHANNEL_THR_SLOTS), "pong": ctx.Queue(CHANNEL_THR_SLOTS)}

    def tx(self, d: str, key: str, n: int, slots: int) -> _Tx:
        put = self.sh[d].put
        return _Tx(lambda m: put(m if type(m) is bytes else bytes(m)))

    def rx(self, d: str, key: str, n: int, slots: int) -> _Rx:
        return _Rx(self.sh[d].get)

    def close(self) -> None:
        for q in self.sh.values():
            q.close()
            q.cancel_join_thread()  # every test drained its queue; never wait on a dead consumer


class _RingTx:
    """A ring of ``slots`` messages in ``multiprocessing.shared_memory``: the sender copies a
    message into the next slot and sends its index through a Pipe; the receiver sends back
    how many it has finished with every half ring (credits), so no slot is overwritten unread."""

    def __init__(self, conn: Any, shm: Any, n: int, slots: int) -> None:
        self.conn, self.shm, self.k = conn, shm, slots
        self.views = [np.ndarray((n,), np.uint8, buffer=shm.buf, offset=i * n) for i in range(slots)]
        self.idx = [i.to_bytes(4, "little") for i in range(slots)]
        self.pos = self.acked = 0

    def send(self, m: Any) -> None:
        pos = self.pos
        while pos - self.acked >= self.k:
            self.acked = int.from_bytes(self.conn.recv_bytes(), "little")
        i = pos % self.k
        v = self.views[i]
        v[:] = m if isinstance(m, np.ndarray) else np.frombuffer(m, np.uint8)
        self.conn.send_bytes(self.idx[i])
        self.pos = pos + 1

    def close(self) -> None:
        while self.conn.poll(0):  # credits of this test, sent before the last message ended
            self.conn.recv_bytes()
        self.views = []
        self.shm.close()


class _RingRx:
    def __init__(self, conn: Any, shm: Any, n: int, slots: int) -> None:
        self.conn, self.shm = conn, shm
        self.views = [np.ndarray((n,), np.uint8, buffer=shm.buf, offset=i * n) for i in range(slots)]
        self.half = max(1, slots // 2)
        self.count = 0

    def recv(self) -> np.ndarray:
        c = self.count
        if c and c % self.half == 0:  # the previous messages are done with: credit them
            self.conn.send_bytes(c.to_bytes(8, "little"))
        i = int.from_bytes(self.conn.recv_bytes(), "little")
        self.count = c + 1
        return self.views[i]

    def close(self) -> None:
        self.views = []
        self.shm.close()


class _RingWay(_Way):
    label = "shm ring + Pipe"

    @staticmethod
    def shared(key: str) -> Any:
        ctx = mp.get_context("spawn")
        return {"ping": ctx.Pipe(), "pong": ctx.Pipe()}

    def _conn(self, d: str, sending: bool) -> Any:
        # data goes from ends[0] to ends[1] for ping (producer -> consumer) and back for pong
        a, b = self.sh[d]
        return a if (self.side == "producer") == (d == "ping") else b

    def after_spawn(self) -> None:
        self.sh["ping"][1].close()
        self.sh["pong"][0].close()

    def prepare(self, key: str, n: int, slots: int) -> Callable[[], None]:
        from multiprocessing import shared_memory

        made = []
        try:
            for d in ("ping", "pong"):
                made.append(shared_memory.SharedMemory(name=f"chbench-{key}-{d}", create=True, size=n * slots))
        except BaseException:
            for s in made:
                s.close()
                s.unlink()
            raise

        def done() -> None:
            for s in made:
                s.close()
                s.unlink()

        return done

    def tx(self, d: str, key: str, n: int, slots: int) -> _Tx:
        from multiprocessing import shared_memory

        ring = _RingTx(self._conn(d, True), shared_memory.SharedMemory(name=f"chbench-{key}-{d}"), n, slots)
        return _Tx(ring.send, ring.close)

    def rx(self, d: str, key: str, n: int, slots: int) -> _Rx:
        from multiprocessing import shared_memory

        ring = _RingRx(self._conn(d, False), shared_memory.SharedMemory(name=f"chbench-{key}-{d}"), n, slots)
        return _Rx(ring.recv, ring.close)

    def close(self) -> None:
        for d in ("ping", "pong"):
            for c in self.sh[d]:
                c.close()


class _ZmqWay(_Way):
    """pyzmq, one PAIR socket each side over ``ipc://`` (a socket file in a fresh directory)."""

    label = CHANNEL_OPTIONAL["pyzmq"][1]

    @staticmethod
    def shared(key: str) -> Any:
        import tempfile

        return tempfile.mkdtemp(prefix="chbench-zmq-")

    def __init__(self, side: str, shared: Any) -> None:
        super().__init__(side, shared)
        import zmq

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PAIR)
        self.sock.setsockopt(zmq.LINGER, 0)
        addr = f"ipc://{shared}/sock"
        self.sock.bind(addr) if side == "producer" else self.sock.connect(addr)

    def tx(self, d: str, key: str, n: int, slots: int) -> _Tx:
        return _Tx(self.sock.send)

    def rx(self, d: str, key: str, n: int, slots: int) -> _Rx:
        return _Rx(self.sock.recv)

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()
        if self.side == "producer":
            import shutil

            shutil.rmtree(self.sh, ignore_errors=True)


class _FasterFifoWay(_Way):
    """faster-fifo queues (a shared-memory ring with process-shared condition variables), one
    per direction; the message as ``bytes``."""

    label = CHANNEL_OPTIONAL["faster-fifo"][1]

    @staticmethod
    def shared(key: str) -> Any:
        import faster_fifo

        return {"ping": faster_fifo.Queue(max_size_bytes=4 * MiB), "pong": faster_fifo.Queue(max_size_bytes=4 * MiB)}

    def tx(self, d: str, key: str, n: int, slots: int) -> _Tx:
        put = self.sh[d].put
        return _Tx(lambda m: put(m if type(m) is bytes else bytes(m), True, 60.0))

    def rx(self, d: str, key: str, n: int, slots: int) -> _Rx:
        get = self.sh[d].get
        return _Rx(lambda: get(True, 60.0))

    def close(self) -> None:
        for q in self.sh.values():
            q.close()


class _IoxWay(_Way):
    """iceoryx2's Python bindings: a publish-subscribe service of byte slices (loan, copy in,
    send) and, since its subscribers only poll, an event service whose listener the receiver
    sleeps on (its documented pattern for waking a subscriber); delivery "retry until
    delivered", the subscriber's buffer as deep as the zcbuf ring."""

    label = CHANNEL_OPTIONAL["iceoryx2"][1]

    def __init__(self, side: str, shared: Any) -> None:
        super().__init__(side, shared)
        import iceoryx2 as iox2

        self.iox = iox2
        iox2.set_log_level_from_env_or(iox2.LogLevel.Error)
        self.node = (iox2.NodeBuilder.new().signal_handling_mode(iox2.SignalHandlingMode.Disabled)
                     .create(iox2.ServiceType.Ipc))

    def _services(self, d: str, key: str, slots: int) -> Tuple[Any, Any]:
        import ctypes

        iox2 = self.iox
        ps = (self.node.service_builder(iox2.ServiceName.new(f"chbench/{key}/{d}"))
              .publish_subscribe(iox2.Slice[ctypes.c_uint8]).enable_safe_overflow(False)
              .subscriber_max_buffer_size(slots).open_or_create())
        ev = self.node.service_builder(iox2.ServiceName.new(f"chbench/{key}/{d}/event")).event().open_or_create()
        return ps, ev

    def tx(self, d: str, key: str, n: int, slots: int) -> _Tx:
        import ctypes

        ps, ev = self._services(d, key, slots)
        pub = (ps.publisher_builder().initial_max_slice_len(n)
               .backpressure_strategy(self.iox.BackpressureStrategy.RetryUntilDelivered).create())
        notifier = ev.notifier_builder().create()
        loan, notify, memmove = pub.loan_slice_uninit, notifier.notify, ctypes.memmove
        cache: List[Any] = [None, None]  # the last ndarray sent, and a ctypes array over it

        def send(m: Any) -> None:
            if not isinstance(m, ctypes.Array):
                if m is not cache[0]:
                    cache[0], cache[1] = m, (ctypes.c_uint8 * n).from_buffer(m)
                m = cache[1]
            s = loan(n)
            memmove(s.payload_ptr, m, n)
            s.assume_init().send()
            notify()

        def close() -> None:
            cache[:] = [None, None]
            notifier.delete()
            pub.delete()

        return _Tx(send, close, pub.update_connections)

    def rx(self, d: str, key: str, n: int, slots: int) -> _Rx:
        import ctypes

        ps, ev = self._services(d, key, slots)
        sub = ps.subscriber_builder().create()
        listener = ev.listener_builder().create()
        receive, wait, arr = sub.receive, listener.blocking_wait, ctypes.c_uint8 * n
        held: List[Any] = [None]  # the last sample, alive while its payload is used

        def recv() -> Any:
            held[0] = None
            while True:
                s = receive()
                if s is not None:
                    held[0] = s
                    return arr.from_address(s.payload_ptr)
                wait()

        def close() -> None:
            held[0] = None
            listener.delete()
            sub.delete()

        return _Rx(recv, close)

    def close(self) -> None:
        self.node = None


_WAYS: Dict[str, "type[_Way]"] = {
    CHANNEL_ZC: _ZcbufWay,
    _PipeWay.label: _PipeWay,
    _QueueWay.label: _QueueWay,
    _RingWay.label: _RingWay,
    _ZmqWay.label: _ZmqWay,
    _FasterFifoWay.label: _FasterFifoWay,
    _IoxWay.label: _IoxWay,
}


def channel_ways(peers: Sequence[str]) -> Tuple[List[str], List[str]]:
    """The ways to measure (zcbuf and the stdlib peers always; the optional ones asked for in
    ``peers`` when importable), and one line for each optional peer left out."""
    ways = [CHANNEL_ZC, _PipeWay.label, _QueueWay.label, _RingWay.label]
    lines = []
    for peer, (mod, label) in CHANNEL_OPTIONAL.items():
        if peer not in peers:
            continue
        try:
            __import__(mod)
        except Exception as e:  # noqa: BLE001 - ImportError, or a broken install
            lines.append(f"skipped peer {peer} in channel: not importable ({type(e).__name__}: {e}; pip install {peer})")
            continue
        ways.append(label)
    return ways, lines


def _channel_child(label: str, ctl: Any, shared: Any) -> None:
    """The consumer process: answers the producer's tests over ``ctl`` until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the producer stops it (see _consumer)
    try:
        way = _WAYS[label]("consumer", shared)
    except Exception as e:  # noqa: BLE001 - reported by the producer in one line
        ctl.send(("error", f"{type(e).__name__}: {e}"))
        return
    ctl.send("up")
    try:
        while True:
            cmd = ctl.recv()
            if cmd[0] == "stop":
                return
            try:
                _child_test(way, ctl, cmd)
            except Exception as e:  # noqa: BLE001
                ctl.send(("error", f"{cmd[0]}: {type(e).__name__}: {e}"))
    finally:
        way.close()


def _child_test(way: _Way, ctl: Any, cmd: Tuple[Any, ...]) -> None:
    op, key, n, slots, count = cmd[:5]
    pc = time.perf_counter_ns
    if op == "echo":  # ping-pong: send every message back
        rx = way.rx("ping", key, n, slots)
        tx = way.tx("pong", key, n, slots)
        try:
            ctl.send("ready")
            recv, send = rx.recv, tx.send
            for _ in range(count):
                m = recv()
                send(m)
                del m
            ctl.send("done")
        finally:
            tx.close()
            rx.close()
    elif op == "stamp":  # one-way: the send time is in the message
        rx = way.rx("ping", key, n, slots)
        try:
            ctl.send("ready")
            recv, out, ok = rx.recv, [], True
            for i in range(count):
                m = recv()
                t = pc()
                c, ts = _hdr(m)
                del m
                out.append(t - ts)
                ok = ok and c == i
            ctl.send(("done", out, ok))
        finally:
            rx.close()
    elif op == "sink":  # throughput: count until the end marker, checking the order
        rx = way.rx("ping", key, n, slots)
        try:
            ctl.send("ready")
            recv, i, ok, t_last = rx.recv, 0, True, 0
            while True:
                m = recv()
                c = int.from_bytes(m[0:8], "little")
                del m
                if c == _END:
                    break
                t_last = pc()
                if c != i:
                    ok = False
                i += 1
            ctl.send(("done", i, ok, t_last))
        finally:
            rx.close()
    elif op in ("frames", "async", "idle"):
        _child_zcbuf_test(ctl, cmd)
    else:
        raise ValueError(op)


def _child_zcbuf_test(ctl: Any, cmd: Tuple[Any, ...]) -> None:
    import asyncio

    import zcbuf

    op, key, n, slots, count = cmd[:5]
    pc = time.perf_counter_ns
    sub = zcbuf.subscribe(f"chbench-{key}-ping")
    try:
        if op == "frames":  # 64 MiB frames: check the first and last byte of each
            ctl.send("ready")
            k, ok = 0, True
            while True:
                try:
                    a = sub.recv()
                except zcbuf.ChannelClosed:
                    break
                ok = ok and int(a[0]) == int(a[-1]) == k % 251
                del a
                k += 1
            ctl.send(("done", k, ok))
        elif op == "async":  # ping-pong, the consumer in asyncio
            with zcbuf.publish((n,), np.uint8, slots=slots, name=f"chbench-{key}-pong") as pong:
                ctl.send("ready")

                async def run() -> Tuple[List[int], bool]:
                    out, ok = [], True
                    for i in range(count):
                        a = await sub.recv_async()
                        t = pc()
                        c, ts = _hdr(a)
                        out.append(t - ts)
                        ok = ok and c == i
                        pong.send(a)
                        del a
                    return out, ok

                out, ok = asyncio.run(run())
                ctl.send(("done", out, ok))
        else:  # idle: CPU time while blocked in recv()
            ctl.send("ready")
            c0, w0 = time.process_time_ns(), pc()
            a = sub.recv()
            c1, w1 = time.process_time_ns(), pc()
            del a
            ctl.send(("done", c1 - c0, w1 - w0))
    finally:
        sub.close()


class _Consumer:
    """The spawned consumer of one way, driven over a control pipe."""

    def __init__(self, label: str, shared: Any) -> None:
        ctx = mp.get_context("spawn")
        self.ctl, child = ctx.Pipe()
        self.proc = ctx.Process(target=_channel_child, args=(label, child, shared), daemon=True,
                                name=f"chbench-{label}")
        self.proc.start()
        child.close()
        self.reply(60)

    def ask(self, *cmd: Any, timeout: float = 60) -> Any:
        self.ctl.send(cmd)
        return self.reply(timeout)

    def reply(self, timeout: float) -> Any:
        if not self.ctl.poll(timeout):
            raise RuntimeError(f"the consumer did not answer within {timeout:.0f} s")
        try:
            r = self.ctl.recv()
        except EOFError:
            raise RuntimeError(f"the consumer died (exit code {self.proc.exitcode})") from None
        if isinstance(r, tuple) and r and r[0] == "error":
            raise RuntimeError(f"in the consumer: {r[1]}")
        return r

    def stop(self) -> None:
        try:
            self.ctl.send(("stop",))
        except OSError:
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        self.ctl.close()


_KEYS = iter(range(1 << 62))


def _key() -> str:
    return f"{os.getpid()}-{next(_KEYS)}"


def _message(n: int) -> Tuple[np.ndarray, np.ndarray]:
    """A message of ``n`` bytes and a uint64 view of its header (counter, send time)."""
    msg = np.full(n, 7, np.uint8)
    return msg, msg[:16].view(np.uint64)


def _pct(samples_ns: Sequence[float], q: int) -> float:
    return float(np.percentile(np.asarray(samples_ns, dtype=np.float64), q)) / 1e9


def _lat_row(method: str, n: int, samples_ns: Sequence[float], note: str = "") -> Row:
    return Row("channel", method, n, _pct(samples_ns, 50), _pct(samples_ns, 25), _pct(samples_ns, 75),
               len(samples_ns), note, extra={"p99_s": _pct(samples_ns, 99)})


def _pingpong(way: _Way, cons: _Consumer, n: int, rounds: int) -> List[int]:
    """Half of each round trip, ns: the consumer waits in recv when each message comes."""
    key, slots = _key(), CHANNEL_SLOTS
    cleanup = way.prepare(key, n, slots)
    warm = max(100, rounds // 10)
    try:
        tx = way.tx("ping", key, n, slots)
        try:
            cons.ctl.send(("echo", key, n, slots, warm + rounds))
            cons.reply(60)
            rx = way.rx("pong", key, n, slots)
            try:
                tx.connected()
                msg, hdr = _message(n)
                send, recv, pc = tx.send, rx.recv, time.perf_counter_ns
                out = []
                for i in range(warm + rounds):
                    hdr[0] = i
                    t = pc()
                    send(msg)
                    m = recv()
                    dt = pc() - t
                    c = int.from_bytes(m[0:8], "little")
                    del m
                    if c != i:
                        raise RuntimeError(f"echo {c} came back for message {i} ({n} B)")
                    out.append(dt // 2)
                cons.reply(60)
                return out[warm:]
            finally:
                rx.close()
        finally:
            tx.close()
    finally:
        cleanup()


def _stamped(way: _Way, cons: _Consumer, n: int, count: int) -> List[int]:
    """One-way ns, the sender waiting CHANNEL_GAP before each message (the consumer sleeps)."""
    key, slots = _key(), CHANNEL_SLOTS
    cleanup = way.prepare(key, n, slots)
    warm = 20
    try:
        tx = way.tx("ping", key, n, slots)
        try:
            cons.ctl.send(("stamp", key, n, slots, warm + count))
            cons.reply(60)
            tx.connected()
            msg, hdr = _message(n)
            send, pc, sleep = tx.send, time.perf_counter_ns, time.sleep
            for i in range(warm + count):
                sleep(CHANNEL_GAP)
                hdr[0] = i
                hdr[1] = pc()
                send(msg)
            _, out, ok = cons.reply(60)
            if not ok:
                raise RuntimeError(f"messages arrived out of order or were lost ({n} B)")
            return out[warm:]
        finally:
            tx.close()
    finally:
        cleanup()


def _throughput(way: _Way, cons: _Consumer, n: int, seconds: float) -> Tuple[float, int, float, bool]:
    """(messages/s, messages, seconds, in order): the producer sends as fast as it can for
    ``seconds``; the time runs until the consumer has the last one."""
    key, slots = _key(), CHANNEL_THR_SLOTS
    cleanup = way.prepare(key, n, slots)
    try:
        tx = way.tx("ping", key, n, slots)
        try:
            cons.ctl.send(("sink", key, n, slots, 0))
            cons.reply(60)
            tx.connected()
            msg, hdr = _message(n)
            send, pc = tx.send, time.perf_counter
            i = 0
            t0 = time.perf_counter_ns()
            end = pc() + seconds
            while pc() < end:
                for _ in range(256):
                    hdr[0] = i
                    send(msg)
                    i += 1
            hdr[0] = _END
            send(msg)
            _, got, ok, t_last = cons.reply(max(120, 30 * seconds))
            secs = (t_last - t0) / 1e9
            return got / secs, got, secs, ok and got == i
        finally:
            tx.close()
    finally:
        cleanup()


def suite_channel(sizes: Sequence[int], cp: ChannelPlan, prog: Progress, ways: Sequence[str],
                  rows: List[Row]) -> List[Row]:
    """Channels against the peers: latency waiting and after sleeping, throughput, and (zcbuf
    only) 64 MiB frames, asyncio and an idle subscriber; appended to ``rows`` as they come (an
    interrupted run keeps them). ``sizes`` holds CHANNEL_FRAME when the frames fit. A peer that
    fails is reported in one line and left out."""
    prog.step("channels: how busy the machine is")
    rows.append(_busy_row("before"))
    for label in ways:
        prog.step(f"channels: {label}")
        got = _channel_way(label, cp, prog)
        if got is None:
            continue
        rows += got
        if label == CHANNEL_ZC:
            # The zcbuf-only figures come right after, while the peers wait their turn.
            if CHANNEL_FRAME in sizes:
                prog.step(f"channels: {fmt_size(CHANNEL_FRAME)} frames")
                with room_guard(prog, "channel", CHANNEL_FRAME):
                    rows += _frames(cp)
            prog.step("channels: asyncio and idle")
            rows += _async_idle(cp, prog)
    rows.append(_busy_row("after"))
    return rows


def _cpu_times() -> Tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


def _busy_row(when: str, seconds: float = 1.0) -> Row:
    """How busy the CPUs are while this benchmark rests: other work competes with the
    figures (a process spinning in recv needs a CPU of its own)."""
    try:
        b0, t0 = _cpu_times()
        time.sleep(seconds)
        b1, t1 = _cpu_times()
        pct = 100 * (b1 - b0) / max(t1 - t0, 1)
    except (OSError, ValueError, IndexError):
        pct = float("nan")
    return Row("channel", f"machine busy {when}", 0, 0.0, 0.0, 0.0, 1,
               extra={"busy_pct": pct, "cpus": float(os.cpu_count() or 1), "load1": os.getloadavg()[0]})


def _channel_way(label: str, cp: ChannelPlan, prog: Progress) -> Optional[List[Row]]:
    cls = _WAYS[label]
    rows: List[Row] = []
    shared = way = cons = None
    try:
        shared = cls.shared(label)
        way = cls("producer", shared)
        cons = _Consumer(label, shared)
        way.after_spawn()
        for n in CHANNEL_SIZES:
            prog.detail(f"{fmt_size(n)} waiting")
            rows.append(_lat_row(f"{label}: waiting", n, _pingpong(way, cons, n, cp.rounds)))
            prog.detail(f"{fmt_size(n)} after sleeping")
            rows.append(_lat_row(f"{label}: asleep", n, _stamped(way, cons, n, cp.stamps)))
        n = CHANNEL_SIZES[0]
        prog.detail(f"{fmt_size(n)} throughput")
        rate, got, secs, ok = _throughput(way, cons, n, cp.thr_s)
        if not ok:
            raise RuntimeError(f"throughput: messages arrived out of order or were lost ({got} counted)")
        rows.append(Row("channel", f"{label}: throughput", n, 1 / rate, 1 / rate, 1 / rate, 1,
                        extra={"msgs_per_s": rate, "messages": got, "seconds": secs}))
        return rows
    except Exception as e:  # noqa: BLE001 - one line, then the next way
        if label == CHANNEL_ZC:
            prog.note(f"FAILED zcbuf channel in channel: {type(e).__name__}: {e}")
        else:
            prog.note(f"skipped peer {label} in channel: it failed ({type(e).__name__}: {e})")
        return rows or None
    finally:
        if cons is not None:
            cons.stop()
        if way is not None:
            way.close()
        elif shared is not None and isinstance(shared, str):
            import shutil

            shutil.rmtree(shared, ignore_errors=True)


def _frames(cp: ChannelPlan) -> List[Row]:
    """64 MiB frames: written in place through loan(), and sent with send(array), against one
    core writing (a[...] = v) and copying (np.copyto) 64 MiB of private memory here."""
    import zcbuf

    n, slots, key = CHANNEL_FRAME, CHANNEL_FRAME_SLOTS, _key()
    rows: List[Row] = []
    cons = _Consumer(CHANNEL_ZC, None)
    try:
        with zcbuf.publish((n,), np.uint8, slots=slots, name=f"chbench-{key}-ping") as pub:
            cons.ctl.send(("frames", key, n, slots, 0))
            cons.reply(60)
            dst = np.ones(n, np.uint8)
            src = np.full(n, 3, np.uint8)
            k = 0
            pc = time.perf_counter
            write_t, loan_t, copy_t, send_t = [], [], [], []
            for r in range(2 * slots + cp.frames):  # the first rounds fault every slot in
                v = k % 251
                t = pc()
                dst[...] = v
                t1 = pc()
                with pub.loan() as a:
                    a[...] = v
                t2 = pc()
                del a
                k += 1
                if r >= 2 * slots:
                    write_t.append(t1 - t)
                    loan_t.append(t2 - t1)
            for _ in range(cp.frames):
                v = k % 251
                src[0] = src[-1] = v
                t = pc()
                np.copyto(dst, src)
                t1 = pc()
                pub.send(src)
                t2 = pc()
                k += 1
                copy_t.append(t1 - t)
                send_t.append(t2 - t1)
        _, got, ok = cons.reply(60)
        if not ok or got != k:
            raise RuntimeError(f"64 MiB frames: the consumer got {got} of {k}, in order and intact: {ok}")
        del dst, src
    finally:
        cons.stop()
    for method, ts in (("frame: loan() + a[...] = v", loan_t), ("frame: one core, a[...] = v (NumPy)", write_t),
                       ("frame: send(array)", send_t), ("frame: one memcpy, np.copyto", copy_t)):
        q = statistics.quantiles(ts, n=4)
        rows.append(Row("channel", method, n, statistics.median(ts), q[0], q[2], len(ts),
                        extra={"GBps": n / statistics.median(ts) / 1e9}))
    return rows


def _async_idle(cp: ChannelPlan, prog: Progress) -> List[Row]:
    import zcbuf

    rows: List[Row] = []
    n = CHANNEL_SIZES[0]
    cons = _Consumer(CHANNEL_ZC, None)
    try:
        for mode, gap in (("waiting", 0.0), ("asleep", CHANNEL_GAP)):
            prog.detail(f"asyncio, {mode}")
            key = _key()
            count = cp.async_rounds if not gap else min(cp.async_rounds, cp.stamps)
            with zcbuf.publish((n,), np.uint8, slots=CHANNEL_SLOTS, name=f"chbench-{key}-ping") as ping:
                cons.ctl.send(("async", key, n, CHANNEL_SLOTS, count))
                cons.reply(60)
                with zcbuf.subscribe(f"chbench-{key}-pong") as pong:
                    msg, hdr = _message(n)
                    pc = time.perf_counter_ns
                    for i in range(count):
                        if gap:
                            time.sleep(gap)
                        hdr[0] = i
                        hdr[1] = pc()
                        ping.send(msg)
                        m = pong.recv(60)
                        del m
                    _, out, ok = cons.reply(60)
            if not ok:
                raise RuntimeError("asyncio: messages arrived out of order or were lost")
            skip = min(len(out) // 10, 100)
            rows.append(_lat_row(f"asyncio recv_async(): {mode}", n, out[skip:]))
        prog.detail(f"idle subscriber, {cp.idle_s:.0f} s")
        key = _key()
        with zcbuf.publish((n,), np.uint8, slots=CHANNEL_SLOTS, name=f"chbench-{key}-ping") as pub:
            cons.ctl.send(("idle", key, n, CHANNEL_SLOTS, 0))
            cons.reply(60)
            time.sleep(cp.idle_s)
            pub.send(_message(n)[0])
            _, cpu_ns, wall_ns = cons.reply(60)
        rows.append(Row("channel", "idle subscriber in recv()", 0, cpu_ns / 1e9, cpu_ns / 1e9, cpu_ns / 1e9, 1,
                        extra={"cpu_pct": 100 * cpu_ns / wall_ns, "seconds": wall_ns / 1e9}))
    finally:
        cons.stop()
    return rows


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
    out += channel_table(rows)
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
    lines += channel_targets(rows)
    return lines


def _ch(rows: List[Row], method: str, n: int) -> Optional[Row]:
    return _by(rows, "channel", method, n)


def _ch_labels(rows: List[Row]) -> List[str]:
    """The ways measured, zcbuf first, in the order they ran."""
    out: List[str] = []
    for r in rows:
        if r.suite == "channel" and r.method.endswith(": waiting") and not r.method.startswith("asyncio"):
            label = r.method[: -len(": waiting")]
            if label not in out:
                out.append(label)
    return sorted(out, key=lambda m: m != CHANNEL_ZC)


def channel_table(rows: List[Row]) -> List[str]:
    """Section 4 in Markdown: latency and throughput against the peers, then the zcbuf-only
    figures (64 MiB frames, asyncio, idle)."""
    if not any(r.suite == "channel" for r in rows):
        return []
    out = ["\n## 4. Channels: one Python process -> another (one-way latency p50 / p99; messages/s)\n"]
    labels = _ch_labels(rows)
    if labels:
        gap = f"{CHANNEL_GAP * 1e3:g} ms"
        cols = [(f"{fmt_size(n)}, waiting", "waiting", n) for n in CHANNEL_SIZES]
        cols += [(f"{fmt_size(n)}, after {gap} asleep", "asleep", n) for n in CHANNEL_SIZES]
        out.append("| method | " + " | ".join(c[0] for c in cols) + f" | {fmt_size(CHANNEL_SIZES[0])}, throughput (block) |")
        out.append("|" + "---|" * (len(cols) + 2))
        for label in labels:
            cells = [label]
            for _, mode, n in cols:
                r, z = _ch(rows, f"{label}: {mode}", n), _ch(rows, f"{CHANNEL_ZC}: {mode}", n)
                if r is None:
                    cells.append("-")
                    continue
                cell = f"{fmt_time(r.median_s)} / {fmt_time(r.extra['p99_s'])}"
                if z is not None and label != CHANNEL_ZC:
                    cell += f" ({r.median_s / z.median_s:.2g}x / {r.extra['p99_s'] / z.extra['p99_s']:.2g}x)"
                cells.append(cell)
            r, z = _ch(rows, f"{label}: throughput", CHANNEL_SIZES[0]), _ch(rows, f"{CHANNEL_ZC}: throughput", CHANNEL_SIZES[0])
            if r is None:
                cells.append("-")
            else:
                cell = f"{r.extra['msgs_per_s']:,.0f}/s"
                if z is not None and label != CHANNEL_ZC:
                    cell += f" ({z.extra['msgs_per_s'] / r.extra['msgs_per_s']:.2g}x)"
                cells.append(cell)
            out.append("| " + " | ".join(cells) + " |")
        out.append(
            f"\n(ratios are peer / zcbuf for times and zcbuf / peer for messages/s: above 1x, zcbuf is "
            f"ahead; waiting: half a ping-pong round trip, the receiver in recv when each message "
            f"comes; asleep: the send time carried in the message, the sender waiting {gap} before "
            f"each; throughput: {CHANNEL_THR_SLOTS} slots or a peer's own queue, every message "
            f"checked to arrive in order)"
        )
    frames = [r for r in rows if r.suite == "channel" and r.method.startswith("frame: ")]
    if frames:
        n = frames[0].size
        out.append(f"\n| {fmt_size(n)} frame | median | rate | ratio |")
        out.append("|---|---|---|---|")
        base = {"frame: loan() + a[...] = v": ("frame: one core, a[...] = v (NumPy)", "the rate of one core's write"),
                "frame: send(array)": ("frame: one memcpy, np.copyto", "the rate of one memcpy")}
        for r in frames:
            ratio = ""
            if r.method in base:
                b = _ch(rows, base[r.method][0], n)
                if b is not None:
                    ratio = f"{b.median_s / r.median_s:.2f}x {base[r.method][1]}"
            out.append(f"| {r.method[7:]} | {fmt_time(r.median_s)}{spread(r)} | {r.extra['GBps']:.2f} GB/s | {ratio} |")
    for mode in ("waiting", "asleep"):
        r = _ch(rows, f"asyncio recv_async(): {mode}", CHANNEL_SIZES[0])
        if r is not None:
            what = "the receiver waiting" if mode == "waiting" else f"the sender waiting {CHANNEL_GAP * 1e3:g} ms before each"
            out.append(f"\nasyncio `await sub.recv_async()`, {fmt_size(r.size)}, one-way ({what}): "
                       f"p50 {fmt_time(r.median_s)}, p99 {fmt_time(r.extra['p99_s'])}")
    busy = [r for r in rows if r.suite == "channel" and r.method.startswith("machine busy ")]
    if busy:
        cpus = int(busy[0].extra["cpus"])
        said = ", ".join(f"{r.method[len('machine busy '):]} {r.extra['busy_pct']:.0f} %" for r in busy)
        warn = any(r.extra["busy_pct"] > 100 / cpus / 2 for r in busy)
        out.append(f"\nother work on this machine while the benchmark rested 1 s ({cpus} CPUs; 100 % = all busy): "
                   f"{said}" + (" -- CPUs were shared with other work: latencies above include waiting for a "
                                "CPU, rerun on a quiet machine" if warn else ""))
    r = _ch(rows, "idle subscriber in recv()", 0)
    if r is not None:
        out.append(f"\nidle subscriber blocked in recv(): {fmt_time(r.median_s)} of CPU in "
                   f"{r.extra['seconds']:.1f} s = {r.extra['cpu_pct']:.3f} % of one core")
    return out


def channel_targets(rows: List[Row]) -> List[str]:
    """The channel targets, checked against this run (reported, never enforced)."""
    lines: List[str] = []
    labels = _ch_labels(rows)
    zc = {(mode, n): _ch(rows, f"{CHANNEL_ZC}: {mode}", n) for mode in ("waiting", "asleep") for n in CHANNEL_SIZES}
    if CHANNEL_ZC in labels:
        for mode, limit in (("waiting", 5e-6), ("asleep", 40e-6)):
            got = [(n, zc[mode, n]) for n in CHANNEL_SIZES if zc[mode, n] is not None]
            if got:
                what = "receiver waiting" if mode == "waiting" else f"after {CHANNEL_GAP * 1e3:g} ms asleep"
                per = ", ".join(f"{fmt_size(n)} {fmt_time(r.median_s)}" for n, r in got)  # type: ignore[union-attr]
                ok = all(r.median_s <= limit for _, r in got)  # type: ignore[union-attr]
                lines.append(f"- channel one-way p50, {what}: {per} (target <= {limit * 1e6:g} µs: {_verdict(ok)})")
        p99 = [(k, r.extra["p99_s"]) for k, r in zc.items() if r is not None]
        if p99:
            (mode, n), worst = max(p99, key=lambda kv: kv[1])
            lines.append(f"- channel one-way p99, worst of waiting/asleep at {', '.join(fmt_size(s) for s in CHANNEL_SIZES)}: "
                         f"{fmt_time(worst)} ({fmt_size(n)} {mode}; target <= 100 µs: {_verdict(worst <= 100e-6)})")
        peers = [p for p in labels if p != CHANNEL_ZC]
        if peers:
            behind, behind99, total = [], [], 0
            for (mode, n), z in zc.items():
                if z is None:
                    continue
                for p in peers:
                    r = _ch(rows, f"{p}: {mode}", n)
                    if r is None:
                        continue
                    total += 1
                    if r.median_s <= z.median_s:
                        behind.append(f"{p} at {fmt_size(n)} {mode} ({fmt_time(r.median_s)} vs {fmt_time(z.median_s)})")
                    if r.extra["p99_s"] <= z.extra["p99_s"]:
                        behind99.append(f"{p} at {fmt_size(n)} {mode}")
            lines.append(
                f"- channel p50 ahead of every peer at every size ({len(peers)} peers): ahead in "
                f"{total - len(behind)} of {total}" + (f", behind {'; '.join(behind)}" if behind else "")
                + f" ({_verdict(not behind)}); at p99 ahead in {total - len(behind99)} of {total}"
                + (f" (not: {', '.join(behind99)})" if behind99 else "")
            )
        z = _ch(rows, f"{CHANNEL_ZC}: throughput", CHANNEL_SIZES[0])
        if z is not None:
            best = max((r for r in rows if r.suite == "channel" and r.method.endswith(": throughput") and r is not z),
                       key=lambda r: r.extra["msgs_per_s"], default=None)
            vs = f"; best peer {best.method[: -len(': throughput')]} {best.extra['msgs_per_s']:,.0f}/s" if best else ""
            lines.append(f"- channel throughput at {fmt_size(CHANNEL_SIZES[0])}, block: {z.extra['msgs_per_s']:,.0f} messages/s, "
                         f"all {z.extra['messages']:,.0f} in order{vs} (target >= 1,000,000/s: "
                         f"{_verdict(z.extra['msgs_per_s'] >= 1e6)})")
    frame_targets = (("frame: loan() + a[...] = v", "frame: one core, a[...] = v (NumPy)", 0.9, "one core's write"),
                     ("frame: send(array)", "frame: one memcpy, np.copyto", 0.8, "one memcpy"))
    for method, base, limit, what in frame_targets:
        r = next((x for x in rows if x.suite == "channel" and x.method == method), None)
        b = next((x for x in rows if x.suite == "channel" and x.method == base), None)
        if r is not None and b is not None:
            ratio = b.median_s / r.median_s
            lines.append(f"- {fmt_size(r.size)} frame, {method[7:]}: {r.extra['GBps']:.2f} GB/s = {ratio:.2f}x {what} "
                         f"({b.extra['GBps']:.2f} GB/s; target >= {limit}x: {_verdict(ratio >= limit)})")
    a = [r for r in (_ch(rows, f"asyncio recv_async(): {m}", CHANNEL_SIZES[0]) for m in ("waiting", "asleep")) if r is not None]
    if a:
        per = ", ".join(f"{r.method.split(': ')[1]} {fmt_time(r.median_s)}" for r in a)
        lines.append(f"- asyncio recv_async() one-way p50: {per} "
                     f"(target <= 50 µs: {_verdict(all(r.median_s <= 50e-6 for r in a))})")
    r = _ch(rows, "idle subscriber in recv()", 0)
    if r is not None:
        lines.append(f"- idle subscriber in recv(): {r.extra['cpu_pct']:.3f} % of one core over {r.extra['seconds']:.0f} s "
                     f"(target < 1 %: {_verdict(r.extra['cpu_pct'] < 1)})")
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
    - channel (its 64 MiB frames): the channel's slots, and here one private array to write
      and one to copy from.
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
    if suite == "channel":
        shm = CHANNEL_FRAME_SLOTS * _pages(n) + 2 * MiB  # + the control block, log and tables
        return shm, shm + 2 * n
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
    channel_ways: List[str] = field(default_factory=list)

    def steps(self, handoffs: Callable[[int], int]) -> int:
        total = len(self.sizes.get("inproc", []))
        total += sum(1 + handoffs(n) for n in self.sizes.get("interproc", []))
        total += len(self.sizes.get("ray", []))
        total += sum(len(touch_variants(n in self.touch_shared)) for n in self.sizes.get("touch", []))
        if "channel" in self.sizes:  # the machine's load, one per way, the frames, asyncio and idle
            total += 1 + len(self.channel_ways) + (CHANNEL_FRAME in self.sizes["channel"]) + 1
        return total


def make_plan(suites: Sequence[str], sizes: Sequence[int], room: Room, shm_methods: int) -> Plan:
    plan = Plan()
    for suite in suites:
        keep: List[int] = []
        if suite == "channel":  # fixed message sizes, whatever --sizes says; frames if they fit
            keep = list(CHANNEL_SIZES)
            why = room.lack(*needs(suite, CHANNEL_FRAME))
            if why is None:
                keep.append(CHANNEL_FRAME)
            else:
                plan.skipped.append(f"skipped {fmt_size(CHANNEL_FRAME)} in channel (its frames; the rest runs): {why}")
            plan.sizes[suite] = keep
            continue
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
    p.add_argument("--peers", default="SharedArray,ray,pyzmq,faster-fifo,iceoryx2",
                   help="optional peers to include when installed (default: %(default)s)")
    p.add_argument("--out", default="bench-results", help="directory for results.json, results.csv, bench.png")
    p.add_argument("--quick", action="store_true", help="small sizes and few repetitions (a smoke run)")
    p.add_argument("--smoke", action="store_true",
                   help="like --quick, with the fewest channel messages that still measure (for tests)")
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    a = p.parse_args(argv)
    sizes: List[int] = a.sizes
    reps = a.reps
    cp = ChannelPlan()
    if a.quick or a.smoke:
        sizes, reps = [4 * KiB, 1 * MiB, 16 * MiB], 5
        cp = ChannelPlan.quick()
    if a.smoke:
        cp = ChannelPlan(rounds=300, stamps=50, thr_s=1.0, frames=3, async_rounds=100, idle_s=1.0)
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
    order = [s for s in ("inproc", "interproc", "ray", "touch", "channel") if s in suites or (s == "ray" and use_ray)]
    room = Room.now()
    plan = make_plan(order, sizes, room, shm_methods=len(inter_methods) - 1)
    if "channel" in order:
        plan.channel_ways, lines = channel_ways(peers)
        plan.skipped += lines
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
            elif suite == "channel":
                got = []
                try:
                    suite_channel(sz, cp, prog, plan.channel_ways, got)
                except KeyboardInterrupt:  # keep (and show) the figures it has
                    rows += got
                    if got:
                        with prog.quiet():
                            print(table(got, footer=False), flush=True)
                    raise
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


