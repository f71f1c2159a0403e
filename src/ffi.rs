//! The C ABI: plain `extern "C"` functions over [`Registry::global`].
//!
//! Every export checks its pointers, runs the safe API inside `guard` (which catches panics
//! and records the calling thread's error message) and returns a status code. Nothing else lives
//! here: no logic beyond argument checks and conversion.

use std::cell::RefCell;
use std::ffi::{CStr, OsStr, c_char, c_void};
use std::os::unix::ffi::OsStrExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use crate::error::{Error, Result};
use crate::header::Meta;
use crate::mapping::{CreateOptions, Kind};
use crate::registry::Registry;

/// Success.
pub const ZCBUF_OK: i32 = 0;
/// An argument was invalid (NULL pointer, bad name, unknown flag, shape that does not fit).
pub const ZCBUF_EINVAL: i32 = 1;
/// No such id, segment or file (or the id was freed).
pub const ZCBUF_ENOTFOUND: i32 = 2;
/// A segment or file by that name or path already exists.
pub const ZCBUF_EEXIST: i32 = 3;
/// Out of memory, shared memory or disk space.
pub const ZCBUF_ENOMEM: i32 = 4;
/// Permission denied by the operating system.
pub const ZCBUF_EPERM: i32 = 5;
/// A write was asked of something read-only.
pub const ZCBUF_EREADONLY: i32 = 6;
/// The segment or file is not a zcbuf buffer, is damaged, or has another header version.
pub const ZCBUF_ECORRUPT: i32 = 7;
/// Another I/O error.
pub const ZCBUF_EIO: i32 = 8;
/// A bug in zcbuf (a caught panic). The message says more.
pub const ZCBUF_EINTERNAL: i32 = 9;
/// A bounded wait ran out: another process held a segment's lock for too long (see
/// docs/security.md).
pub const ZCBUF_ETIMEDOUT: i32 = 10;
/// A channel's stream ended (its publisher closed it, or died) and every message sent before
/// was received.
pub const ZCBUF_ECLOSED: i32 = 11;

/// Open flag: map the data read-only (`PROT_READ`).
pub const ZCBUF_READ_ONLY: u32 = 1;
/// Create flag: do not reserve pages at creation. Gives up the guarantee that a full /dev/shm
/// or disk is an error at creation rather than a SIGBUS on a later write.
pub const ZCBUF_NO_RESERVE: u32 = 2;
/// Create flag: pre-fault the page tables at creation (`MAP_POPULATE`).
pub const ZCBUF_POPULATE: u32 = 4;
/// Create flag: ask for transparent huge pages (`madvise(MADV_HUGEPAGE)`); advice only.
pub const ZCBUF_HUGE_PAGES: u32 = 8;
/// Create flag (shared buffers): the segment persists after its last holder is gone, until
/// `zcbuf_unlink` removes it; `zcbuf_gc` leaves it. Without it, the last process to unmap the
/// segment removes its name.
pub const ZCBUF_PERSIST: u32 = 16;

/// Backing kind: an anonymous private mapping.
pub const ZCBUF_KIND_PRIVATE: u32 = 0;
/// Backing kind: a named POSIX shared-memory segment.
pub const ZCBUF_KIND_SHARED: u32 = 1;
/// Backing kind: a memory-mapped file.
pub const ZCBUF_KIND_FILE: u32 = 2;

/// What `zcbuf_info` reports about a buffer.
#[repr(C)]
pub struct ZcbufInfo {
    /// One of `ZCBUF_KIND_*`.
    pub kind: u32,
    /// 1 when mapped read-only, else 0.
    pub readonly: u32,
    /// Data length in bytes.
    pub len: usize,
    /// Bytes per element of the stored dtype (0 when untyped).
    pub itemsize: u64,
    /// Number of dimensions of the stored shape.
    pub ndim: u32,
    /// Length of the stored dtype string (0 when untyped).
    pub dtype_len: u32,
    /// Leases currently held on the buffer.
    pub leases: u64,
    /// 1 for a shared buffer created to persist (`ZCBUF_PERSIST`), else 0.
    pub persistent: u32,
    /// 1 for a shared buffer whose segment is sealed (`zcbuf_seal`, by any process), else 0.
    /// (Added after `persistent`, in what was padding: the struct's size is unchanged.)
    pub sealed: u32,
}

/// What `zcbuf_open_shared_acquire` fills in: an opened buffer, one lease on it, and its
/// description, from one call.
#[repr(C)]
pub struct ZcbufOpened {
    /// The new buffer id (free it with `zcbuf_free`).
    pub id: u64,
    /// The data address, valid until the lease is released with `zcbuf_release`.
    pub ptr: *mut u8,
    /// Data length in bytes.
    pub len: usize,
    /// Kind, flags, item size, dimensions, lease count.
    pub info: ZcbufInfo,
    /// The stored dtype, NUL-terminated ("" when untyped).
    pub dtype: [c_char; 513],
    /// The first `info.ndim` entries are the stored shape.
    pub shape: [u64; 64],
}

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Records this thread's last error message. A call made while the thread is being torn down
/// (e.g. from a pthread-key destructor, after Rust's thread-locals are gone) records nothing
/// and still returns its status: touching the thread-local then would abort the process.
fn set_error(msg: String) {
    let _ = LAST_ERROR.try_with(|e| {
        if let Ok(mut e) = e.try_borrow_mut() {
            *e = msg;
        }
    });
}

/// Runs `f`, catching panics; records the message of a failure for this thread.
fn guard(f: impl FnOnce() -> Result<()>) -> i32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => ZCBUF_OK,
        Ok(Err(e)) => {
            let code = e.code();
            set_error(e.to_string());
            code
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_error(format!(
                "internal error: zcbuf panicked: {what} (please report it)"
            ));
            ZCBUF_EINTERNAL
        }
    }
}

fn null(what: &str) -> Error {
    Error::InvalidArgument(format!("{what} is NULL"))
}

/// # Safety
/// `p` is NULL or a NUL-terminated string valid for reads.
unsafe fn c_str<'a>(p: *const c_char, what: &str) -> Result<&'a str> {
    if p.is_null() {
        return Err(null(what));
    }
    // SAFETY: the caller guarantees a NUL-terminated string.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map_err(|_| Error::InvalidArgument(format!("{what} is not valid UTF-8")))
}

/// # Safety
/// `p` is NULL or a NUL-terminated string valid for reads.
unsafe fn c_path<'a>(p: *const c_char, what: &str) -> Result<&'a Path> {
    if p.is_null() {
        return Err(null(what));
    }
    // SAFETY: the caller guarantees a NUL-terminated string.
    let s = unsafe { CStr::from_ptr(p) };
    Ok(Path::new(OsStr::from_bytes(s.to_bytes())))
}

/// Writes `v` through `out` after a NULL check.
///
/// # Safety
/// `out` is NULL or valid for a write of `T`.
unsafe fn put<T>(out: *mut T, v: T, what: &str) -> Result<()> {
    if out.is_null() {
        return Err(null(what));
    }
    // SAFETY: non-NULL, and the caller guarantees it is valid for writes.
    unsafe { out.write(v) };
    Ok(())
}

