//! Channels from Rust: delivery, order, both policies, pins, end of stream, bad input.

use std::time::Duration;

use zcbuf::Error;
use zcbuf::Meta;
use zcbuf::channel::{Policy, Publisher, Subscriber, info};

fn name(tag: &str) -> String {
    format!("chan-test-{tag}-{}", std::process::id())
}

fn u64s(shape: u64) -> Meta {
    Meta::typed("<u8", 8, &[shape]).unwrap()
}

fn val(m: &zcbuf::channel::Message) -> u64 {
    u64::from_le_bytes(m.to_vec()[..8].try_into().unwrap())
}

#[test]
fn block_delivers_every_message_in_order_across_threads() {
    let n = name("block");
    let mut p = Publisher::create(Some(&n), u64s(4), 4, Policy::Block, 8).unwrap();
    let mut s = Subscriber::open(&n).unwrap();
    let total = 10_000u64;
    let t = std::thread::spawn(move || {
        let mut got = Vec::new();
        loop {
            match s.recv(Some(Duration::from_secs(10))) {
                Ok(m) => {
                    assert_eq!(m.seq(), got.len() as u64);
                    got.push(val(&m));
                }
                Err(Error::Closed(msg)) => {
                    assert!(msg.contains("end of stream"), "{msg}");
                    break;
                }
                Err(e) => panic!("{e}"),
            }
        }
        got
    });
    for i in 0..total {
        let mut data = [0u8; 32];
        data[..8].copy_from_slice(&i.to_le_bytes());
        p.send_copy(&data, Some(Duration::from_secs(10))).unwrap();
    }
    p.close().unwrap();
    let got = t.join().unwrap();
    assert_eq!(got, (0..total).collect::<Vec<_>>());
}

#[test]
fn a_kept_message_is_never_overwritten() {
    let n = name("keep");
    let mut p = Publisher::create(Some(&n), u64s(1), 2, Policy::Latest, 4).unwrap();
    let mut s = Subscriber::open(&n).unwrap();
    p.send_copy(&7u64.to_le_bytes(), None).unwrap();
    let kept = s.recv(Some(Duration::from_secs(1))).unwrap();
    // The publisher keeps going (latest never waits for positions), but must leave the pinned
    // slot alone: with 2 slots it alternates on the other one.
    for i in 100..200u64 {
        p.send_copy(&i.to_le_bytes(), Some(Duration::from_secs(1)))
            .unwrap();
        assert_eq!(val(&kept), 7, "a kept message was overwritten");
    }
    let latest = s.recv(Some(Duration::from_secs(1))).unwrap();
    assert_eq!(val(&latest), 199);
    assert_eq!(s.missed(), 99);
    // Both slots pinned now: the publisher cannot loan one and says so after its timeout.
    match p.loan(Some(Duration::from_millis(50))) {
        Err(Error::Timeout(m)) => assert!(m.contains("pin"), "{m}"),
        other => panic!("{other:?}"),
    }
    drop(kept);
    p.send_copy(&1u64.to_le_bytes(), Some(Duration::from_secs(1)))
        .unwrap();
}

