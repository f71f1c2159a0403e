//! Named POSIX shared-memory segments: names, creation, opening, removal.
//!
//! A segment is a file in `/dev/shm` (what `shm_open` opens). zcbuf creates it unnamed
//! (`O_TMPFILE`), writes its header, reserves its pages and maps it, and only then gives it its
//! name with `linkat`: no process can ever open a half-made segment, and a creator killed at any
//! step leaves nothing behind. Liveness is kept by the kernel as locks on open files
//! ([`crate::liveness`]); the protocol and its interleavings are in `docs/design.md`.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;

use crate::error::{Error, Result};
use crate::header::Parsed;
use crate::liveness::{self, FileKey, Hold, NewHold, key_of, shm_dir};
use crate::mapping::{CreateOptions, Mapped, Origin, page_size, read_header};

/// The prefix of generated names.
pub const NAME_PREFIX: &str = "zcbuf-";
/// The longest name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 200;
/// Where Linux keeps POSIX shared memory.
pub const SHM_DIR: &str = "/dev/shm";

/// Checks a segment name before any system call: non-empty, at most [`MAX_NAME_LEN`] bytes,
/// no `/`, no NUL, not `.` or `..`.
///
/// ```
/// assert!(zcbuf::shm::check_name("frames-0").is_ok());
/// assert!(zcbuf::shm::check_name("a/b").is_err());
/// ```
pub fn check_name(name: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::InvalidArgument(format!(
            "shared-memory name {name:?} {why}: use 1 to {MAX_NAME_LEN} bytes without '/' or \
             control characters"
        )))
    };
    if name.is_empty() {
        return bad("is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad(&format!("is {} bytes long", name.len()));
    }
    if name.contains('/') {
        return bad("contains '/'");
    }
    if name.contains('\0') {
        return bad("contains a NUL byte");
    }
    if name.chars().any(char::is_control) {
        return bad("contains a control character (tab, newline, ...)");
    }
    if name == "." || name == ".." {
        return bad("is a directory name");
    }
    Ok(())
}

/// A fresh name: [`NAME_PREFIX`] and 128 random bits in hex.
pub fn generate_name() -> Result<String> {
    let mut bytes = [0u8; 16];
    let mut filled = 0;
    while filled < bytes.len() {
        let n =
            rustix::rand::getrandom(&mut bytes[filled..], rustix::rand::GetRandomFlags::empty())
                .map_err(|e| Error::from_errno("read random bytes for a segment name", e))?;
        filled += n;
    }
    let mut s = String::with_capacity(NAME_PREFIX.len() + 32);
    s.push_str(NAME_PREFIX);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    Ok(s)
}

const REMEDY: &str = "enlarge /dev/shm (docker run --shm-size=...), free other segments \
                      (python -m zcbuf gc), use a file-backed buffer, or ask for less";

/// How often an open retries a segment that was removed between its `open` and its hold.
const OPEN_RETRIES: usize = 100;

/// "shared-memory segment NAME", formatted only when an error needs it.
struct Seg<'a>(&'a str);

impl std::fmt::Display for Seg<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "shared-memory segment {:?}", self.0)
    }
}

fn not_found(name: &str) -> Error {
    Error::NotFound(format!(
        "no shared-memory segment named {name:?} (never created, removed with unlink, or \
         unmapped by every process that held it)"
    ))
}

/// An error for a failed `open` of a segment; running out of descriptors names the limit.
pub(crate) fn open_error(what: &str, e: Errno) -> Error {
    if e == Errno::MFILE || e == Errno::NFILE {
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .map(|n| n.to_string())
            .unwrap_or_else(|| "unlimited".into());
        let whose = if e == Errno::MFILE {
            format!("this process's limit of open files (RLIMIT_NOFILE = {limit})")
        } else {
            "the system-wide limit of open files".into()
        };
        return Error::OutOfMemory(format!(
            "{what}: {whose} is reached; zcbuf keeps one open file per shared segment a \
             process maps: free buffers (and drop their arrays), or raise the limit (ulimit -n)"
        ));
    }
    Error::from_errno(what, e)
}

