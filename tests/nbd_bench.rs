//! Runs `bulwark bench nbd` (our server vs qemu-nbd through qemu-img); ignored by default
//! because it takes about a minute and wants a release build:
//! `cargo test --release --test nbd_bench -- --ignored --nocapture`.
#![allow(clippy::unwrap_used)]

use bulwark::agent::nbd::bench::{run, BenchOpts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run explicitly in release"]
async fn bench_nbd_against_qemu_nbd() {
    let mut opts = BenchOpts::default();
    if let Ok(dir) = std::env::var("BULWARK_BENCH_DIR") {
        opts.dir = dir.into();
    }
    if let Ok(r) = std::env::var("BULWARK_BENCH_ROUNDS") {
        opts.rounds = r.parse().unwrap();
    }
    if let Ok(r) = std::env::var("BULWARK_BENCH_SIZE_MIB") {
        opts.image_size = r.parse::<u64>().unwrap() << 20;
    }
    let report = run(&opts).await.unwrap();
    println!("{report}");
    assert!(report.rows.len() >= 4);
}
