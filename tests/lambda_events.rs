//! Every event in `events/` (API Gateway REST v1 with stage `prod`, HTTP API
//! v2, function URL) parsed by `lambda_http`'s own request parser and run
//! through the Lambda entry (`gitstate::lambda::handle_event`, hence
//! `App::handle`) against a real `git daemon`, in the order a Terraform run
//! would send them, checking each answer and its effect on the repository.
//!
//! The events of one source form one sequence on the state
//! `envs/prod/terraform.tfstate`: lock A (LOCK), write under A, read, a
//! rejected request, lock B refused (POST /lock), unlock A, lock B, force-unlock
//! (empty body), delete, read. Every file in `events/` belongs to exactly one step.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use gitstate::app::App;
use gitstate::config::Config;
use gitstate_testkit::fixtures::fsck_clean;
use gitstate_testkit::gitd::{git_out, git_try, rev_parse, GitDaemon};
use lambda_http::request::RequestContext;
use lambda_http::{Body, RequestExt};
use md5::{Digest, Md5};
use serde_json::Value;
use tempfile::TempDir;

const STATE_PATH: &str = "envs/prod/terraform.tfstate";
const LOCK_REF: &str = "refs/heads/locks/envs/prod/terraform.tfstate";
/// The lock IDs of `*-lock.json` / `*-update.json` / `*-unlock.json` and of `*-lock-post.json`.
const LOCK_A: &str = "2b6a8a5e-7c1d-4f3b-9e0a-5d4c3b2a1f00";
const LOCK_B: &str = "9f8e7d6c-5b4a-4392-8172-6f5e4d3c2b1a";

const SOURCES: [&str; 3] = ["v1", "v2", "url"];
/// The events of each source, `events/<source>-<name>.json`.
const NAMES: [&str; 8] = ["get", "lock", "update", "rejected", "lock-post", "unlock", "force-unlock", "delete"];

fn events_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("events")
}