/// The flags zcbuf opens an existing segment with, read-write or read-only.
pub(crate) fn open_flags(write: bool) -> OFlags {
    let rw = if write { OFlags::RDWR } else { OFlags::RDONLY };
    // NONBLOCK: a FIFO planted in /dev/shm cannot hang us; NOFOLLOW: nor can a symlink redirect.
    rw | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC
}

/// Opens `name` in /dev/shm read-write, or read-only when `readonly` and writing is refused.
/// Returns the open file and whether it is writable.
fn open_name(dir: BorrowedFd<'_>, name: &str, readonly: bool) -> Result<(OwnedFd, bool)> {
    let what = |e| match e {
        Errno::NOENT => not_found(name),
        e => open_error(&format!("open shared-memory segment {name:?}"), e),
    };
    match rustix::fs::openat(dir, name, open_flags(true), Mode::empty()) {
        Ok(fd) => Ok((fd, true)),
        Err(Errno::ACCESS) | Err(Errno::ROFS) if readonly => {
            rustix::fs::openat(dir, name, open_flags(false), Mode::empty())
                .map(|fd| (fd, false))
                .map_err(what)
        }
        Err(e) => Err(what(e)),
    }
}

fn check_regular(st: &rustix::fs::Stat, name: &str) -> Result<()> {
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(Error::Corrupt(format!(
            "/dev/shm/{name} is not a regular file, so not a zcbuf segment"
        )));
    }
    Ok(())
}

/// Opens a shared segment by name: hold, check, validate, map.
///
/// Protocol: open the name; take the hold (shared `flock`; a remover's exclusive lock makes us
/// wait a moment); `fstat`: if the file has no link left, a remover proved it unheld and
/// removed it before our hold, so start again (the name is gone or names a newer segment);
/// otherwise the name is ours to rely on: no remover can take the exclusive lock while we hold.
pub(crate) fn open(name: &str, readonly: bool) -> Result<Mapped> {
    check_name(name)?;
    liveness::recheck_left_held(false);
    let dir = shm_dir()?;
    let where_ = Seg(name);
    for _ in 0..OPEN_RETRIES {
        let epoch = liveness::fork_epoch();
        let (fd, writable) = open_name(dir, name, readonly)?;
        liveness::hold_bounded(fd.as_fd(), &where_)?;
        let st =
            rustix::fs::fstat(&fd).map_err(|e| Error::from_errno(&format!("stat {where_}"), e))?;
        if st.st_nlink == 0 {
            continue; // removed between our open and our hold
        }
        check_regular(&st, name)?;
        // A sealed segment is mapped read-only whatever was asked (the seal bit is ours to
        // enforce: the kernel gives it no meaning on a regular file).
        let sealed = is_sealed_mode(st.st_mode);
        // A file whose header does not validate is not ours: closing `fd` just drops our lock.
        let parsed = read_header(fd.as_fd(), st.st_size as u64, page_size(), &where_)?;
        // From here we are a holder like any other, also if mapping fails: the hold's drop
        // then runs the close protocol, so a last holder that left while we held does not
        // leave the name behind because of us.
        let hold = Hold::adopt(NewHold {
            fd,
            key: key_of(&st),
            name: name.to_owned(),
            persistent: parsed.persistent,
            epoch,
            writable,
        });
        let mut m = Mapped::map_existing(
            hold.fd(),
            parsed,
            readonly || sealed,
            false,
            Origin::Shared {
                name: name.to_owned(),
            },
            &where_,
        )?;
        m.set_hold(hold);
        if sealed {
            m.mark_sealed();
        }
        return Ok(m);
    }
    Err(not_found(name))
}

