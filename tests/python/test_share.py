"""Sending views, not copies: zcbuf.share(view) arrives in a worker as a view of the same pages;
a freed Buffer (or a view of one) refuses to pickle in the sender instead of hanging a Pool."""

import multiprocessing as mp
import pickle
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

import zcbuf


def fill(v, value):
    v[...] = value
    return v.shape, v.strides, v.dtype.str, bool(v.flags.writeable)


def describe(v):
    return v.shape, v.strides, v.dtype.str, bool(v.flags.writeable), v.tolist()


def views_of(a):
    return {
        "row": a[1],
        "block": a[2:4, 1:5],
        "strided": a[::2, ::3],
        "transposed": a.T,
        "reversed": a[::-1, 5],
        "reshaped": a.reshape(12, 4)[7],
        "retyped": a.view("u4")[0, :4],
        "scalar-like": a[5, 7:8],
    }


@pytest.mark.parametrize("ctx", ["fork", "spawn"])
def test_views_arrive_as_views_in_a_pool(ctx):
    buf = zcbuf.empty((6, 8), "f8", shared=True)
    a = buf.asarray()
    views = views_of(a)
    with ProcessPoolExecutor(2, mp_context=mp.get_context(ctx)) as ex:
        for i, (label, v) in enumerate(views.items()):
            a[:] = 0
            got = ex.submit(fill, zcbuf.share(v), i + 1).result(timeout=60)
            assert got == (v.shape, v.strides, v.dtype.str, True), label
            expect = np.zeros_like(a)
            views_of(expect)[label][...] = i + 1
            assert (a == expect).all(), f"{label}: the worker's writes are not where the view is"
    buf.free()


def test_pool_map_over_rows_and_plain_arrays_copy():
    buf = zcbuf.empty((4, 1000), "i8", shared=True)
    a = buf.asarray()
    with mp.get_context("spawn").Pool(2) as pool:
        pool.starmap(fill, [(zcbuf.share(row), k) for k, row in enumerate(a)])
        assert (a == np.arange(4)[:, None]).all()
        # What plain arrays do (said in docs/python.md): they pickle as copies; writes are lost.
        pool.starmap(fill, [(row, 99) for row in a])
        assert (a == np.arange(4)[:, None]).all()
    buf.free()


def test_round_trip_keeps_layout_and_memory():
    buf = zcbuf.empty((5, 7), "<i4", shared=True)
    a = buf.asarray()
    a[:] = np.arange(35).reshape(5, 7)
    for v in (a[1:4, ::2], a.T[::-1], a[0], a[::-2, ::-3]):
        r = pickle.loads(pickle.dumps(zcbuf.share(v)))
        assert describe(r) == describe(v)
        assert isinstance(r, np.ndarray)
        r[...] = -1  # another mapping of the same pages, in this process
        assert (v == -1).all()
    buf.free()


def test_file_buffer_views(tmp_path):
    path = str(tmp_path / "views.zcbuf")
    buf = zcbuf.empty((3, 3), "f4", path=path)
    a = buf.asarray()
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
        ex.submit(fill, zcbuf.share(a[:, 1]), 2.5).result(timeout=60)
    assert (a[:, 1] == 2.5).all() and a.sum() == 7.5
    buf.free()


def test_readonly_views_arrive_readonly():
    buf = zcbuf.empty(10, "u1", shared=True)
    ro = zcbuf.open(buf.name, readonly=True)
    r = pickle.loads(pickle.dumps(zcbuf.share(ro.asarray()[2:6])))
    assert not r.flags.writeable
    v = buf.asarray()[1:3]
    v.flags.writeable = False  # the sender's view said read-only: so does the receiver's
    r2 = pickle.loads(pickle.dumps(zcbuf.share(v)))
    assert not r2.flags.writeable
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
        assert ex.submit(describe, zcbuf.share(ro.asarray())).result(timeout=60)[3] is False
    ro.free()
    buf.free()


