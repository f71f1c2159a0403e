//! File buffers check free space before creating anything: a request that cannot fit fails
//! with the free space it measured, leaves no file, and never takes a block (on ext4 a failing
//! `fallocate` keeps what it got, so the check must come first).

use std::path::{Path, PathBuf};
use std::process::Command;

use zcbuf::{CreateOptions, Error, Registry};

const TIB: usize = 1 << 40;

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("benchfix-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Free blocks (not bytes available to users: root may use reserved blocks) of `dir`'s file
/// system, the figure a partial allocation would move.
fn free_blocks(dir: &Path) -> u64 {
    rustix::fs::statvfs(dir).unwrap().f_bfree
}

/// Creates a 1 TiB reserved file in `dir` and checks the refusal: OutOfMemory, naming the
/// path and the free space, no file, nothing else in `dir`, and (when `quiet`: nobody else
/// writes to that file system) free blocks unchanged.
fn refuses_one_tib(dir: &Path, quiet: bool) {
    let path = dir.join("huge.zcbuf");
    let listing = || {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    let (before, names) = (free_blocks(dir), listing());
    let err = Registry::new()
        .create_file(&path, TIB, &CreateOptions::new())
        .expect_err("1 TiB cannot fit here");
    assert!(matches!(err, Error::OutOfMemory(_)), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("huge.zcbuf has "), "{msg}");
    assert!(
        msg.contains(" free; 1.0 TiB requested (measured before creating anything"),
        "{msg}"
    );
    assert!(msg.contains("put the file elsewhere"), "{msg}");
    assert!(!path.exists(), "{} was left behind", path.display());
    assert_eq!(listing(), names, "something was left in the directory");
    if quiet {
        assert_eq!(free_blocks(dir), before, "free space changed");
    }
}

#[test]
fn one_tib_file_is_refused_before_anything_is_created() {
    let d = tmpdir("space");
    refuses_one_tib(&d, false);
    // What fits still works, and the check does not apply without a reservation (sparse).
    let r = Registry::new();
    let id = r
        .create_file(d.join("small.zcbuf"), 1 << 20, &CreateOptions::new())
        .unwrap();
    r.free(id).unwrap();
    match r.create_file(
        d.join("sparse.zcbuf"),
        TIB,
        &CreateOptions::new().reserve(false),
    ) {
        Ok(id) => r.free(id).unwrap(),
        // Under valgrind a 1 TiB mapping does not fit its address space: still not refused for
        // lack of disk space, which is what this checks.
        Err(zcbuf::Error::OutOfMemory(m)) if m.contains("address space") => {}
        Err(e) => panic!("a sparse 1 TiB file was refused: {e}"),
    }
    std::fs::remove_dir_all(&d).unwrap();
}

/// The same on a real, small ext4 (a 64 MiB image, loop-mounted in a private mount namespace);
/// skipped, saying why, when that is not possible here (not root, no unshare or mkfs.ext4, no
/// loop devices). The test re-runs itself inside the namespace.
#[test]
fn one_tib_file_is_refused_on_a_small_ext4() {
    if let Ok(dir) = std::env::var("BENCHFIX_EXT4_DIR") {
        refuses_one_tib(Path::new(&dir), true);
        // A request just above the free space is refused too, and one just below succeeds.
        let s = rustix::fs::statvfs(Path::new(&dir)).unwrap();
        let avail = (s.f_bavail * s.f_frsize) as usize;
        let r = Registry::new();
        let err = r
            .create_file(
                Path::new(&dir).join("over.zcbuf"),
                avail,
                &CreateOptions::new(),
            )
            .expect_err("the header pages do not fit on top of all the free space");
        assert!(matches!(err, Error::OutOfMemory(_)), "{err}");
        assert!(!Path::new(&dir).join("over.zcbuf").exists());
        let id = r
            .create_file(
                Path::new(&dir).join("fits.zcbuf"),
                avail / 2,
                &CreateOptions::new(),
            )
            .unwrap();
        r.free(id).unwrap();
        return;
    }
    let root = rustix::process::geteuid().is_root();
    let have = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !root || !have("unshare") || !have("mkfs.ext4") {
        eprintln!("skipped: needs root, unshare and mkfs.ext4");
        return;
    }
    let d = tmpdir("ext4");
    let img = d.join("fs.img");
    let mnt = d.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&img)
        .status()
        .unwrap();
    assert!(mkfs.success());
    let me = std::env::current_exe().unwrap();
    let script = format!(
        "mount -o loop '{}' '{}' || exit 77; BENCHFIX_EXT4_DIR='{}' '{}' --exact \
         one_tib_file_is_refused_on_a_small_ext4 --test-threads=1 --nocapture",
        img.display(),
        mnt.display(),
        mnt.display(),
        me.display()
    );
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&d);
    if out.status.code() == Some(77) {
        eprintln!(
            "skipped: cannot loop-mount here: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("1 passed"),
        "inner run failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
