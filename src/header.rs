//! The versioned header at the start of every shared and file-backed buffer.
//!
//! Layout of version 2 (all integers little-endian; see `docs/design.md`):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `b"ZCBUFhdr"` |
//! | 8 | 4 | version (2) |
//! | 12 | 4 | header length ([`HEADER_LEN`]) |
//! | 16 | 8 | data offset (a multiple of the page size, at least [`HEADER_LEN`]) |
//! | 24 | 8 | data length in bytes |
//! | 32 | 8 | item size of the dtype (0 when untyped) |
//! | 40 | 4 | creator pid (as the creator saw itself; informational) |
//! | 44 | 4 | number of dimensions (at most [`MAX_NDIM`]) |
//! | 48 | 8 | creation time, ns since the Unix epoch |
//! | 56 | 4 | dtype string length (at most [`DTYPE_CAP`]) |
//! | 60 | 4 | flags: bit 0 = persistent ([`FLAG_PERSISTENT`]) |
//! | 64 | 64 | reserved, zero |
//! | 128 | 512 | dtype string, printable ASCII (a NumPy dtype descriptor) |
//! | 640 | 512 | shape, 64 × u64 |
//!
//! The header is written once, by the creator, before the segment has a name (shared buffers)
//! or before anything is mapped (files), and never again: no process writes it after creation,
//! so nothing zcbuf does after creation can fault on a segment another process truncated.
//! Liveness is not in the header at all: it is kept by the kernel as locks on the open file
//! (see [`crate::liveness`]).

use crate::error::{Error, Result};

/// The magic number at offset 0.
pub const MAGIC: u64 = u64::from_le_bytes(*b"ZCBUFhdr");
/// The header version this build writes and reads.
pub const VERSION: u32 = 2;
/// Bytes of header structure in version 2.
pub const HEADER_LEN: usize = 1152;
/// Most bytes a dtype string may have.
pub const DTYPE_CAP: usize = 512;
/// Most dimensions a shape may have (NumPy 2's limit).
pub const MAX_NDIM: usize = 64;
/// Header flag: the segment persists after its last holder until removed explicitly.
pub const FLAG_PERSISTENT: u32 = 1;
const KNOWN_FLAGS: u32 = FLAG_PERSISTENT;

const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_HEADER_LEN: usize = 12;
const OFF_DATA_OFFSET: usize = 16;
const OFF_DATA_LEN: usize = 24;
const OFF_ITEMSIZE: usize = 32;
const OFF_CREATOR_PID: usize = 40;
const OFF_NDIM: usize = 44;
const OFF_CREATED_NS: usize = 48;
const OFF_DTYPE_LEN: usize = 56;
const OFF_FLAGS: usize = 60;
const OFF_RESERVED: usize = 64;
const OFF_DTYPE: usize = 128;
const OFF_SHAPE: usize = 640;

/// The element type and shape stored with a buffer.
///
/// An empty `dtype` means untyped raw bytes; then `shape` is empty and `itemsize` is 0.
/// Otherwise `dtype` is a printable ASCII descriptor (zcbuf's Python package stores NumPy's
/// `dtype.descr` text) and the product of `shape` times `itemsize` equals the data length.
///
/// ```
/// let m = zcbuf::Meta::typed("<f8", 8, &[2, 3]).unwrap();
/// assert_eq!(m.nbytes(), Some(48));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Meta {
    /// The dtype descriptor, or empty for raw bytes.
    pub dtype: String,
    /// Bytes per element (0 when untyped).
    pub itemsize: u64,
    /// The dimensions.
    pub shape: Vec<u64>,
}

impl Meta {
    /// Untyped raw bytes.
    pub fn untyped() -> Meta {
        Meta::default()
    }

    /// A typed description, checked for size limits and overflow (not yet against a length).
    /// An empty `dtype` gives the untyped description, and then `itemsize` must be 0 and `shape`
    /// empty.
    pub fn typed(dtype: &str, itemsize: u64, shape: &[u64]) -> Result<Meta> {
        let m = Meta {
            dtype: dtype.to_owned(),
            itemsize,
            shape: shape.to_vec(),
        };
        m.check_form()?;
        Ok(m)
    }

