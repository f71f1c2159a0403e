//! Times opening a buffer by name, and what holder registration costs: the same segment opened
//! as a shared buffer (joins the holder table) and as a file on tmpfs (files have no holders;
//! otherwise the same stat, header read and mapping). Also a target for profilers:
//! `perf record target/release/examples/open_loop 200000 NAME`.
//!
//! Usage: `open_loop [ITERATIONS] [NAME]`. With NAME, open that segment (made by another process,
//! as a consumer would); without, make one here.
use std::time::Instant;

use zcbuf::{CreateOptions, Registry};

fn time_opens(n: usize, mut open: impl FnMut() -> u64, r: &Registry) -> (f64, f64) {
    let (mut open_ns, t) = (0u128, Instant::now());
    for _ in 0..n {
        let t0 = Instant::now();
        let h = open();
        open_ns += t0.elapsed().as_nanos();
        r.free(h).unwrap();
    }
    let per = |ns: f64| ns / n as f64 / 1000.0;
    (per(open_ns as f64), per(t.elapsed().as_nanos() as f64))
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(20000);
    let r = Registry::global();
    let (own, name) = match args.next() {
        Some(name) => (None, name),
        None => {
            let id = r
                .create_shared(None, 1 << 20, &CreateOptions::new())
                .unwrap();
            (Some(id), r.name(id).unwrap().unwrap())
        }
    };
    let (open, cycle) = time_opens(n, || r.open_shared(&name, false).unwrap(), r);
    println!("open_shared: open {open:.2} µs, open+free {cycle:.2} µs (holder registration)");
    let path = format!("/dev/shm/{name}");
    let (open, cycle) = time_opens(n, || r.open_file(&path, false).unwrap(), r);
    println!("open_file on tmpfs: open {open:.2} µs, open+free {cycle:.2} µs (no holders)");
    if let Some(id) = own {
        r.free(id).unwrap();
    }
}
