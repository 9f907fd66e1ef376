//! Fail closed at the edges (issue 17): stored content that a POST would refuse is never
//! served as a state nor replaced without `force=true`, with and without encryption; a
//! history cursor that names no commit of the branch's history is a 404, never an empty
//! last page. Stored content through `App::handle` over the in-memory store (every form in
//! milliseconds); cursors through `gitstate serve` on a real git daemon, whose objects
//! include blobs and trees.

use std::sync::Arc;

use bytes::Bytes;
use gitstate::app::App;
use gitstate::auth::Auth;
use gitstate::backend::sealing::{Sealing, SealingSettings};
use gitstate::config::Config;
use gitstate::protocol::content_md5;
use gitstate_testkit::fixtures::{lock_info, state, state_with_lineage};
use gitstate_testkit::gitd::{git_out, GitDaemon};
use gitstate_testkit::memory::MemoryStore;
use gitstate_testkit::serve::{http, Serve, ServeOpts};

const P: &str = "envs/prod/terraform.tfstate";

fn app(store: &Arc<MemoryStore>, sealing: Sealing) -> Arc<App> {
    let config = Config::default();
    let auth = Auth::from_config(&config).expect("passthrough auth");
    Arc::new(App::new(config, auth, store.clone(), sealing))
}

/// An age key pair's sealing: every write encrypted, stored forms opened.
fn age_sealing() -> Sealing {
    use age::secrecy::ExposeSecret as _;
    let identity = age::x25519::Identity::generate();
    let settings = SealingSettings {
        age_recipients: vec![identity.to_public().to_string()],
        age_identities: Some(identity.to_string().expose_secret().to_string().into()),
        ..Default::default()
    };
    Sealing::new(&settings, None).expect("age settings")
}

async fn send(app: &Arc<App>, method: &str, uri: &str, body: &[u8]) -> (u16, String) {
    let mut b = http::Request::builder().method(method).uri(uri);
    if method == "POST" {
        b = b.header("Content-Md5", content_md5(body));
    }
    let r = app.handle(b.body(Bytes::copy_from_slice(body)).unwrap()).await;
    (r.status().as_u16(), String::from_utf8_lossy(r.body()).into_owned())
}

