//! Sealing shared buffers, and opens that wait for a sealed segment (issue #10).
//!
//! Names start with `seal-`. Tests that need another process re-run this test binary as a
//! child (`--exact child_role --ignored`, with the role in `SEAL_CHILD`), so they need no
//! other program; the non-root test runs its children as uid 65534 when this runs as root.

use std::ffi::CString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use zcbuf::ffi::*;
use zcbuf::{Buffer, CreateOptions, Error, Registry};

fn name(tag: &str) -> String {
    format!("seal-rs-{tag}-{}", std::process::id())
}

fn exists(name: &str) -> bool {
    Path::new("/dev/shm").join(name).exists()
}

fn mode(name: &str) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(Path::new("/dev/shm").join(name))
        .unwrap()
        .permissions()
        .mode()
}

#[test]
fn seal_makes_every_later_open_read_only() {
    let n = name("ro");
    let mut producer = Buffer::shared_typed::<u32>(Some(&n), &[4]).unwrap();
    let early = Buffer::open(&n, false).unwrap(); // writable, opened before the seal
    producer.copy_from_slice(0, &[1u32, 2, 3, 4]).unwrap();
    assert!(!producer.sealed() && !early.sealed());
    assert_eq!(mode(&n) & 0o7777, 0o600);

    producer.seal().unwrap();
    // The seal is the sticky bit; the owner keeps read-write access (removers need it).
    assert_eq!(mode(&n) & 0o7777, 0o1600);
    assert!(producer.sealed() && producer.readonly());
    assert!(matches!(producer.write(0, 9u32), Err(Error::ReadOnly(m)) if m.contains("sealed")));
    assert!(producer.lease().unwrap().write_at(0, &[9]).is_err());
    // Asked read-write after the seal: read-only, not an error.
    let mut later = Buffer::open(&n, false).unwrap();
    assert!(later.readonly() && later.sealed());
    assert_eq!(later.read::<u32>(3).unwrap(), 4);
    assert!(later.write(0, 9u32).is_err());
    let info = Registry::global().info(later.id()).unwrap();
    assert!(info.sealed && info.readonly);
    // A handle opened writable before the seal learns of it, but keeps its mapping (documented:
    // nothing is re-protected under it, so no stray write can crash).
    assert!(early.sealed());
    assert!(!early.readonly());
    assert_eq!(early.read::<u32>(0).unwrap(), 1);
}

