//! # zcbuf — zero-copy shared-memory buffers
//!
//! A registry hands out `u64` ids for buffers whose memory zcbuf owns and never moves:
//! anonymous mappings ([`Registry::create`]), named POSIX shared memory
//! ([`Registry::create_shared`] / [`Registry::open_shared`]) and memory-mapped files
//! ([`Registry::create_file`] / [`Registry::open_file`]). Whoever holds a pointer holds a
//! *lease* ([`Registry::acquire`] / [`Registry::release`], or the [`Lease`] guard);
//! [`Registry::free`] retires an id at once but unmaps only after the last lease is released.
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

mod error;
pub mod ffi;
mod file;
pub mod gc;
pub mod header;
pub mod liveness;
mod mapping;
mod registry;
pub mod shm;

pub use error::{Error, Result};
pub use header::Meta;
pub use mapping::{CreateOptions, Kind};
pub use registry::{Info, Lease, Registry};
