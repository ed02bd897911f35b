//! A small client of the REST API: list, get, create, update and delete of sites,
//! hosts, VMs and VPGs, by id or by name, as a table or as JSON; a VM's console.

use super::output;
use crate::proto::api::Problem;
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct ResourceArgs {
    /// Manager URL.
    #[arg(
        long,
        env = "BULWARK_URL",
        default_value = "http://127.0.0.1:8470",
        global = true
    )]
    url: String,
    /// API token (`bwk_…`).
    #[arg(long, env = "BULWARK_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    #[arg(long, short, value_enum, default_value = "table", global = true)]
    output: Output,
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
enum Action {
    /// List, with optional filters such as `--filter status=meeting_sla`.
    List {
        #[arg(long = "filter", value_name = "KEY=VALUE")]
        filters: Vec<String>,
    },
    /// Show one, by id or name.
    Get { name: String },
    /// Create from a JSON document (a file, or `-` for standard input).
    Create {
        #[arg(long, short)]
        file: PathBuf,
    },
    /// Change one with a JSON merge document (a file, or `-`).
    Update {
        name: String,
        #[arg(long, short)]
        file: PathBuf,
    },
    /// Delete one, by id or name.
    Delete { name: String },
    /// VPGs only: fail over (or, with --test, start a failover test).
    Failover(super::ops::FailoverArgs),
    /// VPGs only: planned move (RPO 0) to the recovery site.
    Move(super::ops::MoveArgs),
    /// VPGs only: commit the running failover or move.
    Commit(super::ops::CommitArgs),
    /// VPGs only: roll the running failover or move back.
    Rollback(super::ops::NameArgs),
    /// VPGs only: stop the running failover test.
    #[command(name = "stop-test")]
    StopTest(super::ops::StopTestArgs),
    /// VPGs only: pause protection (writes tracked in the bitmap).
    Pause(super::ops::NameArgs),
    /// VPGs only: resume paused protection.
    Resume(super::ops::NameArgs),
    /// VPGs only: Force Sync (a Delta Sync of every disk).
    #[command(name = "force-sync")]
    ForceSync(super::ops::NameArgs),
    /// VPGs only: the VPG's checkpoints (recoverable ones by default).
    Checkpoints(super::ops::CheckpointsArgs),
    /// VPGs only: recovery reports (of one VPG, or all).
    Reports(super::ops::ReportsArgs),
    /// VMs only: the end of the VM's serial console, read from its host now.
    Console {
        name: String,
        /// At most this many bytes of the end of the log (1 to 65536).
        #[arg(long, value_name = "BYTES")]
        max_bytes: Option<u64>,
    },
    /// Hosts only: tokens an agent exchanges for its host key on first contact.
    #[command(name = "enrolment-token")]
    EnrolmentToken {
        #[command(subcommand)]
        action: EnrolmentTokenAction,
    },
}

#[derive(Subcommand, Debug)]
enum EnrolmentTokenAction {
    /// Create one; its secret is printed once (give it to `bulwark agent`).
    Create {
        /// Seconds until it stops working (60 to 2592000).
        #[arg(long = "expires-in", value_name = "SECS", default_value_t = crate::manager::store::DEFAULT_ENROLMENT_SECS)]
        expires_in: u64,
        /// How many hosts may enrol with it (unlimited when absent).
        #[arg(long)]
        max_uses: Option<u32>,
        #[arg(long)]
        description: Option<String>,
    },
}

pub(super) struct Client {
    pub(super) http: reqwest::Client,
    pub(super) base: String,
    pub(super) token: String,
}