/// Copies `s` NUL-terminated into `buf` (truncated to `cap` bytes including the NUL) and
/// returns its full length. `buf` may be NULL when `cap` is 0.
///
/// # Safety
/// `buf` is valid for `cap` bytes of writes, or `cap` is 0.
unsafe fn copy_out(s: &[u8], buf: *mut c_char, cap: usize) -> usize {
    if !buf.is_null() && cap > 0 {
        let n = s.len().min(cap - 1);
        // SAFETY: `n + 1 <= cap` bytes are written into `buf`, which holds `cap` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(s.as_ptr(), buf.cast::<u8>(), n);
            *buf.add(n) = 0;
        }
    }
    s.len()
}

fn check_flags(flags: u32, allowed: u32) -> Result<()> {
    if flags & !allowed != 0 {
        return Err(Error::InvalidArgument(format!(
            "unknown flag bits 0x{:x}",
            flags & !allowed
        )));
    }
    Ok(())
}

fn reg() -> &'static Registry {
    Registry::global()
}

/// Creates a private (anonymous, zero-filled) buffer of `len` bytes and writes its id to `out_id`.
///
/// A `len` of 0 is valid; one the system cannot provide gives `ZCBUF_ENOMEM`.
///
/// # Safety
/// `out_id` must be NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zcbuf_create(len: usize, out_id: *mut u64) -> i32 {
    guard(|| {
        if out_id.is_null() {
            return Err(null("out_id"));
        }
        let id = reg().create(len, &CreateOptions::new())?;
        // SAFETY: checked non-NULL above; the caller guarantees it is writable.
        unsafe { put(out_id, id, "out_id") }
    })
}

/// Creates a named POSIX shared-memory buffer of `len` data bytes (`O_EXCL`, mode 0600, pages
/// reserved) and writes its id to `out_id`. With `name` NULL a name is generated (`zcbuf-` and
/// 128 random bits); read it with `zcbuf_name`. Names: 1 to 200 bytes, no `/`.
///
/// # Safety
/// `name` must be NULL or a NUL-terminated string; `out_id` NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zcbuf_create_shared(
    name: *const c_char,
    len: usize,
    out_id: *mut u64,
) -> i32 {
    guard(|| {
        if out_id.is_null() {
            return Err(null("out_id"));
        }
        let name = if name.is_null() {
            None
        } else {
            // SAFETY: non-NULL, NUL-terminated by the caller's contract.
            Some(unsafe { c_str(name, "name") }?)
        };
        let id = reg().create_shared(name, len, &CreateOptions::new())?;
        // SAFETY: checked non-NULL above.
        unsafe { put(out_id, id, "out_id") }
    })
}

/// Opens a shared buffer by name, validating its header, and writes its id to `out_id`.
/// `flags`: 0 or `ZCBUF_READ_ONLY`.
///
/// # Safety
/// `name` must be NULL or a NUL-terminated string; `out_id` NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zcbuf_open_shared(
    name: *const c_char,
    flags: u32,
    out_id: *mut u64,
) -> i32 {
    guard(|| {
        check_flags(flags, ZCBUF_READ_ONLY)?;
        if out_id.is_null() {
            return Err(null("out_id"));
        }
        // SAFETY: NULL-checked inside; NUL-terminated by the caller's contract.
        let name = unsafe { c_str(name, "name") }?;
        let id = reg().open_shared(name, flags & ZCBUF_READ_ONLY != 0)?;
        // SAFETY: checked non-NULL above.
        unsafe { put(out_id, id, "out_id") }
    })
}

/// Opens a shared buffer by name (like `zcbuf_open_shared`), takes one lease on it (like
/// `zcbuf_acquire`) and describes it (like `zcbuf_info`, `zcbuf_dtype`, `zcbuf_shape`), all in
/// one call. `flags`: 0 or `ZCBUF_READ_ONLY`. On success the caller owns `out->id` (free it with
/// `zcbuf_free`) and one lease (give it back with `zcbuf_release`); on failure nothing is left.
///
/// # Safety
/// `name` must be NULL or a NUL-terminated string; `out` NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zcbuf_open_shared_acquire(
    name: *const c_char,
    flags: u32,
    out: *mut ZcbufOpened,
) -> i32 {
    guard(|| {
        check_flags(flags, ZCBUF_READ_ONLY)?;
        if out.is_null() {
            return Err(null("out"));
        }
        // SAFETY: NULL-checked inside; NUL-terminated by the caller's contract.
        let name = unsafe { c_str(name, "name") }?;
        let (id, m) = reg().open_shared_leased(name, flags & ZCBUF_READ_ONLY != 0)?;
        let meta = m.meta();
        let info = ZcbufInfo {
            kind: ZCBUF_KIND_SHARED,
            readonly: u32::from(m.readonly()),
            len: m.len(),
            itemsize: meta.itemsize,
            ndim: meta.shape.len() as u32,
            dtype_len: meta.dtype.len() as u32,
            leases: 1,
            persistent: u32::from(m.persistent()),
            sealed: u32::from(m.sealed_here()),
        };
        // SAFETY: `out` is non-NULL and valid for a write by the caller's contract; every field
        // is written through raw pointers into it, the arrays within their bounds (the dtype
        // is at most DTYPE_CAP = 512 bytes plus the NUL, the shape at most MAX_NDIM = 64). The
        // data address stays valid: the registry entry holds the mapping and one lease.
        unsafe {
            let o = &raw mut *out;
            (&raw mut (*o).id).write(id);
            (&raw mut (*o).ptr).write(m.data_ptr().as_ptr());
            (&raw mut (*o).len).write(m.len());
            (&raw mut (*o).info).write(info);
            let d = &raw mut (*o).dtype;
            copy_out(meta.dtype.as_bytes(), d.cast::<c_char>(), 513);
            let sh = (&raw mut (*o).shape).cast::<u64>();
            std::ptr::copy_nonoverlapping(meta.shape.as_ptr(), sh, meta.shape.len().min(64));
        }
        Ok(())
    })
}

/// Opens the shared buffer `name` once it exists and is sealed (`zcbuf_seal`, in any process),
/// waiting up to `timeout_ms` milliseconds (0: look once; `UINT64_MAX`: no limit), and writes
/// its id to `out_id`. A sealed segment is mapped read-only whatever `flags` (0 or
/// `ZCBUF_READ_ONLY`) say. The wait uses no CPU (inotify on /dev/shm, and a look every 100 ms)
/// and continues through signals; call it in slices to react to one. `ZCBUF_ETIMEDOUT` when the
/// time runs out (the message says whether the name exists); `ZCBUF_ENOTFOUND` at once when the
/// name exists unsealed and no process holds it any more (its creator died before sealing).
///
/// # Safety
/// `name` must be NULL or a NUL-terminated string; `out_id` NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zcbuf_open_shared_wait(
    name: *const c_char,
    flags: u32,
    timeout_ms: u64,
    out_id: *mut u64,
) -> i32 {
    guard(|| {
        check_flags(flags, ZCBUF_READ_ONLY)?;
        if out_id.is_null() {
            return Err(null("out_id"));
        }
        // SAFETY: NULL-checked inside; NUL-terminated by the caller's contract.
        let name = unsafe { c_str(name, "name") }?;
        let timeout = if timeout_ms == u64::MAX {
            std::time::Duration::MAX
        } else {
            std::time::Duration::from_millis(timeout_ms)
        };
        let id = reg().open_shared_wait(name, flags & ZCBUF_READ_ONLY != 0, timeout)?;
        // SAFETY: checked non-NULL above.
        unsafe { put(out_id, id, "out_id") }
    })
}

