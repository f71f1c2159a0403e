//! Integration tests of the registry: leases and free, every bad input, threads, processes.

use std::io::Write;
use std::process::Command;
use std::sync::Arc;

use zcbuf::{CreateOptions, Error, Kind, Meta, Registry};

fn opts() -> CreateOptions {
    CreateOptions::new()
}

fn maps_mention(needle: &str) -> bool {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .contains(needle)
}

fn shm_exists(name: &str) -> bool {
    std::path::Path::new("/dev/shm").join(name).exists()
}

fn tmpdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("zcbuf-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn lease_outlives_free_then_unmaps() {
    let r = Registry::new();
    let id = r.create_shared(None, 1 << 20, &opts()).unwrap();
    let name = r.name(id).unwrap().unwrap();
    assert!(name.starts_with("zcbuf-") && name.len() >= 6 + 24, "{name}");
    let (p, n) = r.acquire(id).unwrap();
    assert_eq!(n, 1 << 20);
    // SAFETY: we hold a lease on n bytes at p.
    unsafe { p.as_ptr().write_bytes(0xab, n) };
    r.free(id).unwrap();
    // Retired at once...
    assert!(matches!(r.acquire(id), Err(Error::NotFound(_))));
    assert!(matches!(r.size(id), Err(Error::NotFound(_))));
    assert!(matches!(r.free(id), Err(Error::NotFound(_))));
    // ...but the memory is still mapped, and while this process maps it, it holds it: the name
    // stays, so other processes can still open what we use.
    assert!(shm_exists(&name));
    assert!(maps_mention(&name));
    // SAFETY: the lease is still held.
    assert_eq!(unsafe { *p.as_ptr().add(n - 1) }, 0xab);
    r.release(id).unwrap();
    assert!(!maps_mention(&name), "unmapped after the last release");
    assert!(
        !shm_exists(&name),
        "the last unmap anywhere removes the name"
    );
    assert!(matches!(r.release(id), Err(Error::NotFound(_))));
}

#[test]
fn release_without_lease_and_double_free() {
    let r = Registry::new();
    let id = r.create(64, &opts()).unwrap();
    assert!(matches!(r.release(id), Err(Error::InvalidArgument(_))));
    r.acquire(id).unwrap();
    r.acquire(id).unwrap();
    r.free(id).unwrap();
    assert!(matches!(r.free(id), Err(Error::NotFound(_))));
    r.release(id).unwrap();
    r.release(id).unwrap();
    assert!(matches!(r.release(id), Err(Error::NotFound(_))));
    assert!(matches!(r.acquire(0), Err(Error::NotFound(_))));
    assert!(matches!(r.acquire(u64::MAX), Err(Error::NotFound(_))));
}

