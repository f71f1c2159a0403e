//! The registry: `u64` ids for buffers, and lock-guarded leases on their memory.
//!
//! # The lease protocol
//! Every entry has a lease count and a *retired* flag, both changed only under its shard's mutex.
//! * `acquire(id)`: under the lock, fail unless the entry exists and is not retired; add one
//!   lease; hand out the data address.
//! * `release(id)`: under the lock, fail unless a lease is held; remove one; if that was the last
//!   lease of a retired entry, take the entry out of the map. Its memory is unmapped after the
//!   lock is dropped, when the last `Arc` to it goes.
//! * `free(id)`: under the lock, fail if absent or already retired; mark it retired (every later
//!   `acquire`/`free` fails with not-found); if no lease is held, take it out of the map.
//!
//! A pointer is handed out only with a lease, and memory is unmapped only once an entry is out of
//! the map, which happens only when it is retired with no lease: so no interleaving of these
//! calls, from any number of threads, unmaps memory under a held lease.
//!
//! An entry made by a Rust [`crate::Buffer`] for private memory is *exclusive*: `acquire`,
//! `acquire_info`, `lease` and `lease_owned` refuse it (the `Buffer` lends references into it)
//! until `Buffer::into_id` shares it. An [`OwnedLease`] counts as a lease and also holds the
//! entry's mapping, so its memory stays mapped even if the count is released by someone else.
//!
//! Ids are never 0 and never reused (a 64-bit counter), so a stale id cannot reach another buffer.
//! Entries are spread over [`SHARDS`] independently locked maps by id, so threads working on
//! different buffers do not contend.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use crate::error::{Error, Result};
use crate::header::Meta;
use crate::mapping::{CreateOptions, Kind, Mapped};

/// Number of independently locked shards.
pub const SHARDS: usize = 64;

/// A cheap, well-mixed hash for sequential `u64` ids.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, id: u64) {
        // Drop the shard bits, then a multiplicative mix folded so low and high bits both vary.
        let h = (id / SHARDS as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = h ^ (h >> 29);
    }
}

type Map = HashMap<u64, Entry, BuildHasherDefault<IdHasher>>;

struct Entry {
    mapped: Arc<Mapped>,
    /// Cached data address (as an integer so the entry is `Send`).
    addr: usize,
    len: usize,
    readonly: bool,
    leases: u64,
    retired: bool,
    /// Owned by a Rust [`crate::Buffer`] that lends references into it (a private buffer):
    /// `acquire`, `acquire_info` and `lease` refuse it until [`Registry::share`] clears this.
    exclusive: bool,
}

/// One shard, on its own cache lines so shards do not false-share.
#[repr(align(128))]
struct Shard(Mutex<Map>);

/// What a registry knows about one buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// The backing.
    pub kind: Kind,
    /// Data length in bytes.
    pub len: usize,
    /// Mapped read-only.
    pub readonly: bool,
    /// The segment name (shared buffers).
    pub name: Option<String>,
    /// The file path (file buffers).
    pub path: Option<PathBuf>,
    /// dtype and shape.
    pub meta: Meta,
    /// Leases currently held.
    pub leases: u64,
    /// A shared buffer created to persist.
    pub persistent: bool,
    /// A shared buffer whose segment is sealed ([`Registry::seal`], by any process): asked of
    /// the kernel (the segment's file mode) unless this handle already knows.
    pub sealed: bool,
}