/// Seals shared buffer `id`: its segment becomes immutable. Every later open of it, in any
/// process, maps it read-only (also without `ZCBUF_READ_ONLY`), and `zcbuf_info` reports this
/// id `readonly` and `sealed`. Pointers from `zcbuf_acquire` taken before, and other processes'
/// writable opens made before, keep their writable mapping (nothing is re-protected under
/// them): seal when the writing is done. Idempotent. `ZCBUF_EINVAL` for private and file
/// buffers; `ZCBUF_EREADONLY` for an id opened read-only of a segment not sealed yet.
#[unsafe(no_mangle)]
pub extern "C" fn zcbuf_seal(id: u64) -> i32 {
    guard(|| reg().seal(id))
}

/// Creates a file-backed buffer of `len` data bytes at `path`, which must not exist (mode 0600,
/// links not followed, pages reserved), and writes its id to `out_id`.
///
/// # Safety
/// `path` must be NULL or a NUL-terminated string; `out_id` NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zcbuf_create_file(
    path: *const c_char,
    len: usize,
    out_id: *mut u64,
) -> i32 {
    guard(|| {
        if out_id.is_null() {
            return Err(null("out_id"));
        }
        // SAFETY: NULL-checked inside; NUL-terminated by the caller's contract.
        let path = unsafe { c_path(path, "path") }?;
        let id = reg().create_file(path, len, &CreateOptions::new())?;
        // SAFETY: checked non-NULL above.
        unsafe { put(out_id, id, "out_id") }
    })
}

/// Opens a file made by zcbuf, validating its header, and writes its id to `out_id`.
/// `flags`: 0 or `ZCBUF_READ_ONLY`.
///
/// # Safety
/// `path` must be NULL or a NUL-terminated string; `out_id` NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zcbuf_open_file(path: *const c_char, flags: u32, out_id: *mut u64) -> i32 {
    guard(|| {
        check_flags(flags, ZCBUF_READ_ONLY)?;
        if out_id.is_null() {
            return Err(null("out_id"));
        }
        // SAFETY: NULL-checked inside; NUL-terminated by the caller's contract.
        let path = unsafe { c_path(path, "path") }?;
        let id = reg().open_file(path, flags & ZCBUF_READ_ONLY != 0)?;
        // SAFETY: checked non-NULL above.
        unsafe { put(out_id, id, "out_id") }
    })
}

/// Creates a buffer of any kind with a dtype and shape stored in it, and options.
///
/// `kind`: one of `ZCBUF_KIND_*`. `name_or_path`: the segment name (NULL: generated) or the file
/// path; ignored for private buffers. `dtype`: NULL or "" for untyped, else a printable ASCII
/// descriptor of at most 512 bytes with `itemsize` bytes per element; `shape` points to `ndim`
/// (at most 64) dimensions whose product times `itemsize` must equal `len`. `flags`:
/// `ZCBUF_NO_RESERVE`, `ZCBUF_POPULATE`, `ZCBUF_HUGE_PAGES`, `ZCBUF_PERSIST` (shared only).
///
/// # Safety
/// Strings must be NULL or NUL-terminated; `shape` NULL or valid for `ndim` reads; `out_id`
/// NULL or valid for a write.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn zcbuf_create_ex(
    kind: u32,
    name_or_path: *const c_char,
    len: usize,
    dtype: *const c_char,
    itemsize: u64,
    shape: *const u64,
    ndim: u32,
    flags: u32,
    out_id: *mut u64,
) -> i32 {
    guard(|| {
        check_flags(
            flags,
            ZCBUF_NO_RESERVE | ZCBUF_POPULATE | ZCBUF_HUGE_PAGES | ZCBUF_PERSIST,
        )?;
        if out_id.is_null() {
            return Err(null("out_id"));
        }
        let dtype = if dtype.is_null() {
            ""
        } else {
            // SAFETY: non-NULL, NUL-terminated by the caller's contract.
            unsafe { c_str(dtype, "dtype") }?
        };
        if ndim as usize > crate::header::MAX_NDIM {
            return Err(Error::InvalidArgument(format!(
                "ndim {ndim} exceeds {}",
                crate::header::MAX_NDIM
            )));
        }
        let dims: &[u64] = if ndim == 0 {
            &[]
        } else if shape.is_null() {
            return Err(null("shape"));
        } else {
            // SAFETY: non-NULL and valid for `ndim` reads by the caller's contract.
            unsafe { std::slice::from_raw_parts(shape, ndim as usize) }
        };
        // An empty dtype is untyped; Meta::typed refuses a shape or item size without one.
        let meta = Meta::typed(dtype, itemsize, dims)?;
        let opts = CreateOptions::new()
            .meta(meta)
            .reserve(flags & ZCBUF_NO_RESERVE == 0)
            .populate(flags & ZCBUF_POPULATE != 0)
            .huge_pages(flags & ZCBUF_HUGE_PAGES != 0)
            .persist(flags & ZCBUF_PERSIST != 0);
        let id = match kind {
            ZCBUF_KIND_PRIVATE => reg().create(len, &opts)?,
            ZCBUF_KIND_SHARED => {
                let name = if name_or_path.is_null() {
                    None
                } else {
                    // SAFETY: non-NULL, NUL-terminated by the caller's contract.
                    Some(unsafe { c_str(name_or_path, "name") }?)
                };
                reg().create_shared(name, len, &opts)?
            }
            ZCBUF_KIND_FILE => {
                // SAFETY: NULL-checked inside; NUL-terminated by the caller's contract.
                let path = unsafe { c_path(name_or_path, "path") }?;
                reg().create_file(path, len, &opts)?
            }
            k => return Err(Error::InvalidArgument(format!("unknown buffer kind {k}"))),
        };
        // SAFETY: checked non-NULL above.
        unsafe { put(out_id, id, "out_id") }
    })
}

/// Takes a lease on `id`: writes its data address to `out_ptr` and its length to `out_len`.
/// The memory stays mapped, even across `zcbuf_free`, until the matching `zcbuf_release`.
/// A zero-length buffer gives a non-NULL address that must not be dereferenced.
///
/// # Safety
/// `out_ptr` and `out_len` must be NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zcbuf_acquire(id: u64, out_ptr: *mut *mut u8, out_len: *mut usize) -> i32 {
    guard(|| {
        if out_ptr.is_null() {
            return Err(null("out_ptr"));
        }
        if out_len.is_null() {
            return Err(null("out_len"));
        }
        let (p, n) = reg().acquire(id)?;
        // SAFETY: both checked non-NULL above; the caller guarantees they are writable.
        unsafe {
            out_ptr.write(p.as_ptr());
            out_len.write(n);
        }
        Ok(())
    })
}

