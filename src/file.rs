//! Memory-mapped files.
//!
//! Like shared segments, a file is made unnamed (`O_TMPFILE`) in its directory, written,
//! reserved and mapped, and only then linked at its path, so no process ever opens a half-made
//! file and a creator killed midway leaves nothing. File systems without `O_TMPFILE` get the
//! classic `O_CREAT | O_EXCL` path instead (then a half-made file can be seen briefly and is
//! removed on failure).

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;

use crate::error::{Error, Result};
use crate::header::data_offset_for;
use crate::mapping::{CreateOptions, Mapped, Origin, human, page_size, read_header};

const REMEDY: &str = "free space on that file system, put the file elsewhere, or ask for less";

/// Refuses a reserved file that cannot fit before anything is created: `fallocate` on ext4
/// keeps the blocks it got before it fails, so a too-large request would fill the disk for a
/// moment (every other writer on it may fail meanwhile). `total` counts the header pages too.
/// The free space is what an unprivileged user may take (`f_bavail`), measured now.
fn check_room(dir: &Path, path: &Path, total: u64) -> Result<()> {
    let s = rustix::fs::statvfs(dir).map_err(|e| {
        Error::from_errno(&format!("measure the free space of {}", dir.display()), e)
    })?;
    if s.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY) {
        return Ok(()); // creating reports that, which says more than "no space"
    }
    let free = s.f_bavail.saturating_mul(s.f_frsize);
    if total > free {
        return Err(Error::OutOfMemory(format!(
            "the file system of {} has {} free; {} requested (measured before creating \
             anything, so nothing was created): make room there, put the file elsewhere, or ask \
             for less",
            path.display(),
            human(free),
            human(total)
        )));
    }
    Ok(())
}

fn check_path(path: &Path) -> Result<()> {
    if path.as_os_str().is_empty() {
        return Err(Error::InvalidArgument("the file path is empty".into()));
    }
    Ok(())
}

fn exists(path: &Path) -> Error {
    Error::AlreadyExists(format!(
        "{} already exists: zcbuf never overwrites a file; open it with open_file, or remove it \
         first",
        path.display()
    ))
}

pub(crate) fn create(path: &Path, len: usize, opts: &CreateOptions) -> Result<Mapped> {
    check_path(path)?;
    opts.meta.check_len(len as u64)?;
    let where_ = format!("the file system of {}", path.display());
    let origin = || Origin::File {
        path: path.to_owned(),
    };
    let (Some(file_name), parent) = (path.file_name(), path.parent()) else {
        return Err(Error::InvalidArgument(format!(
            "{} does not name a file",
            path.display()
        )));
    };
    let parent = match parent {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = rustix::fs::open(
        parent,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::from_errno(&format!("open the directory of {}", path.display()), e))?;
    // A quick refusal before any work when the path is taken (the link below decides).
    if rustix::fs::statat(&dir, file_name, AtFlags::SYMLINK_NOFOLLOW).is_ok() {
        return Err(exists(path));
    }
    if opts.reserve {
        let total = (data_offset_for(page_size()) as u64).saturating_add(len as u64);
        check_room(parent, path, total)?;
    }
    let tmp = match rustix::fs::openat(
        &dir,
        ".",
        OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    ) {
        Ok(fd) => fd,
        Err(Errno::OPNOTSUPP) | Err(Errno::ISDIR) | Err(Errno::INVAL) => {
            return create_in_place(path, len, opts);
        }
        Err(e) => return Err(Error::from_errno(&format!("create {}", path.display()), e)),
    };
    let file = File::from(tmp);
    // On failure (another writer took the space since check_room) the unnamed file and every
    // block it got go with its last descriptor, here.
    let parsed = Mapped::layout(&file, len, opts, false, &where_, REMEDY)?;
    let tmp = OwnedFd::from(file);
    let linked = match rustix::fs::linkat(&tmp, "", &dir, file_name, AtFlags::EMPTY_PATH) {
        Err(Errno::NOENT) | Err(Errno::PERM) => {
            let proc_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&tmp));
            rustix::fs::linkat(
                rustix::fs::CWD,
                proc_path.as_str(),
                &dir,
                file_name,
                AtFlags::SYMLINK_FOLLOW,
            )
        }
        r => r,
    };
    linked.map_err(|e| link_error(path, e))?;
    // Map through an open file of the new name when it still names our file, so that
    // /proc/PID/maps and lsof show the path.
    let key = rustix::fs::fstat(&tmp).map(|s| (s.st_dev, s.st_ino)).ok();
    let fd = match rustix::fs::openat(
        &dir,
        file_name,
        OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(named) if rustix::fs::fstat(&named).ok().map(|s| (s.st_dev, s.st_ino)) == key => named,
        _ => tmp,
    };
    Mapped::map_new(fd.as_fd(), parsed, true, origin(), &where_, opts).inspect_err(|_| {
        // Nothing of ours may be left behind.
        if let Ok(s) = rustix::fs::statat(&dir, file_name, AtFlags::SYMLINK_NOFOLLOW)
            && Some((s.st_dev, s.st_ino)) == key
        {
            let _ = rustix::fs::unlinkat(&dir, file_name, AtFlags::empty());
        }
    })
}

fn link_error(path: &Path, e: Errno) -> Error {
    match e {
        Errno::EXIST => exists(path),
        e => Error::from_errno(&format!("name the new file {}", path.display()), e),
    }
}

/// File systems without `O_TMPFILE`: create at the path (`O_EXCL | O_NOFOLLOW`), lay it out,
/// remove it on failure.
fn create_in_place(path: &Path, len: usize, opts: &CreateOptions) -> Result<Mapped> {
    // create_new = O_CREAT|O_EXCL: refuses any existing path, including a symlink (dangling or
    // not), so nothing is ever truncated or written through a link.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => exists(path),
            _ => Error::from_io(&format!("create {}", path.display()), &e),
        })?;
    let where_ = format!("the file system of {}", path.display());
    let origin = Origin::File {
        path: path.to_owned(),
    };
    let made = Mapped::layout(&file, len, opts, false, &where_, REMEDY)
        .and_then(|parsed| Mapped::map_new(file.as_fd(), parsed, true, origin, &where_, opts));
    if made.is_err() {
        // Give back the blocks a failed fallocate kept (through our descriptor, whatever the
        // path names now), then remove the name if it still names our file.
        let _ = file.set_len(0);
        let ours = rustix::fs::fstat(&file).map(|s| (s.st_dev, s.st_ino)).ok();
        let named = rustix::fs::lstat(path).map(|s| (s.st_dev, s.st_ino)).ok();
        if ours.is_some() && ours == named {
            let _ = std::fs::remove_file(path);
        }
    }
    made
}

pub(crate) fn open(path: &Path, readonly: bool) -> Result<Mapped> {
    check_path(path)?;
    let file = OpenOptions::new()
        .read(true)
        .write(!readonly)
        // O_NONBLOCK: a FIFO at `path` must not hang the call; regular files ignore it.
        .custom_flags(OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(|e| Error::from_io(&format!("open {}", path.display()), &e))?;
    let md = file
        .metadata()
        .map_err(|e| Error::from_io(&format!("stat {}", path.display()), &e))?;
    if !md.is_file() {
        return Err(Error::InvalidArgument(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    let where_ = format!("file {}", path.display());
    let parsed = read_header(file.as_fd(), md.len(), page_size(), &where_)?;
    let origin = Origin::File {
        path: path.to_owned(),
    };
    Mapped::map_existing(file.as_fd(), parsed, readonly, true, origin, &where_)
}
