//! A session after its `req`: who may touch it, `update` (and its failure),
//! release, expiry, shutdown, and coming back from the store. Ports
//! 27640-27699.

use super::*;

#[tokio::test]
async fn another_identity_can_neither_see_nor_change_nor_release_a_session() {
    let fake = Fake::new();
    let reg = registry((27640, 27644), &fake);
    let uid = "40a1b2c3-d4e5-4f6a-8b7c-8d9e0f1a2b3c";
    let (alice, bob) = (who("alice"), who("bob"));
    open(&reg, uid, "PROD", 1, Some(&alice)).await;

    let refused = |e: ControlError, what: &str| {
        assert!(matches!(e, ControlError::NotOwner { .. }), "{what}: {e}");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{what}");
    };
    refused(failure(reg.view(uid, Some(&bob)), "bob's view"), "view");
    refused(
        failure(
            reg.update(uid, &["127.0.0.1:7000".to_string()], Some(&bob))
                .await,
            "bob's update",
        ),
        "update",
    );
    refused(
        failure(reg.release(uid, Some(&bob)).await, "bob's release"),
        "release",
    );
    refused(
        failure(
            reg.hello(uid, &[PRODUCER.to_string()], Some(&bob)).await,
            "bob's hello",
        ),
        "hello",
    );
    assert!(reg.list(Some(&bob)).is_empty(), "bob's list shows it");
    assert!(fake.starts().is_empty(), "bob's update reached the backend");
    assert_eq!(reg.len(), 1, "bob's release took it");

    // The owner, and an identity linked to it, may.
    let linked = Identity {
        id: "alice-elsewhere".into(),
        username: None,
        linked: vec!["alice".into()],
    };
    assert_eq!(
        reg.view(uid, Some(&linked)).unwrap().owner.as_deref(),
        Some("alice")
    );
    assert_eq!(reg.list(Some(&alice)).len(), 1);
    reg.update(uid, &["127.0.0.1:7000".to_string()], Some(&alice))
        .await
        .expect("the owner's update");
    reg.release(uid, Some(&alice))
        .await
        .expect("the owner's release");
    assert!(reg.is_empty());
    assert_eq!(fake.releases(), vec![uid.to_string()]);
}

#[tokio::test]
async fn without_authentication_every_session_can_be_managed() {
    let fake = Fake::new();
    let reg = registry((27645, 27649), &fake);
    let unowned = "41b2c3d4-e5f6-4a7b-8c8d-9e0f1a2b3c4d";
    let owned = "42c3d4e5-f6a7-4b8c-9d9e-0f1a2b3c4d5e";
    open(&reg, unowned, "PROD", 1, None).await;
    // Owned: made while authentication was on (a stored session, say).
    open(&reg, owned, "PROD", 1, Some(&who("alice"))).await;

    // An unowned session is anybody's, with or without a token.
    assert!(reg.view(unowned, Some(&who("bob"))).is_ok());
    assert_eq!(reg.list(Some(&who("bob"))).len(), 1, "only the unowned one");
    // Without a token nobody can prove who they are: the owner cannot be
    // enforced, and the call goes through.
    assert_eq!(reg.list(None).len(), 2);
    assert!(reg.view(owned, None).is_ok());
    reg.update(owned, &["127.0.0.1:7000".to_string()], None)
        .await
        .expect("update without authentication");
    reg.release(owned, None)
        .await
        .expect("release without authentication");
    reg.release(unowned, Some(&who("bob")))
        .await
        .expect("anyone releases an unowned session");
    assert!(reg.is_empty());
    assert_eq!(reg.ports_in_use(), 0);
}

#[tokio::test]
async fn a_failed_start_leaves_the_session_listening_and_stored_as_before() {
    let dir = TempDir::new("failed-start");
    let store = dir.open_store();
    let fake = Fake::new();
    let reg = registry_with(
        (27650, 27654),
        &fake,
        Duration::from_secs(30),
        Some(store.clone()),
    );
    let uid = "43d4e5f6-a7b8-4c9d-8e0f-1a2b3c4d5e6f";
    let granted = open(&reg, uid, "PROD", 2, None).await;
    fake.fail_starts(true);
    let e = failure(
        reg.update(uid, &["127.0.0.1:7000".to_string()], None).await,
        "an update whose start fails",
    );
    assert!(matches!(e, ControlError::DataPlane(_)), "{e}");
    assert_eq!(fake.starts().len(), 1);
    assert!(!fake.starts()[0].ok);
    let v = reg.view(uid, None).unwrap();
    assert!(v.targets.is_empty(), "targets set by a failed update");
    assert_eq!(v.listeners, granted.listeners);
    assert_eq!(reg.ports_in_use(), 2);
    for l in &granted.listeners {
        assert!(!free(*l), "{l} was let go by the failed start");
    }
    let stored = store.load().unwrap();
    assert_eq!(stored.len(), 1);
    assert!(stored[0].targets.is_empty(), "the record changed");

    fake.fail_starts(false);
    reg.update(uid, &["127.0.0.1:7000".to_string()], None)
        .await
        .expect("the retry");
    let starts = fake.starts();
    assert_eq!(starts.len(), 2);
    assert!(starts[1].ok);
    assert_eq!(starts[1].listeners, granted.listeners, "same ports handed");
    assert_eq!(store.load().unwrap()[0].targets.len(), 2);
}

