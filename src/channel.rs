//! Channels: typed messages streamed between processes through the slots of one shared
//! segment, with a doorbell. See `docs/channels.md` for the design and every interleaving.
//!
//! A channel is a shared segment (made and held like any shared buffer, so its name lives while
//! any process maps it) whose data region holds a control block, a publication log, per-slot
//! words, a subscriber table and the slots:
//!
//! ```text
//! data region: | control (1 KiB) | log[N] | slot words[N] | subscribers[S] | pad | slot 0 | ... | slot N-1 |
//! ```
//!
//! * **One publisher** (the creator) fills a free slot in place (a *loan*) and publishes it:
//!   sequence number `s` goes to `log[s % N]`, then `head = s + 1`, then the doorbell rings if a
//!   subscriber sleeps. It holds an OFD write lock on [`PUB_BYTE`] of the segment's file for its
//!   life: subscribers learn that it died from that lock, kept by the kernel.
//! * **Subscribers** take an entry of the table (and the OFD write lock on its byte) and read
//!   messages at their position. A message is read in place: the subscriber sets its bit in the
//!   slot's `refs` words while any view of the message lives (a *pin*), so the publisher never
//!   reuses a slot that a live view shows. A dead subscriber's lock is gone: the publisher
//!   clears its bits and forgets its position.
//! * **Policies**: *block* — every subscriber sees every message; the publisher waits while the
//!   slowest is a whole ring behind. *latest* — the publisher never waits for positions; a
//!   subscriber that falls behind skips to the newest message and counts what it missed.
//!
//! All shared words are accessed through atomics on raw pointers into the mapping (never
//! references to shared memory); every index read from shared memory is bounds-checked before
//! use, and the layout is validated once at open and cached in process memory, so a corrupted
//! or hostile control block gives [`Error::Corrupt`], never an out-of-range access.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::header::Meta;
use crate::liveness::{self, NAME_BYTE};
use crate::mapping::{CreateOptions, Mapped, page_size};
use crate::shm;

/// The OFD lock byte of a channel's publisher.
pub const PUB_BYTE: i64 = NAME_BYTE + 16;
/// The OFD lock byte of subscriber table entry 0 (entry `i` is `SUB_BYTE + i`).
pub const SUB_BYTE: i64 = NAME_BYTE + 32;
/// Most slots a channel may have.
pub const MAX_SLOTS: u32 = 1 << 16;
/// Most subscribers a channel may be made for.
pub const MAX_SUBSCRIBERS: u32 = 1024;
/// Subscribers a channel is made for unless told otherwise.
pub const DEFAULT_SUBSCRIBERS: u32 = 64;
/// Most dimensions of a message.
pub const MAX_MSG_NDIM: usize = 16;
/// Most bytes of a message's dtype text.
pub const MSG_DTYPE_CAP: usize = 128;

const CTL_MAGIC: u64 = u64::from_le_bytes(*b"ZCBUFchn");
const CTL_VERSION: u32 = 1;
const CTL_LEN: usize = 1024;
const LOG_ENTRY: usize = 32;
const SUB_ENTRY: usize = 64;

// Control block fields (offsets in the data region). Written once by the publisher before
// `magic` (which is stored last, with Release), read once by each subscriber and validated.
const C_MAGIC: usize = 0;
const C_VERSION: usize = 8;
const C_POLICY: usize = 12;
const C_SLOTS: usize = 16;
const C_SUBS: usize = 20;
const C_NDIM: usize = 24;
const C_DTYPE_LEN: usize = 28;
const C_ITEMSIZE: usize = 32;
const C_MSG_LEN: usize = 40;
const C_STRIDE: usize = 48;
const C_LOG_OFF: usize = 56;
const C_WORDS_OFF: usize = 64;
const C_SUBS_OFF: usize = 72;
const C_SLOTS_OFF: usize = 80;
const C_TOTAL: usize = 88;
const C_PUB_PID: usize = 96;
const C_DTYPE: usize = 128;
const C_SHAPE: usize = 256;
// Live words, one cache line each.
/// Number of messages published (the next sequence number). Written by the publisher only.
const C_HEAD: usize = 512;
/// 0 while the publisher is open; 1 after it closed the stream. Written by the publisher only.
const C_CLOSED: usize = 576;
/// The subscribers' doorbell (a futex word): bumped by the publisher after publishing (or
/// closing) when `C_WAITERS` is nonzero.
const C_BELL: usize = 640;
/// How many subscribers are about to sleep or asleep on `C_BELL`.
const C_WAITERS: usize = 644;
/// The publisher's doorbell: bumped by a subscriber that advanced or unpinned while
/// `C_PUB_WAITING` is nonzero.
const C_SPACE_BELL: usize = 704;
/// Nonzero while the publisher is about to sleep or asleep on `C_SPACE_BELL`.
const C_PUB_WAITING: usize = 708;

// Subscriber entry fields.
/// `generation << 4 | state`: the entry's state, with a generation that makes every transition a
/// compare-and-swap no stale observer can repeat.
const S_STATE: usize = 0;
const S_PID: usize = 4;
/// The entry's position: the next sequence number it will read. Written by its owner only.
const S_POS: usize = 8;
/// Messages skipped under *latest* (informational, for `ls`).
const S_MISSED: usize = 16;

const ST_FREE: u32 = 0;
const ST_ACTIVE: u32 = 1;
/// Closed by its owner, whose views still pin slots: no longer counted for *block*.
const ST_DRAINING: u32 = 2;
/// Being cleared by someone who proved its owner dead.
const ST_RECLAIMING: u32 = 3;

/// How long an entry may stay `RECLAIMING` before its lock holder takes it over.
const RECLAIM_GRACE: Duration = Duration::from_millis(100);

/// `seq1` value of a slot a publisher has claimed for writing.
const WRITING: u64 = u64::MAX;

/// How long a waiter spins before sleeping on the doorbell.
const SPIN: Duration = Duration::from_micros(50);
/// The first part of [`SPIN`], spent without yielding the CPU.
const SPIN_HOT: Duration = Duration::from_micros(5);
/// Longest single sleep: liveness of the other side is checked at least this often.
const SLICE: Duration = Duration::from_millis(25);

/// When the publisher may reuse a slot, and what a slow subscriber sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Every subscriber sees every message; the publisher waits (with a timeout) while the
    /// slowest subscriber is a whole ring behind.
    Block,
    /// The publisher never waits for positions; a subscriber that is behind skips to the
    /// newest message and counts the ones it missed.
    Latest,
}

impl Policy {
    fn code(self) -> u32 {
        match self {
            Policy::Block => 0,
            Policy::Latest => 1,
        }
    }
    /// The policy of a C/Python code (0 block, 1 latest).
    pub fn from_code(c: u32) -> Result<Policy> {
        match c {
            0 => Ok(Policy::Block),
            1 => Ok(Policy::Latest),
            _ => Err(Error::InvalidArgument(format!(
                "policy {c} is neither 0 (block) nor 1 (latest)"
            ))),
        }
    }
}

/// The layout of one channel, validated, in process memory.
#[derive(Debug, Clone)]
struct Layout {
    policy: Policy,
    slots: usize,
    subs: usize,
    words: usize,
    msg_len: usize,
    stride: usize,
    log_off: usize,
    words_off: usize,
    words_stride: usize,
    subs_off: usize,
    slots_off: usize,
    total: usize,
    meta: Meta,
}

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

impl Layout {
    fn new(meta: Meta, slots: u32, subs: u32, policy: Policy) -> Result<Layout> {
        if !(1..=MAX_SLOTS).contains(&slots) {
            return Err(Error::InvalidArgument(format!(
                "a channel has 1 to {MAX_SLOTS} slots, not {slots}"
            )));
        }
        if policy == Policy::Latest && slots < 2 {
            return Err(Error::InvalidArgument(
                "a latest-policy channel needs at least 2 slots (one to read while the next is \
                 written)"
                    .into(),
            ));
        }
        if !(1..=MAX_SUBSCRIBERS).contains(&subs) {
            return Err(Error::InvalidArgument(format!(
                "a channel is made for 1 to {MAX_SUBSCRIBERS} subscribers, not {subs}"
            )));
        }
        if meta.dtype.len() > MSG_DTYPE_CAP || meta.shape.len() > MAX_MSG_NDIM {
            return Err(Error::InvalidArgument(format!(
                "a channel's message has a dtype of at most {MSG_DTYPE_CAP} bytes and at most \
                 {MAX_MSG_NDIM} dimensions"
            )));
        }
        let msg_len = meta
            .nbytes()
            .filter(|n| *n >= 1 && *n <= (isize::MAX as u64) / 4)
            .ok_or_else(|| {
                Error::InvalidArgument(
                    "a channel's message must be typed and between 1 byte and 2^61 bytes".into(),
                )
            })? as usize;
        let slots = slots as usize;
        let subs = subs as usize;
        let words = subs.div_ceil(64);
        let page = page_size();
        // Small messages share cache lines as little as they can; big ones start on pages.
        let stride = if msg_len >= page {
            round_up(msg_len, page)
        } else {
            round_up(msg_len, 64)
        };
        let log_off = CTL_LEN;
        let words_stride = round_up(8 + 8 * words, 64);
        let words_off = log_off + LOG_ENTRY * slots;
        let subs_off = words_off + words_stride * slots;
        let slots_off = round_up(subs_off + SUB_ENTRY * subs, page);
        let total = stride
            .checked_mul(slots)
            .and_then(|d| d.checked_add(slots_off))
            .filter(|t| *t <= isize::MAX as usize / 2)
            .ok_or_else(|| {
                Error::OutOfMemory(format!(
                    "{slots} slots of {msg_len} bytes do not fit in this address space"
                ))
            })?;
        Ok(Layout {
            policy,
            slots,
            subs,
            words,
            msg_len,
            stride,
            log_off,
            words_off,
            words_stride,
            subs_off,
            slots_off,
            total,
            meta,
        })
    }
}

