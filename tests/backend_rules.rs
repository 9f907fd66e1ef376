//! The backend rules of docs/addresses.md: the "Answers" paragraph and "The lineage/serial guard" section,
//! through the public `App::handle` over the in-memory `MemoryStore`: no git, no network,
//! every test in milliseconds. Races, contention, an unavailable host and deadlines are
//! injected faults of the store. After every refusal the store is checked unchanged.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use gitstate::app::App;
use gitstate::auth::Auth;
use gitstate::config::Config;
use gitstate::context::Deadline;
use gitstate::protocol::content_md5;
use gitstate::storage::{ObjectId, StorageError};
use gitstate_testkit::fixtures::{lock_info, state, state_with_lineage, LINEAGE};
use gitstate_testkit::memory::MemoryStore;

/// The state every test works on (a nested path: its lock branch is `locks/envs/prod/terraform.tfstate`).
const P: &str = "envs/prod/terraform.tfstate";
const MAIN: &str = "refs/heads/main";
const LOCK: &str = "refs/heads/locks/envs/prod/terraform.tfstate";

struct Env {
    store: Arc<MemoryStore>,
    app: Arc<App>,
}

fn env() -> Env {
    env_with(|_| {})
}

fn env_with(tune: impl FnOnce(&mut Config)) -> Env {
    let store = Arc::new(MemoryStore::new());
    let app = app_over(&store, tune);
    Env { store, app }
}

/// A new App (a fresh process: nothing remembered) over `store`.
fn app_over(store: &Arc<MemoryStore>, tune: impl FnOnce(&mut Config)) -> Arc<App> {
    let mut config = Config::default();
    tune(&mut config);
    let auth = Auth::from_config(&config).expect("passthrough auth");
    Arc::new(App::new(config, auth, store.clone(), gitstate::backend::sealing::Sealing::clear()))
}

#[derive(Debug)]
struct Answer {
    status: u16,
    body: String,
    retry_after: bool,
    md5: Option<String>,
}

/// A request as Terraform sends it: a POST of a state carries its Content-MD5.
fn request(method: &str, uri: &str, body: &str) -> http::Request<Bytes> {
    let mut b = http::Request::builder().method(method).uri(uri);
    if method == "POST" && uri.starts_with("/state/") {
        b = b.header("Content-Md5", content_md5(body.as_bytes()));
    }
    b.body(Bytes::from(body.to_string())).unwrap()
}

fn answer(r: http::Response<Bytes>) -> Answer {
    Answer {
        status: r.status().as_u16(),
        body: String::from_utf8_lossy(r.body()).into_owned(),
        retry_after: r.headers().contains_key("retry-after"),
        md5: r.headers().get("content-md5").map(|v| v.to_str().unwrap().to_string()),
    }
}

async fn send(app: &Arc<App>, method: &str, uri: &str, body: &str) -> Answer {
    answer(app.handle(request(method, uri, body)).await)
}

async fn send_until(app: &Arc<App>, method: &str, uri: &str, body: &str, budget: Duration) -> Answer {
    answer(app.handle_until(request(method, uri, body), Deadline::after(budget)).await)
}

/// Check the status, with the whole answer in the failure message.
#[track_caller]
fn expect(a: Answer, status: u16) -> Answer {
    assert_eq!(a.status, status, "answer: {a:?}");
    a
}

fn state_uri(path: &str) -> String {
    format!("/state/{path}")
}

fn with_id(id: &str) -> String {
    format!("/state/{P}?ID={id}")
}

/// What the store holds, to compare before and after a refusal: commits never change,
/// so equal refs mean equal contents.
fn snapshot(store: &MemoryStore) -> BTreeMap<String, ObjectId> {
    store.refs()
}

fn stored(store: &MemoryStore) -> Option<String> {
    store.file("main", P).map(|f| String::from_utf8(f).unwrap())
}

