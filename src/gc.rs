//! Listing zcbuf segments and reaping those whose holders have all died.

use std::fs::File;
use std::path::PathBuf;

use memmap2::MmapOptions;
use rustix::fs::Mode;
use rustix::shm::OFlags;

use crate::error::{Error, Result};
use crate::header::Meta;
use crate::header::{self, HEADER_LEN};
use crate::holders::{Liveness, Table};
use crate::mapping::{page_size, read_header};
use crate::shm::{NAME_PREFIX, SHM_DIR};

/// What [`list`] reports about one segment in `/dev/shm`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    /// The segment name (without the leading `/`).
    pub name: String,
    /// Data length in bytes (0 when the header is unreadable).
    pub len: u64,
    /// Stored dtype and shape.
    pub meta: Meta,
    /// Holders whose processes are running.
    pub alive: usize,
    /// Holders whose processes have died (reaped by the next [`gc`]).
    pub dead: usize,
    /// Creation time, ns since the Unix epoch.
    pub created_ns: u64,
    /// The pid of the creator.
    pub creator_pid: u32,
    /// Why the header could not be read, for a `zcbuf-` segment that is not valid.
    pub problem: Option<String>,
}

fn open_rw(name: &str) -> Result<File> {
    let fd = rustix::shm::open(format!("/{name}").as_str(), OFlags::RDWR, Mode::empty())
        .map_err(|e| Error::from_errno(&format!("open segment {name:?}"), e))?;
    Ok(File::from(fd))
}

/// Inspects one segment; with `reap`, clears dead holders and removes the name when no live
/// holder remains. Returns the info and whether the name was removed.
fn inspect(name: &str, reap: bool) -> Result<(SegmentInfo, bool)> {
    let file = open_rw(name)?;
    let where_ = format!("segment {name:?}");
    let (parsed, _) = read_header(&file, page_size(), &where_, false)?;
    let hdr = MmapOptions::new()
        .len(parsed.data_offset as usize)
        .map_raw(&file)
        .map_err(|e| Error::from_io(&format!("map the header of {where_}"), &e))?;
    // SAFETY: the mapping is data_offset >= HEADER_LEN bytes (validated by read_header),
    // writable and page-aligned, and outlives `table` (both end with this function).
    let table = unsafe { Table::new(hdr.as_mut_ptr()) };
    let mut removed = false;
    if reap {
        table.reap();
        if table.try_close() {
            removed = crate::shm::unlink(name).is_ok();
        }
    }
    let (alive, dead) = table.census();
    Ok((
        SegmentInfo {
            name: name.to_owned(),
            len: parsed.data_len,
            meta: parsed.meta,
            alive,
            dead,
            created_ns: parsed.created_ns,
            creator_pid: parsed.creator_pid,
            problem: None,
        },
        removed,
    ))
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

fn is_ours(name: &str) -> bool {
    let p: PathBuf = [SHM_DIR, name].iter().collect();
    let mut magic = [0u8; 8];
    std::fs::File::open(p)
        .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut magic, 0))
        .map(|_| u64::from_le_bytes(magic) == crate::header::MAGIC)
        .unwrap_or(false)
}

/// Lists the zcbuf segments in `/dev/shm` visible to this user: those with a zcbuf header,
/// and `zcbuf-` segments whose header is unreadable (with the reason).
pub fn list() -> Result<Vec<SegmentInfo>> {
    let mut out = Vec::new();
    for name in names()? {
        if !(is_ours(&name) || name.starts_with(NAME_PREFIX)) {
            continue;
        }
        match inspect(&name, false) {
            Ok((info, _)) => out.push(info),
            Err(e) if name.starts_with(NAME_PREFIX) => out.push(SegmentInfo {
                name,
                len: 0,
                meta: Meta::untyped(),
                alive: 0,
                dead: 0,
                created_ns: 0,
                creator_pid: 0,
                problem: Some(e.to_string()),
            }),
            Err(_) => {}
        }
    }
    Ok(out)
}

/// Whether a segment without a published header was left by a creator that died: its
/// provisional header names a creator (holder slot 0) that is dead, or, for a `zcbuf-` name with
/// no header written at all, it is older than 2 seconds.
fn abandoned(name: &str) -> bool {
    let p: PathBuf = [SHM_DIR, name].iter().collect();
    let Ok(f) = std::fs::File::open(&p) else {
        return false;
    };
    let mut buf = vec![0u64; HEADER_LEN / 8];
    // SAFETY: a u64 buffer viewed as bytes: same memory, any byte pattern is a valid u8.
    let bytes =
        unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), HEADER_LEN) };
    if std::os::unix::fs::FileExt::read_exact_at(&f, bytes, 0).is_ok() {
        if !header::looks_provisional(bytes) {
            return false; // not ours
        }
        // SAFETY: `buf` is a HEADER_LEN-byte, 8-aligned private copy that outlives `t`.
        let t = unsafe { Table::new(buf.as_mut_ptr().cast()) };
        return t.liveness(0).0 == Liveness::Dead;
    }
    name.starts_with(NAME_PREFIX)
        && std::fs::metadata(&p)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age.as_secs() >= 2)
}

/// Reaps dead holders of every zcbuf segment and removes the segments no live process holds;
/// also removes segments whose creator died before publishing the header (see `abandoned`).
/// Returns the names removed. Nothing a live process holds is removed.
pub fn gc() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for name in names()? {
        if is_ours(&name) {
            if let Ok((_, true)) = inspect(&name, true) {
                removed.push(name);
            }
        } else if abandoned(&name) && crate::shm::unlink(&name).is_ok() {
            removed.push(name);
        }
    }
    Ok(removed)
}
