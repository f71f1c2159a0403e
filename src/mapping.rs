//! A mapped buffer of any backing: the memory a registry entry owns.
//!
//! A shared buffer is one mapping of its data pages (read-only when opened read-only) plus this
//! process's [`Hold`] on the segment, which outlives the mapping; the header is read with
//! `pread` and never mapped. A file buffer is one mapping of header and data (read-write) or of
//! the data alone (read-only). A private buffer is one anonymous mapping. Memory is never moved
//! after creation; it is unmapped only when the [`Mapped`] is dropped, which the registry does
//! after the last lease is released.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use memmap2::{MmapOptions, MmapRaw};

use crate::error::{Error, Result};
use crate::header::{self, HEADER_LEN, Meta, Parsed};
use crate::liveness::Hold;

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
    /// Shared buffers: keep the segment after its last holder is gone, until
    /// [`crate::shm::unlink`] removes it (`gc` leaves it too). Default false: the last process
    /// to unmap it removes its name. Ignored for other backings.
    pub persist: bool,
}

impl CreateOptions {
    /// Defaults: untyped, pages reserved, not pre-faulted.
    pub fn new() -> Self {
        CreateOptions {
            meta: Meta::untyped(),
            reserve: true,
            populate: false,
            huge_pages: false,
            persist: false,
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
    /// Sets [`CreateOptions::persist`].
    pub fn persist(mut self, yes: bool) -> Self {
        self.persist = yes;
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
    /// The mapping, or `None` for zero bytes; the data starts `data_off` bytes into it. Declared
    /// before `hold`: fields drop in order, so the mapping is gone before the hold is released.
    map: Option<MmapRaw>,
    data_off: usize,
    len: usize,
    readonly: bool,
    origin: Origin,
    meta: Meta,
    persistent: bool,
    /// Shared buffers: this process's hold on the segment (one per segment, shared by all its
    /// mappings here); released after the last of them is unmapped.
    hold: Option<Arc<Hold>>,
    /// Shared buffers: the segment was sealed when this mapping was made (it is then mapped
    /// read-only), or was sealed through this mapping since; from then on this mapping's
    /// leases refuse writes. Set once, never cleared. (Another process's seal is learned with
    /// [`Mapped::is_sealed`], which asks the kernel, and does not change this.)
    sealed: AtomicBool,
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
        Err(rustix::io::Errno::FBIG) => {
            // Not a lack of space: a file-size limit (RLIMIT_FSIZE, or the file system's own
            // maximum file size). Saying "X free" here would send the user the wrong way.
            Err(Error::OutOfMemory(format!(
                "{where_}: {} is over the largest file this process may make there (the file \
                 size limit, ulimit -f, or the file system's maximum): raise the limit or ask \
                 for less",
                human(total)
            )))
        }
        Err(rustix::io::Errno::NOSPC) => {
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
            map: data,
            data_off: 0,
            len,
            readonly: false,
            origin: Origin::Private,
            meta: opts.meta.clone(),
            persistent: false,
            hold: None,
            sealed: AtomicBool::new(false),
        })
    }

    /// Lays out a new segment or file in `file` (freshly created, empty, not yet visible to
    /// anyone else): writes the whole header, then reserves or sizes it. Returns the parsed
    /// form of the header written, for [`Mapped::map_existing`].
    pub(crate) fn layout(
        file: &File,
        len: usize,
        opts: &CreateOptions,
        persistent: bool,
        where_: &str,
        remedy: &str,
    ) -> Result<Parsed> {
        opts.meta.check_len(len as u64)?;
        let page = page_size();
        let off = header::data_offset_for(page);
        let total = off
            .checked_add(len)
            .filter(|t| *t <= isize::MAX as usize)
            .ok_or_else(|| too_big(len))?;
        let mut enc = vec![0u8; HEADER_LEN];
        header::encode(
            &mut enc,
            off as u64,
            len as u64,
            &opts.meta,
            std::process::id(),
            persistent,
        );
        file.write_all_at(&enc, 0)
            .map_err(|e| Error::from_io(&format!("write the header of {where_}"), &e))?;
        if opts.reserve {
            reserve(file, total as u64, where_, remedy)?;
        } else {
            file.set_len(total as u64)
                .map_err(|e| Error::from_io(&format!("resize {where_}"), &e))?;
        }
        header::parse(&enc, total as u64, page, where_)
    }

    /// Maps an existing segment or file whose header `parsed` was validated against its real
    /// size. Shared segments (`whole == false`) map the data pages only; files opened
    /// read-write map header and data (so `flush` writes both).
    pub(crate) fn map_existing(
        fd: BorrowedFd<'_>,
        parsed: Parsed,
        readonly: bool,
        whole: bool,
        origin: Origin,
        where_: &dyn std::fmt::Display,
    ) -> Result<Mapped> {
        Self::map_with(fd, parsed, readonly, whole, origin, where_, None)
    }

    /// [`Mapped::map_existing`] for a buffer just laid out with `opts` (pre-faulting, huge
    /// pages).
    pub(crate) fn map_new(
        fd: BorrowedFd<'_>,
        parsed: Parsed,
        whole: bool,
        origin: Origin,
        where_: &dyn std::fmt::Display,
        opts: &CreateOptions,
    ) -> Result<Mapped> {
        Self::map_with(fd, parsed, false, whole, origin, where_, Some(opts))
    }

    fn map_with(
        fd: BorrowedFd<'_>,
        parsed: Parsed,
        readonly: bool,
        whole: bool,
        origin: Origin,
        where_: &dyn std::fmt::Display,
        new: Option<&CreateOptions>,
    ) -> Result<Mapped> {
        let off = parsed.data_offset as usize;
        let len = usize::try_from(parsed.data_len)
            .ok()
            .filter(|l| {
                off.checked_add(*l)
                    .is_some_and(|t| t <= isize::MAX as usize)
            })
            .ok_or_else(|| too_big(parsed.data_len as usize))?;
        let (start, data_off) = if whole && !readonly {
            (0, off)
        } else {
            (off, 0)
        };
        let map_len = off + len - start;
        let map = if map_len == 0 {
            None
        } else {
            let mut mo = MmapOptions::new();
            mo.offset(start as u64).len(map_len);
            if new.is_some_and(|o| o.populate) {
                mo.populate();
            }
            let raw = fd.as_raw_fd();
            let r = if readonly {
                mo.map_raw_read_only(raw)
            } else {
                mo.map_raw(raw)
            };
            let m = r.map_err(|e| map_failed(map_len, &format!("map {where_}"), &e))?;
            if new.is_some_and(|o| o.huge_pages) {
                // Advice only: a kernel that does not do huge shmem pages ignores it.
                let _ = m.advise(memmap2::Advice::HugePage);
            }
            Some(m)
        };
        Ok(Mapped {
            map,
            data_off,
            len,
            readonly,
            origin,
            meta: parsed.meta,
            persistent: parsed.persistent,
            hold: None,
            sealed: AtomicBool::new(false),
        })
    }

    /// Attaches this process's hold on the segment; it is released after the mapping is gone.
    /// Shared buffers: this process's hold on the segment (its open file).
    pub(crate) fn hold(&self) -> Option<&Arc<Hold>> {
        self.hold.as_ref()
    }

    pub(crate) fn set_hold(&mut self, hold: Arc<Hold>) {
        self.hold = Some(hold);
    }

    /// The data address (a dangling aligned address for zero-length buffers).
    pub(crate) fn data_ptr(&self) -> NonNull<u8> {
        match &self.map {
            Some(m) if self.len > 0 => {
                // SAFETY: the mapping is `data_off + len` bytes, so `data_off` is inside it.
                NonNull::new(unsafe { m.as_mut_ptr().add(self.data_off) }).unwrap_or_else(empty_ptr)
            }
            _ => empty_ptr(),
        }
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
    pub(crate) fn persistent(&self) -> bool {
        self.persistent
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
    /// True when this mapping knows the segment is sealed: it was sealed when mapped, or sealed
    /// through this mapping. One atomic load: what the write checks of leases consult.
    pub(crate) fn sealed_here(&self) -> bool {
        self.sealed.load(Ordering::Acquire)
    }

    /// Records that the segment was sealed when this mapping was made (by `shm::open`).
    pub(crate) fn mark_sealed(&self) {
        self.sealed.store(true, Ordering::Release);
    }

    /// Whether the segment is sealed now, by anyone: [`Mapped::sealed_here`], else the kernel's
    /// file mode of the segment (one `fstat`). Always false for private and file buffers.
    pub(crate) fn is_sealed(&self) -> bool {
        if self.sealed_here() {
            return true;
        }
        match &self.hold {
            Some(h) => {
                rustix::fs::fstat(h.fd()).is_ok_and(|st| crate::shm::is_sealed_mode(st.st_mode))
            }
            None => false,
        }
    }

    /// Seals a shared buffer (see [`crate::shm::seal`]): idempotent; refused for private and
    /// file buffers, and for a mapping opened read-only of a segment not yet sealed.
    pub(crate) fn seal(&self) -> Result<()> {
        if self.sealed_here() {
            return Ok(());
        }
        let name = match &self.origin {
            Origin::Shared { name } => name,
            Origin::Private => {
                return Err(Error::InvalidArgument(
                    "a private buffer cannot be sealed: no other process can open it; seal is \
                     for shared buffers (create it with shared=True or a name)"
                        .into(),
                ));
            }
            Origin::File { path } => {
                return Err(Error::InvalidArgument(format!(
                    "file buffer {} cannot be sealed: seal is for shared buffers; make a file \
                     read-only with chmod and open it with readonly=True",
                    path.display()
                )));
            }
        };
        let Some(hold) = &self.hold else {
            return Err(Error::Internal(format!(
                "shared buffer {name:?} has no hold on its segment"
            )));
        };
        if crate::channel::is_channel(self.data_ptr(), self.len) {
            // Its publisher and subscribers write its control words: sealed (read-only for
            // every later open), a subscriber could not even take its entry.
            return Err(Error::InvalidArgument(format!(
                "segment {name:?} is a channel, which cannot be sealed (its endpoints write to                  it); seal is for plain shared buffers"
            )));
        }
        crate::shm::seal(hold.fd(), name, self.readonly)?;
        self.mark_sealed();
        Ok(())
    }

    /// Writes a file buffer's header and data to disk (msync). A no-op for other backings.
    pub(crate) fn flush(&self) -> Result<()> {
        if self.readonly || !matches!(self.origin, Origin::File { .. }) {
            return Ok(());
        }
        let what = || format!("flush {}", self.path().unwrap_or(Path::new("?")).display());
        if let Some(m) = &self.map {
            m.flush().map_err(|e| Error::from_io(&what(), &e))?;
        }
        Ok(())
    }
}

impl Drop for Mapped {
    /// Policy: a file buffer is flushed to disk; then the mapping is unmapped, and then (for a
    /// shared buffer whose last mapping in this process this was) the hold is released, which
    /// removes the name if no other process holds the segment and it is not persistent.
    fn drop(&mut self) {
        let _ = self.flush();
        self.map = None;
        self.hold = None;
    }
}

/// Reads and validates the header of the open file `fd`, whose real size is `size`.
pub(crate) fn read_header(
    fd: BorrowedFd<'_>,
    size: u64,
    page: usize,
    where_: impl std::fmt::Display,
) -> Result<Parsed> {
    let mut buf = [0u8; HEADER_LEN];
    let mut got = 0;
    if size >= HEADER_LEN as u64 {
        while got < HEADER_LEN {
            match rustix::io::pread(fd, &mut buf[got..], got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    return Err(Error::from_errno(
                        &format!("read the header of {where_}"),
                        e,
                    ));
                }
            }
        }
    }
    header::parse(&buf[..got], size, page, where_)
}