// ---------------------------------------------------------------------------------------
// Locks
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn lock_conflict_is_423_with_the_holder_and_the_holder_may_lock_again() {
    let Env { store, app } = env();
    expect(send(&app, "LOCK", &state_uri(P), &lock_info("a")).await, 200);
    let lock_tip = store.tip(LOCK).expect("a lock branch");
    assert_eq!(store.file(LOCK, &format!("{P}.lock")).unwrap(), lock_info("a").as_bytes(), "the LockInfo as sent");
    assert!(store.message(lock_tip).unwrap().starts_with(&format!("Lock {P}\n\n")));
    let before = snapshot(&store);

    let refused = expect(send(&app, "LOCK", &state_uri(P), &lock_info("b")).await, 423);
    assert_eq!(refused.body, lock_info("a"), "the holder's LockInfo, as it sent it");
    assert_eq!(snapshot(&store), before, "a refused LOCK changes nothing");

    // The same ID locking again (a retried LOCK whose answer was lost): 200, nothing moves.
    expect(send(&app, "LOCK", &state_uri(P), &lock_info("a")).await, 200);
    assert_eq!(snapshot(&store), before);
    // Another process (a fresh App, nothing remembered) sees the same holder.
    let other = app_over(&store, |_| {});
    assert_eq!(expect(send(&other, "LOCK", &state_uri(P), &lock_info("c")).await, 423).body, lock_info("a"));
    expect(send(&other, "LOCK", &state_uri(P), &lock_info("a")).await, 200);
    assert_eq!(snapshot(&store), before);
}

