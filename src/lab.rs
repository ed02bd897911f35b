//! The whole system in one process on loopback, as building blocks: a manager on SQLite
//! in a directory, an admin API token, enrolment tokens, agents started as tasks that
//! dial the manager's real control channel, a small REST client, and the waits that
//! setting up a protection needs (inventory reported, VPG created, status reached).
//!
//! Used by `bulwark bench checkpoints` (measurements) and `bulwark demo` (a running
//! system to look at); both drive the manager only through its public API, as an
//! operator would, so what they show is what production does.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::agent::control::{ControlClient, ControlError, ControlSettings as AgentControl};
use crate::agent::host::{Agent, AgentConfig, AgentConfigError, AgentError, AgentFlags};
use crate::agent::hypervisor::{self, HostVms, HypervisorError};
use crate::agent::nbd::NbdError;
use crate::agent::tls::TlsError;
use crate::manager::config::ManagerConfig;
use crate::manager::control::{ControlPlane, ControlSettings};
use crate::manager::server::{Application, ServerError};
use crate::manager::store::{Actor, StoreError};
use crate::model::access::Role;
use crate::proto::api::TokenCreate;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("{0}")]
    Setup(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    AgentConfig(#[from] AgentConfigError),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("REST: {0}")]
    Http(#[from] reqwest::Error),
    #[error(transparent)]
    Nbd(#[from] NbdError),
}

pub fn setup(what: impl Into<String>) -> LabError {
    LabError::Setup(what.into())
}

/// Creates `dir` (and parents).
pub fn create_dir(dir: &Path) -> Result<(), LabError> {
    std::fs::create_dir_all(dir).map_err(|source| LabError::Io {
        what: format!("create {}", dir.display()),
        source,
    })
}

/// A manager configuration on SQLite at `<dir>/bulwark.db` (created when missing).
pub fn sqlite_config(dir: &Path, listen: SocketAddr, web_dir: Option<PathBuf>) -> ManagerConfig {
    ManagerConfig {
        listen,
        database_url: format!("sqlite://{}?mode=rwc", dir.join("bulwark.db").display()),
        web_dir,
        bootstrap_token: true,
        // Production timings: what the lab shows (RPO, liveness) is what operators see.
        control: ControlSettings::default(),
    }
}

/// The REST API with an admin token.
#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
    pub token: String,
}

impl Api {
    pub fn new(base: String, token: String) -> Result<Api, LabError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(Api { http, base, token })
    }

    pub async fn get(&self, path: &str) -> Result<Value, LabError> {
        Ok(self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    pub async fn post(&self, path: &str, body: Value) -> Result<Value, LabError> {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await?;
        let code = r.status();
        let text = r.text().await?;
        if !code.is_success() {
            return Err(setup(format!("POST {path} → {code}: {text}")));
        }
        serde_json::from_str(&text).map_err(|e| setup(format!("POST {path}: {e}")))
    }

    /// The `items` of a list endpoint (one page; callers ask for a large `limit`).
    pub async fn items(&self, path: &str) -> Result<Vec<Value>, LabError> {
        let v = self.get(path).await?;
        Ok(v["items"].as_array().cloned().unwrap_or_default())
    }

    /// Polls `path` every 200 ms until `check` accepts it, or fails after `within`.
    pub async fn wait(
        &self,
        what: &str,
        within: Duration,
        path: &str,
        mut check: impl FnMut(&Value) -> bool,
    ) -> Result<Value, LabError> {
        let deadline = Instant::now() + within;
        loop {
            let v = self.get(path).await?;
            if check(&v) {
                return Ok(v);
            }
            if Instant::now() > deadline {
                return Err(setup(format!("gave up waiting for {what}: {v}")));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A one-time enrolment token for agents (`bwe_…`).
    pub async fn enrolment_token(&self, description: &str) -> Result<String, LabError> {
        let enrol = self
            .post(
                "/api/v1/enrolment-tokens",
                json!({ "description": description }),
            )
            .await?;
        enrol["secret"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| setup(format!("no secret in {enrol}")))
    }

    /// Waits until the inventory holds at least `vms` VMs and every host of `hosts` is
    /// connected; returns (VMs, hosts, sites) as then listed.
    pub async fn wait_inventory(
        &self,
        vms: usize,
        hosts: &[&str],
        within: Duration,
    ) -> Result<Inventory, LabError> {
        let deadline = Instant::now() + within;
        loop {
            let inv = Inventory {
                vms: self.items("/api/v1/vms?limit=1000").await?,
                hosts: self.items("/api/v1/hosts?limit=1000").await?,
                sites: self.items("/api/v1/sites?limit=1000").await?,
            };
            let connected = hosts.iter().all(|h| {
                inv.host(h)
                    .is_some_and(|x| x["connectivity"] == "connected")
            });
            if inv.vms.len() >= vms && connected {
                return Ok(inv);
            }
            if Instant::now() > deadline {
                return Err(setup(format!(
                    "inventory incomplete after {within:?}: {} of {vms} VMs, hosts {:?}",
                    inv.vms.len(),
                    inv.hosts
                        .iter()
                        .map(|h| format!("{}={}", h["name"], h["connectivity"]))
                        .collect::<Vec<_>>()
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Creates a VPG protecting `members` (VM name, recovery host name) to the site
    /// `recovery_site`, or finds the one of that name (a demo restarted on its
    /// directory); returns its id.
    pub async fn ensure_vpg(
        &self,
        inv: &Inventory,
        name: &str,
        recovery_site: &str,
        settings: Value,
        members: &[(&str, &str)],
    ) -> Result<String, LabError> {
        let existing = self.items("/api/v1/vpgs?limit=1000").await?;
        if let Some(id) = existing
            .iter()
            .find(|v| v["name"] == name)
            .and_then(|v| v["id"].as_str())
        {
            return Ok(id.to_string());
        }
        let site = inv
            .site(recovery_site)
            .ok_or_else(|| setup(format!("no site {recovery_site}")))?;
        let members = members
            .iter()
            .map(|(vm, host)| {
                let vm = inv.vm(vm).ok_or_else(|| setup(format!("no VM {vm}")))?;
                let host = inv
                    .host(host)
                    .ok_or_else(|| setup(format!("no host {host}")))?;
                Ok(json!({"vm_id": vm["id"], "recovery_host_id": host["id"]}))
            })
            .collect::<Result<Vec<_>, LabError>>()?;
        let vpg = self
            .post(
                "/api/v1/vpgs",
                json!({
                    "name": name,
                    "recovery_site_id": site["id"],
                    "settings": settings,
                    "members": members,
                }),
            )
            .await?;
        vpg["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| setup("VPG without id"))
    }

    /// Waits until the VPG `id` reports `status` (e.g. `meeting_sla`).
    pub async fn wait_vpg(&self, id: &str, status: &str, within: Duration) -> Result<(), LabError> {
        self.wait(status, within, &format!("/api/v1/vpgs/{id}"), |v| {
            v["status"] == status
        })
        .await
        .map(|_| ())
    }
}

/// Sites, hosts and VMs as the API lists them.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    pub vms: Vec<Value>,
    pub hosts: Vec<Value>,
    pub sites: Vec<Value>,
}

impl Inventory {
    fn named<'a>(list: &'a [Value], name: &str) -> Option<&'a Value> {
        list.iter().find(|x| x["name"] == name)
    }
    pub fn vm(&self, name: &str) -> Option<&Value> {
        Self::named(&self.vms, name)
    }
    pub fn host(&self, name: &str) -> Option<&Value> {
        Self::named(&self.hosts, name)
    }
    pub fn site(&self, name: &str) -> Option<&Value> {
        Self::named(&self.sites, name)
    }
}

/// A manager serving in this process.
pub struct Manager {
    pub control: Arc<ControlPlane>,
    pub addr: SocketAddr,
    /// `ws://addr`, what agents dial.
    pub ws: String,
    pub api: Api,
    /// Whether the admin token was made by this start (a fresh database).
    pub fresh: bool,
    stop: CancellationToken,
    task: JoinHandle<Result<(), ServerError>>,
}

impl Manager {
    /// Builds (connects, migrates) and serves. On a database that already has tokens, an
    /// admin token named `name` is made for this run (expiring in a day), since the
    /// bootstrap one is only ever shown once.
    pub async fn start(config: &ManagerConfig, name: &str) -> Result<Manager, LabError> {
        let app = Application::build(config).await?;
        let addr = app.local_addr();
        let control = Arc::clone(app.control());
        let fresh = app.bootstrap_secret.is_some();
        let token = match app.bootstrap_secret.clone() {
            Some(t) => t,
            None => {
                app.store()
                    .create_token(
                        &Actor(name.to_string()),
                        TokenCreate {
                            name: format!("{name}-{}", chrono::Utc::now().timestamp()),
                            role: Role::Admin,
                            expires_in_days: Some(1),
                        },
                    )
                    .await?
                    .secret
            }
        };
        let stop = CancellationToken::new();
        let s = stop.clone();
        let task = tokio::spawn(app.run_until(async move { s.cancelled().await }));
        Ok(Manager {
            control,
            addr,
            ws: format!("ws://{addr}"),
            api: Api::new(format!("http://{addr}"), token)?,
            fresh,
            stop,
            task,
        })
    }

    /// Stops serving and waits for the server (and the control plane) to end.
    pub async fn stop(self) -> Result<(), LabError> {
        self.stop.cancel();
        self.task
            .await
            .map_err(|e| setup(format!("manager task: {e}")))??;
        Ok(())
    }
}

/// A whole lab on one machine: a manager on SQLite in `dir`, a recovery agent `rec` (site
/// dr) and one protected agent `prot-NN` (site prod) per entry of `disks`, each with that
/// one disk (shown as a VM of the disk's name) of `disk_size` bytes; returned once every
/// VM is in the inventory and every host connected.
pub struct OneDiskPerHost {
    pub manager: Manager,
    pub api: Api,
    pub recovery: LabAgent,
    pub protected: Vec<LabAgent>,
    pub inventory: Inventory,
}

impl OneDiskPerHost {
    pub async fn start(
        dir: &Path,
        name: &str,
        disks: &[String],
        disk_size: u64,
    ) -> Result<OneDiskPerHost, LabError> {
        create_dir(dir)?;
        let config = sqlite_config(dir, SocketAddr::from(([127, 0, 0, 1], 0)), None);
        let manager = Manager::start(&config, name).await?;
        let api = manager.api.clone();
        let etoken = api.enrolment_token(name).await?;
        let agent = |host: String, site: &'static str, section: String| {
            let ws = manager.ws.clone();
            let etoken = etoken.clone();
            async move {
                LabAgent::start(AgentSpec {
                    data_dir: dir.join(&host),
                    host: &host,
                    site,
                    section: &section,
                    manager: &ws,
                    enrolment_token: &etoken,
                    tls_dir: None,
                })
                .await
            }
        };
        let recovery = agent("rec".into(), "dr", "data_listen = \"127.0.0.1:0\"\n".into()).await?;
        let mut protected = Vec::new();
        for (i, disk) in disks.iter().enumerate() {
            let section = format!("[[disks]]\nname = \"{disk}\"\nid = 1\nsize = {disk_size}\n");
            protected.push(agent(format!("prot-{i:02}"), "prod", section).await?);
        }
        let inventory = api
            .wait_inventory(disks.len(), &["rec"], Duration::from_secs(60))
            .await?;
        Ok(OneDiskPerHost {
            manager,
            api,
            recovery,
            protected,
            inventory,
        })
    }
}

/// How to start one agent.
pub struct AgentSpec<'a> {
    /// Its data directory.
    pub data_dir: PathBuf,
    pub host: &'a str,
    pub site: &'a str,
    /// The `[agent]` section's other lines (VMs, disks, `data_listen`, …), TOML.
    pub section: &'a str,
    /// `ws://…` of the manager.
    pub manager: &'a str,
    pub enrolment_token: &'a str,
    /// Lab certificates (`ca.pem`, `<host>.pem`, `<host>.key`); none: plain TCP streams.
    pub tls_dir: Option<PathBuf>,
}

/// An agent running as tasks of this process, with its control client.
pub struct LabAgent {
    pub agent: Arc<Agent>,
    pub vms: Arc<HostVms>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl LabAgent {
    pub async fn start(spec: AgentSpec<'_>) -> Result<LabAgent, LabError> {
        let file: crate::agent::host::AgentSection =
            toml::from_str(spec.section).map_err(|e| setup(format!("agent section: {e}")))?;
        create_dir(&spec.data_dir)?;
        let cfg = AgentConfig::resolve(
            &file,
            AgentFlags {
                data_dir: Some(spec.data_dir.clone()),
                site: Some(spec.site.into()),
                host_name: Some(spec.host.into()),
                nbd_listen: Some("127.0.0.1:0".into()),
                insecure: spec.tls_dir.is_none(),
                tls_dir: spec.tls_dir,
                ..AgentFlags::default()
            },
        )?;
        // `hypervisor = "qemu"` in the section makes its VMs real guests.
        let choice = hypervisor::DriverChoice::resolve(&file, None, &spec.data_dir)?;
        let started = hypervisor::start_agent_with(cfg, choice).await?;
        let agent = started.agent;
        let vms = Arc::new(HostVms::new(started.driver, Arc::clone(&agent)));
        let settings = AgentControl::new(
            spec.manager,
            Some(spec.enrolment_token.to_string()),
            &spec.data_dir,
        )?;
        let client = ControlClient::new(settings, Arc::clone(&agent), Arc::clone(&vms))?;
        let stop = CancellationToken::new();
        let task = tokio::spawn(client.run(stop.clone()));
        Ok(LabAgent {
            agent,
            vms,
            stop,
            task,
        })
    }

    /// Powers off every running VM of the host (real guests outlive an agent that
    /// stops; a lab that ends takes them with it).
    pub async fn power_off_guests(&self) {
        for vm in self.vms.inventory().vms {
            if vm.power_state == crate::proto::control::PowerState::On {
                if let Err(e) = self
                    .vms
                    .set_power(&vm.name, crate::proto::control::PowerState::Off)
                    .await
                {
                    tracing::warn!(vm = %vm.name, error = %e, "cannot power off");
                }
            }
        }
    }

    /// Ends the control client, then shuts the agent down cleanly (streams drained,
    /// journals closed, dirty bitmaps marked clean).
    pub async fn stop(self) -> Result<(), LabError> {
        self.stop.cancel();
        let _ = self.task.await;
        self.agent.shutdown().await?;
        Ok(())
    }
}