/// Gives the unnamed file `fd` the name `name` in `dir` (`linkat`); `EEXIST` when taken.
fn link_name(fd: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &str) -> rustix::io::Result<()> {
    match rustix::fs::linkat(fd, "", dir, name, AtFlags::EMPTY_PATH) {
        // Kernels before 6.10 allow AT_EMPTY_PATH only with CAP_DAC_READ_SEARCH; the /proc
        // link of the descriptor does the same for everyone.
        Err(Errno::NOENT) | Err(Errno::PERM) => {
            let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
            rustix::fs::linkat(
                rustix::fs::CWD,
                path.as_str(),
                dir,
                name,
                AtFlags::SYMLINK_FOLLOW,
            )
        }
        r => r,
    }
}

/// An unnamed, empty file in `dir`, mode 0600.
pub(crate) fn unnamed_file(dir: BorrowedFd<'_>, where_: &str) -> Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        ".",
        OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| match e {
        Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL => Error::Io(format!(
            "{where_} cannot make unnamed files (O_TMPFILE, Linux >= 3.11 on tmpfs, ext4, xfs, \
             btrfs): zcbuf needs them to publish only complete segments"
        )),
        e => open_error(&format!("create a file in {where_}"), e),
    })
}

/// Creates a named shared segment of `len` data bytes.
///
/// Protocol: make an unnamed file and take its hold; write the header and reserve the pages;
/// then `linkat` the name. When the name is taken by a segment no process holds (a crashed or
/// stopped producer) that is not persistent, that segment's name is removed and the link
/// retried; a held, persistent or foreign file under the name is an `AlreadyExists` error that
/// says which. Last, the segment is opened again by its name and mapped through that open file
/// (so `/proc/PID/maps`, `lsof` and `fuser` show the name, not an unnamed file).
pub(crate) fn create(name: Option<&str>, len: usize, opts: &CreateOptions) -> Result<Mapped> {
    liveness::recheck_left_held(false);
    let name = match name {
        Some(n) => {
            check_name(n)?;
            n.to_owned()
        }
        None => generate_name()?,
    };
    opts.meta.check_len(len as u64)?;
    let dir = shm_dir()?;
    let epoch = liveness::fork_epoch();
    let tmp = unnamed_file(dir, SHM_DIR)?;
    // Unnamed: nobody else can have it open, so this cannot conflict.
    liveness::try_hold(tmp.as_fd())?;
    let file = File::from(tmp);
    let where_ = format!("/dev/shm (segment {name:?})");
    let parsed = Mapped::layout(&file, len, opts, opts.persist, &where_, REMEDY)?;
    let tmp = OwnedFd::from(file);
    let st =
        rustix::fs::fstat(&tmp).map_err(|e| Error::from_errno(&format!("stat {where_}"), e))?;
    let key = key_of(&st);
    let mut attempts = 0;
    loop {
        match link_name(tmp.as_fd(), dir, &name) {
            Ok(()) => break,
            Err(Errno::EXIST) if attempts < OPEN_RETRIES => {
                attempts += 1;
                replace_unheld(dir, &name)?;
            }
            Err(Errno::EXIST) => {
                return Err(Error::AlreadyExists(format!(
                    "shared-memory segment {name:?} keeps being re-created by other processes"
                )));
            }
            Err(e) => {
                return Err(Error::from_errno(
                    &format!("name the new segment {name:?}"),
                    e,
                ));
            }
        }
    }
    // From here the segment is visible and complete; our hold on `tmp` keeps any remover off
    // it. Map it through an open file of its name when the name still names it (only an
    // explicit unlink can have changed that meanwhile), else through `tmp`.
    let named = match rustix::fs::openat(dir, name.as_str(), open_flags(true), Mode::empty()) {
        Ok(named)
            if rustix::fs::fstat(&named).is_ok_and(|s| key_of(&s) == key)
                && liveness::try_hold(named.as_fd()).unwrap_or(false) =>
        {
            Some(named)
        }
        _ => None, // out of descriptors, or unlinked meanwhile: map through `tmp`
    };
    let map_fd = named.as_ref().map_or(tmp.as_fd(), |n| n.as_fd());
    let mapped = Mapped::map_new(
        map_fd,
        parsed,
        false,
        Origin::Shared { name: name.clone() },
        &where_,
        opts,
    );
    let mut m = match mapped {
        Ok(m) => m,
        Err(e) => {
            // Nothing of ours may be left behind: our name goes, unless another process
            // already opened the segment (then it is theirs to use, and to leave).
            drop(named);
            if liveness::try_exclusive(tmp.as_fd()).unwrap_or(false) {
                let _ = liveness::remove_name_if(tmp.as_fd(), dir, &name, key);
            }
            return Err(e);
        }
    };
    // `named` holds now (when it exists): closing `tmp` drops its redundant lock.
    let fd = match named {
        Some(n) => {
            drop(tmp);
            n
        }
        None => tmp,
    };
    m.set_hold(Hold::adopt(NewHold {
        fd,
        key,
        name,
        persistent: opts.persist,
        epoch,
        writable: true,
    }));
    Ok(m)
}

