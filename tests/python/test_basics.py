import gc
import os
import pickle
import threading

import numpy as np
import pytest

import zcbuf
from conftest import map_count, mappings_of, rss_bytes, run_py


def addr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


@pytest.mark.parametrize("kind", ["private", "shared", "file"])
def test_zero_copy_same_address(kind, tmp_file):
    kw = {"private": {}, "shared": {"shared": True}, "file": {"path": tmp_file}}[kind]
    with zcbuf.create(1 << 16, **kw) as buf:
        a, b = buf.asarray(), np.asarray(buf)
        c = buf.asarray("u4")
        assert addr(a) == addr(b) == addr(c)
        a[:4] = [1, 0, 0, 0]
        assert c[0] == 1 and b[0] == 1
        assert not a.flags.owndata
        assert buf.kind == kind
        assert len(buf) == buf.nbytes == 1 << 16


def test_memory_is_zero_filled_and_typed():
    buf = zcbuf.empty((3, 4), "f8")
    a = buf.asarray()
    assert a.shape == (3, 4) and a.dtype == np.float64 and not a.any()
    assert buf.dtype == np.dtype("f8") and buf.shape == (3, 4)
    raw = zcbuf.create(10)
    assert raw.asarray().dtype == np.uint8 and raw.dtype is None and raw.shape is None
    buf.free()
    raw.free()


def test_free_keeps_arrays_and_unmaps_after_last_view():
    buf = zcbuf.create(1 << 20, shared=True)
    name = buf.name
    a = buf.asarray()
    a[:] = 9
    sl = a[10:20]
    v = a.view("u4").reshape(-1, 4)
    buf.free()
    buf.free()  # idempotent
    assert buf.freed
    with pytest.raises(zcbuf.NotFoundError):
        buf.asarray()
    # The id is retired, but this process still maps the segment, so it still holds it: the
    # name stays for others to open until the last view goes.
    assert os.path.exists(f"/dev/shm/{name}")
    assert mappings_of(name) >= 1  # memory still mapped
    assert sl.sum() == 90 and v[0, 0] == 0x09090909
    del a, v
    gc.collect()
    assert mappings_of(name) >= 1  # the slice still holds it
    assert os.path.exists(f"/dev/shm/{name}")
    assert zcbuf.open(name).asarray()[15] == 9  # another open still finds it
    assert sl[0] == 9
    del sl
    gc.collect()
    # The Buffer object itself keeps the memory while it lives, even freed (a raw-pointer
    # consumer such as pa.foreign_buffer(addr, n, base=buf) relies on it).
    assert mappings_of(name) >= 1
    del buf
    gc.collect()
    assert mappings_of(name) == 0
    assert not os.path.exists(f"/dev/shm/{name}")  # the last unmap removed the name


def test_garbage_collected_buffer_frees_itself():
    buf = zcbuf.create(4096, shared=True)
    name, id_ = buf.name, buf.id
    del buf
    gc.collect()
    assert not os.path.exists(f"/dev/shm/{name}")
    with pytest.raises(zcbuf.NotFoundError):
        zcbuf.get(id_)


def test_get_by_id_shares_and_does_not_own():
    buf = zcbuf.create(64)
    other = zcbuf.get(buf.id)
    other.asarray()[0] = 42
    assert buf.asarray()[0] == 42
    del other
    gc.collect()
    assert buf.asarray()[0] == 42  # get() did not free it
    buf.free()
    with pytest.raises(zcbuf.NotFoundError):
        zcbuf.get(buf.id)
    for bad in (0, -1, 2**64):
        with pytest.raises(zcbuf.NotFoundError):
            zcbuf.get(bad)


def test_open_by_name_in_process_and_readonly():
    buf = zcbuf.empty((5,), "i4", shared=True)
    ro = zcbuf.open(buf.name, readonly=True)
    assert ro.readonly and ro.dtype == np.dtype("i4") and ro.shape == (5,)
    r = ro.asarray()
    assert not r.flags.writeable
    with pytest.raises(ValueError):
        r[0] = 1
    with pytest.raises(ValueError):
        r.flags.writeable = True
    with pytest.raises(ValueError):
        np.asarray(ro).setflags(write=True)
    buf.asarray()[:] = [1, 2, 3, 4, 5]
    assert r.tolist() == [1, 2, 3, 4, 5]
    ro.free()
    buf.free()


def test_context_manager_and_repr():
    with zcbuf.empty(4, "f4", shared=True, name=f"zcbuf-t-{os.getpid()}") as buf:
        assert f"zcbuf-t-{os.getpid()}" in repr(buf)
    assert "freed" in repr(buf)


def test_asarray_dtype_and_shape_checks():
    buf = zcbuf.create(24)
    assert buf.asarray("f8").shape == (3,)
    assert buf.asarray("u1", shape=(2, 3)).shape == (2, 3)
    assert buf.asarray("f8", (3, 1)).shape == (3, 1)
    with pytest.raises(ValueError):
        buf.asarray("f8", shape=(4,))
    with pytest.raises(ValueError):
        buf.asarray("V5")  # 24 is not a multiple of 5
    with pytest.raises(ValueError):
        buf.asarray(object)
    with pytest.raises(ValueError):
        buf.asarray("u1", shape=(-2,))
    with pytest.raises(zcbuf.InvalidArgumentError):
        buf.asarray("u1", shape=("x",))
    buf.free()


