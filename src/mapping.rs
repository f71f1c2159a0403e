//! A mapped buffer of any backing: the memory a registry entry owns.
//!
//! Shared and file buffers are two mappings of one object: the header pages (always read-write,
//! for the holder table) and the data pages (read-only when opened read-only). Private buffers are
//! one anonymous mapping. Memory is never moved after creation; it is unmapped only when the
//! [`Mapped`] is dropped, which the registry does after the last lease is released.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

use memmap2::{MmapOptions, MmapRaw};

use crate::error::{Error, Result};
use crate::header::{self, HEADER_LEN, Meta, Parsed};
use crate::holders::{self, ClaimError, SegmentKey, Table};

/// Which kind of memory backs a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Kind {
    /// An anonymous private mapping, visible to this process only.
    Private = 0,
    /// A named POSIX shared-memory segment.
    Shared = 1,
    /// A memory-mapped file.
    File = 2,
}

/// Options for creating a buffer.
///
/// ```
/// let opts = zcbuf::CreateOptions::new().populate(true);
/// assert!(opts.reserve);
/// ```
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// The dtype and shape to store with the buffer.
    pub meta: Meta,
    /// Reserve the pages at creation (`fallocate`) so that a full /dev/shm or disk is an error
    /// now rather than a SIGBUS on first write. Default true; turning it off gives up that
    /// guarantee.
    pub reserve: bool,
    /// Pre-fault the page tables at creation (`MAP_POPULATE`), moving the first-touch page-fault
    /// cost out of the first write. Default false.
    pub populate: bool,
    /// Ask for transparent huge pages (`madvise(MADV_HUGEPAGE)`): fewer, larger page faults.
    /// Effective for private buffers when THP is `madvise` or `always`; for shared memory only
    /// when the kernel's `shmem_enabled` allows it (often `never`). Default false.
    pub huge_pages: bool,
}

impl CreateOptions {
    /// Defaults: untyped, pages reserved, not pre-faulted.
    pub fn new() -> Self {
        CreateOptions {
            meta: Meta::untyped(),
            reserve: true,
            populate: false,
            huge_pages: false,
        }
    }
    /// Sets the dtype and shape.
    pub fn meta(mut self, meta: Meta) -> Self {
        self.meta = meta;
        self
    }
    /// Sets [`CreateOptions::reserve`].
    pub fn reserve(mut self, yes: bool) -> Self {
        self.reserve = yes;
        self
    }
    /// Sets [`CreateOptions::populate`].
    pub fn populate(mut self, yes: bool) -> Self {
        self.populate = yes;
        self
    }
    /// Sets [`CreateOptions::huge_pages`].
    pub fn huge_pages(mut self, yes: bool) -> Self {
        self.huge_pages = yes;
        self
    }
}

pub(crate) enum Origin {
    Private,
    Shared { name: String },
    File { path: PathBuf },
}

/// The memory of one buffer.
pub(crate) struct Mapped {
    /// The header pages; for a read-write shared or file buffer, the whole object (header and
    /// data in one mapping, one mmap and one munmap).
    header: Option<MmapRaw>,
    /// The data pages when mapped on their own (read-only opens), else `None`.
    data: Option<MmapRaw>,
    /// Offset of the data within `header` when they share one mapping (0 otherwise).
    data_off: usize,
    len: usize,
    readonly: bool,
    origin: Origin,
    /// True while this mapping counts as one of this process's handles on a shared segment.
    joined: AtomicBool,
    /// The segment's identity, for the process-wide holder count.
    key: SegmentKey,
    meta: Meta,
}

fn key_of(file: &File) -> SegmentKey {
    file.metadata()
        .map(|m| (m.dev(), m.ino()))
        .unwrap_or((0, 0))
}

/// A dangling-but-aligned address for zero-length buffers (never dereferenced).
fn empty_ptr() -> NonNull<u8> {
    NonNull::<u64>::dangling().cast()
}

pub(crate) fn page_size() -> usize {
    rustix::param::page_size()
}

fn too_big(len: usize) -> Error {
    Error::OutOfMemory(format!(
        "{len} bytes cannot be mapped in this process's address space: ask for a smaller buffer"
    ))
}