#[tokio::test]
async fn a_backend_that_binds_the_ports_itself_and_fails_gets_them_back() {
    let fake = Fake::with(true, TunnelKeying::Plaintext);
    let reg = registry((27655, 27659), &fake);
    let uid = "44e5f6a7-b8c9-4d0e-8f1a-2b3c4d5e6f70";
    let granted = open(&reg, uid, "CONS", 1, None).await;
    fake.fail_starts(true);
    assert!(reg
        .update(uid, &["127.0.0.1:7000".to_string()], None)
        .await
        .is_err());
    assert!(
        !free(granted.listeners[0]),
        "the registry did not bind its port again"
    );
    assert_eq!(reg.ports_in_use(), 1);

    fake.fail_starts(false);
    reg.update(uid, &["127.0.0.1:7000".to_string()], None)
        .await
        .expect("the retry binds again");
    assert_eq!(fake.starts().len(), 2);
    reg.release(uid, None).await.unwrap();
    assert!(free(granted.listeners[0]));
}

#[tokio::test]
async fn a_second_update_retargets_the_running_data_plane() {
    let dir = TempDir::new("retarget");
    let store = dir.open_store();
    let fake = Fake::new();
    let reg = registry_with(
        (27660, 27664),
        &fake,
        Duration::from_secs(30),
        Some(store.clone()),
    );
    let uid = "45f6a7b8-c9d0-4e1f-8a2b-3c4d5e6f7081";
    let req = reg.clone();
    let request = tokio::spawn(async move {
        req.request(uid, "PROD", 3, 800, None, KeyRequest::None)
            .await
    });
    reg.hello(uid, &[PRODUCER.to_string()], None).await.unwrap();
    request.await.unwrap().expect("req");

    let (a, b, c): (SocketAddr, SocketAddr, SocketAddr) = (
        "127.0.0.1:7001".parse().unwrap(),
        "127.0.0.1:7002".parse().unwrap(),
        "127.0.0.1:7003".parse().unwrap(),
    );
    let (_, targets) = reg
        .update(uid, &[a.to_string(), b.to_string()], None)
        .await
        .expect("first update");
    assert_eq!(targets, vec![a, b, a], "cycled to num_conn");
    let starts = fake.starts();
    assert_eq!(starts.len(), 1);
    assert_eq!(starts[0].uid, uid);
    assert_eq!(starts[0].side, Side::Inbound, "PROD runs the inbound side");
    assert_eq!(starts[0].rate_kbps, 800);
    assert_eq!(starts[0].targets, vec![a, b, a]);

    reg.update(uid, &[c.to_string()], None)
        .await
        .expect("second update");
    assert_eq!(fake.starts().len(), 1, "a running session is not restarted");
    assert_eq!(fake.retargets(), vec![(uid.to_string(), vec![c, c, c])]);
    assert_eq!(reg.view(uid, None).unwrap().targets, vec![c, c, c]);
    assert_eq!(store.load().unwrap()[0].targets, vec![c, c, c]);

    for (bad, why) in [
        (vec![], "no targets"),
        (vec!["nowhere".to_string()], "not an address"),
    ] {
        let e = failure(reg.update(uid, &bad, None).await, why);
        assert!(matches!(e, ControlError::InvalidArgument(_)), "{why}: {e}");
    }
    let unknown = "46a7b8c9-d0e1-4f2a-8b3c-4d5e6f708192";
    let e = failure(
        reg.update(unknown, &[a.to_string()], None).await,
        "update of an unknown uid",
    );
    assert!(matches!(e, ControlError::NotFound(_)), "{e}");
    assert_eq!(reg.view(uid, None).unwrap().targets, vec![c, c, c]);
}