/// A table of buffers with lock-guarded leases.
///
/// Most programs use the process-wide [`Registry::global`], which the C ABI and the Python
/// package share; tests and libraries may make their own.
///
/// ```
/// use zcbuf::{Registry, CreateOptions};
/// let reg = Registry::new();
/// let id = reg.create(4096, &CreateOptions::new()).unwrap();
/// {
///     let lease = reg.lease(id).unwrap();
///     lease.write_at(0, b"hello").unwrap();
///     reg.free(id).unwrap();          // retired at once...
///     let mut out = [0u8; 5];
///     lease.read_at(0, &mut out).unwrap();
///     assert_eq!(&out, b"hello");     // ...but mapped while the lease lives
/// }
/// assert!(reg.acquire(id).is_err());
/// ```
pub struct Registry {
    shards: Box<[Shard]>,
    next_id: AtomicU64,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

static GLOBAL: LazyLock<Registry> = LazyLock::new(|| {
    crate::liveness::register_fork_handlers();
    Registry::new()
});

fn info_of(e: &Entry) -> Info {
    Info {
        kind: e.mapped.kind(),
        len: e.len,
        readonly: e.readonly,
        name: e.mapped.name().map(str::to_owned),
        path: e.mapped.path().map(Path::to_owned),
        meta: e.mapped.meta().clone(),
        leases: e.leases,
        persistent: e.mapped.persistent(),
        sealed: e.mapped.is_sealed(),
    }
}

fn exclusive_error(id: u64) -> Error {
    Error::Permission(format!(
        "buffer id {id} is a private buffer owned by a Rust zcbuf::Buffer, which lends references \
         into it: no lease can be taken until its owner calls Buffer::into_id() (or lease it \
         through Buffer::into_lease())"
    ))
}

/// The error for a write through a read-only or sealed buffer.
pub(crate) fn read_only(id: u64, mapped: &Mapped) -> Error {
    if mapped.sealed_here() {
        Error::ReadOnly(format!(
            "buffer id {id} is sealed: its segment is immutable from the seal on"
        ))
    } else {
        Error::ReadOnly(format!("buffer id {id} was opened read-only"))
    }
}

fn not_found(id: u64) -> Error {
    Error::NotFound(format!(
        "buffer id {id} is not live (never created in this process, or already freed)"
    ))
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry {
            shards: (0..SHARDS)
                .map(|_| Shard(Mutex::new(Map::default())))
                .collect(),
            next_id: AtomicU64::new(1),
        }
    }

