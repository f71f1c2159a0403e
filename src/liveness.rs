//! Liveness the kernel keeps: locks on a segment's open file.
//!
//! Every process that maps any part of a shared segment keeps one open file of it with a
//! **shared `flock`** on it (the *hold*). The kernel drops the lock when the last descriptor of
//! that open file is closed, which happens when the process unmaps its last view of the segment
//! or dies in any way, in any pid namespace: no pid, no `/proc`, no slot table, no daemon.
//!
//! Two locks, two roles (`flock` and `fcntl` locks are independent of each other on Linux):
//!
//! | lock | taken by | meaning |
//! |---|---|---|
//! | `flock` shared | every holder, from before its name check until its last unmap | "I map it" |
//! | `flock` exclusive, non-blocking | a remover (last holder leaving, `gc`, a create replacing a dead segment) | "nobody maps it" — proven by getting it |
//! | OFD `fcntl` write lock on byte 2^62 ([`NAME_BYTE`]) | anyone about to remove the segment's name (remover, `unlink`) | serialises name removals, so the check "the name still points to this file" stays true until the `unlink` |
//!
//! Bytes from 2^62 + 16 up are left for later roles (a channel's publisher and subscribers).
//! Only removers (which remove the name when they get it) and holders take the `flock`: a
//! probe that took the exclusive lock without removing could make a concurrent last holder
//! leave the name behind, so `ls` reads `/proc/locks` instead.
//!
//! `flock` locks belong to the open file description, so a `fork` child shares its parent's
//! hold until both have closed their descriptor; `/proc/locks` names the process that took
//! the lock. See `docs/design.md` for the protocol and its interleavings.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Once, OnceLock, Weak};
use std::time::{Duration, Instant};

use rustix::fs::{AtFlags, FlockOperation};
use rustix::io::Errno;

use crate::error::{Error, Result};

/// The byte whose OFD write lock guards removing a segment's name: far past any data, so that a
/// program locking ranges of a segment's data with `fcntl`/`lockf` does not contend with it
/// (only a whole-file lock does).
pub const NAME_BYTE: i64 = 1 << 62;

/// How long a call waits for a lock another process holds before it reports
/// [`Error::Timeout`]. zcbuf itself holds the exclusive locks for microseconds; only a stuck or
/// hostile process holds one longer.
pub const LOCK_WAIT: Duration = Duration::from_secs(2);

/// Identifies a file on this machine: (device, inode). An inode cannot be reused while any
/// process still has the file open, and every holder does.
pub type FileKey = (u64, u64);

pub(crate) fn key_of(st: &rustix::fs::Stat) -> FileKey {
    (st.st_dev, st.st_ino)
}

fn retry_eintr<T>(mut f: impl FnMut() -> rustix::io::Result<T>) -> rustix::io::Result<T> {
    loop {
        match f() {
            Err(Errno::INTR) => continue,
            r => return r,
        }
    }
}

/// Tries to take this open file's hold (shared) without waiting. `Ok(false)`: another open
/// file holds the exclusive lock (a remover at work, or a hostile process).
pub(crate) fn try_hold(fd: BorrowedFd<'_>) -> Result<bool> {
    flock_nb(
        fd,
        FlockOperation::NonBlockingLockShared,
        "take the hold on",
    )
}

/// Tries to take the exclusive lock without waiting: `Ok(true)` proves that no other open file
/// holds the segment (if this open file held it shared, that lock is replaced).
pub(crate) fn try_exclusive(fd: BorrowedFd<'_>) -> Result<bool> {
    flock_nb(fd, FlockOperation::NonBlockingLockExclusive, "lock")
}