#[test]
fn seal_is_idempotent_and_refused_where_it_means_nothing() {
    let reg = Registry::global();
    let n = name("idem");
    let id = reg
        .create_shared(Some(&n), 16, &CreateOptions::new())
        .unwrap();
    let reader = reg.open_shared(&n, true).unwrap();
    // A read-only handle cannot declare someone else's data complete.
    assert!(matches!(reg.seal(reader), Err(Error::ReadOnly(_))));
    assert!(!reg.info(id).unwrap().sealed);
    reg.seal(id).unwrap();
    reg.seal(id).unwrap();
    reg.seal(reader).unwrap(); // already sealed (by another handle): fine
    assert!(reg.info(reader).unwrap().sealed);
    reg.free(reader).unwrap();
    reg.free(id).unwrap();
    assert!(
        !exists(&n),
        "a sealed segment goes with its last holder, like any other"
    );

    let private = reg.create(16, &CreateOptions::new()).unwrap();
    assert!(matches!(reg.seal(private), Err(Error::InvalidArgument(m)) if m.contains("private")));
    assert!(!reg.info(private).unwrap().sealed);
    reg.free(private).unwrap();

    let path = std::env::temp_dir().join(format!("seal-rs-{}.zcbuf", std::process::id()));
    let file = reg.create_file(&path, 16, &CreateOptions::new()).unwrap();
    assert!(matches!(reg.seal(file), Err(Error::InvalidArgument(m)) if m.contains("file")));
    reg.free(file).unwrap();
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn ls_shows_sealed_and_gc_treats_it_like_any_other() {
    let reg = Registry::global();
    let n = name("ls");
    let id = reg
        .create_shared(Some(&n), 8, &CreateOptions::new().persist(true))
        .unwrap();
    let row = |n: &str| {
        zcbuf::gc::list()
            .unwrap()
            .into_iter()
            .find(|s| s.name == n)
            .unwrap()
    };
    assert!(!row(&n).sealed);
    reg.seal(id).unwrap();
    assert!(row(&n).sealed);
    reg.free(id).unwrap();
    // Persistent: gc leaves it, sealed or not; unlink removes it.
    zcbuf::gc::gc().unwrap();
    assert!(exists(&n));
    zcbuf::shm::unlink(&n).unwrap();
}

#[test]
fn a_waiting_open_returns_once_the_segment_is_sealed() {
    let n = name("wait");
    let waiter = std::thread::spawn({
        let n = n.clone();
        move || {
            let t = Instant::now();
            (Buffer::open_wait(&n, Duration::from_secs(20)), t.elapsed())
        }
    });
    std::thread::sleep(Duration::from_millis(200)); // the waiter waits for a missing name
    let mut p = Buffer::shared_typed::<u64>(Some(&n), &[3]).unwrap();
    std::thread::sleep(Duration::from_millis(200)); // ...then for an unsealed one
    p.copy_from_slice(0, &[7u64, 8, 9]).unwrap();
    p.seal().unwrap();
    let (got, took) = waiter.join().unwrap();
    let got = got.unwrap();
    assert!(got.readonly() && got.sealed());
    let mut out = [0u64; 3];
    got.copy_to_slice(0, &mut out).unwrap();
    assert_eq!(out, [7, 8, 9]);
    assert!(took < Duration::from_secs(15), "{took:?}");
}

#[test]
fn a_waiting_open_times_out() {
    let reg = Registry::global();
    let n = name("timeout");
    // Missing: a zero timeout looks once.
    let e = reg.open_shared_wait(&n, false, Duration::ZERO).unwrap_err();
    assert!(
        matches!(&e, Error::Timeout(m) if m.contains("exists yet")),
        "{e}"
    );
    let t = Instant::now();
    let e = reg
        .open_shared_wait(&n, false, Duration::from_millis(300))
        .unwrap_err();
    assert!(matches!(e, Error::Timeout(_)));
    assert!(t.elapsed() >= Duration::from_millis(300));
    // Exists, held by us, unsealed: also a timeout (a live holder may still seal it).
    let id = reg
        .create_shared(Some(&n), 8, &CreateOptions::new())
        .unwrap();
    let e = reg
        .open_shared_wait(&n, false, Duration::from_millis(250))
        .unwrap_err();
    assert!(
        matches!(&e, Error::Timeout(m) if m.contains("not sealed")),
        "{e}"
    );
    reg.free(id).unwrap();
}

#[test]
fn a_persistent_segment_left_unsealed_fails_promptly() {
    let reg = Registry::global();
    let n = name("orphan-persist");
    let id = reg
        .create_shared(Some(&n), 8, &CreateOptions::new().persist(true))
        .unwrap();
    reg.free(id).unwrap(); // nobody holds it now, and nobody sealed it
    let t = Instant::now();
    let e = reg
        .open_shared_wait(&n, false, Duration::from_secs(30))
        .unwrap_err();
    assert!(
        matches!(&e, Error::NotFound(m) if m.contains("before sealing")),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(
        exists(&n),
        "a persistent segment is not removed by a waiter"
    );
    zcbuf::shm::unlink(&n).unwrap();
}

/// Runs this binary's `child_role` test as a child process with `role` and `name`.
fn child(role: &str, name: &str, uid: Option<u32>) -> Child {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args([
        "--exact",
        "child_role",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("SEAL_CHILD", role)
    .env("SEAL_NAME", name)
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    if let Some(u) = uid {
        c.uid(u).gid(u);
    }
    c.spawn().unwrap()
}

/// Reads the child's stdout until a line holding `word`; returns it from `word` on.
fn await_line(c: &mut Child, word: &str) -> String {
    let out = c.stdout.as_mut().unwrap();
    let mut r = BufReader::new(out);
    loop {
        let mut line = String::new();
        assert!(
            r.read_line(&mut line).unwrap() > 0,
            "child ended before {word:?}"
        );
        // libtest prints "test child_role ... " before the test's own first line.
        if let Some(at) = line.find(word) {
            return line[at..].to_owned();
        }
    }
}

/// What a child process does (only when run by [`child`]).
#[test]
#[ignore = "run as a child process by the other tests"]
fn child_role() {
    let (Ok(role), Ok(n)) = (std::env::var("SEAL_CHILD"), std::env::var("SEAL_NAME")) else {
        return;
    };
    let go = || {
        let mut s = String::new();
        std::io::stdin().read_line(&mut s).unwrap();
    };
    match role.as_str() {
        // Creates and holds, never seals; waits for the parent (which SIGKILLs it).
        "create" => {
            let _b = Buffer::shared(Some(&n), 4096).unwrap();
            println!("READY");
            go();
        }
        // Creates, fills, seals, holds until told, then frees and exits normally.
        "seal" => {
            let mut b = Buffer::shared_typed::<u8>(Some(&n), &[4]).unwrap();
            b.copy_from_slice(0, &[1u8, 2, 3, 4]).unwrap();
            b.seal().unwrap();
            println!("SEALED");
            go();
        }
        // Opens the sealed segment (waiting), reports, holds until told, then lets go.
        "open" => {
            let b = Buffer::open_wait(&n, Duration::from_secs(20)).unwrap();
            println!("OPENED {}", b.read::<u8>(3).unwrap());
            go();
        }
        "gc" => {
            let removed = zcbuf::gc::gc().unwrap();
            println!("GC {}", removed.iter().any(|r| r.name == n));
        }
        r => panic!("unknown role {r}"),
    }
}

#[test]
fn a_creator_killed_before_sealing_fails_the_waiter_promptly() {
    let n = name("killed");
    let mut c = child("create", &n, None);
    await_line(&mut c, "READY");
    let waiter = std::thread::spawn({
        let n = n.clone();
        move || {
            let t = Instant::now();
            (Buffer::open_wait(&n, Duration::from_secs(30)), t.elapsed())
        }
    });
    std::thread::sleep(Duration::from_millis(300)); // the waiter sees it held, unsealed
    c.kill().unwrap(); // SIGKILL
    c.wait().unwrap();
    let (r, took) = waiter.join().unwrap();
    let e = r.unwrap_err();
    assert!(
        matches!(&e, Error::NotFound(m) if m.contains("killed before sealing")),
        "{e}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(
        !exists(&n),
        "the orphan (not persistent) is removed, as gc would"
    );
}

#[test]
fn sealed_segments_are_removed_by_non_root_users() {
    // The seal must not take the owner's write permission: removing a name needs a writable
    // open file (the OFD name lock), and without it a sealed segment would outlive its holders
    // for every user but root. Children run as uid 65534 when we are root (as CI is).
    let uid = if rustix::process::geteuid().is_root() {
        Some(65534)
    } else {
        None
    };
    // 1. The last holder is a process that opened it after the seal.
    let n = name("nonroot-last");
    let mut producer = child("seal", &n, uid);
    await_line(&mut producer, "SEALED");
    let mut consumer = child("open", &n, uid);
    assert_eq!(await_line(&mut consumer, "OPENED").trim(), "OPENED 4");
    writeln!(producer.stdin.as_mut().unwrap()).unwrap();
    assert!(producer.wait().unwrap().success());
    assert!(exists(&n), "the consumer still holds it");
    writeln!(consumer.stdin.as_mut().unwrap()).unwrap();
    assert!(consumer.wait().unwrap().success());
    assert!(
        !exists(&n),
        "the last holder of a sealed segment removes its name"
    );

    // 2. gc removes a sealed segment whose holder was killed.
    let n = name("nonroot-gc");
    let mut producer = child("seal", &n, uid);
    await_line(&mut producer, "SEALED");
    producer.kill().unwrap();
    producer.wait().unwrap();
    assert!(exists(&n));
    let mut gc = child("gc", &n, uid);
    assert_eq!(await_line(&mut gc, "GC").trim(), "GC true");
    assert!(gc.wait().unwrap().success());
    assert!(!exists(&n));
}

#[test]
fn c_abi_seal_and_waiting_open() {
    assert_eq!(
        std::mem::size_of::<ZcbufInfo>(),
        48,
        "sealed lives in former padding"
    );
    let n = name("c");
    let cn = CString::new(n.clone()).unwrap();
    let mut id = 0u64;
    let mut other = 0u64;
    let mut info = std::mem::MaybeUninit::<ZcbufInfo>::uninit();
    // SAFETY: valid NUL-terminated strings and out-pointers throughout.
    unsafe {
        assert_eq!(
            zcbuf_open_shared_wait(cn.as_ptr(), 0, 0, &mut other),
            ZCBUF_ETIMEDOUT
        );
        assert_eq!(
            zcbuf_open_shared_wait(cn.as_ptr(), 0, 0, std::ptr::null_mut()),
            ZCBUF_EINVAL
        );
        assert_eq!(zcbuf_create_shared(cn.as_ptr(), 64, &mut id), ZCBUF_OK);
        assert_eq!(zcbuf_info(id, info.as_mut_ptr()), ZCBUF_OK);
        assert_eq!(info.assume_init_ref().sealed, 0);
        assert_eq!(zcbuf_seal(id), ZCBUF_OK);
        assert_eq!(zcbuf_seal(id), ZCBUF_OK);
        assert_eq!(zcbuf_info(id, info.as_mut_ptr()), ZCBUF_OK);
        assert_eq!(
            (
                info.assume_init_ref().sealed,
                info.assume_init_ref().readonly
            ),
            (1, 1)
        );
        assert_eq!(
            zcbuf_open_shared_wait(cn.as_ptr(), 0, 1000, &mut other),
            ZCBUF_OK
        );
        assert_eq!(zcbuf_info(other, info.as_mut_ptr()), ZCBUF_OK);
        assert_eq!(
            (
                info.assume_init_ref().sealed,
                info.assume_init_ref().readonly
            ),
            (1, 1)
        );
        let mut opened = std::mem::MaybeUninit::<ZcbufOpened>::uninit();
        assert_eq!(
            zcbuf_open_shared_acquire(cn.as_ptr(), 0, opened.as_mut_ptr()),
            ZCBUF_OK
        );
        let o = opened.assume_init_ref();
        assert_eq!((o.info.sealed, o.info.readonly), (1, 1));
        assert_eq!(zcbuf_release(o.id), ZCBUF_OK);
        assert_eq!(zcbuf_free(o.id), ZCBUF_OK);
        let mut private = 0u64;
        assert_eq!(zcbuf_create(8, &mut private), ZCBUF_OK);
        assert_eq!(zcbuf_seal(private), ZCBUF_EINVAL);
        assert_eq!(zcbuf_free(private), ZCBUF_OK);
        assert_eq!(zcbuf_free(other), ZCBUF_OK);
        assert_eq!(zcbuf_free(id), ZCBUF_OK);
    }
    // zcbuf_list: sealed is an 11th field, after the problem.
    let n2 = name("c-list");
    let id = Registry::global()
        .create_shared(Some(&n2), 8, &CreateOptions::new())
        .unwrap();
    Registry::global().seal(id).unwrap();
    let mut len = 0usize;
    let mut buf = vec![0 as std::ffi::c_char; 1 << 20];
    // SAFETY: `buf` holds its length in bytes; `len` is writable.
    assert_eq!(
        unsafe { zcbuf_list(buf.as_mut_ptr(), buf.len(), &mut len) },
        ZCBUF_OK
    );
    // SAFETY: zcbuf_list NUL-terminates within the buffer.
    let text = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{n2}\t")))
        .unwrap();
    let fields: Vec<&str> = line.split('\t').collect();
    assert_eq!(
        (fields.len(), fields[10], fields[11]),
        (12, "1", ""),
        "{line:?}"
    ); // sealed; not a channel
    Registry::global().free(id).unwrap();
}

#[test]
fn linkat_of_an_unnamed_file_is_an_inotify_create() {
    // The waiter relies on this: our create names a segment with linkat from an O_TMPFILE.
    use rustix::fs::inotify;
    let fd = inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC).unwrap();
    inotify::add_watch(
        &fd,
        "/dev/shm",
        inotify::WatchFlags::CREATE | inotify::WatchFlags::ATTRIB,
    )
    .unwrap();
    let n = name("inotify");
    let b = Buffer::shared(Some(&n), 8).unwrap();
    b.seal().unwrap();
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 8192];
    let mut r = inotify::Reader::new(&fd, &mut buf);
    let mut seen = Vec::new();
    while let Ok(ev) = r.next() {
        if ev.file_name().is_some_and(|f| f.to_bytes() == n.as_bytes()) {
            seen.push(ev.events());
        }
    }
    let first = seen.first().copied().unwrap_or(inotify::ReadFlags::empty());
    assert!(first.contains(inotify::ReadFlags::CREATE), "{seen:?}");
    assert!(
        seen.iter().any(|e| e.contains(inotify::ReadFlags::ATTRIB)),
        "the seal (fchmod) is an IN_ATTRIB: {seen:?}"
    );
}
