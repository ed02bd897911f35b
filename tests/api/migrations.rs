//! Migrations up, down and up again, on both databases.

use crate::helpers::*;
use bulwark::manager::store::{Actor, Store};
use bulwark::proto::api::{Boot, HostCreate, Nic, PageQuery, SiteCreate, SiteQuery, VmCreate};

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
    // vms.boot and vms.nics hold what they are given; one step down drops vms.boot (the
    // newest migration) and keeps the VM, one step up brings the column back empty.
    let host = store
        .create_host(
            &actor,
            HostCreate {
                site_id: sites.items[0].id.clone(),
                name: "h".into(),
                address: None,
                data_address: None,
                nbd_address: None,
                storage_path: None,
            },
        )
        .await
        .unwrap();
    let boot = Boot::Kernel {
        kernel: "/boot/vmlinuz".into(),
        initrd: None,
        cmdline: "console=ttyS0".into(),
    };
    let nic = Nic {
        name: "eth0".into(),
        network: Some("lan".into()),
        mac: Some("52:54:00:00:00:01".into()),
        addresses: vec!["10.0.0.1/24".into()],
    };
    let vm = store
        .create_vm(
            &actor,
            serde_json::from_value::<VmCreate>(serde_json::json!({
                "host_id": host.id, "name": "v", "boot": boot, "nics": [nic],
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let got = store.get_vm(&vm.id).await.unwrap();
    assert_eq!((got.boot, got.nics), (Some(boot), vec![nic.clone()]));
    store.migrate_down(Some(1)).await.unwrap();
    store.migrate_up().await.unwrap();
    let got = store.get_vm(&vm.id).await.unwrap();
    assert_eq!((got.boot, got.nics), (None, vec![nic]));

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
