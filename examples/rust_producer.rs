//! A Rust producer for `examples/python_consumer.py`: the same shared pages seen as a typed
//! array in both languages, written both ways, no copy.
//!
//! ```text
//! cargo run --release --example rust_producer [NAME]     # prints "ready NAME ROWS COLS"
//! python examples/python_consumer.py NAME                # in another terminal
//! # then press Enter in the producer's terminal: it checks what the consumer wrote back
//! ```
//!
//! The producer creates a `float32` array of shape (ROWS, COLS) in shared memory named NAME
//! (default `rustface-producer-<pid>`), fills element `i` with `i * 0.25`, prints its name, and
//! waits for a line on stdin. The consumer opens the name with `zcbuf.open`, checks every value
//! and negates the last row in place. After the line, the producer checks the last row and
//! prints `verified ...`; when both have exited the name is gone from /dev/shm.
//! `tests/python/test_rust_face.py` runs the pair.

use std::io::{BufRead, Write};

use zcbuf::Buffer;

const ROWS: u64 = 48;
const COLS: u64 = 64;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let name = std::env::args()
        .nth(1)
        .unwrap_or_else(|| format!("rustface-producer-{}", std::process::id()));
    let mut frame = Buffer::shared_typed::<f32>(Some(&name), &[ROWS, COLS])?;
    let values: Vec<f32> = (0..ROWS * COLS).map(|i| i as f32 * 0.25).collect();
    frame.copy_from_slice(0, &values)?;

    println!("ready {name} {ROWS} {COLS}");
    std::io::stdout().flush()?;

    // The consumer works now; a line on stdin (or EOF) says it has finished.
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;

    let last = (ROWS - 1) * COLS;
    let mut row = vec![0f32; COLS as usize];
    frame.copy_to_slice(last as usize, &mut row)?;
    let want: Vec<f32> = values[last as usize..].iter().map(|v| -v).collect();
    if row != want {
        return Err(format!(
            "last row is {:?}..., expected {:?}...",
            &row[..4],
            &want[..4]
        )
        .into());
    }
    // The rest is untouched.
    let mut rest = vec![0f32; last as usize];
    frame.copy_to_slice(0, &mut rest)?;
    if rest != values[..last as usize] {
        return Err("the consumer changed more than the last row".into());
    }
    let sum: f64 = row.iter().map(|&v| f64::from(v)).sum();
    println!("verified last row negated by the consumer, sum {sum}");
    Ok(())
}
