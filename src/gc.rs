//! Listing zcbuf segments, and removing those no process holds.
//!
//! Both only read headers (`pread`), never map or write them: a segment another process
//! truncated or scribbled on cannot make them fault.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{Mode, OFlags};

use crate::error::{Error, Result};
use crate::header::{MAGIC, Meta, Parsed};
use crate::liveness::{self, key_of, shm_dir};
use crate::shm::{NAME_PREFIX, SHM_DIR, inspect_header};

/// What [`list`] reports about one segment in `/dev/shm`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    /// The segment name (without the leading `/`).
    pub name: String,
    /// Data length in bytes (0 when the header is unusable).
    pub len: u64,
    /// Stored dtype and shape.
    pub meta: Meta,
    /// True when some process maps it now (the kernel holds a lock for it).
    pub held: bool,
    /// The holders' pids, where `/proc/locks` names them (in this pid namespace; a holder in
    /// a namespace this one cannot see, or a fork child sharing its parent's open file, is not
    /// listed on its own).
    pub holders: Vec<u32>,
    /// Created to persist: kept after its last holder, until unlinked.
    pub persistent: bool,
    /// Creation time, ns since the Unix epoch.
    pub created_ns: u64,
    /// The pid of the creator, as it saw itself.
    pub creator_pid: u32,
    /// Why the header is unusable, for a file that looks like zcbuf's but cannot be used.
    pub problem: Option<String>,
    /// Sealed ([`crate::Registry::seal`]): immutable, every open maps it read-only. Read from
    /// the file mode, which is where the seal lives.
    pub sealed: bool,
    /// For a channel: its message type, policy, positions and who is alive.
    pub channel: Option<crate::channel::ChannelInfo>,
}

/// What [`gc`] removed, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    /// The segment name.
    pub name: String,
    /// Its data length.
    pub len: u64,
    /// Why it was removed.
    pub reason: String,
}

fn names() -> Result<Vec<String>> {
    let dir =
        std::fs::read_dir(SHM_DIR).map_err(|e| Error::from_io(&format!("list {SHM_DIR}"), &e))?;
    let mut v: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    v.sort();
    Ok(v)
}

/// An open file of `name` in /dev/shm (read-write when allowed), and its stat.
fn open(dir: BorrowedFd<'_>, name: &str) -> Option<(OwnedFd, rustix::fs::Stat)> {
    let flags = OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(dir, name, flags | OFlags::RDWR, Mode::empty())
        .or_else(|_| rustix::fs::openat(dir, name, flags | OFlags::RDONLY, Mode::empty()))
        .ok()?;
    let st = rustix::fs::fstat(&fd).ok()?;
    Some((fd, st))
}

fn has_magic(fd: &OwnedFd) -> bool {
    let mut m = [0u8; 8];
    matches!(rustix::io::pread(fd, &mut m, 0), Ok(8)) && u64::from_le_bytes(m) == MAGIC
}

/// Without /proc/locks: true when some open file other than `fd` holds the segment. This takes
/// the exclusive lock for a moment, which could make a last holder leaving at that very moment
/// leave the name behind (for `gc` to remove); with /proc/locks readable it is never used.
fn probe_held(fd: &OwnedFd) -> bool {
    match liveness::try_exclusive(fd.as_fd()) {
        Ok(got) => !got,
        Err(_) => true, // cannot tell (read-only descriptor): say held, never remove
    }
}

fn info(name: &str, p: Parsed, held: bool, pids: &[i32], sealed: bool) -> SegmentInfo {
    SegmentInfo {
        name: name.to_owned(),
        len: p.data_len,
        meta: p.meta,
        held,
        holders: pids.iter().filter(|p| **p > 0).map(|p| *p as u32).collect(),
        persistent: p.persistent,
        created_ns: p.created_ns,
        creator_pid: p.creator_pid,
        problem: None,
        sealed,
        channel: None,
    }
}

/// Lists the zcbuf segments in `/dev/shm` visible to this user: those with a zcbuf header
/// (valid or not, e.g. of another version), and `zcbuf-` files whose header is unusable.
pub fn list() -> Result<Vec<SegmentInfo>> {
    let dir = shm_dir()?;
    liveness::recheck_left_held(true);
    let locks = liveness::holder_table();
    let mut out = Vec::new();
    for name in names()? {
        let Some((fd, st)) = open(dir, &name) else {
            continue;
        };
        let ours = has_magic(&fd);
        if !ours && !name.starts_with(NAME_PREFIX) {
            continue;
        }
        let key = key_of(&st);
        let pids = locks
            .as_ref()
            .and_then(|l| l.get(&key).cloned())
            .unwrap_or_default();
        let held = match &locks {
            Some(_) => !pids.is_empty(),
            None => probe_held(&fd),
        };
        let sealed = crate::shm::is_sealed_mode(st.st_mode);
        match inspect_header(fd.as_fd(), &st, &name) {
            Ok(p) => {
                let channel = crate::channel::peek(fd.as_fd(), p.data_offset, p.data_len);
                let mut i = info(&name, p, held, &pids, sealed);
                i.channel = channel;
                out.push(i);
            }
            Err(e) => out.push(SegmentInfo {
                name,
                len: 0,
                meta: Meta::untyped(),
                held: !pids.is_empty(),
                holders: pids.iter().filter(|p| **p > 0).map(|p| *p as u32).collect(),
                persistent: false,
                created_ns: 0,
                creator_pid: 0,
                problem: Some(e.to_string()),
                sealed,
                channel: None,
            }),
        }
    }
    Ok(out)
}

/// Removes every zcbuf segment in `/dev/shm` that no process holds and that was not created
/// to persist. Only files with a valid header of this version are judged; anything else is
/// left alone, whoever made it. Returns what was removed and why.
pub fn gc() -> Result<Vec<Removed>> {
    let dir = shm_dir()?;
    let mut removed = Vec::new();
    for name in liveness::recheck_left_held(true) {
        removed.push(Removed {
            name,
            len: 0,
            reason: "this process left it while others held it, and they have all gone".into(),
        });
    }
    for name in names()? {
        let Some((fd, st)) = open(dir, &name) else {
            continue;
        };
        let Ok(p) = inspect_header(fd.as_fd(), &st, &name) else {
            continue; // not provably a zcbuf segment of this version: never ours to remove
        };
        if p.persistent {
            continue;
        }
        // Exclusive lock proves that no process maps it; it also keeps any from starting to
        // until our descriptor is closed (an opener that got in between finds no link and
        // retries).
        if !matches!(liveness::try_exclusive(fd.as_fd()), Ok(true)) {
            continue;
        }
        if let Ok(true) = liveness::remove_name_if(fd.as_fd(), dir, &name, key_of(&st)) {
            removed.push(Removed {
                name,
                len: p.data_len,
                reason: "no process maps it (its holders exited or were killed) and it was not \
                         created to persist"
                    .into(),
            });
        }
    }
    Ok(removed)
}