    /// The process-wide registry used by the C ABI and Python.
    pub fn global() -> &'static Registry {
        &GLOBAL
    }

    fn shard(&self, id: u64) -> MutexGuard<'_, Map> {
        // No code panics while holding a shard lock, so a poisoned lock still guards a
        // consistent map: recover it rather than failing every later call.
        self.shards[(id % SHARDS as u64) as usize]
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn insert(&self, mapped: Mapped) -> u64 {
        self.insert_leased(mapped, 0).0
    }

    /// Inserts with `leases` leases already taken; returns the id and the mapping.
    fn insert_leased(&self, mapped: Mapped, leases: u64) -> (u64, Arc<Mapped>) {
        self.insert_entry(mapped, leases, false)
    }

    fn insert_entry(&self, mapped: Mapped, leases: u64, exclusive: bool) -> (u64, Arc<Mapped>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mapped = Arc::new(mapped);
        let entry = Entry {
            addr: mapped.data_ptr().as_ptr() as usize,
            len: mapped.len(),
            readonly: mapped.readonly(),
            mapped: Arc::clone(&mapped),
            leases,
            retired: false,
            exclusive,
        };
        self.shard(id).insert(id, entry);
        (id, mapped)
    }

    /// Opens a shared buffer by name with one lease already taken (what the one-call open of
    /// the C ABI and Python uses): returns the id and its mapping, to be described without
    /// copying. The caller owns the id and the lease.
    pub(crate) fn open_shared_leased(
        &self,
        name: &str,
        readonly: bool,
    ) -> Result<(u64, Arc<Mapped>)> {
        Ok(self.insert_leased(crate::shm::open(name, readonly)?, 1))
    }

    /// Creates a private (anonymous) buffer of `len` bytes, zero-filled.
    pub fn create(&self, len: usize, opts: &CreateOptions) -> Result<u64> {
        Ok(self.insert(Mapped::private(len, opts)?))
    }

    /// Creates a named shared-memory buffer of `len` data bytes (`O_EXCL`, mode 0600). With no
    /// name, a fresh one (`zcbuf-` + 128 random bits) is generated; read it with
    /// [`Registry::name`].
    pub fn create_shared(
        &self,
        name: Option<&str>,
        len: usize,
        opts: &CreateOptions,
    ) -> Result<u64> {
        Ok(self.insert(crate::shm::create(name, len, opts)?))
    }

    /// Opens a shared buffer by name (from any process of the same user), validating its header.
    pub fn open_shared(&self, name: &str, readonly: bool) -> Result<u64> {
        Ok(self.insert(crate::shm::open(name, readonly)?))
    }

    /// Opens the shared buffer `name` once it exists and is sealed ([`Registry::seal`]), waiting
    /// up to `timeout` (`Duration::ZERO` looks once; `Duration::MAX` has no limit). A sealed
    /// segment is always mapped read-only, whatever `readonly` says.
    ///
    /// The wait costs no CPU (an inotify watch on /dev/shm, and a look every 100 ms in case an
    /// event was lost). Errors: [`Error::Timeout`] when the time runs out (the message says
    /// whether the name exists); [`Error::NotFound`] at once when the name exists unsealed and
    /// no process holds it any more (its creator died before sealing: nobody is left to seal
    /// it; such a segment that is not persistent is removed, as `gc` would).
    ///
    /// ```
    /// use std::time::Duration;
    /// use zcbuf::{CreateOptions, Registry};
    /// let reg = Registry::global();
    /// let name = format!("seal-doc-{}", std::process::id());
    /// let id = reg.create_shared(Some(&name), 8, &CreateOptions::new()).unwrap();
    /// let early = reg.open_shared_wait(&name, false, Duration::ZERO);
    /// assert!(matches!(early, Err(zcbuf::Error::Timeout(_)))); // exists, not sealed yet
    /// reg.seal(id).unwrap();
    /// let ready = reg.open_shared_wait(&name, false, Duration::from_secs(5)).unwrap();
    /// assert!(reg.info(ready).unwrap().readonly);
    /// ```
    pub fn open_shared_wait(
        &self,
        name: &str,
        readonly: bool,
        timeout: std::time::Duration,
    ) -> Result<u64> {
        Ok(self.insert(crate::shm::open_wait(name, readonly, timeout)?))
    }

    /// Seals shared buffer `id`: its segment becomes immutable. Every later open of it, in any
    /// process, maps it read-only (also when asked for read-write), and this id's leases taken
    /// from now on refuse writes ([`Info::readonly`] turns true). Idempotent, also when another
    /// process sealed it.
    ///
    /// What it does not do: leases and pointers taken before, and other handles that mapped the
    /// segment writable before (here or in other processes), keep their writable mapping; no
    /// page protection is changed under them (a stray write would then be a crash). Seal when
    /// the writing is done. Errors: [`Error::InvalidArgument`] for private and file buffers;
    /// [`Error::ReadOnly`] for a handle opened read-only of a segment not sealed yet;
    /// [`Error::Permission`] when this user does not own the segment.
    pub fn seal(&self, id: u64) -> Result<()> {
        let mapped = self.with(id, |e| Arc::clone(&e.mapped))?;
        mapped.seal()?;
        if let Some(e) = self.shard(id).get_mut(&id) {
            e.readonly = true;
        }
        Ok(())
    }

    /// Creates a file-backed buffer at `path`, which must not exist (mode 0600; links are not
    /// followed).
    pub fn create_file(
        &self,
        path: impl AsRef<Path>,
        len: usize,
        opts: &CreateOptions,
    ) -> Result<u64> {
        Ok(self.insert(crate::file::create(path.as_ref(), len, opts)?))
    }

    /// Opens a file made by zcbuf, validating its header.
    pub fn open_file(&self, path: impl AsRef<Path>, readonly: bool) -> Result<u64> {
        Ok(self.insert(crate::file::open(path.as_ref(), readonly)?))
    }

    /// Takes a lease on `id` and returns its data address and length. The memory stays mapped
    /// until a matching [`Registry::release`] (or until this registry is dropped).
    pub fn acquire(&self, id: u64) -> Result<(NonNull<u8>, usize)> {
        self.acquire_entry(id).map(|(p, n, _)| (p, n))
    }

    /// [`Registry::acquire`] and [`Registry::info`] in one critical section: the lease and the
    /// description are of the same live buffer.
    pub fn acquire_info(&self, id: u64) -> Result<(NonNull<u8>, usize, Info)> {
        let mut map = self.shard(id);
        let e = map
            .get_mut(&id)
            .filter(|e| !e.retired)
            .ok_or_else(|| not_found(id))?;
        if e.exclusive {
            return Err(exclusive_error(id));
        }
        e.leases += 1;
        let p = NonNull::new(e.addr as *mut u8).expect("data address is never null");
        Ok((p, e.len, info_of(e)))
    }

    /// `acquire`, also saying whether the memory is read-only (in the same critical section).
    fn acquire_entry(&self, id: u64) -> Result<(NonNull<u8>, usize, bool)> {
        let mut map = self.shard(id);
        match map.get_mut(&id) {
            Some(e) if e.exclusive && !e.retired => Err(exclusive_error(id)),
            Some(e) if !e.retired => {
                e.leases += 1;
                let p = NonNull::new(e.addr as *mut u8).expect("data address is never null");
                Ok((p, e.len, e.readonly))
            }
            _ => Err(not_found(id)),
        }
    }

    /// Gives back one lease on `id`; unmaps a freed buffer when its last lease goes.
    pub fn release(&self, id: u64) -> Result<()> {
        let gone = {
            let mut map = self.shard(id);
            let Some(e) = map.get_mut(&id) else {
                return Err(not_found(id));
            };
            if e.leases == 0 {
                return Err(Error::InvalidArgument(format!(
                    "buffer id {id} has no lease to release (release called more often than acquire)"
                )));
            }
            e.leases -= 1;
            if e.leases == 0 && e.retired {
                map.remove(&id)
            } else {
                None
            }
        };
        // Unmapping (and a file's msync) happens here, outside the lock.
        drop(gone);
        Ok(())
    }

    /// Takes a lease as a guard that releases it when dropped.
    pub fn lease(&self, id: u64) -> Result<Lease<'_>> {
        let mapped = self.lease_entry(id)?;
        Ok(Lease {
            reg: self,
            id,
            ptr: mapped.data_ptr(),
            len: mapped.len(),
            readonly: mapped.readonly(),
            mapped,
        })
    }

    /// Takes one lease on `id` and a reference to its mapping (which the guards keep, so that
    /// no sequence of unbalanced [`Registry::release`] calls can unmap memory under them).
    fn lease_entry(&self, id: u64) -> Result<Arc<Mapped>> {
        let mut map = self.shard(id);
        match map.get_mut(&id) {
            Some(e) if e.exclusive && !e.retired => Err(exclusive_error(id)),
            Some(e) if !e.retired => {
                e.leases += 1;
                Ok(Arc::clone(&e.mapped))
            }
            _ => Err(not_found(id)),
        }
    }

    /// Retires `id` at once: later calls on it fail with not-found. The memory is unmapped when
    /// the last lease is released (at once if none is held). A file buffer is flushed to disk.
    /// This process holds a shared segment until its last mapping of it is unmapped; then, if
    /// no other process holds it and it was not created to persist, its name is removed.
    pub fn free(&self, id: u64) -> Result<()> {
        let (mapped, gone) = {
            let mut map = self.shard(id);
            let Some(e) = map.get_mut(&id) else {
                return Err(not_found(id));
            };
            if e.retired {
                return Err(Error::NotFound(format!(
                    "buffer id {id} was already freed (its memory stays mapped until its \
                     remaining {} lease(s) are released)",
                    e.leases
                )));
            }
            e.retired = true;
            let mapped = Arc::clone(&e.mapped);
            let gone = if e.leases == 0 { map.remove(&id) } else { None };
            (mapped, gone)
        };
        let flushed = mapped.flush();
        drop(gone);
        drop(mapped);
        flushed
    }

    fn with<T>(&self, id: u64, f: impl FnOnce(&Entry) -> T) -> Result<T> {
        let map = self.shard(id);
        match map.get(&id) {
            Some(e) if !e.retired => Ok(f(e)),
            _ => Err(not_found(id)),
        }
    }

    /// The data length of `id`.
    pub fn size(&self, id: u64) -> Result<usize> {
        self.with(id, |e| e.len)
    }

    /// The segment name of a shared buffer (`None` for other backings).
    pub fn name(&self, id: u64) -> Result<Option<String>> {
        self.with(id, |e| e.mapped.name().map(str::to_owned))
    }

    /// Everything known about `id`.
    pub fn info(&self, id: u64) -> Result<Info> {
        self.with(id, info_of)
    }

    /// Writes a file buffer's data to disk now (msync); a no-op for other backings.
    pub fn flush(&self, id: u64) -> Result<()> {
        let mapped = self.with(id, |e| Arc::clone(&e.mapped))?;
        mapped.flush()
    }

    /// Takes a lease as an [`OwnedLease`]: like [`Registry::lease`], but it borrows nothing, so
    /// it can move to another thread and outlive any handle (it needs a `'static` registry, such
    /// as [`Registry::global`]).
    ///
    /// ```
    /// use zcbuf::{CreateOptions, Registry};
    /// let reg = Registry::global();
    /// let id = reg.create(8, &CreateOptions::new()).unwrap();
    /// let lease = reg.lease_owned(id).unwrap();
    /// reg.free(id).unwrap(); // retired; the lease keeps the memory mapped
    /// let t = std::thread::spawn(move || {
    ///     lease.write_at(0, b"thread").unwrap();
    ///     let mut out = [0u8; 6];
    ///     lease.read_at(0, &mut out).unwrap();
    ///     out
    /// });
    /// assert_eq!(&t.join().unwrap(), b"thread");
    /// ```
    pub fn lease_owned(&'static self, id: u64) -> Result<OwnedLease> {
        let mapped = self.lease_entry(id)?;
        Ok(OwnedLease::new(self, id, mapped))
    }

    /// Inserts a new buffer with one lease already taken, returned as an [`OwnedLease`]. With
    /// `exclusive`, every other way to lease it is refused until [`Registry::share`].
    pub(crate) fn insert_owned(&'static self, mapped: Mapped, exclusive: bool) -> OwnedLease {
        let (id, mapped) = self.insert_entry(mapped, 1, exclusive);
        OwnedLease::new(self, id, mapped)
    }

    /// Lets anyone lease `id` again (clears the exclusive mark of [`Registry::insert_owned`]).
    pub(crate) fn share(&self, id: u64) {
        if let Some(e) = self.shard(id).get_mut(&id) {
            e.exclusive = false;
        }
    }

    /// Locks every shard, in order (for the fork handlers; see `liveness::before_fork`).
    pub(crate) fn lock_all(&'static self) -> Vec<Box<dyn std::any::Any>> {
        self.shards
            .iter()
            .map(|s| {
                let g: Box<dyn std::any::Any> =
                    Box::new(s.0.lock().unwrap_or_else(|p| p.into_inner()));
                g
            })
            .collect()
    }

    /// Number of live (not freed) ids.
    pub fn live(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.0.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                    .filter(|e| !e.retired)
                    .count()
            })
            .sum()
    }
}