#[test]
fn zero_length_buffers_of_every_kind() {
    let r = Registry::new();
    let d = tmpdir("zero");
    let ids = [
        r.create(0, &opts()).unwrap(),
        r.create_shared(None, 0, &opts()).unwrap(),
        r.create_file(d.join("z"), 0, &opts()).unwrap(),
    ];
    for id in ids {
        let (p, n) = r.acquire(id).unwrap();
        assert_eq!(n, 0);
        assert_eq!(p.as_ptr() as usize % 8, 0, "aligned");
        r.release(id).unwrap();
        r.free(id).unwrap();
    }
    let id = r.open_file(d.join("z"), true).unwrap();
    assert_eq!(r.size(id).unwrap(), 0);
    r.free(id).unwrap();
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn impossible_sizes_are_out_of_memory() {
    let r = Registry::new();
    for len in [usize::MAX, usize::MAX / 2, 1usize << 62] {
        let e = r.create(len, &opts()).unwrap_err();
        assert!(matches!(e, Error::OutOfMemory(_)), "{e}");
        let e = r.create_shared(None, len, &opts()).unwrap_err();
        assert!(matches!(e, Error::OutOfMemory(_)), "{e}");
    }
    // no half-made segment is left behind
    let left: Vec<_> = zcbuf::gc::list()
        .unwrap()
        .into_iter()
        .filter(|s| s.creator_pid == std::process::id() && !s.held)
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn bad_names() {
    let r = Registry::new();
    let long = "x".repeat(201);
    for bad in ["", "a/b", "/abs", ".", "..", "nul\0byte", long.as_str()] {
        let e = r.create_shared(Some(bad), 8, &opts()).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{bad:?}: {e}");
        let e = r.open_shared(bad, false).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{bad:?}: {e}");
    }
    assert!(
        r.create_shared(Some(&"y".repeat(200)), 8, &opts())
            .is_ok_and(|id| r.free(id).is_ok())
    );
}

#[test]
fn existing_and_missing_names() {
    let r = Registry::new();
    let name = format!("zcbuf-test-exists-{}", std::process::id());
    let id = r.create_shared(Some(&name), 8, &opts()).unwrap();
    let e = r.create_shared(Some(&name), 8, &opts()).unwrap_err();
    assert!(matches!(e, Error::AlreadyExists(_)), "{e}");
    assert!(e.message().contains("open it instead"), "{e}");
    r.free(id).unwrap();
    let e = r.open_shared(&name, false).unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e}");
}

#[test]
fn mode_is_0600() {
    use std::os::unix::fs::PermissionsExt;
    let r = Registry::new();
    let id = r.create_shared(None, 8, &opts()).unwrap();
    let name = r.name(id).unwrap().unwrap();
    let m = std::fs::metadata(format!("/dev/shm/{name}")).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o600);
    r.free(id).unwrap();
    let d = tmpdir("mode");
    let id = r.create_file(d.join("f"), 8, &opts()).unwrap();
    let m = std::fs::metadata(d.join("f")).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o600);
    r.free(id).unwrap();
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn typed_meta_round_trips_and_is_checked() {
    let r = Registry::new();
    let meta = Meta::typed("<f8", 8, &[3, 4]).unwrap();
    let o = opts().meta(meta.clone());
    let id = r.create_shared(None, 96, &o).unwrap();
    let name = r.name(id).unwrap().unwrap();
    let id2 = r.open_shared(&name, true).unwrap();
    let info = r.info(id2).unwrap();
    assert_eq!(info.meta, meta);
    assert_eq!(info.kind, Kind::Shared);
    assert!(info.readonly);
    r.free(id2).unwrap();
    r.free(id).unwrap();
    for len in [95, 97, 0] {
        let e = r.create_shared(None, len, &o).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        let e = r.create(len, &o).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    }
}

#[test]
fn read_only_lease_refuses_writes() {
    let r = Registry::new();
    let id = r.create_shared(None, 16, &opts()).unwrap();
    let name = r.name(id).unwrap().unwrap();
    let ro = r.open_shared(&name, true).unwrap();
    let lease = r.lease(ro).unwrap();
    assert!(lease.readonly());
    assert!(matches!(lease.write_at(0, b"x"), Err(Error::ReadOnly(_))));
    let w = r.lease(id).unwrap();
    w.write_at(3, b"hey").unwrap();
    let mut out = [0u8; 3];
    lease.read_at(3, &mut out).unwrap();
    assert_eq!(&out, b"hey");
    assert!(matches!(
        lease.read_at(14, &mut out),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        w.write_at(usize::MAX, b"x"),
        Err(Error::InvalidArgument(_))
    ));
    drop((lease, w));
    r.free(ro).unwrap();
    r.free(id).unwrap();
}