/// The name `name` is taken: remove it if it names a zcbuf segment that no process holds and
/// that is not persistent (then the caller retries its link); otherwise say why not.
fn replace_unheld(dir: BorrowedFd<'_>, name: &str) -> Result<()> {
    let exists = |why: String| {
        Err(Error::AlreadyExists(format!(
            "shared-memory segment {name:?} already exists and {why}: open it instead, pick \
             another name, or pass no name to get a generated one"
        )))
    };
    let fd = match rustix::fs::openat(dir, name, open_flags(true), Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(()), // removed meanwhile: retry the link
        Err(e) => return exists(format!("cannot be inspected ({e})")),
    };
    let st = rustix::fs::fstat(&fd).map_err(|e| Error::from_errno(&format!("stat {name:?}"), e))?;
    let parsed = match inspect_header(fd.as_fd(), &st, name) {
        Ok(p) => p,
        Err(e) => {
            return exists(format!(
                "is not a zcbuf segment this zcbuf can judge ({})",
                e.message()
            ));
        }
    };
    if parsed.persistent {
        return exists(
            "is persistent (created with persist=True; remove it with zcbuf.unlink first)".into(),
        );
    }
    // A remover (gc, a closer, another create) may hold the exclusive lock for a moment: wait
    // for it (it removes the name, and our link then succeeds); holders make us give up.
    let key = key_of(&st);
    let start = std::time::Instant::now();
    let mut pause = std::time::Duration::from_micros(20);
    while !liveness::try_exclusive(fd.as_fd())? {
        let removing = liveness::remover_at_work(key);
        let still_named = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
            .is_ok_and(|s| key_of(&s) == key);
        if !still_named {
            return Ok(()); // removed meanwhile: retry the link
        }
        // With /proc/locks, only a remover is worth waiting for; without, wait a little.
        let bound = match removing {
            Some(true) => liveness::LOCK_WAIT,
            Some(false) => std::time::Duration::ZERO,
            None => std::time::Duration::from_millis(50),
        };
        if start.elapsed() >= bound {
            return exists(held_by(key));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(std::time::Duration::from_millis(10));
    }
    liveness::remove_name_if(fd.as_fd(), dir, name, key)?;
    Ok(())
}

/// The header of an open segment file, validated.
pub(crate) fn inspect_header(
    fd: BorrowedFd<'_>,
    st: &rustix::fs::Stat,
    name: &str,
) -> Result<Parsed> {
    check_regular(st, name)?;
    read_header(fd, st.st_size as u64, page_size(), Seg(name))
}

/// "is held by …" for error messages: the holders' pids as `/proc/locks` gives them.
pub(crate) fn held_by(key: FileKey) -> String {
    let pids: Vec<String> = liveness::holder_pids(key)
        .into_iter()
        .filter(|p| *p > 0)
        .map(|p| p.to_string())
        .collect();
    let exclusive: Vec<String> = liveness::exclusive_pids(key)
        .into_iter()
        .filter(|p| *p > 0)
        .map(|p| p.to_string())
        .collect();
    if pids.is_empty() && !exclusive.is_empty() {
        format!(
            "is locked exclusively by process(es) {} for too long (zcbuf's removers take \
             microseconds: a stuck or hostile process; see docs/security.md)",
            exclusive.join(", ")
        )
    } else if pids.is_empty() {
        "is held by a live process (one this pid namespace cannot see, or /proc/locks is \
         unreadable)"
            .into()
    } else {
        format!("is held by live process(es) {}", pids.join(", "))
    }
}

/// Removes a segment's name now, whoever holds it (their mappings stay valid), persistent or
/// not. Only the segment the name names when this call takes the name lock is removed.
pub fn unlink(name: &str) -> Result<()> {
    check_name(name)?;
    let dir = shm_dir()?;
    let fd = match rustix::fs::openat(dir, name, open_flags(true), Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Err(not_found(name)),
        // Not a file zcbuf can open for writing (another user's, a symlink, a directory...):
        // remove the name as shm_unlink would, and let the kernel decide.
        Err(_) => {
            return rustix::fs::unlinkat(dir, name, AtFlags::empty()).map_err(|e| match e {
                Errno::NOENT => not_found(name),
                e => Error::from_errno(&format!("remove shared-memory segment {name:?}"), e),
            });
        }
    };
    let st = rustix::fs::fstat(&fd).map_err(|e| Error::from_errno(&format!("stat {name:?}"), e))?;
    if liveness::remove_name_if(fd.as_fd(), dir, name, key_of(&st))? {
        Ok(())
    } else {
        Err(not_found(name))
    }
}

// ---------------------------------------------------------------------------------------------
// Sealing, and waiting for a sealed segment
//
// The seal is kept by the kernel, in the segment file's mode: the sticky bit (`S_ISVTX`), which Linux gives no meaning on a regular file, so it changes nobody's
// access. Who writes it: a writer of the segment, once, with `fchmod` (one atomic inode
// update); nobody clears it. Who reads it: every open (the `fstat` it already does) and every
// waiter (`statat`). Between creation and the seal a reader sees the bit clear; after it, set;
// there is no third state. Why not mode 0400: see "Sealing and waiting" in docs/design.md (a
// removal needs a writable open file, which 0400 denies to every non-root process).

/// The file-mode bit that marks a sealed segment (`S_ISVTX`).
pub(crate) const SEAL_BIT: u32 = 0o1000;

/// True when a segment file's mode carries the seal.
pub(crate) fn is_sealed_mode(mode: u32) -> bool {
    mode & SEAL_BIT != 0
}

/// Seals the segment open as `fd` (any open file of it): sets [`SEAL_BIT`] in its mode with
/// `fchmod`. Idempotent: an already sealed segment is left as it is, whoever sealed it.
/// `readonly` (the caller maps it read-only) refuses to seal a segment not sealed yet: only a
/// writer knows when its data is complete.
pub(crate) fn seal(fd: BorrowedFd<'_>, name: &str, readonly: bool) -> Result<()> {
    let st =
        rustix::fs::fstat(fd).map_err(|e| Error::from_errno(&format!("stat {}", Seg(name)), e))?;
    if is_sealed_mode(st.st_mode) {
        return Ok(());
    }
    if readonly {
        return Err(Error::ReadOnly(format!(
            "{} was opened read-only here: seal it through a read-write handle (its writer's, \
             once the data is complete)",
            Seg(name)
        )));
    }
    let mode = Mode::from_raw_mode((st.st_mode & 0o7777) | SEAL_BIT);
    rustix::fs::fchmod(fd, mode).map_err(|e| match e {
        Errno::PERM => Error::Permission(format!(
            "seal {}: only its owner (uid {}) can seal it",
            Seg(name),
            st.st_uid
        )),
        e => Error::from_errno(&format!("seal {} (fchmod)", Seg(name)), e),
    })
}

/// How often a waiting open looks again without an inotify event (events can be lost when the
/// queue overflows; without inotify it is the only way to notice).
pub(crate) const WAIT_RECHECK: Duration = Duration::from_millis(100);

/// What a waiter sees under a name.
enum Seen {
    Missing,
    Sealed,
    Unsealed(FileKey),
}

fn look(dir: BorrowedFd<'_>, name: &str) -> Result<Seen> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if is_sealed_mode(st.st_mode) => Ok(Seen::Sealed),
        Ok(st) => Ok(Seen::Unsealed(key_of(&st))),
        Err(Errno::NOENT) => Ok(Seen::Missing),
        Err(e) => Err(Error::from_errno(&format!("stat {}", Seg(name)), e)),
    }
}

