"""A Buffer is an array-like in every ecosystem: the buffer protocol, __array_interface__, DLPack,
pyarrow and PyTorch (optional extras: their tests skip when the package is absent).

Each export is checked for zero copy (same address, writes seen both ways) and for holding the
memory after ``free()`` (the consumer outlives the Buffer object and the id).
"""

import collections.abc
import os
import ctypes
import gc
import pickle
import sys

import numpy as np
import pytest

import zcbuf
from conftest import mappings_of

NP_VERSIONED = tuple(int(x) for x in np.__version__.split(".")[:2]) >= (2, 1)


def addr(x) -> int:
    """The data address of anything NumPy can view without a copy."""
    return np.asarray(x).__array_interface__["data"][0] if not isinstance(x, memoryview) else (
        np.frombuffer(x, np.uint8).__array_interface__["data"][0]
    )


def typed(shared=True, readonly=False):
    buf = zcbuf.empty((4, 6), "f4", shared=shared)
    buf.asarray()[:] = np.arange(24, dtype="f4").reshape(4, 6)
    if readonly:
        ro = zcbuf.open(buf.name, readonly=True)
        return buf, ro
    return buf


def drop_and_check_unmapped(name, *refs):
    del refs
    gc.collect()
    assert mappings_of(name) == 0


# -- the buffer protocol -------------------------------------------------------------------------


def test_memoryview_is_typed_and_zero_copy():
    buf = typed()
    m = memoryview(buf)
    assert (m.format, m.shape, m.itemsize, m.nbytes, m.readonly) == ("f", (4, 6), 4, 96, False)
    assert m.c_contiguous
    assert addr(m.cast("B")) == addr(buf.asarray())
    m[1, 2] = 99.0  # writes seen both ways
    assert buf.asarray()[1, 2] == 99.0
    buf.asarray()[3, 5] = -1.0
    assert m[3, 5] == -1.0
    assert len(buf) == buf.nbytes == 96  # len() is the byte length, as documented
    assert bytes(buf) == buf.asarray().tobytes()
    buf.free()


def test_raw_buffer_exports_bytes():
    buf = zcbuf.create(10, shared=True)
    m = memoryview(buf)
    assert (m.format, m.shape, m.readonly) == ("B", (10,), False)
    m[3] = 7
    assert bytes(buf)[3] == 7 and len(bytes(buf)) == 10
    buf.free()


def test_pep688_buffer_abc():
    buf = zcbuf.create(8)
    if sys.version_info >= (3, 12):
        assert isinstance(buf, collections.abc.Buffer)
        assert bytes(buf.__buffer__(0)) == bytes(8)
    assert memoryview(buf).nbytes == 8  # on every version, through the C slot
    buf.free()


def test_readonly_buffer_refuses_writable_exports():
    buf, ro = typed(readonly=True)
    m = memoryview(ro)
    assert m.readonly
    with pytest.raises(TypeError):
        m[0, 0] = 1.0
    # A consumer that asks for a writable buffer is refused, with the buffer protocol's error.
    with pytest.raises((BufferError, TypeError)):
        (ctypes.c_char * ro.nbytes).from_buffer(ro)
    assert not np.asarray(ro).flags.writeable
    with pytest.raises(ValueError):
        np.asarray(ro)[0, 0] = 1
    ro.free()
    buf.free()


def test_memoryview_keeps_memory_after_free():
    buf = typed()
    name = buf.name
    m = memoryview(buf)
    buf.free()
    del buf
    gc.collect()
    assert mappings_of(name) >= 1
    assert m[2, 3] == 15.0
    m[2, 3] = 1.0
    del m
    gc.collect()
    assert mappings_of(name) == 0


def test_freed_buffer_makes_no_new_exports():
    buf = typed()
    buf.free()
    with pytest.raises(zcbuf.NotFoundError):
        memoryview(buf)
    with pytest.raises(zcbuf.NotFoundError):
        np.asarray(buf)
    with pytest.raises(zcbuf.NotFoundError):
        np.from_dlpack(buf)
    with pytest.raises(zcbuf.NotFoundError):
        buf.__array_interface__


