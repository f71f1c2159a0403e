//! The committed C header must match what cbindgen generates from `src/ffi.rs`.
//! Run with `ZCBUF_BLESS=1` to rewrite it.

#[test]
fn header_is_up_to_date() {
    let root = env!("CARGO_MANIFEST_DIR");
    let config = cbindgen::Config::from_file(format!("{root}/cbindgen.toml")).unwrap();
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_crate(root)
        .with_config(config)
        .generate()
        .expect("cbindgen runs")
        .write(&mut out);
    let fresh = String::from_utf8(out).unwrap();
    let path = format!("{root}/include/zcbuf.h");
    if std::env::var_os("ZCBUF_BLESS").is_some() {
        std::fs::write(&path, &fresh).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "include/zcbuf.h is out of date with src/ffi.rs: run `ZCBUF_BLESS=1 cargo test --test header` and commit it"
    );
}

#[test]
fn every_c_name_carries_the_prefix() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/include/zcbuf.h")).unwrap();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("#define ") {
            assert!(rest.starts_with("ZCBUF_"), "unprefixed macro: {line}");
        }
        if line.contains('(')
            && !line.starts_with("//")
            && !line.starts_with(' ')
            && line.ends_with(';')
        {
            let name = line
                .split('(')
                .next()
                .unwrap()
                .split_whitespace()
                .last()
                .unwrap();
            assert!(
                name.trim_start_matches('*').starts_with("zcbuf_"),
                "unprefixed function: {line}"
            );
        }
    }
}