    /// True when a dtype is set.
    pub fn is_typed(&self) -> bool {
        !self.dtype.is_empty()
    }

    /// The number of data bytes this description covers, or `None` if it overflows
    /// (always `None` for untyped).
    pub fn nbytes(&self) -> Option<u64> {
        if !self.is_typed() {
            return None;
        }
        self.shape
            .iter()
            .try_fold(self.itemsize, |acc, &d| acc.checked_mul(d))
    }

    fn check_form(&self) -> Result<()> {
        if self.dtype.len() > DTYPE_CAP {
            return Err(Error::InvalidArgument(format!(
                "dtype descriptor is {} bytes; at most {DTYPE_CAP} fit in the header",
                self.dtype.len()
            )));
        }
        if let Some(c) = self.dtype.bytes().find(|c| !(0x20..0x7f).contains(c)) {
            return Err(Error::InvalidArgument(format!(
                "dtype descriptor has a non-printable or non-ASCII byte 0x{c:02x}"
            )));
        }
        if self.shape.len() > MAX_NDIM {
            return Err(Error::InvalidArgument(format!(
                "shape has {} dimensions; at most {MAX_NDIM} are supported",
                self.shape.len()
            )));
        }
        if !self.is_typed() {
            if !self.shape.is_empty() || self.itemsize != 0 {
                return Err(Error::InvalidArgument(
                    "a shape or item size was given without a dtype".into(),
                ));
            }
            return Ok(());
        }
        if self.itemsize == 0 {
            return Err(Error::InvalidArgument(
                "a dtype needs an item size of at least 1 byte".into(),
            ));
        }
        if self.nbytes().is_none() {
            return Err(Error::InvalidArgument(format!(
                "shape {:?} × item size {} overflows 64 bits",
                self.shape, self.itemsize
            )));
        }
        Ok(())
    }

    /// Checks that this description is well formed and covers exactly `len` bytes.
    pub fn check_len(&self, len: u64) -> Result<()> {
        self.check_form()?;
        if let Some(n) = self.nbytes()
            && n != len
        {
            return Err(Error::InvalidArgument(format!(
                "shape {:?} of {}-byte items ({}) needs {n} bytes, but the buffer has {len}",
                self.shape, self.itemsize, self.dtype
            )));
        }
        Ok(())
    }
}

/// What a valid header says, parsed from a private copy of its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// Where the data starts, from the start of the segment.
    pub data_offset: u64,
    /// Data length in bytes.
    pub data_len: u64,
    /// The pid of the creating process.
    pub creator_pid: u32,
    /// Creation time in ns since the Unix epoch.
    pub created_ns: u64,
    /// dtype and shape.
    pub meta: Meta,
    /// The segment persists after its last holder until removed explicitly.
    pub persistent: bool,
}

fn rd_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn rd_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// The data offset used for new segments: the header rounded up to a page.
pub fn data_offset_for(page_size: usize) -> usize {
    HEADER_LEN.div_ceil(page_size) * page_size
}