/// `zcbuf_acquire` and `zcbuf_info` in one call: takes a lease on `id`, writes its data address
/// and length, and fills `out_info` (which may be NULL).
///
/// # Safety
/// `out_ptr` and `out_len` must be NULL or valid for a write; `out_info` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zcbuf_acquire_info(
    id: u64,
    out_ptr: *mut *mut u8,
    out_len: *mut usize,
    out_info: *mut ZcbufInfo,
) -> i32 {
    guard(|| {
        if out_ptr.is_null() {
            return Err(null("out_ptr"));
        }
        if out_len.is_null() {
            return Err(null("out_len"));
        }
        let (p, n, info) = reg().acquire_info(id)?;
        let info = (!out_info.is_null()).then_some(info);
        // SAFETY: all three checked non-NULL (or skipped); the caller guarantees writability.
        unsafe {
            out_ptr.write(p.as_ptr());
            out_len.write(n);
            if let Some(i) = info {
                out_info.write(info_of(&i));
            }
        }
        Ok(())
    })
}

fn info_of(i: &crate::registry::Info) -> ZcbufInfo {
    ZcbufInfo {
        kind: match i.kind {
            Kind::Private => ZCBUF_KIND_PRIVATE,
            Kind::Shared => ZCBUF_KIND_SHARED,
            Kind::File => ZCBUF_KIND_FILE,
        },
        readonly: u32::from(i.readonly),
        len: i.len,
        itemsize: i.meta.itemsize,
        ndim: i.meta.shape.len() as u32,
        dtype_len: i.meta.dtype.len() as u32,
        leases: i.leases,
        persistent: u32::from(i.persistent),
        sealed: u32::from(i.sealed),
    }
}

/// Gives back one lease on `id` (also after `zcbuf_free`); the last lease of a freed buffer
/// unmaps it. Releasing more often than acquiring gives `ZCBUF_EINVAL`.
#[unsafe(no_mangle)]
pub extern "C" fn zcbuf_release(id: u64) -> i32 {
    guard(|| reg().release(id))
}

/// Writes the data length of `id` to `out_len`.
///
/// # Safety
/// `out_len` must be NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zcbuf_size(id: u64, out_len: *mut usize) -> i32 {
    guard(|| {
        if out_len.is_null() {
            return Err(null("out_len"));
        }
        let n = reg().size(id)?;
        // SAFETY: checked non-NULL above.
        unsafe { put(out_len, n, "out_len") }
    })
}

/// Copies the name of shared buffer `id` into `buf` (NUL-terminated, truncated to `cap` bytes)
/// and writes its full length (without the NUL) to `out_len`. `buf` may be NULL if `cap` is 0.
/// Other backings give `ZCBUF_EINVAL`.
///
/// # Safety
/// `buf` must be valid for `cap` bytes of writes (or `cap` 0); `out_len` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zcbuf_name(
    id: u64,
    buf: *mut c_char,
    cap: usize,
    out_len: *mut usize,
) -> i32 {
    guard(|| {
        if out_len.is_null() {
            return Err(null("out_len"));
        }
        if buf.is_null() && cap > 0 {
            return Err(null("buf"));
        }
        let name = reg().name(id)?.ok_or_else(|| {
            Error::InvalidArgument(format!(
                "buffer id {id} is not a shared buffer: it has no name"
            ))
        })?;
        // SAFETY: `buf` holds `cap` bytes (or cap is 0); `out_len` checked non-NULL.
        unsafe {
            let n = copy_out(name.as_bytes(), buf, cap);
            put(out_len, n, "out_len")
        }
    })
}

/// Copies the path of file buffer `id` into `buf`, like `zcbuf_name`. Other backings give
/// `ZCBUF_EINVAL`.
///
/// # Safety
/// As `zcbuf_name`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zcbuf_path(
    id: u64,
    buf: *mut c_char,
    cap: usize,
    out_len: *mut usize,
) -> i32 {
    guard(|| {
        if out_len.is_null() {
            return Err(null("out_len"));
        }
        if buf.is_null() && cap > 0 {
            return Err(null("buf"));
        }
        let info = reg().info(id)?;
        let path = info.path.ok_or_else(|| {
            Error::InvalidArgument(format!(
                "buffer id {id} is not a file buffer: it has no path"
            ))
        })?;
        // SAFETY: `buf` holds `cap` bytes (or cap is 0); `out_len` checked non-NULL.
        unsafe {
            let n = copy_out(path.as_os_str().as_bytes(), buf, cap);
            put(out_len, n, "out_len")
        }
    })
}

/// Fills `out` with the kind, length, read-only flag, dtype and shape sizes and lease count.
///
/// # Safety
/// `out` must be NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zcbuf_info(id: u64, out: *mut ZcbufInfo) -> i32 {
    guard(|| {
        if out.is_null() {
            return Err(null("out"));
        }
        let v = info_of(&reg().info(id)?);
        // SAFETY: checked non-NULL above.
        unsafe { put(out, v, "out") }
    })
}

/// Copies the stored dtype string of `id` into `buf`, like `zcbuf_name` ("" when untyped).
///
/// # Safety
/// As `zcbuf_name`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zcbuf_dtype(
    id: u64,
    buf: *mut c_char,
    cap: usize,
    out_len: *mut usize,
) -> i32 {
    guard(|| {
        if out_len.is_null() {
            return Err(null("out_len"));
        }
        if buf.is_null() && cap > 0 {
            return Err(null("buf"));
        }
        let i = reg().info(id)?;
        // SAFETY: `buf` holds `cap` bytes (or cap is 0); `out_len` checked non-NULL.
        unsafe {
            let n = copy_out(i.meta.dtype.as_bytes(), buf, cap);
            put(out_len, n, "out_len")
        }
    })
}

/// Copies up to `cap` dimensions of the stored shape of `id` into `out_shape` and writes the
/// number of dimensions to `out_ndim`.
///
/// # Safety
/// `out_shape` must be valid for `cap` writes (or `cap` 0); `out_ndim` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zcbuf_shape(
    id: u64,
    out_shape: *mut u64,
    cap: u32,
    out_ndim: *mut u32,
) -> i32 {
    guard(|| {
        if out_ndim.is_null() {
            return Err(null("out_ndim"));
        }
        if out_shape.is_null() && cap > 0 {
            return Err(null("out_shape"));
        }
        let i = reg().info(id)?;
        let n = i.meta.shape.len().min(cap as usize);
        // SAFETY: `out_shape` holds `cap >= n` elements; `out_ndim` checked non-NULL.
        unsafe {
            if n > 0 {
                std::ptr::copy_nonoverlapping(i.meta.shape.as_ptr(), out_shape, n);
            }
            put(out_ndim, i.meta.shape.len() as u32, "out_ndim")
        }
    })
}

