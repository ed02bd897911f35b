//! Keyset pagination: complete, without duplicates, stable under inserts.

use crate::both;
use crate::helpers::*;
use reqwest::StatusCode;
use serde_json::json;
use std::collections::BTreeSet;

both!(pages_cover_everything_once, |app: TestApp| async move {
    let mut created = BTreeSet::new();
    for i in 0..25 {
        created.insert(
            app.create("/api/v1/sites", json!({"name": format!("site-{i:02}")}))
                .await,
        );
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/sites?limit=10&cursor={c}"),
            None => "/api/v1/sites?limit=10".into(),
        };
        let (s, v) = app.get(&path).await;
        assert_eq!(s, StatusCode::OK);
        pages += 1;
        let items = v["items"].as_array().unwrap();
        assert!(items.len() <= 10);
        seen.extend(items.iter().map(|i| i["id"].as_str().unwrap().to_string()));
        if pages == 1 {
            // A site created mid-walk shows up at the end, not as a duplicate.
            created.insert(app.create("/api/v1/sites", json!({"name": "late"})).await);
        }
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 26);
    assert_eq!(seen.iter().cloned().collect::<BTreeSet<_>>(), created);
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "pages come in id order");

    // Events come newest first and page the same way.
    let (_, first) = app.get("/api/v1/events?limit=5").await;
    let ids: Vec<i64> = first["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids.len(), 5);
    assert!(ids.windows(2).all(|w| w[0] > w[1]));
    let cursor = first["next_cursor"].as_str().unwrap();
    let (_, second) = app
        .get(&format!("/api/v1/events?limit=5&cursor={cursor}"))
        .await;
    let next: Vec<i64> = second["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    assert_eq!(next[0], ids[4] - 1);
    let (_, all) = app.get("/api/v1/sites?limit=1000").await;
    assert!(all["next_cursor"].is_null());
    assert_problem(
        &app.get("/api/v1/sites?limit=1001").await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "request.invalid_limit",
    );
});