/// What can end up stored at a state's path that is no state: written by hand, by another
/// tool, truncated by a broken copy, or a sealed form whose header was damaged.
fn garbage() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("plain text", b"hello, this is not a state\n".to_vec()),
        ("truncated JSON", br#"{"version": 4, "serial": 3, "lineage": "L", "outputs": {"#.to_vec()),
        ("a JSON array", b"[1, 2, 3]\n".to_vec()),
        ("a JSON string", b"\"state\"".to_vec()),
        ("JSON with trailing garbage", br#"{"version":4,"serial":3,"lineage":"L"} trailing"#.to_vec()),
        ("invalid UTF-8 in a value", b"{\"version\":4,\"serial\":3,\"lineage\":\"L\",\"x\":\"\xff\"}".to_vec()),
        ("a mistyped serial", br#"{"version":4,"serial":"3","lineage":"L"}"#.to_vec()),
        (
            "an armored age file with a damaged header",
            b"-----BEGIN AGE ENCRYPTED FILX-----\nYWdlLWVuY3J5cHRpb24ub3JnL3YxCi0+IFgyNTUxOSB4\n-----END AGE ENCRYPTED FILE-----\n"
                .to_vec(),
        ),
    ]
}

#[tokio::test]
async fn stored_content_that_is_not_a_state_is_never_served_nor_replaced_without_force() {
    for encrypted in [false, true] {
        for (what, bad) in garbage() {
            let store = Arc::new(MemoryStore::new());
            let app = app(&store, if encrypted { age_sealing() } else { Sealing::clear() });
            let name = format!("{what} (encryption {encrypted})");
            // A good state first, served (and remembered as checked): what replaces it by hand
            // is checked anew.
            assert_eq!(send(&app, "POST", &format!("/state/{P}"), state(1, "good").as_bytes()).await.0, 200);
            assert_eq!(send(&app, "GET", &format!("/state/{P}"), b"").await.0, 200, "{name}");
            let commit = store.put("main", P, Some(&bad), &format!("Update {P}\n"));

            let (status, body) = send(&app, "GET", &format!("/state/{P}"), b"").await;
            assert_eq!(status, 500, "{name}: GET answered {body}");
            assert!(body.contains("not a Terraform state") && body.contains(P), "{name}: {body}");
            let (status, body) = send(&app, "GET", &format!("/state/{P}?version={commit}"), b"").await;
            assert_eq!(status, 500, "{name}: GET ?version= answered {body}");

            // A state of another lineage at serial 1, and one that looks newer: neither lands.
            for incoming in [state_with_lineage("other", 1, "x"), state_with_lineage("L", 99, "x")] {
                let (status, body) = send(&app, "POST", &format!("/state/{P}"), incoming.as_bytes()).await;
                assert_eq!(status, 409, "{name}: POST over it answered {body}");
                assert!(body.contains("force=true"), "{name}: {body}");
                assert_eq!(store.tip("main"), Some(commit), "{name}: the stored file was replaced");
            }
            // Under a lock too.
            assert_eq!(send(&app, "LOCK", &format!("/state/{P}"), lock_info("L1").as_bytes()).await.0, 200);
            let (status, _) = send(&app, "POST", &format!("/state/{P}?ID=L1"), state(1, "x").as_bytes()).await;
            assert_eq!(status, 409, "{name}: POST under a lock");
            assert_eq!(store.tip("main"), Some(commit), "{name}: replaced under a lock");

            // A deliberate overwrite replaces it, and the state is served again.
            let fresh = state(1, "fresh");
            let (status, body) = send(&app, "POST", &format!("/state/{P}?ID=L1&force=true"), fresh.as_bytes()).await;
            assert_eq!(status, 200, "{name}: POST ?force=true answered {body}");
            let (status, body) = send(&app, "GET", &format!("/state/{P}"), b"").await;
            assert_eq!((status, body.as_str()), (200, fresh.as_str()), "{name}");
            let stored = store.file("main", P).unwrap();
            assert_eq!(stored.starts_with(b"-----BEGIN AGE"), encrypted, "{name}: stored form");
        }
    }
}

/// A sealed form whose header is intact but whose body is damaged: never served, never
/// replaced by a plain write; `force=true` replaces it.
#[tokio::test]
async fn a_damaged_sealed_state_is_replaced_only_with_force() {
    let store = Arc::new(MemoryStore::new());
    let sealing = age_sealing();
    let app = app(&store, sealing);
    assert_eq!(send(&app, "POST", &format!("/state/{P}"), state(1, "a").as_bytes()).await.0, 200);
    let mut sealed = store.file("main", P).unwrap();
    let cut = sealed.len() / 2;
    sealed[cut] = if sealed[cut] == b'A' { b'B' } else { b'A' };
    let damaged = store.put("main", P, Some(&sealed), "damaged");
    assert_eq!(send(&app, "GET", &format!("/state/{P}"), b"").await.0, 500);
    let (status, _) = send(&app, "POST", &format!("/state/{P}"), state(2, "b").as_bytes()).await;
    assert!(status >= 400, "a plain write over a damaged state answered {status}");
    assert_eq!(store.tip("main"), Some(damaged));
    assert_eq!(send(&app, "POST", &format!("/state/{P}?force=true"), state(2, "b").as_bytes()).await.0, 200);
    assert_eq!(send(&app, "GET", &format!("/state/{P}"), b"").await, (200, state(2, "b")));
}

/// A KMS envelope this deployment cannot open (no KMS key configured), or one whose version
/// it does not read: never served, never replaced, with or without `force=true`.
#[tokio::test]
async fn a_sealed_form_this_deployment_cannot_open_is_never_served_nor_replaced() {
    for (what, envelope) in [
        (
            "no KMS configured",
            r#"{"gitstate_envelope":1,"algorithm":"AES-256-GCM","key_id":"arn:aws:kms:us-east-1:1:key/k","wrapped_key":"AAAA","nonce":"AAAA","ciphertext":"AAAA"}"#,
        ),
        (
            "an unknown envelope version",
            r#"{"gitstate_envelope":99,"algorithm":"AES-256-GCM","key_id":"k","wrapped_key":"AAAA","nonce":"AAAA","ciphertext":"AAAA"}"#,
        ),
    ] {
        for encrypted in [false, true] {
            let store = Arc::new(MemoryStore::new());
            let app = app(&store, if encrypted { age_sealing() } else { Sealing::clear() });
            let commit = store.put("main", P, Some(envelope.as_bytes()), "sealed elsewhere");
            let (status, body) = send(&app, "GET", &format!("/state/{P}"), b"").await;
            assert_eq!(status, 500, "{what} (encryption {encrypted}): GET answered {body}");
            for query in ["", "?force=true"] {
                let (status, body) = send(&app, "POST", &format!("/state/{P}{query}"), state(1, "x").as_bytes()).await;
                assert!(status >= 400, "{what} (encryption {encrypted}): POST{query} answered {status} {body}");
                assert_eq!(store.tip("main"), Some(commit), "{what} (encryption {encrypted}): replaced by POST{query}");
            }
        }
    }
}

/// `before` must name a commit of the branch's history: anything else is a 404 naming it.
#[test]
fn history_cursors_that_name_no_commit_of_the_history_are_404() {
    let daemon = GitDaemon::start();
    let url = daemon.create_repo("states.git");
    let serve = Serve::start(ServeOpts::new().repository(&url));
    for serial in 1..=3 {
        let got = http("POST", &serve.state_url(P), &[], Some(state(serial, &format!("v{serial}")).as_bytes()));
        assert_eq!(got.status, 200, "{}", got.text());
    }
    let other = http("POST", &format!("{}?ref=other", serve.state_url(P)), &[], Some(state(1, "o").as_bytes()));
    assert_eq!(other.status, 200);
    assert_eq!(http("LOCK", &serve.lock_url(P), &[], Some(lock_info("h").as_bytes())).status, 200);
    let repo = daemon.repo_dir("states.git");
    let rev = |r: &str| git_out(&repo, &["rev-parse", r]);
    let history = |before: &str| http("GET", &format!("{}/history/{P}?before={before}", serve.base_url()), &[], None);

    // A real cursor pages on.
    let first = history(&rev("main~1"));
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.json()["versions"].as_array().unwrap().len(), 1, "{}", first.text());

    for (what, id) in [
        ("a lock commit", rev(&format!("refs/heads/locks/{P}"))),
        ("another branch's commit", rev("other")),
        ("a blob", rev(&format!("main:{P}"))),
        ("a tree", rev("main^{tree}")),
        ("an id that exists nowhere", "1234567890abcdef1234567890abcdef12345678".to_string()),
    ] {
        let got = history(&id);
        assert_eq!(got.status, 404, "{what}: {} {}", got.status, got.text());
        assert!(got.text().contains(&id), "{what}: the answer does not name {id}: {}", got.text());
    }
    // On a branch that does not exist, any cursor names nothing.
    let got = http("GET", &format!("{}/history/{P}?ref=nothing&before={}", serve.base_url(), rev("main")), &[], None);
    assert_eq!(got.status, 404, "{}", got.text());
}