fn check_range(len: usize, off: usize, n: usize) -> Result<()> {
    match off.checked_add(n) {
        Some(end) if end <= len => Ok(()),
        _ => Err(Error::InvalidArgument(format!(
            "range {off}..{off}+{n} is outside the {len}-byte buffer"
        ))),
    }
}

/// Copies `src` to `off` of the `len` writable bytes at `ptr` (a lease's memory), range checked.
fn copy_in(ptr: NonNull<u8>, len: usize, off: usize, src: &[u8]) -> Result<()> {
    check_range(len, off, src.len())?;
    // SAFETY: the callers are leases, whose mapping stays mapped while they live, and which
    // checked it writable; the range was checked to lie inside it; `src` is Rust memory,
    // distinct from a mapping zcbuf made, so they do not overlap; no reference to the mapped
    // bytes is made.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), ptr.as_ptr().add(off), src.len()) };
    Ok(())
}

/// Copies bytes at `off` of the `len` readable bytes at `ptr` into `dst`, range checked.
fn copy_out(ptr: NonNull<u8>, len: usize, off: usize, dst: &mut [u8]) -> Result<()> {
    check_range(len, off, dst.len())?;
    // SAFETY: as for `copy_in`, reading: the mapping is kept and readable, the range inside it;
    // `dst` is distinct Rust memory; every byte value is a valid `u8`.
    unsafe { std::ptr::copy_nonoverlapping(ptr.as_ptr().add(off), dst.as_mut_ptr(), dst.len()) };
    Ok(())
}