/// Writes a file buffer's data to disk now (msync); a no-op for other backings.
#[unsafe(no_mangle)]
pub extern "C" fn zcbuf_flush(id: u64) -> i32 {
    guard(|| reg().flush(id))
}

/// Retires `id` at once (later calls on it give `ZCBUF_ENOTFOUND`, so does a second free); the
/// memory is unmapped when its last lease is released. A file buffer is flushed to disk; a shared
/// buffer's name is removed when no live process holds it any more.
#[unsafe(no_mangle)]
pub extern "C" fn zcbuf_free(id: u64) -> i32 {
    guard(|| reg().free(id))
}

/// Removes the name of a shared-memory segment now, whoever holds it and persistent or not
/// (their mappings stay valid). Only the segment that the name names at that moment is removed.
///
/// # Safety
/// `name` must be NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zcbuf_unlink(name: *const c_char) -> i32 {
    guard(|| {
        // SAFETY: NULL-checked inside; NUL-terminated by the caller's contract.
        let name = unsafe { c_str(name, "name") }?;
        crate::shm::unlink(name)
    })
}

/// Removes every zcbuf segment in /dev/shm that no process holds (maps) and that was not
/// created to persist. Writes one line per removed segment into `buf` (NUL-terminated,
/// truncated to `cap`), fields separated by tabs: name, data length, reason. Writes the full
/// length to `out_len` and the number of segments removed to `out_count`. `buf` may be NULL
/// when `cap` is 0; `out_len` and `out_count` may be NULL.
///
/// # Safety
/// `buf` must be valid for `cap` bytes of writes (or `cap` 0); the out-pointers NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zcbuf_gc(
    buf: *mut c_char,
    cap: usize,
    out_len: *mut usize,
    out_count: *mut usize,
) -> i32 {
    guard(|| {
        if buf.is_null() && cap > 0 {
            return Err(null("buf"));
        }
        let removed = crate::gc::gc()?;
        let text: String = removed
            .iter()
            .map(|r| format!("{}\t{}\t{}\n", r.name, r.len, r.reason))
            .collect();
        // SAFETY: `buf` holds `cap` bytes (or cap is 0); out-pointers are NULL-checked.
        unsafe {
            let n = copy_out(text.as_bytes(), buf, cap);
            if !out_len.is_null() {
                out_len.write(n);
            }
            if !out_count.is_null() {
                out_count.write(removed.len());
            }
        }
        Ok(())
    })
}

/// Lists the zcbuf segments in /dev/shm as text, one per line, fields separated by tabs:
/// name, data length, dtype, shape (dimensions joined by `,`), held (1 when some process maps
/// it, else 0), holder pids as `/proc/locks` names them (joined by `,`; may be empty while
/// held), persistent (1 or 0), creation time (ns since the epoch), creator pid, a problem
/// ("" when the header is valid), and sealed (1 or 0; added last, so readers of the first ten
/// fields are unaffected).
/// Copied into `buf` like `zcbuf_name`; `out_len` gets the full length.
///
/// # Safety
/// `buf` must be valid for `cap` bytes of writes (or `cap` 0); `out_len` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zcbuf_list(buf: *mut c_char, cap: usize, out_len: *mut usize) -> i32 {
    guard(|| {
        if out_len.is_null() {
            return Err(null("out_len"));
        }
        if buf.is_null() && cap > 0 {
            return Err(null("buf"));
        }
        let mut text = String::new();
        for s in crate::gc::list()? {
            let shape: Vec<String> = s.meta.shape.iter().map(u64::to_string).collect();
            let problem = s.problem.unwrap_or_default().replace(['\t', '\n'], " ");
            let pids: Vec<String> = s.holders.iter().map(u32::to_string).collect();
            let channel = s.channel.as_ref().map_or(String::new(), |c| {
                let subs: Vec<String> = c
                    .subscribers
                    .iter()
                    .map(|(pid, pos, missed, alive)| {
                        format!("{pid}:{pos}:{missed}:{}", u8::from(*alive))
                    })
                    .collect();
                let shape: Vec<String> = c.meta.shape.iter().map(u64::to_string).collect();
                format!(
                    "{};{};{};{};{};{};{};{};{}",
                    match c.policy {
                        crate::channel::Policy::Block => "block",
                        crate::channel::Policy::Latest => "latest",
                    },
                    c.slots,
                    c.published,
                    u8::from(c.closed),
                    c.publisher.0,
                    u8::from(c.publisher.1),
                    subs.join(","),
                    shape.join(","),
                    c.meta.dtype.replace(['\t', '\n'], " ")
                )
            });
            text.push_str(&format!(
                "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
                s.name,
                s.len,
                s.meta.dtype,
                shape.join(","),
                u8::from(s.held),
                pids.join(","),
                u8::from(s.persistent),
                s.created_ns,
                s.creator_pid,
                problem,
                u8::from(s.sealed),
                channel
            ));
        }
        // SAFETY: `buf` holds `cap` bytes (or cap is 0); `out_len` checked non-NULL.
        unsafe {
            let n = copy_out(text.as_bytes(), buf, cap);
            put(out_len, n, "out_len")
        }
    })
}

/// Copies this thread's last error message into `buf` (NUL-terminated, truncated to `cap`
/// bytes) and returns its full length. Meaningful after a call returned a nonzero status.
/// `buf` may be NULL when `cap` is 0.
///
/// # Safety
/// `buf` must be valid for `cap` bytes of writes, or `cap` 0.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zcbuf_last_error(buf: *mut c_char, cap: usize) -> usize {
    let r = catch_unwind(AssertUnwindSafe(|| {
        LAST_ERROR
            .try_with(|e| {
                let e = e.try_borrow().map(|e| e.clone()).unwrap_or_default();
                // SAFETY: the caller guarantees `buf` holds `cap` bytes (or cap is 0).
                unsafe { copy_out(e.as_bytes(), buf, cap) }
            })
            // During thread teardown there is no message: an empty one.
            // SAFETY: as above.
            .unwrap_or_else(|_| unsafe { copy_out(b"", buf, cap) })
    }));
    r.unwrap_or(0)
}

/// A static, NUL-terminated name for a status code (e.g. "not found"); never NULL.
#[unsafe(no_mangle)]
pub extern "C" fn zcbuf_status_name(status: i32) -> *const c_char {
    let s: &'static CStr = match status {
        ZCBUF_OK => c"ok",
        ZCBUF_EINVAL => c"invalid argument",
        ZCBUF_ENOTFOUND => c"not found",
        ZCBUF_EEXIST => c"already exists",
        ZCBUF_ENOMEM => c"out of memory or space",
        ZCBUF_EPERM => c"permission denied",
        ZCBUF_EREADONLY => c"read-only",
        ZCBUF_ECORRUPT => c"corrupt or incompatible",
        ZCBUF_EIO => c"I/O error",
        ZCBUF_EINTERNAL => c"internal error",
        ZCBUF_ETIMEDOUT => c"timed out",
        ZCBUF_ECLOSED => c"channel closed",
        _ => c"unknown status",
    };
    s.as_ptr()
}