#[test]
fn files_persist_and_validate() {
    let r = Registry::new();
    let d = tmpdir("files");
    let p = d.join("data.zcbuf");
    let meta = Meta::typed("<u2", 2, &[5]).unwrap();
    let id = r.create_file(&p, 10, &opts().meta(meta.clone())).unwrap();
    r.lease(id).unwrap().write_at(0, b"0123456789").unwrap();
    r.flush(id).unwrap();
    r.free(id).unwrap();
    // existing path refused, nothing truncated
    let e = r.create_file(&p, 10, &opts()).unwrap_err();
    assert!(matches!(e, Error::AlreadyExists(_)), "{e}");
    let id = r.open_file(&p, true).unwrap();
    assert_eq!(r.info(id).unwrap().meta, meta);
    let mut out = [0u8; 10];
    r.lease(id).unwrap().read_at(0, &mut out).unwrap();
    assert_eq!(&out, b"0123456789");
    r.free(id).unwrap();

    // a symlink is never followed on create, even a dangling one
    let target = d.join("target");
    let link = d.join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let e = r.create_file(&link, 10, &opts()).unwrap_err();
    assert!(matches!(e, Error::AlreadyExists(_)), "{e}");
    assert!(!target.exists());

    // not a zcbuf file
    let junk = d.join("junk");
    std::fs::File::create(&junk)
        .unwrap()
        .write_all(&[7u8; 20000])
        .unwrap();
    let e = r.open_file(&junk, false).unwrap_err();
    assert!(matches!(e, Error::Corrupt(_)), "{e}");
    // empty file
    std::fs::File::create(d.join("empty")).unwrap();
    let e = r.open_file(d.join("empty"), false).unwrap_err();
    assert!(matches!(e, Error::Corrupt(_)), "{e}");
    // truncated after creation
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(4096 + 5)
        .unwrap();
    let e = r.open_file(&p, false).unwrap_err();
    assert!(matches!(e, Error::Corrupt(_)), "{e}");
    assert!(e.message().contains("truncated"), "{e}");
    // missing, directory, empty path
    assert!(matches!(
        r.open_file(d.join("nope"), false),
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        r.open_file(&d, true),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        r.open_file("", true),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        r.create_file("", 1, &opts()),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        r.create_file(d.join("no/such/dir"), 1, &opts()),
        Err(Error::NotFound(_))
    ));
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn hostile_segment_is_corrupt() {
    let r = Registry::new();
    let name = format!("zcbuf-test-hostile-{}", std::process::id());
    let path = format!("/dev/shm/{name}");
    std::fs::write(&path, vec![0x5au8; 9000]).unwrap();
    let e = r.open_shared(&name, false).unwrap_err();
    assert!(matches!(e, Error::Corrupt(_)), "{e}");
    std::fs::remove_file(&path).unwrap();
}

/// A tiny deterministic PRNG (xorshift64*), so the stress test needs no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn threads_hammer_a_shared_table() {
    let r = Arc::new(Registry::new());
    let table: Arc<std::sync::Mutex<Vec<u64>>> = Arc::default();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let r = Arc::clone(&r);
            let table = Arc::clone(&table);
            std::thread::spawn(move || {
                let mut rng = Rng(0x9e37_79b9 + t);
                let mut checked = 0u64;
                for _ in 0..3000 {
                    match rng.next() % 4 {
                        0 => {
                            let len = (rng.next() % 20000) as usize;
                            let id = if rng.next() % 4 == 0 {
                                r.create_shared(None, len, &CreateOptions::new()).unwrap()
                            } else {
                                r.create(len, &CreateOptions::new()).unwrap()
                            };
                            // Every byte of buffer `id` holds the low byte of `id`.
                            let (p, n) = r.acquire(id).unwrap();
                            // SAFETY: lease held on n bytes.
                            unsafe { p.as_ptr().write_bytes(id as u8, n) };
                            r.release(id).unwrap();
                            table.lock().unwrap().push(id);
                        }
                        1 => {
                            let victim = {
                                let mut tb = table.lock().unwrap();
                                if tb.is_empty() {
                                    continue;
                                }
                                let i = (rng.next() as usize) % tb.len();
                                tb.swap_remove(i)
                            };
                            r.free(victim).unwrap();
                        }
                        _ => {
                            let id = {
                                let tb = table.lock().unwrap();
                                if tb.is_empty() {
                                    continue;
                                }
                                tb[(rng.next() as usize) % tb.len()]
                            };
                            // It may be freed by another thread at any moment.
                            if let Ok((p, n)) = r.acquire(id) {
                                std::thread::yield_now();
                                for i in (0..n).step_by(97) {
                                    // SAFETY: lease held on n bytes.
                                    let b = unsafe { *p.as_ptr().add(i) };
                                    assert_eq!(b, id as u8, "byte {i} of buffer {id}");
                                    checked += 1;
                                }
                                r.release(id).unwrap();
                            }
                        }
                    }
                }
                checked
            })
        })
        .collect();
    let checked: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(checked > 0);
    for id in table.lock().unwrap().drain(..) {
        r.free(id).unwrap();
    }
    assert_eq!(r.live(), 0);
}

/// Runs in a child process (see `child_process_writes_by_name`): opens a segment by name and
/// writes a pattern. Ignored in a normal run.
#[test]
#[ignore = "helper run by another test in a child process"]
fn child_writer() {
    let name = std::env::var("ZCBUF_TEST_NAME").expect("run by child_process_writes_by_name");
    let r = Registry::global();
    let id = r.open_shared(&name, false).unwrap();
    let lease = r.lease(id).unwrap();
    let msg = format!("written by pid {}", std::process::id());
    lease.write_at(0, msg.as_bytes()).unwrap();
    drop(lease);
    r.free(id).unwrap();
}

