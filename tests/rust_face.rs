//! Integration tests of the Rust face: `Buffer` (ownership, typed access, which references it
//! lends), `OwnedLease` (Send + Sync, outlives the buffer), and two processes sharing a buffer.
//! Shared-memory names all start with `rustface-`.

use std::path::{Path, PathBuf};
use std::process::Command;

use zcbuf::{Buffer, CreateOptions, Error, Kind, Meta, OwnedLease, Pod, Registry};

fn name(tag: &str) -> String {
    format!("rustface-test-{tag}-{}", std::process::id())
}

fn shm_exists(name: &str) -> bool {
    Path::new("/dev/shm").join(name).exists()
}

/// Mappings of this process whose path mentions `needle`.
fn mappings_of(needle: &str) -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

fn tmp_path(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("rustface-test-{tag}-{}.zcbuf", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

#[test]
fn drop_frees_the_id_and_removes_the_name() {
    let n = name("drop");
    let b = Buffer::shared(Some(&n), 1 << 16).unwrap();
    let id = b.id();
    assert_eq!(b.kind(), Kind::Shared);
    assert_eq!(b.name(), Some(n.as_str()));
    assert_eq!(b.path(), None);
    assert_eq!(b.info().unwrap().leases, 1, "a Buffer holds one lease");
    assert!(shm_exists(&n));
    assert_eq!(mappings_of(&n), 1);
    drop(b);
    assert!(matches!(
        Registry::global().info(id),
        Err(Error::NotFound(_))
    ));
    assert_eq!(mappings_of(&n), 0);
    assert!(!shm_exists(&n), "last holder gone: the name is removed");
}

#[test]
fn typed_shared_buffers_store_numpy_dtype_and_shape() {
    let n = name("typed");
    let mut a = Buffer::shared_typed::<f32>(Some(&n), &[480, 640]).unwrap();
    let le = cfg!(target_endian = "little");
    assert_eq!(
        a.meta(),
        &Meta::typed(if le { "<f4" } else { ">f4" }, 4, &[480, 640]).unwrap()
    );
    assert_eq!(a.len(), 480 * 640 * 4);
    let row: Vec<f32> = (0..640).map(|i| i as f32 * 0.5).collect();
    a.copy_from_slice(640 * 479, &row).unwrap();

    // A second mapping of the same segment (what another process gets) sees the same pages.
    let mut b = Buffer::open(&n, false).unwrap();
    assert_eq!(b.meta(), a.meta());
    assert_ne!(a.as_ptr(), b.as_ptr(), "two mappings");
    assert_eq!(b.read::<f32>(640 * 479 + 3).unwrap(), 1.5);
    b.write(0, -2.0f32).unwrap();
    assert_eq!(a.read::<f32>(0).unwrap(), -2.0);

    // Views are typed: the stored element type, arrays of it, or bytes; nothing else.
    assert_eq!(a.read::<[f32; 640]>(479).unwrap().to_vec(), row);
    assert_eq!(a.read::<u8>(3).unwrap(), (-2.0f32).to_ne_bytes()[3]);
    match a.read::<u32>(0) {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("<f4") || m.contains(">f4"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(a.read::<f32>(480 * 640).is_err(), "index out of range");
    assert!(a.copy_from_slice(480 * 640 - 1, &[0f32; 2]).is_err());
}

#[test]
fn array_element_types_add_dimensions() {
    let mut b = Buffer::new_typed::<[u16; 3]>(&[2, 5]).unwrap();
    assert_eq!(b.meta().shape, vec![2, 5, 3]);
    assert_eq!(b.meta().itemsize, 2);
    assert_eq!(b.len(), 2 * 5 * 3 * 2);
    b.as_mut_slice::<[u16; 3]>().unwrap()[9] = [1, 2, 3];
    assert_eq!(b.as_slice::<u16>().unwrap()[27..], [1, 2, 3]);
    assert_eq!(Meta::of::<[[u8; 4]; 2]>(&[7]).unwrap().shape, vec![7, 2, 4]);
}

#[test]
fn private_buffers_lend_checked_slices_and_nothing_else_can_write_them() {
    let mut b = Buffer::new(12).unwrap();
    assert_eq!(b.kind(), Kind::Private);
    b.as_mut_slice::<u32>().unwrap().copy_from_slice(&[1, 2, 3]);
    assert_eq!(b.as_slice::<u32>().unwrap(), &[1, 2, 3]);
    assert_eq!(b.read::<u32>(2).unwrap(), 3);
    // 12 bytes are not a whole number of u64s.
    assert!(matches!(
        b.as_slice::<u64>(),
        Err(Error::InvalidArgument(_))
    ));
    // Nobody else can take a pointer to it while the Buffer lends slices...
    let reg = Registry::global();
    assert!(matches!(reg.acquire(b.id()), Err(Error::Permission(_))));
    assert!(matches!(
        reg.acquire_info(b.id()),
        Err(Error::Permission(_))
    ));
    assert!(matches!(reg.lease_owned(b.id()), Err(Error::Permission(_))));
    assert!(matches!(b.lease(), Err(Error::InvalidArgument(_))));
    // ...but may read its description.
    assert_eq!(reg.info(b.id()).unwrap().len, 12);

    // Handed over, it is an ordinary id: leases work, and the new owner frees it.
    let id = b.into_id();
    let (_, n) = reg.acquire(id).unwrap();
    assert_eq!(n, 12);
    reg.release(id).unwrap();
    let again = Buffer::from_id(id).unwrap();
    assert_eq!(again.read::<u32>(1).unwrap(), 2);
    assert!(again.as_slice::<u8>().is_err(), "adopted: not exclusive");
    drop(again);
    assert!(reg.info(id).is_err());
}

#[test]
fn shared_and_file_buffers_lend_no_safe_slices() {
    let n = name("noslice");
    let mut s = Buffer::shared(Some(&n), 8).unwrap();
    assert!(s.as_slice::<u8>().is_err());
    assert!(s.as_mut_slice::<u8>().is_err());
    s.copy_from_slice(0, &[1u8, 2, 3, 4, 5, 6, 7, 8]).unwrap();
    // SAFETY: nothing else writes this segment: only this test knows the name and no other
    // handle exists.
    let v = unsafe { s.view::<u16>() }.unwrap();
    assert_eq!(v.len(), 4);
    assert_eq!(v[0], u16::from_ne_bytes([1, 2]));
    // SAFETY: as above, and `&mut` excludes this buffer's own reads meanwhile.
    unsafe { s.view_mut::<u8>() }.unwrap()[7] = 80;
    assert_eq!(s.read::<u8>(7).unwrap(), 80);
}

#[test]
fn readonly_opens_refuse_writes() {
    let n = name("ro");
    let _a = Buffer::shared_typed::<i32>(Some(&n), &[4]).unwrap();
    let mut r = Buffer::open(&n, true).unwrap();
    assert!(r.readonly());
    assert!(matches!(r.write(0, 1i32), Err(Error::ReadOnly(_))));
    assert!(matches!(
        r.copy_from_slice(0, &[1i32]),
        Err(Error::ReadOnly(_))
    ));
    // SAFETY: the call fails before a slice exists.
    assert!(matches!(
        unsafe { r.view_mut::<i32>() },
        Err(Error::ReadOnly(_))
    ));
    assert_eq!(r.read::<i32>(3).unwrap(), 0);
    assert!(matches!(
        r.lease().unwrap().write_at(0, &[1]),
        Err(Error::ReadOnly(_))
    ));
}

fn assert_send_sync<T: Send + Sync + 'static>() {}

#[test]
fn owned_lease_is_send_sync_and_keeps_the_memory_after_drop() {
    assert_send_sync::<OwnedLease>();
    assert_send_sync::<Buffer>();
    let n = name("lease");
    let mut b = Buffer::shared_typed::<u64>(Some(&n), &[4]).unwrap();
    b.write(0, 11u64).unwrap();
    let id = b.id();
    let lease = std::sync::Arc::new(b.lease().unwrap());
    assert_eq!(b.info().unwrap().leases, 2);
    drop(b);
    assert!(Registry::global().info(id).is_err(), "the id is freed");
    assert!(shm_exists(&n), "this process still maps it: the name stays");
    assert_eq!(mappings_of(&n), 1);

    let threads: Vec<_> = (1..4u64)
        .map(|k| {
            let l = std::sync::Arc::clone(&lease);
            std::thread::spawn(move || l.write(k as usize, k * 100).unwrap())
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut all = [0u64; 4];
    lease.copy_to_slice(0, &mut all).unwrap();
    assert_eq!(all, [11, 100, 200, 300]);
    assert_eq!(lease.kind(), Kind::Shared);
    assert_eq!(lease.name(), Some(n.as_str()));

    drop(lease);
    assert_eq!(mappings_of(&n), 0, "last lease gone: unmapped");
    assert!(!shm_exists(&n), "and the name removed");
}

#[test]
fn into_lease_works_for_private_buffers() {
    let mut b = Buffer::new_typed::<i8>(&[3]).unwrap();
    b.as_mut_slice::<i8>().unwrap()[2] = -5;
    let id = b.id();
    let lease = b.into_lease();
    assert!(Registry::global().acquire(id).is_err());
    let got = std::thread::spawn(move || lease.read::<i8>(2).unwrap())
        .join()
        .unwrap();
    assert_eq!(got, -5);
}

#[test]
fn a_lease_survives_unbalanced_releases() {
    // Someone else's extra `release` cannot unmap memory under an OwnedLease: it holds the
    // mapping itself.
    let reg = Registry::global();
    let id = reg.create(4096, &CreateOptions::new()).unwrap();
    let lease = reg.lease_owned(id).unwrap();
    reg.free(id).unwrap();
    reg.release(id).unwrap(); // not ours to give back; the registry entry goes
    lease.write::<u32>(5, 0xfeed).unwrap();
    assert_eq!(lease.read::<u32>(5).unwrap(), 0xfeed);
}

#[test]
fn typed_files_round_trip_and_free_reports() {
    let p = tmp_path("file");
    let mut f = Buffer::create_file_typed::<f64>(&p, &[2, 2]).unwrap();
    assert_eq!(f.kind(), Kind::File);
    assert_eq!(f.path(), Some(p.as_path()));
    f.copy_from_slice(0, &[1.0f64, 2.0, 3.0, 4.0]).unwrap();
    f.flush().unwrap();
    f.free().unwrap();
    let g = Buffer::open_file(&p, true).unwrap();
    assert_eq!(g.meta(), &Meta::of::<f64>(&[2, 2]).unwrap());
    let mut out = [0f64; 4];
    g.copy_to_slice(0, &mut out).unwrap();
    assert_eq!(out, [1.0, 2.0, 3.0, 4.0]);
    drop(g);
    assert!(matches!(
        Buffer::create_file(&p, 8),
        Err(Error::AlreadyExists(_))
    ));
    std::fs::remove_file(&p).unwrap();
}

#[test]
fn dtype_text_of_every_pod_type() {
    let e = if cfg!(target_endian = "little") {
        '<'
    } else {
        '>'
    };
    let cases = [
        (<u8 as Pod>::DTYPE, "|u1".to_string()),
        (<i8 as Pod>::DTYPE, "|i1".to_string()),
        (<u16 as Pod>::DTYPE, format!("{e}u2")),
        (<i16 as Pod>::DTYPE, format!("{e}i2")),
        (<u32 as Pod>::DTYPE, format!("{e}u4")),
        (<i32 as Pod>::DTYPE, format!("{e}i4")),
        (<u64 as Pod>::DTYPE, format!("{e}u8")),
        (<i64 as Pod>::DTYPE, format!("{e}i8")),
        (<f32 as Pod>::DTYPE, format!("{e}f4")),
        (<f64 as Pod>::DTYPE, format!("{e}f8")),
    ];
    for (got, want) in cases {
        assert_eq!(got, want);
    }
}

/// The child half of `two_processes_see_each_others_writes`: does nothing unless run by it.
#[test]
fn cross_process_child() {
    let Ok(name) = std::env::var("RUSTFACE_TEST_CHILD") else {
        return;
    };
    let mut b = Buffer::open(&name, false).unwrap();
    assert_eq!(b.meta().shape, vec![16]);
    let seen: u32 = b.read(0).unwrap();
    b.write(1, seen + 1).unwrap();
}

#[test]
fn two_processes_see_each_others_writes() {
    let n = name("pair");
    let mut b = Buffer::shared_typed::<u32>(Some(&n), &[16]).unwrap();
    b.write(0, 41u32).unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "cross_process_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("RUSTFACE_TEST_CHILD", &n)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 passed"),
        "the child test did not run"
    );
    assert_eq!(
        b.read::<u32>(1).unwrap(),
        42,
        "the child's write is visible here"
    );
    drop(b);
    assert!(!shm_exists(&n), "both processes gone: the name is removed");
}