/// One process's view of a channel segment: the mapping, its validated layout, and this
/// endpoint's own open file (its role lock lives on it).
struct Chan {
    /// Keeps the segment mapped (and held) while any endpoint, loan or message lives.
    mapped: Arc<Mapped>,
    base: NonNull<u8>,
    lay: Layout,
    /// This endpoint's own open file description of the segment: its OFD role lock.
    role: RoleFd,
    name: String,
    pid: u32,
    /// [`FORK_CHILD`] when this endpoint was made: another value means we are a fork child.
    child_gen: u64,
}

/// Bumped in every fork child (see `role_after_fork_child`).
static FORK_CHILD: AtomicU64 = AtomicU64::new(0);

// SAFETY: `Chan` is an `Arc<Mapped>` (owned by the registry type, never moved, unmapped only
// when the last reference goes), a base address into that mapping, plain layout data, and a
// descriptor. All shared words are accessed through atomics; slot bytes are handed out only as
// raw pointers. Nothing is tied to the thread that made it.
unsafe impl Send for Chan {}
// SAFETY: as above: every access through `&Chan` is an atomic operation on shared memory or a
// read of immutable process-local fields.
unsafe impl Sync for Chan {}

impl Chan {
    fn at(&self, off: usize) -> *mut u8 {
        debug_assert!(off < self.lay.total);
        // SAFETY: every caller passes an offset inside the validated layout (`total` bytes,
        // checked against the mapping's length at open), so the result stays in the mapping.
        unsafe { self.base.as_ptr().add(off) }
    }
    fn u64_at(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off % 8 == 0 && off + 8 <= self.lay.total);
        // SAFETY: `off` is 8-aligned and inside the mapping (layout offsets are multiples of 8
        // from a page-aligned base); the mapping lives as long as `self`. Other processes write
        // these words only atomically; an `AtomicU64` over shared memory is exactly that.
        unsafe { AtomicU64::from_ptr(self.at(off).cast()) }
    }
    fn u32_at(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off % 4 == 0 && off + 4 <= self.lay.total);
        // SAFETY: as for `u64_at`, with 4-byte alignment.
        unsafe { AtomicU32::from_ptr(self.at(off).cast()) }
    }
    fn head(&self) -> &AtomicU64 {
        self.u64_at(C_HEAD)
    }
    fn closed(&self) -> &AtomicU32 {
        self.u32_at(C_CLOSED)
    }
    fn log_seq(&self, i: usize) -> &AtomicU64 {
        self.u64_at(self.lay.log_off + LOG_ENTRY * i)
    }
    fn log_slot(&self, i: usize) -> &AtomicU32 {
        self.u32_at(self.lay.log_off + LOG_ENTRY * i + 8)
    }
    fn log_ts(&self, i: usize) -> &AtomicU64 {
        self.u64_at(self.lay.log_off + LOG_ENTRY * i + 16)
    }
    /// `seq + 1` of the message slot `k` holds; 0 when empty; [`WRITING`] while claimed.
    fn slot_seq(&self, k: usize) -> &AtomicU64 {
        self.u64_at(self.lay.words_off + self.lay.words_stride * k)
    }
    /// Word `w` of slot `k`'s pin bits (bit `i % 64` of word `i / 64`: subscriber `i`).
    fn slot_refs(&self, k: usize, w: usize) -> &AtomicU64 {
        self.u64_at(self.lay.words_off + self.lay.words_stride * k + 8 + 8 * w)
    }
    fn pinned(&self, k: usize) -> bool {
        (0..self.lay.words).any(|w| self.slot_refs(k, w).load(Ordering::SeqCst) != 0)
    }
    fn sub_state(&self, i: usize) -> &AtomicU32 {
        self.u32_at(self.lay.subs_off + SUB_ENTRY * i + S_STATE)
    }
    fn sub_pid(&self, i: usize) -> &AtomicU32 {
        self.u32_at(self.lay.subs_off + SUB_ENTRY * i + S_PID)
    }
    fn sub_pos(&self, i: usize) -> &AtomicU64 {
        self.u64_at(self.lay.subs_off + SUB_ENTRY * i + S_POS)
    }
    fn sub_missed(&self, i: usize) -> &AtomicU64 {
        self.u64_at(self.lay.subs_off + SUB_ENTRY * i + S_MISSED)
    }
    fn slot_ptr(&self, k: usize) -> NonNull<u8> {
        let p = self.at(self.lay.slots_off + self.lay.stride * k);
        NonNull::new(p).expect("inside a mapping")
    }
    fn check_pid(&self) -> Result<()> {
        // A fork child bumps FORK_CHILD (in its atfork handler): one load, not a getpid call.
        if FORK_CHILD.load(Ordering::Relaxed) != self.child_gen {
            return Err(Error::InvalidArgument(format!(
                "channel {:?}: this endpoint was made by process {} before a fork; a forked \
                 child cannot use it: publish or subscribe anew in the child",
                self.name, self.pid
            )));
        }
        Ok(())
    }

    /// Rings a doorbell: bumps the word and wakes every sleeper on it.
    fn ring(&self, bell: usize) {
        let w = self.u32_at(bell);
        w.fetch_add(1, Ordering::SeqCst);
        // SAFETY: FUTEX_WAKE (shared: the word lives in a MAP_SHARED mapping other processes
        // wait on) only reads the address to find its waiters; `w` is a live, aligned u32 in
        // the mapping. The result (how many woke, or an error) needs no handling.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                w.as_ptr(),
                libc::FUTEX_WAKE,
                i32::MAX,
                std::ptr::null::<libc::timespec>(),
            )
        };
    }

    /// Sleeps on the doorbell at `bell` while it still reads `seen`, for at most `d`.
    fn sleep(&self, bell: usize, seen: u32, d: Duration) {
        let ts = libc::timespec {
            tv_sec: d.as_secs() as libc::time_t,
            tv_nsec: d.subsec_nanos() as libc::c_long,
        };
        // SAFETY: FUTEX_WAIT (shared) compares the live, aligned u32 at the address with `seen`
        // and sleeps at most `ts` (relative); `ts` outlives the call. EAGAIN (the word changed),
        // ETIMEDOUT and EINTR all mean: look again, so the result is not needed.
        // (A direct system call rather than rustix's: rustix's futex feature reads the aux
        // vector through prctl(PR_GET_AUXV), which valgrind does not emulate.)
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                self.u32_at(bell).as_ptr(),
                libc::FUTEX_WAIT,
                seen,
                &ts as *const libc::timespec,
            )
        };
    }

    /// Whether the publisher (some process holding [`PUB_BYTE`]) is alive.
    fn publisher_alive(&self) -> Result<bool> {
        liveness::ofd_locked_by_other(self.role.as_fd(), PUB_BYTE)
    }
}

/// Spins until `ready()` or `d` has passed: a few microseconds on the CPU, then yielding it
/// between looks, so that a publisher the scheduler put on this same CPU gets to run (a pure
/// spin would keep it off the CPU for all of `d`).
fn spin_until(d: Duration, ready: impl Fn() -> bool) {
    let start = Instant::now();
    let mut i = 0u32;
    while !ready() {
        i = i.wrapping_add(1);
        if i % 64 == 0 {
            let e = start.elapsed();
            if e >= d {
                return;
            }
            if e >= SPIN_HOT {
                std::thread::yield_now();
                continue;
            }
        }
        std::hint::spin_loop();
    }
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn closed_error(name: &str, died: bool) -> Error {
    Error::Closed(if died {
        format!("channel {name:?}: the publisher died (every message it sent has been received)")
    } else {
        format!("channel {name:?}: end of stream (the publisher closed it)")
    })
}

fn timeout_error(what: &str, name: &str, d: Duration) -> Error {
    Error::Timeout(format!(
        "channel {name:?}: {what} for {:.3} s, the timeout",
        d.as_secs_f64()
    ))
}

// ---------------------------------------------------------------------------------------------
// role descriptors across fork

static ROLE_FDS: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());

thread_local! {
    static FORK_GUARD: std::cell::RefCell<Option<std::sync::MutexGuard<'static, Vec<RawFd>>>> =
        const { std::cell::RefCell::new(None) };
}

extern "C" fn role_before_fork() {
    let g = ROLE_FDS.lock().unwrap_or_else(|p| p.into_inner());
    let _ = FORK_GUARD.try_with(|s| {
        if let Ok(mut s) = s.try_borrow_mut() {
            *s = Some(g);
        }
    });
}

extern "C" fn role_after_fork_parent() {
    let _ = FORK_GUARD.try_with(|s| {
        if let Ok(mut s) = s.try_borrow_mut() {
            *s = None;
        }
    });
}

/// In a fork child: the role descriptors it inherited share their open files (and so their
/// locks) with the parent; if the child kept them, a dead parent would look alive to the other
/// side for as long as the child lives. Each is replaced by /dev/null (the endpoint objects the
/// child inherited then refuse to work: see `Chan::check_pid`).
extern "C" fn role_after_fork_child() {
    FORK_CHILD.fetch_add(1, Ordering::Relaxed);
    let _ = FORK_GUARD.try_with(|s| {
        if let Ok(mut s) = s.try_borrow_mut() {
            if let Some(g) = s.as_mut() {
                for &fd in g.iter() {
                    // SAFETY: open/dup3/close are async-signal-safe; `fd` is a descriptor this
                    // process inherited (registered while open, removed before it is closed),
                    // and dup3 atomically makes that number refer to /dev/null instead, so the
                    // owner's later close closes /dev/null, never an unrelated descriptor.
                    unsafe {
                        let nul =
                            libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                        if nul >= 0 {
                            libc::dup3(nul, fd, libc::O_CLOEXEC);
                            libc::close(nul);
                        }
                    }
                }
                g.clear();
            }
            *s = None;
        }
    });
}

fn register_role(fd: RawFd) {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // SAFETY: plain functions living as long as the library; they lock/unlock a mutex and
        // (in the child) replace descriptors, and never unwind.
        unsafe {
            libc::pthread_atfork(
                Some(role_before_fork),
                Some(role_after_fork_parent),
                Some(role_after_fork_child),
            )
        };
    });
    ROLE_FDS.lock().unwrap_or_else(|p| p.into_inner()).push(fd);
}

fn unregister_role(fd: RawFd) {
    ROLE_FDS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|&f| f != fd);
}

