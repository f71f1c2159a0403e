//! The owning Rust handle: [`Buffer`], element types ([`Pod`]) and typed access.
//!
//! A [`Buffer`] owns one id of [`Registry::global`] (the registry the C ABI and Python share):
//! dropping it frees the id. It holds a lease for its whole life, so its memory is mapped while
//! it lives; an [`OwnedLease`] ([`Buffer::lease`], [`Buffer::into_lease`]) keeps the memory
//! mapped after the buffer is gone and can move to other threads.
//!
//! Which references are handed out depends on who else can write the memory (the argument is in
//! `docs/design.md`, "The Rust face"):
//!
//! * a **private** buffer made by a `Buffer` is reachable only through that `Buffer` (the
//!   registry refuses every other lease on it until [`Buffer::into_id`]), so it lends `&[T]` /
//!   `&mut [T]` under the usual `&self` / `&mut self` rules ([`Buffer::as_slice`],
//!   [`Buffer::as_mut_slice`]);
//! * a **shared** or **file** buffer may be written by other processes at any time, so it lends
//!   no reference: elements are read and written one at a time with relaxed atomic accesses
//!   ([`Buffer::read`], [`Buffer::write`]), ranges are copied ([`Buffer::copy_to_slice`],
//!   [`Buffer::copy_from_slice`]), and a slice is available only through `unsafe`
//!   ([`Buffer::view`], [`Buffer::view_mut`]) whose caller promises that nobody writes meanwhile.

use std::path::{Path, PathBuf};
#[cfg(target_pointer_width = "64")]
use std::sync::atomic::AtomicU64;
use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU32, Ordering};

use crate::error::{Error, Result};
use crate::header::Meta;
use crate::mapping::{CreateOptions, Kind, Mapped};
use crate::registry::{Info, OwnedLease, Registry};

mod sealed {
    pub trait Sealed {}
}

/// Element types zcbuf can view its memory as: `u8`..`u64`, `i8`..`i64`, `f32`, `f64`, and
/// arrays of them (`[f32; 3]`, `[[u8; 4]; 2]`, ...).
///
/// Every bit pattern is a valid value of these types, they have no padding, no pointers and no
/// interior mutability, so any bytes another process wrote can be read as them, and writing them
/// exposes nothing but their value. Each has a NumPy dtype ([`Pod::DTYPE`], native byte order):
/// a buffer created with [`Buffer::new_typed`], [`Buffer::shared_typed`] or
/// [`Buffer::create_file_typed`] stores it in its header, so Python opens it as an array of
/// that dtype. An array type adds its lengths to the end of the shape (`[f32; 3]` over `[4]`
/// is stored as `<f4` with shape `[4, 3]`).
///
/// ```
/// use zcbuf::Pod;
/// assert_eq!(<f32 as Pod>::DTYPE, if cfg!(target_endian = "little") { "<f4" } else { ">f4" });
/// assert_eq!(<u8 as Pod>::DTYPE, "|u1");
/// assert_eq!(<[i16; 2] as Pod>::ITEMSIZE, 2);
/// ```
///
/// # Safety
/// The trait is sealed: only this crate implements it, for the types above. An implementation
/// promises that every initialized bit pattern of `size_of::<Self>()` bytes is a valid `Self`,
/// that `Self` has no padding, and that `load`/`store` are sound on any address aligned to
/// `ALIGN` and valid for `size_of::<Self>()` bytes.
pub unsafe trait Pod: Copy + Send + Sync + 'static + sealed::Sealed {
    /// The NumPy dtype text of the innermost element, as stored in the header (`"<f4"`).
    const DTYPE: &'static str;
    /// Bytes of the innermost element.
    const ITEMSIZE: u64;
    /// The alignment element accesses need (that of the atomic type used for the innermost
    /// element; equal to its size).
    #[doc(hidden)]
    const ALIGN: usize;
    /// Appends the dimensions this type adds to a shape (none for scalars).
    #[doc(hidden)]
    fn push_dims(dims: &mut Vec<u64>);
    /// Reads one value with relaxed atomic loads of its scalars.
    ///
    /// # Safety
    /// `p` is aligned to `ALIGN` and valid for reads of `size_of::<Self>()` bytes for the call.
    #[doc(hidden)]
    unsafe fn load(p: *const Self) -> Self;
    /// Writes one value with relaxed atomic stores of its scalars.
    ///
    /// # Safety
    /// `p` is aligned to `ALIGN` and valid for writes of `size_of::<Self>()` bytes for the call.
    #[doc(hidden)]
    unsafe fn store(p: *mut Self, v: Self);
}