/// A lease on a buffer's memory that is released when dropped.
///
/// Memory of shared and file buffers may be written by other processes at any time, so a lease
/// gives copies in and out and raw pointers, never a `&[u8]`.
pub struct Lease<'a> {
    reg: &'a Registry,
    id: u64,
    ptr: NonNull<u8>,
    len: usize,
    readonly: bool,
    /// Keeps the memory mapped while the guard lives, whatever else is done to the id's count
    /// (an unbalanced `release` elsewhere cannot unmap it); dropped after the release.
    #[allow(dead_code)]
    mapped: Arc<Mapped>,
}

impl Lease<'_> {
    /// The buffer id.
    pub fn id(&self) -> u64 {
        self.id
    }
    /// The data address; valid for [`Lease::len`] bytes while the lease lives.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    /// Data length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True for a zero-length buffer.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// True when mapped read-only, or sealed through this buffer (writes are then refused).
    pub fn readonly(&self) -> bool {
        self.readonly || self.mapped.sealed_here()
    }

    /// Copies `src` into the buffer at `off`.
    pub fn write_at(&self, off: usize, src: &[u8]) -> Result<()> {
        if self.readonly() {
            return Err(read_only(self.id, &self.mapped));
        }
        copy_in(self.ptr, self.len, off, src)
    }

    /// Copies bytes from the buffer at `off` into `dst`.
    pub fn read_at(&self, off: usize, dst: &mut [u8]) -> Result<()> {
        copy_out(self.ptr, self.len, off, dst)
    }
}