/// An endpoint's own open file description of its segment (its role lock lives on it),
/// registered for the fork handlers while it is open.
struct RoleFd(OwnedFd);

impl RoleFd {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl Drop for RoleFd {
    /// Policy: unregistered first, then closed (which drops its locks): the fork handler never
    /// sees a descriptor number that may already name another file.
    fn drop(&mut self) {
        unregister_role(self.0.as_raw_fd());
    }
}

/// A fresh open file description of the segment `mapped` maps (for this endpoint's role lock).
fn role_file(mapped: &Mapped, name: &str) -> Result<RoleFd> {
    let hold = mapped
        .hold()
        .ok_or_else(|| Error::Internal("a channel segment without a hold".into()))?;
    let path = format!("/proc/self/fd/{}", hold.fd().as_raw_fd());
    let fd = rustix::fs::open(
        path.as_str(),
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| shm::open_error(&format!("open channel {name:?} again for its role lock"), e))?;
    register_role(fd.as_raw_fd());
    Ok(RoleFd(fd))
}

// ---------------------------------------------------------------------------------------------
// publishing

/// The publishing end of a channel: creates it, loans slots, publishes them.
///
/// **Drop policy:** closes the stream (subscribers drain what was sent, then see end of
/// stream) and releases the publisher role; the segment stays mapped while loans or other
/// endpoints of this process use it.
pub struct Publisher {
    ch: Arc<Chan>,
    /// The slowest active subscriber's position when last computed (positions only grow, so
    /// it stays a lower bound: using it is conservative); recomputed when it is in the way.
    min_cache: Option<u64>,
    /// Next slot to consider (round robin from the oldest).
    next: usize,
    /// Slots loaned and not yet sent or cancelled.
    loaned: Vec<bool>,
    /// Set by [`Publisher::close`] or a [`PubCloser`] (from any thread, even while this
    /// publisher waits in `loan`).
    closed: Arc<std::sync::atomic::AtomicBool>,
}

/// Ends a publisher's stream from another thread, without waiting for a call in progress on it
/// (a `loan` waiting for a free slot returns [`Error::Closed`] within a wait slice).
#[derive(Clone)]
pub struct PubCloser {
    ch: Arc<Chan>,
    closed: Arc<std::sync::atomic::AtomicBool>,
}

impl PubCloser {
    /// Ends the stream (idempotent): subscribers receive what was sent, then end of stream.
    pub fn close(&self) {
        if self.ch.check_pid().is_err() || self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        self.ch.closed().store(1, Ordering::SeqCst);
        self.ch.ring(C_BELL);
        self.ch.ring(C_SPACE_BELL); // our own loan, if it waits
    }
}

/// A slot loaned by [`Publisher::loan`], to fill in place and [`Publisher::send`].
#[derive(Debug)]
pub struct Loan {
    slot: usize,
    ptr: NonNull<u8>,
    len: usize,
}

impl Loan {
    /// The slot index (for [`Publisher::send`] / [`Publisher::cancel`] through the C ABI).
    pub fn slot(&self) -> usize {
        self.slot
    }
    /// The slot's address: writable for [`Loan::len`] bytes until the loan is sent or cancelled.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    /// The message length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Never true (messages have at least one byte).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Publisher {
    /// Creates a channel named `name` (generated when `None`) for messages of `meta`'s dtype and
    /// shape, with `slots` slots, made for up to `max_subscribers` subscribers.
    pub fn create(
        name: Option<&str>,
        meta: Meta,
        slots: u32,
        policy: Policy,
        max_subscribers: u32,
    ) -> Result<Publisher> {
        let lay = Layout::new(meta, slots, max_subscribers, policy)?;
        let mapped = match shm::create(name, lay.total, &CreateOptions::new()) {
            // A restarted producer: the name is still held by the subscribers of the channel
            // its previous run left (they keep their mappings until they notice the end).
            Err(Error::AlreadyExists(m)) => match name {
                Some(n) if replace_dead_channel(n)? => {
                    shm::create(Some(n), lay.total, &CreateOptions::new())?
                }
                Some(n) if is_live_channel(n) => {
                    return Err(Error::AlreadyExists(format!(
                        "channel {n:?} already has a live publisher (a channel has one):                          subscribe to it, or publish under another name"
                    )));
                }
                _ => return Err(Error::AlreadyExists(m)),
            },
            r => r?,
        };
        let name = mapped.name().unwrap_or_default().to_owned();
        let base = mapped.data_ptr();
        let role = role_file(&mapped, &name)?;
        if !liveness::ofd_lock(role.as_fd(), PUB_BYTE, libc::F_WRLCK as i16)? {
            return Err(Error::AlreadyExists(format!(
                "channel {name:?} already has a publisher"
            )));
        }
        let ch = Chan {
            mapped: Arc::new(mapped),
            base,
            lay,
            role,
            name,
            pid: std::process::id(),
            child_gen: FORK_CHILD.load(Ordering::Relaxed),
        };
        init_control(&ch);
        let n = ch.lay.slots;
        Ok(Publisher {
            ch: Arc::new(ch),
            min_cache: None,
            next: 0,
            loaned: vec![false; n],
            closed: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        })
    }

    /// The channel's name (what subscribers pass to [`Subscriber::open`]).
    pub fn name(&self) -> &str {
        &self.ch.name
    }
    /// The message dtype and shape.
    pub fn meta(&self) -> &Meta {
        &self.ch.lay.meta
    }
    /// Bytes per message.
    pub fn msg_len(&self) -> usize {
        self.ch.lay.msg_len
    }
    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.ch.lay.slots
    }
    /// The policy chosen at creation.
    pub fn policy(&self) -> Policy {
        self.ch.lay.policy
    }
    /// Subscribers receiving now (entries in use and not closed).
    pub fn subscribers(&self) -> usize {
        (0..self.ch.lay.subs)
            .filter(|&i| self.ch.sub_state(i).load(Ordering::SeqCst) & 0xf == ST_ACTIVE)
            .count()
    }

    /// Messages published so far.
    pub fn published(&self) -> u64 {
        self.ch.head().load(Ordering::Relaxed)
    }

    /// A handle that ends this publisher's stream from any thread.
    pub fn closer(&self) -> PubCloser {
        PubCloser {
            ch: Arc::clone(&self.ch),
            closed: Arc::clone(&self.closed),
        }
    }