/// Opens the shared segment `name` once it exists and is sealed, waiting up to `timeout`
/// (`Duration::ZERO`: look once; `Duration::MAX`: no limit). The mapping is read-only, as every
/// open of a sealed segment is.
///
/// Waiting costs no CPU: an inotify watch on /dev/shm (created, moved in, attributes changed,
/// deleted; the `linkat` that names a new segment is a create) wakes the waiter when something
/// happens to the name, and it looks again at least every [`WAIT_RECHECK`] in case an event
/// was lost. A name that exists unsealed while no process holds it (its creator died before
/// sealing) is a prompt [`Error::NotFound`], not a wait: nobody is left to seal it. Gives
/// [`Error::Timeout`] when the time runs out.
pub(crate) fn open_wait(name: &str, readonly: bool, timeout: Duration) -> Result<Mapped> {
    check_name(name)?;
    let dir = shm_dir()?;
    let deadline = Instant::now().checked_add(timeout);
    // Watch first, then look: an event after the look cannot be missed.
    let mut watch = Watch::new(name);
    loop {
        let seen = look(dir, name)?;
        match seen {
            Seen::Sealed => match open(name, readonly) {
                Ok(m) if m.sealed_here() => return Ok(m),
                // Replaced by a new, unsealed segment since we looked: wait for its seal.
                Ok(_) => {}
                Err(Error::NotFound(_)) => {} // removed since we looked
                Err(e) => return Err(e),
            },
            Seen::Unsealed(key) => {
                if let Some(e) = orphaned(dir, name, key)? {
                    return Err(e);
                }
            }
            Seen::Missing => {}
        }
        let now = Instant::now();
        let left = match deadline {
            Some(d) if now >= d => return Err(not_ready(name, &seen)),
            Some(d) => d - now,
            None => WAIT_RECHECK,
        };
        let nap = left.min(WAIT_RECHECK);
        match &mut watch {
            Some(w) => w.wait(nap),
            None => std::thread::sleep(nap),
        }
    }
}

