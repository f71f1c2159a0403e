//! Times zcbuf's native open and create paths against the bare kernel sequences they are built
//! on, in the same program, interleaved in rounds so that machine noise hits both alike:
//!
//! * open + free by name vs `shm_open` + `fstat` + `mmap` + `munmap` + `close`
//!   (what any library must do to map a segment it did not create);
//! * create + free of a shared segment without reserving pages vs `shm_open(O_CREAT|O_EXCL)` +
//!   `ftruncate` + `mmap` + `munmap` + `close` + `shm_unlink`;
//! * the same with pages reserved (`fallocate`), reported apart, per MiB.
//!
//! Usage: `open_loop [ITERATIONS] [SIZE_BYTES] [NAME]` (defaults 20000, 1 MiB). With NAME, the
//! open+free rows open that segment, made and held by another process (as a consumer finds a
//! producer's segment); without, one this process makes and holds. Prints medians of
//! per-round means and their ratios. Also a target for profilers:
//! `perf record target/release/examples/open_loop 200000`.
use std::os::fd::AsFd;
use std::time::Instant;

use memmap2::MmapOptions;
use rustix::fs::Mode;
use rustix::shm::OFlags;
use zcbuf::{CreateOptions, Registry};

const ROUNDS: usize = 15;

fn per_op_us(n: usize, mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed().as_secs_f64() * 1e6 / n as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn bare_open(name: &str) {
    let fd = rustix::shm::open(name, OFlags::RDWR, Mode::empty()).unwrap();
    let st = rustix::fs::fstat(&fd).unwrap();
    let m = MmapOptions::new()
        .len(st.st_size as usize)
        .map_raw(&std::fs::File::from(fd))
        .unwrap();
    drop(m); // munmap; the File (close) was dropped above, after mmap
}

fn bare_create(name: &str, len: usize) {
    let fd = rustix::shm::open(
        name,
        OFlags::CREATE | OFlags::EXCL | OFlags::RDWR,
        Mode::from_raw_mode(0o600),
    )
    .unwrap();
    rustix::fs::ftruncate(fd.as_fd(), len as u64).unwrap();
    let f = std::fs::File::from(fd);
    let m = MmapOptions::new().len(len).map_raw(&f).unwrap();
    drop(f);
    drop(m);
    rustix::shm::unlink(name).unwrap();
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(20000);
    let size: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1 << 20);
    let per_round = (n / ROUNDS).max(1);
    let r = Registry::global();
    // The segment opened by name is held by its creator throughout, as a consumer would find a
    // producer's segment: another process's (NAME given) or this one's.
    let (own, name) = match args.next() {
        Some(name) => (None, name),
        None => {
            let id = r.create_shared(None, size, &CreateOptions::new()).unwrap();
            (Some(id), r.name(id).unwrap().unwrap())
        }
    };
    let os_name = format!("/{name}");
    let bare_name = format!("/zcbuf-open-loop-bare-{}", std::process::id());
    let lazy = CreateOptions::new().reserve(false);
    let reserved = CreateOptions::new();
    let (mut zo, mut bo, mut zc, mut bc, mut zr) = (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        zo.push(per_op_us(per_round, || {
            let h = r.open_shared(&name, false).unwrap();
            r.free(h).unwrap();
        }));
        bo.push(per_op_us(per_round, || bare_open(&os_name)));
        zc.push(per_op_us(per_round, || {
            let h = r.create_shared(None, size, &lazy).unwrap();
            r.free(h).unwrap();
        }));
        bc.push(per_op_us(per_round, || bare_create(&bare_name, size)));
        zr.push(per_op_us(per_round / 4 + 1, || {
            let h = r.create_shared(None, size, &reserved).unwrap();
            r.free(h).unwrap();
        }));
    }
    if let Some(id) = own {
        r.free(id).unwrap();
    }
    let (zo, bo, zc, bc, zr) = (median(zo), median(bo), median(zc), median(bc), median(zr));
    println!(
        "segment size {} KiB, {ROUNDS} rounds of {per_round}; medians of round means; the segment \
         opened by name is held by {}",
        size / 1024,
        if own.is_some() {
            "this process"
        } else {
            "another process"
        }
    );
    println!(
        "open+free by name:   zcbuf {zo:6.2} µs   kernel floor {bo:6.2} µs   ratio {:.2}x (target <= 1.3x)",
        zo / bo
    );
    println!(
        "create+free (lazy):  zcbuf {zc:6.2} µs   kernel floor {bc:6.2} µs   ratio {:.2}x (target <= 1.2x)",
        zc / bc
    );
    println!(
        "create+free reserved: zcbuf {zr:6.2} µs   of which fallocate ~{:.2} µs ({:.2} µs per MiB)",
        zr - zc,
        (zr - zc) / (size as f64 / (1 << 20) as f64)
    );
}
