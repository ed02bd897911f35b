//! Runs `agent::stream::bench` in full until `bulwark bench stream` is wired:
//! `cargo test --release --test stream_bench -- --ignored --nocapture`.
#![allow(clippy::unwrap_used)]

use bulwark::agent::stream::bench::{run, BenchOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: minutes of disk and CPU"]
async fn stream_bench() {
    let dir = std::env::var("BENCH_DIR").unwrap_or_else(|_| "/tmp/bulwark-stream-bench".into());
    let mut opts = BenchOptions::new(&dir);
    if let Ok(mb) = std::env::var("BENCH_MB") {
        opts.bytes = mb.parse::<u64>().unwrap() << 20;
    }
    let report = run(&opts).await.unwrap();
    println!("{report}");
}