fn flock_nb(fd: BorrowedFd<'_>, op: FlockOperation, what: &str) -> Result<bool> {
    match retry_eintr(|| rustix::fs::flock(fd, op)) {
        Ok(()) => Ok(true),
        Err(Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(Error::from_errno(&format!("{what} a segment (flock)"), e)),
    }
}

/// Takes the hold (shared), waiting up to [`LOCK_WAIT`] while another open file holds the
/// exclusive lock. `what` names the segment for the error message.
pub(crate) fn hold_bounded(fd: BorrowedFd<'_>, what: &dyn std::fmt::Display) -> Result<()> {
    wait_for(|| try_hold(fd), what, "holds it locked exclusively")
}

fn wait_for(
    mut attempt: impl FnMut() -> Result<bool>,
    what: &dyn std::fmt::Display,
    why: &str,
) -> Result<()> {
    let start = Instant::now();
    let mut pause = Duration::from_micros(20);
    loop {
        if attempt()? {
            return Ok(());
        }
        if start.elapsed() >= LOCK_WAIT {
            return Err(Error::Timeout(format!(
                "another process {why} {what} for over {} s (zcbuf's own removers hold it for \
                 microseconds, so it is likely stuck or hostile; `python -m zcbuf ls` and \
                 /proc/locks show who): see docs/security.md",
                LOCK_WAIT.as_secs()
            )));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

/// Takes the OFD write lock on [`NAME_BYTE`], waiting up to [`LOCK_WAIT`].
pub(crate) fn lock_name(fd: BorrowedFd<'_>, what: &dyn std::fmt::Display) -> Result<()> {
    wait_for(
        || ofd_lock(fd, NAME_BYTE, libc::F_WRLCK as i16),
        what,
        "is removing the name of",
    )
}

/// `fcntl(F_OFD_SETLK)` on one byte; `Ok(false)` when another open file holds a conflicting lock.
pub(crate) fn ofd_lock(fd: BorrowedFd<'_>, byte: i64, ty: i16) -> Result<bool> {
    loop {
        // SAFETY: `flock` is a plain C struct of integers; all-zero is a valid value.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = ty;
        fl.l_whence = libc::SEEK_SET as i16;
        fl.l_start = byte;
        fl.l_len = 1;
        // SAFETY: `fd` is a valid open descriptor for the duration of the call (borrowed), and
        // `fl` is a valid, initialised `struct flock` that F_OFD_SETLK only reads.
        let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
        if r == 0 {
            return Ok(true);
        }
        match Errno::from_io_error(&std::io::Error::last_os_error()) {
            Some(Errno::INTR) => continue,
            Some(Errno::AGAIN) | Some(Errno::ACCESS) => return Ok(false),
            Some(e) => return Err(Error::from_errno("lock a segment's name (fcntl)", e)),
            None => return Err(Error::Io("fcntl(F_OFD_SETLK) failed".into())),
        }
    }
}

/// `fcntl(F_OFD_GETLK)` on one byte: whether another open file holds a lock on it (a role
/// lock: a channel's publisher or a subscriber slot). Never waits.
pub(crate) fn ofd_locked_by_other(fd: BorrowedFd<'_>, byte: i64) -> Result<bool> {
    loop {
        // SAFETY: `flock` is a plain C struct of integers; all-zero is a valid value.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        fl.l_start = byte;
        fl.l_len = 1;
        // SAFETY: `fd` is a valid open descriptor for the duration of the call (borrowed), and
        // `fl` is a valid, initialised `struct flock` that F_OFD_GETLK reads and overwrites.
        let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
        if r == 0 {
            return Ok(fl.l_type != libc::F_UNLCK as i16);
        }
        match Errno::from_io_error(&std::io::Error::last_os_error()) {
            Some(Errno::INTR) => continue,
            Some(e) => return Err(Error::from_errno("test a channel role lock (fcntl)", e)),
            None => return Err(Error::Io("fcntl(F_OFD_GETLK) failed".into())),
        }
    }
}

/// The pids of processes that hold file `key` (shared `flock`s), as `/proc/locks` reports
/// them: the process that took each lock, translated into this process's pid namespace (0 for
/// a process this namespace cannot see). Empty when `/proc/locks` is unreadable.
pub fn holder_pids(key: FileKey) -> Vec<i32> {
    holder_table()
        .and_then(|mut t| t.remove(&key))
        .unwrap_or_default()
}

/// True when `/proc/locks` shows a remover (an exclusive `flock`) on file `key`; `None` when
/// `/proc/locks` cannot be read.
pub(crate) fn remover_at_work(key: FileKey) -> Option<bool> {
    Some(flock_table(true)?.contains_key(&key))
}

/// The pids holding an exclusive `flock` on file `key`, as `/proc/locks` names them.
pub(crate) fn exclusive_pids(key: FileKey) -> Vec<i32> {
    flock_table(true)
        .and_then(|mut t| t.remove(&key))
        .unwrap_or_default()
}

/// Every holder (shared `flock`) in `/proc/locks`, by file; `None` when it cannot be read.
/// (Exclusive `flock`s are removers at work, not holders.)
pub(crate) fn holder_table() -> Option<HashMap<FileKey, Vec<i32>>> {
    flock_table(false)
}

/// `/proc/locks`, read so that no entry is missed. The kernel lists it a page per `read`, and
/// each `read` resumes by position, so a lock that goes away between two reads can make the
/// next read skip another, live one. Each read is one large `read` call (so a listing of less
/// than a page is one consistent snapshot); the listing is read until two agree, or three times
/// and united (a holder that just left may then be listed; one that holds is never missed
/// unless locks churn in all three).
fn read_proc_locks() -> Option<String> {
    let once = || -> Option<String> {
        use std::io::Read;
        let mut f = std::fs::File::open("/proc/locks").ok()?;
        let mut buf = Vec::with_capacity(1 << 16);
        f.read_to_end(&mut buf).ok()?;
        String::from_utf8(buf).ok()
    };
    let a = once()?;
    let b = once()?;
    if a == b {
        return Some(a);
    }
    let c = once()?;
    Some(a + &b + &c)
}

fn flock_table(exclusive: bool) -> Option<HashMap<FileKey, Vec<i32>>> {
    let mut out: HashMap<FileKey, Vec<i32>> = HashMap::new();
    let text = read_proc_locks()?;
    for line in text.lines() {
        // "12: FLOCK  ADVISORY  READ  1234 00:1b:8 0 EOF"; blocked waiters have "->" and are
        // not holders.
        let f: Vec<&str> = line.split_ascii_whitespace().collect();
        if f.len() < 6 || f[1] != "FLOCK" || (f[3] == "WRITE") != exclusive {
            continue;
        }
        let Ok(pid) = f[4].parse::<i32>() else {
            continue;
        };
        let mut dev = f[5].split(':');
        let (Some(maj), Some(min), Some(ino)) = (dev.next(), dev.next(), dev.next()) else {
            continue;
        };
        let (Ok(maj), Ok(min), Ok(ino)) = (
            u32::from_str_radix(maj, 16),
            u32::from_str_radix(min, 16),
            ino.parse::<u64>(),
        ) else {
            continue;
        };
        let key = (rustix::fs::makedev(maj, min), ino);
        let pids = out.entry(key).or_default();
        if !pids.contains(&pid) {
            pids.push(pid);
        }
    }
    Some(out)
}

// ---------------------------------------------------------------------------------------------
// fork

static FORKS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The locks [`before_fork`] took, released by [`after_fork`] in the parent and the child.
    static FORK_GUARDS: std::cell::RefCell<Vec<Box<dyn std::any::Any>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// `pthread_atfork` prepare handler: counts the fork, and takes every zcbuf lock (the hold map,
/// the left-held list, then the global registry's shards) so that the child starts with none of them held by a
/// thread that does not exist there. No zcbuf code takes these in another order, and none
/// waits for anything while holding them.
extern "C" fn before_fork() {
    FORKS.fetch_add(1, Ordering::SeqCst);
    let mut guards: Vec<Box<dyn std::any::Any>> = Vec::with_capacity(1 + crate::registry::SHARDS);
    guards.push(Box::new(held()));
    guards.push(Box::new(
        LEFT_HELD.lock().unwrap_or_else(|p| p.into_inner()),
    ));
    guards.extend(crate::registry::Registry::global().lock_all());
    let _ = FORK_GUARDS.try_with(|g| {
        if let Ok(mut g) = g.try_borrow_mut() {
            *g = guards;
        }
    });
}

/// `pthread_atfork` parent and child handler: releases what [`before_fork`] took.
extern "C" fn after_fork() {
    let _ = FORK_GUARDS.try_with(|g| {
        if let Ok(mut g) = g.try_borrow_mut() {
            g.clear();
        }
    });
}

/// Registers the fork handlers (once per process). Called when the global registry is made.
pub(crate) fn register_fork_handlers() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // SAFETY: the handlers are plain functions that live as long as the library (glibc
        // unregisters a library's handlers when it is unloaded); they only count, lock and
        // unlock, in the forking thread, and never unwind (nothing in them panics: `try_with`
        // and `try_borrow_mut` report instead).
        unsafe { libc::pthread_atfork(Some(before_fork), Some(after_fork), Some(after_fork)) };
    });
}

/// How many times this process (or an ancestor, before forking it) has called `fork` since
/// zcbuf was first used. A hold taken at an older epoch may share its open file with a child,
/// so its own lock proves nothing about the child: see [`Hold`]'s drop.
pub(crate) fn fork_epoch() -> u64 {
    register_fork_handlers();
    FORKS.load(Ordering::SeqCst)
}

// ---------------------------------------------------------------------------------------------
// /dev/shm

/// The directory of POSIX shared memory, opened once per process (`O_PATH`).
pub(crate) fn shm_dir() -> Result<BorrowedFd<'static>> {
    static DIR: OnceLock<OwnedFd> = OnceLock::new();
    if let Some(fd) = DIR.get() {
        return Ok(fd.as_fd());
    }
    // A failure (out of descriptors, say) is not remembered: the next call tries again.
    let fd = rustix::fs::open(
        crate::shm::SHM_DIR,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| {
        crate::shm::open_error(
            &format!("open {} (POSIX shared memory)", crate::shm::SHM_DIR),
            e,
        )
    })?;
    // Two threads may both open it; one descriptor wins, the other is closed.
    Ok(DIR.get_or_init(|| fd).as_fd())
}