/// One bound on blocking work across repositories (`GITSTATE_MAX_BLOCKING`): while hundreds
/// of requests, each naming another allowed repository on a host that never answers, are
/// in flight or refused, requests on the configured repository answer within a second.
#[test]
fn hosts_that_hang_never_starve_the_configured_repository() {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    // A git host that accepts connections and never says a word.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in silent.incoming() {
            match conn {
                Ok(c) => held.push(c),
                Err(_) => break,
            }
        }
    });
    let daemon = GitDaemon::start();
    let url = daemon.create_repo("states.git");
    let serve = Serve::start(
        ServeOpts::new()
            .repository(&url)
            .env("GITSTATE_ALLOWED_REPOSITORIES", format!("http://127.0.0.1:{silent_port}/*"))
            .env("GITSTATE_REQUEST_TIMEOUT", "30"),
    );
    assert_eq!(http("POST", &serve.state_url(P), &[], Some(state(1, "home").as_bytes())).status, 200);

    // 400 requests on 400 repositories of the silent host, all at once.
    let addr = serve.addr();
    let statuses = Arc::new(std::sync::Mutex::new(Vec::new()));
    let senders: Vec<_> = (0..400)
        .map(|i| {
            let statuses = Arc::clone(&statuses);
            std::thread::spawn(move || {
                let Ok(mut s) = TcpStream::connect(addr) else { return };
                let _ = s.set_read_timeout(Some(Duration::from_secs(40)));
                let request = format!(
                    "GET /state/{P}?repository=http://127.0.0.1:{silent_port}/r{i}.git HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                );
                if s.write_all(request.as_bytes()).is_err() {
                    return;
                }
                let mut head = [0u8; 12];
                if s.read_exact(&mut head).is_ok() {
                    statuses.lock().unwrap_or_else(|p| p.into_inner()).push(String::from_utf8_lossy(&head[9..12]).to_string());
                }
            })
        })
        .collect();
    // Beyond the bound (64 by default) every request is refused at once, long before the
    // 30 s deadline of those held by the silent host.
    let started = Instant::now();
    let refused = || statuses.lock().unwrap_or_else(|p| p.into_inner()).iter().filter(|s| *s == "503").count();
    while refused() < 400 - 64 && started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(refused(), 400 - 64, "answers so far: {:?}", statuses.lock().unwrap());
    assert_eq!(statuses.lock().unwrap().len(), 400 - 64, "some were answered otherwise");

    for _ in 0..5 {
        let started = Instant::now();
        let got = http("GET", &serve.state_url(P), &[], None);
        let took = started.elapsed();
        assert_eq!(got.status, 200, "{}", got.text());
        assert!(took < Duration::from_secs(1), "a GET on the configured repository took {took:?}");
        let got = http("LOCK", &serve.lock_url(P), &[], Some(lock_info("starved?").as_bytes()));
        assert_eq!(got.status, 200, "{}", got.text());
        assert_eq!(http("UNLOCK", &serve.lock_url(P), &[], Some(b"")).status, 200);
    }
    drop(serve);
    for s in senders {
        let _ = s.join();
    }
}
