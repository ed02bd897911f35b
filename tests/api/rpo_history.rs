//! `GET /api/v1/vpgs/{id}/rpo-history`: tiers, worst-case downsampling, validation and
//! access, on SQLite and PostgreSQL. History is seeded through the store at times far
//! from now (the running evaluator records the VPG's live samples only around now), and
//! one check lets the evaluator's own samples arrive end to end.

use crate::helpers::*;
use bulwark::manager::store::entity::rpo_sample;
use bulwark::model::access::Role;
use bulwark::model::rpo_history::{align, Point, Row, Tier};
use bulwark::model::status::VpgStatus;
use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::{Method, StatusCode};
use sea_orm::{EntityTrait, QueryOrder};
use serde_json::{json, Value};

fn rfc(t: i64) -> String {
    DateTime::from_timestamp(t, 0)
        .unwrap()
        .to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn row(vpg: &str, tier: Tier, at: i64, rpo: i64, hist: i64, status: VpgStatus) -> Row {
    Row {
        vpg_id: vpg.to_string(),
        tier,
        point: Point {
            at,
            rpo_ms: Some(rpo),
            history_secs: Some(hist),
            status,
        },
    }
}

async fn history(app: &TestApp, vpg: &str, query: &str) -> Value {
    let (s, v) = app
        .get(&format!("/api/v1/vpgs/{vpg}/rpo-history?{query}"))
        .await;
    assert_eq!(s, StatusCode::OK, "{query}: {v}");
    assert_eq!(v["vpg_id"], vpg);
    v
}

fn samples(v: &Value) -> &Vec<Value> {
    v["samples"].as_array().unwrap()
}

async fn rpo_history_tiers_and_worst_case(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.world(1).await;
    let vpg = app
        .create(
            "/api/v1/vpgs",
            json!({"name": "rpo", "recovery_site_id": w.recovery_site,
                   "members": [{"vm_id": w.vms[0], "recovery_host_id": w.recovery_host}]}),
        )
        .await;
    let now = Utc::now().timestamp();

    // Raw tier: ten minutes of 1 s samples 90 minutes ago, one RPO breach at +125 s
    // and an initializing second (less bad) at +130 s.
    let t0 = align(now - 5400, 600);
    let raw: Vec<Row> = (0..600)
        .map(|i| match i {
            125 => row(
                &vpg,
                Tier::Raw,
                t0 + i,
                90_000,
                100,
                VpgStatus::RpoNotMeetingSla,
            ),
            130 => row(
                &vpg,
                Tier::Raw,
                t0 + i,
                1_000,
                3600,
                VpgStatus::Initializing,
            ),
            _ => row(
                &vpg,
                Tier::Raw,
                t0 + i,
                1_000 + (i % 10) * 100,
                3600,
                VpgStatus::MeetingSla,
            ),
        })
        .collect();
    app.store.insert_rpo_rows(&raw).await.unwrap();
    // Writing the same rows again keeps what is stored (a restart within a bucket).
    app.store.insert_rpo_rows(&raw[..10]).await.unwrap();

    // Every second.
    let q = format!("since={}&until={}&max_points=600", rfc(t0), rfc(t0 + 600));
    let v = history(&app, &vpg, &q).await;
    assert_eq!(v["step_secs"], 1);
    let s = samples(&v);
    assert_eq!(s.len(), 600);
    assert_eq!(s[0]["at"], rfc(t0));
    assert_eq!(s[0]["rpo_ms"], 1_000);
    assert_eq!(s[125]["rpo_ms"], 90_000);
    assert_eq!(s[125]["status"], "rpo_not_meeting_sla");
    assert_eq!(s[130]["status"], "initializing");

    // Ten-second buckets: the breach is not averaged away.
    let q = format!("since={}&until={}&max_points=60", rfc(t0), rfc(t0 + 600));
    let v = history(&app, &vpg, &q).await;
    assert_eq!(v["step_secs"], 10);
    let s = samples(&v);
    assert_eq!(s.len(), 60);
    assert_eq!(s[0]["rpo_ms"], 1_900, "the max of the bucket");
    assert_eq!(s[12]["at"], rfc(t0 + 120));
    assert_eq!(s[12]["rpo_ms"], 90_000);
    assert_eq!(s[12]["history_secs"], 100, "the min of the bucket");
    assert_eq!(s[12]["status"], "rpo_not_meeting_sla");
    assert_eq!(s[13]["status"], "initializing");
    assert_eq!(s[14]["status"], "meeting_sla");
    // Time order.
    let ats: Vec<&str> = s.iter().map(|x| x["at"].as_str().unwrap()).collect();
    assert!(ats.windows(2).all(|w| w[0] < w[1]));

    // Two-minute steps come from the minute tier; none is stored for that span, so
    // the raw samples fill it.
    let q = format!("since={}&until={}&max_points=5", rfc(t0), rfc(t0 + 600));
    let v = history(&app, &vpg, &q).await;
    assert_eq!(v["step_secs"], 120);
    let s = samples(&v);
    assert_eq!(s.len(), 5);
    assert_eq!(s[1]["rpo_ms"], 90_000);
    assert_eq!(s[1]["status"], "rpo_not_meeting_sla");

    // Minute and hour tiers, three days ago (raw is long gone there): a day of minute
    // rows with one breach at minute 800, and hour rows for the first 12 hours only.
    let t1 = align(now - 3 * 86_400, 3600);
    let minutes: Vec<Row> = (0..1440)
        .map(|m| {
            let (rpo, status) = if m == 800 {
                (600_000, VpgStatus::NotMeetingSla)
            } else {
                (2_000, VpgStatus::MeetingSla)
            };
            row(&vpg, Tier::Minute, t1 + m * 60, rpo, 7200, status)
        })
        .collect();
    let hours: Vec<Row> = (0..12)
        .map(|h| {
            row(
                &vpg,
                Tier::Hour,
                t1 + h * 3600,
                5,
                7200,
                VpgStatus::MeetingSla,
            )
        })
        .collect();
    app.store.insert_rpo_rows(&minutes).await.unwrap();
    app.store.insert_rpo_rows(&hours).await.unwrap();

    // Hourly points: stored hours, then hours folded from minutes after the last one.
    let q = format!("since={}&until={}&max_points=24", rfc(t1), rfc(t1 + 86_400));
    let v = history(&app, &vpg, &q).await;
    assert_eq!(v["step_secs"], 3600);
    let s = samples(&v);
    assert_eq!(s.len(), 24);
    assert!(s[..12].iter().all(|x| x["rpo_ms"] == 5), "{v}");
    // Minute 800 lies in hour 13.
    assert_eq!(s[13]["rpo_ms"], 600_000);
    assert_eq!(s[13]["status"], "not_meeting_sla");
    assert_eq!(s[12]["rpo_ms"], 2_000);

    // 2-minute points from the minute tier (a raw step is impossible three days ago).
    let q = format!(
        "since={}&until={}&max_points=720",
        rfc(t1),
        rfc(t1 + 86_400)
    );
    let v = history(&app, &vpg, &q).await;
    assert_eq!(v["step_secs"], 120);
    let s = samples(&v);
    assert_eq!(s.len(), 720);
    assert_eq!(s[400]["rpo_ms"], 600_000);
    assert_eq!(s[400]["at"], rfc(t1 + 800 * 60));
    // A short window there still answers from the finest tier that holds it.
    let q = format!(
        "since={}&until={}&max_points=5000",
        rfc(t1 + 799 * 60),
        rfc(t1 + 802 * 60)
    );
    let v = history(&app, &vpg, &q).await;
    assert_eq!(v["step_secs"], 60);
    assert_eq!(samples(&v).len(), 3);
    // Unencoded `+00:00` offsets (a `+` read as a space) are accepted.
    let plus = |t: i64| rfc(t).replace('Z', "+00:00");
    let v = history(
        &app,
        &vpg,
        &format!(
            "since={}&until={}",
            plus(t1 + 799 * 60),
            plus(t1 + 802 * 60)
        ),
    )
    .await;
    assert_eq!(samples(&v).len(), 3);

    // The viewer role reads it.
    let viewer = app.token(Role::Viewer).await;
    let res = app
        .req(
            Method::GET,
            &format!("/api/v1/vpgs/{vpg}/rpo-history"),
            Some(&viewer),
        )
        .send()
        .await
        .unwrap();
    let (status, v) = split(res).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["step_secs"], 5, "default: the last hour in 720 points");

    // The evaluator records the VPG's live samples by itself (every second, written
    // every few seconds).
    app.eventually("live samples recorded", || async {
        let v = history(&app, &vpg, "max_points=5000").await;
        samples(&v)
            .iter()
            .any(|x| x["status"].is_string())
            .then_some(())
    })
    .await;
}
on_both!(tiers_and_worst_case, rpo_history_tiers_and_worst_case);

