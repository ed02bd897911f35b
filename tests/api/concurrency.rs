//! Safe concurrent updates of a VPG through its version (ETag / If-Match).

use crate::both;
use crate::helpers::*;
use reqwest::{Method, StatusCode};
use serde_json::json;

both!(if_match_guards_updates, |app: TestApp| async move {
    let w = app.world(1).await;
    let vpg = app
        .create(
            "/api/v1/vpgs",
            json!({"name": "g", "recovery_site_id": w.recovery_site}),
        )
        .await;
    let path = format!("/api/v1/vpgs/{vpg}");

    // Two clients read version 1 and both try to write: exactly one wins.
    let send = |rpo: u32| {
        app.req(Method::PATCH, &path, Some(&app.admin))
            .header("if-match", "\"1\"")
            .json(&json!({"settings": {"rpo_target_secs": rpo}}))
            .send()
    };
    let (a, b) = tokio::join!(send(60), send(90));
    let (a, b) = (split(a.unwrap()).await, split(b.unwrap()).await);
    let mut statuses = [a.0, b.0];
    statuses.sort();
    assert_eq!(
        statuses,
        [StatusCode::OK, StatusCode::PRECONDITION_FAILED],
        "{} / {}",
        a.1,
        b.1
    );
    let loser = if a.0 == StatusCode::OK { &b } else { &a };
    assert_problem(
        loser,
        StatusCode::PRECONDITION_FAILED,
        "vpg.version_mismatch",
    );
    let winner = if a.0 == StatusCode::OK { &a } else { &b };
    let (_, now) = app.get(&path).await;
    assert_eq!(now["version"], 2);
    assert_eq!(
        now["settings"]["rpo_target_secs"],
        winner.1["settings"]["rpo_target_secs"]
    );

    // A stale ETag is refused for every kind of update, and nothing changes.
    let stale = |m: Method, p: String| {
        app.req(m, &p, Some(&app.admin))
            .header("if-match", "W/\"1\"")
    };
    let res = stale(Method::PUT, path.clone()).json(&json!({"name": "h", "recovery_site_id": w.recovery_site, "settings": {}, "members": []})).send().await.unwrap();
    assert_problem(
        &split(res).await,
        StatusCode::PRECONDITION_FAILED,
        "vpg.version_mismatch",
    );
    let res = stale(Method::POST, format!("{path}/members"))
        .json(&json!({"vm_id": w.vms[0]}))
        .send()
        .await
        .unwrap();
    assert_problem(
        &split(res).await,
        StatusCode::PRECONDITION_FAILED,
        "vpg.version_mismatch",
    );
    let res = stale(Method::DELETE, path.clone()).send().await.unwrap();
    assert_problem(
        &split(res).await,
        StatusCode::PRECONDITION_FAILED,
        "vpg.version_mismatch",
    );
    let res = app
        .req(Method::PATCH, &path, Some(&app.admin))
        .header("if-match", "banana")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_problem(
        &split(res).await,
        StatusCode::BAD_REQUEST,
        "request.invalid_if_match",
    );
    let (_, after) = app.get(&path).await;
    assert_eq!(after, now);

    // The current ETag works, and the answer carries the next one.
    let res = app
        .req(Method::PATCH, &path, Some(&app.admin))
        .header("if-match", "\"2\"")
        .json(&json!({"description": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["etag"], "\"3\"");

    // Without If-Match, concurrent updates all apply, one after another.
    let futures: Vec<_> = (0..8)
        .map(|i| {
            app.req(Method::PATCH, &path, Some(&app.admin))
                .json(&json!({"description": format!("d{i}")}))
                .send()
        })
        .collect();
    for r in futures::future::join_all(futures).await {
        assert_eq!(r.unwrap().status(), StatusCode::OK);
    }
    let (_, v) = app.get(&path).await;
    assert_eq!(v["version"], 11);
});
