//! Fuzzes a live channel's shared words: random bytes and field values written into the control
//! block (the first 1 KiB of the data region) of a real channel, through the segment's file in
//! /dev/shm, then `Subscriber::open` and `channel::info`; and random values written into the
//! live words (head, log entries, slot words, subscriber entries) under a live publisher and
//! subscriber, then `recv` and `send`. Whatever was written, each call must return (an error,
//! or a result that stays inside the channel), never panic, crash or hang. A watchdog aborts
//! the run when one case takes more than 20 s.
//!
//! 2,000 cases per property by default; set PROPTEST_CASES to change it.
//!
//! ```text
//! cargo test --release --test channel_fuzz
//! ```

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Once, OnceLock};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use zcbuf::channel::{Policy, Publisher, Subscriber, info};
use zcbuf::{Error, Meta};

// Control block offsets (src/channel.rs; docs/channels.md).
const C_MAGIC: u64 = 0;
const CTL_FIELDS: &[u64] = &[8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 72, 80, 88, 96];
const C_DTYPE: u64 = 128;
const C_SHAPE: u64 = 256;
const C_HEAD: u64 = 512;
const C_CLOSED: u64 = 576;
const C_LOG_OFF: u64 = 56;
const C_WORDS_OFF: u64 = 64;
const C_SUBS_OFF: u64 = 72;
const LOG_ENTRY: u64 = 32;
const SUB_ENTRY: u64 = 64;

static NEXT: AtomicU64 = AtomicU64::new(0);

fn name(tag: &str) -> String {
    format!(
        "chtest-fuzz-{}-{tag}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000)
}

/// Where the data region starts in the segment's file.
fn data_offset() -> u64 {
    zcbuf::header::data_offset_for(rustix::param::page_size()) as u64
}

/// The segment's file, to write into behind the library's back.
fn segment(name: &str) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/dev/shm/{name}"))
        .expect("the channel's segment")
}

fn put(f: &File, off: u64, bytes: &[u8]) {
    f.write_all_at(bytes, data_offset() + off).unwrap();
}

fn get_u64(f: &File, off: u64) -> u64 {
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, data_offset() + off).unwrap();
    u64::from_le_bytes(b)
}

/// When the run started, and the last progress of a case (ms since then), for the watchdog.
static T0: OnceLock<Instant> = OnceLock::new();
static PROGRESS: AtomicU64 = AtomicU64::new(0);

/// Starts the watchdog (once): it aborts the run when no case made progress for 20 s.
fn watchdog() {
    static START: Once = Once::new();
    let t0 = *T0.get_or_init(Instant::now);
    START.call_once(move || {
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(Duration::from_secs(1));
                let last = PROGRESS.load(Ordering::Relaxed);
                if (t0.elapsed().as_millis() as u64).saturating_sub(last) > 20_000 {
                    eprintln!("channel_fuzz: no progress for 20 s: a hang");
                    std::process::abort();
                }
            }
        });
    });
    tick();
}

fn tick() {
    let t0 = *T0.get_or_init(Instant::now);
    PROGRESS.store(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
}

/// What a call on a damaged channel may return: any zcbuf error but an internal one (a caught
/// panic) or a failed I/O.
fn acceptable<T>(r: &Result<T, Error>, what: &str) {
    if let Err(e) = r {
        assert!(
            !matches!(e, Error::Internal(_) | Error::Io(_)),
            "{what}: unexpected error kind: {e:?}"
        );
    }
}

fn meta_for(dims: &[u64], wide: bool) -> Meta {
    if wide {
        Meta::typed("<f8", 8, dims).unwrap()
    } else {
        Meta::typed("|u1", 1, dims).unwrap()
    }
}

#[derive(Debug, Clone)]
enum Damage {
    /// XOR one byte of the control block (not the magic).
    Flip(u64, u8),
    /// Write a value into one of the layout fields.
    Field(usize, u64),
    /// Write bytes into the dtype text.
    Dtype(u64, Vec<u8>),
    /// Write a dimension.
    Shape(u64, u64),
}

fn damage() -> impl Strategy<Value = Damage> {
    let special = prop_oneof![
        Just(0u64),
        Just(1u64),
        Just(u64::MAX),
        Just(u64::MAX / 2),
        Just(1u64 << 32),
        Just(4096u64),
        Just(u32::MAX as u64),
        any::<u64>(),
        0u64..100_000,
    ];
    prop_oneof![
        (8u64..512, 1u8..=255).prop_map(|(o, x)| Damage::Flip(o, x)),
        (0..CTL_FIELDS.len(), special.clone()).prop_map(|(i, v)| Damage::Field(i, v)),
        (0u64..128, prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(o, b)| Damage::Dtype(o, b)),
        (0u64..16, special).prop_map(|(i, v)| Damage::Shape(i, v)),
    ]
}

fn apply(f: &File, d: &Damage) {
    match d {
        Damage::Flip(off, x) => {
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, data_offset() + off).unwrap();
            put(f, *off, &[b[0] ^ x]);
        }
        Damage::Field(i, v) => {
            let off = CTL_FIELDS[*i];
            // Fields at offsets 8..32 and 96 are u32 (version, policy, slots, subs, ndim,
            // dtype length; pid); the others u64.
            if off < 32 || off == 96 {
                put(f, off, &(*v as u32).to_le_bytes());
            } else {
                put(f, off, &v.to_le_bytes());
            }
        }
        Damage::Dtype(o, b) => {
            let o = (*o).min(128 - b.len() as u64);
            put(f, C_DTYPE + o, b);
        }
        Damage::Shape(i, v) => put(f, C_SHAPE + 8 * i, &v.to_le_bytes()),
    }
}

