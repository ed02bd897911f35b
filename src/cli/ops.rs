//! `bulwark vpg failover|move|commit|rollback|stop-test|pause|resume|force-sync|
//! checkpoints|reports`: the recovery operations over the REST API, with a progress
//! line on standard error while the operation's task runs (`--no-wait` returns at once)
//! and the task or report as JSON with `--output json`.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use clap::Args;
use reqwest::Method;
use serde_json::{json, Value};

use super::client::{encode, Client, Output};
use super::output;

#[derive(Args, Debug)]
pub struct NameArgs {
    /// The VPG, by name or id.
    name: String,
}

#[derive(Args, Debug)]
pub struct FailoverArgs {
    name: String,
    /// A failover test: "<vm> - Test" VMs on the test network; protection goes on.
    #[arg(long)]
    test: bool,
    /// `latest` (default), `latest_tagged`, `latest_app_consistent`, `tag:NAME` or an id.
    #[arg(long)]
    checkpoint: Option<String>,
    /// Commit by itself after this long (e.g. `10m`, `90s`, `1h`).
    #[arg(long, value_name = "DURATION", conflicts_with = "rollback_after")]
    commit_after: Option<String>,
    /// Roll back by itself after this long.
    #[arg(long, value_name = "DURATION")]
    rollback_after: Option<String>,
    /// Reverse protection when committed by --commit-after.
    #[arg(long)]
    reverse: bool,
    /// Leave the protected VMs running (no shutdown at the protected site).
    #[arg(long)]
    no_shutdown: bool,
    /// Test only: stop it by itself after this long (default 8h).
    #[arg(long, value_name = "DURATION")]
    max_duration: Option<String>,
    #[arg(long)]
    notes: Option<String>,
    /// Return once the operation is accepted instead of following it.
    #[arg(long)]
    no_wait: bool,
}

#[derive(Args, Debug)]
pub struct MoveArgs {
    name: String,
    #[arg(long, value_name = "DURATION", conflicts_with = "rollback_after")]
    commit_after: Option<String>,
    #[arg(long, value_name = "DURATION")]
    rollback_after: Option<String>,
    /// No reverse protection at commit (it is on by default for a move).
    #[arg(long)]
    no_reverse: bool,
    #[arg(long)]
    notes: Option<String>,
    #[arg(long)]
    no_wait: bool,
}

#[derive(Args, Debug)]
pub struct CommitArgs {
    name: String,
    /// Reverse protection (default: on for a move, off for a failover).
    #[arg(long, conflicts_with = "no_reverse")]
    reverse: bool,
    #[arg(long)]
    no_reverse: bool,
    #[arg(long)]
    no_wait: bool,
}

#[derive(Args, Debug)]
pub struct StopTestArgs {
    name: String,
    /// `passed` (default) or `failed`.
    #[arg(long, default_value = "passed")]
    result: String,
    #[arg(long)]
    notes: Option<String>,
    #[arg(long)]
    no_wait: bool,
}

#[derive(Args, Debug)]
pub struct CheckpointsArgs {
    name: String,
    /// Also the checkpoints that are not recoverable.
    #[arg(long)]
    all: bool,
}

#[derive(Args, Debug)]
pub struct ReportsArgs {
    /// The VPG (all VPGs when absent).
    name: Option<String>,
}

/// `90`, `90s`, `10m`, `1h`.
pub fn parse_duration(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mul) = match s.chars().last() {
        Some('s') => (&s[..s.len() - 1], 1),
        Some('m') => (&s[..s.len() - 1], 60),
        Some('h') => (&s[..s.len() - 1], 3600),
        Some(c) if c.is_ascii_digit() => (s, 1),
        _ => bail!("`{s}` is not a duration (e.g. 90s, 10m, 1h)"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow!("`{s}` is not a duration (e.g. 90s, 10m, 1h)"))?;
    Ok(n.saturating_mul(mul))
}

fn policy(commit_after: &Option<String>, rollback_after: &Option<String>) -> Result<Value> {
    Ok(match (commit_after, rollback_after) {
        (Some(c), _) => json!({"commit_policy": "commit", "commit_after_secs": parse_duration(c)?}),
        (None, Some(r)) => {
            json!({"commit_policy": "rollback", "commit_after_secs": parse_duration(r)?})
        }
        (None, None) => json!({}),
    })
}

fn merge(a: &mut Value, b: Value) {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
}

