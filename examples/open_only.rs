fn main() {
    let r = zcbuf::Registry::global();
    let name = std::env::args().nth(1).unwrap();
    for _ in 0..300000 {
        let h = r.open_shared(&name, false).unwrap();
        r.free(h).unwrap();
    }
}