#[test]
fn child_process_writes_by_name() {
    let r = Registry::new();
    let id = r.create_shared(None, 4096, &opts()).unwrap();
    let name = r.name(id).unwrap().unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_writer", "--ignored", "--nocapture"])
        .env("ZCBUF_TEST_NAME", &name)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut buf = [0u8; 14];
    r.lease(id).unwrap().read_at(0, &mut buf).unwrap();
    assert_eq!(&buf, b"written by pid");
    // The child freed its handle, we still hold the name.
    assert!(shm_exists(&name));
    r.free(id).unwrap();
    assert!(!shm_exists(&name));
}

#[test]
fn last_live_holder_removes_the_name_whoever_created_it() {
    let r = Registry::new();
    let id = r.create_shared(None, 64, &opts()).unwrap();
    let name = r.name(id).unwrap().unwrap();
    let other = r.open_shared(&name, false).unwrap();
    r.free(id).unwrap();
    assert!(shm_exists(&name), "an opener still holds it");
    let listed = zcbuf::gc::list().unwrap();
    let me = listed.iter().find(|s| s.name == name).unwrap();
    assert!(me.held);
    assert_eq!(me.holders, vec![std::process::id()]);
    r.free(other).unwrap();
    assert!(!shm_exists(&name));
}

#[test]
fn a_killed_holder_holds_nothing() {
    let r = Registry::new();
    let id = r.create_shared(None, 64, &opts()).unwrap();
    let name = r.name(id).unwrap().unwrap();
    // A child that opens and is SIGKILLed while holding it.
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_sleeper", "--ignored", "--nocapture"])
        .env("ZCBUF_TEST_NAME", &name)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("opened") {
        line.clear();
        let n = std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
        assert!(n > 0, "child exited before opening");
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let me = zcbuf::gc::list()
        .unwrap()
        .into_iter()
        .find(|s| s.name == name)
        .unwrap();
    assert!(me.held);
    assert_eq!(
        me.holders,
        vec![std::process::id()],
        "the killed child's lock is gone"
    );
    // gc keeps it: we are alive.
    assert!(!zcbuf::gc::gc().unwrap().iter().any(|r| r.name == name));
    assert!(shm_exists(&name));
    r.free(id).unwrap();
    assert!(!shm_exists(&name), "the dead holder does not keep the name");
}

#[test]
#[ignore = "helper run by another test in a child process"]
fn child_sleeper() {
    let name = std::env::var("ZCBUF_TEST_NAME").expect("run by dead_holders_are_reaped_by_gc");
    let r = Registry::global();
    let _id = r.open_shared(&name, false).unwrap();
    println!("opened");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(std::time::Duration::from_secs(60));
}

#[test]
fn one_process_is_one_holder_however_many_handles() {
    let r = Registry::new();
    let id = r.create_shared(None, 64, &opts()).unwrap();
    let name = r.name(id).unwrap().unwrap();
    // A process is one holder (one open file, one lock) however many handles it has.
    let ids: Vec<u64> = (0..1000)
        .map(|_| r.open_shared(&name, false).unwrap())
        .collect();
    let me = zcbuf::gc::list()
        .unwrap()
        .into_iter()
        .find(|s| s.name == name)
        .unwrap();
    assert_eq!(me.holders, vec![std::process::id()]);
    r.free(id).unwrap();
    for (i, h) in ids.iter().enumerate() {
        assert!(shm_exists(&name), "handle {i} still open");
        r.free(*h).unwrap();
    }
    assert!(!shm_exists(&name));
}

#[test]
fn gc_removes_unheld_segments_and_nothing_it_cannot_prove_is_zcbuf() {
    use zcbuf::header::{self, HEADER_LEN, Meta};
    let me = std::process::id();
    let write = |tag: &str, bytes: &[u8]| {
        let name = format!("zcbuf-gc-test-{tag}-{me}");
        std::fs::write(format!("/dev/shm/{name}"), bytes).unwrap();
        name
    };
    let mut enc = vec![0u8; HEADER_LEN];
    header::encode(&mut enc, 4096, 0, &Meta::untyped(), 1, false);
    enc.resize(4096, 0);
    let unheld = write("unheld", &enc);
    let mut p = vec![0u8; HEADER_LEN];
    header::encode(&mut p, 4096, 0, &Meta::untyped(), 1, true);
    p.resize(4096, 0);
    let persistent = write("persistent", &p);
    let junk = write("junk", &[7u8; 9000]);
    let mut old = enc.clone();
    old[8] = 1; // header version 1
    let v1 = write("v1", &old);
    let mut unpublished = enc.clone();
    unpublished[..8].fill(0);
    let nomagic = write("nomagic", &unpublished);
    let removed = zcbuf::gc::gc().unwrap();
    let names: Vec<&str> = removed.iter().map(|r| r.name.as_str()).collect();
    assert!(names.contains(&unheld.as_str()), "{removed:?}");
    assert!(!shm_exists(&unheld));
    for keep in [&persistent, &junk, &v1, &nomagic] {
        assert!(!names.contains(&keep.as_str()), "{keep} was removed");
        assert!(shm_exists(keep), "{keep} is gone");
    }
    let listed = zcbuf::gc::list().unwrap();
    let l = |n: &str| listed.iter().find(|s| s.name == n).cloned().unwrap();
    assert!(l(&persistent).persistent && !l(&persistent).held);
    assert!(l(&v1).problem.as_deref().unwrap().contains("version 1"));
    assert!(l(&junk).problem.is_some());
    for n in [&persistent, &junk, &v1, &nomagic] {
        zcbuf::shm::unlink(n).unwrap();
    }
}

#[test]
fn creation_options_keep_memory_zeroed_and_usable() {
    let r = Registry::new();
    for o in [
        opts().populate(true),
        opts().huge_pages(true),
        opts().huge_pages(true).populate(true),
        opts().reserve(false),
    ] {
        for id in [
            r.create(4 << 20, &o).unwrap(),
            r.create_shared(None, 4 << 20, &o).unwrap(),
        ] {
            let l = r.lease(id).unwrap();
            let mut buf = vec![1u8; 4 << 20];
            l.read_at(0, &mut buf).unwrap();
            assert!(buf.iter().all(|b| *b == 0), "{o:?}");
            l.write_at((4 << 20) - 3, b"end").unwrap();
            drop(l);
            r.free(id).unwrap();
        }
    }
}

#[test]
fn fifo_and_unpublished_headers_are_refused_without_hanging() {
    let r = Registry::new();
    let d = tmpdir("fifo");
    let fifo = d.join("pipe");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let e = r.open_file(&fifo, true).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    std::fs::remove_dir_all(&d).unwrap();

    // A header without its magic (zcbuf never names a segment before its header is complete,
    // so this is not a creator at work): corrupt at once, no waiting.
    let name = format!("zcbuf-test-unpublished-{}", std::process::id());
    let mut enc = vec![0u8; zcbuf::header::HEADER_LEN];
    zcbuf::header::encode(&mut enc, 4096, 0, &Meta::untyped(), 1, false);
    enc[..8].fill(0);
    enc.resize(4096, 0);
    std::fs::write(format!("/dev/shm/{name}"), &enc).unwrap();
    let t = std::time::Instant::now();
    let e = r.open_shared(&name, false).unwrap_err();
    assert!(matches!(e, Error::Corrupt(_)), "{e}");
    assert!(t.elapsed() < std::time::Duration::from_millis(200));
    zcbuf::shm::unlink(&name).unwrap();
}

#[test]
fn a_borrowed_lease_survives_unbalanced_releases() {
    // `Registry::release` is safe to call; one call too many (someone else's bug) must not unmap
    // memory under a live `Lease` guard: the guard holds the mapping itself.
    let reg = Registry::global();
    let name = format!("zcbuf-test-unbalanced-{}", std::process::id());
    let id = reg.create_shared(Some(&name), 4096, &opts()).unwrap();
    let lease = reg.lease(id).unwrap();
    reg.free(id).unwrap();
    reg.release(id).unwrap(); // not ours to give back: the registry entry goes
    assert!(maps_mention(&name), "unmapped under a live Lease");
    lease.write_at(100, b"still here").unwrap();
    let mut back = [0u8; 10];
    lease.read_at(100, &mut back).unwrap();
    assert_eq!(&back, b"still here");
    drop(lease);
    assert!(!maps_mention(&name));
    assert!(!shm_exists(&name));
}