def test_dtype_the_buffer_protocol_cannot_carry():
    buf = zcbuf.empty(3, "M8[s]")
    with pytest.raises((ValueError, BufferError)):
        memoryview(buf)  # NumPy's own answer for such an array
    a = np.asarray(buf)  # through __array_interface__: still typed and zero copy
    assert a.dtype == np.dtype("M8[s]") and addr(a) == addr(buf.asarray())
    buf.free()


# -- __array_interface__ ------------------------------------------------------------------------


def test_array_interface_zero_copy_and_keeps_memory():
    buf = typed()
    name = buf.name
    iface = buf.__array_interface__
    assert iface["shape"] == (4, 6) and iface["typestr"] == "<f4"
    assert iface["data"] == (addr(buf.asarray()), False)

    class OnlyInterface:  # a consumer that sees nothing but the interface of the Buffer
        def __init__(self, b):
            self.b = b

        @property
        def __array_interface__(self):
            return self.b.__array_interface__

    a = np.asarray(OnlyInterface(buf))
    assert addr(a) == addr(buf.asarray())
    a[0, 0] = 42
    assert buf.asarray()[0, 0] == 42
    # NumPy keeps the object that gave the interface as the array's base: the Buffer, which
    # keeps the memory while it lives, freed or not.
    buf.free()
    del buf
    gc.collect()
    assert a[0, 0] == 42 and mappings_of(name) >= 1
    del a
    gc.collect()
    assert mappings_of(name) == 0


# -- DLPack --------------------------------------------------------------------------------------


def test_dlpack_numpy_zero_copy_and_keeps_memory():
    buf = typed()
    name = buf.name
    assert buf.__dlpack_device__() == (1, 0)
    a = np.from_dlpack(buf)
    assert a.shape == (4, 6) and a.dtype == np.float32 and addr(a) == addr(buf.asarray())
    a[1, 1] = 5
    assert buf.asarray()[1, 1] == 5
    buf.free()
    del buf
    gc.collect()
    assert mappings_of(name) >= 1 and a[1, 1] == 5
    del a
    gc.collect()
    assert mappings_of(name) == 0


def test_dlpack_capsule_dropped_unconsumed_releases():
    buf = typed()
    name = buf.name
    cap = buf.__dlpack__()
    buf.free()
    del buf
    gc.collect()
    assert mappings_of(name) >= 1  # the capsule holds the lease
    del cap
    gc.collect()
    assert mappings_of(name) == 0


def test_dlpack_readonly_is_a_copy_unless_lent_on_request():
    buf, ro = typed(readonly=True)
    # By default a read-only buffer is exported as a copy: some consumers (PyTorch) ignore the
    # read-only flag, and a write through their tensor would hit a PROT_READ mapping.
    c = np.from_dlpack(ro)
    assert addr(c) != addr(ro.asarray()) and (c == ro.asarray()).all()
    c[0, 0] = -5  # a private copy: writable, and the buffer is unchanged
    assert ro.asarray()[0, 0] == 0
    assert ro.__dlpack__() is not None  # legacy request: a copy too
    if NP_VERSIONED:
        # Lent on request (copy=False): a DLPack 1.x capsule with the read-only flag, which
        # NumPy honours.
        cap = ro.__dlpack__(max_version=(1, 0), copy=False)
        assert "dltensor_versioned" in repr(cap)
        a = np.from_dlpack(ro, copy=False)
        assert not a.flags.writeable and addr(a) == addr(ro.asarray())
        del cap, a
    # A legacy (unversioned) capsule cannot say "read-only": never lent without a copy.
    with pytest.raises(BufferError):
        ro.__dlpack__(copy=False)
    ro.free()
    buf.free()


def test_dlpack_device_copy_and_stream_arguments():
    buf = typed()
    with pytest.raises(BufferError):
        buf.__dlpack__(dl_device=(2, 0))  # CUDA
    with pytest.raises(BufferError):
        buf.__dlpack__(stream=1)
    if NP_VERSIONED:
        c = np.from_dlpack(buf, copy=True)
        assert addr(c) != addr(buf.asarray()) and (c == buf.asarray()).all()
        assert addr(np.from_dlpack(buf, copy=False)) == addr(buf.asarray())
        assert addr(np.from_dlpack(buf, device="cpu")) == addr(buf.asarray())
    buf.free()