/// [`remove_name_if`] without waiting for the name lock: `Ok(None)` when another open file holds
/// it.
pub(crate) fn try_remove_name_if(
    fd: BorrowedFd<'_>,
    dir: BorrowedFd<'_>,
    name: &str,
    key: FileKey,
) -> Result<Option<bool>> {
    if !ofd_lock(fd, NAME_BYTE, libc::F_WRLCK as i16)? {
        return Ok(None);
    }
    unlink_if_named(dir, name, key).map(Some)
}

/// Removes `name` from `dir` if it still names file `key`, under the name lock taken through
/// `fd` (an open file of `key`). Returns whether it removed it. The caller has decided the
/// segment may go (or is `unlink`, which removes held segments too).
pub(crate) fn remove_name_if(
    fd: BorrowedFd<'_>,
    dir: BorrowedFd<'_>,
    name: &str,
    key: FileKey,
) -> Result<bool> {
    lock_name(fd, &format_args!("{name:?}"))?;
    unlink_if_named(dir, name, key)
    // The name lock is released when the caller closes `fd`.
}

/// The last step of a removal, under the name lock: unlink `name` if it names file `key`.
fn unlink_if_named(dir: BorrowedFd<'_>, name: &str, key: FileKey) -> Result<bool> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if key_of(&st) == key => {}
        Ok(_) | Err(Errno::NOENT) => return Ok(false),
        Err(e) => return Err(Error::from_errno(&format!("stat {name:?}"), e)),
    }
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) => Ok(true),
        Err(Errno::NOENT) => Ok(false),
        Err(e) => Err(Error::from_errno(&format!("remove {name:?}"), e)),
    }
}