    fn check_open(&self) -> Result<()> {
        self.ch.check_pid()?;
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed(format!(
                "channel {:?}: this publisher was closed",
                self.ch.name
            )));
        }
        Ok(())
    }

    /// The lowest position of the subscribers that count for *block* (active ones), reclaiming
    /// dead ones on the way when `reclaim`.
    fn min_position(&self, reclaim: bool) -> Result<Option<u64>> {
        let ch = &self.ch;
        let mut min: Option<u64> = None;
        for i in 0..ch.lay.subs {
            let st = ch.sub_state(i).load(Ordering::SeqCst);
            if st & 0xf == ST_FREE {
                continue;
            }
            if reclaim && st & 0xf != ST_RECLAIMING && !sub_alive(ch, i)? {
                reclaim_entry(ch, i, st);
                continue;
            }
            if st & 0xf == ST_ACTIVE {
                let p = ch.sub_pos(i).load(Ordering::SeqCst);
                min = Some(min.map_or(p, |m: u64| m.min(p)));
            }
        }
        Ok(min)
    }

    /// Loans a free slot to fill in place, waiting up to `timeout` (`None`: forever) when none
    /// is free: under *block* while the slowest subscriber is a whole ring behind, under either
    /// policy while live views pin every slot.
    pub fn loan(&mut self, timeout: Option<Duration>) -> Result<Loan> {
        self.check_open()?;
        let start = Instant::now();
        let mut reclaim = false;
        let mut last_reclaim = Instant::now();
        loop {
            self.check_open()?;
            if let Some(k) = self.try_claim(reclaim)? {
                self.loaned[k] = true;
                return Ok(Loan {
                    slot: k,
                    ptr: self.ch.slot_ptr(k),
                    len: self.ch.lay.msg_len,
                });
            }
            reclaim = false;
            // Nothing free: wait for a subscriber to advance or unpin, looking for dead ones at
            // least every SLICE.
            let waited = start.elapsed();
            if let Some(t) = timeout {
                if waited >= t {
                    let why = if self.ch.lay.policy == Policy::Block {
                        "no slot came free (the slowest subscriber is a whole ring behind, or \
                         views of received messages pin every slot)"
                    } else {
                        "no slot came free (views of received messages pin every slot)"
                    };
                    return Err(timeout_error(why, &self.ch.name, t));
                }
            }
            let ch = Arc::clone(&self.ch);
            let pw = ch.u32_at(C_PUB_WAITING);
            pw.store(1, Ordering::SeqCst);
            let seen = ch.u32_at(C_SPACE_BELL).load(Ordering::SeqCst);
            if let Some(k) = self.try_claim(false)? {
                pw.store(0, Ordering::SeqCst);
                self.loaned[k] = true;
                return Ok(Loan {
                    slot: k,
                    ptr: self.ch.slot_ptr(k),
                    len: self.ch.lay.msg_len,
                });
            }
            let mut d = SLICE;
            if let Some(t) = timeout {
                d = d.min(t.saturating_sub(start.elapsed()));
            }
            if !d.is_zero() {
                ch.sleep(C_SPACE_BELL, seen, d);
            }
            pw.store(0, Ordering::SeqCst);
            if last_reclaim.elapsed() >= SLICE {
                reclaim = true;
                last_reclaim = Instant::now();
            }
        }
    }

    /// One pass over the slots: claims a free one, or `None` (after looking at the subscribers'
    /// positions afresh when the cached ones were in the way).
    fn try_claim(&mut self, reclaim: bool) -> Result<Option<usize>> {
        match self.try_claim_with(reclaim, false)? {
            Some(k) => Ok(Some(k)),
            None if self.ch.lay.policy == Policy::Block => self.try_claim_with(reclaim, true),
            None => Ok(None),
        }
    }

    fn try_claim_with(&mut self, reclaim: bool, fresh: bool) -> Result<Option<usize>> {
        let ch = &self.ch;
        let n = ch.lay.slots;
        let head = ch.head().load(Ordering::Relaxed);
        let min = match ch.lay.policy {
            Policy::Block => {
                let m = match self.min_cache {
                    Some(m) if !fresh && !reclaim && head < m.saturating_add(n as u64) => Some(m),
                    _ => {
                        let m = self.min_position(reclaim)?;
                        self.min_cache = m;
                        m
                    }
                };
                if let Some(m) = m {
                    // Publishing `head` overwrites log entry `head - n`: every active
                    // subscriber must be past it.
                    if head >= m.saturating_add(n as u64) {
                        return Ok(None);
                    }
                }
                m
            }
            Policy::Latest => {
                if reclaim {
                    self.min_position(true)?;
                }
                None
            }
        };
        for j in 0..n {
            let k = (self.next + j) % n;
            if self.loaned[k] {
                continue;
            }
            let s1 = ch.slot_seq(k).load(Ordering::SeqCst);
            if s1 == WRITING {
                continue; // a loan of a publisher that died (not ours): forget it below
            }
            // Under block, a message is free once every active subscriber is past it.
            if let (Some(m), true) = (min, s1 != 0) {
                if s1 > m {
                    continue;
                }
            }
            if ch.pinned(k) {
                continue;
            }
            if ch.lay.policy == Policy::Latest {
                // Claim, then look for pins again: a subscriber pins (SeqCst) before it checks
                // the slot's sequence (SeqCst); we mark (SeqCst) before we check the pins, so
                // at least one of us sees the other and backs off (docs/channels.md).
                ch.slot_seq(k).store(WRITING, Ordering::SeqCst);
                if ch.pinned(k) {
                    ch.slot_seq(k).store(s1, Ordering::SeqCst);
                    continue;
                }
            } else {
                // Under block no subscriber starts reading a consumed message, and a pin is
                // set before the position that makes a message consumed moves (both SeqCst):
                // the check above saw it. The mark is for our bookkeeping only.
                ch.slot_seq(k).store(WRITING, Ordering::Relaxed);
            }
            self.next = (k + 1) % n;
            return Ok(Some(k));
        }
        Ok(None)
    }

    /// Publishes loaned slot `slot` as the next message; returns its sequence number.
    pub fn send(&mut self, slot: usize) -> Result<u64> {
        self.check_open()?;
        if slot >= self.loaned.len() || !self.loaned[slot] {
            return Err(Error::InvalidArgument(format!(
                "slot {slot} is not loaned by this publisher"
            )));
        }
        self.loaned[slot] = false;
        let ch = &self.ch;
        let s = ch.head().load(Ordering::Relaxed);
        if s == u64::MAX {
            return Err(Error::Corrupt(format!(
                "channel {:?}: its head word is at its maximum (damaged)",
                ch.name
            )));
        }
        let i = (s % ch.lay.slots as u64) as usize;
        ch.slot_seq(slot).store(s + 1, Ordering::Release);
        ch.log_slot(i).store(slot as u32, Ordering::Relaxed);
        ch.log_ts(i).store(now_ns(), Ordering::Relaxed);
        ch.log_seq(i).store(s + 1, Ordering::Release);
        ch.head().store(s + 1, Ordering::SeqCst);
        if ch.u32_at(C_WAITERS).load(Ordering::SeqCst) != 0 {
            ch.ring(C_BELL);
        }
        Ok(s)
    }

    /// Gives a loaned slot back unsent (its previous message is gone).
    pub fn cancel(&mut self, slot: usize) -> Result<()> {
        self.ch.check_pid()?;
        if slot >= self.loaned.len() || !self.loaned[slot] {
            return Err(Error::InvalidArgument(format!(
                "slot {slot} is not loaned by this publisher"
            )));
        }
        self.loaned[slot] = false;
        self.ch.slot_seq(slot).store(0, Ordering::SeqCst);
        Ok(())
    }

    /// Copies `data` (exactly one message's bytes) into a free slot and publishes it.
    pub fn send_copy(&mut self, data: &[u8], timeout: Option<Duration>) -> Result<u64> {
        if data.len() != self.ch.lay.msg_len {
            return Err(Error::InvalidArgument(format!(
                "a message of channel {:?} is {} bytes ({} {:?}), not {}",
                self.ch.name,
                self.ch.lay.msg_len,
                self.ch.lay.meta.dtype,
                self.ch.lay.meta.shape,
                data.len()
            )));
        }
        let loan = self.loan(timeout)?;
        // SAFETY: the loan gives exclusive use of `len` writable bytes at `ptr` (claimed: no
        // subscriber reads it until it is published, and no other loan has it); `data` is a
        // Rust slice of the same length elsewhere in memory.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), loan.as_ptr(), data.len()) };
        self.send(loan.slot)
    }

    /// Ends the stream: subscribers receive what was sent, then end of stream. Idempotent.
    pub fn close(&mut self) -> Result<()> {
        self.closer().close();
        Ok(())
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

fn init_control(ch: &Chan) {
    let lay = &ch.lay;
    let put64 = |off: usize, v: u64| ch.u64_at(off).store(v, Ordering::Relaxed);
    let put32 = |off: usize, v: u32| ch.u32_at(off).store(v, Ordering::Relaxed);
    put32(C_VERSION, CTL_VERSION);
    put32(C_POLICY, lay.policy.code());
    put32(C_SLOTS, lay.slots as u32);
    put32(C_SUBS, lay.subs as u32);
    put32(C_NDIM, lay.meta.shape.len() as u32);
    put32(C_DTYPE_LEN, lay.meta.dtype.len() as u32);
    put64(C_ITEMSIZE, lay.meta.itemsize);
    put64(C_MSG_LEN, lay.msg_len as u64);
    put64(C_STRIDE, lay.stride as u64);
    put64(C_LOG_OFF, lay.log_off as u64);
    put64(C_WORDS_OFF, lay.words_off as u64);
    put64(C_SUBS_OFF, lay.subs_off as u64);
    put64(C_SLOTS_OFF, lay.slots_off as u64);
    put64(C_TOTAL, lay.total as u64);
    put32(C_PUB_PID, std::process::id());
    // SAFETY: the dtype text fits in its field (checked by Layout::new: at most MSG_DTYPE_CAP
    // bytes at C_DTYPE, below C_SHAPE); nobody reads it before `magic` is published below.
    unsafe {
        std::ptr::copy_nonoverlapping(
            lay.meta.dtype.as_ptr(),
            ch.at(C_DTYPE),
            lay.meta.dtype.len(),
        )
    };
    for (i, d) in lay.meta.shape.iter().enumerate() {
        put64(C_SHAPE + 8 * i, *d);
    }
    // Everything above happens-before a subscriber's Acquire load of the magic.
    ch.u64_at(C_MAGIC).store(CTL_MAGIC, Ordering::Release);
}

// ---------------------------------------------------------------------------------------------
// subscribing

fn sub_alive(ch: &Chan, i: usize) -> Result<bool> {
    liveness::ofd_locked_by_other(ch.role.as_fd(), SUB_BYTE + i as i64)
}

/// Clears entry `i`, whose owner was proven dead (its lock is free), if it is still in state
/// `seen`: its pins go, its position stops counting.
fn reclaim_entry(ch: &Chan, i: usize, seen: u32) {
    let generation = (seen >> 4).wrapping_add(1);
    if ch
        .sub_state(i)
        .compare_exchange(
            seen,
            generation << 4 | ST_RECLAIMING,
            Ordering::SeqCst,
            Ordering::SeqCst,
        )
        .is_err()
    {
        return; // its owner (or a new claimer) moved it on
    }
    let (w, bit) = (i / 64, 1u64 << (i % 64));
    for k in 0..ch.lay.slots {
        ch.slot_refs(k, w).fetch_and(!bit, Ordering::SeqCst);
    }
    ch.sub_state(i)
        .store(generation << 4 | ST_FREE, Ordering::SeqCst);
}

struct SubInner {
    ch: Arc<Chan>,
    idx: usize,
    /// Views alive per slot; the slot's pin bit is set while its count is nonzero. Transitions
    /// 0 <-> 1 happen under this lock, so the bit never disagrees with the count.
    held: Mutex<Vec<u32>>,
    /// *block* only: `seq + 1` of the last message received while it is *soft-pinned* — held
    /// by our shared position not moving past it, without touching the slot's pin word — or 0.
    /// Exactly one of the message's drop and the next `recv` (which *hardens* it with a real
    /// pin when it is still alive) wins the compare-and-swap that clears it.
    soft: AtomicU64,
    /// The slot of the soft-pinned message.
    soft_slot: AtomicU32,
    /// The subscriber's own position (its next message), mirrored for [`Waiter`]s made from
    /// other threads.
    local_pos: AtomicU64,
}

impl SubInner {
    /// Moves our shared position forward to `to` (never back: two threads may race here).
    fn advance(&self, to: u64) {
        self.ch.sub_pos(self.idx).fetch_max(to, Ordering::SeqCst);
        if self.ch.u32_at(C_PUB_WAITING).load(Ordering::SeqCst) != 0 {
            self.ch.ring(C_SPACE_BELL);
        }
    }

    /// Turns the soft pin of a message still alive into a real pin, so our position can move
    /// on; a message dropped meanwhile has advanced the position itself.
    fn harden(&self) {
        let prev = self.soft.load(Ordering::SeqCst);
        if prev == 0 {
            return;
        }
        let k = self.soft_slot.load(Ordering::Relaxed) as usize;
        self.pin(k);
        if self
            .soft
            .compare_exchange(prev, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.advance(prev);
        } else {
            self.unpin(k);
        }
    }

    /// Whether our entry still counts (not closed, not reclaimed).
    fn active(&self) -> bool {
        self.ch.sub_state(self.idx).load(Ordering::SeqCst) & 0xf == ST_ACTIVE
    }

    /// Stops counting for *block*: hardens a soft-pinned message, moves the entry to DRAINING,
    /// hardens again (a `recv` racing this one sets its soft pin, then looks at the state: one
    /// of the two sees the other), and wakes whoever waits: a `recv` of this subscriber in
    /// another thread returns [`Error::Closed`].
    fn close_entry(&self) {
        if self.ch.check_pid().is_err() {
            return;
        }
        self.harden();
        let st = self.ch.sub_state(self.idx);
        loop {
            let s = st.load(Ordering::SeqCst);
            if s & 0xf != ST_ACTIVE {
                break;
            }
            if st
                .compare_exchange(
                    s,
                    (s & !0xf) | ST_DRAINING,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                )
                .is_ok()
            {
                break;
            }
        }
        self.harden();
        self.ch.ring(C_SPACE_BELL);
        self.ch.ring(C_BELL);
    }

    fn bit(&self) -> (usize, u64) {
        (self.idx / 64, 1u64 << (self.idx % 64))
    }
    fn pin(&self, k: usize) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held[k] == 0 {
            let (w, bit) = self.bit();
            self.ch.slot_refs(k, w).fetch_or(bit, Ordering::SeqCst);
        }
        held[k] += 1;
    }
    fn unpin(&self, k: usize) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held[k] == 0 {
            return;
        }
        held[k] -= 1;
        if held[k] == 0 {
            let (w, bit) = self.bit();
            self.ch.slot_refs(k, w).fetch_and(!bit, Ordering::SeqCst);
            drop(held);
            if self.ch.u32_at(C_PUB_WAITING).load(Ordering::SeqCst) != 0 {
                self.ch.ring(C_SPACE_BELL);
            }
        }
    }
}