def test_from_dlpack_and_from_array_accept_producers():
    src = np.arange(12, dtype="i2").reshape(3, 4)
    b = zcbuf.from_dlpack(src, shared=True)
    assert b.dtype == np.int16 and b.shape == (3, 4) and (b.asarray() == src).all()
    assert addr(b.asarray()) != addr(src)  # zcbuf owns its memory: one copy in
    other = zcbuf.from_dlpack(b, shared=True)  # a Buffer is a DLPack producer too
    assert (other.asarray() == src).all()
    assert (zcbuf.from_array(memoryview(b)).asarray() == src).all()  # buffer protocol
    assert zcbuf.from_array(memoryview(b)).shape == (3, 4)
    assert bytes(zcbuf.from_array(b"abc").asarray()) == b"abc"
    with pytest.raises(zcbuf.InvalidArgumentError, match="does not speak DLPack"):
        zcbuf.from_dlpack([1, 2, 3])
    for x in (b, other):
        x.free()


# -- pyarrow (installed by .ci/run) ----------------------------------------------------------


def test_pyarrow_py_buffer_zero_copy_and_keeps_memory():
    pa = pytest.importorskip("pyarrow")
    buf = typed()
    name = buf.name
    pb = pa.py_buffer(buf)
    assert pb.size == 96 and pb.address == addr(buf.asarray()) and pb.is_mutable
    arr = pa.Array.from_buffers(pa.float32(), 24, [None, pb])  # an Arrow array, no copy
    assert arr[7].as_py() == 7.0
    buf.asarray()[1, 1] = 123.0  # element 7
    assert arr[7].as_py() == 123.0
    np.frombuffer(pb, "f4")  # and back to NumPy over the same bytes
    buf.free()
    del buf
    gc.collect()
    assert mappings_of(name) >= 1 and arr[7].as_py() == 123.0
    del arr, pb
    gc.collect()
    assert mappings_of(name) == 0


def test_pyarrow_foreign_buffer_with_base_buf_survives_free():
    """``pa.foreign_buffer(addr, n, base=buf)`` keeps only ``buf``: it segfaulted once free()
    unmapped the memory under it."""
    pa = pytest.importorskip("pyarrow")
    buf = typed()
    name = buf.name
    fb = pa.foreign_buffer(addr(buf.asarray()), buf.nbytes, base=buf)
    buf.free()  # retires the id; the Buffer object (fb's base) keeps the pages
    gc.collect()
    assert mappings_of(name) >= 1
    assert np.frombuffer(fb, "f4")[23] == 23.0
    del buf
    gc.collect()
    assert np.frombuffer(fb, "f4")[22] == 22.0
    del fb
    gc.collect()
    assert mappings_of(name) == 0


def test_pyarrow_readonly_and_from_array():
    pa = pytest.importorskip("pyarrow")
    buf, ro = typed(readonly=True)
    pb = pa.py_buffer(ro)
    assert not pb.is_mutable and pb.address == addr(ro.asarray())
    b2 = zcbuf.from_array(pb)  # a pyarrow buffer is a buffer-protocol producer
    assert b2.nbytes == 96 and bytes(b2) == bytes(buf)
    for x in (b2, ro, buf):
        x.free()


# -- PyTorch (optional: pip install torch; not installed by CI) ---------------------------------


def test_torch_from_dlpack_frombuffer_as_tensor():
    torch = pytest.importorskip("torch")
    buf = typed()
    name = buf.name
    base = addr(buf.asarray())
    t1 = torch.from_dlpack(buf)
    t2 = torch.frombuffer(buf, dtype=torch.float32)
    t3 = torch.as_tensor(buf)
    assert t1.shape == (4, 6) and t3.shape == (4, 6) and t2.shape == (24,)
    assert t1.data_ptr() == t2.data_ptr() == t3.data_ptr() == base
    t1[0, 1] = 50
    assert buf.asarray()[0, 1] == 50 and t2[1] == 50 and t3[0, 1] == 50
    buf.asarray()[3, 3] = -3
    assert t1[3, 3] == -3
    buf.free()
    del buf
    gc.collect()
    assert mappings_of(name) >= 1 and float(t1.sum()) == float(t2.sum())
    del t1, t2, t3
    gc.collect()
    assert mappings_of(name) == 0


