//! `bulwark bench …`: each subcommand measures one component against this machine's own
//! limits (ratios from one run) and prints its report.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Subcommand, ValueEnum};

#[derive(Subcommand, Debug)]
pub(super) enum BenchWhat {
    /// Journal ingest vs raw write+fdatasync, view open time and index memory at 1 and
    /// 8 GiB, reads through a view vs the replica file.
    Journal {
        /// Directory on the disk to measure (files are deleted afterwards).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// 1.0 is the full run (~14 GB of disk at the peak, a few minutes).
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// Repeats of each ingest measurement (the median is reported).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
    },
    /// Our NBD server against qemu-nbd on the same disk, driven by qemu-img.
    Nbd {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Also measure writes through a protected device (dirty tracking, gate).
        #[arg(long)]
        protected: bool,
    },
    /// Replication stream over loopback TLS into a journal vs the journal alone, and
    /// acknowledgement latency at half the measured capacity.
    Stream {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// End to end: a protected and a recovery agent in this process (NBD export, TLS
    /// stream, journal) against qemu-nbd on the same disk; throughput, latency, lag.
    Agent {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Size of the exports and of the converted file (e.g. 512MiB, 2GiB).
        #[arg(long, default_value = "2GiB", value_parser = crate::agent::host::config::parse_size)]
        size: u64,
    },
    /// Disk sync engine: Delta (1 % of 4 KiB blocks changed) against rsync
    /// --no-whole-file, an unchanged pair against reading both files, and Bitmap bytes.
    Sync {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Size of each disk image (e.g. 512MiB, 2GiB); three copies are made.
        #[arg(long, default_value = "2GiB", value_parser = crate::agent::host::config::parse_size)]
        size: u64,
        /// Drop the files from the page cache before every run (reads hit the device).
        #[arg(long)]
        cold: bool,
    },
    /// Checkpoint rounds across hosts: a manager, a recovery agent and N protected
    /// agents in this process on loopback; write-completion hold p50/p99 for VPGs of
    /// each size, and the RPO of 1 s checkpoints under half the measured write capacity.
    Checkpoints {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Protected hosts per VPG, one system per value.
        #[arg(long, value_delimiter = ',', default_value = "2,10")]
        hosts: Vec<usize>,
        /// Tagged rounds per system.
        #[arg(long, default_value_t = 500)]
        rounds: usize,
        /// Seconds of sustained load for the RPO figure (0 skips it).
        #[arg(long, default_value_t = 20)]
        load_secs: u64,
    },
    /// Recovery time and commit throughput through the manager REST API: a VPG of 10
    /// VMs in this process on loopback; failover test and live failover RTO with 1 and
    /// 8 GiB of journal history, then the commit's promote against a raw copy.
    Rto {
        /// Directory on the disk to measure (files are deleted afterwards).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// 1.0 is the full run (1 and 8 GiB of journal, ~35 GB of disk at the peak);
        /// 0.125 is a quick one.
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// VMs in the VPG (one protected host each).
        #[arg(long, default_value_t = 10)]
        vms: usize,
        /// Size of each VM's disk (default: 1 GiB × scale, at least 64 MiB).
        #[arg(long, value_parser = crate::agent::host::config::parse_size)]
        disk_size: Option<u64>,
        /// Failover tests at each journal size (the medians are compared).
        #[arg(long, default_value_t = 5)]
        repeats: usize,
    },
    /// A planned move of a VPG of 3 VMs on 2 protected hosts through the manager REST
    /// API, in this process on loopback: moves alternate between idle guests and guests
    /// writing, each rolled back; median time to "before commit" of each and the ratio.
    Move {
        /// Directory on the disk to measure (files are deleted afterwards).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Moves of each kind (idle, writing).
        #[arg(long, default_value_t = 10)]
        moves: usize,
        /// Size of each VM's disk.
        #[arg(long, default_value = "64MiB", value_parser = crate::agent::host::config::parse_size)]
        disk_size: u64,
        /// Milliseconds between one guest's 16 KiB writes under load.
        #[arg(long, default_value_t = 2)]
        write_interval_ms: u64,
    },
    /// Real guests under QEMU: RTO to the recovered guest's ready line (1 VM and a boot
    /// group) against a plain cold boot of the same disk from a local raw file, and
    /// in-guest `dd oflag=direct` onto a protected, replicating disk against a local file.
    Guests {
        /// Directory on the disk to measure (files are deleted afterwards).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Failover tests and cold boots of each kind (medians are compared).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// VMs in the boot group.
        #[arg(long, default_value_t = 4)]
        group: usize,
        /// MiB the guest writes with dd.
        #[arg(long, default_value_t = 256)]
        dd_mib: u64,
        /// `tcg` or `kvm`.
        #[arg(long, default_value = "tcg")]
        accel: String,
    },
    /// The manager at scale: a child `bulwark manager` (SQLite or PostgreSQL) with
    /// simulated agents over the control channel; time to Meeting SLA, manager CPU and
    /// RSS, `GET /api/v1/vpgs` latency, checkpoint rounds, live-stream fan-out latency.
    Scale(ScaleArgs),
}

#[derive(clap::Args, Debug)]
pub(super) struct ScaleArgs {
    #[arg(long, default_value_t = 200)]
    hosts: usize,
    #[arg(long, default_value_t = 10_000)]
    vms: usize,
    #[arg(long, default_value_t = 1_000)]
    vpgs: usize,
    #[arg(long, default_value_t = 1)]
    checkpoint_interval_secs: u32,
    /// Length of the measurement window once every VPG is Meeting SLA.
    #[arg(long, default_value_t = 60)]
    measure_secs: u64,
    /// Live-stream clients for the fan-out latency (0 skips it).
    #[arg(long, default_value_t = 50)]
    clients: usize,
    #[arg(long, value_enum, default_value = "sqlite")]
    database: crate::manager::bench_scale::Database,
    /// PostgreSQL server; a throwaway database `bulwark_bench_<random>` is made on it
    /// and dropped at the end.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    database_url: String,
    /// Work directory (SQLite file, manager log and config).
    #[arg(long, default_value = "bench-scale")]
    dir: PathBuf,
    /// Longest wait for every VPG to reach Meeting SLA before measuring anyway.
    #[arg(long, default_value_t = 300)]
    settle_secs: u64,
    #[arg(long, value_enum, default_value = "table")]
    output: ScaleOutput,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum ScaleOutput {
    Table,
    Json,
}

pub(super) async fn run(what: BenchWhat) -> Result<ExitCode> {
    match what {
        BenchWhat::Journal {
            dir,
            scale,
            repeats,
        } => {
            use crate::agent::journal::bench;
            if !(scale > 0.0 && scale <= 1.0) {
                anyhow::bail!("--scale must be in (0, 1]");
            }
            let opts = bench::BenchOptions {
                dir,
                scale,
                repeats: repeats.max(1),
            };
            let report = tokio::task::spawn_blocking(move || bench::run(&opts))
                .await
                .context("the benchmark thread failed")??;
            println!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        BenchWhat::Nbd { dir, protected } => {
            use crate::agent::nbd::bench;
            let opts = bench::BenchOpts {
                dir,
                protected,
                ..Default::default()
            };
            println!("{}", bench::run(&opts).await?);
            Ok(ExitCode::SUCCESS)
        }
        BenchWhat::Stream { dir } => {
            use crate::agent::stream::bench;
            println!("{}", bench::run(&bench::BenchOptions::new(dir)).await?);
            Ok(ExitCode::SUCCESS)
        }
        BenchWhat::Agent { dir, size } => {
            use crate::agent::host::bench;
            let opts = bench::BenchOpts {
                size,
                ..bench::BenchOpts::new(dir)
            };
            println!("{}", bench::run(&opts).await?);
            Ok(ExitCode::SUCCESS)
        }
        BenchWhat::Sync { dir, size, cold } => {
            use crate::agent::sync::bench;
            let opts = bench::BenchOpts {
                size,
                cold,
                ..bench::BenchOpts::new(dir)
            };
            let report = tokio::task::spawn_blocking(move || bench::run(&opts))
                .await
                .context("the benchmark thread failed")??;
            println!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        BenchWhat::Scale(a) => {
            use crate::manager::bench_scale;
            let opts = bench_scale::ScaleOpts {
                hosts: a.hosts,
                vms: a.vms,
                vpgs: a.vpgs,
                checkpoint_interval_secs: a.checkpoint_interval_secs,
                measure_secs: a.measure_secs,
                clients: a.clients,
                database: a.database,
                database_url: a.database_url,
                settle_secs: a.settle_secs,
                ..bench_scale::ScaleOpts::new(a.dir)
            };
            let report = bench_scale::run(&opts).await?;
            match a.output {
                ScaleOutput::Table => print!("{}", bench_scale::table(&report)),
                ScaleOutput::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            }
            Ok(ExitCode::SUCCESS)
        }
        BenchWhat::Rto {
            dir,
            scale,
            vms,
            disk_size,
            repeats,
        } => {
            use crate::manager::bench_rto;
            let mut opts = bench_rto::RtoOpts {
                vms,
                repeats,
                ..bench_rto::RtoOpts::new(dir, scale)
            };
            if let Some(d) = disk_size {
                opts.disk_size = d;
            }
            print!("{}", bench_rto::run(&opts).await?.text());
            Ok(ExitCode::SUCCESS)
        }
        BenchWhat::Guests {
            dir,
            repeats,
            group,
            dd_mib,
            accel,
        } => {
            use crate::bench_guests;
            let opts = bench_guests::GuestBenchOpts {
                repeats: repeats.max(1),
                group: group.max(1),
                dd_mib: dd_mib.max(1),
                accel,
                ..bench_guests::GuestBenchOpts::new(dir)
            };
            print!("{}", bench_guests::run(&opts).await?.text());
            Ok(ExitCode::SUCCESS)
        }
        BenchWhat::Move {
            dir,
            moves,
            disk_size,
            write_interval_ms,
        } => {
            use crate::manager::bench_move;
            let opts = bench_move::MoveOpts {
                moves,
                disk_size,
                write_interval: std::time::Duration::from_millis(write_interval_ms),
                ..bench_move::MoveOpts::new(dir)
            };
            print!("{}", bench_move::run(&opts).await?.text());
            Ok(ExitCode::SUCCESS)
        }
        BenchWhat::Checkpoints {
            dir,
            hosts,
            rounds,
            load_secs,
        } => {
            use crate::manager::bench;
            let opts = bench::BenchOpts {
                hosts,
                rounds,
                load_secs,
                ..bench::BenchOpts::new(dir)
            };
            println!("{}", bench::run(&opts).await?);
            Ok(ExitCode::SUCCESS)
        }
    }
}
