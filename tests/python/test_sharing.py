"""Typed sharing between processes: every dtype family, subprocesses and a spawn pool."""

import multiprocessing as mp
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import zcbuf
from conftest import run_py

DTYPES = [
    "?",
    "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8",
    "f2", "f4", "f8", "g",
    "c8", "c16",
    ">i4", ">f8", "<u2",
    "S7", "U5", "V3",
    "M8[ns]", "m8[s]",
    [("x", "<f4"), ("y", ">i2"), ("name", "S4")],
    [("a", "u1"), ("b", [("c", "f8"), ("d", "i4", (2,))])],
    np.dtype({"names": ["p", "q"], "formats": ["u1", "f8"], "offsets": [0, 8], "itemsize": 24}),
]


def sample(dt: np.dtype, shape) -> np.ndarray:
    n = int(np.prod(shape))
    raw = (np.arange(n * dt.itemsize, dtype=np.uint64) * 2654435761 % 251).astype(np.uint8)
    return raw.view(dt).reshape(shape)


@pytest.mark.parametrize("spec", DTYPES, ids=lambda d: str(d)[:30])
def test_dtype_round_trips_through_another_process(spec):
    dt = np.dtype(spec)
    shape = (3, 2)
    buf = zcbuf.empty(shape, dt, shared=True)
    buf.asarray("u1")[:] = sample(dt, shape).reshape(-1).view(np.uint8)
    out = run_py(
        """
        import sys, zcbuf, numpy as np
        b = zcbuf.open(sys.argv[1])
        a = b.asarray()
        sys.stdout.write(repr(a.dtype.descr) + "\\n" + repr(a.shape) + "\\n" + a.tobytes().hex())
        a.view(np.uint8)[...] ^= 0xFF   # write back through the other process's view
        """,
        buf.name,
    )
    descr, shp, hexdata = out.split("\n")
    assert descr == repr(dt.descr)
    assert shp == repr(shape)
    assert bytes.fromhex(hexdata) == sample(dt, shape).tobytes()
    assert (buf.asarray().view(np.uint8) == (sample(dt, shape).view(np.uint8) ^ 0xFF)).all()
    buf.free()


def test_readonly_in_another_process_cannot_write():
    buf = zcbuf.empty((4,), "f8", shared=True)
    out = run_py(
        """
        import sys, zcbuf
        b = zcbuf.open(sys.argv[1], readonly=True)
        a = b.asarray()
        for attempt in ("a[0] = 1", "a.flags.writeable = True", "a.setflags(write=True)"):
            try:
                exec(attempt)
                print("ALLOWED", attempt)
            except ValueError:
                print("refused")
        """,
        buf.name,
    )
    assert out.split() == ["refused"] * 3
    buf.free()


def _worker(args):
    handle, row = args
    a = handle.asarray()
    a[row, :] = row + 1
    return float(a[row].sum())


def test_spawn_pool_with_pickled_handles():
    buf = zcbuf.empty((8, 1000), "f4", shared=True)
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        sums = pool.map(_worker, [(buf, r) for r in range(8)])
    assert sums == [1000.0 * (r + 1) for r in range(8)]
    a = buf.asarray()
    assert (a == np.arange(1, 9, dtype="f4")[:, None]).all()
    name = buf.name
    buf.free()
    assert os.path.exists(f"/dev/shm/{name}"), "our array still maps it"
    del a
    assert os.path.exists(f"/dev/shm/{name}"), "the freed Buffer object still maps it"
    del buf
    assert not os.path.exists(f"/dev/shm/{name}"), "workers and parent all left: name removed"


def test_name_survives_creator_free_while_other_process_holds_it():
    buf = zcbuf.empty((16,), "u1", shared=True)
    name = buf.name
    p = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(
            """
            import sys, os, zcbuf
            b = zcbuf.open(sys.argv[1])
            print("opened", flush=True)
            sys.stdin.readline()
            print(os.path.exists("/dev/shm/" + sys.argv[1]), int(b.asarray().sum()), flush=True)
            b.free()
            del b  # the Buffer object keeps its mapping (the hold) while it lives
            print(os.path.exists("/dev/shm/" + sys.argv[1]), flush=True)
            """), name],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert p.stdout.readline().strip() == "opened"
    buf.asarray()[:] = 2
    buf.free()
    del buf  # the creator lets go entirely (the Buffer object kept its mapping)
    assert os.path.exists(f"/dev/shm/{name}"), "a live holder keeps the name"
    p.stdin.write("go\n")
    p.stdin.flush()
    assert p.stdout.readline().split() == ["True", "32"]
    assert p.stdout.readline().strip() == "False"
    assert p.wait(timeout=30) == 0


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=4),
    code=st.sampled_from(["i1", "u2", ">i4", "f8", "c8", "S3", "U2", "?"]),
)
def test_shapes_and_dtypes_round_trip_in_process(shape, code):
    dt = np.dtype(code)
    buf = zcbuf.empty(tuple(shape), dt, shared=True)
    other = zcbuf.open(buf.name)
    a, b = buf.asarray(), other.asarray()
    assert b.dtype == dt and b.shape == tuple(shape)
    if a.size:
        buf.asarray("u1")[:] = 7
        assert b.tobytes() == a.tobytes()
    other.free()
    buf.free()


def _fork_child(name, box, q_in, q_out):
    b = zcbuf.open(name)
    # Gives up the inherited handle (box holds this process's only reference to the inherited
    # Buffer object, which keeps its mapping while it lives): the child still holds through `b`.
    inherited_buf = box.pop()
    inherited_buf.free()
    del inherited_buf
    q_out.put([(s.held, os.getpid() in s.holders) for s in zcbuf.ls() if s.name == name])
    q_in.get()  # the parent has freed its handle
    q_out.put((os.path.exists(f"/dev/shm/{name}"), int(b.asarray().sum())))
    b.free()
    del b
    q_out.put(os.path.exists(f"/dev/shm/{name}"))


def test_fork_children_are_holders_of_their_own():
    """A forked child that frees the Buffer it inherited still holds the segment through its own
    open; the parent's free then keeps the name; the child, last, removes it."""
    # The buffer is kept only in `box`, never in a local of this frame: a fork child has a copy
    # of this frame, and must be able to let go of every reference to the Buffer it inherited.
    box = [zcbuf.empty((100,), "u1", shared=True)]
    box[0].asarray()[:] = 1
    name = box[0].name
    inherited = zcbuf.create(64, shared=True)  # the child inherits this handle and never frees it
    ctx = mp.get_context("fork")
    q_in, q_out = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_fork_child, args=(name, box, q_in, q_out), daemon=True)
    p.start()
    try:
        assert q_out.get(timeout=30) == [(True, True)], "the child holds it under its own pid"
        box.pop().free()  # and no reference to the Buffer object is left here
        assert os.path.exists(f"/dev/shm/{name}"), "the forked child still holds it"
        q_in.put("go")
        assert q_out.get(timeout=30) == (True, 100)
        assert q_out.get(timeout=30) is False, "the child was the last holder: name removed"
        p.join(30)
        assert p.exitcode == 0
    finally:
        if p.is_alive():
            p.kill()
    # The child exited with its inherited mapping of `inherited`; the parent still holds it,
    # and its free (the last holder's) removes the name.
    seg = [s for s in zcbuf.ls() if s.name == inherited.name]
    assert seg and seg[0].held and seg[0].holders == (os.getpid(),)
    name = inherited.name
    inherited.free()
    del inherited  # the Buffer object keeps its mapping (our hold) while it lives
    assert not os.path.exists(f"/dev/shm/{name}")