/// Parses and validates a header from `bytes` (a copy of at least the first [`HEADER_LEN`]
/// bytes of a segment whose real size is `segment_size`).
///
/// Every length, offset, count and string is checked against the real size before anything is
/// trusted: a header that lies gives [`Error::Corrupt`], never an out-of-range result.
pub fn parse(
    bytes: &[u8],
    segment_size: u64,
    page_size: usize,
    what: impl std::fmt::Display,
) -> Result<Parsed> {
    let corrupt = |why: String| {
        Err(Error::Corrupt(format!(
            "{what} is not a usable zcbuf buffer: {why}"
        )))
    };
    if bytes.len() < HEADER_LEN || segment_size < HEADER_LEN as u64 {
        return corrupt(format!(
            "it is {segment_size} bytes, smaller than a zcbuf header ({HEADER_LEN} bytes)"
        ));
    }
    if rd_u64(bytes, OFF_MAGIC) != MAGIC {
        return corrupt("wrong magic number (not made by zcbuf, or overwritten)".into());
    }
    let version = rd_u32(bytes, OFF_VERSION);
    if version != VERSION {
        return corrupt(format!(
            "header version {version}, but this zcbuf reads version {VERSION} only{}: open it \
             with the zcbuf that made it, or remove it (zcbuf.unlink / rm) and create it anew",
            if version < VERSION {
                " (version 1 segments kept holders in a header table this zcbuf no longer trusts)"
            } else {
                " (made by a newer zcbuf)"
            }
        ));
    }
    let header_len = rd_u32(bytes, OFF_HEADER_LEN);
    if header_len as usize != HEADER_LEN {
        return corrupt(format!("header length {header_len}, expected {HEADER_LEN}"));
    }
    let flags = rd_u32(bytes, OFF_FLAGS);
    if flags & !KNOWN_FLAGS != 0 {
        return corrupt(format!("unknown flags 0x{:x}", flags & !KNOWN_FLAGS));
    }
    let data_offset = rd_u64(bytes, OFF_DATA_OFFSET);
    if data_offset < HEADER_LEN as u64 || data_offset % page_size as u64 != 0 {
        return corrupt(format!(
            "data offset {data_offset} is not a page-aligned offset past the header"
        ));
    }
    if data_offset > segment_size {
        return corrupt(format!(
            "data offset {data_offset} lies past the end of the {segment_size}-byte segment"
        ));
    }
    let data_len = rd_u64(bytes, OFF_DATA_LEN);
    if data_len > segment_size - data_offset {
        return corrupt(format!(
            "data length {data_len} at offset {data_offset} runs past the end of the {segment_size}-byte segment (truncated?)"
        ));
    }
    let dtype_len = rd_u32(bytes, OFF_DTYPE_LEN) as usize;
    if dtype_len > DTYPE_CAP {
        return corrupt(format!("dtype length {dtype_len} exceeds {DTYPE_CAP}"));
    }
    let ndim = rd_u32(bytes, OFF_NDIM) as usize;
    if ndim > MAX_NDIM {
        return corrupt(format!("{ndim} dimensions exceeds {MAX_NDIM}"));
    }
    // Unused bytes must be zero: damage there is damage all the same.
    let unused = [
        (OFF_RESERVED, OFF_DTYPE),
        (OFF_DTYPE + dtype_len, OFF_SHAPE),
        (OFF_SHAPE + 8 * ndim, HEADER_LEN),
    ];
    const ZEROS: [u8; HEADER_LEN] = [0; HEADER_LEN];
    for (a, b) in unused {
        // A slice comparison is a memcmp: the common (valid) case stays cheap.
        if bytes[a..b] != ZEROS[..b - a] {
            let i = bytes[a..b].iter().position(|x| *x != 0).unwrap_or(0);
            return corrupt(format!("reserved header byte {} is not zero", a + i));
        }
    }
    let dtype_bytes = &bytes[OFF_DTYPE..OFF_DTYPE + dtype_len];
    let Ok(dtype) = std::str::from_utf8(dtype_bytes) else {
        return corrupt("dtype is not text".into());
    };
    let shape: Vec<u64> = (0..ndim)
        .map(|i| rd_u64(bytes, OFF_SHAPE + 8 * i))
        .collect();
    let meta = Meta {
        dtype: dtype.to_owned(),
        itemsize: rd_u64(bytes, OFF_ITEMSIZE),
        shape,
    };
    if let Err(e) = meta.check_len(data_len) {
        return corrupt(e.message().to_owned());
    }
    Ok(Parsed {
        data_offset,
        data_len,
        creator_pid: rd_u32(bytes, OFF_CREATOR_PID),
        created_ns: rd_u64(bytes, OFF_CREATED_NS),
        meta,
        persistent: flags & FLAG_PERSISTENT != 0,
    })
}