// ---------------------------------------------------------------------------------------------
// Segments this process left while others held them

/// The segments this process stopped holding while other processes still held them: if all of
/// those exit without unmapping cleanly (killed, or `os._exit`, which is how `multiprocessing`
/// fork workers end, or sharing this process's open file after a `fork`), nobody is left to
/// remove the name. This process looks again later: at most every [`RECHECK_EVERY`] on its
/// zcbuf calls, on every `ls` and `gc`, and when it exits (`exit`, not `_exit`), and removes
/// each one that nobody holds any more. Bounded: the oldest are forgotten past
/// [`LEFT_HELD_CAP`] (`gc` still finds them).
static LEFT_HELD: Mutex<Vec<(String, FileKey)>> = Mutex::new(Vec::new());
static HAS_LEFT_HELD: AtomicBool = AtomicBool::new(false);
static LAST_RECHECK_MS: AtomicU64 = AtomicU64::new(0);
/// How often zcbuf calls look again at segments this process left while others held them, at most.
pub const RECHECK_EVERY: Duration = Duration::from_millis(100);
/// How many left-held segments a process remembers.
pub const LEFT_HELD_CAP: usize = 4096;

fn note_left_held(name: &str, key: FileKey) {
    if held().get(&key).is_some_and(|w| w.strong_count() > 0) {
        return; // this process holds it again: its own last unmap will look
    }
    let mut v = LEFT_HELD.lock().unwrap_or_else(|p| p.into_inner());
    if v.iter().any(|(_, k)| *k == key) {
        return;
    }
    if v.len() >= LEFT_HELD_CAP {
        v.remove(0);
    }
    v.push((name.to_owned(), key));
    HAS_LEFT_HELD.store(true, Ordering::Release);
    register_exit_recheck();
}

fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Looks again at the segments this process left while others held them (see [`LEFT_HELD`]),
/// removing each that nobody holds now; `force` ignores the rate limit. Returns the names
/// removed.
pub(crate) fn recheck_left_held(force: bool) -> Vec<String> {
    if !HAS_LEFT_HELD.load(Ordering::Acquire) {
        return Vec::new();
    }
    let now = now_ms();
    let last = LAST_RECHECK_MS.load(Ordering::Relaxed);
    if !force && now.saturating_sub(last) < RECHECK_EVERY.as_millis() as u64 {
        return Vec::new();
    }
    LAST_RECHECK_MS.store(now, Ordering::Relaxed);
    // On the hot paths (open, create) look at a few entries per turn; ls, gc and exit look at
    // all. Never wait: a busy lock keeps the entry for the next turn.
    let mut list = std::mem::take(&mut *LEFT_HELD.lock().unwrap_or_else(|p| p.into_inner()));
    let rest = if force || list.len() <= RECHECK_BATCH {
        Vec::new()
    } else {
        list.split_off(RECHECK_BATCH)
    };
    let Ok(dir) = shm_dir() else {
        restore_left_held(list.into_iter().chain(rest));
        return Vec::new();
    };
    let mut keep = Vec::new();
    let mut removed = Vec::new();
    for (name, key) in list {
        let fd = match rustix::fs::openat(
            dir,
            name.as_str(),
            crate::shm::open_flags(true),
            rustix::fs::Mode::empty(),
        ) {
            Ok(fd) => fd,
            // Gone, or no longer a file we may judge: forget it.
            Err(Errno::NOENT) | Err(Errno::LOOP) | Err(Errno::ACCESS) | Err(Errno::ISDIR) => {
                continue;
            }
            // Out of descriptors or memory, say: look again next time.
            Err(_) => {
                keep.push((name, key));
                continue;
            }
        };
        match rustix::fs::fstat(&fd) {
            Ok(st) if key_of(&st) != key => continue, // the name names another segment now
            Ok(_) => {}
            Err(_) => {
                keep.push((name, key));
                continue;
            }
        }
        match try_exclusive(fd.as_fd()) {
            Ok(true) => match try_remove_name_if(fd.as_fd(), dir, &name, key) {
                Ok(Some(true)) => removed.push(name),
                Ok(Some(false)) => {} // the name names another segment now
                Ok(None) | Err(_) => keep.push((name, key)), // name lock busy: next time
            },
            Ok(false) | Err(_) => keep.push((name, key)),
        }
    }
    // Rotate: what was not looked at this turn comes first next turn.
    restore_left_held(rest.into_iter().chain(keep));
    removed
}

/// How many left-held entries a rate-limited look (on open and create) examines.
const RECHECK_BATCH: usize = 8;

fn restore_left_held(entries: impl Iterator<Item = (String, FileKey)>) {
    let mut v = LEFT_HELD.lock().unwrap_or_else(|p| p.into_inner());
    for k in entries {
        if v.len() < LEFT_HELD_CAP && !v.iter().any(|(_, key)| *key == k.1) {
            v.push(k);
        }
    }
    HAS_LEFT_HELD.store(!v.is_empty(), Ordering::Release);
}

extern "C" fn recheck_at_exit() {
    // Never unwind out of an exit handler.
    let _ = std::panic::catch_unwind(|| {
        leave_leaked_at_exit();
        recheck_left_held(true)
    });
}

