//! `req` and `hello` in either order, the waits that bound them, and the
//! `req`s refused before anything is reserved. Ports 27600-27639.

use super::*;

#[tokio::test]
async fn req_then_hello_grants_the_listeners_and_the_producer_addresses() {
    let fake = Fake::new();
    let reg = registry((27600, 27604), &fake);
    let uid = "3f0c8a1e-6b2d-4c57-9e41-0a7d5b3c2f10";
    let req = spawn_request(&reg, uid, "PROD", 2, None);
    until("the req registered its session", || reg.len() == 1).await;
    assert_eq!(reg.ports_in_use(), 2, "the req reserves its ports at once");
    assert!(!reg.view(uid, None).unwrap().hello_received, "no hello yet");
    assert!(!req.is_finished(), "the req waits for its hello");

    let (role, hello_listeners) = reg
        .hello(uid, &[PRODUCER.to_string()], None)
        .await
        .expect("hello");
    let granted = req.await.unwrap().expect("req");
    assert_eq!(role, Role::Prod);
    assert_eq!(granted.listeners, vec![lo(27600), lo(27601)]);
    assert_eq!(hello_listeners, granted.listeners);
    assert_eq!(granted.prod_listeners, vec![PRODUCER.parse().unwrap()]);
    assert_eq!(granted.tunnel_key, None, "a plaintext backend makes no key");
    assert!(reg.view(uid, None).unwrap().hello_received);
    assert!(!free(lo(27600)), "the granted listener is held");
    assert!(fake.starts().is_empty(), "no data plane before the update");
}

#[tokio::test]
async fn an_early_hello_waits_for_its_req_and_both_complete() {
    let fake = Fake::new();
    let reg = registry((27605, 27609), &fake);
    let uid = "a2b4c6d8-1e3f-4a5b-8c7d-9e0f1a2b3c4d";
    let hello = spawn_hello(&reg, uid, &[PRODUCER], None);
    until("the hello waits for its req", || {
        reg.early_hellos_waiting() == 1
    })
    .await;
    assert!(reg.is_empty(), "a hello alone makes no session");
    assert_eq!(reg.ports_in_use(), 0);

    let asked = std::time::Instant::now();
    let granted = reg
        .request(uid, "PROD", 1, 0, None, KeyRequest::None)
        .await
        .expect("req answered by the waiting hello");
    let (role, listeners) = hello.await.unwrap().expect("the early hello");
    // The req wakes the hello; it does not wait out its bound.
    assert!(
        asked.elapsed() < EARLY_HELLO_WAIT / 2,
        "the hello was not woken by its req"
    );
    assert_eq!(role, Role::Prod);
    assert_eq!(listeners, granted.listeners);
    assert_eq!(granted.prod_listeners, vec![PRODUCER.parse().unwrap()]);
    assert_eq!(reg.early_hellos_waiting(), 0, "the early entry is gone");
}

#[tokio::test]
async fn a_hello_whose_req_never_comes_gives_up_after_the_hello_timeout() {
    let fake = Fake::new();
    let timeout = Duration::from_millis(300);
    let reg = registry_with((27610, 27614), &fake, timeout, None);
    let uid = "b1c2d3e4-f5a6-4b7c-8d9e-0f1a2b3c4d5e";
    let started = std::time::Instant::now();
    let e = failure(
        reg.hello(uid, &[PRODUCER.to_string()], None).await,
        "a hello without req",
    );
    let waited = started.elapsed();
    assert!(matches!(e, ControlError::NotFound(_)), "{e}");
    assert!(
        waited >= timeout,
        "gave up after {waited:?}, before the hello timeout"
    );
    assert!(
        waited < EARLY_HELLO_WAIT,
        "waited {waited:?}: the wait is capped by the hello timeout"
    );
    assert_eq!(reg.early_hellos_waiting(), 0);
    assert!(reg.is_empty());
}

