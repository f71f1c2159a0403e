//! Every C error message says its kind once and its subject once (`zcbuf_last_error`).

use std::ffi::{CStr, CString, c_char};

use zcbuf::ffi::*;

fn last_error() -> String {
    let mut buf = vec![0 as c_char; 4096];
    // SAFETY: buf holds buf.len() writable bytes.
    unsafe { zcbuf_last_error(buf.as_mut_ptr(), buf.len()) };
    // SAFETY: zcbuf_last_error NUL-terminates within cap.
    unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn status_name(status: i32) -> String {
    // SAFETY: zcbuf_status_name returns a static NUL-terminated string.
    unsafe { CStr::from_ptr(zcbuf_status_name(status)) }
        .to_string_lossy()
        .into_owned()
}

/// Asserts `status` is `want`, and that the message says the kind (a status name, in any
/// case) at most once and `subject` exactly once.
fn says_once(status: i32, want: i32, subject: &str) -> String {
    let msg = last_error();
    assert_eq!(status, want, "status {status}: {msg}");
    let low = msg.to_lowercase();
    let kind = status_name(want);
    assert!(
        low.matches(&kind).count() <= 1,
        "kind {kind:?} repeated: {msg}"
    );
    assert_eq!(
        msg.matches(subject).count(),
        1,
        "{subject:?} not said once: {msg}"
    );
    // No kind of error is named twice, whichever (e.g. "not found: ... not found").
    for s in 1..=10 {
        let k = status_name(s);
        assert!(low.matches(&k).count() <= 1, "{k:?} repeated: {msg}");
    }
    msg
}

fn dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("benchfix-msg-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

#[test]
fn each_kind_is_said_once() {
    let d = dir("kinds");
    let mut id = 0u64;
    let weights = d.join("weights.zcbuf");
    let wp = c(weights.to_str().unwrap());
    // SAFETY: valid NUL-terminated path and out pointer.
    let st = unsafe { zcbuf_create_file(wp.as_ptr(), 4096, &mut id) };
    assert_eq!(st, ZCBUF_OK);
    assert_eq!(zcbuf_free(id), ZCBUF_OK);

    // already exists (a file)
    // SAFETY: as above.
    let st = unsafe { zcbuf_create_file(wp.as_ptr(), 4096, &mut id) };
    let m = says_once(st, ZCBUF_EEXIST, "weights.zcbuf");
    assert!(m.contains("already exists"), "{m}");

    // not found: a file, a segment, an id
    let missing = c(d.join("missing.zcbuf").to_str().unwrap());
    // SAFETY: as above.
    let st = unsafe { zcbuf_open_file(missing.as_ptr(), 0, &mut id) };
    says_once(st, ZCBUF_ENOTFOUND, "missing.zcbuf");
    let name = c("benchfix-msg-missing");
    // SAFETY: as above.
    let st = unsafe { zcbuf_open_shared(name.as_ptr(), 0, &mut id) };
    says_once(st, ZCBUF_ENOTFOUND, "benchfix-msg-missing");
    says_once(
        zcbuf_free(u64::MAX - 7),
        ZCBUF_ENOTFOUND,
        "18446744073709551608",
    );

    // invalid argument: a bad name, a NULL, an errno EINVAL-style message
    let bad = c("benchfix/bad");
    // SAFETY: as above.
    let st = unsafe { zcbuf_create_shared(bad.as_ptr(), 4096, &mut id) };
    says_once(st, ZCBUF_EINVAL, "benchfix/bad");
    // SAFETY: a NULL out pointer is checked, never written.
    let st = unsafe { zcbuf_create(16, std::ptr::null_mut()) };
    says_once(st, ZCBUF_EINVAL, "out_id");

    // corrupt: a file that is not a zcbuf buffer
    let junk = d.join("junk.zcbuf");
    std::fs::write(&junk, vec![0x5a; 8192]).unwrap();
    let jp = c(junk.to_str().unwrap());
    // SAFETY: as above.
    let st = unsafe { zcbuf_open_file(jp.as_ptr(), 0, &mut id) };
    says_once(st, ZCBUF_ECORRUPT, "junk.zcbuf");

    // out of memory or space: a file larger than its file system
    let huge = c(d.join("huge.zcbuf").to_str().unwrap());
    // SAFETY: as above.
    let st = unsafe { zcbuf_create_file(huge.as_ptr(), 1 << 40, &mut id) };
    let m = says_once(st, ZCBUF_ENOMEM, "huge.zcbuf");
    assert!(m.contains(" free; 1.0 TiB requested"), "{m}");

    std::fs::remove_dir_all(&d).unwrap();
}