fn event_text(file: &str) -> String {
    let path = events_dir().join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// A `git daemon` with an empty `states.git`, and an App on it with its own cache.
struct Fixture {
    daemon: GitDaemon,
    app: Arc<App>,
    _cache: TempDir,
}

impl Fixture {
    fn new() -> Self {
        let daemon = GitDaemon::start();
        let url = daemon.create_repo("states.git");
        let cache = tempfile::Builder::new().prefix("gitstate-lambda-cache-").tempdir().unwrap();
        let config = Config {
            repository: Some(gitstate::storage::RepoUrl::parse(&url).unwrap()),
            cache_dir: cache.path().to_path_buf(),
            ..Config::default()
        };
        let app = Arc::new(App::open(config).expect("open the git daemon's repository"));
        Fixture { daemon, app, _cache: cache }
    }

    fn repo(&self) -> PathBuf {
        self.daemon.repo_dir("states.git")
    }

    /// Every ref of the server repository with its id.
    fn refs(&self) -> String {
        git_out(&self.repo(), &["for-each-ref", "--format=%(refname) %(objectname)"])
    }

    /// The file `path` on `rev`, byte for byte, or `None`.
    fn show(&self, rev: &str, path: &str) -> Option<Vec<u8>> {
        let out = git_try(&self.repo(), &["show", &format!("{rev}:{path}")]);
        out.status.success().then_some(out.stdout)
    }

    fn lock_holder(&self) -> Option<Value> {
        rev_parse(&self.repo(), LOCK_REF)?;
        let info = self
            .show(LOCK_REF, &format!("{STATE_PATH}.lock"))
            .unwrap_or_else(|| panic!("{LOCK_REF} has no {STATE_PATH}.lock"));
        Some(serde_json::from_slice(&info).expect("the lock file is LockInfo JSON"))
    }

    fn main_commits(&self) -> Vec<String> {
        if rev_parse(&self.repo(), "refs/heads/main").is_none() {
            return Vec::new();
        }
        git_out(&self.repo(), &["rev-list", "main"]).lines().map(str::to_string).collect()
    }

    /// Parse `text` with lambda_http and run it through the Lambda entry.
    async fn send_text(&self, label: &str, source: &str, text: &str) -> Reply {
        let request =
            lambda_http::request::from_str(text).unwrap_or_else(|e| panic!("lambda_http does not parse {label}: {e}"));
        check_origin(label, source, &request);
        let response = gitstate::lambda::handle_event(&self.app, request).await;
        let (parts, body) = response.into_parts();
        let body = match body {
            Body::Empty => Vec::new(),
            Body::Text(t) => t.into_bytes(),
            Body::Binary(b) => b,
            _ => panic!("{label}: unexpected body variant"),
        };
        Reply { label: label.to_string(), status: parts.status.as_u16(), headers: parts.headers, body }
    }

    async fn send(&self, source: &str, name: &str) -> Reply {
        let file = format!("{source}-{name}.json");
        self.send_text(&file, source, &event_text(&file)).await
    }
}

struct Reply {
    label: String,
    status: u16,
    headers: http::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    #[track_caller]
    fn expect(&self, status: u16) -> &Self {
        assert_eq!(self.status, status, "{}: status; body: {}", self.label, String::from_utf8_lossy(&self.body));
        self
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// lambda_http sees each file as the event source it claims to be, and the
/// REST v1 stage is where API Gateway puts it.
fn check_origin(label: &str, source: &str, request: &lambda_http::Request) {
    match (source, request.request_context_ref()) {
        ("v1", Some(RequestContext::ApiGatewayV1(ctx))) => {
            assert_eq!(ctx.stage.as_deref(), Some("prod"), "{label}: stage");
            assert!(request.uri().path().starts_with("/prod/"), "{label}: uri {}", request.uri());
            assert!(!request.raw_http_path().starts_with("/prod/"), "{label}: raw path {}", request.raw_http_path());
        }
        ("v2", Some(RequestContext::ApiGatewayV2(ctx))) => {
            assert!(
                ctx.domain_name.as_deref().is_some_and(|d| d.contains(".execute-api.")),
                "{label}: domain {:?}",
                ctx.domain_name
            );
        }
        ("url", Some(RequestContext::ApiGatewayV2(ctx))) => {
            assert!(
                ctx.domain_name.as_deref().is_some_and(|d| d.contains(".lambda-url.")),
                "{label}: domain {:?}",
                ctx.domain_name
            );
            assert_eq!(ctx.route_key.as_deref(), Some("$default"), "{label}: routeKey");
        }
        (_, other) => panic!("{label}: lambda_http parsed it as {other:?}"),
    }
}

/// The body and headers an event file carries (base64-decoded if flagged).
fn event_body(file: &str) -> (Vec<u8>, Value) {
    let event: Value = serde_json::from_str(&event_text(file)).unwrap();
    let body = match event["body"].as_str() {
        None => Vec::new(),
        Some(b) if event["isBase64Encoded"] == true => base64::engine::general_purpose::STANDARD.decode(b).unwrap(),
        Some(b) => b.as_bytes().to_vec(),
    };
    (body, event)
}

fn header_of(event: &Value, name: &str) -> Option<String> {
    let headers = event["headers"].as_object()?;
    headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).and_then(|(_, v)| v.as_str().map(str::to_string))
}

/// One source's sequence, step by step, against a fresh repository.
async fn replay(source: &str) {
    let f = Fixture::new();
    let repo = f.repo();

    // 1. Nothing stored yet: 204.
    let r = f.send(source, "get").await;
    r.expect(204);
    assert!(r.body.is_empty(), "{}: body", r.label);
    assert_eq!(f.refs(), "", "a read created refs");

    // 2. Terraform's LOCK on the state address: the branch locks/<path> holds the LockInfo.
    f.send(source, "lock").await.expect(200);
    let holder = f.lock_holder().expect("no lock branch after LOCK");
    assert_eq!(holder["ID"], LOCK_A);
    assert_eq!(holder["Who"], "alice@workstation");

    // 3. The write under lock A: one commit on main with exactly the body.
    let update = format!("{source}-update.json");
    let (body, event) = event_body(&update);
    let md5 = header_of(&event, "content-md5").expect("the update event has a Content-MD5 header");
    assert_eq!(md5, base64::engine::general_purpose::STANDARD.encode(Md5::digest(&body)), "{update}: Content-MD5");
    assert!(event["rawQueryString"].as_str().unwrap_or("ID=").contains("ID="), "{update}: ?ID=");
    f.send(source, "update").await.expect(200);
    assert_eq!(f.show("main", STATE_PATH).as_deref(), Some(&body[..]), "main:{STATE_PATH} after the update");
    let commits = f.main_commits();
    assert_eq!(commits.len(), 1, "commits on main after one update");
    let message = git_out(&repo, &["log", "-1", "--format=%B", "main"]);
    assert!(message.starts_with(&format!("Update {STATE_PATH}")), "commit message:\n{message}");
    assert!(message.contains(&format!("Lock-ID: {LOCK_A}")), "commit message:\n{message}");
    assert!(message.contains("Serial: 1"), "commit message:\n{message}");

    // 4. Read it back: the same bytes, with their Content-MD5.
    let r = f.send(source, "get").await;
    r.expect(200);
    assert_eq!(r.body, body, "{}: body", r.label);
    assert_eq!(r.header("content-md5"), Some(md5.as_str()), "{}: Content-MD5", r.label);
    assert_eq!(r.header("content-type"), Some("application/json"), "{}: Content-Type", r.label);

    // 4b. The same write again with a base64 body (isBase64Encoded, as API Gateway
    // sends binary media types): the same bytes arrive, nothing new to commit.
    let mut event_b64 = event.clone();
    event_b64["body"] = Value::String(base64::engine::general_purpose::STANDARD.encode(&body));
    event_b64["isBase64Encoded"] = Value::Bool(true);
    let r = f.send_text(&format!("{update} (base64 body)"), source, &event_b64.to_string()).await;
    r.expect(200);
    assert_eq!(f.main_commits(), commits, "a repeated write made a commit");

    // 5. A rejected request changes nothing.
    let before = f.refs();
    let r = f.send(source, "rejected").await;
    r.expect(400);
    let reason = String::from_utf8_lossy(&r.body).to_string();
    assert!(!reason.trim().is_empty(), "{}: a 400 says why", r.label);
    assert_eq!(f.refs(), before, "{}: changed the repository", r.label);
    assert_eq!(f.show("main", STATE_PATH).as_deref(), Some(&body[..]));

    // 6. Lock B (POST /lock) while A holds it: 423 with A's LockInfo.
    let r = f.send(source, "lock-post").await;
    r.expect(423);
    let shown: Value = serde_json::from_slice(&r.body).expect("the 423 body is the holder's LockInfo");
    assert_eq!(shown["ID"], LOCK_A, "{}: holder", r.label);
    assert_eq!(f.refs(), before, "a refused lock changed the repository");

    // 7. A releases: the branch is gone. Again (a retry after a lost answer): still 200.
    f.send(source, "unlock").await.expect(200);
    assert!(f.lock_holder().is_none(), "lock branch left after UNLOCK");
    f.send(source, "unlock").await.expect(200);

    // 8. Now B gets it.
    f.send(source, "lock-post").await.expect(200);
    assert_eq!(f.lock_holder().expect("no lock branch after POST /lock")["ID"], LOCK_B);

    // 9. force-unlock: no body at all.
    let (force_body, _) = event_body(&format!("{source}-force-unlock.json"));
    assert!(force_body.is_empty(), "the force-unlock event carries a body");
    f.send(source, "force-unlock").await.expect(200);
    assert!(f.lock_holder().is_none(), "lock branch left after force-unlock");

    // 10. Delete: a commit `Delete <path>` on top, the file gone.
    f.send(source, "delete").await.expect(200);
    assert_eq!(f.show("main", STATE_PATH), None, "main:{STATE_PATH} after delete");
    let after = f.main_commits();
    assert_eq!(after.len(), 2, "commits on main after update and delete");
    assert_eq!(after[1], commits[0], "the delete is built on the update");
    let subject = git_out(&repo, &["log", "-1", "--format=%s", "main"]);
    assert_eq!(subject, format!("Delete {STATE_PATH}"));

    // 11. Nothing stored again.
    f.send(source, "get").await.expect(204);

    // The server's repository is sound and no lock is left.
    fsck_clean(&repo);
    assert_eq!(git_out(&repo, &["for-each-ref", "refs/heads/locks/"]), "", "lock branches left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_api_v1_events() {
    replay("v1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_api_v2_events() {
    replay("v2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_url_events() {
    replay("url").await;
}

/// The replayed sequences use every file in `events/`, and every file is valid JSON.
#[test]
fn every_event_file_is_replayed() {
    let on_disk: BTreeSet<String> = std::fs::read_dir(events_dir())
        .expect("read events/")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let replayed: BTreeSet<String> =
        SOURCES.iter().flat_map(|s| NAMES.iter().map(move |n| format!("{s}-{n}.json"))).collect();
    let orphans: Vec<_> = on_disk.difference(&replayed).collect();
    let missing: Vec<_> = replayed.difference(&on_disk).collect();
    assert!(orphans.is_empty(), "files in events/ that no test replays: {orphans:?}");
    assert!(missing.is_empty(), "events the tests replay but events/ lacks: {missing:?}");
    for file in &on_disk {
        let v: Value = serde_json::from_str(&event_text(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        // All events are about the one state path (the rejected ones try to escape it).
        let text = v.to_string();
        assert!(text.contains(STATE_PATH) || file.ends_with("-rejected.json"), "{file} is not about {STATE_PATH}");
    }
}
