//! The one error type of zcbuf.
//!
//! Every failure in the crate is an [`Error`]. The C ABI maps it once to a status code
//! ([`Error::code`]); the Python package maps that code once to an exception class.

use std::fmt;
use std::io;

/// Every way a zcbuf call can fail. Each variant carries a message that says what failed and,
/// where there is one, what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// An argument was malformed: a NULL pointer, a bad name, a shape that does not fit.
    InvalidArgument(String),
    /// No buffer, segment or file by that id, name or path (or the id was freed).
    NotFound(String),
    /// A segment or file by that name or path already exists.
    AlreadyExists(String),
    /// Not enough memory, shared memory or disk space for the request.
    OutOfMemory(String),
    /// The operating system refused access.
    Permission(String),
    /// A write was asked of something opened or mounted read-only.
    ReadOnly(String),
    /// A segment or file is not a zcbuf buffer, or its header is damaged or of another version.
    Corrupt(String),
    /// Any other operating-system I/O failure.
    Io(String),
    /// A bug in zcbuf (a caught panic, a poisoned lock). Please report it.
    Internal(String),
    /// A bounded wait ran out (a lock another process held for too long, a channel's timeout).
    Timeout(String),
    /// A channel's stream ended: its publisher closed it or died, and every message sent before
    /// was received.
    Closed(String),
}

/// Shorthand for results in this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The C status code of this error (see the `ZCBUF_E*` constants in the C ABI).
    pub fn code(&self) -> i32 {
        match self {
            Error::InvalidArgument(_) => 1,
            Error::NotFound(_) => 2,
            Error::AlreadyExists(_) => 3,
            Error::OutOfMemory(_) => 4,
            Error::Permission(_) => 5,
            Error::ReadOnly(_) => 6,
            Error::Corrupt(_) => 7,
            Error::Io(_) => 8,
            Error::Internal(_) => 9,
            Error::Timeout(_) => 10,
            Error::Closed(_) => 11,
        }
    }

    /// The message, without the kind.
    pub fn message(&self) -> &str {
        match self {
            Error::InvalidArgument(m)
            | Error::NotFound(m)
            | Error::AlreadyExists(m)
            | Error::OutOfMemory(m)
            | Error::Permission(m)
            | Error::ReadOnly(m)
            | Error::Corrupt(m)
            | Error::Io(m)
            | Error::Internal(m)
            | Error::Timeout(m)
            | Error::Closed(m) => m,
        }
    }

    /// A short name for the kind of error, e.g. `"not found"`.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Error::InvalidArgument(_) => "invalid argument",
            Error::NotFound(_) => "not found",
            Error::AlreadyExists(_) => "already exists",
            Error::OutOfMemory(_) => "out of memory or space",
            Error::Permission(_) => "permission denied",
            Error::ReadOnly(_) => "read-only",
            Error::Corrupt(_) => "corrupt or incompatible",
            Error::Io(_) => "I/O error",
            Error::Internal(_) => "internal error",
            Error::Timeout(_) => "timed out",
            Error::Closed(_) => "channel closed",
        }
    }

    /// Classifies an operating-system error by its errno and prefixes `what` (what was being
    /// attempted) to its message.
    pub fn from_io(what: &str, err: &io::Error) -> Error {
        let msg = format!("{what}: {err}");
        match err.raw_os_error().map(rustix::io::Errno::from_raw_os_error) {
            Some(rustix::io::Errno::NOENT) => Error::NotFound(msg),
            Some(rustix::io::Errno::EXIST) => Error::AlreadyExists(msg),
            Some(rustix::io::Errno::NOMEM)
            | Some(rustix::io::Errno::NOSPC)
            | Some(rustix::io::Errno::FBIG)
            | Some(rustix::io::Errno::DQUOT)
            | Some(rustix::io::Errno::MFILE)
            | Some(rustix::io::Errno::NFILE)
            | Some(rustix::io::Errno::OVERFLOW) => Error::OutOfMemory(msg),
            Some(rustix::io::Errno::ACCESS) | Some(rustix::io::Errno::PERM) => {
                Error::Permission(msg)
            }
            Some(rustix::io::Errno::ROFS) => Error::ReadOnly(msg),
            Some(rustix::io::Errno::INVAL)
            | Some(rustix::io::Errno::NAMETOOLONG)
            | Some(rustix::io::Errno::ISDIR)
            | Some(rustix::io::Errno::NOTDIR) => Error::InvalidArgument(msg),
            Some(rustix::io::Errno::LOOP) => Error::InvalidArgument(format!(
                "{msg} (the path is a symbolic link; zcbuf does not follow links it creates through)"
            )),
            _ => Error::Io(msg),
        }
    }

    /// Like [`Error::from_io`] for a rustix errno.
    pub fn from_errno(what: &str, err: rustix::io::Errno) -> Error {
        Error::from_io(what, &io::Error::from(err))
    }
}