/// Classifies a failed mmap: ENOMEM, or EINVAL for a length the address space cannot hold
/// (valgrind and some kernels say EINVAL), is out-of-memory; the rest as usual.
fn map_failed(len: usize, what: &str, e: &std::io::Error) -> Error {
    match e.raw_os_error().map(rustix::io::Errno::from_raw_os_error) {
        Some(rustix::io::Errno::NOMEM) | Some(rustix::io::Errno::INVAL) => too_big(len),
        _ => Error::from_io(what, e),
    }
}

/// Free bytes on the file system holding `fd`, for error messages.
fn free_bytes(file: &File) -> Option<u64> {
    let s = rustix::fs::fstatvfs(file).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

pub(crate) fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Reserves `total` bytes of backing store for `file`, so later writes cannot fault.
fn reserve(file: &File, total: u64, where_: &str, remedy: &str) -> Result<()> {
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, total) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::NOSPC) | Err(rustix::io::Errno::FBIG) => {
            let free = free_bytes(file)
                .map(human)
                .unwrap_or_else(|| "unknown".into());
            Err(Error::OutOfMemory(format!(
                "{where_} has {free} free; {} requested: {remedy}",
                human(total)
            )))
        }
        Err(rustix::io::Errno::OPNOTSUPP) => {
            // No fallocate here (some network file systems): size the file and write one zero
            // byte per block, which allocates it, as posix_fallocate does.
            file.set_len(total)
                .map_err(|e| Error::from_io(&format!("resize {where_}"), &e))?;
            // The header (already written) is skipped: a zero lands at HEADER_LEN instead,
            // which allocates the rest of that block.
            let step = 4096u64;
            let mut off = 0;
            while off < total {
                let at = off.max(HEADER_LEN as u64);
                if at < total {
                    file.write_all_at(&[0], at)
                        .map_err(|e| Error::from_io(&format!("reserve {where_}"), &e))?;
                }
                off += step;
            }
            Ok(())
        }
        Err(e) => Err(Error::from_errno(&format!("reserve space in {where_}"), e)),
    }
}

impl Mapped {
    /// An anonymous private buffer.
    pub(crate) fn private(len: usize, opts: &CreateOptions) -> Result<Mapped> {
        opts.meta.check_len(len as u64)?;
        let data = if len == 0 {
            None
        } else {
            if len > isize::MAX as usize {
                return Err(too_big(len));
            }
            let mut mo = MmapOptions::new();
            mo.len(len);
            // With huge pages, advise before faulting (else the pages are already small):
            // map, advise, then pre-fault with MADV_POPULATE_WRITE below.
            if opts.populate && !opts.huge_pages {
                mo.populate();
            }
            let m = mo
                .map_anon()
                .map_err(|e| map_failed(len, &format!("map {len} anonymous bytes"), &e))?;
            if opts.huge_pages {
                // Advice only: a kernel without THP ignores or refuses it, and that is fine.
                let _ = m.advise(memmap2::Advice::HugePage);
                if opts.populate {
                    let _ = m.advise(memmap2::Advice::PopulateWrite);
                }
            }
            Some(MmapRaw::from(m))
        };
        Ok(Mapped {
            header: None,
            data,
            data_off: 0,
            len,
            readonly: false,
            origin: Origin::Private,
            joined: AtomicBool::new(false),
            key: (0, 0),
            meta: opts.meta.clone(),
        })
    }