impl Drop for SubInner {
    /// Policy: the last view is gone and the subscriber closed: its entry is freed and its role
    /// lock released (with the descriptor, after this).
    fn drop(&mut self) {
        if self.ch.check_pid().is_err() {
            return;
        }
        let waited = Instant::now();
        let st = &self.ch.sub_state(self.idx);
        loop {
            let s = st.load(Ordering::SeqCst);
            if s & 0xf == ST_RECLAIMING && waited.elapsed() < RECLAIM_GRACE {
                // A reclaimer clears an entry in microseconds; one that died doing it (or
                // damage) leaves it so for good: after the grace time the entry is ours to free.
                std::thread::yield_now();
                continue;
            }
            let generation = (s >> 4).wrapping_add(1);
            if st
                .compare_exchange(
                    s,
                    generation << 4 | ST_FREE,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                )
                .is_ok()
            {
                break;
            }
        }
    }
}

/// The receiving end of a channel.
///
/// **Drop policy:** stops counting for *block* at once; the entry and its pins stay until the
/// last [`Message`] it handed out is dropped.
pub struct Subscriber {
    inner: Arc<SubInner>,
    pos: u64,
    /// The head last read (block: messages below it need no new read of the head).
    head_seen: u64,
    /// When a zero-timeout `recv` last asked whether the publisher is alive.
    alive_checked: Option<Instant>,
    missed: u64,
    last_seq: Option<u64>,
    last_ts: u64,
}

/// A received message: a read-only view of its slot, pinned while this lives.
pub struct Message {
    inner: Arc<SubInner>,
    slot: usize,
    ptr: NonNull<u8>,
    len: usize,
    seq: u64,
    ts: u64,
    /// Received soft-pinned (see `SubInner::soft`).
    soft: bool,
}

// SAFETY: a Message is an Arc of a Sync inner (atomics and a mutex), a slot index and a raw
// address into a mapping that inner keeps alive; unpinning takes the inner's mutex from any
// thread.
unsafe impl Send for Message {}
// SAFETY: `&Message` only reads immutable fields; the slot bytes are exposed as a raw pointer.
unsafe impl Sync for Message {}

impl Message {
    /// The message's bytes: valid (and never reused by the publisher) while this lives.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Never true (messages have at least one byte).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The sequence number (0 for the channel's first message).
    pub fn seq(&self) -> u64 {
        self.seq
    }
    /// Publish time, ns since the Unix epoch.
    pub fn timestamp_ns(&self) -> u64 {
        self.ts
    }
    /// The slot it lives in (for the C ABI's release call).
    pub fn slot(&self) -> usize {
        self.slot
    }
    /// Copies the message out. The publisher never writes a slot a live message pins, so the
    /// bytes are stable: this is a plain copy.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        // SAFETY: `ptr` is valid for `len` bytes while `self` pins the slot (the mapping is
        // kept by `inner`); `v` is distinct memory of the same length.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr(), v.as_mut_ptr(), self.len) };
        v
    }
    /// Keeps the pin past this object: for the C ABI, whose caller releases it with
    /// [`Subscriber::release_slot`].
    pub fn into_raw(self) -> usize {
        let k = self.slot;
        std::mem::forget(self);
        k
    }
}

impl Drop for Message {
    fn drop(&mut self) {
        // In a fork child this is a copy of the parent's message: the shared words are the
        // parent's to change, never the child's.
        if self.inner.ch.check_pid().is_err() {
            return;
        }
        let me = self.seq + 1;
        if self.soft
            && self
                .inner
                .soft
                .compare_exchange(me, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.inner.advance(me); // still soft: consumed now
        } else {
            self.inner.unpin(self.slot); // hardened by a later recv (or a hard pin)
        }
    }
}

fn read_u64(ch_base: *const u8, off: usize) -> u64 {
    // SAFETY: the caller checked that `off + 8` lies inside the mapping; unaligned-safe read.
    unsafe { std::ptr::read_unaligned(ch_base.add(off).cast::<u64>()) }
}

fn read_u32(ch_base: *const u8, off: usize) -> u32 {
    // SAFETY: as above.
    unsafe { std::ptr::read_unaligned(ch_base.add(off).cast::<u32>()) }
}

/// Reads and validates a channel's control block (written by its publisher before the magic).
fn read_layout(base: NonNull<u8>, len: usize, name: &str) -> Result<Layout> {
    let corrupt = |why: String| Error::Corrupt(format!("channel {name:?}: {why}"));
    if len < CTL_LEN {
        return Err(Error::InvalidArgument(format!(
            "shared segment {name:?} is a plain buffer, not a channel (open it with zcbuf.open)"
        )));
    }
    let p = base.as_ptr() as *const u8;
    // SAFETY: 8-aligned (page-aligned base) and inside the mapping (len >= CTL_LEN).
    let magic = unsafe { AtomicU64::from_ptr(base.as_ptr().cast()) };
    // The publisher stores the magic last: wait a little for a channel being created.
    let start = Instant::now();
    loop {
        match magic.load(Ordering::Acquire) {
            CTL_MAGIC => break,
            0 if start.elapsed() < Duration::from_secs(1) => {
                std::thread::sleep(Duration::from_micros(200))
            }
            0 => {
                return Err(Error::InvalidArgument(format!(
                    "shared segment {name:?} is not a channel (a plain buffer, or a channel \
                     whose publisher died while creating it)"
                )));
            }
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "shared segment {name:?} is a plain buffer, not a channel (open it with \
                     zcbuf.open)"
                )));
            }
        }
    }
    let version = read_u32(p, C_VERSION);
    if version != CTL_VERSION {
        return Err(corrupt(format!(
            "control block version {version}, this zcbuf reads {CTL_VERSION}"
        )));
    }
    let policy = Policy::from_code(read_u32(p, C_POLICY)).map_err(|e| corrupt(e.to_string()))?;
    let slots = read_u32(p, C_SLOTS);
    let subs = read_u32(p, C_SUBS);
    let ndim = read_u32(p, C_NDIM) as usize;
    let dlen = read_u32(p, C_DTYPE_LEN) as usize;
    if ndim > MAX_MSG_NDIM || dlen == 0 || dlen > MSG_DTYPE_CAP {
        return Err(corrupt(format!("{ndim} dimensions, dtype of {dlen} bytes")));
    }
    let mut dtype = vec![0u8; dlen];
    // SAFETY: C_DTYPE + dlen <= C_SHAPE < CTL_LEN <= len.
    unsafe { std::ptr::copy_nonoverlapping(p.add(C_DTYPE), dtype.as_mut_ptr(), dlen) };
    let dtype = String::from_utf8(dtype).map_err(|_| corrupt("dtype is not text".into()))?;
    let shape: Vec<u64> = (0..ndim).map(|i| read_u64(p, C_SHAPE + 8 * i)).collect();
    let meta = Meta::typed(&dtype, read_u64(p, C_ITEMSIZE), &shape)
        .map_err(|e| corrupt(format!("message type: {e}")))?;
    let lay = Layout::new(meta, slots, subs, policy).map_err(|e| corrupt(e.to_string()))?;
    // Everything the control block says must be what this zcbuf computes from its parameters:
    // a block that lies about an offset is refused, never followed.
    let said = [
        (C_MSG_LEN, lay.msg_len),
        (C_STRIDE, lay.stride),
        (C_LOG_OFF, lay.log_off),
        (C_WORDS_OFF, lay.words_off),
        (C_SUBS_OFF, lay.subs_off),
        (C_SLOTS_OFF, lay.slots_off),
        (C_TOTAL, lay.total),
    ];
    for (off, want) in said {
        let got = read_u64(p, off);
        if got != want as u64 {
            return Err(corrupt(format!(
                "layout field at {off} says {got}, the layout needs {want}"
            )));
        }
    }
    if lay.total > len {
        return Err(corrupt(format!(
            "the layout needs {} bytes; the segment has {len}",
            lay.total
        )));
    }
    Ok(lay)
}