fn not_ready(name: &str, seen: &Seen) -> Error {
    let state = match seen {
        Seen::Missing => "no segment of that name exists yet",
        Seen::Sealed => "it was sealed, then removed or replaced while being opened",
        Seen::Unsealed(_) => "it exists but is not sealed yet (a live process holds it)",
    };
    Error::Timeout(format!(
        "{} is not ready: {state}; a waiting open returns once the segment exists and is \
         sealed (Buffer.seal(), zcbuf_seal)",
        Seg(name)
    ))
}

/// A segment that exists unsealed is worth waiting for only while some process holds it (its
/// creator, or another writer, who may still seal it). Returns the error to give when no
/// process does, `None` to keep waiting.
fn orphaned(dir: BorrowedFd<'_>, name: &str, key: FileKey) -> Result<Option<Error>> {
    // /proc/locks names holders without taking any lock: the usual answer, and the only one
    // while the creator lives in this pid namespace.
    if liveness::holder_table().is_some_and(|t| t.contains_key(&key)) {
        return Ok(None);
    }
    // Nobody listed: /proc/locks unreadable, holders in a pid namespace it hides, or none. Ask
    // the kernel: an exclusive lock on a fresh open file is granted only when no open file holds
    // the segment. Whoever gets it is a remover (docs/design.md), and acts as one below.
    let opened = match rustix::fs::openat(dir, name, open_flags(true), Mode::empty()) {
        Err(Errno::ACCESS) => {
            rustix::fs::openat(dir, name, open_flags(false), Mode::empty()).map(|fd| (fd, false))
        }
        r => r.map(|fd| (fd, true)),
    };
    let (fd, writable) = match opened {
        Ok(o) => o,
        Err(Errno::NOENT) => return Ok(None), // gone since we looked: look again
        Err(e) => return Err(open_error(&format!("open {}", Seg(name)), e)),
    };
    if !liveness::try_exclusive(fd.as_fd())? {
        return Ok(None); // held
    }
    let st =
        rustix::fs::fstat(&fd).map_err(|e| Error::from_errno(&format!("stat {}", Seg(name)), e))?;
    if st.st_nlink == 0 || key_of(&st) != key || is_sealed_mode(st.st_mode) {
        // Removed or replaced since we looked, or sealed by a last holder that then let go:
        // look again (and open it). Our lock goes with `fd`.
        return Ok(None);
    }
    let parsed = inspect_header(fd.as_fd(), &st, name)?;
    // Unheld, unsealed: what gc removes (unless persistent). A remover holding the exclusive
    // lock removes the name, as every other remover does.
    let removed = !parsed.persistent
        && writable
        && liveness::remove_name_if(fd.as_fd(), dir, name, key).unwrap_or(false);
    Ok(Some(Error::NotFound(format!(
        "{} exists but was never sealed, and no process holds it any more: its creator exited \
         or was killed before sealing it{}; restart the producer (its create replaces an \
         unheld segment) and wait again",
        Seg(name),
        if removed {
            " (the unsealed segment was removed, as `python -m zcbuf gc` would)"
        } else if parsed.persistent {
            " (it is persistent: remove it with zcbuf.unlink)"
        } else {
            ""
        }
    ))))
}