    /// Lays out a new segment or file in `file` (freshly created, empty, exclusively ours):
    /// reserves, maps, writes the header and publishes it.
    pub(crate) fn init_new(
        file: &File,
        len: usize,
        opts: &CreateOptions,
        origin: Origin,
        where_: &str,
        remedy: &str,
    ) -> Result<Mapped> {
        opts.meta.check_len(len as u64)?;
        let page = page_size();
        let off = header::data_offset_for(page);
        let total = off
            .checked_add(len)
            .filter(|t| *t <= isize::MAX as usize)
            .ok_or_else(|| too_big(len))?;
        let shared = matches!(origin, Origin::Shared { .. });
        let mut enc = vec![0u8; HEADER_LEN];
        header::encode(
            &mut enc,
            off as u64,
            len as u64,
            &opts.meta,
            std::process::id(),
        );
        if shared {
            // The creator is holder slot 0 from the first byte written, so a creator killed
            // before publishing is recognised as dead and its half-made segment reaped by gc.
            holders::encode_creator(&mut enc);
        }
        // Header first (without the magic), then reserve: a crash at any point leaves a
        // segment that gc can attribute.
        file.write_all_at(&enc, 0)
            .map_err(|e| Error::from_io(&format!("write the header of {where_}"), &e))?;
        if opts.reserve {
            reserve(file, total as u64, where_, remedy)?;
        } else {
            file.set_len(total as u64)
                .map_err(|e| Error::from_io(&format!("resize {where_}"), &e))?;
        }
        let mut mo = MmapOptions::new();
        mo.len(total);
        if opts.populate {
            mo.populate();
        }
        let hdr = mo
            .map_raw(file)
            .map_err(|e| map_failed(total, &format!("map {total} bytes of {where_}"), &e))?;
        if opts.huge_pages {
            let _ = hdr.advise(memmap2::Advice::HugePage);
        }
        let mut m = Mapped {
            header: Some(hdr),
            data: None,
            data_off: off,
            len,
            readonly: false,
            origin,
            joined: AtomicBool::new(false),
            key: key_of(file),
            meta: opts.meta.clone(),
        };
        if shared {
            holders::adopt_creator(m.key);
            *m.joined.get_mut() = true;
        }
        let base = m.header_ptr().expect("header mapped");
        // SAFETY: the header mapping is `off >= HEADER_LEN` bytes, writable, page-aligned, and
        // lives as long as `m`.
        unsafe { header::publish(base, &enc) };
        Ok(m)
    }

    fn map_data(
        file: &File,
        off: u64,
        len: usize,
        readonly: bool,
        where_: &str,
    ) -> Result<Option<MmapRaw>> {
        if len == 0 {
            return Ok(None);
        }
        let mut mo = MmapOptions::new();
        mo.offset(off).len(len);
        let r = if readonly {
            mo.map_raw_read_only(file)
        } else {
            mo.map_raw(file)
        };
        r.map(Some)
            .map_err(|e| map_failed(len, &format!("map {len} data bytes of {where_}"), &e))
    }

    /// Maps an existing segment or file after validating its header against its real size.
    /// `header_writable`: map the header pages read-write (needed to join the holder table).
    pub(crate) fn open_existing(
        file: &File,
        readonly: bool,
        header_writable: bool,
        origin: Origin,
        where_: &str,
    ) -> std::result::Result<Mapped, OpenError> {
        let page = page_size();
        let (parsed, key) = read_header(file, page, where_, true).map_err(OpenError::Other)?;
        let off = parsed.data_offset as usize;
        let len = usize::try_from(parsed.data_len)
            .ok()
            .filter(|l| {
                off.checked_add(*l)
                    .is_some_and(|t| t <= isize::MAX as usize)
            })
            .ok_or_else(|| OpenError::Other(too_big(parsed.data_len as usize)))?;
        let where_map =
            |e: std::io::Error| OpenError::Other(Error::from_io(&format!("map {where_}"), &e));
        // Read-write: one mapping of header and data. Read-only data: the header pages on their
        // own (writable only to join the holder table) and the data pages PROT_READ.
        let (hdr, data, data_off) = if !readonly && header_writable {
            let whole = MmapOptions::new()
                .len(off + len)
                .map_raw(file)
                .map_err(where_map)?;
            (whole, None, off)
        } else {
            let mut mo = MmapOptions::new();
            mo.len(off);
            let hdr = if header_writable {
                mo.map_raw(file)
            } else {
                mo.map_raw_read_only(file)
            }
            .map_err(where_map)?;
            let data = Self::map_data(file, off as u64, len, readonly, where_)
                .map_err(OpenError::Other)?;
            (hdr, data, 0)
        };
        let shared = matches!(origin, Origin::Shared { .. });
        let mut m = Mapped {
            header: Some(hdr),
            data,
            data_off,
            len,
            readonly,
            origin,
            joined: AtomicBool::new(false),
            key,
            meta: parsed.meta,
        };
        if shared && header_writable {
            match holders::join(&m.table().expect("header mapped"), m.key) {
                Ok(()) => *m.joined.get_mut() = true,
                Err(ClaimError::Closing) => return Err(OpenError::Closing),
                Err(ClaimError::Other(e)) => return Err(OpenError::Other(e)),
            }
        }
        Ok(m)
    }