async fn rpo_history_rejects_bad_input(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.world(1).await;
    let vpg = app
        .create(
            "/api/v1/vpgs",
            json!({"name": "rpo", "recovery_site_id": w.recovery_site,
                   "members": [{"vm_id": w.vms[0], "recovery_host_id": w.recovery_host}]}),
        )
        .await;
    let base = format!("/api/v1/vpgs/{vpg}/rpo-history");
    let cases = [
        ("since=yesterday", "request.invalid_time"),
        ("until=2026-13-01T00:00:00Z", "request.invalid_time"),
        (
            "since=2026-11-29T10:00:00Z&until=2026-11-29T10:00:00Z",
            "request.invalid_range",
        ),
        (
            "since=2026-11-29T11:00:00Z&until=2026-11-29T10:00:00Z",
            "request.invalid_range",
        ),
        ("max_points=0", "request.invalid_max_points"),
        ("max_points=5001", "request.invalid_max_points"),
        ("max_points=many", "request.invalid_query"),
    ];
    for (q, code) in cases {
        let got = app.get(&format!("{base}?{q}")).await;
        assert_problem(&got, StatusCode::BAD_REQUEST, code);
    }
    let (s, _) = app.get(&format!("{base}?max_points=5000")).await;
    assert_eq!(s, StatusCode::OK);
    let got = app.get("/api/v1/vpgs/no-such-vpg/rpo-history").await;
    assert_problem(&got, StatusCode::NOT_FOUND, "vpg.not_found");
    // Without a token: 401.
    let res = app.req(Method::GET, &base, None).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
}
on_both!(rejects_bad_input, rpo_history_rejects_bad_input);

