//! Named POSIX shared-memory segments: names, creation, opening, listing.

use std::fs::File;

use rustix::fs::Mode;
use rustix::shm::OFlags;

use crate::error::{Error, Result};
use crate::mapping::{CreateOptions, Mapped, OpenError, Origin};

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
            "shared-memory name {name:?} {why}: use 1 to {MAX_NAME_LEN} bytes without '/' or NUL"
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

fn os_name(name: &str) -> String {
    format!("/{name}")
}

/// Removes a segment's name. Existing mappings stay valid.
pub fn unlink(name: &str) -> Result<()> {
    check_name(name)?;
    rustix::shm::unlink(os_name(name).as_str())
        .map_err(|e| Error::from_errno(&format!("remove shared-memory segment {name:?}"), e))
}

const REMEDY: &str = "enlarge /dev/shm (docker run --shm-size=...), free other segments \
                      (python -m zcbuf gc), use a file-backed buffer, or ask for less";

pub(crate) fn create(name: Option<&str>, len: usize, opts: &CreateOptions) -> Result<Mapped> {
    let name = match name {
        Some(n) => {
            check_name(n)?;
            n.to_owned()
        }
        None => generate_name()?,
    };
    opts.meta.check_len(len as u64)?;
    let fd = rustix::shm::open(
        os_name(&name).as_str(),
        OFlags::CREATE | OFlags::EXCL | OFlags::RDWR,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| match e {
        rustix::io::Errno::EXIST => Error::AlreadyExists(format!(
            "shared-memory segment {name:?} already exists: open it instead, pick another \
             name, or pass no name to get a generated one"
        )),
        e => Error::from_errno(&format!("create shared-memory segment {name:?}"), e),
    })?;
    let file = File::from(fd);
    let where_ = format!("/dev/shm (segment {name:?})");
    let origin = Origin::Shared { name: name.clone() };
    match Mapped::init_new(&file, len, opts, origin, &where_, REMEDY) {
        Ok(m) => Ok(m),
        Err(e) => {
            // Nothing of ours may be left behind: the half-made segment goes.
            let _ = rustix::shm::unlink(os_name(&name).as_str());
            Err(e)
        }
    }
}

pub(crate) fn open(name: &str, readonly: bool) -> Result<Mapped> {
    check_name(name)?;
    let where_ = format!("shared-memory segment {name:?}");
    // A segment whose last holder is removing it is retried: either it disappears (not found)
    // or the remover backs out because it saw us.
    for _ in 0..200 {
        let fd = rustix::shm::open(os_name(name).as_str(), OFlags::RDWR, Mode::empty()).map_err(
            |e| match e {
                rustix::io::Errno::NOENT => Error::NotFound(format!(
                    "no shared-memory segment named {name:?} (never created, or freed by \
                     every process that held it)"
                )),
                e => Error::from_errno(&format!("open {where_}"), e),
            },
        )?;
        let file = File::from(fd);
        let origin = Origin::Shared {
            name: name.to_owned(),
        };
        match Mapped::open_existing(&file, readonly, true, origin, &where_) {
            Ok(m) => return Ok(m),
            Err(OpenError::Other(e)) => return Err(e),
            Err(OpenError::Closing) => std::thread::sleep(std::time::Duration::from_millis(1)),
        }
    }
    Err(Error::NotFound(format!(
        "{where_} is being removed by its last holder"
    )))
}
