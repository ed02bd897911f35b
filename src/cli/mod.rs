//! The `bulwark` command line: one binary, roles as subcommands (`manager`, `agent`,
//! `demo`), offline administration (`migrate`, `token`), and a client of
//! the REST API for automation (`site`, `host`, `vm`, `vpg`).

mod bench;
mod client;
mod ops;
mod output;

use crate::manager::config::{ConfigFile, ManagerConfig, DEFAULT_DATABASE_URL};
use crate::manager::server::{shutdown_signal, Application};
use crate::manager::store::{Actor, Store};
use crate::model::access::Role;
use crate::proto::api::TokenCreate;
use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(
    name = "bulwark",
    version,
    about = "Disaster recovery for groups of virtual machines"
)]
pub struct Cli {
    /// Log as plain text or as JSON lines.
    #[arg(long, global = true, env = "BULWARK_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// Configuration file (TOML).
    #[arg(
        long,
        global = true,
        env = "BULWARK_CONFIG",
        default_value = "bulwark.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the manager (control plane, REST API, console).
    Manager(ManagerArgs),
    /// The whole system on this machine until Ctrl-C: a manager on SQLite, two sites of
    /// two hosts (in-process agents, mutual TLS), six VMs with guest workloads and two
    /// VPGs, one each way.
    Demo(DemoArgs),
    /// Apply, revert or list database migrations.
    Migrate {
        #[command(flatten)]
        db: DbArgs,
        #[command(subcommand)]
        action: MigrateAction,
    },
    /// Manage API tokens directly in the database (works before the manager runs).
    Token {
        #[command(flatten)]
        db: DbArgs,
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Sites (REST client).
    Site(client::ResourceArgs),
    /// Hosts (REST client).
    Host(client::ResourceArgs),
    /// VMs (REST client).
    Vm(client::ResourceArgs),
    /// VPGs (REST client).
    Vpg(client::ResourceArgs),
    /// Run the host agent (protected disks over NBD, replication stream, recovery
    /// journals), or its tools (`agent certs`).
    Agent(AgentArgs),
    /// Measure a component against this machine's raw limits (ratios from one run).
    Bench {
        #[command(subcommand)]
        what: bench::BenchWhat,
    },
}

#[derive(Subcommand, Debug)]
enum AgentAction {
    /// Make a lab CA (once) and a certificate per host for mutual TLS of the
    /// replication stream.
    Certs {
        /// Directory for ca.pem/ca.key and <host>.pem/<host>.key.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Host names to issue certificates for.
        #[arg(required = true)]
        hosts: Vec<String>,
    },
    /// Register a copy of a protected disk already at this recovery site (a restored
    /// backup, external media) as its replica, so its first sync is a Delta Sync instead
    /// of a full copy. Run it while this agent is stopped.
    Preseed {
        /// The protected host the disk belongs to (an `[[agent.allow]]` entry).
        #[arg(long)]
        from_host: String,
        /// The disk's id.
        #[arg(long)]
        disk_id: u64,
        /// The protected disk's size in bytes (default: the image's size).
        #[arg(long, value_parser = crate::agent::host::config::parse_size)]
        size: Option<u64>,
        /// The raw image to register (it is copied).
        image: PathBuf,
    },
    /// Break-glass recovery with the manager gone: the agent running on this recovery
    /// host brings the VPG up from its journals (powered on in boot order) and this
    /// prints the recovered disks' NBD exports.
    Recover {
        /// The VPG's name (or id).
        #[arg(long)]
        vpg: String,
        /// `latest` (the newest checkpoint recoverable in every journal) or an id.
        #[arg(long, default_value = "latest")]
        checkpoint: String,
        /// A failover test: VMs named "<vm> - Test", scratch discarded when it ends.
        #[arg(long)]
        test: bool,
        /// The running agent's data directory (default: `[agent] data_dir`).
        #[arg(long, env = "BULWARK_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Ends a recovery that no manager runs (break-glass): `--commit` makes the
    /// recovered VMs this host's own (journals promoted to the checkpoint), `--discard`
    /// removes them and their scratch.
    EndRecovery {
        /// The operation id `bulwark agent recover` printed.
        #[arg(long)]
        operation: String,
        #[arg(long, conflicts_with = "discard", required_unless_present = "discard")]
        commit: bool,
        #[arg(long)]
        discard: bool,
        /// The running agent's data directory (default: `[agent] data_dir`).
        #[arg(long, env = "BULWARK_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
}

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
struct AgentArgs {
    #[command(subcommand)]
    action: Option<AgentAction>,
    /// Directory for disk images, dirty bitmaps, spill logs and state.
    #[arg(long, env = "BULWARK_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Site this host belongs to.
    #[arg(long, env = "BULWARK_SITE")]
    site: Option<String>,
    /// This host's name (what peers' allow-lists and certificates name).
    #[arg(long, env = "BULWARK_HOST_NAME")]
    host_name: Option<String>,
    /// NBD exports of the protected disks (default 127.0.0.1:10809).
    #[arg(long, env = "BULWARK_NBD_LISTEN")]
    nbd_listen: Option<String>,
    /// Replication stream listener, for a recovery host (default 127.0.0.1:8471 when
    /// `[[agent.allow]]` names a protected host).
    #[arg(long, env = "BULWARK_DATA_LISTEN")]
    data_listen: Option<String>,
    /// Local admin HTTP endpoint (loopback only): status and a checkpoint trigger.
    #[arg(long, env = "BULWARK_ADMIN_LISTEN")]
    admin_listen: Option<String>,
    /// Directory with ca.pem, <host>.pem, <host>.key (see `bulwark agent certs`).
    #[arg(long, env = "BULWARK_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// Replicate over plain TCP: no encryption, no proof of identity. Labs only.
    #[arg(long)]
    insecure: bool,
    /// The manager to take desired state from, `ws://host:port` (`[agent] manager_url`).
    /// Without one the agent runs from its configuration file alone.
    #[arg(long = "manager", env = "BULWARK_MANAGER_URL")]
    manager_url: Option<String>,
    /// One-time token for the first contact with the manager (an administrator creates
    /// it there); the host key it is exchanged for is stored in
    /// `<data-dir>/state/host.key` and used from then on.
    #[arg(long, env = "BULWARK_ENROLMENT_TOKEN", hide_env_values = true)]
    enrolment_token: Option<String>,
    /// `sim` (VMs are records; the default) or `qemu` (each VM a supervised
    /// `qemu-system-x86_64`; settings in `[agent.qemu]`).
    #[arg(long, env = "BULWARK_HYPERVISOR")]
    hypervisor: Option<String>,
}

#[derive(clap::Args, Debug)]
struct DemoArgs {
    /// Directory for the database, certificates and the hosts' data (default: a new
    /// directory under the system's temp dir, kept).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Address of the manager (REST API, console); port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:8470")]
    listen: std::net::SocketAddr,
    /// Stop by itself after this many seconds.
    #[arg(long)]
    duration: Option<u64>,
    /// No status line every few seconds.
    #[arg(long)]
    quiet: bool,
    /// Real guests under QEMU (needs `qemu-system-x86`): two VMs protected from New
    /// York to London. The test guest is built by `scripts/guest/build.sh` unless
    /// `--guest-kernel` and `--guest-initrd` name one.
    #[arg(long)]
    real_vms: bool,
    #[arg(long, requires = "real_vms")]
    guest_kernel: Option<PathBuf>,
    #[arg(long, requires = "real_vms")]
    guest_initrd: Option<PathBuf>,
    /// `auto` (KVM if a guest boots under it, else TCG), `kvm` or `tcg`.
    #[arg(long, default_value = "auto", requires = "real_vms")]
    accel: String,
}

#[derive(clap::Args, Debug)]
struct ManagerArgs {
    /// Address to serve HTTP on.
    #[arg(long, env = "BULWARK_LISTEN")]
    listen: Option<String>,
    /// `sqlite://FILE?mode=rwc` (default `sqlite://bulwark.db?mode=rwc`) or `postgres://…`.
    #[arg(long, env = "BULWARK_DATABASE_URL")]
    database_url: Option<String>,
    /// Directory of the web console.
    #[arg(long, env = "BULWARK_WEB_DIR")]
    web_dir: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct DbArgs {
    #[arg(long, env = "BULWARK_DATABASE_URL")]
    database_url: Option<String>,
}

#[derive(Subcommand, Debug)]
enum MigrateAction {
    /// Apply every pending migration.
    Up,
    /// Revert migrations (the last one by default).
    Down {
        #[arg(long, default_value_t = 1)]
        steps: u32,
        /// Revert all of them.
        #[arg(long, conflicts_with = "steps")]
        all: bool,
    },
    /// List migrations and whether each is applied.
    Status,
}

#[derive(Subcommand, Debug)]
enum TokenAction {
    /// Create a token and print its secret (shown only once).
    Create {
        #[arg(long, default_value = "cli")]
        name: String,
        #[arg(long, value_parser = parse_role)]
        role: Role,
        #[arg(long)]
        expires_in_days: Option<u32>,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token by id.
    Revoke { id: String },
}

fn parse_role(s: &str) -> Result<Role, String> {
    Role::parse(s).ok_or_else(|| format!("`{s}` is not a role: viewer, operator or admin"))
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let file = if cli.config.exists() {
        match ConfigFile::load(&cli.config) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        ConfigFile::default()
    };
    // The demo prints its own status; its logs default to warnings so that shows.
    let default_log = if matches!(cli.command, Command::Demo(_)) {
        "warn"
    } else {
        "info"
    };
    init_tracing(cli.log_format, &file, default_log);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.command, file)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(flag: Option<LogFormat>, file: &ConfigFile, default: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("BULWARK_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .or_else(|| file.log.clone())
        .unwrap_or_else(|| default.into());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new(default));
    let json = flag == Some(LogFormat::Json)
        || (flag.is_none() && file.log_format.as_deref() == Some("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

fn database_url(db: &DbArgs, file: &ConfigFile) -> String {
    db.database_url
        .clone()
        .or_else(|| file.manager.database_url.clone())
        .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_string())
}

async fn run(command: Command, file: ConfigFile) -> Result<ExitCode> {
    match command {
        Command::Manager(a) => {
            let config = ManagerConfig::resolve(&file, a.listen, a.database_url, a.web_dir)?;
            let stop = shutdown_signal();
            let app = Application::build(&config)
                .await
                .context("starting the manager")?;
            if let Some(secret) = &app.bootstrap_secret {
                eprintln!(
                    "\nNo API token existed, so an admin token was created. It is shown only now:\n\n    {secret}\n\nUse it as `Authorization: Bearer <token>`, or `export BULWARK_TOKEN={secret}` for the CLI.\n"
                );
            }
            eprintln!("Bulwark manager on http://{}/", app.local_addr());
            app.run_until(stop).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(a) => {
            let real_vms = if a.real_vms {
                let (kernel, initrd) = match (a.guest_kernel, a.guest_initrd) {
                    (Some(k), Some(i)) => (k, i),
                    (None, None) => {
                        eprintln!("Building the test guest (scripts/guest/build.sh, cached)…");
                        crate::guest::image().context("the test guest")?
                    }
                    _ => anyhow::bail!("--guest-kernel and --guest-initrd go together"),
                };
                Some(crate::demo::RealVms {
                    kernel,
                    initrd,
                    accel: a.accel,
                })
            } else {
                None
            };
            let opts = crate::demo::DemoOpts {
                dir: a.dir,
                listen: a.listen,
                duration: a.duration.map(std::time::Duration::from_secs),
                quiet: a.quiet,
                web_dir: file
                    .manager
                    .web_dir
                    .clone()
                    .or_else(crate::manager::config::default_web_dir),
                real_vms,
            };
            crate::demo::run(opts, shutdown_signal())
                .await
                .context("bulwark demo")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate { db, action } => {
            let store = Store::connect(&database_url(&db, &file))
                .await
                .context("connecting to the database")?;
            match action {
                MigrateAction::Up => store.migrate_up().await?,
                MigrateAction::Down { steps, all } => {
                    store
                        .migrate_down(if all { None } else { Some(steps) })
                        .await?
                }
                MigrateAction::Status => {}
            }
            for m in store.migration_status().await? {
                println!(
                    "{:<10} {}",
                    if m.applied { "applied" } else { "pending" },
                    m.name
                );
            }
            store.close().await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Token { db, action } => {
            let store = Store::connect(&database_url(&db, &file))
                .await
                .context("connecting to the database")?;
            store.migrate_up().await?;
            let actor = Actor(format!("cli:{}", whoami()));
            match action {
                TokenAction::Create {
                    name,
                    role,
                    expires_in_days,
                } => {
                    let t = store
                        .create_token(
                            &actor,
                            TokenCreate {
                                name,
                                role,
                                expires_in_days,
                            },
                        )
                        .await?;
                    eprintln!(
                        "created {} token `{}` (id {}); the secret is shown only now:",
                        t.token.role, t.token.name, t.token.id
                    );
                    println!("{}", t.secret);
                }
                TokenAction::List => {
                    let mut cursor = None;
                    loop {
                        let page = store
                            .list_tokens(&crate::proto::api::PageQuery {
                                limit: Some(1000),
                                cursor,
                            })
                            .await?;
                        for t in &page.items {
                            let state = if t.revoked_at.is_some() {
                                "revoked"
                            } else {
                                "active"
                            };
                            println!(
                                "{}  {:<8} {:<8} {}  {}",
                                t.id, t.role, state, t.prefix, t.name
                            );
                        }
                        match page.next_cursor {
                            Some(c) => cursor = Some(c),
                            None => break,
                        }
                    }
                }
                TokenAction::Revoke { id } => {
                    let t = store.revoke_token(&actor, &id).await?;
                    println!("revoked {} ({})", t.id, t.name);
                }
            }
            store.close().await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { what } => bench::run(what).await,
        Command::Agent(AgentArgs {
            action: Some(AgentAction::Certs { dir, hosts }),
            ..
        }) => {
            let files = crate::agent::tls::lab_certs(&dir, &hosts)?;
            for f in files {
                println!(
                    "{}  {}  (CA {})",
                    f.cert.display(),
                    f.key.display(),
                    f.ca.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Agent(AgentArgs {
            action:
                Some(AgentAction::Preseed {
                    from_host,
                    disk_id,
                    size,
                    image,
                }),
            ..
        }) => {
            let storage = file
                .agent
                .allow
                .iter()
                .find(|x| x.host_name == from_host)
                .map(|x| x.storage.clone())
                .with_context(|| {
                    format!("no [[agent.allow]] entry for host `{from_host}` in the configuration")
                })?;
            let size = match size {
                Some(s) => s,
                None => std::fs::metadata(&image)
                    .with_context(|| format!("{}", image.display()))?
                    .len(),
            };
            let replica = crate::agent::stream::preseed(&storage, disk_id, &image, size)?;
            println!(
                "registered {} as the replica of disk {disk_id} from {from_host}: {}",
                image.display(),
                replica.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Agent(AgentArgs {
            action:
                Some(AgentAction::Recover {
                    vpg,
                    checkpoint,
                    test,
                    data_dir,
                }),
            ..
        }) => {
            let data_dir = data_dir
                .or_else(|| file.agent.data_dir.clone())
                .context("--data-dir (or [agent] data_dir) is needed to find the running agent")?;
            let checkpoint = match checkpoint.as_str() {
                "latest" => None,
                id => Some(id.parse::<u64>().with_context(|| {
                    format!("--checkpoint: `latest` or a checkpoint id, not `{id}`")
                })?),
            };
            let r =
                crate::agent::recovery::break_glass_via_admin(&data_dir, &vpg, checkpoint, test)
                    .await?;
            println!(
                "VPG {} recovered at checkpoint {} ({}), operation {}",
                r.vpg,
                r.report.checkpoint,
                if r.report.test { "test" } else { "live" },
                r.report.operation
            );
            for vm in &r.report.vms {
                println!("  VM {} ({})", vm.name, vm.power_state.as_str());
                for d in &vm.disks {
                    println!("    {}  nbd://{}/{}", d.name, r.nbd, d.export);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Agent(AgentArgs {
            action:
                Some(AgentAction::EndRecovery {
                    operation,
                    commit,
                    discard: _,
                    data_dir,
                }),
            ..
        }) => {
            use crate::proto::control::RecoveryEnd;
            let data_dir = data_dir
                .or_else(|| file.agent.data_dir.clone())
                .context("--data-dir (or [agent] data_dir) is needed to find the running agent")?;
            let end = if commit {
                RecoveryEnd::Commit
            } else {
                RecoveryEnd::Discard
            };
            let out = crate::agent::recovery::end_via_admin(&data_dir, &operation, end).await?;
            println!(
                "recovery {operation} {}: {out}",
                if commit { "committed" } else { "discarded" }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Agent(a) => run_agent(a, &file).await,
        Command::Site(a) => client::run("sites", a).await,
        Command::Host(a) => client::run("hosts", a).await,
        Command::Vm(a) => client::run("vms", a).await,
        Command::Vpg(a) => client::run("vpgs", a).await,
    }
}

async fn run_agent(a: AgentArgs, file: &ConfigFile) -> Result<ExitCode> {
    use crate::agent::control::{ControlClient, ControlSettings};
    use crate::agent::host::{admin, AgentConfig, AgentFlags};
    use crate::agent::hypervisor::{self, HostVms};
    let flags = AgentFlags {
        data_dir: a.data_dir,
        site: a.site,
        host_name: a.host_name,
        nbd_listen: a.nbd_listen,
        data_listen: a.data_listen,
        admin_listen: a.admin_listen,
        tls_dir: a.tls_dir,
        insecure: a.insecure,
    };
    let config = AgentConfig::resolve(&file.agent, flags)?;
    // Checked before anything opens: a manager URL without a way to prove who we are is
    // a mistake to report now, not to retry forever.
    let control = ControlSettings::resolve(
        &file.agent,
        a.manager_url,
        a.enrolment_token,
        &config.data_dir,
    )?;
    if let Some(c) = &control {
        c.credential()?;
    }
    let admin_listen = config.admin_listen;
    let choice =
        hypervisor::DriverChoice::resolve(&file.agent, a.hypervisor.as_deref(), &config.data_dir)?;
    let stop = shutdown_signal();
    let started = hypervisor::start_agent_with(config, choice)
        .await
        .context("starting the agent")?;
    if let Some(reason) = &file.agent.sim_quiesce_error {
        started.catalog.fail_quiesce(Some(reason.clone()));
    }
    let agent = started.agent;
    let vms = Arc::new(HostVms::new(started.driver, agent.clone()));
    let stop_control = tokio_util::sync::CancellationToken::new();
    let mut control_task = None;
    let mut client = None;
    if let Some(settings) = control {
        let url = settings.manager_url.clone();
        let c = ControlClient::new(settings, agent.clone(), vms.clone())?;
        control_task = Some(tokio::spawn(c.clone().run(stop_control.clone())));
        client = Some(c);
        eprintln!("Control channel to the manager at {url}");
    }
    let stop_admin = tokio_util::sync::CancellationToken::new();
    let mut admin_addr = None;
    let mut admin_task = None;
    if let Some(addr) = admin_listen {
        let listener = admin::bind(addr).await?;
        let addr = listener.local_addr()?;
        agent.set_admin_addr(addr);
        admin_addr = Some(addr);
        let state = admin::AdminState {
            agent: agent.clone(),
            vms: Some(vms.clone()),
            control: client,
        };
        admin_task = Some(tokio::spawn(admin::serve(
            listener,
            state,
            stop_admin.clone(),
        )));
    }
    let endpoints = agent.write_endpoints()?;
    let e = agent.endpoints();
    eprintln!(
        "Bulwark agent {} (site {}): NBD on {}{}{}; endpoints in {}",
        e.host_name,
        e.site,
        e.nbd,
        e.data
            .as_ref()
            .map(|d| format!(", replication on {d}"))
            .unwrap_or_default(),
        admin_addr
            .map(|d| format!(", admin on http://{d}"))
            .unwrap_or_default(),
        endpoints.display()
    );
    stop.await;
    // The manager hears the agent go before the agent stops serving.
    stop_control.cancel();
    if let Some(t) = control_task {
        let _ = t.await;
    }
    agent.shutdown().await?;
    stop_admin.cancel();
    if let Some(t) = admin_task {
        let _ = t.await;
    }
    Ok(ExitCode::SUCCESS)
}

fn whoami() -> String {
    std::env::var("USER").unwrap_or_else(|_| "unknown".into())
}