macro_rules! pod_scalar {
    ($t:ty, $atomic:ty, $bits:ty, $le:literal, $be:literal, |$v:ident| $to:expr, |$b:ident| $from:expr) => {
        impl sealed::Sealed for $t {}
        // SAFETY: a primitive number: no padding, every bit pattern valid; `load`/`store` are
        // single relaxed atomic accesses of the same size on an address aligned for the atomic
        // type, as their contracts require.
        unsafe impl Pod for $t {
            const DTYPE: &'static str = if cfg!(target_endian = "little") {
                $le
            } else {
                $be
            };
            const ITEMSIZE: u64 = std::mem::size_of::<$t>() as u64;
            const ALIGN: usize = std::mem::align_of::<$atomic>();
            fn push_dims(_dims: &mut Vec<u64>) {}
            unsafe fn load(p: *const Self) -> Self {
                // SAFETY: the caller guarantees `p` is aligned to `align_of::<$atomic>()` and
                // valid for reads of its size for this call. The access is atomic, so it does
                // not race with the atomic accesses of other handles; a relaxed load no wider
                // than a register is also sound on read-only mappings (std::sync::atomic,
                // "Atomic accesses to read-only memory").
                let $b: $bits =
                    unsafe { <$atomic>::from_ptr(p as *mut $bits) }.load(Ordering::Relaxed);
                $from
            }
            unsafe fn store(p: *mut Self, $v: Self) {
                // SAFETY: the caller guarantees `p` is aligned and valid for writes of its size
                // for this call; the store is atomic.
                unsafe { <$atomic>::from_ptr(p as *mut $bits) }.store($to, Ordering::Relaxed)
            }
        }
    };
}

pod_scalar!(u8, AtomicU8, u8, "|u1", "|u1", |v| v, |b| b);
pod_scalar!(i8, AtomicU8, u8, "|i1", "|i1", |v| v as u8, |b| b as i8);
pod_scalar!(u16, AtomicU16, u16, "<u2", ">u2", |v| v, |b| b);
pod_scalar!(i16, AtomicU16, u16, "<i2", ">i2", |v| v as u16, |b| b
    as i16);
pod_scalar!(u32, AtomicU32, u32, "<u4", ">u4", |v| v, |b| b);
pod_scalar!(i32, AtomicU32, u32, "<i4", ">i4", |v| v as u32, |b| b
    as i32);
pod_scalar!(f32, AtomicU32, u32, "<f4", ">f4", |v| v.to_bits(), |b| {
    f32::from_bits(b)
});
// 8-byte elements only where a register holds them: a relaxed 8-byte atomic load is then a plain
// load, sound on read-only mappings too.
#[cfg(target_pointer_width = "64")]
pod_scalar!(u64, AtomicU64, u64, "<u8", ">u8", |v| v, |b| b);
#[cfg(target_pointer_width = "64")]
pod_scalar!(i64, AtomicU64, u64, "<i8", ">i8", |v| v as u64, |b| b
    as i64);
#[cfg(target_pointer_width = "64")]
pod_scalar!(f64, AtomicU64, u64, "<f8", ">f8", |v| v.to_bits(), |b| {
    f64::from_bits(b)
});

impl<T: Pod, const N: usize> sealed::Sealed for [T; N] {}
// SAFETY: an array of `Pod` has no padding (its size is `N * size_of::<T>()`) and every bit
// pattern is valid element by element. Its elements sit at multiples of `size_of::<T>()`, a
// multiple of `T::ALIGN`, so each is aligned whenever the array is.
unsafe impl<T: Pod, const N: usize> Pod for [T; N] {
    const DTYPE: &'static str = T::DTYPE;
    const ITEMSIZE: u64 = T::ITEMSIZE;
    const ALIGN: usize = T::ALIGN;
    fn push_dims(dims: &mut Vec<u64>) {
        dims.push(N as u64);
        T::push_dims(dims);
    }
    unsafe fn load(p: *const Self) -> Self {
        let p = p.cast::<T>();
        // SAFETY: element `k < N` lies inside the `N * size_of::<T>()` bytes the caller vouched
        // for, aligned to `T::ALIGN` (see the impl's SAFETY).
        std::array::from_fn(|k| unsafe { T::load(p.add(k)) })
    }
    unsafe fn store(p: *mut Self, v: Self) {
        let p = p.cast::<T>();
        for (k, x) in v.into_iter().enumerate() {
            // SAFETY: as in `load`.
            unsafe { T::store(p.add(k), x) }
        }
    }
}

impl Meta {
    /// The description of an array of `T` with `shape` (an array `T` adds its lengths).
    ///
    /// ```
    /// use zcbuf::Meta;
    /// let m = Meta::of::<[f32; 3]>(&[4]).unwrap();
    /// assert_eq!((m.dtype.as_str(), m.itemsize, m.shape), (<f32 as zcbuf::Pod>::DTYPE, 4, vec![4, 3]));
    /// ```
    pub fn of<T: Pod>(shape: &[u64]) -> Result<Meta> {
        let mut dims = shape.to_vec();
        T::push_dims(&mut dims);
        Meta::typed(T::DTYPE, T::ITEMSIZE, &dims)
    }
}

/// The length in bytes `meta` describes, as a `usize`.
fn len_of(meta: &Meta) -> Result<usize> {
    meta.nbytes()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| {
            Error::OutOfMemory(format!(
                "shape {:?} of {}-byte items does not fit in this address space: ask for less",
                meta.shape, meta.itemsize
            ))
        })
}

/// Memory described by a lease: address, length, permissions, description.
struct Raw<'a> {
    ptr: *mut u8,
    len: usize,
    readonly: bool,
    /// Sealed through this buffer (then also `readonly`).
    sealed: bool,
    id: u64,
    meta: &'a Meta,
}