// -- Channels ----------------------------------------------------------------------------------

/// Channel policy: every subscriber sees every message; the publisher waits while the slowest
/// is a whole ring behind.
pub const ZCBUF_POLICY_BLOCK: u32 = 0;
/// Channel policy: the publisher never waits for positions; a subscriber that fell behind
/// skips to the newest message.
pub const ZCBUF_POLICY_LATEST: u32 = 1;

/// A channel's message type and layout, as `zcbuf_subscribe` and `zcbuf_publish_ex` report it.
#[repr(C)]
pub struct ZcbufChannel {
    /// Bytes per message.
    pub msg_len: usize,
    /// Number of slots.
    pub slots: u32,
    /// `ZCBUF_POLICY_BLOCK` or `ZCBUF_POLICY_LATEST`.
    pub policy: u32,
    /// Bytes per element of the message dtype.
    pub itemsize: u64,
    /// Dimensions of a message.
    pub ndim: u32,
    /// The message dtype (a NumPy descriptor), NUL-terminated.
    pub dtype: [c_char; 129],
    /// The first `ndim` entries are the message shape.
    pub shape: [u64; 16],
}

/// A message received by `zcbuf_sub_recv`: valid, and never overwritten by the publisher, until
/// `zcbuf_sub_release(sub, slot)`.
#[repr(C)]
pub struct ZcbufMessage {
    /// The message's bytes (read-only for the subscriber).
    pub ptr: *const u8,
    /// Bytes.
    pub len: usize,
    /// Its sequence number (0 for the channel's first message).
    pub seq: u64,
    /// Publish time, ns since the Unix epoch.
    pub timestamp_ns: u64,
    /// Messages this subscriber has skipped so far (latest policy).
    pub missed: u64,
    /// The slot, for `zcbuf_sub_release`.
    pub slot: u32,
}

fn describe(
    meta: &Meta,
    msg_len: usize,
    slots: usize,
    policy: crate::channel::Policy,
) -> ZcbufChannel {
    let mut d = ZcbufChannel {
        msg_len,
        slots: slots as u32,
        policy: match policy {
            crate::channel::Policy::Block => ZCBUF_POLICY_BLOCK,
            crate::channel::Policy::Latest => ZCBUF_POLICY_LATEST,
        },
        itemsize: meta.itemsize,
        ndim: meta.shape.len() as u32,
        dtype: [0; 129],
        shape: [0; 16],
    };
    for (i, b) in meta.dtype.bytes().take(128).enumerate() {
        d.dtype[i] = b as c_char;
    }
    for (i, s) in meta.shape.iter().take(16).enumerate() {
        d.shape[i] = *s;
    }
    d
}

/// Writes a new endpoint's handle, and its description when `out_desc` is not NULL.
///
/// # Safety
/// `out_id` valid for a write (checked non-NULL by the caller); `out_desc` NULL or valid for a
/// write.
unsafe fn put_endpoint(
    out_id: *mut u64,
    id: u64,
    out_desc: *mut ZcbufChannel,
    desc: ZcbufChannel,
) -> Result<()> {
    if !out_desc.is_null() {
        // SAFETY: non-NULL; the caller guarantees it is writable.
        unsafe { out_desc.write(desc) };
    }
    // SAFETY: the caller guarantees `out_id` is writable; `put` checks NULL.
    unsafe { put(out_id, id, "out_id") }
}

/// A timeout in microseconds from C: negative waits forever.
fn micros(t: i64) -> Option<std::time::Duration> {
    u64::try_from(t).ok().map(std::time::Duration::from_micros)
}

/// Creates a channel for messages of `dtype` (a NumPy descriptor, `itemsize` bytes per element)
/// and `shape` (`ndim` dimensions), with `slots` slots, `policy` (`ZCBUF_POLICY_*`), made for up
/// to `max_subscribers` subscribers (0: 64), named `name` (NULL: generated; read it with
/// `zcbuf_pub_name`). This process becomes its one publisher; writes the handle to `out_pub` and,
/// when `out_desc` is not NULL, the channel's description.
///
/// # Safety
/// `name` NULL or a NUL-terminated string; `dtype` a NUL-terminated string; `shape` valid for
/// `ndim` reads (or NULL when `ndim` is 0); `out_pub` valid for a write; `out_desc` NULL or
/// valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zcbuf_publish(
    name: *const c_char,
    dtype: *const c_char,
    itemsize: u64,
    shape: *const u64,
    ndim: u32,
    slots: u32,
    policy: u32,
    max_subscribers: u32,
    out_pub: *mut u64,
    out_desc: *mut ZcbufChannel,
) -> i32 {
    guard(|| {
        if out_pub.is_null() {
            return Err(null("out_pub"));
        }
        // SAFETY: the caller guarantees `name` is NULL or NUL-terminated.
        let name = if name.is_null() {
            None
        } else {
            Some(unsafe { c_str(name, "name") }?)
        };
        // SAFETY: the caller guarantees `dtype` is NUL-terminated.
        let dtype = unsafe { c_str(dtype, "dtype") }?;
        let dims: &[u64] = if ndim == 0 {
            &[]
        } else if shape.is_null() {
            return Err(null("shape"));
        } else {
            // SAFETY: the caller guarantees `ndim` readable elements at `shape`.
            unsafe { std::slice::from_raw_parts(shape, ndim as usize) }
        };
        let meta = Meta::typed(dtype, itemsize, dims)?;
        let policy = crate::channel::Policy::from_code(policy)?;
        let subs = if max_subscribers == 0 {
            crate::channel::DEFAULT_SUBSCRIBERS
        } else {
            max_subscribers
        };
        let p = crate::channel::Publisher::create(name, meta, slots, policy, subs)?;
        let desc = describe(p.meta(), p.msg_len(), p.slots(), p.policy());
        let id = crate::channel::handles::add_pub(p);
        // SAFETY: `out_pub` checked non-NULL, `out_desc` NULL or writable (the caller's word).
        unsafe { put_endpoint(out_pub, id, out_desc, desc) }
    })
}

/// Copies the channel's name into `buf` (NUL-terminated, truncated to `cap`); writes its full
/// length to `out_len`.
///
/// # Safety
/// `buf` valid for `cap` bytes (or `cap` 0); `out_len` valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zcbuf_pub_name(
    publisher: u64,
    buf: *mut c_char,
    cap: usize,
    out_len: *mut usize,
) -> i32 {
    guard(|| {
        let name = crate::channel::handles::with_pub(publisher, |p| Ok(p.name().to_owned()))?;
        // SAFETY: the caller guarantees `buf` holds `cap` bytes and `out_len` is writable.
        unsafe {
            let n = copy_out(name.as_bytes(), buf, cap);
            put(out_len, n, "out_len")
        }
    })
}