def test_torch_into_zcbuf_and_readonly():
    torch = pytest.importorskip("torch")
    t = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    b = zcbuf.from_dlpack(t, shared=True)
    assert b.shape == (2, 3) and b.dtype == np.float64 and b.asarray()[1, 2] == 5
    assert (zcbuf.open(b.name).asarray() == t.numpy()).all()
    b2 = zcbuf.from_array(t)
    assert (b2.asarray() == t.numpy()).all()
    ro = zcbuf.open(b.name, readonly=True)
    with pytest.raises((RuntimeError, BufferError, TypeError, ValueError)):
        torch.frombuffer(ro, dtype=torch.float64)  # asks for writable memory: refused
    # torch ignores DLPack's read-only flag, so a read-only buffer reaches it as a copy: a write
    # through the tensor cannot crash the process, nor change the buffer.
    t2 = torch.from_dlpack(ro)
    assert t2.data_ptr() != addr(ro.asarray())
    t2[0, 0] = 100
    assert ro.asarray()[0, 0] == 0
    for x in (ro, b2, b):
        x.free()


def test_exports_do_not_pickle_memory():
    # Sanity for users: a Buffer still pickles as a small handle, whatever it exports.
    buf = typed()
    assert len(pickle.dumps(buf)) < 200
    buf.free()


# -- the adversarial review's reproductions -------------------------------------------------


@pytest.mark.parametrize(
    "dtype",
    ["V8", {"names": ["x"], "formats": ["<i4"], "offsets": [4], "itemsize": 12}, "M8[ns]",
     [("a", "<i4"), ("b", "<f8")]],
    ids=["void", "padded-struct", "datetime", "struct"],
)
def test_dtypes_without_a_faithful_format_keep_their_type_and_bytes(dtype):
    """NumPy keeps the exact dtype (it falls back from the buffer protocol); byte consumers
    (bytes, hashlib, pyarrow) get the raw bytes; memoryview says why it cannot."""
    import hashlib

    dt = np.dtype(dtype)
    buf = zcbuf.empty(3, dt, shared=True)
    raw = buf.asarray().view("u1")
    raw[:] = np.arange(raw.size) % 251
    assert np.asarray(buf).dtype == dt and np.array([buf, buf]).shape == (2, 3)
    assert addr(np.asarray(buf)) == addr(buf.asarray())
    assert bytes(buf) == raw.tobytes()
    assert hashlib.sha256(buf).digest() == hashlib.sha256(raw.tobytes()).digest()
    with pytest.raises(BufferError, match="no buffer-protocol format"):
        memoryview(buf)
    pa = pytest.importorskip("pyarrow")
    assert pa.py_buffer(buf).to_pybytes() == raw.tobytes()
    buf.free()


def test_with_block_reusing_a_name_says_how():
    name = f"interop-loop-{os.getpid()}"
    with zcbuf.create(64, name=name) as b:
        pass
    # The freed Buffer object still maps it (it keeps its memory while it lives): the error
    # says so, and dropping it is enough.
    with pytest.raises(zcbuf.AlreadyExistsError, match="this process is one of them"):
        zcbuf.create(64, name=name)
    del b
    gc.collect()
    with zcbuf.create(64, name=name) as b:
        pass
    del b


def test_dlpack_consumer_alive_at_exit_leaves_no_name(tmp_path):
    """NumPy's DLPack deleter does nothing during interpreter shutdown, so the lease of a
    module-level consumer is never released: the exit handler still removes the name of a
    segment this process held last."""
    import subprocess

    code = (
        "import numpy as np, zcbuf\n"
        "buf = zcbuf.empty(4, 'f4', shared=True)\n"
        "a = np.from_dlpack(buf)\n"
        "print(buf.name)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    name = p.stdout.strip()
    assert name and not os.path.exists(f"/dev/shm/{name}"), f"{name} left behind at exit"


def test_torch_lazy_negative_and_conjugate_bits():
    torch = pytest.importorskip("torch")
    z = torch.tensor([1 + 2j, 3 - 4j])
    neg = z.conj().imag  # a lazy negative view: DLPack alone would lose the sign
    assert neg.is_neg()
    assert zcbuf.from_array(neg).asarray().tolist() == [-2.0, 4.0]
    assert zcbuf.from_dlpack(neg).asarray().tolist() == [-2.0, 4.0]
    c = z.conj()  # a lazy conjugate
    assert zcbuf.from_dlpack(c).asarray().tolist() == [1 - 2j, 3 + 4j]