/// Receives from a live subscriber a few times: each call returns; a message is exactly one
/// message long and can be read.
fn poke_recv(s: &mut Subscriber, len: usize) {
    for _ in 0..3 {
        let r = s.recv(Some(Duration::from_millis(1)));
        acceptable(&r, "recv");
        if let Ok(m) = r {
            assert_eq!(m.len(), len);
            assert_eq!(m.to_vec().len(), len);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    /// A damaged control block: opening and describing the channel give an error, or a
    /// channel that works.
    #[test]
    fn damaged_control_block(
        dims in prop::collection::vec(1u64..40, 1..3),
        wide in any::<bool>(),
        slots in 2u32..6,
        latest in any::<bool>(),
        damages in prop::collection::vec(damage(), 1..4),
    ) {
        watchdog();
        let n = name("ctl");
        let meta = meta_for(&dims, wide);
        let policy = if latest { Policy::Latest } else { Policy::Block };
        let mut p = Publisher::create(Some(&n), meta, slots, policy, 4).unwrap();
        let len = p.msg_len();
        let f = segment(&n);
        for d in &damages {
            apply(&f, d);
        }
        let start = Instant::now();
        let i = info(&n);
        acceptable(&i, "info");
        let s = Subscriber::open(&n);
        acceptable(&s, "open");
        prop_assert!(start.elapsed() < Duration::from_secs(5), "open took {:?}", start.elapsed());
        if let Ok(mut s) = s {
            // A channel that opened must have the publisher's message size, or be refused
            // (a damaged block that still describes a valid, smaller layout is a different
            // channel to this subscriber: it must at least stay inside the segment).
            let _ = p.send_copy(&vec![7u8; len], Some(Duration::ZERO));
            let l = s.msg_len();
            poke_recv(&mut s, l);
        }
        drop(f);
        drop(p);
        tick();
    }

    /// Damaged live words under a live publisher and subscriber: recv and send return
    /// (messages, Corrupt, Timeout, Closed), never read outside the channel or hang.
    #[test]
    fn damaged_live_words(
        slots in 2u32..6,
        latest in any::<bool>(),
        sent in 0u64..12,
        writes in prop::collection::vec((0u8..7, any::<u16>(), prop_oneof![
            Just(0u64), Just(1u64), Just(u64::MAX), Just(u32::MAX as u64), 0u64..64, any::<u64>()
        ]), 1..4),
    ) {
        watchdog();
        let n = name("live");
        let policy = if latest { Policy::Latest } else { Policy::Block };
        let mut p = Publisher::create(Some(&n), meta_for(&[8], true), slots, policy, 4).unwrap();
        let mut s = Subscriber::open(&n).unwrap();
        for i in 0..sent.min(slots as u64 - 1) {
            p.send_copy(&i.to_le_bytes().repeat(8), Some(Duration::ZERO)).unwrap();
        }
        let f = segment(&n);
        let log_off = get_u64(&f, C_LOG_OFF);
        let words_off = get_u64(&f, C_WORDS_OFF);
        let subs_off = get_u64(&f, C_SUBS_OFF);
        for (what, at, v) in &writes {
            let k = *at as u64 % slots as u64;
            match what {
                0 => put(&f, C_HEAD, &v.to_le_bytes()),
                1 => put(&f, log_off + LOG_ENTRY * k, &v.to_le_bytes()),          // seq
                2 => put(&f, log_off + LOG_ENTRY * k + 8, &(*v as u32).to_le_bytes()), // slot
                3 => put(&f, words_off + 64 * k, &v.to_le_bytes()),               // slot seq
                4 => put(&f, subs_off + SUB_ENTRY * (k % 4), &(*v as u32).to_le_bytes()), // state
                5 => put(&f, subs_off + SUB_ENTRY * (k % 4) + 8, &v.to_le_bytes()), // position
                _ => put(&f, C_CLOSED, &(*v as u32).to_le_bytes()),
            }
        }
        if std::env::var_os("CHANNEL_FUZZ_VERBOSE").is_some() {
            eprintln!("live: {policy:?} slots {slots} sent {sent} writes {writes:?}");
        }
        let start = Instant::now();
        poke_recv(&mut s, 64);
        let r = p.send_copy(&[1u8; 64], Some(Duration::from_millis(1)));
        acceptable(&r, "send");
        poke_recv(&mut s, 64);
        let i = info(&n);
        acceptable(&i, "info");
        prop_assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
        drop(s);
        drop(f);
        drop(p);
        tick();
    }
}

/// A control block whose magic never came (a creator that died before finishing) is refused
/// after a bounded wait.
#[test]
fn zero_magic_is_refused_in_bounded_time() {
    let n = name("magic");
    let _p = Publisher::create(Some(&n), meta_for(&[4], false), 2, Policy::Block, 4).unwrap();
    let f = segment(&n);
    put(&f, C_MAGIC, &0u64.to_le_bytes());
    let start = Instant::now();
    match Subscriber::open(&n) {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("not a channel"), "{m}"),
        other => panic!("{:?}", other.map(|_| ())),
    }
    assert!(start.elapsed() < Duration::from_secs(5));
    put(&f, C_MAGIC, &u64::from_le_bytes(*b"ZCBUFxxx").to_le_bytes());
    assert!(matches!(
        Subscriber::open(&n),
        Err(Error::InvalidArgument(_) | Error::Corrupt(_))
    ));
}

/// Log entries that name a slot outside the channel give Corrupt, not an access outside it.
#[test]
fn log_entry_naming_a_slot_out_of_range_is_corrupt() {
    for policy in [Policy::Block, Policy::Latest] {
        let n = name("slot");
        let mut p = Publisher::create(Some(&n), meta_for(&[8], true), 4, policy, 4).unwrap();
        let mut s = Subscriber::open(&n).unwrap();
        p.send_copy(&[3u8; 64], None).unwrap();
        let f = segment(&n);
        let log_off = get_u64(&f, C_LOG_OFF);
        for bad in [4u32, 5, 1000, u32::MAX] {
            put(&f, log_off + 8, &bad.to_le_bytes());
            match s.recv(Some(Duration::ZERO)) {
                Err(Error::Corrupt(m)) => assert!(m.contains("slot"), "{m}"),
                Err(e) => panic!("{policy:?} slot {bad}: {e:?}"),
                Ok(m) => panic!("{policy:?} slot {bad}: a message of slot {}", m.slot()),
            }
        }
    }
}

/// A log entry whose sequence number is ahead of the message asked for (a damaged entry: the
/// publisher never wrote it) must not make recv spin forever.
#[test]
fn log_entry_from_the_future_does_not_hang_recv() {
    watchdog();
    for policy in [Policy::Block, Policy::Latest] {
        let n = name("future");
        let mut p = Publisher::create(Some(&n), meta_for(&[8], true), 4, policy, 4).unwrap();
        let mut s = Subscriber::open(&n).unwrap();
        p.send_copy(&[3u8; 64], None).unwrap();
        let f = segment(&n);
        let log_off = get_u64(&f, C_LOG_OFF);
        put(&f, log_off, &100u64.to_le_bytes()); // message 0's entry says 99
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = s.recv(Some(Duration::from_millis(100))).map(|m| m.seq());
            let _ = tx.send(format!("{r:?}"));
        });
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(r) => assert!(!r.starts_with("Ok"), "{policy:?}: {r}"),
            Err(_) => panic!(
                "{policy:?}: recv(timeout 100 ms) has not returned after 5 s: a damaged log \
                 entry (seq ahead of the head) makes it spin forever"
            ),
        }
        drop(p);
    }
    tick();
}