#[tokio::test]
async fn a_req_without_hello_is_released_at_the_hello_timeout() {
    let dir = TempDir::new("no-hello");
    let store = dir.open_store();
    let fake = Fake::new();
    let reg = registry_with(
        (27615, 27619),
        &fake,
        Duration::from_millis(300),
        Some(store.clone()),
    );
    let uid = "c3d4e5f6-a7b8-4c9d-8e0f-1a2b3c4d5e6f";
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        reg.request(uid, "CONS", 2, 0, None, KeyRequest::None),
    )
    .await
    .expect("the req is answered at the hello timeout");
    let e = failure(answer, "a req whose hello never came");
    assert!(matches!(e, ControlError::HelloTimeout { .. }), "{e}");
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded);
    assert!(reg.is_empty(), "the session was removed");
    assert_eq!(reg.ports_in_use(), 0, "its ports went back to the pool");
    assert!(free(lo(27615)) && free(lo(27616)), "its listeners closed");
    assert!(
        store.load().unwrap().is_empty(),
        "an unanswered req is never stored"
    );
    assert!(fake.starts().is_empty());
    // A hello that comes later finds nothing to complete.
    let late = failure(reg.hello(uid, &[], None).await, "a late hello");
    assert!(matches!(late, ControlError::NotFound(_)), "{late}");
}

#[tokio::test]
async fn release_pending_answers_waiting_reqs_and_keeps_answered_sessions() {
    let fake = Fake::new();
    let reg = registry((27620, 27624), &fake);
    let answered = "d4e5f6a7-b8c9-4d0e-8f1a-2b3c4d5e6f70";
    let waiting = "e5f6a7b8-c9d0-4e1f-8a2b-3c4d5e6f7081";
    open(&reg, answered, "PROD", 1, None).await;
    let req = spawn_request(&reg, waiting, "PROD", 2, None);
    until("the second req registered", || reg.len() == 2).await;

    reg.release_pending().await;
    let e = failure(req.await.unwrap(), "a req released while it waited");
    assert!(matches!(e, ControlError::Released(_)), "{e}");
    assert_eq!(e.code(), tonic::Code::Aborted);
    assert_eq!(reg.len(), 1);
    assert!(reg.view(answered, None).is_ok(), "the answered one stays");
    assert_eq!(
        reg.ports_in_use(),
        1,
        "only the waiting req's ports are freed"
    );
}

#[tokio::test]
async fn a_second_req_for_a_uid_is_refused_in_any_spelling() {
    let fake = Fake::new();
    let reg = registry((27625, 27629), &fake);
    let uid = "f6a7b8c9-d0e1-4f2a-8b3c-4d5e6f708192";
    // Still waiting for its hello: the uid is taken all the same.
    let first = spawn_request(&reg, uid, "PROD", 1, None);
    until("the first req registered", || reg.len() == 1).await;
    let e = failure(
        reg.request(uid, "PROD", 1, 0, None, KeyRequest::None).await,
        "a duplicate of a pending session",
    );
    assert!(matches!(e, ControlError::AlreadyExists(_)), "{e}");
    reg.hello(uid, &[PRODUCER.to_string()], None)
        .await
        .expect("hello");
    let granted = first.await.unwrap().expect("the first req");

    let e = failure(
        reg.request(&uid.to_uppercase(), "CONS", 2, 0, None, KeyRequest::None)
            .await,
        "the same uid in upper case",
    );
    assert!(matches!(e, ControlError::AlreadyExists(_)), "{e}");
    assert_eq!(e.code(), tonic::Code::AlreadyExists);
    assert_eq!(reg.len(), 1);
    assert_eq!(reg.ports_in_use(), 1, "the refused reqs reserved nothing");
    let v = reg.view(uid, None).unwrap();
    assert_eq!(v.role, Role::Prod, "the first session is untouched");
    assert_eq!(v.listeners, granted.listeners);
}

