//! QMP (QEMU's machine protocol) and the guest agent protocol: one JSON object per line
//! over a unix socket, spoken blocking from the driver's threads.
//!
//! [`Monitor`] keeps one QMP connection per running VM: a reader thread hands events to
//! a callback and answers to the command waiting for them (matched by `id`), and says
//! when the connection ends (QEMU exited, or was killed). [`guest_agent`] opens the
//! guest agent's channel for one exchange.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Longest line accepted from QEMU or a guest agent (a `query-*` answer is a few KiB).
const MAX_LINE: usize = 1 << 20;

/// Why a QMP or guest agent exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the connection ended")]
    Closed,
    /// QEMU (or the guest agent) answered with an error.
    #[error("{class}: {desc}")]
    Command { class: String, desc: String },
    #[error("unexpected message: {0}")]
    Protocol(String),
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    pub name: String,
    pub data: Value,
}

type Waiters = Mutex<HashMap<u64, mpsc::SyncSender<Result<Value, QmpError>>>>;

/// One QMP connection with its reader thread.
#[derive(Debug)]
pub struct Monitor {
    writer: Mutex<UnixStream>,
    waiters: Arc<Waiters>,
    next_id: AtomicU64,
    closed: Arc<AtomicBool>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Reads one line (bounded); `Ok(None)` at end of stream.
fn read_line(r: &mut impl BufRead) -> std::io::Result<Option<Value>> {
    let mut line = Vec::new();
    loop {
        let n = std::io::Read::take(&mut *r, MAX_LINE as u64).read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(None);
        }
        if line.len() >= MAX_LINE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "line longer than 1 MiB",
            ));
        }
        if line.trim_ascii().is_empty() {
            line.clear();
            continue;
        }
        // A guest agent may answer `guest-sync-delimited` with a 0xff first: skip it.
        let text = line.strip_prefix(&[0xff]).unwrap_or(&line);
        return serde_json::from_slice(text)
            .map(Some)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e));
    }
}

fn command_error(v: &Value) -> Option<QmpError> {
    let e = v.get("error")?;
    Some(QmpError::Command {
        class: e
            .get("class")
            .and_then(Value::as_str)
            .unwrap_or("GenericError")
            .to_string(),
        desc: e
            .get("desc")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
    })
}

impl Monitor {
    /// Connects to the QMP socket at `path`, negotiates capabilities within `timeout`,
    /// then reads on a thread: every event goes to `on_event`; `on_close` runs once when
    /// the connection ends.
    pub fn connect(
        path: &Path,
        timeout: Duration,
        on_event: impl Fn(QmpEvent) + Send + 'static,
        on_close: impl FnOnce() + Send + 'static,
    ) -> Result<Arc<Monitor>, QmpError> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let greeting = read_line(&mut reader)?.ok_or(QmpError::Closed)?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(greeting.to_string()));
        }
        let mut w = stream.try_clone()?;
        w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")?;
        loop {
            let v = read_line(&mut reader)?.ok_or(QmpError::Closed)?;
            if let Some(e) = command_error(&v) {
                return Err(e);
            }
            if v.get("return").is_some() {
                break;
            }
        }
        // From here the reader thread waits as long as QEMU lives.
        stream.set_read_timeout(None)?;
        let waiters: Arc<Waiters> = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        let monitor = Arc::new(Monitor {
            writer: Mutex::new(w),
            waiters: Arc::clone(&waiters),
            next_id: AtomicU64::new(1),
            closed: Arc::clone(&closed),
        });
        std::thread::Builder::new()
            .name("qmp".into())
            .spawn(move || {
                loop {
                    match read_line(&mut reader) {
                        Ok(Some(v)) => {
                            if let Some(name) = v.get("event").and_then(Value::as_str) {
                                on_event(QmpEvent {
                                    name: name.to_string(),
                                    data: v.get("data").cloned().unwrap_or(Value::Null),
                                });
                                continue;
                            }
                            let Some(id) = v.get("id").and_then(Value::as_u64) else {
                                continue;
                            };
                            if let Some(tx) = lock(&waiters).remove(&id) {
                                let r = match command_error(&v) {
                                    Some(e) => Err(e),
                                    None => Ok(v.get("return").cloned().unwrap_or(Value::Null)),
                                };
                                let _ = tx.send(r);
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!(error = %e, "QMP connection ended");
                            break;
                        }
                    }
                }
                closed.store(true, Ordering::SeqCst);
                // Waiters see the end at once instead of waiting for their timeout.
                lock(&waiters).clear();
                on_close();
            })?;
        Ok(monitor)
    }

    /// Whether the connection ended.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Runs `command` and waits up to `timeout` for its answer.
    pub fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        if self.is_closed() {
            return Err(QmpError::Closed);
        }
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = mpsc::sync_channel(1);
        lock(&self.waiters).insert(id, tx);
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        if let Err(e) = lock(&self.writer).write_all(line.as_bytes()) {
            lock(&self.waiters).remove(&id);
            return Err(e.into());
        }
        match rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                lock(&self.waiters).remove(&id);
                Err(QmpError::Timeout(timeout))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(QmpError::Closed),
        }
    }
}

