//! A Rust publisher of camera-like frames on a channel, for `examples/python_subscriber.py`.
//!
//! ```text
//! cargo run --release --example rust_publisher NAME [FRAMES] [SUBSCRIBERS]
//! python examples/python_subscriber.py NAME          # in another terminal
//! ```
//! Creates channel NAME for 480x640 `u8` frames (4 slots, block policy: every subscriber gets
//! every frame), waits up to 30 s for SUBSCRIBERS subscribers (default 1), then publishes FRAMES
//! frames (default 100), each written in place in a loaned slot: byte `(r, c)` is
//! `(r + c + i) % 256`, except that the first 8 bytes hold the frame counter `i` (little
//! endian). Closes the stream and prints `publisher done frames=N name=NAME`.
//! `tests/python/test_channel_examples.py` runs it against the Python subscriber.

use std::time::{Duration, Instant};

use zcbuf::Meta;
use zcbuf::channel::{Policy, Publisher};

const ROWS: usize = 480;
const COLS: usize = 640;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let Some(name) = args.get(1) else {
        eprintln!("usage: rust_publisher NAME [FRAMES] [SUBSCRIBERS]");
        std::process::exit(1);
    };
    let frames: u64 = args.get(2).map_or(Ok(100), |s| s.parse())?;
    let want: usize = args.get(3).map_or(Ok(1), |s| s.parse())?;

    let meta = Meta::typed("|u1", 1, &[ROWS as u64, COLS as u64])?;
    let mut publisher = Publisher::create(Some(name), meta, 4, Policy::Block, 8)?;

    // Subscribers receive what is published after they subscribed: wait for them first.
    let start = Instant::now();
    while publisher.subscribers() < want {
        if start.elapsed() > Duration::from_secs(30) {
            return Err(format!("{want} subscriber(s) did not come within 30 s").into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }

    for i in 0..frames {
        let loan = publisher.loan(Some(Duration::from_secs(30)))?;
        let p = loan.as_ptr();
        for r in 0..ROWS {
            for c in 0..COLS {
                // SAFETY: the loan gives this process `len` (= ROWS * COLS) writable bytes at
                // `p` until it is sent; `r * COLS + c` is below that. Written through the raw
                // pointer: the slot is shared memory, never a `&mut [u8]`.
                unsafe { p.add(r * COLS + c).write((r + c + i as usize) as u8) };
            }
        }
        let counter = i.to_le_bytes();
        // SAFETY: as above, 8 bytes at the start of the slot, from a distinct local array.
        unsafe { std::ptr::copy_nonoverlapping(counter.as_ptr(), p, counter.len()) };
        let seq = publisher.send(loan.slot())?;
        assert_eq!(seq, i, "the first frame of a new channel is sequence 0");
    }
    publisher.close()?;
    println!("publisher done frames={frames} name={name}");
    Ok(())
}