/// At normal exit, the holds still alive are leaked ones (a DLPack consumer whose deleter
/// skips during interpreter shutdown, a `mem::forget`, a lease never released): their mappings
/// go with the process, but their close protocol would never run, and a segment whose last
/// holder we are would keep its name. So run its removal half now: convert our shared lock to
/// exclusive (only in the process that took it, with no fork since — else a child may share
/// the open file) and, when that proves nobody else holds the segment, remove the name. The
/// mappings stay until the process is gone; only the name goes, as it would have.
fn leave_leaked_at_exit() {
    let holds: Vec<Arc<Hold>> = held().values().filter_map(Weak::upgrade).collect();
    let Ok(dir) = shm_dir() else { return };
    let pid = std::process::id();
    let epoch = FORKS.load(Ordering::SeqCst);
    for h in holds {
        if h.persistent || !h.writable || h.pid != pid || h.epoch != epoch {
            continue;
        }
        let Some(fd) = h.fd.as_ref() else { continue };
        if try_exclusive(fd.as_fd()).unwrap_or(false) {
            let _ = remove_name_if(fd.as_fd(), dir, &h.name, h.key);
        }
    }
}

fn register_exit_recheck() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // SAFETY: `recheck_at_exit` is a plain function that lives as long as the library and
        // catches every panic; `atexit` only records it.
        unsafe { libc::atexit(recheck_at_exit) };
    });
}

// ---------------------------------------------------------------------------------------------
// This process's holds

/// This process's hold on one shared segment: the open file that carries its shared `flock`.
/// One per segment per process, however many buffers, arrays and leases map it; every mapping
/// of the segment keeps an `Arc<Hold>`, so the hold ends after the last unmap.
pub(crate) struct Hold {
    fd: Option<OwnedFd>,
    key: FileKey,
    name: String,
    persistent: bool,
    /// [`fork_epoch`] read before `fd` was opened.
    epoch: u64,
    /// The process that took it (a child made without fork handlers has another pid).
    pid: u32,
    /// `fd` is open for writing (needed for the exclusive lock).
    writable: bool,
}

static HELD: LazyLock<Mutex<HashMap<FileKey, Weak<Hold>>>> = LazyLock::new(Default::default);

fn held() -> MutexGuard<'static, HashMap<FileKey, Weak<Hold>>> {
    // Nothing panics under this lock; a poisoned map is still consistent.
    HELD.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a new hold is made of.
pub(crate) struct NewHold {
    /// The open file, already holding its shared `flock`.
    pub fd: OwnedFd,
    /// Its identity.
    pub key: FileKey,
    /// The segment's name.
    pub name: String,
    /// From the header.
    pub persistent: bool,
    /// [`fork_epoch`] read before `fd` was opened.
    pub epoch: u64,
    /// `fd` is open for writing.
    pub writable: bool,
}

impl Hold {
    /// This process's hold on `h.key`: the existing one if this process already holds the
    /// segment, else `h` made into one. In the first case the redundant lock on `h.fd` is
    /// released (a mapping made through `h.fd` keeps its open file alive, and with it any lock
    /// on it, so closing `h.fd` would not be enough).
    pub(crate) fn adopt(h: NewHold) -> Arc<Hold> {
        register_exit_recheck();
        let pid = std::process::id();
        let mut map = held();
        // `existing` is dropped only after the map's lock (below): it may be the last strong
        // reference (another thread unmapping meanwhile), and `Hold::drop` takes that lock.
        let existing = map.get(&h.key).and_then(Weak::upgrade);
        if let Some(e) = &existing {
            // Reuse it unless a fork happened since it was taken: then its open file (and lock)
            // may be shared with another process, and this process is better served by a lock
            // of its own (which /proc/locks also shows under its own pid). The older hold stays
            // alive as long as mappings made through it do.
            if e.epoch == h.epoch && e.pid == pid {
                drop(map);
                // Only this call has `h.fd`'s open file, so this unlocks nobody else's lock.
                let _ = retry_eintr(|| rustix::fs::flock(&h.fd, FlockOperation::Unlock));
                return existing.expect("checked above");
            }
        }
        let hold = Arc::new(Hold {
            fd: Some(h.fd),
            key: h.key,
            name: h.name,
            persistent: h.persistent,
            epoch: h.epoch,
            pid,
            writable: h.writable,
        });
        map.insert(h.key, Arc::downgrade(&hold));
        drop(map);
        drop(existing);
        hold
    }