#[tokio::test]
async fn release_frees_the_ports_of_running_and_idle_sessions() {
    let fake = Fake::new();
    let reg = registry((27665, 27669), &fake);
    let running = "47b8c9d0-e1f2-4a3b-8c4d-5e6f708192a3";
    let idle = "48c9d0e1-f2a3-4b4c-9d5e-6f708192a3b4";
    let r = open(&reg, running, "PROD", 2, None).await;
    let i = open(&reg, idle, "CONS", 1, None).await;
    reg.update(running, &["127.0.0.1:7000".to_string()], None)
        .await
        .unwrap();
    assert_eq!(reg.ports_in_use(), 3);

    reg.release(running, None).await.expect("release");
    assert_eq!(fake.releases(), vec![running.to_string()]);
    assert_eq!(reg.ports_in_use(), 1);
    assert!(r.listeners.iter().all(|l| free(*l)), "listeners left open");
    assert!(matches!(
        reg.view(running, None),
        Err(ControlError::NotFound(_))
    ));
    let again = failure(reg.release(running, None).await, "a second release");
    assert!(matches!(again, ControlError::NotFound(_)), "{again}");

    reg.release(idle, None)
        .await
        .expect("release of an idle session");
    assert_eq!(reg.ports_in_use(), 0);
    assert!(free(i.listeners[0]));
    assert!(reg.is_empty());
    assert_eq!(fake.releases().len(), 1, "the idle one had no data plane");
}

#[tokio::test]
async fn stored_sessions_come_back_in_a_new_registry() {
    let dir = TempDir::new("restore");
    let fake = Fake::new();
    let updated = "49d0e1f2-a3b4-4c5d-8e6f-708192a3b4c5";
    let idle = "4ae1f2a3-b4c5-4d6e-9f70-8192a3b4c5d6";
    let alice = who("alice");
    let target: SocketAddr = "127.0.0.1:7000".parse().unwrap();
    let (u, w) = {
        let reg = registry_with(
            (27670, 27674),
            &fake,
            Duration::from_secs(30),
            Some(dir.open_store()),
        );
        let u = open(&reg, updated, "PROD", 2, Some(&alice)).await;
        let w = open(&reg, idle, "CONS", 1, None).await;
        reg.update(updated, &[target.to_string()], Some(&alice))
            .await
            .unwrap();
        reg.shutdown(true).await;
        assert_eq!(reg.ports_in_use(), 0);
        (u, w)
        // The registry and its store close here, as at the end of a run.
    };

    let store = dir.open_store();
    assert_eq!(store.load().unwrap().len(), 2, "both were stored");
    let fake2 = Fake::new();
    let reg = registry_with(
        (27670, 27674),
        &fake2,
        Duration::from_secs(30),
        Some(store.clone()),
    );
    assert_eq!(reg.restore(store.load_raw().expect("load")), (2, 0));
    assert_eq!(reg.len(), 2);
    assert_eq!(reg.ports_in_use(), 3);

    let v = reg.view(updated, Some(&alice)).expect("the owner sees it");
    assert_eq!(v.listeners, u.listeners, "same ports as before the restart");
    assert_eq!(v.targets, vec![target, target]);
    assert!(v.hello_received);
    assert_eq!(v.role, Role::Prod);
    assert!(
        matches!(
            reg.view(updated, Some(&who("bob"))),
            Err(ControlError::NotOwner { .. })
        ),
        "the owner came back too"
    );
    let starts = fake2.starts();
    assert_eq!(starts.len(), 1, "only the updated session forwards");
    assert_eq!(starts[0].uid, updated);
    assert_eq!(starts[0].targets, vec![target, target]);

    let v = reg.view(idle, None).unwrap();
    assert_eq!(v.listeners, w.listeners);
    assert!(v.targets.is_empty());
    assert!(!free(w.listeners[0]), "the restored port is held again");
    reg.release_all().await;
}

#[tokio::test]
async fn shutdown_keeping_the_store_stops_everything_but_keeps_the_records() {
    let dir = TempDir::new("keep");
    let store = dir.open_store();
    let fake = Fake::new();
    let reg = registry_with(
        (27675, 27679),
        &fake,
        Duration::from_secs(30),
        Some(store.clone()),
    );
    let one = "4bf2a3b4-c5d6-4e7f-8081-92a3b4c5d6e7";
    let two = "4ca3b4c5-d6e7-4f80-9192-a3b4c5d6e7f8";
    open(&reg, one, "PROD", 2, None).await;
    open(&reg, two, "PROD", 1, None).await;
    reg.update(one, &["127.0.0.1:7000".to_string()], None)
        .await
        .unwrap();

    reg.shutdown(true).await;
    assert!(reg.is_empty());
    assert_eq!(reg.ports_in_use(), 0);
    assert_eq!(fake.releases(), vec![one.to_string()]);
    assert!((27675..=27677).all(|p| free(lo(p))));
    let mut kept: Vec<String> = store.load().unwrap().into_iter().map(|r| r.uid).collect();
    kept.sort();
    assert_eq!(kept, vec![one.to_string(), two.to_string()]);
}