/// An inotify watch on /dev/shm for one name.
struct Watch {
    fd: OwnedFd,
    name: Vec<u8>,
}

impl Watch {
    /// `None` when inotify is unavailable (the per-user limit of instances or watches is
    /// reached, or a seccomp filter refuses it): the waiter then looks every [`WAIT_RECHECK`].
    fn new(name: &str) -> Option<Watch> {
        use rustix::fs::inotify;
        let fd =
            inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK).ok()?;
        let events = inotify::WatchFlags::CREATE
            | inotify::WatchFlags::MOVED_TO
            | inotify::WatchFlags::ATTRIB
            | inotify::WatchFlags::DELETE;
        inotify::add_watch(&fd, SHM_DIR, events).ok()?;
        Some(Watch {
            fd,
            name: name.as_bytes().to_vec(),
        })
    }

    /// Sleeps until an event names our name (or the event queue overflowed), or `nap` passes.
    /// A signal (EINTR) only shortens the sleep: the caller looks again either way.
    fn wait(&mut self, nap: Duration) {
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.fd),
            events: libc::POLLIN,
            revents: 0,
        };
        let end = Instant::now() + nap;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            // Round up, so a sub-millisecond rest does not spin.
            let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
            // SAFETY: `pfd` is one valid, initialised `pollfd` whose descriptor `self.fd` keeps
            // open for the call; poll writes only its `revents`.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r <= 0 {
                return; // timed out, or interrupted (EINTR): let the caller look again
            }
            if self.drain() {
                return;
            }
        }
    }

    /// Reads every pending event; true when one concerns our name (or some were lost).
    fn drain(&mut self) -> bool {
        use rustix::fs::inotify;
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
        let mut reader = inotify::Reader::new(&self.fd, &mut buf);
        let mut hit = false;
        while let Ok(ev) = reader.next() {
            hit |= ev.events().contains(inotify::ReadFlags::QUEUE_OVERFLOW)
                || ev.file_name().is_some_and(|n| n.to_bytes() == self.name);
        }
        hit
    }
}