impl Client {
    pub(super) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value)> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req
            .send()
            .await
            .with_context(|| format!("calling {}", self.base))?;
        let status = res.status();
        let text = res.text().await.context("reading the response")?;
        if !status.is_success() {
            if let Ok(p) = serde_json::from_str::<Problem>(&text) {
                let field = p.field.map(|f| format!(" [{f}]")).unwrap_or_default();
                bail!("{} {}: {}{field} ({})", p.status, p.title, p.detail, p.code);
            }
            bail!("{status}: {text}");
        }
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)?
        };
        Ok((status, v))
    }

    /// Finds the id of `name_or_id` in `collection`.
    pub(super) async fn resolve(&self, collection: &str, name_or_id: &str) -> Result<String> {
        let by_id = self
            .http
            .get(format!("{}/api/v1/{collection}/{name_or_id}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await?;
        if by_id.status().is_success() {
            return Ok(name_or_id.to_string());
        }
        let (_, page) = self
            .call(
                Method::GET,
                &format!("/api/v1/{collection}?name={}", encode(name_or_id)),
                None,
            )
            .await?;
        let items = page["items"].as_array().cloned().unwrap_or_default();
        match items.as_slice() {
            [one] => one["id"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("no id in answer")),
            [] => bail!(
                "no {} named or with id `{name_or_id}`",
                singular(collection)
            ),
            _ => bail!("several {collection} are named `{name_or_id}`; use an id"),
        }
    }
}

/// The console text as it is (with a note on stderr when older output was left out), or
/// the whole answer as JSON.
fn print_console(v: &Value, out: Output) -> Result<()> {
    if out == Output::Json {
        output::one(v, out);
        return Ok(());
    }
    let text = v["text"]
        .as_str()
        .ok_or_else(|| anyhow!("no console text in the answer"))?;
    print!("{text}");
    if !text.is_empty() && !text.ends_with('\n') {
        println!();
    }
    if v["truncated"].as_bool() == Some(true) {
        eprintln!(
            "(older output left out: the log holds {} bytes; --max-bytes shows up to 65536)",
            v["total_bytes"]
        );
    }
    Ok(())
}

fn singular(collection: &str) -> &str {
    collection.strip_suffix('s').unwrap_or(collection)
}

pub(super) fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn read_doc(file: &PathBuf) -> Result<Value> {
    let mut text = String::new();
    if file.as_os_str() == "-" {
        std::io::stdin().read_to_string(&mut text)?;
    } else {
        text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    }
    serde_json::from_str(&text).context("the document is not JSON")
}

pub async fn run(collection: &str, a: ResourceArgs) -> Result<ExitCode> {
    let token = a.token.ok_or_else(|| {
        anyhow!("no API token: pass --token or set BULWARK_TOKEN (see `bulwark token create`)")
    })?;
    let client = Client {
        http: reqwest::Client::new(),
        base: a.url.trim_end_matches('/').to_string(),
        token,
    };
    match a.action {
        Action::List { filters } => {
            let mut items = Vec::new();
            let mut query: Vec<String> = Vec::new();
            for f in &filters {
                let (k, v) = f
                    .split_once('=')
                    .ok_or_else(|| anyhow!("filter `{f}` is not KEY=VALUE"))?;
                query.push(format!("{}={}", encode(k), encode(v)));
            }
            let mut cursor: Option<String> = None;
            loop {
                let mut q = query.clone();
                q.push("limit=1000".into());
                if let Some(c) = &cursor {
                    q.push(format!("cursor={}", encode(c)));
                }
                let (_, page) = client
                    .call(
                        Method::GET,
                        &format!("/api/v1/{collection}?{}", q.join("&")),
                        None,
                    )
                    .await?;
                items.extend(page["items"].as_array().cloned().unwrap_or_default());
                match page["next_cursor"].as_str() {
                    Some(c) => cursor = Some(c.to_string()),
                    None => break,
                }
            }
            output::list(collection, &items, a.output);
        }
        Action::Get { name } => {
            let id = client.resolve(collection, &name).await?;
            let (_, v) = client
                .call(Method::GET, &format!("/api/v1/{collection}/{id}"), None)
                .await?;
            output::one(&v, a.output);
        }
        Action::Create { file } => {
            let (_, v) = client
                .call(
                    Method::POST,
                    &format!("/api/v1/{collection}"),
                    Some(read_doc(&file)?),
                )
                .await?;
            output::one(&v, a.output);
        }
        Action::Update { name, file } => {
            let id = client.resolve(collection, &name).await?;
            let (_, v) = client
                .call(
                    Method::PATCH,
                    &format!("/api/v1/{collection}/{id}"),
                    Some(read_doc(&file)?),
                )
                .await?;
            output::one(&v, a.output);
        }
        Action::Delete { name } => {
            let id = client.resolve(collection, &name).await?;
            client
                .call(Method::DELETE, &format!("/api/v1/{collection}/{id}"), None)
                .await?;
            eprintln!("deleted {} {id}", singular(collection));
        }
        Action::Failover(x) => return super::ops::failover(&client, collection, x, a.output).await,
        Action::Move(x) => return super::ops::move_vpg(&client, collection, x, a.output).await,
        Action::Commit(x) => return super::ops::commit(&client, collection, x, a.output).await,
        Action::Rollback(x) => return super::ops::rollback(&client, collection, x, a.output).await,
        Action::StopTest(x) => {
            return super::ops::stop_test(&client, collection, x, a.output).await
        }
        Action::Pause(x) => {
            return super::ops::simple(&client, collection, x, "pause", a.output).await
        }
        Action::Resume(x) => {
            return super::ops::simple(&client, collection, x, "resume", a.output).await
        }
        Action::ForceSync(x) => {
            return super::ops::simple(&client, collection, x, "force-sync", a.output).await
        }
        Action::Checkpoints(x) => {
            return super::ops::checkpoints(&client, collection, x, a.output).await
        }
        Action::Reports(x) => return super::ops::reports(&client, collection, x, a.output).await,
        Action::Console { name, max_bytes } => {
            if collection != "vms" {
                bail!("a console belongs to a VM: `bulwark vm console NAME`");
            }
            let id = client.resolve(collection, &name).await?;
            let q = max_bytes.map_or_else(String::new, |n| format!("?max_bytes={n}"));
            let (_, v) = client
                .call(Method::GET, &format!("/api/v1/vms/{id}/console{q}"), None)
                .await?;
            print_console(&v, a.output)?;
        }
        Action::EnrolmentToken {
            action:
                EnrolmentTokenAction::Create {
                    expires_in,
                    max_uses,
                    description,
                },
        } => {
            if collection != "hosts" {
                bail!("enrolment tokens belong to hosts: `bulwark host enrolment-token create`");
            }
            let body = serde_json::to_value(crate::proto::api::EnrolmentTokenCreate {
                description,
                expires_in_secs: Some(expires_in),
                max_uses,
            })?;
            let (_, v) = client
                .call(Method::POST, "/api/v1/enrolment-tokens", Some(body))
                .await?;
            match a.output {
                Output::Json => output::one(&v, a.output),
                Output::Table => {
                    // The secret alone on stdout, so scripts can capture it.
                    let secret = v["secret"]
                        .as_str()
                        .ok_or_else(|| anyhow!("no secret in the answer"))?;
                    println!("{secret}");
                    eprintln!(
                        "enrolment token {} valid until {} (shown once)",
                        v["token"]["id"].as_str().unwrap_or("?"),
                        v["token"]["expires_at"].as_str().unwrap_or("?")
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