impl Subscriber {
    /// Opens channel `name` and takes a free subscriber entry; receives the messages published
    /// from now on.
    pub fn open(name: &str) -> Result<Subscriber> {
        let mapped = shm::open(name, false)?;
        if mapped.readonly() {
            return Err(Error::InvalidArgument(format!(
                "shared segment {name:?} is sealed (read-only for every open), so it is not a                  usable channel"
            )));
        }
        let base = mapped.data_ptr();
        let lay = read_layout(base, mapped.len(), name)?;
        let role = role_file(&mapped, name)?;
        // A channel whose stream already ended (its publisher closed it, or died) has nothing
        // to give a new subscriber: say so now rather than after a first wait, so a consumer
        // that reconnects does not attach to (and keep alive) a channel that is over.
        // SAFETY: C_CLOSED is an aligned u32 inside the validated layout.
        let closed = unsafe { AtomicU32::from_ptr(base.as_ptr().add(C_CLOSED).cast()) };
        if closed.load(Ordering::SeqCst) != 0
            || !liveness::ofd_locked_by_other(role.as_fd(), PUB_BYTE)?
        {
            return Err(Error::Closed(format!(
                "channel {name:?} has no publisher any more (it closed the stream, or died): \
                 subscribe again once it publishes anew"
            )));
        }
        let ch = Arc::new(Chan {
            mapped: Arc::new(mapped),
            base,
            lay,
            role,
            name: name.to_owned(),
            pid: std::process::id(),
            child_gen: FORK_CHILD.load(Ordering::Relaxed),
        });
        let idx = claim_entry(&ch)?;
        let n = ch.lay.slots;
        let inner = Arc::new(SubInner {
            ch,
            idx,
            held: Mutex::new(vec![0; n]),
            soft: AtomicU64::new(0),
            soft_slot: AtomicU32::new(0),
            local_pos: AtomicU64::new(0),
        });
        let ch = &inner.ch;
        let pos = ch.head().load(Ordering::SeqCst);
        ch.sub_pos(idx).store(pos, Ordering::SeqCst);
        inner.local_pos.store(pos, Ordering::SeqCst);
        Ok(Subscriber {
            inner,
            pos,
            head_seen: pos,
            alive_checked: None,
            missed: 0,
            last_seq: None,
            last_ts: 0,
        })
    }

    /// The channel's name.
    pub fn name(&self) -> &str {
        &self.inner.ch.name
    }
    /// The message dtype and shape.
    pub fn meta(&self) -> &Meta {
        &self.inner.ch.lay.meta
    }
    /// Bytes per message.
    pub fn msg_len(&self) -> usize {
        self.inner.ch.lay.msg_len
    }
    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.inner.ch.lay.slots
    }
    /// The channel's policy.
    pub fn policy(&self) -> Policy {
        self.inner.ch.lay.policy
    }
    /// Messages skipped so far (under *latest*).
    pub fn missed(&self) -> u64 {
        self.missed
    }
    /// Sequence number of the last message received.
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }
    /// Publish time (ns since the Unix epoch) of the last message received.
    pub fn last_timestamp_ns(&self) -> u64 {
        self.last_ts
    }

    /// Receives the next message, waiting up to `timeout` (`None`: forever; zero: only look).
    /// Spins briefly, then sleeps on the doorbell. Errors: [`Error::Timeout`], and
    /// [`Error::Closed`] once every message sent before the publisher closed (or died) is read.
    pub fn recv(&mut self, timeout: Option<Duration>) -> Result<Message> {
        let ch = Arc::clone(&self.inner.ch);
        ch.check_pid()?;
        let start = Instant::now();
        let mut spun = false;
        loop {
            if let Some(m) = self.try_recv_once()? {
                return Ok(m);
            }
            if ch.closed().load(Ordering::SeqCst) != 0
                && ch.head().load(Ordering::SeqCst) <= self.pos
            {
                return Err(closed_error(&ch.name, false));
            }
            let left = match timeout {
                Some(t) => {
                    let e = start.elapsed();
                    if e >= t {
                        if ch.head().load(Ordering::SeqCst) <= self.pos {
                            if ch.closed().load(Ordering::SeqCst) != 0 {
                                return Err(closed_error(&ch.name, false));
                            }
                            // One system call; polls (timeout 0) in a tight loop ask at most
                            // every millisecond.
                            let due = self
                                .alive_checked
                                .is_none_or(|t| t.elapsed() >= Duration::from_millis(1));
                            if due {
                                self.alive_checked = Some(Instant::now());
                                if !ch.publisher_alive()? && ch.closed().load(Ordering::SeqCst) == 0
                                {
                                    return Err(closed_error(&ch.name, true));
                                }
                            }
                        }
                        return Err(timeout_error("no message came", &ch.name, t));
                    }
                    Some(t - e)
                }
                None => None,
            };
            if !spun {
                spun = true;
                let until = SPIN.min(left.unwrap_or(SPIN));
                spin_until(until, || ch.head().load(Ordering::Acquire) > self.pos);
                continue;
            }
            // Sleep: announce, read the bell, look again, then sleep while the bell is unchanged
            // (a publish between our look and our sleep changes it: no lost wake-up).
            let waiters = ch.u32_at(C_WAITERS);
            waiters.fetch_add(1, Ordering::SeqCst);
            let seen = ch.u32_at(C_BELL).load(Ordering::SeqCst);
            let ready = ch.head().load(Ordering::SeqCst) > self.pos
                || ch.closed().load(Ordering::SeqCst) != 0
                || !self.inner.active();
            if !ready {
                let d = left.map_or(SLICE, |l| l.min(SLICE));
                ch.sleep(C_BELL, seen, d);
            }
            waiters.fetch_sub(1, Ordering::SeqCst);
            if !ready
                && ch.head().load(Ordering::SeqCst) <= self.pos
                && ch.closed().load(Ordering::SeqCst) == 0
                && !ch.publisher_alive()?
            {
                // Gone without closing: everything it published before dying is readable;
                // after that, this. (A publisher that closed and then exited is an end of
                // stream, not a death: the closed flag is read before its lock is.)
                if ch.head().load(Ordering::SeqCst) <= self.pos
                    && ch.closed().load(Ordering::SeqCst) == 0
                {
                    return Err(closed_error(&ch.name, true));
                }
            }
        }
    }

    /// One look: the message at our position when there is one.
    fn try_recv_once(&mut self) -> Result<Option<Message>> {
        let ch = Arc::clone(&self.inner.ch);
        if !self.inner.active() {
            // Closed (by us, or through a closer from another thread): its position no longer
            // keeps the publisher off anything, so no message may be handed out.
            return Err(Error::Closed(format!(
                "channel {:?}: this subscriber was closed",
                ch.name
            )));
        }
        let n = ch.lay.slots as u64;
        let corrupt = |why: String| Err(Error::Corrupt(format!("channel {:?}: {why}", ch.name)));
        let mut last_head = None;
        loop {
            // The head seen last time still has messages for us: no need to read the shared
            // word (a cache line the publisher writes at every message) again.
            let head = if self.head_seen > self.pos && ch.lay.policy == Policy::Block {
                self.head_seen
            } else {
                let h = ch.head().load(Ordering::Acquire);
                self.head_seen = h;
                h
            };
            if head <= self.pos {
                return Ok(None);
            }
            if head == u64::MAX {
                return corrupt("its head word is at its maximum (damaged)".into());
            }
            // Looking again without the head having moved means what we saw is not a race with
            // the publisher but damage: never loop on it.
            if last_head == Some(head) {
                // The publisher may be between its log store and its head store (preempted,
                // even): give it 20 ms to move the head before calling it damage.
                let t = Instant::now();
                while ch.head().load(Ordering::Acquire) == head {
                    if t.elapsed() > Duration::from_millis(20) {
                        return corrupt(format!(
                            "message {} cannot be read consistently (log or slot words damaged)",
                            self.pos
                        ));
                    }
                    std::thread::yield_now();
                }
                last_head = None;
                self.head_seen = 0;
                continue;
            }
            last_head = Some(head);
            let behind = head - self.pos;
            if ch.lay.policy == Policy::Latest && behind > 1 {
                self.skip(head - 1);
            } else if behind > n {
                // Under block only after we were reclaimed as dead (we were not), or a
                // corrupted head: skip what the log no longer has.
                self.skip(head - n);
            }
            let p = self.pos;
            let i = (p % n) as usize;
            let s1 = ch.log_seq(i).load(Ordering::Acquire);
            if s1 != p + 1 {
                if s1 > p + 1 && ch.lay.policy == Policy::Latest {
                    self.head_seen = 0;
                    continue; // overwritten by newer messages meanwhile: look again
                }
                return corrupt(format!(
                    "message {p} was published but its log entry says {}",
                    s1.wrapping_sub(1)
                ));
            }
            let k = ch.log_slot(i).load(Ordering::Relaxed) as usize;
            let ts = ch.log_ts(i).load(Ordering::Relaxed);
            if k >= ch.lay.slots {
                return Err(Error::Corrupt(format!(
                    "channel {:?}: log entry {i} names slot {k} of {n}",
                    ch.name
                )));
            }
            let soft = ch.lay.policy == Policy::Block;
            if soft {
                // Under block our shared position (p: we have not moved past p) keeps the
                // publisher off message p's slot and log entry, so no pin is needed for it now;
                // the previous message, if still alive, gets a real pin so the position can
                // move on when this one is consumed.
                self.inner.harden();
            } else {
                // Pin, then check that the slot still holds message p (see try_claim).
                self.inner.pin(k);
                if ch.slot_seq(k).load(Ordering::SeqCst) != p + 1 {
                    self.inner.unpin(k);
                    // The publisher is rewriting that slot: message p is gone. Under latest
                    // that is a skip; the newest message, once published, is read next.
                    self.skip(p + 1);
                    last_head = None;
                    if ch.head().load(Ordering::Acquire) <= self.pos {
                        return Ok(None);
                    }
                    continue;
                }
            }
            // The log entry could have been rewritten between our reads of seq and slot/ts:
            // the slot's own sequence proves `k` holds p; re-read the timestamp's entry.
            let ts = if ch.log_seq(i).load(Ordering::Acquire) == p + 1 {
                ts
            } else {
                0
            };
            self.pos = p + 1;
            self.inner.local_pos.store(self.pos, Ordering::SeqCst);
            if soft {
                self.inner.soft_slot.store(k as u32, Ordering::Relaxed);
                self.inner.soft.store(p + 1, Ordering::SeqCst);
                if !self.inner.active() {
                    // Closed meanwhile: the position stopped counting, so pin it for real
                    // (close hardens too; the soft-pin word's CAS makes one of us do it).
                    self.inner.harden();
                }
            } else {
                self.inner.advance(p + 1);
            }
            self.last_seq = Some(p);
            self.last_ts = ts;
            return Ok(Some(Message {
                inner: Arc::clone(&self.inner),
                slot: k,
                ptr: ch.slot_ptr(k),
                len: ch.lay.msg_len,
                seq: p,
                ts,
                soft,
            }));
        }
    }

    fn skip(&mut self, to: u64) {
        self.inner.harden();
        let ch = &self.inner.ch;
        self.missed = self.missed.saturating_add(to.saturating_sub(self.pos));
        ch.sub_missed(self.inner.idx)
            .store(self.missed, Ordering::Relaxed);
        self.pos = to;
        self.inner.local_pos.store(to, Ordering::SeqCst);
        self.inner.advance(to);
    }

    /// A handle that waits until this subscriber has something to receive, without receiving
    /// it and without borrowing the subscriber (for event loops: another thread waits, the
    /// loop's thread receives).
    pub fn waiter(&self) -> Waiter {
        Waiter {
            ch: Arc::clone(&self.inner.ch),
            pos: self.pos,
            inner: Some(Arc::clone(&self.inner)),
        }
    }

    /// Releases a pin kept with [`Message::into_raw`] (C ABI).
    pub fn release_slot(&self, slot: usize) -> Result<()> {
        self.inner.ch.check_pid()?;
        if slot >= self.inner.ch.lay.slots {
            return Err(Error::InvalidArgument(format!(
                "slot {slot} is not a slot of this channel"
            )));
        }
        let held = self.inner.held.lock().unwrap_or_else(|p| p.into_inner())[slot];
        if held == 0 {
            return Err(Error::InvalidArgument(format!(
                "slot {slot} holds no message received by this subscriber"
            )));
        }
        self.inner.unpin(slot);
        Ok(())
    }

    /// Stops receiving: from now on this subscriber no longer holds back a *block* publisher.
    /// Messages already received stay valid until dropped.
    pub fn close(&mut self) {
        self.inner.close_entry();
    }

    /// A handle that closes this subscriber from any thread (see [`Subscriber::close`]); a
    /// `recv` waiting in another thread then returns [`Error::Closed`].
    pub fn closer(&self) -> SubCloser {
        SubCloser {
            inner: Arc::clone(&self.inner),
        }
    }
}

