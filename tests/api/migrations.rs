//! Migrations up, down and up again, on both databases.

use crate::helpers::*;
use bulwark::manager::store::{Actor, Store};
use bulwark::proto::api::{PageQuery, SiteCreate, SiteQuery};

async fn up_down_up(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = Store::connect(&db.url).await.unwrap();
    let status = store.migration_status().await.unwrap();
    assert!(!status.is_empty());
    assert!(status.iter().all(|m| !m.applied));

    store.migrate_up().await.unwrap();
    assert!(store
        .migration_status()
        .await
        .unwrap()
        .iter()
        .all(|m| m.applied));
    let actor = Actor("test".into());
    store
        .create_site(
            &actor,
            SiteCreate {
                name: "a".into(),
                description: String::new(),
                location: None,
                bandwidth_limit: Some(1 << 20),
            },
        )
        .await
        .unwrap();
    let sites = store
        .list_sites(&SiteQuery::default(), &PageQuery::default())
        .await
        .unwrap();
    assert_eq!(
        sites.items[0].bandwidth_limit,
        Some(1 << 20),
        "sites.bandwidth_limit is there"
    );

    store.migrate_down(None).await.unwrap();
    assert!(store
        .migration_status()
        .await
        .unwrap()
        .iter()
        .all(|m| !m.applied));
    assert!(
        store
            .list_sites(&SiteQuery::default(), &PageQuery::default())
            .await
            .is_err(),
        "tables are gone after down"
    );

    store.migrate_up().await.unwrap();
    let sites = store
        .list_sites(&SiteQuery::default(), &PageQuery::default())
        .await
        .unwrap();
    assert!(sites.items.is_empty(), "up again starts empty");
    store
        .create_site(
            &actor,
            SiteCreate {
                name: "a".into(),
                description: String::new(),
                location: None,
                bandwidth_limit: None,
            },
        )
        .await
        .unwrap();
    // Up is idempotent.
    store.migrate_up().await.unwrap();
    store.close().await.unwrap();
}

#[tokio::test]
async fn sqlite_up_down_up() {
    up_down_up(Backend::Sqlite).await;
}

#[tokio::test]
async fn postgres_up_down_up() {
    up_down_up(Backend::Postgres).await;
}