/// Loans a free slot: writes its address (writable for one message's bytes) to `out_ptr` and its
/// index to `out_slot`. Waits up to `timeout_us` microseconds (negative: forever) when none is
/// free (`ZCBUF_ETIMEDOUT`). Publish it with `zcbuf_pub_send`, or give it back with
/// `zcbuf_pub_cancel`.
///
/// # Safety
/// `out_ptr` and `out_slot` valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zcbuf_pub_loan(
    publisher: u64,
    timeout_us: i64,
    out_ptr: *mut *mut u8,
    out_slot: *mut u32,
) -> i32 {
    guard(|| {
        if out_ptr.is_null() || out_slot.is_null() {
            return Err(null("out_ptr or out_slot"));
        }
        let loan = crate::channel::handles::with_pub(publisher, |p| p.loan(micros(timeout_us)))?;
        // SAFETY: both checked non-NULL; the caller guarantees they are writable.
        unsafe {
            put(out_ptr, loan.as_ptr(), "out_ptr")?;
            put(out_slot, loan.slot() as u32, "out_slot")
        }
    })
}

/// Publishes loaned slot `slot` as the next message; writes its sequence number to `out_seq`
/// (may be NULL).
///
/// # Safety
/// `out_seq` NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zcbuf_pub_send(publisher: u64, slot: u32, out_seq: *mut u64) -> i32 {
    guard(|| {
        let seq = crate::channel::handles::with_pub(publisher, |p| p.send(slot as usize))?;
        if !out_seq.is_null() {
            // SAFETY: non-NULL; the caller guarantees it is writable.
            unsafe { out_seq.write(seq) };
        }
        Ok(())
    })
}

/// Writes the number of subscribers receiving now to `out_count`.
///
/// # Safety
/// `out_count` valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zcbuf_pub_subscribers(publisher: u64, out_count: *mut u32) -> i32 {
    guard(|| {
        let n = crate::channel::handles::with_pub(publisher, |p| Ok(p.subscribers() as u32))?;
        // SAFETY: the caller guarantees `out_count` is NULL or writable; `put` checks NULL.
        unsafe { put(out_count, n, "out_count") }
    })
}

/// Gives loaned slot `slot` back unsent.
#[unsafe(no_mangle)]
pub extern "C" fn zcbuf_pub_cancel(publisher: u64, slot: u32) -> i32 {
    guard(|| crate::channel::handles::with_pub(publisher, |p| p.cancel(slot as usize)))
}

/// Copies `len` bytes (exactly one message) from `data` into a free slot and publishes it, in one
/// call; waits like `zcbuf_pub_loan`. Writes the sequence number to `out_seq` (may be NULL).
///
/// # Safety
/// `data` valid for `len` reads; `out_seq` NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zcbuf_pub_send_copy(
    publisher: u64,
    data: *const u8,
    len: usize,
    timeout_us: i64,
    out_seq: *mut u64,
) -> i32 {
    guard(|| {
        if data.is_null() {
            return Err(null("data"));
        }
        // SAFETY: the caller guarantees `len` readable bytes at `data`.
        let bytes = unsafe { std::slice::from_raw_parts(data, len) };
        let seq = crate::channel::handles::with_pub(publisher, |p| {
            p.send_copy(bytes, micros(timeout_us))
        })?;
        if !out_seq.is_null() {
            // SAFETY: non-NULL; the caller guarantees it is writable.
            unsafe { out_seq.write(seq) };
        }
        Ok(())
    })
}

/// Ends the stream: subscribers receive what was sent, then `ZCBUF_ECLOSED`. The handle stays
/// valid (later sends fail with `ZCBUF_ECLOSED`; loans may still be cancelled) until
/// `zcbuf_pub_free`. Idempotent.
#[unsafe(no_mangle)]
pub extern "C" fn zcbuf_pub_close(publisher: u64) -> i32 {
    guard(|| crate::channel::handles::close_pub(publisher))
}

/// Ends the stream if still open and releases the handle; loaned slots' addresses become
/// invalid (the segment may be unmapped).
#[unsafe(no_mangle)]
pub extern "C" fn zcbuf_pub_free(publisher: u64) -> i32 {
    guard(|| crate::channel::handles::free_pub(publisher))
}

/// Subscribes to channel `name`: receives the messages published from now on. Writes the handle
/// to `out_sub` and, when `out_desc` is not NULL, the channel's description. A plain buffer is
/// `ZCBUF_EINVAL`; all subscriber entries taken is `ZCBUF_ENOMEM`.
///
/// # Safety
/// `name` a NUL-terminated string; `out_sub` valid for a write; `out_desc` NULL or valid for a
/// write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zcbuf_subscribe(
    name: *const c_char,
    out_sub: *mut u64,
    out_desc: *mut ZcbufChannel,
) -> i32 {
    guard(|| {
        if out_sub.is_null() {
            return Err(null("out_sub"));
        }
        // SAFETY: the caller guarantees a NUL-terminated string.
        let name = unsafe { c_str(name, "name") }?;
        let s = crate::channel::Subscriber::open(name)?;
        let desc = describe(s.meta(), s.msg_len(), s.slots(), s.policy());
        let id = crate::channel::handles::add_sub(s);
        // SAFETY: `out_sub` checked non-NULL, `out_desc` NULL or writable (the caller's word).
        unsafe { put_endpoint(out_sub, id, out_desc, desc) }
    })
}

/// Receives the next message into `out`, waiting up to `timeout_us` microseconds (negative:
/// forever; 0: only look): `ZCBUF_ETIMEDOUT` when none came, `ZCBUF_ECLOSED` at end of stream
/// (the publisher closed or died, and everything it sent was received). The message stays valid
/// until `zcbuf_sub_release(sub, out->slot)`.
///
/// # Safety
/// `out` valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zcbuf_sub_recv(
    subscriber: u64,
    timeout_us: i64,
    out: *mut ZcbufMessage,
) -> i32 {
    guard(|| {
        if out.is_null() {
            return Err(null("out"));
        }
        let m = crate::channel::handles::recv(subscriber, micros(timeout_us), |sub, msg| {
            ZcbufMessage {
                ptr: msg.as_ptr(),
                len: msg.len(),
                seq: msg.seq(),
                timestamp_ns: msg.timestamp_ns(),
                missed: sub.missed(),
                slot: msg.slot() as u32,
            }
        })?;
        // SAFETY: checked non-NULL; the caller guarantees it is writable.
        unsafe { out.write(m) };
        Ok(())
    })
}

/// Waits up to `timeout_us` microseconds (negative: forever) until `subscriber` has something to
/// receive — a message, or the end of the stream — without receiving it: `ZCBUF_OK` then, else
/// `ZCBUF_ETIMEDOUT`. Another thread may call `zcbuf_sub_recv` meanwhile (for event loops).
#[unsafe(no_mangle)]
pub extern "C" fn zcbuf_sub_wait(subscriber: u64, timeout_us: i64) -> i32 {
    guard(|| {
        if crate::channel::handles::wait_sub(subscriber, micros(timeout_us))? {
            Ok(())
        } else {
            Err(Error::Timeout(format!(
                "subscriber handle {subscriber}: nothing to receive within the timeout"
            )))
        }
    })
}

