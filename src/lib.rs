//! # zcbuf — zero-copy shared-memory buffers
//!
//! Big arrays handed between Rust, C and Python, and between processes, without copying them.
//!
//! ## The Rust face: [`Buffer`]
//!
//! A [`Buffer`] owns one buffer — private memory, named POSIX shared memory, or a memory-mapped
//! file — and frees it when dropped. Typed buffers store a NumPy dtype and shape ([`Pod`] element
//! types: `u8`..`u64`, `i8`..`i64`, `f32`, `f64`, arrays of them), so Python's
//! `zcbuf.open(name).asarray()` sees the same pages as a typed array. A private buffer lends
//! `&[T]` / `&mut [T]`; memory other processes may write (shared and file buffers) is read and
//! written element by element or copied, never lent as a reference except through `unsafe`
//! ([`Buffer::view`]). An [`OwnedLease`] is `Send + Sync` and keeps the memory mapped after the
//! `Buffer` is gone.
//!
//! ```
//! use zcbuf::Buffer;
//! let name = format!("rustface-crate-{}", std::process::id());
//! let mut frame = Buffer::shared_typed::<f32>(Some(&name), &[480, 640]).unwrap();
//! frame.write(0, 1.5f32).unwrap();
//!
//! // Any process of the same user (Rust, C, or Python's `zcbuf.open(name)`):
//! let seen = Buffer::open(&name, true).unwrap();
//! assert_eq!(seen.read::<f32>(0).unwrap(), 1.5);
//! assert_eq!(seen.meta().shape, vec![480, 640]);
//!
//! // Private memory lends slices under the usual borrow rules.
//! let mut scratch = Buffer::new_typed::<u32>(&[1024]).unwrap();
//! scratch.as_mut_slice::<u32>().unwrap().fill(7);
//! assert_eq!(scratch.as_slice::<u32>().unwrap().iter().sum::<u32>(), 7 * 1024);
//! ```
//!
//! [`Buffer::into_id`] hands a buffer to C (`include/zcbuf.h`) or Python (`zcbuf.get(id)`);
//! [`Buffer::from_id`] takes one back. `examples/rust_producer.rs` + `examples/python_consumer.py`
//! share a buffer between a Rust and a Python process, `examples/rust_pair.rs` between two Rust
//! processes.
//!
//! ## The registry underneath
//!
//! A registry hands out `u64` ids for buffers whose memory zcbuf owns and never moves:
//! anonymous mappings ([`Registry::create`]), named POSIX shared memory
//! ([`Registry::create_shared`] / [`Registry::open_shared`]) and memory-mapped files
//! ([`Registry::create_file`] / [`Registry::open_file`]). Whoever holds a pointer holds a
//! *lease* ([`Registry::acquire`] / [`Registry::release`], or the [`Lease`] and [`OwnedLease`]
//! guards); [`Registry::free`] retires an id at once but unmaps only after the last lease is
//! released.
//!
//! The same API is exported to C (see `include/zcbuf.h`, module `ffi`) and wrapped for Python
//! (`import zcbuf`).
//!
//! ```
//! use zcbuf::{CreateOptions, Meta, Registry};
//! let reg = Registry::global();
//! let meta = Meta::typed("<f4", 4, &[2, 2]).unwrap();
//! let id = reg.create(16, &CreateOptions::new().meta(meta.clone())).unwrap();
//! assert_eq!(reg.info(id).unwrap().meta, meta);
//! reg.free(id).unwrap();
//! ```

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]
#![cfg(target_os = "linux")]

mod buffer;
pub mod channel;
mod error;
pub mod ffi;
mod file;
pub mod gc;
pub mod header;
pub mod liveness;
mod mapping;
mod registry;
pub mod shm;

pub use buffer::{Buffer, Pod};
pub use error::{Error, Result};
pub use header::Meta;
pub use mapping::{CreateOptions, Kind};
pub use registry::{Info, Lease, OwnedLease, Registry};

/// The README's Rust code, run as a doctest so that it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
