//! Rust-to-Rust channel figures: one-way latency (ping-pong between two processes, half the
//! round trip) and throughput (block policy), 64-byte messages by default.
//!
//! ```text
//! cargo run --release --example channel_rust [MESSAGES] [BYTES]
//! ```
//! Prints medians and percentiles; the process spawns itself as the other side.

use std::time::{Duration, Instant};

use zcbuf::Meta;
use zcbuf::channel::{Policy, Publisher, Subscriber};

fn meta(bytes: u64) -> Meta {
    Meta::typed("|u1", 1, &[bytes]).unwrap()
}

fn subscribe(name: &str) -> Subscriber {
    let start = Instant::now();
    loop {
        match Subscriber::open(name) {
            Ok(s) => return s,
            Err(_) if start.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => panic!("subscribe {name}: {e}"),
        }
    }
}

fn child(role: &str, tag: &str, bytes: u64) {
    match role {
        "echo" => {
            let mut ping = subscribe(&format!("chbench-ping-{tag}"));
            let mut pong = Publisher::create(
                Some(&format!("chbench-pong-{tag}")),
                meta(bytes),
                8,
                Policy::Block,
                4,
            )
            .unwrap();
            while let Ok(m) = ping.recv(None) {
                let l = pong.loan(None).unwrap();
                // SAFETY: the loan gives `len` writable bytes; the message `len` readable
                // ones; both the same size, in different slots.
                unsafe { std::ptr::copy_nonoverlapping(m.as_ptr(), l.as_ptr(), l.len()) };
                pong.send(l.slot()).unwrap();
            }
        }
        "sink" => {
            let mut s = subscribe(&format!("chbench-thr-{tag}"));
            let mut n = 0u64;
            while s.recv(None).is_ok() {
                n += 1;
            }
            println!("{n}");
        }
        _ => unreachable!(),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() > 1 && (args[1] == "echo" || args[1] == "sink") {
        child(&args[1], &args[2], args[3].parse().unwrap());
        return;
    }
    let n: usize = args.get(1).map_or(200_000, |s| s.parse().unwrap());
    let bytes: u64 = args.get(2).map_or(64, |s| s.parse().unwrap());
    let tag = std::process::id().to_string();
    let exe = std::env::current_exe().unwrap();

    // Latency: ping-pong.
    let mut ping = Publisher::create(
        Some(&format!("chbench-ping-{tag}")),
        meta(bytes),
        8,
        Policy::Block,
        4,
    )
    .unwrap();
    let mut echo = std::process::Command::new(&exe)
        .args(["echo", &tag, &bytes.to_string()])
        .spawn()
        .unwrap();
    let mut pong = subscribe(&format!("chbench-pong-{tag}"));
    let data = vec![7u8; bytes as usize];
    let rounds = (n / 10).max(1000);
    let mut rtt = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        ping.send_copy(&data, None).unwrap();
        let m = pong.recv(None).unwrap();
        rtt.push(t.elapsed());
        drop(m);
    }
    ping.close().unwrap();
    echo.wait().unwrap();
    rtt.sort();
    let q = |p: f64| rtt[((rtt.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6 / 2.0;
    println!(
        "one-way latency, {bytes} B, Rust -> Rust ({} round trips): p50 {:.2} us, p99 {:.2} us",
        rounds,
        q(0.5),
        q(0.99)
    );

    // Throughput: block policy, 256 slots.
    let mut thr = Publisher::create(
        Some(&format!("chbench-thr-{tag}")),
        meta(bytes),
        256,
        Policy::Block,
        4,
    )
    .unwrap();
    let sink = std::process::Command::new(&exe)
        .args(["sink", &tag, &bytes.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the subscriber to be there before timing.
    let start = Instant::now();
    while zcbuf::channel::info(thr.name())
        .map(|i| i.subscribers.is_empty())
        .unwrap_or(true)
    {
        assert!(start.elapsed() < Duration::from_secs(10), "no subscriber");
        std::thread::sleep(Duration::from_millis(1));
    }
    let t = Instant::now();
    for _ in 0..n {
        thr.send_copy(&data, None).unwrap();
    }
    thr.close().unwrap();
    let out = sink.wait_with_output().unwrap();
    let secs = t.elapsed().as_secs_f64();
    let got: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert_eq!(got, n as u64, "messages lost");
    println!(
        "throughput, {bytes} B, Rust -> Rust, block: {:.2} M messages/s ({n} in {:.3} s)",
        n as f64 / secs / 1e6,
        secs
    );
}
