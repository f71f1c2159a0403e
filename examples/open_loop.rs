//! Opens and frees one shared buffer in a loop: a target for profilers
//! (`valgrind --tool=callgrind target/release/examples/open_loop 2000 [NAME]`).
use zcbuf::{CreateOptions, Registry};

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20000);
    let r = Registry::global();
    // With a second argument, open that segment (made by another process) instead of our own.
    let (id, name) = match std::env::args().nth(2) {
        Some(name) => (None, name),
        None => {
            let id = r
                .create_shared(None, 1 << 20, &CreateOptions::new())
                .unwrap();
            (Some(id), r.name(id).unwrap().unwrap())
        }
    };
    let t = std::time::Instant::now();
    for _ in 0..n {
        let h = r.open_shared(&name, false).unwrap();
        r.free(h).unwrap();
    }
    println!(
        "open+free: {:.2} µs",
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    );
    if let Some(id) = id {
        r.free(id).unwrap();
    }
}
