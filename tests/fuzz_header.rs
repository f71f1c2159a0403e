//! Fuzzes the header parser: random byte flips and random field values in real headers, and
//! arbitrary bytes, with random segment sizes. Whatever the input, `parse` must return (never
//! panic), and whatever it accepts must lie inside the segment and be self-consistent.
//! 100,000 cases by default; set PROPTEST_CASES to change it.

use proptest::prelude::*;
use zcbuf::header::{self, HEADER_LEN, Meta};

const PAGE: usize = 4096;

fn real_header(meta: &Meta, len: u64) -> Vec<u8> {
    let mut b = vec![0u8; HEADER_LEN];
    header::encode(&mut b, 8192, len, meta, 1234, len % 2 == 0);
    b
}

fn check_accepted(bytes: &[u8], size: u64) {
    if let Ok(p) = header::parse(bytes, size, PAGE, "fuzz") {
        assert!(p.data_offset >= HEADER_LEN as u64);
        assert_eq!(p.data_offset % PAGE as u64, 0);
        assert!(p.data_offset <= size);
        assert!(p.data_len <= size - p.data_offset, "data runs past the end");
        assert!(p.meta.dtype.len() <= header::DTYPE_CAP);
        assert!(p.meta.shape.len() <= header::MAX_NDIM);
        if p.meta.is_typed() {
            assert_eq!(p.meta.nbytes(), Some(p.data_len));
        } else {
            assert!(p.meta.shape.is_empty());
        }
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn flipped_real_headers(
        dims in prop::collection::vec(0u64..6, 0..4),
        typed in any::<bool>(),
        flips in prop::collection::vec((0usize..HEADER_LEN, any::<u8>()), 1..6),
        words in prop::collection::vec((0usize..(HEADER_LEN / 8), any::<u64>()), 0..3),
        size_delta in -9000i64..9000,
    ) {
        let meta = if typed { Meta::typed("<f4", 4, &dims).unwrap() } else { Meta::untyped() };
        let len = meta.nbytes().unwrap_or(40);
        let mut b = real_header(&meta, len);
        for (i, v) in flips { b[i] ^= v; }
        for (i, v) in words { b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes()); }
        let size = (8192 + len as i64 + size_delta).max(0) as u64;
        check_accepted(&b, size);
    }

    #[test]
    fn arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..HEADER_LEN + 16), size in any::<u64>()) {
        check_accepted(&bytes, size);
    }

    #[test]
    fn magic_kept_fields_random(
        fields in prop::collection::vec(any::<u64>(), 8),
        size in 0u64..(1 << 40),
    ) {
        let mut b = real_header(&Meta::untyped(), 100);
        for (k, v) in fields.iter().enumerate() {
            // overwrite the fixed fields after the magic and version
            let off = 16 + 8 * k;
            b[off..off + 8].copy_from_slice(&v.to_le_bytes());
        }
        check_accepted(&b, size);
    }
}

#[test]
fn unflipped_header_is_accepted() {
    let meta = Meta::typed("<f4", 4, &[2, 5]).unwrap();
    let b = real_header(&meta, 40);
    let p = header::parse(&b, 8192 + 40, PAGE, "ok").unwrap();
    assert_eq!(p.meta, meta);
}