#[tokio::test]
async fn release_all_stops_everything_and_forgets_it() {
    let dir = TempDir::new("release-all");
    let store = dir.open_store();
    let fake = Fake::new();
    let reg = registry_with(
        (27680, 27684),
        &fake,
        Duration::from_secs(30),
        Some(store.clone()),
    );
    let one = "4db4c5d6-e7f8-4091-a2a3-b4c5d6e7f809";
    let two = "4ec5d6e7-f809-41a2-b3b4-c5d6e7f8091a";
    open(&reg, one, "CONS", 1, None).await;
    open(&reg, two, "CONS", 1, None).await;
    reg.update(two, &["127.0.0.1:7000".to_string()], None)
        .await
        .unwrap();
    assert_eq!(store.load().unwrap().len(), 2);

    reg.release_all().await;
    assert!(reg.is_empty());
    assert_eq!(reg.ports_in_use(), 0);
    assert_eq!(fake.releases(), vec![two.to_string()]);
    assert!(
        store.load().unwrap().is_empty(),
        "records outlived release_all"
    );
}

#[tokio::test]
async fn an_expired_lease_releases_the_session_and_its_record() {
    let dir = TempDir::new("expire");
    let store = dir.open_store();
    let fake = Fake::new();
    let reg = registry_with(
        (27685, 27689),
        &fake,
        Duration::from_secs(30),
        Some(store.clone()),
    );
    let uid = "4fd6e7f8-091a-42b3-84c5-d6e7f8091a2b";
    open(&reg, uid, "PROD", 1, None).await;
    reg.update(uid, &["127.0.0.1:7000".to_string()], None)
        .await
        .unwrap();
    assert_eq!(
        reg.activity(),
        vec![(uid.to_string(), 0)],
        "counted for the lease"
    );

    assert!(reg.expire(uid, Duration::from_secs(600)).await);
    assert!(reg.is_empty());
    assert_eq!(reg.ports_in_use(), 0);
    assert_eq!(fake.releases(), vec![uid.to_string()]);
    assert!(store.load().unwrap().is_empty());
    assert!(
        !reg.expire(uid, Duration::from_secs(600)).await,
        "a gone session expired twice"
    );
}

#[tokio::test]
async fn a_keyed_prod_req_gets_its_key_and_a_cons_session_runs_outbound() {
    let fake = Fake::with(false, TunnelKeying::SessionKey);
    let reg = registry((27690, 27694), &fake);
    let prod = "50e7f809-1a2b-43c4-95d6-e7f8091a2b3c";
    let cons = "51f8091a-2b3c-44d5-a6e7-f8091a2b3c4d";

    let req = reg.clone();
    let asked = tokio::spawn(async move {
        req.request(prod, "PROD", 1, 0, None, KeyRequest::Wanted)
            .await
    });
    reg.hello(prod, &[PRODUCER.to_string()], None)
        .await
        .unwrap();
    let granted = asked.await.unwrap().expect("keyed req");
    let key = granted.tunnel_key.expect("a PROD req that asks gets a key");
    assert_eq!(
        reg.view(prod, None).unwrap().secret,
        crate::control::tunnel_key::SecretKind::Key
    );

    // The outbound gateway is handed that key; a CONS hello carries no
    // producer, and its answer no producer nor key.
    let req = reg.clone();
    let given = tokio::spawn(async move {
        req.request(cons, "CONS", 1, 0, None, KeyRequest::Given(key.to_vec()))
            .await
    });
    let (role, _) = reg.hello(cons, &[], None).await.expect("CONS hello");
    assert_eq!(role, Role::Cons);
    let granted = given.await.unwrap().expect("CONS req");
    assert!(granted.prod_listeners.is_empty());
    assert_eq!(granted.tunnel_key, None, "the key is only PROD's answer");
    reg.update(cons, &["127.0.0.1:7000".to_string()], None)
        .await
        .unwrap();
    assert_eq!(fake.starts()[0].side, Side::Outbound);
}
