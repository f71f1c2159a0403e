//! Counted holders of a shared segment, kept in its header with atomics (no daemon, no lock).
//!
//! Each process that creates or opens a segment claims a slot: `(pid | VALID, start time)`.
//! The name is removed by the last *live* holder to leave. A holder whose process has died is
//! recognised by its pid no longer existing or having another start time (so a reused pid is not
//! mistaken for the holder) and its slot is reaped.
//!
//! Removal protocol, race-free against a concurrent opener:
//! * opener: claim a slot, then (SeqCst) read the state word; if it says *closing*, give the slot
//!   back and retry the open a little later (the name is either gone, or the closer backed out);
//! * closer: after giving its own slot back, find no live slot, set *closing* (CAS), then
//!   (SeqCst) scan again: a slot found now belongs to an opener that will see *closing* or has
//!   already seen it clear, so the closer clears *closing* and keeps the name; else it unlinks.
//!
//! With sequentially consistent operations either the opener sees *closing* or the closer sees
//! the opener's slot, so a live holder's name is never removed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{LazyLock, Mutex, OnceLock};

use crate::error::Error;
use crate::header::{HOLDER_SLOTS, OFF_HOLDERS, OFF_STATE};

const CLAIMING: u64 = 1 << 32;
const VALID: u64 = 1 << 33;
const PID_MASK: u64 = 0xffff_ffff;
/// State-word bit: the last holder is removing the name.
pub const CLOSING: u64 = 1;

/// A view of the holder table of a mapped header.
#[derive(Clone, Copy)]
pub(crate) struct Table {
    base: *mut u8,
}

/// Why a claim did not succeed.
pub(crate) enum ClaimError {
    /// The segment is being removed; retry the open later.
    Closing,
    /// Another error.
    Other(Error),
}

/// Whether a slot is held by a live process, a dead one, or nobody.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Nobody.
    Empty,
    /// A process that is still running.
    Alive,
    /// A process that has exited or was killed.
    Dead,
}

/// The start time of this process (clock ticks since boot), read once per process: a child
/// made by `fork` inherits the cache, so it is keyed by pid.
pub(crate) fn self_start_time() -> u64 {
    static START: OnceLock<(u32, u64)> = OnceLock::new();
    let me = std::process::id();
    let (pid, t) = *START.get_or_init(|| (me, process_start_time(me).unwrap_or(0)));
    if pid == me {
        t
    } else {
        process_start_time(me).unwrap_or(0)
    }
}

/// The start time (field 22 of `/proc/PID/stat`) of a running, non-zombie process.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: parse after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?; // field 3
    if state == "Z" || state == "X" {
        return None;
    }
    // fields 4..=21 are 18 more; field 22 is the start time.
    fields.nth(18)?.parse().ok()
}

/// Clears a dead holder's slot, but only if it still holds exactly the dead value `v`: a fresh
/// claim made meanwhile is left alone.
fn clear_if(w: &AtomicU64, t: &AtomicU64, v: u64) {
    if w.compare_exchange(v, 0, SeqCst, SeqCst).is_ok() {
        t.store(0, SeqCst);
    }
}

impl Table {
    /// # Safety
    /// `header` must point to a mapped, writable, page-aligned zcbuf header of at least
    /// `HEADER_LEN` bytes that outlives every use of the returned table.
    pub(crate) unsafe fn new(header: *mut u8) -> Table {
        Table { base: header }
    }

    fn word(&self, off: usize) -> &AtomicU64 {
        // SAFETY: by the contract of `new`, `base + off` is inside the mapped header for every
        // offset used here (state word, holder slots), 8-byte aligned, and outlives `self`.
        unsafe { AtomicU64::from_ptr(self.base.add(off).cast::<u64>()) }
    }

    fn slot(&self, i: usize) -> (&AtomicU64, &AtomicU64) {
        debug_assert!(i < HOLDER_SLOTS);
        (
            self.word(OFF_HOLDERS + 16 * i),
            self.word(OFF_HOLDERS + 16 * i + 8),
        )
    }

    fn state(&self) -> &AtomicU64 {
        self.word(OFF_STATE)
    }