/// One exchange with the guest agent on its channel at `path`: a `guest-sync` first (it
/// discards whatever a previous, timed-out exchange left in the channel), then
/// `command`. The whole exchange is bounded by `timeout`.
pub fn guest_agent(
    path: &Path,
    command: &str,
    arguments: Option<Value>,
    timeout: Duration,
) -> Result<Value, QmpError> {
    let deadline = Instant::now() + timeout;
    let remaining = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(QmpError::Timeout(timeout))
    };
    let stream = UnixStream::connect(path)?;
    stream.set_write_timeout(Some(remaining()?))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut w = stream.try_clone()?;
    let token = u64::from(std::process::id()) << 20 ^ (crate::agent::stream::now_ms() as u64);
    let token = token & ((1 << 52) - 1); // exact in the guest agent's JSON numbers
    w.write_all(
        format!(
            "{}\n",
            json!({"execute": "guest-sync", "arguments": {"id": token}})
        )
        .as_bytes(),
    )?;
    let read = |reader: &mut BufReader<UnixStream>| -> Result<Value, QmpError> {
        stream.set_read_timeout(Some(remaining()?))?;
        match read_line(reader) {
            Ok(Some(v)) => Ok(v),
            Ok(None) => Err(QmpError::Closed),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err(QmpError::Timeout(timeout))
            }
            Err(e) => Err(e.into()),
        }
    };
    loop {
        let v = read(&mut reader)?;
        if v.get("return").and_then(Value::as_u64) == Some(token) {
            break;
        }
    }
    let mut msg = json!({ "execute": command });
    if let Some(a) = arguments {
        msg["arguments"] = a;
    }
    w.write_all(format!("{msg}\n").as_bytes())?;
    let v = read(&mut reader)?;
    match command_error(&v) {
        Some(e) => Err(e),
        None => Ok(v.get("return").cloned().unwrap_or(Value::Null)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake QEMU monitor: greets, accepts capabilities, answers `query-status`, sends
    /// an event, then hangs up on `quit`.
    fn fake_qemu(path: &Path) -> std::thread::JoinHandle<()> {
        let l = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .unwrap();
            while let Ok(Some(v)) = read_line(&mut r) {
                let id = v.get("id").cloned().unwrap_or(Value::Null);
                match v["execute"].as_str().unwrap_or("") {
                    "qmp_capabilities" => w.write_all(b"{\"return\": {}}\n").unwrap(),
                    "query-status" => {
                        w.write_all(b"{\"event\": \"RESUME\", \"data\": {}}\n")
                            .unwrap();
                        let a = json!({"return": {"status": "running", "running": true}, "id": id});
                        w.write_all(format!("{a}\n").as_bytes()).unwrap();
                    }
                    "bogus" => {
                        let a = json!({"error": {"class": "CommandNotFound", "desc": "nope"}, "id": id});
                        w.write_all(format!("{a}\n").as_bytes()).unwrap();
                    }
                    "slow" => {}
                    "quit" => {
                        let a = json!({"return": {}, "id": id});
                        w.write_all(format!("{a}\n").as_bytes()).unwrap();
                        return;
                    }
                    _ => {}
                }
            }
        })
    }

    #[test]
    fn commands_events_errors_timeouts_and_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let qemu = fake_qemu(&path);
        let events = Arc::new(Mutex::new(Vec::new()));
        let (closed_tx, closed_rx) = mpsc::channel();
        let ev = Arc::clone(&events);
        let m = Monitor::connect(
            &path,
            Duration::from_secs(5),
            move |e| lock(&ev).push(e.name),
            move || closed_tx.send(()).unwrap(),
        )
        .unwrap();
        let st = m
            .execute("query-status", None, Duration::from_secs(5))
            .unwrap();
        assert_eq!(st["status"], "running");
        assert_eq!(*lock(&events), vec!["RESUME".to_string()]);
        match m.execute("bogus", None, Duration::from_secs(5)) {
            Err(QmpError::Command { class, .. }) => assert_eq!(class, "CommandNotFound"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            m.execute("slow", None, Duration::from_millis(100)),
            Err(QmpError::Timeout(_))
        ));
        m.execute("quit", None, Duration::from_secs(5)).unwrap();
        closed_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(m.is_closed());
        assert!(matches!(
            m.execute("query-status", None, Duration::from_secs(1)),
            Err(QmpError::Closed)
        ));
        qemu.join().unwrap();
    }

    #[test]
    fn a_silent_guest_agent_times_out_within_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        // QEMU's end of the channel accepts even when no agent runs in the guest.
        let l = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            std::thread::sleep(Duration::from_millis(800));
            drop(s);
        });
        let started = Instant::now();
        let r = guest_agent(
            &path,
            "guest-fsfreeze-freeze",
            None,
            Duration::from_millis(300),
        );
        assert!(matches!(r, Err(QmpError::Timeout(_))), "{r:?}");
        assert!(started.elapsed() < Duration::from_millis(700));
        t.join().unwrap();
    }

    #[test]
    fn a_guest_agent_answers_after_the_sync() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        let l = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            // A stale answer of an earlier exchange comes first.
            w.write_all(b"{\"return\": 3}\n").unwrap();
            while let Ok(Some(v)) = read_line(&mut r) {
                match v["execute"].as_str().unwrap_or("") {
                    "guest-sync" => {
                        let a = json!({"return": v["arguments"]["id"]});
                        w.write_all(format!("{a}\n").as_bytes()).unwrap();
                    }
                    "guest-fsfreeze-freeze" => w.write_all(b"{\"return\": 2}\n").unwrap(),
                    _ => return,
                }
            }
        });
        let n = guest_agent(&path, "guest-fsfreeze-freeze", None, Duration::from_secs(5)).unwrap();
        assert_eq!(n, 2);
        t.join().unwrap();
    }
}