/// Whether `msg` already says `kind` in those words (ASCII case ignored), as in
/// "x already exists: ..." or an errno text such as "Permission denied".
fn says(msg: &str, kind: &str) -> bool {
    msg.as_bytes()
        .windows(kind.len())
        .any(|w| w.eq_ignore_ascii_case(kind.as_bytes()))
}

/// `kind: message`, or the message alone when it already says its kind: every message says
/// its kind once (the C ABI's `zcbuf_last_error` is this text; Python drops a leading kind,
/// which the exception class says).
impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, msg) = (self.kind_name(), self.message());
        if says(msg, kind) {
            f.write_str(msg)
        } else {
            write!(f, "{kind}: {msg}")
        }
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_nonzero() {
        let all = [
            Error::InvalidArgument(String::new()),
            Error::NotFound(String::new()),
            Error::AlreadyExists(String::new()),
            Error::OutOfMemory(String::new()),
            Error::Permission(String::new()),
            Error::ReadOnly(String::new()),
            Error::Corrupt(String::new()),
            Error::Io(String::new()),
            Error::Internal(String::new()),
            Error::Timeout(String::new()),
        ];
        let mut codes: Vec<i32> = all.iter().map(Error::code).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), all.len());
        assert!(!codes.contains(&0));
    }

    #[test]
    fn errno_classification() {
        let e = Error::from_io("open x", &io::Error::from_raw_os_error(2));
        assert!(matches!(e, Error::NotFound(_)), "{e}");
        let e = Error::from_io("open x", &io::Error::from_raw_os_error(17));
        assert!(matches!(e, Error::AlreadyExists(_)), "{e}");
        let e = Error::from_io("fallocate", &io::Error::from_raw_os_error(28));
        assert!(matches!(e, Error::OutOfMemory(_)), "{e}");
        assert!(
            e.to_string()
                .starts_with("out of memory or space: fallocate")
        );
    }

    #[test]
    fn display_says_the_kind_once() {
        // Prefixed when the message does not say it...
        let e = Error::NotFound("buffer id 7 is not live".into());
        assert_eq!(e.to_string(), "not found: buffer id 7 is not live");
        // ...and not again when it does, in any case (errno texts are capitalised).
        let e = Error::AlreadyExists("w.zcbuf already exists: open it".into());
        assert_eq!(e.to_string(), "w.zcbuf already exists: open it");
        let e = Error::from_io("open x", &io::Error::from_raw_os_error(13));
        assert!(matches!(e, Error::Permission(_)), "{e}");
        assert_eq!(
            e.to_string()
                .to_lowercase()
                .matches("permission denied")
                .count(),
            1,
            "{e}"
        );
        let e = Error::from_io("open x", &io::Error::from_raw_os_error(22));
        assert_eq!(
            e.to_string()
                .to_lowercase()
                .matches("invalid argument")
                .count(),
            1,
            "{e}"
        );
        assert_eq!(
            Error::Internal(String::new()).to_string(),
            "internal error: "
        );
    }
}