def test_bad_inputs_raise_specific_errors(tmp_file):
    with pytest.raises(ValueError):
        zcbuf.create(-1)
    with pytest.raises(MemoryError):
        zcbuf.create(2**63)
    with pytest.raises(OverflowError):
        zcbuf.create(2**64)
    # impossible shapes: a clear InvalidArgumentError, not cffi's "int too big to convert"
    with pytest.raises(zcbuf.InvalidArgumentError, match="64 bits"):
        zcbuf.empty((2**40, 2**40), "f8")
    with pytest.raises(zcbuf.InvalidArgumentError, match="2\\*\\*64"):
        zcbuf.empty((2**64,), "u1")
    with pytest.raises(ValueError):
        zcbuf.empty((-1, 2))
    with pytest.raises(ValueError):
        zcbuf.empty((2,), object)
    with pytest.raises(ValueError):
        zcbuf.create(8, name="a/b")
    with pytest.raises(ValueError):
        zcbuf.create(8, name="")
    with pytest.raises(ValueError):
        zcbuf.create(8, name="x" * 201)
    with pytest.raises(ValueError):
        zcbuf.create(8, path=tmp_file, shared=True)
    with pytest.raises(LookupError):
        zcbuf.open("zcbuf-no-such-segment")
    with pytest.raises(zcbuf.NotFoundError):
        zcbuf.open_file(tmp_file + ".missing")
    with pytest.raises(TypeError):
        zcbuf.open(b"bytes-name")  # type: ignore[arg-type]
    buf = zcbuf.create(8, name=f"zcbuf-dup-{os.getpid()}")
    with pytest.raises(FileExistsError) as ei:
        zcbuf.create(8, name=buf.name)
    assert "open it instead" in str(ei.value)
    assert isinstance(ei.value, zcbuf.Error)
    buf.free()
    with open(tmp_file, "wb") as f:
        f.write(b"\x01" * 10000)
    with pytest.raises(zcbuf.CorruptError):
        zcbuf.open_file(tmp_file)
    with pytest.raises(FileExistsError):
        zcbuf.create(8, path=tmp_file)
    assert open(tmp_file, "rb").read() == b"\x01" * 10000  # untouched


def test_zero_length_everywhere(tmp_file):
    for buf in (zcbuf.create(0), zcbuf.create(0, shared=True), zcbuf.empty((0, 3), "f4", path=tmp_file)):
        a = buf.asarray()
        assert a.size == 0
        buf.free()
    b = zcbuf.open_file(tmp_file)
    assert b.asarray().shape == (0, 3)
    b.free()


def test_files_persist_across_processes(tmp_file):
    buf = zcbuf.empty((4, 4), "<i8", path=tmp_file)
    buf.asarray()[:] = np.arange(16).reshape(4, 4)
    buf.free()
    out = run_py(
        """
        import sys, zcbuf
        b = zcbuf.open_file(sys.argv[1])
        a = b.asarray()
        print(a.dtype, a.shape, int(a.sum()))
        a[0, 0] = 100
        """,
        tmp_file,
    )
    assert out.split() == ["int64", "(4,", "4)", "120"]
    b = zcbuf.open_file(tmp_file, readonly=True)
    assert b.asarray()[0, 0] == 100
    b.free()


def test_pickle_handles():
    buf = zcbuf.empty((3,), "f4", shared=True)
    buf.asarray()[:] = [1, 2, 3]
    data = pickle.dumps(buf)
    assert len(data) < 200
    other = pickle.loads(data)
    assert other.name == buf.name and other.asarray().tolist() == [1, 2, 3]
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(zcbuf.create(8))
    other.free()
    buf.free()


def test_threads_create_view_free():
    errors = []

    def work(seed):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(300):
                n = int(rng.integers(0, 5000))
                buf = zcbuf.create(n, shared=bool(rng.integers(0, 2)))
                a = buf.asarray()
                a[:] = seed
                b = zcbuf.get(buf.id).asarray()
                buf.free()
                assert (b == seed).all() and (a == seed).all()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors


def test_no_leak_over_many_cycles():
    def cycle(n):
        for _ in range(n):
            buf = zcbuf.create(8192, shared=True)
            a = buf.asarray()
            a[0] = 1
            buf.free()
            del a

    cycle(500)
    gc.collect()
    maps0, rss0 = map_count(), rss_bytes()
    cycle(20000)
    gc.collect()
    maps1, rss1 = map_count(), rss_bytes()
    assert maps1 <= maps0 + 2, (maps0, maps1)
    assert rss1 - rss0 < 8 << 20, (rss0, rss1)


def test_many_views_add_little_rss():
    buf = zcbuf.create(256 << 20)
    base = buf.asarray()
    base[::4096] = 1  # touch every page once
    gc.collect()
    rss0 = rss_bytes()
    views = [buf.asarray() for _ in range(1000)]
    rss1 = rss_bytes()
    assert rss1 - rss0 < 20 << 20, rss1 - rss0
    assert len({addr(v) for v in views}) == 1
    del views, base
    buf.free()


def test_asarray_infers_one_minus_one_dimension():
    b = zcbuf.create(48)
    assert b.asarray("f4", shape=(2, -1)).shape == (2, 6)
    assert b.asarray("u1", (-1, 4)).shape == (12, 4)
    with pytest.raises(zcbuf.InvalidArgumentError, match="does not divide"):
        b.asarray("f4", shape=(5, -1))
    with pytest.raises(zcbuf.InvalidArgumentError, match="more than one -1"):
        b.asarray("u1", shape=(-1, -1))
    b.free()
