//! Registry micro-benchmarks: acquire+release, create+free per backing and size, open by name.
//! Run: `cargo bench --bench registry` (figures in docs/benchmarks.md).

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use zcbuf::{CreateOptions, Registry};

fn acquire_release(c: &mut Criterion) {
    let r = Registry::new();
    let id = r.create(4096, &CreateOptions::new()).unwrap();
    c.bench_function("acquire+release (uncontended)", |b| {
        b.iter(|| {
            let (p, n) = r.acquire(black_box(id)).unwrap();
            black_box((p, n));
            r.release(id).unwrap();
        })
    });
    r.free(id).unwrap();

    // Scaling: N threads each on their own id, timed together; per-pair time reported.
    let mut g = c.benchmark_group("acquire+release threads on distinct ids");
    for threads in [1usize, 2] {
        g.throughput(Throughput::Elements(threads as u64));
        g.bench_with_input(
            BenchmarkId::from_parameter(threads),
            &threads,
            |b, &threads| {
                b.iter_custom(|iters| {
                    let r = Arc::new(Registry::new());
                    let ids: Vec<u64> = (0..threads)
                        .map(|_| r.create(4096, &CreateOptions::new()).unwrap())
                        .collect();
                    let barrier = Arc::new(Barrier::new(threads + 1));
                    let hs: Vec<_> = ids
                        .iter()
                        .map(|&id| {
                            let (r, barrier) = (Arc::clone(&r), Arc::clone(&barrier));
                            std::thread::spawn(move || {
                                barrier.wait();
                                for _ in 0..iters {
                                    black_box(r.acquire(id).unwrap());
                                    r.release(id).unwrap();
                                }
                            })
                        })
                        .collect();
                    barrier.wait();
                    let t = Instant::now();
                    for h in hs {
                        h.join().unwrap();
                    }
                    t.elapsed()
                })
            },
        );
    }
    g.finish();
}

fn create_free(c: &mut Criterion) {
    let r = Registry::new();
    let dir = std::env::temp_dir().join(format!("zcbuf-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut g = c.benchmark_group("create+free");
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300));
    for size in [4096usize, 1 << 20, 64 << 20] {
        g.bench_with_input(BenchmarkId::new("private", size), &size, |b, &n| {
            b.iter(|| r.free(r.create(n, &CreateOptions::new()).unwrap()).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("shared", size), &size, |b, &n| {
            b.iter(|| {
                r.free(r.create_shared(None, n, &CreateOptions::new()).unwrap())
                    .unwrap()
            })
        });
        let mut k = 0u64;
        g.bench_with_input(BenchmarkId::new("file", size), &size, |b, &n| {
            b.iter(|| {
                k += 1;
                let p = dir.join(format!("f{k}"));
                r.free(r.create_file(&p, n, &CreateOptions::new()).unwrap())
                    .unwrap();
                std::fs::remove_file(&p).unwrap();
            })
        });
    }
    g.finish();
    std::fs::remove_dir_all(&dir).unwrap();
}

fn open_by_name(c: &mut Criterion) {
    let r = Registry::new();
    let mut g = c.benchmark_group("open_shared+free");
    for size in [4096usize, 1 << 30] {
        let id = r.create_shared(None, size, &CreateOptions::new()).unwrap();
        let name = r.name(id).unwrap().unwrap();
        g.bench_with_input(BenchmarkId::from_parameter(size), &name, |b, name| {
            b.iter(|| r.free(r.open_shared(name, false).unwrap()).unwrap())
        });
        r.free(id).unwrap();
    }
    g.finish();
}

criterion_group!(benches, acquire_release, create_free, open_by_name);
criterion_main!(benches);