/// Follows a task until it waits for the operator or ends, drawing a progress line.
async fn follow(c: &Client, task: Value, out: Output) -> Result<ExitCode> {
    let id = task["id"]
        .as_str()
        .ok_or_else(|| anyhow!("the answer has no task id"))?
        .to_string();
    let started = Instant::now();
    let mut last = task;
    let mut err = std::io::stderr();
    loop {
        let state = last["state"].as_str().unwrap_or("?").to_string();
        let pct = last["progress"].as_f64().unwrap_or(0.0).clamp(0.0, 100.0);
        let step = last["steps"]
            .as_array()
            .and_then(|s| s.get(last["current_step"].as_u64().unwrap_or(0) as usize))
            .and_then(|s| s["name"].as_str())
            .unwrap_or("");
        let filled = (pct / 5.0).round() as usize;
        let _ = write!(
            err,
            "\r[{}{}] {:>3.0}% {:<20} {:<8} {:>4}s",
            "#".repeat(filled),
            " ".repeat(20 - filled.min(20)),
            pct,
            step,
            state,
            started.elapsed().as_secs()
        );
        let _ = err.flush();
        if matches!(
            state.as_str(),
            "waiting" | "succeeded" | "failed" | "cancelled"
        ) {
            let _ = writeln!(err);
            if out == Output::Json {
                output::one(&last, out);
            } else {
                for s in last["steps"].as_array().cloned().unwrap_or_default() {
                    eprintln!(
                        "  {:<20} {:<9} {}",
                        s["name"].as_str().unwrap_or(""),
                        s["state"].as_str().unwrap_or(""),
                        s["message"].as_str().unwrap_or("")
                    );
                }
                match state.as_str() {
                    "waiting" => eprintln!("operation {id} is up: commit, roll back or stop it"),
                    "succeeded" => eprintln!("operation {id} ended"),
                    _ => eprintln!(
                        "operation {id} {state}: {}",
                        last["error"].as_str().unwrap_or("")
                    ),
                }
            }
            return Ok(if state == "failed" {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (_, t) = c
            .call(Method::GET, &format!("/api/v1/tasks/{id}"), None)
            .await?;
        last = t;
    }
}

async fn post(c: &Client, collection: &str, name: &str, verb: &str, body: Value) -> Result<Value> {
    if collection != "vpgs" {
        bail!("`{verb}` is a VPG operation: `bulwark vpg {verb} NAME`");
    }
    let id = c.resolve(collection, name).await?;
    let (_, v) = c
        .call(
            Method::POST,
            &format!("/api/v1/vpgs/{id}/{verb}"),
            Some(body),
        )
        .await?;
    Ok(v)
}

async fn done(c: &Client, task: Value, no_wait: bool, out: Output) -> Result<ExitCode> {
    if no_wait {
        output::one(&task, out);
        return Ok(ExitCode::SUCCESS);
    }
    follow(c, task, out).await
}

pub async fn failover(c: &Client, col: &str, a: FailoverArgs, out: Output) -> Result<ExitCode> {
    let task = if a.test {
        let mut body = json!({"checkpoint": a.checkpoint, "notes": a.notes});
        if let Some(d) = &a.max_duration {
            merge(&mut body, json!({"max_duration_secs": parse_duration(d)?}));
        }
        post(c, col, &a.name, "failover-test", body).await?
    } else {
        let mut body = json!({
            "checkpoint": a.checkpoint,
            "notes": a.notes,
            "shut_down_protected": !a.no_shutdown,
            "reverse_protection": a.reverse,
        });
        merge(&mut body, policy(&a.commit_after, &a.rollback_after)?);
        post(c, col, &a.name, "failover", body).await?
    };
    done(c, task, a.no_wait, out).await
}

pub async fn move_vpg(c: &Client, col: &str, a: MoveArgs, out: Output) -> Result<ExitCode> {
    let mut body = json!({"notes": a.notes, "reverse_protection": !a.no_reverse});
    merge(&mut body, policy(&a.commit_after, &a.rollback_after)?);
    let task = post(c, col, &a.name, "move", body).await?;
    done(c, task, a.no_wait, out).await
}

pub async fn commit(c: &Client, col: &str, a: CommitArgs, out: Output) -> Result<ExitCode> {
    let body = match (a.reverse, a.no_reverse) {
        (true, _) => json!({"reverse_protection": true}),
        (_, true) => json!({"reverse_protection": false}),
        _ => json!({}),
    };
    let task = post(c, col, &a.name, "commit", body).await?;
    done(c, task, a.no_wait, out).await
}

pub async fn rollback(c: &Client, col: &str, a: NameArgs, out: Output) -> Result<ExitCode> {
    let task = post(c, col, &a.name, "rollback", json!({})).await?;
    follow(c, task, out).await
}

pub async fn stop_test(c: &Client, col: &str, a: StopTestArgs, out: Output) -> Result<ExitCode> {
    let body = json!({"result": a.result, "notes": a.notes});
    let task = post(c, col, &a.name, "failover-test/stop", body).await?;
    done(c, task, a.no_wait, out).await
}

pub async fn simple(
    c: &Client,
    col: &str,
    a: NameArgs,
    verb: &str,
    out: Output,
) -> Result<ExitCode> {
    let v = post(c, col, &a.name, verb, json!({})).await?;
    match out {
        Output::Json => output::one(&v, out),
        Output::Table => eprintln!(
            "VPG {}: {} ({})",
            v["name"].as_str().unwrap_or(&a.name),
            v["status"].as_str().unwrap_or("?"),
            v["sub_status"].as_str().unwrap_or("")
        ),
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn checkpoints(
    c: &Client,
    col: &str,
    a: CheckpointsArgs,
    out: Output,
) -> Result<ExitCode> {
    if col != "vpgs" {
        bail!("checkpoints belong to VPGs: `bulwark vpg checkpoints NAME`");
    }
    let id = c.resolve(col, &a.name).await?;
    let q = if a.all { "" } else { "&recoverable=true" };
    let (_, page) = c
        .call(
            Method::GET,
            &format!("/api/v1/vpgs/{id}/checkpoints?limit=1000{q}"),
            None,
        )
        .await?;
    let items = page["items"].as_array().cloned().unwrap_or_default();
    output::list("checkpoints", &items, out);
    Ok(ExitCode::SUCCESS)
}

pub async fn reports(c: &Client, col: &str, a: ReportsArgs, out: Output) -> Result<ExitCode> {
    let q = match &a.name {
        Some(n) => format!("?vpg={}", encode(&c.resolve(col, n).await?)),
        None => String::new(),
    };
    let (_, v) = c
        .call(Method::GET, &format!("/api/v1/reports{q}"), None)
        .await?;
    let items = v["items"].as_array().cloned().unwrap_or_default();
    output::list("reports", &items, out);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), 90);
        assert_eq!(parse_duration("90s").unwrap(), 90);
        assert_eq!(parse_duration("10m").unwrap(), 600);
        assert_eq!(parse_duration("2h").unwrap(), 7200);
        assert!(parse_duration("10d").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("").is_err());
    }
}