    /// The open file that carries the hold (for mapping through it).
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd
            .as_ref()
            .expect("a live hold has its descriptor")
            .as_fd()
    }

    /// The close protocol, after this process's last mapping of the segment is gone: if no
    /// other process holds it and it is not persistent, remove its name (only if the name still
    /// names this segment). Returns whether the name was removed.
    fn leave(&mut self) -> Result<bool> {
        let Some(fd) = self.fd.take() else {
            return Ok(false);
        };
        if self.persistent {
            return Ok(false);
        }
        let dir = shm_dir()?;
        let unforked = self.epoch == fork_epoch() && self.pid == std::process::id();
        let fd = if self.writable && unforked {
            // No fork since we opened it: no other process shares this open file, so
            // converting our shared lock to exclusive succeeds exactly when no other process
            // holds the segment. (A failed conversion drops our lock: we are leaving anyway.)
            if !try_exclusive(fd.as_fd())? {
                note_left_held(&self.name, self.key);
                return Ok(false);
            }
            fd
        } else {
            // A child may share our open file (and so our lock): close ours, then ask with an
            // open file of our own whether anyone, that child included, still holds it.
            drop(fd);
            let fresh = match rustix::fs::openat(
                dir,
                self.name.as_str(),
                crate::shm::open_flags(true),
                rustix::fs::Mode::empty(),
            ) {
                Ok(f) => f,
                Err(_) => return Ok(false), // gone, replaced or not ours to remove
            };
            let st = rustix::fs::fstat(&fresh)
                .map_err(|e| Error::from_errno(&format!("stat {:?}", self.name), e))?;
            if key_of(&st) != self.key {
                return Ok(false);
            }
            if !try_exclusive(fresh.as_fd())? {
                note_left_held(&self.name, self.key);
                return Ok(false);
            }
            fresh
        };
        remove_name_if(fd.as_fd(), dir, &self.name, self.key)
    }
}

impl Drop for Hold {
    /// Policy: forget this hold (unless a newer hold of the same segment took its place), then
    /// run the close protocol; errors are ignored (a name left behind is removed by `gc` or
    /// replaced by the next create of that name).
    fn drop(&mut self) {
        {
            let mut map = held();
            let me: *const Hold = self;
            if map
                .get(&self.key)
                .is_some_and(|w| std::ptr::eq(w.as_ptr(), me))
            {
                map.remove(&self.key);
            }
        }
        let _ = self.leave();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_locks_parse() {
        // Our own flock shows up with our pid.
        let f = tempfile_in_shm();
        assert!(try_hold(f.as_fd()).unwrap());
        let st = rustix::fs::fstat(&f).unwrap();
        let pids = holder_pids(key_of(&st));
        assert_eq!(pids, vec![std::process::id() as i32]);
        // A second open file cannot take the exclusive lock; the first can convert.
        let g = rustix::fs::open(
            format!("/proc/self/fd/{}", f.as_raw_fd()).as_str(),
            rustix::fs::OFlags::RDWR,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        assert!(try_hold(g.as_fd()).unwrap());
        assert!(!try_exclusive(f.as_fd()).unwrap());
        drop(g);
        assert!(try_exclusive(f.as_fd()).unwrap());
    }

    fn tempfile_in_shm() -> OwnedFd {
        rustix::fs::openat(
            shm_dir().unwrap(),
            ".",
            rustix::fs::OFlags::TMPFILE | rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .unwrap()
    }

    #[test]
    fn name_lock_is_exclusive_between_open_files() {
        let f = tempfile_in_shm();
        let g = rustix::fs::open(
            format!("/proc/self/fd/{}", f.as_raw_fd()).as_str(),
            rustix::fs::OFlags::RDWR,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        assert!(ofd_lock(f.as_fd(), NAME_BYTE, libc::F_WRLCK as i16).unwrap());
        assert!(!ofd_lock(g.as_fd(), NAME_BYTE, libc::F_WRLCK as i16).unwrap());
        drop(f);
        assert!(ofd_lock(g.as_fd(), NAME_BYTE, libc::F_WRLCK as i16).unwrap());
    }
}