#[tokio::test]
async fn an_exhausted_port_range_is_a_clear_error_and_changes_nothing() {
    let fake = Fake::new();
    let reg = registry((27630, 27632), &fake);
    let first = "0a1b2c3d-4e5f-4a6b-8c7d-8e9f0a1b2c3d";
    let second = "1b2c3d4e-5f6a-4b7c-8d8e-9f0a1b2c3d4e";
    open(&reg, first, "CONS", 2, None).await;

    let e = failure(
        reg.request(second, "CONS", 2, 0, None, KeyRequest::None)
            .await,
        "2 ports from a range with 1 left",
    );
    assert!(
        matches!(
            e,
            ControlError::PortsExhausted {
                wanted: 2,
                free: 1,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(
        e.to_string().contains("27630-27632"),
        "names the range: {e}"
    );
    assert_eq!(reg.len(), 1);
    assert_eq!(reg.ports_in_use(), 2);
    assert!(free(lo(27632)), "the port it tried is not left held");
    assert!(matches!(
        reg.view(second, None),
        Err(ControlError::NotFound(_))
    ));
    // What is left is still handed out.
    let granted = open(&reg, second, "CONS", 1, None).await;
    assert_eq!(granted.listeners, vec![lo(27632)]);
}

#[tokio::test]
async fn a_malformed_req_is_refused_before_anything_is_reserved() {
    let fake = Fake::new();
    let reg = registry((27635, 27637), &fake);
    let uid = "2c3d4e5f-6a7b-4c8d-9e0f-a1b2c3d4e5f6";
    for (what, uid, role, num_conn, rate) in [
        ("a uid that is no UUID", "session-1", "PROD", 1, 0),
        ("an unknown role", uid, "MIDDLE", 1, 0),
        ("no connections", uid, "PROD", 0, 0),
        ("too many connections", uid, "PROD", MAX_NUM_CONN + 1, 0),
        ("a negative rate", uid, "PROD", 1, -1),
    ] {
        let e = failure(
            reg.request(uid, role, num_conn, rate, None, KeyRequest::None)
                .await,
            what,
        );
        assert!(matches!(e, ControlError::InvalidArgument(_)), "{what}: {e}");
        assert!(reg.is_empty(), "{what}: a session was left");
        assert_eq!(reg.ports_in_use(), 0, "{what}: ports were left reserved");
    }
}

#[tokio::test]
async fn a_prod_hello_without_producer_addresses_is_refused_and_the_req_keeps_waiting() {
    let fake = Fake::new();
    let reg = registry((27638, 27639), &fake);
    let uid = "3d4e5f6a-7b8c-4d9e-8f0a-b1c2d3e4f5a6";
    let req = spawn_request(&reg, uid, "PROD", 1, None);
    until("the req registered", || reg.len() == 1).await;
    for bad in [&[][..], &["not an address".to_string()][..]] {
        let e = failure(reg.hello(uid, bad, None).await, "a bad PROD hello");
        assert!(matches!(e, ControlError::InvalidArgument(_)), "{e}");
    }
    assert!(!reg.view(uid, None).unwrap().hello_received);
    assert!(!req.is_finished(), "the req still waits");
    reg.hello(uid, &[PRODUCER.to_string()], None)
        .await
        .expect("a good hello");
    assert!(req.await.unwrap().is_ok());
}

#[tokio::test]
async fn an_update_before_the_hello_is_refused_and_nothing_starts_or_is_stored() {
    let dir = TempDir::new("update-early");
    let store = dir.open_store();
    let fake = Fake::new();
    let reg = registry_with(
        (27695, 27699),
        &fake,
        Duration::from_secs(10),
        Some(store.clone()),
    );
    let uid = "4e5f6a7b-8c9d-4e0f-8a1b-c2d3e4f5a6b7";
    let req = spawn_request(&reg, uid, "CONS", 1, None);
    until("the req registered", || reg.len() == 1).await;
    let e = failure(
        reg.update(uid, &[PRODUCER.to_string()], None).await,
        "an update before the hello",
    );
    assert!(matches!(e, ControlError::FailedPrecondition(_)), "{e}");
    assert!(fake.starts().is_empty(), "no data plane started");
    assert!(store.load().unwrap().is_empty(), "nothing stored");
    // The session goes on as usual once its hello comes.
    reg.hello(uid, &[], None).await.expect("the hello");
    assert!(req.await.unwrap().is_ok());
    reg.update(uid, &[PRODUCER.to_string()], None)
        .await
        .expect("an update after the hello");
    assert_eq!(fake.starts().len(), 1);
    assert_eq!(store.load().unwrap().len(), 1);
}