def test_share_refuses_what_cannot_be_sent():
    with pytest.raises(zcbuf.InvalidArgumentError, match="not a view of zcbuf memory"):
        zcbuf.share(np.zeros(3))
    priv = zcbuf.create(16)
    with pytest.raises(zcbuf.InvalidArgumentError, match="private"):
        zcbuf.share(priv.asarray()[2:])
    with pytest.raises(zcbuf.InvalidArgumentError, match="DLPack producer"):
        zcbuf.share([1, 2])
    buf = zcbuf.create(16, shared=True)
    assert zcbuf.share(buf) is buf  # a Buffer already pickles as a handle
    h = zcbuf.share(buf.asarray()[4:])
    assert "offset=4" in repr(h)
    buf.free()
    with pytest.raises(zcbuf.NotFoundError, match="freed"):
        pickle.dumps(h)  # freed after share(): refused at pickling
    with pytest.raises(zcbuf.NotFoundError, match="freed"):
        zcbuf.share(buf)
    priv.free()


def test_freed_buffer_refuses_to_pickle_pool_does_not_hang():
    buf = zcbuf.create(64, shared=True)
    buf.free()
    with pytest.raises(zcbuf.NotFoundError, match="freed"):
        pickle.dumps(buf)
    with mp.get_context("spawn").Pool(1) as pool:
        r = pool.map_async(len, [buf])
        with pytest.raises(zcbuf.NotFoundError):
            r.get(timeout=60)  # once hung forever: the worker could not open the name
        assert pool.apply(len, ([1, 2],)) == 2  # the pool still works
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
        f = ex.submit(len, buf)
        with pytest.raises(zcbuf.NotFoundError):
            f.result(timeout=60)
        assert ex.submit(len, [1]).result(timeout=60) == 1  # not broken


def _write_seven(v):
    v[...] = 7
    import os as _os

    return _os.getcwd()


def test_file_views_reach_the_same_file_from_another_cwd(tmp_path):
    """A file made with a relative path travels as an absolute one: a worker in another
    directory writes to the sender's file, never to a namesake there."""
    import os

    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    old = os.getcwd()
    os.chdir(a_dir)
    try:
        buf = zcbuf.empty(4, "i8", path="data.zcbuf")
        zcbuf.empty(4, "i8", path=str(b_dir / "data.zcbuf")).free()  # a namesake elsewhere
    finally:
        os.chdir(old)
    assert buf.path == str(a_dir / "data.zcbuf")
    ctx = mp.get_context("spawn")
    os.chdir(b_dir)  # spawn workers start in the parent's cwd at the time
    try:
        with ProcessPoolExecutor(1, mp_context=ctx) as ex:
            assert ex.submit(_write_seven, zcbuf.share(buf.asarray())).result(timeout=60) == str(b_dir)
            assert ex.submit(len, buf).result(timeout=60) == 32  # a pickled Buffer too
    finally:
        os.chdir(old)
    assert buf.asarray().tolist() == [7, 7, 7, 7]
    assert zcbuf.open_file(str(b_dir / "data.zcbuf")).asarray().tolist() == [0, 0, 0, 0]
    buf.free()


def test_shared_view_array_respects_copy_false():
    buf = zcbuf.empty(4, "f4", shared=True)
    h = zcbuf.share(buf.asarray())
    assert np.asarray(h, copy=False) is h.array or np.shares_memory(np.asarray(h, copy=False), buf.asarray())
    with pytest.raises(ValueError, match="copy=False"):
        np.asarray(h, dtype="f8", copy=False)
    buf.free()


def _add_one(v):
    v += 1
    return type(v).__name__


def test_share_finds_zcbuf_memory_behind_dlpack_and_torch():
    """Arrays over zcbuf memory whose base chain does not lead back to it (made through DLPack,
    or by torch) are still sent as views: found by address among this process's mappings."""
    buf = zcbuf.empty((3, 4), "f4", shared=True)
    a = buf.asarray()
    via_dlpack = np.from_dlpack(buf)
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
        assert ex.submit(_add_one, zcbuf.share(via_dlpack[1])).result(timeout=60) == "ndarray"
        assert (a[1] == 1).all() and a.sum() == 4
        torch = None
        try:
            import torch  # noqa: F811
        except ImportError:
            pass
        if torch is not None:
            t = torch.from_dlpack(buf)
            assert ex.submit(_add_one, zcbuf.share(t[2])).result(timeout=60) == "ndarray"
            assert (a[2] == 1).all() and float(t.sum()) == 8
    with pytest.raises(zcbuf.InvalidArgumentError, match="not a view of zcbuf memory"):
        zcbuf.share(np.from_dlpack(np.zeros(3)))
    buf.free()