/// Releases message `slot` received through `subscriber`: the publisher may reuse the slot once
/// no subscriber pins it.
#[unsafe(no_mangle)]
pub extern "C" fn zcbuf_sub_release(subscriber: u64, slot: u32) -> i32 {
    guard(|| crate::channel::handles::release(subscriber, slot as usize))
}

/// Closes a subscriber: from now on it no longer holds back a block-policy publisher. Messages
/// received before stay valid until released; the handle goes with the last of them.
#[unsafe(no_mangle)]
pub extern "C" fn zcbuf_sub_close(subscriber: u64) -> i32 {
    guard(|| crate::channel::handles::close_sub(subscriber))
}

// -- The buffer protocol for the Python package -----------------------------------------------
//
// CPython before 3.12 lets only a C type export the buffer protocol (`memoryview(buf)`,
// `pa.py_buffer(buf)`): a Python class cannot. The Python package makes a tiny base type with
// `PyType_FromSpec` whose `bf_getbuffer` slot is `zcbuf_py_getbuffer`, which hands the request
// on to the object's `_export` attribute (a NumPy array or memoryview holding the lease). This
// library does not link libpython: the three CPython functions it calls are handed to it by the
// package (from `ctypes.pythonapi`), so C users never see an unresolved symbol.

type PyGetAttr = unsafe extern "C" fn(*mut c_void, *const c_char) -> *mut c_void;
type PyGetBuffer = unsafe extern "C" fn(*mut c_void, *mut c_void, i32) -> i32;
type PyDecRef = unsafe extern "C" fn(*mut c_void);

static PY_API: std::sync::OnceLock<(PyGetAttr, PyGetBuffer, PyDecRef)> = std::sync::OnceLock::new();

/// For the Python package only (C programs never need it): records the addresses of CPython's
/// `PyObject_GetAttrString`, `PyObject_GetBuffer` and `Py_DecRef`, which
/// [`zcbuf_py_getbuffer`] calls. Returns `ZCBUF_EINVAL` for a NULL address; a second call keeps
/// the first addresses.
///
/// # Safety
/// Each address must be the named CPython function of the interpreter this process runs.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zcbuf_py_setup(
    getattr: *const c_void,
    getbuffer: *const c_void,
    decref: *const c_void,
) -> i32 {
    if getattr.is_null() || getbuffer.is_null() || decref.is_null() {
        set_error("zcbuf_py_setup: NULL function address".into());
        return ZCBUF_EINVAL;
    }
    // SAFETY: the caller guarantees each address is the CPython function of that name, whose
    // C signature is the one transmuted to (`PyObject *`s are passed as `void *`).
    let api = unsafe {
        (
            std::mem::transmute::<*const c_void, PyGetAttr>(getattr),
            std::mem::transmute::<*const c_void, PyGetBuffer>(getbuffer),
            std::mem::transmute::<*const c_void, PyDecRef>(decref),
        )
    };
    let _ = PY_API.set(api);
    ZCBUF_OK
}

/// CPython's `PyBUF_FORMAT` request flag.
const PYBUF_FORMAT: i32 = 0x0004;

/// For the Python package only: a CPython `getbufferproc` (`int (PyObject *, Py_buffer *,
/// int)`) that exports `obj._export`'s buffer as `obj`'s (`obj._export_bytes`'s when the
/// request does not ask for a format). Returns 0, or -1 with a Python
/// exception set (by CPython) — its return value is CPython's convention, not a zcbuf status.
///
/// # Safety
/// Called by CPython with the GIL held, `obj` a live object and `view` a `Py_buffer` to fill,
/// after [`zcbuf_py_setup`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zcbuf_py_getbuffer(
    obj: *mut c_void,
    view: *mut c_void,
    flags: i32,
) -> i32 {
    let Some(&(getattr, getbuffer, decref)) = PY_API.get() else {
        // Unreachable through the package (it calls zcbuf_py_setup before making the type);
        // CPython turns -1 without an exception into a SystemError.
        return -1;
    };
    // SAFETY: CPython holds the GIL for us and `obj` is live; the functions are CPython's own
    // (zcbuf_py_setup's contract). GetAttrString returns a new reference or NULL with an
    // exception set; GetBuffer fills `view` (taking its own reference to `target` in
    // `view->obj`) or returns -1 with an exception set; our reference is dropped either way.
    unsafe {
        // A consumer that asks for the format (NumPy, memoryview) gets the typed export; one
        // that wants bytes only (hashlib, sockets, pyarrow) gets the raw bytes, which every
        // dtype has.
        let attr = if flags & PYBUF_FORMAT != 0 {
            c"_export"
        } else {
            c"_export_bytes"
        };
        let target = getattr(obj, attr.as_ptr());
        if target.is_null() {
            return -1;
        }
        let r = getbuffer(target, view, flags);
        decref(target);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last_error() -> String {
        let mut buf = vec![0 as c_char; 512];
        // SAFETY: buf holds 512 bytes.
        let n = unsafe { zcbuf_last_error(buf.as_mut_ptr(), buf.len()) };
        // SAFETY: zcbuf_last_error NUL-terminates within cap.
        let s = unsafe { CStr::from_ptr(buf.as_ptr()) };
        assert_eq!(n.min(511), s.to_bytes().len());
        s.to_string_lossy().into_owned()
    }

    #[test]
    fn null_out_pointers_are_invalid_arguments() {
        // SAFETY: NULLs are what is being tested; the functions must reject them.
        unsafe {
            assert_eq!(zcbuf_create(10, std::ptr::null_mut()), ZCBUF_EINVAL);
            assert!(last_error().contains("out_id is NULL"));
            let mut id = 0;
            assert_eq!(zcbuf_create(10, &mut id), ZCBUF_OK);
            assert_eq!(
                zcbuf_acquire(id, std::ptr::null_mut(), std::ptr::null_mut()),
                ZCBUF_EINVAL
            );
            assert_eq!(
                zcbuf_open_shared(std::ptr::null(), 0, &mut id),
                ZCBUF_EINVAL
            );
            assert_eq!(zcbuf_open_shared(c"x".as_ptr(), 8, &mut id), ZCBUF_EINVAL);
            assert!(last_error().contains("unknown flag"));
            assert_eq!(zcbuf_free(id), ZCBUF_OK);
        }
    }

    #[test]
    fn status_names() {
        // SAFETY: zcbuf_status_name returns a static NUL-terminated string.
        let s = unsafe { CStr::from_ptr(zcbuf_status_name(ZCBUF_ENOTFOUND)) };
        assert_eq!(s.to_str().unwrap(), "not found");
        // SAFETY: as above.
        let s = unsafe { CStr::from_ptr(zcbuf_status_name(-5)) };
        assert_eq!(s.to_str().unwrap(), "unknown status");
    }

    #[test]
    fn panics_do_not_cross() {
        let code = guard(|| panic!("boom"));
        assert_eq!(code, ZCBUF_EINTERNAL);
        assert!(last_error().contains("boom"));
    }
}