impl Drop for Lease<'_> {
    /// Policy: releases the lease, then drops the guard's reference to the mapping; a buffer
    /// freed meanwhile is unmapped now if this was the last of both.
    fn drop(&mut self) {
        let _ = self.reg.release(self.id);
    }
}

/// A lease that owns what it needs: `'static`, [`Send`] and [`Sync`], so it can move to or be
/// shared with other threads and outlive the [`crate::Buffer`] or id it came from.
///
/// It counts as a lease of its registry (so [`Registry::free`] only retires the id) *and* holds
/// the buffer's mapping itself, so its memory stays mapped until it is dropped whatever else
/// happens to the id (even unbalanced [`Registry::release`] calls). Take one with
/// [`Registry::lease_owned`], [`crate::Buffer::lease`] or [`crate::Buffer::into_lease`]; typed
/// element access (`read`, `write`, `copy_to_slice`, ...) is documented with [`crate::Buffer`].
///
/// Like [`Lease`], it gives copies and raw pointers, never a `&[u8]`: the memory may be written
/// by other leases, threads and processes at any time.
///
/// **Drop policy:** releases the registry lease (ignoring an error: the id may have been
/// released by someone else), then drops its mapping reference; if that was the last, the memory
/// is unmapped (a file buffer flushed first) and, for a shared buffer, this process's hold on the
/// segment ends.
pub struct OwnedLease {
    reg: &'static Registry,
    id: u64,
    ptr: NonNull<u8>,
    len: usize,
    readonly: bool,
    /// Keeps the memory mapped for as long as this lease lives, independently of the registry's
    /// count; declared last so it drops after the release in `Drop`.
    mapped: Arc<Mapped>,
}