/// Closes a subscriber from another thread (see [`Subscriber::closer`]).
#[derive(Clone)]
pub struct SubCloser {
    inner: Arc<SubInner>,
}

impl SubCloser {
    /// As [`Subscriber::close`].
    pub fn close(&self) {
        self.inner.close_entry();
    }
    /// A waiter on the subscriber's next message (see [`Subscriber::waiter`]), made without
    /// borrowing the subscriber.
    pub fn waiter(&self) -> Waiter {
        Waiter {
            ch: Arc::clone(&self.inner.ch),
            pos: self.inner.local_pos.load(Ordering::SeqCst),
            inner: Some(Arc::clone(&self.inner)),
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.close();
    }
}

/// Waits for a subscriber's next message to be there (see [`Subscriber::waiter`]).
pub struct Waiter {
    ch: Arc<Chan>,
    pos: u64,
    /// The subscriber, when known: a closed one is "ready" (its `recv` says so).
    inner: Option<Arc<SubInner>>,
}

impl Waiter {
    /// Waits up to `timeout` (`None`: forever) until a message past the subscriber's position
    /// (when this waiter was made) is published, or the stream ended (closed, or the publisher
    /// died): `Ok(true)`; `Ok(false)` when the time ran out. Spins briefly, then sleeps on the
    /// doorbell like `recv`.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<bool> {
        let ch = &self.ch;
        ch.check_pid()?;
        let start = Instant::now();
        let ready = || {
            ch.head().load(Ordering::SeqCst) > self.pos
                || ch.closed().load(Ordering::SeqCst) != 0
                || self.inner.as_ref().is_some_and(|i| !i.active())
        };
        spin_until(SPIN.min(timeout.unwrap_or(SPIN)), ready);
        loop {
            if ready() {
                return Ok(true);
            }
            let left = match timeout {
                Some(t) => match t.checked_sub(start.elapsed()) {
                    Some(l) if !l.is_zero() => Some(l),
                    _ => return Ok(!ch.publisher_alive()?),
                },
                None => None,
            };
            let waiters = ch.u32_at(C_WAITERS);
            waiters.fetch_add(1, Ordering::SeqCst);
            let seen = ch.u32_at(C_BELL).load(Ordering::SeqCst);
            if !ready() {
                ch.sleep(C_BELL, seen, left.map_or(SLICE, |l| l.min(SLICE)));
            }
            waiters.fetch_sub(1, Ordering::SeqCst);
            if !ready() && !ch.publisher_alive()? {
                return Ok(true); // recv will say the publisher died
            }
        }
    }
}

/// Takes a free subscriber entry: its lock first (so a live owner is never mistaken for dead),
/// then its state.
fn claim_entry(ch: &Chan) -> Result<usize> {
    for i in 0..ch.lay.subs {
        if ch.sub_state(i).load(Ordering::SeqCst) & 0xf == ST_ACTIVE
            && sub_alive(ch, i).unwrap_or(true)
        {
            continue;
        }
        if !liveness::ofd_lock(ch.role.as_fd(), SUB_BYTE + i as i64, libc::F_WRLCK as i16)? {
            continue; // a live subscriber has it
        }
        // The lock is ours: whoever had this entry is gone. Take it, clearing a dead owner's
        // pins first (also after a reclaimer that died halfway: past the grace time).
        let waited = Instant::now();
        loop {
            let s = ch.sub_state(i).load(Ordering::SeqCst);
            match s & 0xf {
                ST_FREE => {
                    // A position from this entry's previous owner must not hold back (or
                    // mislead) the publisher: start at the head.
                    ch.sub_pos(i)
                        .store(ch.head().load(Ordering::SeqCst), Ordering::SeqCst);
                    let generation = (s >> 4).wrapping_add(1);
                    if ch
                        .sub_state(i)
                        .compare_exchange(
                            s,
                            generation << 4 | ST_ACTIVE,
                            Ordering::SeqCst,
                            Ordering::SeqCst,
                        )
                        .is_ok()
                    {
                        ch.sub_pid(i).store(std::process::id(), Ordering::Relaxed);
                        ch.sub_missed(i).store(0, Ordering::Relaxed);
                        return Ok(i);
                    }
                }
                ST_RECLAIMING if waited.elapsed() < RECLAIM_GRACE => std::thread::yield_now(),
                _ => reclaim_entry(ch, i, s),
            }
        }
    }
    Err(Error::OutOfMemory(format!(
        "channel {:?} has all its {} subscriber entries in use: close a subscriber, or create \
         the channel for more (max_subscribers)",
        ch.name, ch.lay.subs
    )))
}

/// What `ls` shows of a channel: its layout and every subscriber's position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelInfo {
    /// The message type.
    pub meta: Meta,
    /// Slots.
    pub slots: usize,
    /// The policy.
    pub policy: Policy,
    /// Messages published.
    pub published: u64,
    /// The publisher closed the stream.
    pub closed: bool,
    /// The publisher's pid (as it saw itself), and whether its role lock is held.
    pub publisher: (u32, bool),
    /// Each subscriber entry in use: (pid as it saw itself, position, missed, alive).
    pub subscribers: Vec<(u32, u64, u64, bool)>,
}

/// What a channel's control block and subscriber table say, read with `pread` from `fd` (a
/// segment whose header said its data starts at `data_offset`), without mapping or holding it;
/// `None` when the data region does not hold a channel of this version. Role liveness comes
/// from `F_OFD_GETLK` on `fd`. For `ls`.
pub(crate) fn peek(
    fd: std::os::fd::BorrowedFd<'_>,
    data_offset: u64,
    data_len: u64,
) -> Option<ChannelInfo> {
    let mut ctl = vec![0u8; CTL_LEN];
    if rustix::io::pread(fd, &mut ctl, data_offset).ok()? != CTL_LEN {
        return None;
    }
    let p = ctl.as_ptr();
    if read_u64(p, C_MAGIC) != CTL_MAGIC || read_u32(p, C_VERSION) != CTL_VERSION {
        return None;
    }
    let ndim = read_u32(p, C_NDIM) as usize;
    let dlen = read_u32(p, C_DTYPE_LEN) as usize;
    if ndim > MAX_MSG_NDIM || dlen == 0 || dlen > MSG_DTYPE_CAP {
        return None;
    }
    let dtype = String::from_utf8(ctl[C_DTYPE..C_DTYPE + dlen].to_vec()).ok()?;
    let shape: Vec<u64> = (0..ndim).map(|i| read_u64(p, C_SHAPE + 8 * i)).collect();
    let meta = Meta::typed(&dtype, read_u64(p, C_ITEMSIZE), &shape).ok()?;
    let policy = Policy::from_code(read_u32(p, C_POLICY)).ok()?;
    let lay = Layout::new(meta, read_u32(p, C_SLOTS), read_u32(p, C_SUBS), policy).ok()?;
    if read_u64(p, C_SUBS_OFF) != lay.subs_off as u64 || lay.total as u64 > data_len {
        return None;
    }
    let mut subs = vec![0u8; SUB_ENTRY * lay.subs];
    let at = data_offset + lay.subs_off as u64;
    if rustix::io::pread(fd, &mut subs, at).ok()? != subs.len() {
        return None;
    }
    let sp = subs.as_ptr();
    let mut subscribers = Vec::new();
    for i in 0..lay.subs {
        let st = read_u32(sp, SUB_ENTRY * i + S_STATE) & 0xf;
        if st == ST_ACTIVE || st == ST_DRAINING {
            subscribers.push((
                read_u32(sp, SUB_ENTRY * i + S_PID),
                read_u64(sp, SUB_ENTRY * i + S_POS),
                read_u64(sp, SUB_ENTRY * i + S_MISSED),
                liveness::ofd_locked_by_other(fd, SUB_BYTE + i as i64).unwrap_or(false),
            ));
        }
    }
    Some(ChannelInfo {
        meta: lay.meta.clone(),
        slots: lay.slots,
        policy,
        published: read_u64(p, C_HEAD),
        closed: read_u32(p, C_CLOSED) != 0,
        publisher: (
            read_u32(p, C_PUB_PID),
            liveness::ofd_locked_by_other(fd, PUB_BYTE).unwrap_or(false),
        ),
        subscribers,
    })
}

