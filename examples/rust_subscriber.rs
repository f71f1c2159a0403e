//! A Rust subscriber for `examples/python_publisher.py`: typed messages from a Python publisher.
//!
//! ```text
//! python examples/python_publisher.py NAME [FRAMES]
//! cargo run --release --example rust_subscriber NAME [FRAMES]   # in another terminal
//! ```
//! Subscribes to channel NAME (waiting up to 30 s for it), checks that its messages are 120x160
//! `<f4`, and receives until the end of the stream: message `i` must have sequence number `i`
//! and hold `i * 1000 + r * 160 + c` at `(r, c)`. Each message is read in place (the slot stays
//! pinned while the `Message` lives). Prints `rust subscriber ok frames=N ...`; exits non-zero
//! on any mismatch (or if FRAMES is given and a different number came).

use std::time::{Duration, Instant};

use zcbuf::Error;
use zcbuf::channel::Subscriber;

fn subscribe(name: &str) -> Result<Subscriber, Error> {
    let start = Instant::now();
    loop {
        match Subscriber::open(name) {
            Ok(s) => return Ok(s),
            Err(Error::NotFound(_) | Error::InvalidArgument(_))
                if start.elapsed() < Duration::from_secs(30) =>
            {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => return Err(e),
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let Some(name) = args.get(1) else {
        eprintln!("usage: rust_subscriber NAME [FRAMES]");
        std::process::exit(1);
    };
    let frames: Option<u64> = args.get(2).map(|s| s.parse()).transpose()?;
    let mut sub = subscribe(name)?;
    let meta = sub.meta().clone();
    if meta.dtype != "<f4" || meta.shape != [120, 160] {
        return Err(format!(
            "expected 120x160 <f4 messages, got {} {:?}",
            meta.dtype, meta.shape
        )
        .into());
    }
    let (rows, cols) = (meta.shape[0] as usize, meta.shape[1] as usize);
    let mut n = 0u64;
    let mut sum = 0f64;
    loop {
        let m = match sub.recv(Some(Duration::from_secs(30))) {
            Ok(m) => m,
            Err(Error::Closed(_)) => break,
            Err(e) => return Err(e.into()),
        };
        if m.seq() != n || m.len() != rows * cols * 4 {
            return Err(format!("message {n}: sequence {}, {} bytes", m.seq(), m.len()).into());
        }
        let p = m.as_ptr().cast::<f32>();
        for k in 0..rows * cols {
            // SAFETY: the message is `rows * cols` f32s (checked above) and stays valid and
            // unchanged while `m` lives; read unaligned, as bytes another process wrote.
            let v = unsafe { p.add(k).read_unaligned() };
            let want = (n * 1000 + k as u64) as f32;
            if v != want {
                return Err(format!("message {n}: element {k} is {v}, expected {want}").into());
            }
            sum += f64::from(v);
        }
        n += 1;
    }
    if let Some(f) = frames {
        if f != n {
            return Err(format!("{n} messages came, {f} expected").into());
        }
    }
    println!(
        "rust subscriber ok frames={n} shape={rows}x{cols} dtype={} sum={sum}",
        meta.dtype
    );
    Ok(())
}
