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
        "sleeper" => {
            // Receives messages that carry their send time (CLOCK_MONOTONIC, ns, system-wide);
            // prints the one-way latencies' p50 and p99.
            let mut s = subscribe(&format!("chbench-sleep-{tag}"));
            let mut lat = Vec::new();
            while let Ok(m) = s.recv(None) {
                let now = mono_ns();
                let sent = u64::from_le_bytes(m.to_vec()[..8].try_into().unwrap());
                lat.push(now.saturating_sub(sent));
            }
            lat.sort();
            let q = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize] as f64 / 1e3;
            println!("{:.2} {:.2} {}", q(0.5), q(0.99), lat.len());
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

fn mono_ns() -> u64 {
    // CLOCK_MONOTONIC is one clock for every process of the machine.
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec for clock_gettime to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() > 1 && ["echo", "sink", "sleeper"].contains(&args[1].as_str()) {
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

    // Latency after the subscriber has gone to sleep: a message every 2 ms.
    let mut sl = Publisher::create(
        Some(&format!("chbench-sleep-{tag}")),
        meta(bytes.max(8)),
        8,
        Policy::Block,
        4,
    )
    .unwrap();
    let sleeper = std::process::Command::new(&exe)
        .args(["sleeper", &tag, &bytes.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    while sl.subscribers() == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut msg = vec![0u8; bytes.max(8) as usize];
    for _ in 0..500 {
        std::thread::sleep(Duration::from_millis(2));
        msg[..8].copy_from_slice(&mono_ns().to_le_bytes());
        sl.send_copy(&msg, None).unwrap();
    }
    sl.close().unwrap();
    let out = sleeper.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let f: Vec<&str> = text.split_whitespace().collect();
    println!(
        "one-way latency after the subscriber slept (a message every 2 ms, {} messages): p50 {} us, p99 {} us",
        f[2], f[0], f[1]
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
