//! Printing API answers for people (aligned tables) or programs (JSON).

use super::client::Output;
use serde_json::Value;

fn columns(collection: &str) -> &'static [&'static str] {
    match collection {
        "sites" => &["id", "name", "location"],
        "hosts" => &["id", "name", "site_id", "connectivity"],
        "vms" => &["id", "name", "host_id", "power_state", "replication_state"],
        "vpgs" => &[
            "id",
            "name",
            "status",
            "sub_status",
            "vm_count",
            "rpo_actual_secs",
        ],
        "checkpoints" => &["id", "taken_at", "kind", "tag", "quiesce", "recoverable"],
        "reports" => &[
            "id",
            "vpg_name",
            "kind",
            "result",
            "checkpoint_id",
            "rto_ms",
            "started_at",
            "created_by",
        ],
        _ => &["id", "name"],
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn list(collection: &str, items: &[Value], out: Output) {
    if out == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(items).unwrap_or_default()
        );
        return;
    }
    let cols = columns(collection);
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|i| cols.iter().map(|c| cell(&i[*c])).collect())
        .collect();
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(k, c)| {
            rows.iter()
                .map(|r| r[k].chars().count())
                .max()
                .unwrap_or(0)
                .max(c.len())
        })
        .collect();
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    println!("{}", line(cols.iter().map(|c| c.to_uppercase()).collect()));
    for r in rows {
        println!("{}", line(r));
    }
}

pub fn one(v: &Value, _out: Output) {
    // A single resource reads best as indented JSON either way.
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}