/// Serialises a complete header, magic included, into `out` (at least [`HEADER_LEN`] bytes,
/// zeroed by the caller).
pub fn encode(
    out: &mut [u8],
    data_offset: u64,
    data_len: u64,
    meta: &Meta,
    creator_pid: u32,
    persistent: bool,
) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    out[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&MAGIC.to_le_bytes());
    out[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&VERSION.to_le_bytes());
    out[OFF_HEADER_LEN..OFF_HEADER_LEN + 4].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    out[OFF_DATA_OFFSET..OFF_DATA_OFFSET + 8].copy_from_slice(&data_offset.to_le_bytes());
    out[OFF_DATA_LEN..OFF_DATA_LEN + 8].copy_from_slice(&data_len.to_le_bytes());
    out[OFF_ITEMSIZE..OFF_ITEMSIZE + 8].copy_from_slice(&meta.itemsize.to_le_bytes());
    out[OFF_CREATOR_PID..OFF_CREATOR_PID + 4].copy_from_slice(&creator_pid.to_le_bytes());
    out[OFF_NDIM..OFF_NDIM + 4].copy_from_slice(&(meta.shape.len() as u32).to_le_bytes());
    out[OFF_CREATED_NS..OFF_CREATED_NS + 8].copy_from_slice(&now.to_le_bytes());
    out[OFF_DTYPE_LEN..OFF_DTYPE_LEN + 4].copy_from_slice(&(meta.dtype.len() as u32).to_le_bytes());
    let flags = if persistent { FLAG_PERSISTENT } else { 0 };
    out[OFF_FLAGS..OFF_FLAGS + 4].copy_from_slice(&flags.to_le_bytes());
    out[OFF_DTYPE..OFF_DTYPE + meta.dtype.len()].copy_from_slice(meta.dtype.as_bytes());
    for (i, d) in meta.shape.iter().enumerate() {
        out[OFF_SHAPE + 8 * i..OFF_SHAPE + 8 * i + 8].copy_from_slice(&d.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good(len: u64, meta: &Meta) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        encode(&mut b, 8192, len, meta, 42, false);
        b
    }

    #[test]
    fn round_trip() {
        let meta = Meta::typed("<i4", 4, &[3, 5]).unwrap();
        let b = good(60, &meta);
        let p = parse(&b, 8192 + 60, 4096, "t").unwrap();
        assert_eq!(p.meta, meta);
        assert_eq!(p.data_len, 60);
        assert_eq!(p.data_offset, 8192);
        assert_eq!(p.creator_pid, 42);
    }

    #[test]
    fn rejects_lies() {
        let meta = Meta::untyped();
        let b = good(100, &meta);
        // truncated segment
        let e = parse(&b, 8192 + 50, 4096, "t").unwrap_err();
        assert!(matches!(e, Error::Corrupt(_)), "{e}");
        // bad magic
        let mut c = b.clone();
        c[0] ^= 1;
        assert!(matches!(parse(&c, 9000, 4096, "t"), Err(Error::Corrupt(_))));
        // data offset past the end
        let mut c = b.clone();
        c[OFF_DATA_OFFSET..OFF_DATA_OFFSET + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(matches!(parse(&c, 9000, 4096, "t"), Err(Error::Corrupt(_))));
        // shape that does not match the length
        let meta = Meta::typed("<f8", 8, &[4]).unwrap();
        let mut c = good(32, &meta);
        c[OFF_SHAPE..OFF_SHAPE + 8].copy_from_slice(&5u64.to_le_bytes());
        assert!(matches!(
            parse(&c, 8192 + 32, 4096, "t"),
            Err(Error::Corrupt(_))
        ));
        // a too-small segment
        assert!(matches!(
            parse(&b[..100], 100, 4096, "t"),
            Err(Error::Corrupt(_))
        ));
    }

    #[test]
    fn meta_checks() {
        assert!(Meta::typed("<f8", 8, &[u64::MAX, 2]).is_err());
        assert!(Meta::typed("<f8", 0, &[1]).is_err());
        assert!(Meta::typed("bad\u{1}", 1, &[1]).is_err());
        assert!(Meta::typed("<f8", 8, &[1; 65]).is_err());
        assert!(Meta::typed("<f8", 8, &[2]).unwrap().check_len(15).is_err());
        assert!(Meta::untyped().check_len(15).is_ok());
    }
}