    /// Claims a slot for this process.
    pub(crate) fn claim(&self) -> std::result::Result<usize, ClaimError> {
        let me = std::process::id() as u64;
        let start = self_start_time();
        for attempt in 0..2 {
            for i in 0..HOLDER_SLOTS {
                let (w, t) = self.slot(i);
                if w.compare_exchange(0, me | CLAIMING, SeqCst, SeqCst).is_ok() {
                    t.store(start, SeqCst);
                    w.store(me | VALID, SeqCst);
                    if self.state().load(SeqCst) & CLOSING != 0 {
                        self.release(i);
                        return Err(ClaimError::Closing);
                    }
                    return Ok(i);
                }
            }
            if attempt == 0 {
                self.reap();
            }
        }
        Err(ClaimError::Other(Error::OutOfMemory(format!(
            "all {HOLDER_SLOTS} holder slots of the segment are held by live processes: \
             free the buffer in some of them"
        ))))
    }

    /// Gives slot `i` back.
    pub(crate) fn release(&self, i: usize) {
        let (w, t) = self.slot(i);
        t.store(0, SeqCst);
        w.store(0, SeqCst);
    }

    /// The liveness of slot `i`.
    pub(crate) fn liveness(&self, i: usize) -> (Liveness, u32) {
        let (w, t) = self.slot(i);
        let v = w.load(SeqCst);
        if v == 0 {
            return (Liveness::Empty, 0);
        }
        let pid = (v & PID_MASK) as u32;
        let alive = if v & VALID != 0 {
            let want = t.load(SeqCst);
            if pid == std::process::id() {
                // This process: alive by definition, unless the slot is a dead namesake's.
                want == self_start_time()
            } else {
                process_start_time(pid) == Some(want)
            }
        } else {
            // Still claiming: the start time is not written yet; judge by the pid alone.
            process_start_time(pid).is_some()
        };
        if alive {
            // A slot can be released and reclaimed while we look; only report what still holds.
            if w.load(SeqCst) == v {
                return (Liveness::Alive, pid);
            }
            return self.liveness(i);
        }
        (Liveness::Dead, pid)
    }

    /// Clears the slots of dead processes; returns how many live holders remain.
    pub(crate) fn reap(&self) -> usize {
        self.reap_until(usize::MAX)
    }

    /// True as soon as one slot is held by a live process; dead slots met on the way are reaped.
    pub(crate) fn any_live(&self) -> bool {
        self.reap_until(1) > 0
    }

    /// Reaps dead slots in order until `enough` live holders have been seen; returns how many
    /// were seen. (Each liveness check of another process reads /proc: stopping early matters.)
    fn reap_until(&self, enough: usize) -> usize {
        let mut live = 0;
        for i in 0..HOLDER_SLOTS {
            let (w, t) = self.slot(i);
            let v = w.load(SeqCst);
            if v == 0 {
                continue;
            }
            match self.liveness(i).0 {
                Liveness::Alive => {
                    live += 1;
                    if live >= enough {
                        break;
                    }
                }
                Liveness::Dead => clear_if(w, t, v),
                Liveness::Empty => {}
            }
        }
        live
    }

    /// Counts (alive, dead) holders without changing anything.
    pub(crate) fn census(&self) -> (usize, usize) {
        let (mut alive, mut dead) = (0, 0);
        for i in 0..HOLDER_SLOTS {
            match self.liveness(i).0 {
                Liveness::Alive => alive += 1,
                Liveness::Dead => dead += 1,
                Liveness::Empty => {}
            }
        }
        (alive, dead)
    }

    /// After this process gave its slot back: returns true when the caller must remove the
    /// name (no live holder is left and the state is now *closing*, for good).
    pub(crate) fn try_close(&self) -> bool {
        // Common case first: another holder is alive; finding one is enough (each liveness
        // check of another process reads /proc, a few µs), the dead are reaped when closing.
        if self.any_live() {
            return false;
        }
        self.reap();
        if self
            .state()
            .compare_exchange(0, CLOSING, SeqCst, SeqCst)
            .is_err()
        {
            // Somebody else is closing it.
            return false;
        }
        if self.reap() > 0 {
            self.state().store(0, SeqCst);
            return false;
        }
        true
    }
}

/// Identifies a segment within this machine: (device, inode) of its file. An inode cannot be
/// reused while this process still maps it.
pub(crate) type SegmentKey = (u64, u64);