async fn rpo_history_retention(backend: Backend) {
    let app = spawn_app(backend).await;
    let now = Utc::now().timestamp();
    let rows: Vec<Row> = [
        // Raw: one past its two hours, one within.
        row("v", Tier::Raw, now - 3 * 3600, 1, 1, VpgStatus::MeetingSla),
        row("v", Tier::Raw, now - 3600, 1, 1, VpgStatus::MeetingSla),
        // Minute: past seven days, within.
        row(
            "v",
            Tier::Minute,
            now - 8 * 86_400,
            1,
            1,
            VpgStatus::MeetingSla,
        ),
        row(
            "v",
            Tier::Minute,
            now - 6 * 86_400,
            1,
            1,
            VpgStatus::MeetingSla,
        ),
        // Hour: within 400 days.
        row(
            "v",
            Tier::Hour,
            now - 300 * 86_400,
            1,
            1,
            VpgStatus::MeetingSla,
        ),
    ]
    .into_iter()
    .collect();
    app.store.insert_rpo_rows(&rows).await.unwrap();
    // One pass deletes at most one slice per tier; two passes are plenty here (the
    // manager's own retention pass may take some of them first).
    let mut deleted = 0;
    for _ in 0..2 {
        deleted += app.store.prune_rpo_history(now).await.unwrap();
    }
    assert!(deleted <= 2, "{deleted}");
    assert_eq!(app.store.prune_rpo_history(now).await.unwrap(), 0);
    let left: Vec<(i16, i64)> = rpo_sample::Entity::find()
        .order_by_asc(rpo_sample::Column::Tier)
        .all(app.store.connection())
        .await
        .unwrap()
        .into_iter()
        .map(|m| (m.tier, now - m.at_secs))
        .collect();
    assert_eq!(
        left,
        vec![(0, 3600), (1, 6 * 86_400), (2, 300 * 86_400)],
        "what is within retention stays"
    );
}
on_both!(retention, rpo_history_retention);