    /// The data address (a dangling aligned address for zero-length buffers).
    pub(crate) fn data_ptr(&self) -> NonNull<u8> {
        match (&self.data, &self.header) {
            (Some(m), _) => NonNull::new(m.as_mut_ptr()).unwrap_or_else(empty_ptr),
            (None, Some(h)) if self.len > 0 && self.data_off > 0 => {
                // SAFETY: header and data share this mapping, which is data_off + len bytes.
                NonNull::new(unsafe { h.as_mut_ptr().add(self.data_off) }).unwrap_or_else(empty_ptr)
            }
            _ => empty_ptr(),
        }
    }

    fn header_ptr(&self) -> Option<*mut u8> {
        self.header.as_ref().map(|h| h.as_mut_ptr())
    }

    fn table(&self) -> Option<Table> {
        let h = self.header.as_ref()?;
        // SAFETY: the header mapping is at least HEADER_LEN bytes, page-aligned and lives as
        // long as `self`; callers use the table only while borrowing `self`. It is only written
        // through when mapped writable (holder slots are claimed only then).
        Some(unsafe { Table::new(h.as_mut_ptr()) })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
    pub(crate) fn readonly(&self) -> bool {
        self.readonly
    }
    pub(crate) fn meta(&self) -> &Meta {
        &self.meta
    }
    pub(crate) fn kind(&self) -> Kind {
        match self.origin {
            Origin::Private => Kind::Private,
            Origin::Shared { .. } => Kind::Shared,
            Origin::File { .. } => Kind::File,
        }
    }
    pub(crate) fn name(&self) -> Option<&str> {
        match &self.origin {
            Origin::Shared { name, .. } => Some(name),
            _ => None,
        }
    }
    pub(crate) fn path(&self) -> Option<&Path> {
        match &self.origin {
            Origin::File { path } => Some(path),
            _ => None,
        }
    }
    /// Writes a file buffer's data and header to disk (msync). A no-op for other backings.
    pub(crate) fn flush(&self) -> Result<()> {
        if self.readonly || !matches!(self.origin, Origin::File { .. }) {
            return Ok(());
        }
        let what = || format!("flush {}", self.path().unwrap_or(Path::new("?")).display());
        if let Some(d) = &self.data {
            d.flush().map_err(|e| Error::from_io(&what(), &e))?;
        }
        if let Some(h) = &self.header {
            h.flush().map_err(|e| Error::from_io(&what(), &e))?;
        }
        Ok(())
    }

    /// Leaves the holder table (shared buffers) and removes the name when this was the last
    /// live holder. Idempotent. Returns true when the name was removed.
    pub(crate) fn leave(&self) -> bool {
        if !self.joined.swap(false, Ordering::AcqRel) {
            return false;
        }
        let Some(t) = self.table() else { return false };
        if holders::part(&t, self.key) {
            if let Some(name) = self.name() {
                let _ = crate::shm::unlink(name);
            }
            return true;
        }
        false
    }
}

/// Why an open did not succeed.
pub(crate) enum OpenError {
    /// The segment is being removed by its last holder; retry.
    Closing,
    Other(Error),
}

impl Drop for Mapped {
    /// Policy: a file buffer is flushed to disk; a shared buffer leaves the holder table (removing
    /// the name if it was the last live holder); then the mappings are unmapped.
    fn drop(&mut self) {
        let _ = self.flush();
        self.leave();
    }
}

/// Reads and validates the header of `file`, waiting briefly for a creator that is still
/// writing it (the magic is published last).
pub(crate) fn read_header(
    file: &File,
    page: usize,
    where_: &str,
    wait: bool,
) -> Result<(Parsed, SegmentKey)> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(500);
    loop {
        let md = file
            .metadata()
            .map_err(|e| Error::from_io(&format!("stat {where_}"), &e))?;
        let size = md.len();
        let mut buf = [0u8; HEADER_LEN];
        let got = if size >= HEADER_LEN as u64 {
            file.read_exact_at(&mut buf, 0)
                .map(|_| HEADER_LEN)
                .unwrap_or(0)
        } else {
            0
        };
        let r = header::parse(&buf[..got], size, page, where_).map(|p| (p, (md.dev(), md.ino())));
        let young = buf[..8].iter().all(|b| *b == 0);
        match r {
            Err(Error::Corrupt(_)) if wait && young && std::time::Instant::now() < deadline => {
                // Possibly a creator between shm_open and publishing the header.
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            other => return other,
        }
    }
}