#[tokio::test]
async fn unlock_rules() {
    let Env { store, app } = env();
    expect(send(&app, "LOCK", &state_uri(P), &lock_info("a")).await, 200);
    let before = snapshot(&store);

    // Another ID: 409 with the holder, the lock stays.
    let refused = expect(send(&app, "UNLOCK", &state_uri(P), &lock_info("b")).await, 409);
    assert_eq!(refused.body, lock_info("a"));
    assert_eq!(snapshot(&store), before);

    // The holder unlocks; unlocking what is gone is 200 again (a retried UNLOCK).
    expect(send(&app, "UNLOCK", &state_uri(P), &lock_info("a")).await, 200);
    assert_eq!(store.tip(LOCK), None, "the lock branch is deleted");
    expect(send(&app, "UNLOCK", &state_uri(P), &lock_info("a")).await, 200);
    expect(send(&app, "UNLOCK", &state_uri(P), &lock_info("b")).await, 200);
    assert_eq!(store.refs().len(), 0, "nothing else was ever stored");

    // force-unlock: an empty body (or whitespace, as chunked bodies may be) releases any holder.
    expect(send(&app, "LOCK", &state_uri(P), &lock_info("b")).await, 200);
    let forced = app_over(&store, |_| {});
    expect(send(&forced, "UNLOCK", &state_uri(P), "").await, 200);
    assert_eq!(store.tip(LOCK), None, "force-unlock removed the lock");
    expect(send(&forced, "UNLOCK", &state_uri(P), "").await, 200);
    expect(send(&app, "LOCK", &state_uri(P), &lock_info("c")).await, 200);
    expect(send(&app, "UNLOCK", &state_uri(P), "\r\n").await, 200);
    assert_eq!(store.tip(LOCK), None);
    // OpenTofu's force-unlock sends `{"ID": ...}` only: the holder's ID releases it.
    expect(send(&app, "LOCK", &state_uri(P), &lock_info("d")).await, 200);
    expect(send(&app, "UNLOCK", &state_uri(P), r#"{"ID":"d"}"#).await, 200);
    assert_eq!(store.tip(LOCK), None);
}

#[tokio::test]
async fn lock_address_get_post_delete() {
    let Env { store, app } = env();
    let lock_uri = format!("/lock/{P}");
    expect(send(&app, "GET", &lock_uri, "").await, 404);
    // GitLab's convention: POST takes, DELETE releases.
    expect(send(&app, "POST", &lock_uri, &lock_info("a")).await, 200);
    let shown = expect(send(&app, "GET", &lock_uri, "").await, 200);
    assert_eq!(shown.body, lock_info("a"));
    assert_eq!(expect(send(&app, "POST", &lock_uri, &lock_info("b")).await, 423).body, lock_info("a"));
    assert_eq!(expect(send(&app, "DELETE", &lock_uri, &lock_info("b")).await, 409).body, lock_info("a"));
    // A fresh process reads the LockInfo from the lock commit.
    let other = app_over(&store, |_| {});
    assert_eq!(expect(send(&other, "GET", &lock_uri, "").await, 200).body, lock_info("a"));
    expect(send(&app, "DELETE", &lock_uri, &lock_info("a")).await, 200);
    expect(send(&app, "GET", &lock_uri, "").await, 404);
    expect(send(&other, "GET", &lock_uri, "").await, 404);
    assert!(store.refs().is_empty());
}

// ---------------------------------------------------------------------------------------
// Writes and locks
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn writes_under_locks() {
    let Env { store, app } = env();
    expect(send(&app, "GET", &state_uri(P), "").await, 204);
    expect(send(&app, "POST", &state_uri(P), &state(1, "one")).await, 200);
    let got = expect(send(&app, "GET", &state_uri(P), "").await, 200);
    assert_eq!(got.body, state(1, "one"));
    assert_eq!(got.md5.as_deref(), Some(content_md5(state(1, "one").as_bytes()).as_str()));
    expect(send(&app, "LOCK", &state_uri(P), &lock_info("a")).await, 200);
    let before = snapshot(&store);

    // Another ID, or no ID, while `a` holds: 423 with the holder.
    for uri in [with_id("b"), state_uri(P)] {
        let refused = expect(send(&app, "POST", &uri, &state(2, "two")).await, 423);
        assert_eq!(refused.body, lock_info("a"), "POST {uri}");
        let refused = expect(send(&app, "DELETE", &uri, "").await, 423);
        assert_eq!(refused.body, lock_info("a"), "DELETE {uri}");
        assert_eq!(snapshot(&store), before, "{uri}");
    }
    assert_eq!(stored(&store), Some(state(1, "one")));

    // The holder writes.
    expect(send(&app, "POST", &with_id("a"), &state(2, "two")).await, 200);
    assert_eq!(stored(&store), Some(state(2, "two")));
    assert_eq!(store.history(MAIN).len(), 2);
    expect(send(&app, "UNLOCK", &state_uri(P), &lock_info("a")).await, 200);

    // An ID that holds nothing: 409, nothing stored.
    let before = snapshot(&store);
    let refused = expect(send(&app, "POST", &with_id("a"), &state(3, "three")).await, 409);
    assert!(refused.body.contains("no lock is held"), "{}", refused.body);
    expect(send(&app, "DELETE", &with_id("a"), "").await, 409);
    assert_eq!(snapshot(&store), before);
    assert_eq!(stored(&store), Some(state(2, "two")));
}

#[tokio::test]
async fn malformed_writes_are_400_and_store_nothing() {
    let Env { store, app } = env();
    expect(send(&app, "POST", &state_uri(P), &state(1, "one")).await, 200);
    let before = snapshot(&store);

    let body = state(2, "two");
    let wrong_md5 = http::Request::builder()
        .method("POST")
        .uri(state_uri(P))
        .header("Content-MD5", content_md5(b"something else"))
        .body(Bytes::from(body.clone()))
        .unwrap();
    let refused = expect(answer(app.handle(wrong_md5).await), 400);
    assert!(refused.body.contains("Content-MD5"), "{}", refused.body);
    let not_base64 = http::Request::builder()
        .method("POST")
        .uri(state_uri(P))
        .header("Content-MD5", "%%%")
        .body(Bytes::from(body))
        .unwrap();
    expect(answer(app.handle(not_base64).await), 400);

    for bad in ["[1, 2]", "\"a string\"", "42", "null", "not json", "{\"unterminated\": ", ""] {
        expect(send(&app, "POST", &state_uri(P), bad).await, 400);
        expect(send(&app, "POST", &with_id("x"), bad).await, 400);
    }
    assert_eq!(snapshot(&store), before);
    assert_eq!(stored(&store), Some(state(1, "one")));
}

#[tokio::test]
async fn a_repeated_identical_write_is_200_without_a_commit() {
    let Env { store, app } = env();
    expect(send(&app, "POST", &state_uri(P), &state(1, "one")).await, 200);
    let before = snapshot(&store);
    let commits = store.commit_count();
    expect(send(&app, "POST", &state_uri(P), &state(1, "one")).await, 200);
    // From another process too (which must look at the store first).
    let other = app_over(&store, |_| {});
    expect(send(&other, "POST", &state_uri(P), &state(1, "one")).await, 200);
    assert_eq!(snapshot(&store), before);
    assert_eq!(store.commit_count(), commits, "not even a dangling commit");
    assert_eq!(store.history(MAIN).len(), 1);
}

// ---------------------------------------------------------------------------------------
// The lineage/serial guard
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn the_guard_refuses_what_would_destroy_another_update() {
    let Env { store, app } = env();
    let five = state(5, "five");
    expect(send(&app, "POST", &state_uri(P), &five).await, 200);
    let before = snapshot(&store);

    let other_lineage = state_with_lineage("lin-other", 6, "six");
    let refused = expect(send(&app, "POST", &state_uri(P), &other_lineage).await, 409);
    assert!(refused.body.contains("lineage"), "{}", refused.body);
    let refused = expect(send(&app, "POST", &state_uri(P), &state(4, "four")).await, 409);
    assert!(refused.body.contains("serial"), "{}", refused.body);
    let refused = expect(send(&app, "POST", &state_uri(P), &state(5, "other five")).await, 409);
    assert!(refused.body.contains("serial 5"), "{}", refused.body);
    // The same under a lock.
    expect(send(&app, "LOCK", &state_uri(P), &lock_info("a")).await, 200);
    let locked = snapshot(&store);
    expect(send(&app, "POST", &with_id("a"), &state(4, "four")).await, 409);
    assert_eq!(snapshot(&store), locked);
    expect(send(&app, "UNLOCK", &state_uri(P), &lock_info("a")).await, 200);
    assert_eq!(snapshot(&store), before);
    assert_eq!(stored(&store), Some(five.clone()));

    // The same JSON, formatted otherwise (a retried write): 200, the stored bytes stay.
    let compact = serde_json::to_string(&serde_json::from_str::<serde_json::Value>(&five).unwrap()).unwrap();
    assert_ne!(compact, five);
    expect(send(&app, "POST", &state_uri(P), &compact).await, 200);
    assert_eq!(snapshot(&store), before);
    assert_eq!(stored(&store), Some(five.clone()));

    // A higher serial of the same lineage lands.
    expect(send(&app, "POST", &state_uri(P), &state(6, "six")).await, 200);
    assert_eq!(stored(&store), Some(state(6, "six")));
}

#[tokio::test]
async fn force_true_overrides_the_guard() {
    let Env { store, app } = env();
    expect(send(&app, "POST", &state_uri(P), &state(5, "five")).await, 200);
    let forced = format!("/state/{P}?force=true");
    expect(send(&app, "POST", &forced, &state(3, "old")).await, 200);
    assert_eq!(stored(&store), Some(state(3, "old")));
    expect(send(&app, "POST", &forced, &state_with_lineage("lin-other", 1, "x")).await, 200);
    assert_eq!(stored(&store), Some(state_with_lineage("lin-other", 1, "x")));
    expect(send(&app, "POST", &forced, &state_with_lineage("lin-other", 1, "y")).await, 200);
    assert_eq!(store.history(MAIN).len(), 4);
    // `force` does not override a lock.
    expect(send(&app, "LOCK", &state_uri(P), &lock_info("a")).await, 200);
    let before = snapshot(&store);
    expect(send(&app, "POST", &forced, &state(9, "z")).await, 423);
    expect(send(&app, "POST", &format!("/state/{P}?ID=b&force=true"), &state(9, "z")).await, 423);
    assert_eq!(snapshot(&store), before);
    // A body without serial/lineage (an encrypted envelope) cannot be shown newer than a
    // guarded state: 409 unless forced (decide.rs fails closed; docs/addresses.md still says "stored as they are").
    let envelope = r#"{"encrypted_data":"abc","meta":{}}"#;
    let refused = expect(send(&app, "POST", &with_id("a"), envelope).await, 409);
    assert!(refused.body.contains("force=true"), "{}", refused.body);
    assert_eq!(snapshot(&store), before);
    expect(send(&app, "POST", &format!("/state/{P}?ID=a&force=true"), envelope).await, 200);
    assert_eq!(store.file("main", P).unwrap(), envelope.as_bytes());
    // Over an envelope, or over nothing, envelopes are stored as they are.
    let next = r#"{"encrypted_data":"def","meta":{}}"#;
    expect(send(&app, "POST", &with_id("a"), next).await, 200);
    assert_eq!(store.file("main", P).unwrap(), next.as_bytes());
    expect(send(&app, "POST", "/state/fresh.tfstate", envelope).await, 200);
    assert_eq!(store.file("main", "fresh.tfstate").unwrap(), envelope.as_bytes());
}

// ---------------------------------------------------------------------------------------
// DELETE and paths
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn delete_rules() {
    let Env { store, app } = env();
    // Nothing there: 200 and nothing created.
    expect(send(&app, "DELETE", &state_uri(P), "").await, 200);
    assert!(store.refs().is_empty());

    let q = "envs/stage/terraform.tfstate";
    expect(send(&app, "POST", &state_uri(P), &state(1, "p")).await, 200);
    expect(send(&app, "POST", &state_uri(q), &state(1, "q")).await, 200);
    expect(send(&app, "DELETE", &state_uri(P), "").await, 200);
    let tip = store.tip(MAIN).unwrap();
    assert!(store.message(tip).unwrap().starts_with(&format!("Delete {P}\n\n")), "{:?}", store.message(tip));
    assert_eq!(store.files("main"), vec![q.to_string()], "the other state stays");
    assert_eq!(store.history(MAIN).len(), 3);
    expect(send(&app, "GET", &state_uri(P), "").await, 204);
    assert_eq!(expect(send(&app, "GET", &state_uri(q), "").await, 200).body, state(1, "q"));

    // Deleting it again: 200, no commit.
    expect(send(&app, "DELETE", &state_uri(P), "").await, 200);
    assert_eq!(store.tip(MAIN), Some(tip));
    // After a delete a state of any serial may start again.
    expect(send(&app, "POST", &state_uri(P), &state(1, "again")).await, 200);
    assert_eq!(stored(&store), Some(state(1, "again")));
}

#[tokio::test]
async fn path_conflicts_are_409_and_store_nothing() {
    let Env { store, app } = env();
    expect(send(&app, "POST", "/state/a", &state(1, "a")).await, 200);
    let before = snapshot(&store);
    let commits = store.commit_count();
    let refused = expect(send(&app, "POST", "/state/a/b", &state(1, "ab")).await, 409);
    assert!(refused.body.contains("`a` is a state"), "{}", refused.body);
    assert_eq!(snapshot(&store), before);
    assert_eq!(store.commit_count(), commits, "no commit was made");
    assert_eq!(store.files("main"), vec!["a".to_string()]);
    expect(send(&app, "GET", "/state/a/b", "").await, 204);

    // The reverse: a directory of states in the way of a file.
    expect(send(&app, "POST", "/state/d/e", &state(1, "de")).await, 200);
    let before = snapshot(&store);
    let refused = expect(send(&app, "POST", "/state/d", &state(1, "d")).await, 409);
    assert!(refused.body.contains("directory"), "{}", refused.body);
    assert_eq!(snapshot(&store), before);
    assert_eq!(store.files("main"), vec!["a".to_string(), "d/e".to_string()]);
    // A name that only starts like a state is no conflict.
    expect(send(&app, "POST", "/state/a.b", &state(1, "a.b")).await, 200);
    expect(send(&app, "POST", "/state/dx/e", &state(1, "dx")).await, 200);
}

// ---------------------------------------------------------------------------------------
// Commits
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn commit_trailers() {
    let Env { store, app } = env();
    expect(send(&app, "LOCK", &state_uri(P), &lock_info("a")).await, 200);
    expect(send(&app, "POST", &with_id("a"), &state(7, "seven")).await, 200);
    let message = store.message(store.tip(MAIN).unwrap()).unwrap();
    assert!(message.starts_with(&format!("Update {P}\n\n")), "{message}");
    for trailer in [
        "Lock-ID: a\n",
        "Who: a@test\n",
        "Operation: OperationTypeApply\n",
        "Serial: 7\n",
        &format!("Lineage: {LINEAGE}\n"),
    ] {
        assert!(message.contains(trailer), "{trailer:?} missing in {message:?}");
    }
    let lock_message = store.message(store.tip(LOCK).unwrap()).unwrap();
    assert!(lock_message.contains("Lock-ID: a\n") && lock_message.contains("Who: a@test\n"), "{lock_message:?}");
    expect(send(&app, "UNLOCK", &state_uri(P), &lock_info("a")).await, 200);

    // Without a lock: no lock trailers, still serial and lineage.
    expect(send(&app, "POST", &state_uri(P), &state(8, "eight")).await, 200);
    let message = store.message(store.tip(MAIN).unwrap()).unwrap();
    assert!(message.contains("Serial: 8\n") && message.contains(&format!("Lineage: {LINEAGE}\n")), "{message:?}");
    assert!(!message.contains("Lock-ID") && !message.contains("Who:"), "{message:?}");
    // Every commit's parent is the tip it was built on.
    let history = store.history(MAIN);
    assert_eq!(history.len(), 2);
    assert_eq!(store.parent(history[0]), Some(history[1]));
}

// ---------------------------------------------------------------------------------------
// Races, contention, the git host, deadlines
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_lost_race_is_rebuilt_on_the_new_tip() {
    let Env { store, app } = env();
    expect(send(&app, "POST", &state_uri(P), &state(1, "one")).await, 200);
    let first = store.tip(MAIN).unwrap();
    // Another writer stores another state right before our push lands.
    let other = "envs/other/terraform.tfstate";
    store.move_branch_before_next_update("main", other, state(1, "theirs"));
    let updates = store.updates();
    expect(send(&app, "POST", &state_uri(P), &state(2, "two")).await, 200);
    assert_eq!(store.updates() - updates, 2, "one lost push, one rebuilt push");
    assert_eq!(stored(&store), Some(state(2, "two")), "ours landed");
    assert_eq!(store.file("main", other).unwrap(), state(1, "theirs").as_bytes(), "theirs survived");
    let history = store.history(MAIN);
    assert_eq!(history.len(), 3, "first, theirs, ours");
    assert_eq!(history[2], first);
    assert!(store.message(history[1]).unwrap().starts_with(&format!("Update {other}")));
    assert_eq!(store.parent(history[0]), Some(history[1]), "ours was rebuilt on their tip");

    // The same under a lock: the rebuilt push still carries the guard, and lands.
    expect(send(&app, "LOCK", &state_uri(P), &lock_info("a")).await, 200);
    store.move_branch_before_next_update("main", other, state(2, "theirs again"));
    let updates = store.updates();
    expect(send(&app, "POST", &with_id("a"), &state(3, "three")).await, 200);
    assert_eq!(store.updates() - updates, 2);
    assert_eq!(stored(&store), Some(state(3, "three")));
    assert_eq!(store.file("main", other).unwrap(), state(2, "theirs again").as_bytes());
    assert!(store.message(store.tip(MAIN).unwrap()).unwrap().contains("Lock-ID: a\n"));
}

#[tokio::test]
async fn a_write_lands_only_under_the_lock_held_when_the_branch_moves() {
    let Env { store, app } = env();
    expect(send(&app, "POST", &state_uri(P), &state(1, "one")).await, 200);
    expect(send(&app, "LOCK", &state_uri(P), &lock_info("a")).await, 200);
    // Right before our write lands, the lock changes hands (force-unlock and a new LOCK elsewhere).
    store.move_branch_before_next_update(LOCK, &format!("{P}.lock"), lock_info("b"));
    let main_before = store.tip(MAIN);
    let refused = expect(send(&app, "POST", &with_id("a"), &state(2, "two")).await, 423);
    assert_eq!(refused.body, lock_info("b"), "the new holder");
    assert_eq!(store.tip(MAIN), main_before, "nothing written");
    assert_eq!(stored(&store), Some(state(1, "one")));
    expect(send(&app, "UNLOCK", &state_uri(P), "").await, 200);

    // Without a lock: a lock that appears right before the push stops the write too.
    store.move_branch_before_next_update(LOCK, &format!("{P}.lock"), lock_info("c"));
    let refused = expect(send(&app, "POST", &state_uri(P), &state(2, "two")).await, 423);
    assert_eq!(refused.body, lock_info("c"));
    assert_eq!(store.tip(MAIN), main_before);
}

#[tokio::test]
async fn contention_gives_up_with_503_and_retry_after() {
    let Env { store, app } = env_with(|c| c.write_retries = 3);
    expect(send(&app, "POST", &state_uri(P), &state(1, "one")).await, 200);

    // One lost race: rebuilt and pushed again.
    store.reject_next_updates(1);
    let updates = store.updates();
    expect(send(&app, "POST", &state_uri(P), &state(2, "two")).await, 200);
    assert_eq!(store.updates() - updates, 2);

    // Another writer always wins: 503 + Retry-After after exactly write_retries attempts.
    store.reject_next_updates(100);
    let before = snapshot(&store);
    let updates = store.updates();
    let started = Instant::now();
    let refused = expect(send(&app, "POST", &state_uri(P), &state(3, "three")).await, 503);
    assert!(refused.retry_after, "{refused:?}");
    assert_eq!(store.updates() - updates, 3, "write_retries attempts");
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    assert_eq!(snapshot(&store), before);
    assert_eq!(stored(&store), Some(state(2, "two")), "the stored state is unchanged");

    // LOCK goes through the same loop; a create rejected again and again with no holder in
    // sight is what a nesting lock looks like, so it ends in a 409 rather than a retry.
    let refused = expect(send(&app, "LOCK", &state_uri(P), &lock_info("a")).await, 409);
    assert!(!refused.retry_after);
    assert_eq!(store.tip(LOCK), None, "no lock taken");
    store.reject_next_updates(0);
    expect(send(&app, "LOCK", &state_uri(P), &lock_info("a")).await, 200);
    let locked = snapshot(&store);
    store.reject_next_updates(100);
    assert!(expect(send(&app, "UNLOCK", &state_uri(P), &lock_info("a")).await, 503).retry_after);
    assert_eq!(snapshot(&store), locked, "the lock is still held");

    store.reject_next_updates(0);
    expect(send(&app, "POST", &with_id("a"), &state(3, "three")).await, 200);
    assert_eq!(stored(&store), Some(state(3, "three")));
}

#[tokio::test]
async fn host_unavailable_is_503_with_retry_after() {
    let store = Arc::new(MemoryStore::new());
    store.put("main", P, Some(state(1, "one").as_bytes()), "Update seed");
    let app = app_over(&store, |_| {});
    let before = snapshot(&store);
    store.fail_syncs_with(Some(|| StorageError::HostUnavailable("connection refused by secret-host".into())));
    store.fail_updates_with(Some(|| StorageError::HostUnavailable("connection refused by secret-host".into())));
    let cases = [
        ("GET", state_uri(P), String::new()),
        ("POST", state_uri(P), state(2, "two")),
        ("DELETE", state_uri(P), String::new()),
        ("LOCK", state_uri(P), lock_info("a")),
        ("UNLOCK", state_uri(P), lock_info("a")),
        ("UNLOCK", state_uri(P), String::new()),
        ("GET", format!("/lock/{P}"), String::new()),
    ];
    for (method, uri, body) in &cases {
        let refused = expect(send(&app, method, uri, body).await, 503);
        assert!(refused.retry_after, "{method} {uri}: {refused:?}");
        assert!(!refused.body.contains("secret-host"), "{method}: internal detail leaked: {}", refused.body);
    }
    assert_eq!(snapshot(&store), before);

    store.fail_syncs_with(None);
    store.fail_updates_with(None);
    expect(send(&app, "POST", &state_uri(P), &state(2, "two")).await, 200);
    assert_eq!(stored(&store), Some(state(2, "two")));
}

#[tokio::test]
async fn a_slow_host_is_cut_off_at_the_deadline() {
    let store = Arc::new(MemoryStore::new());
    store.put("main", P, Some(state(1, "one").as_bytes()), "Update seed");
    let app = app_over(&store, |_| {});
    let before = snapshot(&store);
    store.sync_delay(Duration::from_secs(10));
    let budget = Duration::from_millis(200);
    for (method, body) in [("POST", state(2, "two")), ("GET", String::new()), ("DELETE", String::new())] {
        let updates = store.updates();
        let started = Instant::now();
        let refused = expect(send_until(&app, method, &state_uri(P), &body, budget).await, 503);
        let took = started.elapsed();
        assert!(refused.retry_after, "{method}: {refused:?}");
        assert!(
            took >= Duration::from_millis(150) && took < Duration::from_secs(1),
            "{method} answered after {took:?}"
        );
        assert_eq!(store.updates(), updates, "{method}: nothing pushed");
    }
    assert_eq!(snapshot(&store), before);
    store.sync_delay(Duration::ZERO);
    expect(send(&app, "POST", &state_uri(P), &state(2, "two")).await, 200);
}

#[tokio::test]
async fn the_deadline_bounds_the_retries() {
    let Env { store, app } = env_with(|c| c.write_retries = 1000);
    expect(send(&app, "POST", &state_uri(P), &state(1, "one")).await, 200);
    let before = snapshot(&store);
    store.reject_next_updates(u32::MAX);
    let started = Instant::now();
    let refused =
        expect(send_until(&app, "POST", &state_uri(P), &state(2, "two"), Duration::from_millis(300)).await, 503);
    assert!(refused.retry_after);
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    assert!(store.updates() < 1000);
    assert_eq!(snapshot(&store), before);
}

// ---------------------------------------------------------------------------------------
// Locks whose names nest.
// ---------------------------------------------------------------------------------------

/// `locks/a` and `locks/a/b` cannot both exist as git refs, so while `a` is locked nobody
/// can lock `a/b` (nor `a` while `a/b` is locked). Git's receive-pack reports that as
/// "failed to update ref" (MemoryStore models it so): a rejected create with no holder in
/// sight, twice, is a 409 naming the state, not a race to retry until 503.
#[tokio::test]
async fn nested_lock_names_are_refused_not_retried() {
    let Env { store, app } = env_with(|c| c.write_retries = 3);
    expect(send(&app, "LOCK", "/state/a", &lock_info("x")).await, 200);
    let before = snapshot(&store);
    let a = send(&app, "LOCK", "/state/a/b", &lock_info("y")).await;
    assert_eq!(snapshot(&store), before);
    assert_eq!(a.status, 409, "LOCK a/b while a is locked: {a:?}");
    // And the other way round, on another branch's lock names too.
    expect(send(&app, "LOCK", "/state/c/d", &lock_info("z")).await, 200);
    let before = snapshot(&store);
    let c = send(&app, "LOCK", "/state/c", &lock_info("w")).await;
    assert_eq!(snapshot(&store), before);
    assert_eq!(c.status, 409, "LOCK c while c/d is locked: {c:?}");
    // Once the lock in the way is gone, the nested one is taken.
    expect(send(&app, "UNLOCK", "/state/a", &lock_info("x")).await, 200);
    expect(send(&app, "LOCK", "/state/a/b", &lock_info("y")).await, 200);
}