impl Raw<'_> {
    fn of(lease: &OwnedLease) -> Raw<'_> {
        Raw {
            ptr: lease.as_ptr(),
            len: lease.len(),
            readonly: lease.readonly(),
            sealed: lease.mapped().sealed_here(),
            id: lease.id(),
            meta: lease.meta(),
        }
    }

    /// Checks that the memory can be viewed as `T`s; returns how many there are.
    fn count<T: Pod>(&self) -> Result<usize> {
        let size = std::mem::size_of::<T>();
        let name = std::any::type_name::<T>();
        if size == 0 {
            return Err(Error::InvalidArgument(format!(
                "{name} has no size: view a buffer as a type of at least one byte"
            )));
        }
        if self.len % size != 0 {
            return Err(Error::InvalidArgument(format!(
                "buffer id {} has {} bytes, not a whole number of {size}-byte {name} elements",
                self.id, self.len
            )));
        }
        let align = T::ALIGN.max(std::mem::align_of::<T>());
        if self.ptr as usize % align != 0 {
            return Err(Error::InvalidArgument(format!(
                "buffer id {} starts at {:p}, not aligned to the {align} bytes {name} needs",
                self.id, self.ptr
            )));
        }
        let m = self.meta;
        let bytes = T::DTYPE == <u8 as Pod>::DTYPE;
        let same = m.dtype == T::DTYPE && m.itemsize == T::ITEMSIZE;
        if m.is_typed() && !bytes && !same {
            return Err(Error::InvalidArgument(format!(
                "buffer id {} holds {} elements (shape {:?}); view it as the matching Rust type \
                 (or an array of it), or as u8 bytes, not as {name} ({})",
                self.id,
                m.dtype,
                m.shape,
                T::DTYPE
            )));
        }
        Ok(self.len / size)
    }

    fn writable(&self) -> Result<()> {
        if self.sealed {
            return Err(Error::ReadOnly(format!(
                "buffer id {} is sealed: its segment is immutable from the seal on",
                self.id
            )));
        }
        if self.readonly {
            return Err(Error::ReadOnly(format!(
                "buffer id {} was opened read-only: open it with readonly = false to write",
                self.id
            )));
        }
        Ok(())
    }

    /// The address of `T` elements `start..start + n`, checked.
    fn range<T: Pod>(&self, start: usize, n: usize) -> Result<*mut T> {
        let count = self.count::<T>()?;
        match start.checked_add(n) {
            Some(end) if end <= count => Ok(self.ptr.cast::<T>().wrapping_add(start)),
            _ => Err(Error::InvalidArgument(format!(
                "elements {start}..{start}+{n} are outside buffer id {}, which holds {count} {}",
                self.id,
                std::any::type_name::<T>()
            ))),
        }
    }

    fn read<T: Pod>(&self, i: usize) -> Result<T> {
        let p = self.range::<T>(i, 1)?;
        // SAFETY: `range` checked that element `i` lies inside the mapping (kept mapped by the
        // lease `self` was made from) and that the base, hence every element, is aligned to
        // `T::ALIGN`.
        Ok(unsafe { T::load(p) })
    }

    fn write<T: Pod>(&self, i: usize, v: T) -> Result<()> {
        self.writable()?;
        let p = self.range::<T>(i, 1)?;
        // SAFETY: as in `read`, and the mapping is writable (checked above).
        unsafe { T::store(p, v) };
        Ok(())
    }

    fn copy_to_slice<T: Pod>(&self, start: usize, dst: &mut [T]) -> Result<()> {
        let p = self.range::<T>(start, dst.len())?;
        // SAFETY: the range lies inside the mapping, which the lease keeps mapped and readable;
        // `dst` is Rust memory distinct from it; every bit pattern is a valid `T` (`Pod`), so
        // whatever another writer left there is a valid value.
        unsafe { std::ptr::copy_nonoverlapping(p.cast_const(), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn copy_from_slice<T: Pod>(&self, start: usize, src: &[T]) -> Result<()> {
        self.writable()?;
        let p = self.range::<T>(start, src.len())?;
        // SAFETY: the range lies inside the writable mapping the lease keeps mapped; `src` is
        // Rust memory distinct from it; no reference to the mapping is made.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), p, src.len()) };
        Ok(())
    }
}

/// Typed access to leased memory, the same as [`Buffer`]'s (see there for what each does).
impl OwnedLease {
    /// Element `i` of the memory seen as `T`s (a relaxed atomic load of each scalar).
    pub fn read<T: Pod>(&self, i: usize) -> Result<T> {
        Raw::of(self).read(i)
    }
    /// Writes element `i` (a relaxed atomic store of each scalar).
    pub fn write<T: Pod>(&self, i: usize, v: T) -> Result<()> {
        Raw::of(self).write(i, v)
    }
    /// Copies elements `start..start + dst.len()` into `dst`.
    pub fn copy_to_slice<T: Pod>(&self, start: usize, dst: &mut [T]) -> Result<()> {
        Raw::of(self).copy_to_slice(start, dst)
    }
    /// Copies `src` into elements `start..start + src.len()`.
    pub fn copy_from_slice<T: Pod>(&self, start: usize, src: &[T]) -> Result<()> {
        Raw::of(self).copy_from_slice(start, src)
    }
    /// The number of `T` elements (checked as for [`OwnedLease::read`]).
    pub fn count<T: Pod>(&self) -> Result<usize> {
        Raw::of(self).count::<T>()
    }
}

/// Frees the id when dropped (unless disarmed).
struct IdOwner {
    reg: &'static Registry,
    id: u64,
    armed: bool,
}

impl Drop for IdOwner {
    fn drop(&mut self) {
        if self.armed {
            // A flush error of a file buffer cannot be reported from a drop: `Buffer::free`
            // reports it. NotFound means someone freed the id already: nothing to do.
            let _ = self.reg.free(self.id);
        }
    }
}

/// An owned buffer of [`Registry::global`]: private, shared or file-backed memory that this
/// handle frees when dropped.
///
/// ```
/// use zcbuf::Buffer;
/// // A private buffer lends slices under the usual borrow rules.
/// let mut frame = Buffer::new_typed::<f32>(&[480, 640]).unwrap();
/// frame.as_mut_slice::<f32>().unwrap().fill(0.5);
/// assert_eq!(frame.as_slice::<f32>().unwrap()[1234], 0.5);
///
/// // A shared buffer is opened by name, here or in another process of the same user.
/// let name = format!("rustface-doc-{}", std::process::id());
/// let mut a = Buffer::shared_typed::<u32>(Some(&name), &[4]).unwrap();
/// a.copy_from_slice(0, &[1u32, 2, 3, 4]).unwrap();
/// let b = Buffer::open(&name, true).unwrap();
/// assert_eq!(b.meta().shape, vec![4]);
/// assert_eq!(b.read::<u32>(3).unwrap(), 4); // same pages: no copy was made
/// ```
///
/// **Drop policy:** dropping a `Buffer` frees its id ([`Registry::free`]: retired at once;
/// a file buffer is flushed, and an error doing so is ignored — call [`Buffer::free`] to see it)
/// and releases the lease it holds. The memory is unmapped when no [`OwnedLease`] of it remains;
/// a shared segment's name is removed when no process maps it any more (unless it was created
/// with [`CreateOptions::persist`]). [`Buffer::into_id`] hands the id to C or Python instead.
pub struct Buffer {
    /// Frees the id; declared first so the id is retired before the lease is released.
    owner: IdOwner,
    lease: OwnedLease,
    /// Private, made here, and not shared since: no other lease exists or can be taken.
    exclusive: bool,
}

impl Buffer {
    fn adopt(mapped: Mapped, exclusive: bool) -> Buffer {
        let reg = Registry::global();
        let lease = reg.insert_owned(mapped, exclusive);
        Buffer {
            owner: IdOwner {
                reg,
                id: lease.id(),
                armed: true,
            },
            lease,
            exclusive,
        }
    }

    /// A private (anonymous, this-process-only) buffer of `len` zero bytes.
    ///
    /// ```
    /// let b = zcbuf::Buffer::new(4096).unwrap();
    /// assert_eq!((b.len(), b.kind()), (4096, zcbuf::Kind::Private));
    /// ```
    pub fn new(len: usize) -> Result<Buffer> {
        Buffer::new_with(len, &CreateOptions::new())
    }

    /// A private buffer with options (dtype and shape in `opts.meta`, pre-faulting, huge pages).
    ///
    /// ```
    /// use zcbuf::{Buffer, CreateOptions};
    /// let b = Buffer::new_with(1 << 20, &CreateOptions::new().populate(true)).unwrap();
    /// assert_eq!(b.len(), 1 << 20);
    /// ```
    pub fn new_with(len: usize, opts: &CreateOptions) -> Result<Buffer> {
        Ok(Buffer::adopt(Mapped::private(len, opts)?, true))
    }

    /// A private zero-filled array of `T` with `shape`, typed in its description.
    ///
    /// ```
    /// let b = zcbuf::Buffer::new_typed::<u16>(&[2, 3]).unwrap();
    /// assert_eq!(b.as_slice::<u16>().unwrap(), &[0; 6]);
    /// ```
    pub fn new_typed<T: Pod>(shape: &[u64]) -> Result<Buffer> {
        let meta = Meta::of::<T>(shape)?;
        Buffer::new_with(len_of(&meta)?, &CreateOptions::new().meta(meta))
    }

    /// A new named shared-memory buffer of `len` zero bytes (`O_EXCL`, mode 0600). With `None`
    /// for a name, a fresh one (`zcbuf-` + 128 random bits) is generated: read it with
    /// [`Buffer::name`].
    ///
    /// ```
    /// let name = format!("rustface-doc-shared-{}", std::process::id());
    /// let b = zcbuf::Buffer::shared(Some(&name), 4096).unwrap();
    /// assert_eq!(b.name(), Some(name.as_str()));
    /// assert!(std::path::Path::new("/dev/shm").join(&name).exists());
    /// drop(b); // nobody else maps it: the name is removed
    /// assert!(!std::path::Path::new("/dev/shm").join(&name).exists());
    /// ```
    pub fn shared(name: Option<&str>, len: usize) -> Result<Buffer> {
        Buffer::shared_with(name, len, &CreateOptions::new())
    }

    /// [`Buffer::shared`] with options (dtype and shape, persistence, reservation, ...).
    ///
    /// ```
    /// use zcbuf::{Buffer, CreateOptions};
    /// let name = format!("rustface-doc-with-{}", std::process::id());
    /// let b = Buffer::shared_with(Some(&name), 64, &CreateOptions::new().populate(true)).unwrap();
    /// assert_eq!(b.len(), 64);
    /// ```
    pub fn shared_with(name: Option<&str>, len: usize, opts: &CreateOptions) -> Result<Buffer> {
        Ok(Buffer::adopt(crate::shm::create(name, len, opts)?, false))
    }

    /// A new shared zero-filled array of `T` with `shape`. Its dtype and shape are in the
    /// header: Python's `zcbuf.open(name).asarray()` is an array of that dtype and shape.
    ///
    /// ```
    /// let name = format!("rustface-doc-typed-{}", std::process::id());
    /// let b = zcbuf::Buffer::shared_typed::<f32>(Some(&name), &[480, 640]).unwrap();
    /// assert_eq!(b.meta().shape, vec![480, 640]);
    /// assert_eq!(b.len(), 480 * 640 * 4);
    /// ```
    pub fn shared_typed<T: Pod>(name: Option<&str>, shape: &[u64]) -> Result<Buffer> {
        let meta = Meta::of::<T>(shape)?;
        Buffer::shared_with(name, len_of(&meta)?, &CreateOptions::new().meta(meta))
    }

    /// Opens a shared buffer by name (made by any process of the same user, in any language),
    /// validating its header. `readonly` maps it read-only: writes then fail with
    /// [`Error::ReadOnly`].
    ///
    /// ```
    /// use zcbuf::Buffer;
    /// let name = format!("rustface-doc-open-{}", std::process::id());
    /// let a = Buffer::shared(Some(&name), 8).unwrap();
    /// a.lease().unwrap().write_at(0, b"hi").unwrap();
    /// let b = Buffer::open(&name, true).unwrap();
    /// assert_eq!(b.read::<u8>(1).unwrap(), b'i');
    /// assert!(b.readonly());
    /// ```
    pub fn open(name: &str, readonly: bool) -> Result<Buffer> {
        Ok(Buffer::adopt(crate::shm::open(name, readonly)?, false))
    }

    /// Opens the shared buffer `name` once it exists and is sealed ([`Buffer::seal`], in any
    /// process), waiting up to `timeout` without using CPU; read-only, as every open of a
    /// sealed segment is. [`Error::Timeout`] when the time runs out; [`Error::NotFound`] at
    /// once when the name exists unsealed and no process holds it (its creator died before
    /// sealing). See [`Registry::open_shared_wait`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use zcbuf::Buffer;
    /// let name = format!("seal-doc-buffer-{}", std::process::id());
    /// let consumer = std::thread::spawn({
    ///     let name = name.clone();
    ///     move || Buffer::open_wait(&name, Duration::from_secs(10))
    /// });
    /// let mut producer = Buffer::shared_typed::<u32>(Some(&name), &[4]).unwrap();
    /// producer.copy_from_slice(0, &[1u32, 2, 3, 4]).unwrap();
    /// producer.seal().unwrap();
    /// let seen = consumer.join().unwrap().unwrap();
    /// assert_eq!((seen.read::<u32>(3).unwrap(), seen.readonly()), (4, true));
    /// assert!(producer.write(0, 9u32).is_err()); // sealed: writes are refused
    /// ```
    pub fn open_wait(name: &str, timeout: std::time::Duration) -> Result<Buffer> {
        Ok(Buffer::adopt(
            crate::shm::open_wait(name, true, timeout)?,
            false,
        ))
    }

    /// Seals this shared buffer: the segment is immutable from now on. Later opens (any
    /// process) map it read-only and this buffer refuses writes ([`Buffer::readonly`] turns
    /// true); leases taken before keep their writable mapping (nothing is re-protected under
    /// them). Idempotent. See [`Registry::seal`] for the errors.
    pub fn seal(&self) -> Result<()> {
        self.owner.reg.seal(self.id())
    }

    /// True when the segment is sealed, by this buffer or any process (asks the kernel unless
    /// this buffer already knows). Always false for private and file buffers.
    pub fn sealed(&self) -> bool {
        self.lease.mapped().is_sealed()
    }

    /// A new file-backed buffer of `len` zero bytes at `path`, which must not exist (mode
    /// 0600; links are not followed).
    ///
    /// ```
    /// let path = std::env::temp_dir().join(format!("rustface-doc-{}.zcbuf", std::process::id()));
    /// let b = zcbuf::Buffer::create_file(&path, 100).unwrap();
    /// assert_eq!(b.path(), Some(path.as_path()));
    /// drop(b);
    /// std::fs::remove_file(&path).unwrap();
    /// ```
    pub fn create_file(path: impl AsRef<Path>, len: usize) -> Result<Buffer> {
        Buffer::create_file_with(path, len, &CreateOptions::new())
    }

    /// [`Buffer::create_file`] with options.
    pub fn create_file_with(
        path: impl AsRef<Path>,
        len: usize,
        opts: &CreateOptions,
    ) -> Result<Buffer> {
        Ok(Buffer::adopt(
            crate::file::create(path.as_ref(), len, opts)?,
            false,
        ))
    }

    /// A new file-backed zero-filled array of `T` with `shape` (Python's `zcbuf.open_file`
    /// gives it back typed).
    ///
    /// ```
    /// use zcbuf::Buffer;
    /// let path = std::env::temp_dir().join(format!("rustface-doc-t-{}.zcbuf", std::process::id()));
    /// let mut b = Buffer::create_file_typed::<f64>(&path, &[3]).unwrap();
    /// b.write(2, 2.5f64).unwrap();
    /// b.free().unwrap(); // flushed; free reports a flush error, drop would not
    /// let again = Buffer::open_file(&path, true).unwrap();
    /// assert_eq!(again.read::<f64>(2).unwrap(), 2.5);
    /// std::fs::remove_file(&path).unwrap();
    /// ```
    pub fn create_file_typed<T: Pod>(path: impl AsRef<Path>, shape: &[u64]) -> Result<Buffer> {
        let meta = Meta::of::<T>(shape)?;
        Buffer::create_file_with(path, len_of(&meta)?, &CreateOptions::new().meta(meta))
    }

    /// Opens a file made by zcbuf (by any process or language), validating its header.
    pub fn open_file(path: impl AsRef<Path>, readonly: bool) -> Result<Buffer> {
        Ok(Buffer::adopt(
            crate::file::open(path.as_ref(), readonly)?,
            false,
        ))
    }

    /// Takes ownership of a live id of [`Registry::global`] made elsewhere (by C, Python, or
    /// [`Buffer::into_id`]): the returned `Buffer` frees it when dropped. Others may still hold
    /// leases on it, so even a private buffer adopted this way lends no slices.
    ///
    /// ```
    /// use zcbuf::{Buffer, CreateOptions, Registry};
    /// let id = Registry::global().create(16, &CreateOptions::new()).unwrap();
    /// let b = Buffer::from_id(id).unwrap();
    /// assert_eq!(b.id(), id);
    /// assert!(b.as_slice::<u8>().is_err());
    /// drop(b);
    /// assert!(Registry::global().info(id).is_err()); // freed
    /// ```
    pub fn from_id(id: u64) -> Result<Buffer> {
        let reg = Registry::global();
        let lease = reg.lease_owned(id)?;
        Ok(Buffer {
            owner: IdOwner {
                reg,
                id,
                armed: true,
            },
            lease,
            exclusive: false,
        })
    }

    /// The id in [`Registry::global`] (what C's `zcbuf_*` calls and Python's `zcbuf.get` take).
    pub fn id(&self) -> u64 {
        self.owner.id
    }
    /// Data length in bytes.
    pub fn len(&self) -> usize {
        self.lease.len()
    }
    /// True for a zero-length buffer.
    pub fn is_empty(&self) -> bool {
        self.lease.is_empty()
    }
    /// The backing.
    pub fn kind(&self) -> Kind {
        self.lease.kind()
    }
    /// True when mapped read-only.
    pub fn readonly(&self) -> bool {
        self.lease.readonly()
    }
    /// The segment name (shared buffers).
    pub fn name(&self) -> Option<&str> {
        self.lease.name()
    }
    /// The file path (file buffers).
    pub fn path(&self) -> Option<&Path> {
        self.lease.path()
    }
    /// The dtype and shape stored with the buffer (untyped: empty dtype).
    pub fn meta(&self) -> &Meta {
        self.lease.meta()
    }
    /// Everything the registry knows about the buffer (leases held, persistence, ...).
    pub fn info(&self) -> Result<Info> {
        self.owner.reg.info(self.id())
    }
    /// The data address, valid for [`Buffer::len`] bytes while the buffer or a lease lives.
    /// Never make a reference from it to memory another party may write (see [`Buffer::view`]).
    pub fn as_ptr(&self) -> *mut u8 {
        self.lease.as_ptr()
    }

    fn raw(&self) -> Raw<'_> {
        Raw::of(&self.lease)
    }

    fn exclusive_or(&self, what: &str) -> Result<()> {
        if self.exclusive {
            return Ok(());
        }
        Err(Error::InvalidArgument(format!(
            "buffer id {} is {}: other processes or handles may write it, so it lends no {what}; \
             use read/write, copy_to_slice/copy_from_slice, or the unsafe view/view_mut",
            self.id(),
            match self.kind() {
                Kind::Private => "a private buffer this Buffer adopted or shared",
                Kind::Shared => "shared memory",
                Kind::File => "a memory-mapped file",
            }
        )))
    }

    /// The memory as `&[T]`: private buffers made by a `Buffer` only (nobody else can write
    /// them). Checked: length a multiple of `size_of::<T>()`, alignment, and for a typed buffer
    /// that `T` is its element type (or an array of it) or `u8`.
    ///
    /// ```
    /// let b = zcbuf::Buffer::new(8).unwrap();
    /// assert_eq!(b.as_slice::<u32>().unwrap(), &[0, 0]);
    /// let name = format!("rustface-doc-slice-{}", std::process::id());
    /// assert!(zcbuf::Buffer::shared(Some(&name), 8).unwrap().as_slice::<u8>().is_err());
    /// ```
    pub fn as_slice<T: Pod>(&self) -> Result<&[T]> {
        self.exclusive_or("&[T]")?;
        let n = self.raw().count::<T>()?;
        // SAFETY: the memory is `n * size_of::<T>()` bytes, mapped while `self` (its lease)
        // lives, aligned for `T` (checked by `count`), initialized (zero-filled at creation),
        // and every bit pattern is a valid `T`. The buffer is exclusive: the registry refuses
        // every other lease on it and no other process can map an anonymous private mapping, so
        // the only writes are through `&mut self` methods, which the borrow of `self` excludes
        // for the slice's lifetime.
        Ok(unsafe { std::slice::from_raw_parts(self.as_ptr().cast_const().cast::<T>(), n) })
    }

    /// The memory as `&mut [T]`: private buffers made by a `Buffer` only, checked as
    /// [`Buffer::as_slice`].
    ///
    /// ```
    /// let mut b = zcbuf::Buffer::new_typed::<i32>(&[3]).unwrap();
    /// b.as_mut_slice::<i32>().unwrap().copy_from_slice(&[-1, 0, 1]);
    /// assert_eq!(b.read::<i32>(0).unwrap(), -1);
    /// ```
    pub fn as_mut_slice<T: Pod>(&mut self) -> Result<&mut [T]> {
        self.exclusive_or("&mut [T]")?;
        let n = self.raw().count::<T>()?;
        // SAFETY: as in `as_slice` (private mappings are always writable), and `&mut self`
        // excludes every other access through this buffer while the slice lives.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.as_ptr().cast::<T>(), n) })
    }

    /// The memory of any buffer as `&[T]`, checked as [`Buffer::as_slice`].
    ///
    /// # Safety
    /// While the returned slice lives, nobody writes the bytes it covers: no other process, and
    /// in this process no other [`Buffer`], [`OwnedLease`], [`crate::Lease`], C or Python code
    /// on the same memory (for example, the writer has finished and said so through a pipe, and
    /// writes nothing until told). Breaking this is a data race: the compiler may assume the
    /// slice does not change.
    ///
    /// ```
    /// let name = format!("rustface-doc-view-{}", std::process::id());
    /// let mut b = zcbuf::Buffer::shared_typed::<u8>(Some(&name), &[3]).unwrap();
    /// b.copy_from_slice(0, &[7u8, 8, 9]).unwrap();
    /// // SAFETY: this test is the only user of this name, and no other handle on the segment
    /// // exists: nobody writes it while `s` lives.
    /// let s = unsafe { b.view::<u8>() }.unwrap();
    /// assert_eq!(s, &[7, 8, 9]);
    /// ```
    pub unsafe fn view<T: Pod>(&self) -> Result<&[T]> {
        let n = self.raw().count::<T>()?;
        // SAFETY: mapped while `self` lives, aligned and sized for `n` `T`s (checked), every bit
        // pattern valid; the caller promises no writes while the slice lives.
        Ok(unsafe { std::slice::from_raw_parts(self.as_ptr().cast_const().cast::<T>(), n) })
    }

    /// The memory of any writable buffer as `&mut [T]`, checked as [`Buffer::as_slice`].
    ///
    /// # Safety
    /// While the returned slice lives, nobody else reads or writes the bytes it covers: no
    /// other process, and in this process no other [`Buffer`], [`OwnedLease`],
    /// [`crate::Lease`], C or Python code on the same memory.
    pub unsafe fn view_mut<T: Pod>(&mut self) -> Result<&mut [T]> {
        let raw = self.raw();
        raw.writable()?;
        let n = raw.count::<T>()?;
        // SAFETY: mapped writable while `self` lives, aligned and sized for `n` `T`s; `&mut self`
        // excludes this buffer's other accesses, and the caller promises nobody else's.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.as_ptr().cast::<T>(), n) })
    }

    /// Element `i` of the memory seen as `T`s, read with a relaxed atomic load of each scalar:
    /// sound whoever writes meanwhile (a concurrent write shows as the old or the new scalar,
    /// never a torn one; an array `T` may mix scalars of both).
    ///
    /// ```
    /// let b = zcbuf::Buffer::new_typed::<f64>(&[10]).unwrap();
    /// assert_eq!(b.read::<f64>(9).unwrap(), 0.0);
    /// assert!(b.read::<f64>(10).is_err());
    /// ```
    pub fn read<T: Pod>(&self, i: usize) -> Result<T> {
        self.raw().read(i)
    }

    /// Writes element `i` with a relaxed atomic store of each scalar. Takes `&mut self` so that
    /// a private buffer's slices from [`Buffer::as_slice`] cannot see it change.
    ///
    /// ```
    /// let name = format!("rustface-doc-write-{}", std::process::id());
    /// let mut b = zcbuf::Buffer::shared_typed::<[u8; 3]>(Some(&name), &[2]).unwrap();
    /// b.write(1, [255u8, 0, 128]).unwrap();
    /// assert_eq!(b.read::<[u8; 3]>(1).unwrap(), [255, 0, 128]);
    /// assert_eq!(b.meta().shape, vec![2, 3]);
    /// ```
    pub fn write<T: Pod>(&mut self, i: usize, v: T) -> Result<()> {
        self.raw().write(i, v)
    }

    /// Copies elements `start..start + dst.len()` into `dst` (one `memcpy`; bytes another
    /// process writes meanwhile may arrive old or new, each element a valid `T`).
    ///
    /// ```
    /// let name = format!("rustface-doc-copy-{}", std::process::id());
    /// let mut b = zcbuf::Buffer::shared_typed::<i64>(Some(&name), &[4]).unwrap();
    /// b.copy_from_slice(1, &[5i64, 6]).unwrap();
    /// let mut out = [0i64; 4];
    /// b.copy_to_slice(0, &mut out).unwrap();
    /// assert_eq!(out, [0, 5, 6, 0]);
    /// ```
    pub fn copy_to_slice<T: Pod>(&self, start: usize, dst: &mut [T]) -> Result<()> {
        self.raw().copy_to_slice(start, dst)
    }

    /// Copies `src` into elements `start..start + src.len()` (one `memcpy`).
    pub fn copy_from_slice<T: Pod>(&mut self, start: usize, src: &[T]) -> Result<()> {
        self.raw().copy_from_slice(start, src)
    }

    /// A [`Send`] + [`Sync`] lease on the memory, which stays mapped while the lease lives, even
    /// after this buffer is dropped. Shared and file buffers only (or any buffer this `Buffer`
    /// does not hold exclusively): an exclusive private buffer lends slices, so use
    /// [`Buffer::into_lease`].
    ///
    /// ```
    /// let name = format!("rustface-doc-lease-{}", std::process::id());
    /// let b = zcbuf::Buffer::shared_typed::<u32>(Some(&name), &[1024]).unwrap();
    /// let lease = b.lease().unwrap();
    /// drop(b); // id freed; the lease keeps the pages (and the name) alive
    /// std::thread::spawn(move || lease.write(7, 42u32).unwrap()).join().unwrap();
    /// ```
    pub fn lease(&self) -> Result<OwnedLease> {
        if self.exclusive {
            return Err(Error::InvalidArgument(format!(
                "buffer id {} is a private buffer lending slices: a lease could write under \
                 them; use Buffer::into_lease() (it frees the id and keeps the memory)",
                self.id()
            )));
        }
        self.owner.reg.lease_owned(self.id())
    }

    /// Frees the id (as dropping does) and returns the lease this buffer held, so the memory
    /// stays mapped, for any kind of buffer.
    ///
    /// ```
    /// let mut b = zcbuf::Buffer::new_typed::<u8>(&[4]).unwrap();
    /// b.as_mut_slice::<u8>().unwrap()[0] = 9;
    /// let id = b.id();
    /// let lease = b.into_lease();
    /// assert!(zcbuf::Registry::global().acquire(id).is_err()); // freed
    /// assert_eq!(lease.read::<u8>(0).unwrap(), 9);             // still mapped
    /// ```
    pub fn into_lease(self) -> OwnedLease {
        let Buffer { owner, lease, .. } = self;
        drop(owner);
        lease
    }

    /// Gives the id up to C or Python without freeing it: the receiver frees it
    /// (`zcbuf_free`, `zcbuf.get(id).free()`). A private buffer stops being exclusive.
    ///
    /// ```
    /// let b = zcbuf::Buffer::new(16).unwrap();
    /// let id = b.into_id();
    /// let again = zcbuf::Buffer::from_id(id).unwrap(); // or zcbuf_acquire(id, ...) in C
    /// assert_eq!(again.len(), 16);
    /// ```
    pub fn into_id(self) -> u64 {
        let Buffer {
            mut owner, lease, ..
        } = self;
        owner.armed = false;
        owner.reg.share(owner.id);
        drop(lease);
        owner.id
    }

    /// Writes a file buffer's data to disk now (msync); a no-op for other backings.
    pub fn flush(&self) -> Result<()> {
        self.lease.mapped().flush()
    }

    /// Frees the id now, as dropping does, but reports a file buffer's flush error.
    pub fn free(self) -> Result<()> {
        let Buffer {
            mut owner, lease, ..
        } = self;
        owner.armed = false;
        let r = owner.reg.free(owner.id);
        drop(lease);
        r
    }
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffer")
            .field("id", &self.id())
            .field("kind", &self.kind())
            .field("len", &self.len())
            .field("readonly", &self.readonly())
            .field("name", &self.name())
            .field("path", &self.path().map(PathBuf::from))
            .field("meta", self.meta())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtypes_match_numpy_str() {
        let le = cfg!(target_endian = "little");
        assert_eq!(<i8 as Pod>::DTYPE, "|i1");
        assert_eq!(<u16 as Pod>::DTYPE, if le { "<u2" } else { ">u2" });
        assert_eq!(<f64 as Pod>::DTYPE, if le { "<f8" } else { ">f8" });
        let mut d = vec![];
        <[[u8; 4]; 2] as Pod>::push_dims(&mut d);
        assert_eq!(d, vec![2, 4]);
    }

    #[test]
    fn exclusive_private_buffers_refuse_other_leases() {
        let b = Buffer::new(8).unwrap();
        let reg = Registry::global();
        assert!(matches!(reg.acquire(b.id()), Err(Error::Permission(_))));
        assert!(matches!(reg.lease(b.id()), Err(Error::Permission(_))));
        assert!(matches!(reg.lease_owned(b.id()), Err(Error::Permission(_))));
        assert!(b.lease().is_err());
        let id = b.into_id();
        reg.acquire(id).unwrap();
        reg.release(id).unwrap();
        reg.free(id).unwrap();
    }
}
