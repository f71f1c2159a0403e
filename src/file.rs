//! Memory-mapped files.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::mapping::{CreateOptions, Mapped, OpenError, Origin};

const REMEDY: &str = "free space on that file system, put the file elsewhere, or ask for less";

fn check_path(path: &Path) -> Result<()> {
    if path.as_os_str().is_empty() {
        return Err(Error::InvalidArgument("the file path is empty".into()));
    }
    Ok(())
}

pub(crate) fn create(path: &Path, len: usize, opts: &CreateOptions) -> Result<Mapped> {
    check_path(path)?;
    opts.meta.check_len(len as u64)?;
    // create_new = O_CREAT|O_EXCL: refuses any existing path, including a symlink (dangling or
    // not), so nothing is ever truncated or written through a link.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => Error::AlreadyExists(format!(
                "{} already exists: zcbuf never overwrites a file; open it with open_file, or \
                 remove it first",
                path.display()
            )),
            _ => Error::from_io(&format!("create {}", path.display()), &e),
        })?;
    let where_ = format!("the file system of {}", path.display());
    let origin = Origin::File {
        path: path.to_owned(),
    };
    match Mapped::init_new(&file, len, opts, origin, &where_, REMEDY) {
        Ok(m) => Ok(m),
        Err(e) => {
            let _ = std::fs::remove_file(path);
            Err(e)
        }
    }
}

pub(crate) fn open(path: &Path, readonly: bool) -> Result<Mapped> {
    check_path(path)?;
    let file = OpenOptions::new()
        .read(true)
        .write(!readonly)
        // O_NONBLOCK: a FIFO at `path` must not hang the call; regular files ignore it.
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(|e| Error::from_io(&format!("open {}", path.display()), &e))?;
    if file.metadata().map(|m| !m.is_file()).unwrap_or(true) {
        return Err(Error::InvalidArgument(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    let origin = Origin::File {
        path: path.to_owned(),
    };
    let where_ = format!("file {}", path.display());
    match Mapped::open_existing(&file, readonly, !readonly, origin, &where_) {
        Ok(m) => Ok(m),
        Err(OpenError::Other(e)) => Err(e),
        Err(OpenError::Closing) => Err(Error::Internal("a file cannot be closing".into())),
    }
}
