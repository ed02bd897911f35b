//! The real `bulwark` binary: offline token and migration commands, the manager as a
//! process (first-run token, graceful SIGTERM), and the REST client commands.

#![allow(clippy::unwrap_used, clippy::zombie_processes)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_bulwark");

fn bulwark(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("BULWARK_TOKEN")
        .env("BULWARK_CONFIG", "/nonexistent/bulwark.toml")
        .output()
        .unwrap()
}

struct Manager {
    child: Child,
    url: String,
    bootstrap: Option<String>,
}

impl Drop for Manager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `bulwark manager` on a free port and waits for it to say where it listens.
fn start_manager(db: &str) -> Manager {
    let mut child = Command::new(BIN)
        .args([
            "manager",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            db,
            "--log-format",
            "json",
        ])
        .env("BULWARK_CONFIG", "/nonexistent/bulwark.toml")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut bootstrap = None;
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("manager starts within 30 s");
        if let Some(t) = line.trim().strip_prefix("bwk_") {
            bootstrap = Some(format!("bwk_{t}"));
        }
        if let Some(rest) = line.strip_prefix("Bulwark manager on ") {
            let url = rest.trim_end_matches('/').to_string();
            std::thread::spawn(move || while rx.recv().is_ok() {});
            return Manager {
                child,
                url,
                bootstrap,
            };
        }
    }
}

fn client(m: &Manager, token: &str, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .args(["--url", &m.url])
        .env("BULWARK_TOKEN", token)
        .env("BULWARK_CONFIG", "/nonexistent/bulwark.toml")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn offline_commands_and_manager_process() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}?mode=rwc", dir.path().join("b.db").display());

    let out = bulwark(&["migrate", "--database-url", &db, "status"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("pending"));
    let out = bulwark(&["migrate", "--database-url", &db, "up"]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("applied"));
    // One step back reverts the newest migration only; `--all` reverts everything.
    let out = bulwark(&["migrate", "--database-url", &db, "down"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.starts_with("applied")
            && text
                .trim_end()
                .lines()
                .last()
                .unwrap()
                .starts_with("pending"),
        "{text}"
    );
    let out = bulwark(&["migrate", "--database-url", &db, "down", "--all"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.lines().all(|l| l.starts_with("pending")), "{text}");

    // A token made offline means the manager does not bootstrap one.
    let out = bulwark(&[
        "token",
        "--database-url",
        &db,
        "create",
        "--name",
        "ops",
        "--role",
        "admin",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(token.starts_with("bwk_"));
    let out = bulwark(&["token", "--database-url", &db, "create", "--role", "root"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a role"));

    let m = start_manager(&db);
    assert!(
        m.bootstrap.is_none(),
        "tokens exist, so none is bootstrapped"
    );

    let (ok, out, err) = client(
        &m,
        &token,
        &["site", "create", "-f", "-"],
        Some(r#"{"name": "prod"}"#),
    );
    assert!(ok, "{err}");
    assert!(out.contains("\"name\": \"prod\""));
    let (ok, _, err) = client(
        &m,
        &token,
        &["site", "create", "-f", "-"],
        Some(r#"{"name": "prod"}"#),
    );
    assert!(!ok);
    assert!(err.contains("site.name_taken"), "{err}");
    let (ok, out, _) = client(&m, &token, &["site", "list"], None);
    assert!(ok);
    assert!(out.lines().next().unwrap().starts_with("ID"));
    assert!(out.contains("prod"));
    let (ok, out, _) = client(&m, &token, &["site", "list", "-o", "json"], None);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["name"], "prod");
    let (ok, out, _) = client(&m, &token, &["site", "get", "prod"], None);
    assert!(ok && out.contains("\"id\""));
    let (ok, _, err) = client(&m, "bwk_wrong", &["site", "list"], None);
    assert!(!ok && err.contains("auth.invalid_token"), "{err}");
    let (ok, _, err) = client(&m, &token, &["site", "delete", "prod"], None);
    assert!(ok, "{err}");
    // An enrolment token for an agent: the secret alone on stdout.
    let (ok, out, err) = client(
        &m,
        &token,
        &["host", "enrolment-token", "create", "--expires-in", "600"],
        None,
    );
    assert!(ok, "{err}");
    assert!(
        out.trim().starts_with("bwe_") && out.trim().len() == 68,
        "{out}"
    );
    assert!(err.contains("shown once"), "{err}");
    let (ok, _, err) = client(
        &m,
        &token,
        &["host", "enrolment-token", "create", "--expires-in", "5"],
        None,
    );
    assert!(
        !ok && err.contains("enrolment_token.expiry_out_of_range"),
        "{err}"
    );

    // A VM's console is read through its host's agent: a host without one has none.
    let create = |what: &str, doc: String| {
        let (ok, out, err) = client(&m, &token, &[what, "create", "-f", "-"], Some(&doc));
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["id"].as_str().unwrap().to_string()
    };
    let site = create("site", r#"{"name": "lab"}"#.into());
    let host = create(
        "host",
        format!(r#"{{"name": "esx-lab", "site_id": "{site}"}}"#),
    );
    create("vm", format!(r#"{{"name": "web", "host_id": "{host}"}}"#));
    let (ok, _, err) = client(&m, &token, &["vm", "console", "web"], None);
    assert!(!ok && err.contains("host.unreachable"), "{err}");
    let (ok, _, err) = client(
        &m,
        &token,
        &["vm", "console", "web", "--max-bytes", "70000"],
        None,
    );
    assert!(!ok && err.contains("request.invalid_max_bytes"), "{err}");
    let (ok, _, err) = client(&m, &token, &["site", "console", "lab"], None);
    assert!(!ok && err.contains("belongs to a VM"), "{err}");

    // SIGTERM stops the manager cleanly.
    let mut m = m;
    let child = &mut m.child;
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            assert!(s.success(), "graceful shutdown exits 0, got {s}");
            break;
        }
        assert!(Instant::now() < deadline, "manager did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn first_start_bootstraps_an_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}?mode=rwc", dir.path().join("b.db").display());
    let m = start_manager(&db);
    let token = m
        .bootstrap
        .clone()
        .expect("the first start prints an admin token");
    let (ok, out, err) = client(&m, &token, &["vpg", "list"], None);
    assert!(ok, "{err}");
    assert!(out.starts_with("ID"));
    drop(m);
    // A restart on the same database does not mint another one.
    let m = start_manager(&db);
    assert!(m.bootstrap.is_none());
}