/// This process's holder slots: one per segment however many handles the process has open,
/// with a count of those handles. A process is one holder. Entries record the pid that made them:
/// a child made by `fork` inherits the map but holds none of its parent's slots.
static LOCAL: LazyLock<Mutex<HashMap<SegmentKey, Holding>>> = LazyLock::new(Default::default);

#[derive(Clone, Copy)]
struct Holding {
    pid: u32,
    slot: usize,
    handles: usize,
}

fn local() -> std::sync::MutexGuard<'static, HashMap<SegmentKey, Holding>> {
    // Nothing panics under this lock; a poisoned map is still consistent.
    LOCAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Registers one more handle of this process on the segment, claiming a slot for the first.
pub(crate) fn join(table: &Table, key: SegmentKey) -> std::result::Result<(), ClaimError> {
    let me = std::process::id();
    let mut m = local();
    if let Some(h) = m.get_mut(&key).filter(|h| h.pid == me) {
        // Already a holder; but a segment being closed must not be joined.
        if table.state().load(SeqCst) & CLOSING != 0 {
            return Err(ClaimError::Closing);
        }
        h.handles += 1;
        return Ok(());
    }
    let slot = table.claim()?;
    m.insert(
        key,
        Holding {
            pid: me,
            slot,
            handles: 1,
        },
    );
    Ok(())
}

/// Writes this process as holder slot 0 into an encoded (not yet published) header.
pub(crate) fn encode_creator(enc: &mut [u8]) {
    let me = std::process::id() as u64 | VALID;
    enc[OFF_HOLDERS..OFF_HOLDERS + 8].copy_from_slice(&me.to_le_bytes());
    enc[OFF_HOLDERS + 8..OFF_HOLDERS + 16].copy_from_slice(&self_start_time().to_le_bytes());
}

/// Records that this process holds slot 0 of a segment it has just created
/// (see [`encode_creator`]).
pub(crate) fn adopt_creator(key: SegmentKey) {
    let h = Holding {
        pid: std::process::id(),
        slot: 0,
        handles: 1,
    };
    local().insert(key, h);
}

/// Drops one handle of this process; the last gives the slot back. Returns true when the caller
/// must remove the name (no live holder is left anywhere). A handle inherited through `fork`
/// holds no slot of this process and changes nothing.
pub(crate) fn part(table: &Table, key: SegmentKey) -> bool {
    let me = std::process::id();
    let mut m = local();
    let Some(h) = m.get_mut(&key).filter(|h| h.pid == me) else {
        return false;
    };
    h.handles -= 1;
    if h.handles > 0 {
        return false;
    }
    let slot = h.slot;
    m.remove(&key);
    table.release(slot);
    table.try_close()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::HEADER_LEN;

    #[test]
    fn own_start_time_is_known() {
        assert!(self_start_time() > 0);
        assert_eq!(process_start_time(u32::MAX), None);
    }

    #[test]
    fn claim_release_close() {
        let mut buf = vec![0u64; HEADER_LEN / 8];
        // SAFETY: a zeroed, aligned buffer of HEADER_LEN bytes that outlives the table.
        let t = unsafe { Table::new(buf.as_mut_ptr().cast()) };
        let Ok(a) = t.claim() else { panic!() };
        let Ok(b) = t.claim() else { panic!() };
        assert_ne!(a, b);
        assert_eq!(t.census(), (2, 0));
        t.release(a);
        assert!(!t.try_close());
        t.release(b);
        assert!(t.try_close());
        assert!(matches!(t.claim(), Err(ClaimError::Closing)));
    }

    #[test]
    fn dead_holders_are_reaped() {
        let mut buf = vec![0u64; HEADER_LEN / 8];
        // SAFETY: as above.
        let t = unsafe { Table::new(buf.as_mut_ptr().cast()) };
        // A live pid (ours) with a wrong start time: a reused pid, so dead.
        let (w, s) = t.slot(3);
        w.store(std::process::id() as u64 | VALID, SeqCst);
        s.store(self_start_time() + 1, SeqCst);
        assert_eq!(t.census(), (0, 1));
        assert_eq!(t.reap(), 0);
        assert_eq!(t.census(), (0, 0));
    }
}