// SAFETY: `OwnedLease` is a `'static` registry reference (the registry is `Sync`: sharded
// mutexes), an id, an `Arc<Mapped>` (the mapping is never moved and is unmapped only when the
// last `Arc` goes, from whichever thread drops it; `Mapped` holds no thread-bound state) and a
// cached address into that mapping. Nothing about it is tied to the thread that made it: release
// takes the shard lock from any thread. So moving it to another thread is sound.
unsafe impl Send for OwnedLease {}
// SAFETY: `&OwnedLease` gives immutable metadata and copies through raw pointers. Any thread can
// already take its own lease on the same id and do exactly the same accesses at the same time,
// so sharing one lease between threads adds no access pattern: the memory is treated as written
// by others at any time (see "The Rust face" in docs/design.md), and never handed out as a
// reference.
unsafe impl Sync for OwnedLease {}

impl OwnedLease {
    fn new(reg: &'static Registry, id: u64, mapped: Arc<Mapped>) -> OwnedLease {
        OwnedLease {
            reg,
            id,
            ptr: mapped.data_ptr(),
            len: mapped.len(),
            readonly: mapped.readonly(),
            mapped,
        }
    }
    /// The buffer id (possibly freed already: the lease outlives it).
    pub fn id(&self) -> u64 {
        self.id
    }
    /// The data address; valid for [`OwnedLease::len`] bytes while the lease lives. Writes
    /// through it need a writable buffer ([`OwnedLease::readonly`] false); memory that others
    /// may write must not be turned into references (see [`crate::Buffer::view`]).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    /// Data length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True for a zero-length buffer.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// True when mapped read-only, or sealed through this buffer (writes are then refused).
    pub fn readonly(&self) -> bool {
        self.readonly || self.mapped.sealed_here()
    }
    /// The backing.
    pub fn kind(&self) -> Kind {
        self.mapped.kind()
    }
    /// The dtype and shape stored with the buffer.
    pub fn meta(&self) -> &Meta {
        self.mapped.meta()
    }
    /// The segment name (shared buffers).
    pub fn name(&self) -> Option<&str> {
        self.mapped.name()
    }
    /// The file path (file buffers).
    pub fn path(&self) -> Option<&Path> {
        self.mapped.path()
    }

    pub(crate) fn mapped(&self) -> &Mapped {
        &self.mapped
    }

    /// Copies `src` into the buffer at byte offset `off`.
    pub fn write_at(&self, off: usize, src: &[u8]) -> Result<()> {
        if self.readonly() {
            return Err(read_only(self.id, &self.mapped));
        }
        copy_in(self.ptr, self.len, off, src)
    }

    /// Copies bytes from the buffer at byte offset `off` into `dst`.
    pub fn read_at(&self, off: usize, dst: &mut [u8]) -> Result<()> {
        copy_out(self.ptr, self.len, off, dst)
    }
}

impl std::fmt::Debug for OwnedLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedLease")
            .field("id", &self.id)
            .field("kind", &self.kind())
            .field("len", &self.len)
            .field("readonly", &self.readonly)
            .finish()
    }
}

impl Drop for OwnedLease {
    /// Policy: releases the registry lease (an error, e.g. someone else released it, is
    /// ignored); then the mapping reference goes, unmapping the memory if it was the last.
    fn drop(&mut self) {
        let _ = self.reg.release(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_start_at_one_and_are_unique() {
        let r = Registry::new();
        let a = r.create(1, &CreateOptions::new()).unwrap();
        let b = r.create(1, &CreateOptions::new()).unwrap();
        assert_eq!(a, 1);
        assert_eq!(b, 2);
        r.free(a).unwrap();
        let c = r.create(1, &CreateOptions::new()).unwrap();
        assert_eq!(c, 3);
    }

    #[test]
    fn hasher_spreads_ids_of_one_shard() {
        let mut seen = std::collections::HashSet::new();
        for k in 0..1000u64 {
            let mut h = IdHasher::default();
            h.write_u64(k * SHARDS as u64 + 5);
            seen.insert(h.finish() & 1023);
        }
        assert!(seen.len() > 500, "{}", seen.len());
    }
}