/// The segment named `name`, opened for reading and writing, with its header, when it is a
/// channel of this version (`None` otherwise).
fn open_channel_file(name: &str) -> Option<(OwnedFd, rustix::fs::Stat)> {
    let dir = liveness::shm_dir().ok()?;
    let fd =
        rustix::fs::openat(dir, name, shm::open_flags(true), rustix::fs::Mode::empty()).ok()?;
    let st = rustix::fs::fstat(&fd).ok()?;
    let parsed = shm::inspect_header(fd.as_fd(), &st, name).ok()?;
    let mut m = [0u8; 8];
    match rustix::io::pread(&fd, &mut m, parsed.data_offset) {
        Ok(8) if u64::from_le_bytes(m) == CTL_MAGIC => Some((fd, st)),
        _ => None,
    }
}

fn is_live_channel(name: &str) -> bool {
    open_channel_file(name)
        .is_some_and(|(fd, _)| liveness::ofd_locked_by_other(fd.as_fd(), PUB_BYTE).unwrap_or(true))
}

/// When `name` is a channel whose publisher is gone (closed and exited, or died) and whose
/// subscribers still hold it, removes the name — as `unlink` would: they keep their mappings
/// and learn that the stream ended — so a restarted publisher can create it anew. Taking the
/// publisher's role lock first proves nobody publishes on it, and keeps a second restarter off
/// it; the name is removed only while it still names that segment. Returns whether it did.
fn replace_dead_channel(name: &str) -> Result<bool> {
    let Some((fd, st)) = open_channel_file(name) else {
        return Ok(false);
    };
    if !liveness::ofd_lock(fd.as_fd(), PUB_BYTE, libc::F_WRLCK as i16)? {
        return Ok(false); // a live publisher
    }
    let dir = liveness::shm_dir()?;
    liveness::remove_name_if(fd.as_fd(), dir, name, liveness::key_of(&st))
    // `fd` closes here: our role and name locks go with it.
}

/// Whether the data region at `base` (`len` bytes, mapped) holds a channel's control block.
pub(crate) fn is_channel(base: NonNull<u8>, len: usize) -> bool {
    if len < CTL_LEN {
        return false;
    }
    // SAFETY: `base` is the page-aligned start of a mapping of at least CTL_LEN bytes; the
    // magic is written once, atomically, by the publisher.
    let magic = unsafe { AtomicU64::from_ptr(base.as_ptr().cast()) };
    magic.load(Ordering::Acquire) == CTL_MAGIC
}

/// Describes channel `name` without subscribing.
pub fn info(name: &str) -> Result<ChannelInfo> {
    let mapped = shm::open(name, false)?;
    let base = mapped.data_ptr();
    let lay = read_layout(base, mapped.len(), name)?;
    let role = role_file(&mapped, name)?;
    let ch = Chan {
        mapped: Arc::new(mapped),
        base,
        lay,
        role,
        name: name.to_owned(),
        pid: std::process::id(),
        child_gen: FORK_CHILD.load(Ordering::Relaxed),
    };
    let mut subs = Vec::new();
    for i in 0..ch.lay.subs {
        let st = ch.sub_state(i).load(Ordering::SeqCst) & 0xf;
        if st == ST_ACTIVE || st == ST_DRAINING {
            subs.push((
                ch.sub_pid(i).load(Ordering::Relaxed),
                ch.sub_pos(i).load(Ordering::Relaxed),
                ch.sub_missed(i).load(Ordering::Relaxed),
                sub_alive(&ch, i)?,
            ));
        }
    }
    let _ = &ch.mapped;
    Ok(ChannelInfo {
        meta: ch.lay.meta.clone(),
        slots: ch.lay.slots,
        policy: ch.lay.policy,
        published: ch.head().load(Ordering::SeqCst),
        closed: ch.closed().load(Ordering::SeqCst) != 0,
        publisher: (read_u32(ch.base.as_ptr(), C_PUB_PID), ch.publisher_alive()?),
        subscribers: subs,
    })
}

// ---------------------------------------------------------------------------------------------
// handles, for the C ABI

/// Endpoints by `u64` handle, for the C ABI (and so Python): the C side passes plain integers,
/// which are looked up (and so validated) on every call.
///
/// A call that may wait (a `recv`, a `loan` or `send_copy` for a free slot) holds only its own
/// endpoint's lock: releasing a message, closing, or waiting for readiness from other threads
/// never waits behind it.
pub mod handles {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, LazyLock, Mutex, RwLock};

    use super::{Message, PubCloser, Publisher, SubCloser, Subscriber};
    use crate::error::{Error, Result};

    /// A publisher, and what closes it without its lock.
    pub struct PubHandle {
        p: Mutex<Publisher>,
        closer: PubCloser,
    }

    /// Messages handed to C, by slot (a pinned slot holds one message at a time, so one per
    /// slot suffices), and whether the handle has been forgotten.
    struct Out {
        msgs: Vec<Option<Message>>,
        removed: bool,
    }

    /// A subscriber, the messages received through C and not yet released, and what closes it
    /// or waits on it without its lock.
    pub struct SubHandle {
        sub: Mutex<Subscriber>,
        out: Mutex<Out>,
        closer: SubCloser,
        closed: AtomicBool,
    }

    type Table<T> = RwLock<HashMap<u64, Arc<T>>>;
    static PUBS: LazyLock<Table<PubHandle>> = LazyLock::new(Default::default);
    static SUBS: LazyLock<Table<SubHandle>> = LazyLock::new(Default::default);
    static NEXT: AtomicU64 = AtomicU64::new(1);

    fn get<T>(t: &Table<T>, id: u64, what: &str) -> Result<Arc<T>> {
        t.read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("{what} handle {id} is not open")))
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a publisher; returns its handle.
    pub fn add_pub(p: Publisher) -> u64 {
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let closer = p.closer();
        PUBS.write().unwrap_or_else(|p| p.into_inner()).insert(
            id,
            Arc::new(PubHandle {
                p: Mutex::new(p),
                closer,
            }),
        );
        id
    }

    /// Runs `f` on publisher `id` (holding its lock).
    pub fn with_pub<R>(id: u64, f: impl FnOnce(&mut Publisher) -> Result<R>) -> Result<R> {
        let h = get(&PUBS, id, "publisher")?;
        let mut g = lock(&h.p);
        f(&mut g)
    }

    /// Ends the stream of publisher `id` (a call waiting on it returns); the handle stays.
    pub fn close_pub(id: u64) -> Result<()> {
        get(&PUBS, id, "publisher")?.closer.close();
        Ok(())
    }

    /// Ends the stream of publisher `id` if open, and forgets the handle: its loans' memory
    /// may go with it (once a call still running on it returns).
    pub fn free_pub(id: u64) -> Result<()> {
        let h = PUBS
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
            .ok_or_else(|| Error::NotFound(format!("publisher handle {id} is not open")))?;
        h.closer.close();
        Ok(())
    }

    /// Registers a subscriber; returns its handle.
    pub fn add_sub(s: Subscriber) -> u64 {
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let n = s.slots();
        let closer = s.closer();
        SUBS.write().unwrap_or_else(|p| p.into_inner()).insert(
            id,
            Arc::new(SubHandle {
                sub: Mutex::new(s),
                out: Mutex::new(Out {
                    msgs: (0..n).map(|_| None).collect(),
                    removed: false,
                }),
                closer,
                closed: AtomicBool::new(false),
            }),
        );
        id
    }

    /// Receives on subscriber `id` (holding only its receive lock while it waits) and keeps the
    /// message for a later [`release`]; `f` describes it while the subscriber is at hand.
    pub fn recv<R>(
        id: u64,
        timeout: Option<std::time::Duration>,
        f: impl FnOnce(&Subscriber, &Message) -> R,
    ) -> Result<R> {
        let h = get(&SUBS, id, "subscriber")?;
        if h.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed(format!("subscriber handle {id} was closed")));
        }
        let (m, desc) = {
            let mut s = lock(&h.sub);
            let m = s.recv(timeout)?;
            let desc = f(&s, &m);
            (m, desc)
        };
        let mut out = lock(&h.out);
        if out.removed {
            return Err(Error::Closed(format!("subscriber handle {id} was closed")));
        }
        let k = m.slot();
        out.msgs[k] = Some(m); // a pinned slot holds one message: nothing is replaced
        Ok(desc)
    }

    /// Waits (without any lock of subscriber `id`) until it has something to receive.
    pub fn wait_sub(id: u64, timeout: Option<std::time::Duration>) -> Result<bool> {
        let h = get(&SUBS, id, "subscriber")?;
        if h.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed(format!("subscriber handle {id} was closed")));
        }
        h.closer.waiter().wait(timeout)
    }

    /// Releases message `slot` of subscriber `id`; forgets a closed handle with nothing out.
    pub fn release(id: u64, slot: usize) -> Result<()> {
        let h = get(&SUBS, id, "subscriber")?;
        let mut out = lock(&h.out);
        match out.msgs.get_mut(slot).and_then(Option::take) {
            Some(m) => drop(m),
            None => {
                return Err(Error::InvalidArgument(format!(
                    "slot {slot} holds no message received through subscriber handle {id}"
                )));
            }
        }
        forget_if_done(id, &h, &mut out);
        Ok(())
    }

    fn forget_if_done(id: u64, h: &SubHandle, out: &mut Out) {
        if h.closed.load(Ordering::SeqCst) && !out.removed && out.msgs.iter().all(Option::is_none) {
            out.removed = true;
            SUBS.write().unwrap_or_else(|p| p.into_inner()).remove(&id);
        }
    }

    /// Closes subscriber `id` (a `recv` waiting on it returns): it stops counting for *block*
    /// now; the handle stays until every message received through it is released.
    pub fn close_sub(id: u64) -> Result<()> {
        let h = get(&SUBS, id, "subscriber")?;
        if h.closed.swap(true, Ordering::SeqCst) {
            return Err(Error::NotFound(format!(
                "subscriber handle {id} is already closed"
            )));
        }
        h.closer.close();
        let mut out = lock(&h.out);
        forget_if_done(id, &h, &mut out);
        Ok(())
    }
}