#[test]
fn block_publisher_waits_for_the_slowest_and_times_out() {
    let n = name("slow");
    let mut p = Publisher::create(Some(&n), u64s(1), 3, Policy::Block, 4).unwrap();
    let mut fast = Subscriber::open(&n).unwrap();
    let _slow = Subscriber::open(&n).unwrap();
    for i in 0..3u64 {
        p.send_copy(&i.to_le_bytes(), Some(Duration::ZERO)).unwrap();
        drop(fast.recv(Some(Duration::ZERO)).unwrap());
    }
    match p.send_copy(&9u64.to_le_bytes(), Some(Duration::from_millis(30))) {
        Err(Error::Timeout(_)) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    drop(_slow); // closed: it no longer holds the publisher back
    p.send_copy(&9u64.to_le_bytes(), Some(Duration::from_secs(1)))
        .unwrap();
}

#[test]
fn end_of_stream_after_draining_and_info() {
    let n = name("eos");
    let mut p = Publisher::create(Some(&n), u64s(2), 4, Policy::Block, 4).unwrap();
    let mut s = Subscriber::open(&n).unwrap();
    p.send_copy(&[1u8; 16], None).unwrap();
    p.send_copy(&[2u8; 16], None).unwrap();
    let i = info(&n).unwrap();
    assert_eq!((i.published, i.slots, i.subscribers.len()), (2, 4, 1));
    assert!(i.publisher.1, "publisher alive");
    p.close().unwrap();
    assert_eq!(
        s.recv(Some(Duration::ZERO)).unwrap().to_vec(),
        vec![1u8; 16]
    );
    assert_eq!(
        s.recv(Some(Duration::ZERO)).unwrap().to_vec(),
        vec![2u8; 16]
    );
    assert!(matches!(
        s.recv(Some(Duration::ZERO)),
        Err(Error::Closed(_))
    ));
    assert!(matches!(
        s.recv(Some(Duration::from_secs(1))),
        Err(Error::Closed(_))
    ));
}

#[test]
fn bad_input_is_an_error() {
    let n = name("bad");
    assert!(matches!(
        Publisher::create(Some(&n), u64s(1), 0, Policy::Block, 4),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        Publisher::create(Some(&n), u64s(1), 1, Policy::Latest, 4),
        Err(Error::InvalidArgument(_))
    ));
    let mut p = Publisher::create(Some(&n), u64s(1), 2, Policy::Block, 1).unwrap();
    assert!(matches!(
        p.send_copy(&[0u8; 3], None),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(p.send(1), Err(Error::InvalidArgument(_))));
    // A second publisher of the same name: the name is held by this one.
    assert!(matches!(
        Publisher::create(Some(&n), u64s(1), 2, Policy::Block, 1),
        Err(Error::AlreadyExists(_))
    ));
    let _s = Subscriber::open(&n).unwrap();
    match Subscriber::open(&n) {
        Err(Error::OutOfMemory(m)) => assert!(m.contains("subscriber entries"), "{m}"),
        other => panic!("{:?}", other.map(|_| ())),
    }
    // A plain buffer is not a channel.
    let reg = zcbuf::Registry::global();
    let bn = name("plain");
    let id = reg
        .create_shared(Some(&bn), 4096, &zcbuf::CreateOptions::new())
        .unwrap();
    match Subscriber::open(&bn) {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("not a channel"), "{m}"),
        other => panic!("{:?}", other.map(|_| ())),
    }
    reg.free(id).unwrap();
}

#[test]
fn a_closed_subscriber_gets_no_more_messages() {
    // Once closed, its position no longer protects anything: recv must refuse, not hand out
    // a view the publisher may overwrite.
    let n = name("closed-recv");
    let mut p = Publisher::create(Some(&n), u64s(1), 2, Policy::Block, 4).unwrap();
    let mut s = Subscriber::open(&n).unwrap();
    p.send_copy(&1u64.to_le_bytes(), None).unwrap();
    s.close();
    match s.recv(Some(Duration::ZERO)) {
        Err(Error::Closed(m)) => assert!(m.contains("subscriber was closed"), "{m}"),
        other => panic!("{:?}", other.map(|m| m.seq())),
    }
}

#[test]
fn close_from_another_thread_wakes_a_waiting_recv_and_loan() {
    let n = name("closer");
    let mut p = Publisher::create(Some(&n), u64s(1), 1, Policy::Block, 4).unwrap();
    let mut s = Subscriber::open(&n).unwrap();
    let closer = s.closer();
    let t = std::thread::spawn(move || s.recv(None).map(|m| m.seq()));
    std::thread::sleep(Duration::from_millis(50));
    closer.close();
    assert!(matches!(t.join().unwrap(), Err(Error::Closed(_))));
    // A publisher waiting for a slot (the ring is held by a kept message) is woken by close.
    let mut s2 = Subscriber::open(&n).unwrap();
    p.send_copy(&1u64.to_le_bytes(), None).unwrap();
    let kept = s2.recv(Some(Duration::from_secs(1))).unwrap();
    let pc = p.closer();
    let t = std::thread::spawn(move || p.send_copy(&2u64.to_le_bytes(), None));
    std::thread::sleep(Duration::from_millis(50));
    pc.close();
    assert!(matches!(t.join().unwrap(), Err(Error::Closed(_))));
    drop(kept);
}

#[test]
fn a_channel_cannot_be_sealed() {
    let n = name("seal");
    let _p = Publisher::create(Some(&n), u64s(1), 2, Policy::Block, 4).unwrap();
    let reg = zcbuf::Registry::global();
    let id = reg.open_shared(&n, false).unwrap();
    match reg.seal(id) {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("is a channel"), "{m}"),
        other => panic!("{other:?}"),
    }
    reg.free(id).unwrap();
    let _s = Subscriber::open(&n).unwrap(); // still a working channel
}
