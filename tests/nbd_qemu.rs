//! Our NBD server against real clients: qemu-io workloads checked byte for byte against a
//! model, qemu-img convert/info round trips, qemu-nbd --list, and error paths as qemu sees them.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns unwrap too

mod nbd_common;

use std::sync::Arc;
use std::time::Duration;

use bulwark::agent::nbd::{ExportRegistry, FileDevice};
use nbd_common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;

/// Random but reproducible qemu-io commands, applied to `model` as they are generated.
fn workload(seed: u64, model: &mut [u8], n: usize) -> Vec<String> {
    let size = model.len() as u64;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cmds = Vec::new();
    let pick_len = |rng: &mut StdRng| -> u64 {
        match rng.random_range(0..6) {
            0 => 512,
            1 => 4096,
            2 => 65536,
            3 => MIB,
            4 => rng.random_range(1..200_000),
            _ => 4096 * rng.random_range(1..64),
        }
    };
    let pick_off = |rng: &mut StdRng, len: u64| -> u64 {
        let off = rng.random_range(0..=size - len);
        if rng.random_bool(0.7) {
            off / 512 * 512
        } else {
            off
        }
    };
    while cmds.len() < n {
        let len = pick_len(&mut rng);
        let off = pick_off(&mut rng, len);
        let pat: u8 = rng.random_range(1..=255);
        let r = off as usize..(off + len) as usize;
        match rng.random_range(0..10) {
            0..=2 => {
                cmds.push(format!("write -P {pat} {off} {len}"));
                model[r].fill(pat);
                cmds.push(format!("read -P {pat} {off} {len}"));
            }
            3 => {
                cmds.push(format!("write -f -P {pat} {off} {len}"));
                model[r].fill(pat);
            }
            4 => {
                cmds.push(format!("write -z {off} {len}"));
                model[r].fill(0);
            }
            5 => {
                cmds.push(format!("write -z -u {off} {len}"));
                model[r].fill(0);
            }
            6 => {
                cmds.push(format!("discard {off} {len}"));
                model[r].fill(0);
            }
            7 | 8 => {
                // A burst of non-overlapping writes, all in flight at once.
                let k = rng.random_range(8..32u64);
                let slot = size / k;
                for i in 0..k {
                    let l = rng.random_range(1..=slot.min(256 * 1024));
                    let o = i * slot + rng.random_range(0..=slot - l);
                    let p: u8 = rng.random_range(1..=255);
                    cmds.push(format!("aio_write -P {p} {o} {l}"));
                    model[o as usize..(o + l) as usize].fill(p);
                }
                cmds.push("aio_flush".into());
            }
            _ => cmds.push("flush".into()),
        }
    }
    cmds
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_mixed_workload_matches_model() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let size = 32 * MIB;
    let dev = FileDevice::create(&img, size).unwrap();
    let registry = ExportRegistry::new();
    registry.add("disk", Arc::new(dev)).unwrap();
    let server = TestServer::start(registry).await;

    let mut model = vec![0u8; size as usize];
    for round in 0..3u64 {
        let cmds = workload(round + 11, &mut model, 120);
        // qemu-io's default cache mode is writethrough (every write FUA, the blocking
        // path); writeback sends plain writes, which take the server's inline fast path.
        let cache = if round == 0 {
            "writethrough"
        } else {
            "writeback"
        };
        let out = qemu_io(&server.url("disk"), &["-d", "unmap", "-t", cache], &cmds).await;
        assert_qemu_ok(&out);
        let t = String::from_utf8_lossy(&out.stdout);
        // Every write/read printed its statistics line.
        assert!(
            t.matches("wrote ").count() >= cmds.iter().filter(|c| c.contains("write")).count() / 2
        );
    }
    let disk = std::fs::read(&img).unwrap();
    assert_eq!(disk.len(), model.len());
    if let Some(i) = disk.iter().zip(&model).position(|(a, b)| a != b) {
        panic!("backing file differs from the model first at byte {i}");
    }
    // A trimmed region is really a hole now (punch hole worked), not zeroes written.
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_roundtrip_info_and_list() {
    let dir = tempfile::tempdir().unwrap();
    let size = 24 * MIB + 4096;
    let src = dir.path().join("src.raw");
    let mut data = vec![0u8; size as usize];
    fill_random(&mut data[..(20 * MIB) as usize], 42); // the tail stays zero
    write_file(&src, &data);
    let img = dir.path().join("disk.img");
    let registry = ExportRegistry::new();
    registry
        .add_with_description(
            "disk",
            "a test disk",
            Arc::new(FileDevice::create(&img, size).unwrap()),
        )
        .unwrap();
    let ro_img = dir.path().join("ro.img");
    write_file(&ro_img, &data[..(MIB as usize)]);
    registry
        .add("ro", Arc::new(FileDevice::open(&ro_img, true).unwrap()))
        .unwrap();
    let server = TestServer::start(registry).await;
    let url = server.url("disk");
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let t = Duration::from_secs(60);

    // Into the export.
    let o = run(
        "qemu-img",
        &s(&[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &url,
        ]),
        t,
    )
    .await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        std::fs::read(&img).unwrap() == data,
        "export content differs from source"
    );

    // Out of it.
    let out = dir.path().join("out.raw");
    let o = run(
        "qemu-img",
        &s(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &url,
            out.to_str().unwrap(),
        ]),
        t,
    )
    .await;
    assert!(o.status.success(), "{}", text(&o));
    let o = run(
        "cmp",
        &s(&[src.to_str().unwrap(), out.to_str().unwrap()]),
        t,
    )
    .await;
    assert!(o.status.success(), "cmp: {}", text(&o));

    // Size as qemu sees it.
    let o = run("qemu-img", &s(&["info", "--output=json", &url]), t).await;
    assert!(o.status.success(), "{}", text(&o));
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(info["virtual-size"].as_u64(), Some(size), "{info}");

    // Export list (NBD_OPT_LIST, then NBD_OPT_INFO per export).
    let port = server.addr.port().to_string();
    let o = run(
        "qemu-nbd",
        &s(&["--list", "-b", "127.0.0.1", "-p", &port]),
        t,
    )
    .await;
    let listing = text(&o);
    assert!(o.status.success(), "{listing}");
    assert!(listing.contains("exports available: 2"), "{listing}");
    assert!(listing.contains("export: 'disk'"), "{listing}");
    assert!(listing.contains("description: a test disk"), "{listing}");
    assert!(listing.contains(&format!("size:  {size}")), "{listing}");
    assert!(listing.contains("export: 'ro'"), "{listing}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_sees_errors_and_keeps_going() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let ro_img = dir.path().join("ro.img");
    write_file(&ro_img, &vec![0x5a; MIB as usize]);
    let registry = ExportRegistry::new();
    registry
        .add("disk", Arc::new(FileDevice::create(&img, 4 * MIB).unwrap()))
        .unwrap();
    registry
        .add("ro", Arc::new(FileDevice::open(&ro_img, true).unwrap()))
        .unwrap();
    let server = TestServer::start(registry).await;

    // Past the end: an error is printed, the next command on the same connection works.
    let cmds: Vec<String> = ["read 4M 4k", "write -P 7 0 4k", "read -P 7 0 4k"]
        .map(String::from)
        .to_vec();
    let o = qemu_io(&server.url("disk"), &[], &cmds).await;
    let t = text(&o);
    assert!(
        t.contains("read failed")
            || t.contains("Input/output error")
            || t.contains("Invalid argument"),
        "{t}"
    );
    assert!(t.contains("wrote 4096/4096 bytes at offset 0"), "{t}");
    assert!(t.contains("read 4096/4096 bytes at offset 0"), "{t}");
    assert!(!t.contains("Pattern verification failed"), "{t}");

    // Read-only export: qemu reads it, refuses to write.
    let cmds: Vec<String> = ["read -P 0x5a 0 64k", "write -P 1 0 4k"]
        .map(String::from)
        .to_vec();
    let o = qemu_io(&server.url("ro"), &["-r"], &cmds).await;
    let t = text(&o);
    assert!(t.contains("read 65536/65536 bytes"), "{t}");
    assert!(t.contains("write failed") || t.contains("read-only"), "{t}");
    assert_eq!(std::fs::read(&ro_img).unwrap(), vec![0x5a; MIB as usize]);
    // Opening it read-write is refused at open time.
    let o = qemu_io(&server.url("ro"), &[], &["write -P 1 0 4k".to_string()]).await;
    assert!(
        !o.status.success() || text(&o).contains("failed"),
        "{}",
        text(&o)
    );

    // Unknown export: refused during negotiation.
    let o = qemu_io(&server.url("nope"), &[], &["read 0 4k".to_string()]).await;
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("nope"), "{t}");
    server.shutdown().await;
}
