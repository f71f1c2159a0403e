//! Two Rust processes sharing one buffer: this program starts itself again as a child, and each
//! side sees the other's writes in the same pages, while both are running.
//!
//! ```text
//! cargo run --release --example rust_pair [NAME]
//! ```
//!
//! The parent creates a `u64` array of [`LEN`] elements in shared memory named NAME (default
//! `rustface-pair-<pid>`), writes element `i = i * 3`, and starts the child (`current_exe()`
//! with `child NAME`), talking to it over its stdin and stdout:
//!
//! 1. the child opens NAME, checks the parent's values and says `opened`;
//! 2. the parent then writes element 0 = [`TOKEN`] (after the child has mapped the segment, so
//!    only shared pages can carry it) and says `go`;
//! 3. the child reads the token, writes `token + 1` into element 1 and `i * 7` into the second
//!    half, says `done`, and exits;
//! 4. the parent checks those writes and prints `pair ok ...`. When it exits, no process holds
//!    the segment and its name is removed.
//!
//! `tests/python/test_rust_face.py` runs it and checks the name is gone afterwards.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use zcbuf::Buffer;

/// Elements in the array.
const LEN: usize = 4096;
/// What the parent writes once the child has mapped the segment.
const TOKEN: u64 = 0x5eed_cafe;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("child") => child(args.get(2).ok_or("child needs a NAME")?),
        Some(name) => parent(name),
        None => parent(&format!("rustface-pair-{}", std::process::id())),
    }
}

fn parent(name: &str) -> Res<()> {
    let mut buf = Buffer::shared_typed::<u64>(Some(name), &[LEN as u64])?;
    let init: Vec<u64> = (0..LEN as u64).map(|i| i * 3).collect();
    buf.copy_from_slice(0, &init)?;
    println!("parent {} created {name}", std::process::id());

    let mut kid = Command::new(std::env::current_exe()?)
        .args(["child", name])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut to_kid = kid.stdin.take().ok_or("no stdin")?;
    let mut from_kid = BufReader::new(kid.stdout.take().ok_or("no stdout")?);
    let mut expect = |want: &str| -> Res<()> {
        let mut line = String::new();
        from_kid.read_line(&mut line)?;
        if line.trim() != want {
            return Err(format!("child said {line:?}, expected {want:?}").into());
        }
        Ok(())
    };

    expect("opened")?;
    buf.write(0, TOKEN)?; // the child has mapped the segment already
    writeln!(to_kid, "go")?;
    to_kid.flush()?;
    expect("done")?;
    let status = kid.wait()?;
    if !status.success() {
        return Err(format!("child failed: {status}").into());
    }

    let reply: u64 = buf.read(1)?;
    if reply != TOKEN + 1 {
        return Err(format!("element 1 is {reply:#x}, expected {:#x}", TOKEN + 1).into());
    }
    let mut second = vec![0u64; LEN / 2];
    buf.copy_to_slice(LEN / 2, &mut second)?;
    let ok = second
        .iter()
        .enumerate()
        .all(|(k, &v)| v == (LEN / 2 + k) as u64 * 7);
    if !ok {
        return Err("the child's second half is not i * 7".into());
    }
    println!(
        "pair ok: parent saw the child's reply {reply:#x} and its {} elements",
        LEN / 2
    );
    Ok(())
}

fn child(name: &str) -> Res<()> {
    let mut buf = Buffer::open(name, false)?;
    if buf.meta().shape != [LEN as u64] {
        return Err(format!("unexpected shape {:?}", buf.meta().shape).into());
    }
    let mut seen = vec![0u64; LEN];
    buf.copy_to_slice(0, &mut seen)?;
    if seen.iter().enumerate().any(|(i, &v)| v != i as u64 * 3) {
        return Err("the parent's values are not i * 3".into());
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "opened")?;
    out.flush()?;

    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let token: u64 = buf.read(0)?;
    if token != TOKEN {
        return Err(format!("element 0 is {token:#x}, expected the parent's {TOKEN:#x}").into());
    }
    eprintln!(
        "child {} saw the parent's token {token:#x}",
        std::process::id()
    );
    buf.write(1, token + 1)?;
    let half: Vec<u64> = (LEN / 2..LEN).map(|i| i as u64 * 7).collect();
    buf.copy_from_slice(LEN / 2, &half)?;
    writeln!(out, "done")?;
    out.flush()?;
    Ok(())
}
