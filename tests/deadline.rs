//! Request deadlines (issue 9 §2, DESIGN.md §5): a git host that accepts connections but
//! never answers (the testkit's `StallProxy` in front of a real `git daemon` or lighttpd +
//! `git http-backend`) must not hold a request past its deadline. gitstate answers 503 with
//! `Retry-After` at most ~0.5 s after the deadline, leaves the server repository exactly as
//! it was, and serves again as soon as the host does.
//!
//! - under `gitstate serve` the deadline is `GITSTATE_REQUEST_TIMEOUT` (2 s here), over
//!   git:// and over smart HTTP;
//! - a stalled repository does not slow down another one served by the same process;
//! - under the Lambda emulator (`cargo lambda watch`) the function answers 503 itself,
//!   before the emulator's own invocation timeout (6 s here) turns the call into a 408.
//!
//! Measured answer times are printed (`cargo test --test deadline -- --nocapture`).

use std::net::SocketAddr;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine as _;
use gitstate::testkit::fixtures::{fsck_clean, lock_info, state};
use gitstate::testkit::gitd::{git_out, git_try, GitDaemon};
use gitstate::testkit::httpd::{GitHttpServer, DEFAULT_PASSWORD, DEFAULT_USER};
use gitstate::testkit::lambda::Emulator;
use gitstate::testkit::serve::{http, HttpResponse, Serve, ServeOpts};
use gitstate::testkit::stall::StallProxy;
use serde_json::Value;

const STATE: &str = "envs/deadline/terraform.tfstate";

/// `GITSTATE_REQUEST_TIMEOUT` of the `serve` tests that time single requests.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// What an answer may take beyond the deadline: the App's 0.5 s grace plus room for a
/// loaded test machine.
const SLACK: Duration = Duration::from_millis(1500);

/// The Lambda emulator's invocation timeout (`[watch] timeout` of cargo-lambda's config).
const LAMBDA_TIMEOUT_SECS: u64 = 6;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// The proxy's address for a server on `port`.
fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Percent-encode everything but RFC 3986's unreserved characters (a query value).
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

/// One request, timed.
fn timed(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> (HttpResponse, Duration) {
    let started = Instant::now();
    let resp = http(method, url, headers, body);
    (resp, started.elapsed())
}

/// `resp` is gitstate's "try again" answer and came within `bound`.
#[track_caller]
fn assert_retry_within(what: &str, resp: &HttpResponse, elapsed: Duration, bound: Duration) {
    assert_eq!(resp.status, 503, "{what}: expected 503 from a stalled git host, got {}: {}", resp.status, resp.text());
    assert!(resp.header("Retry-After").is_some(), "{what}: 503 without Retry-After: {:?}", resp.headers);
    assert!(elapsed <= bound, "{what}: answered after {elapsed:?}, more than {bound:?}");
}

/// What the test compares before and after: every ref of the server repository and the
/// state file on `main` (None when there is none).
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    refs: String,
    state: Option<String>,
}

fn snapshot(repo: &Path) -> Snapshot {
    let refs = git_out(repo, &["for-each-ref", "--format=%(objectname) %(refname)"]);
    let out = git_try(repo, &["show", &format!("refs/heads/main:{STATE}")]);
    let state = out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned());
    Snapshot { refs, state }
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

/// The scenario shared by the git:// and the smart-HTTP test: `serve` runs on a repository
/// reached through `proxy`, whose server-side directory is `repo`; `auth` goes with every
/// request to `serve`.
fn stall_scenario(label: &str, serve: &mut Serve, proxy: &StallProxy, repo: &Path, auth: &[(&str, &str)]) {
    let json_headers: Vec<(&str, &str)> = auth.iter().copied().chain([("Content-Type", "application/json")]).collect();
    let url = serve.state_url(STATE);

    // Forwarding: a whole locked write, so that the repository has a state and a history.
    let lock1 = lock_info("aaaaaaaa-0000-4000-8000-000000000001");
    let got = http("LOCK", &url, &json_headers, Some(lock1.as_bytes()));
    assert_eq!(got.status, 200, "{label}: LOCK while forwarding: {}", got.text());
    let first = state(1, "one");
    let got =
        http("POST", &format!("{url}?ID=aaaaaaaa-0000-4000-8000-000000000001"), &json_headers, Some(first.as_bytes()));
    assert_eq!(got.status, 200, "{label}: POST while forwarding: {}", got.text());
    let got = http("UNLOCK", &url, &json_headers, Some(lock1.as_bytes()));
    assert_eq!(got.status, 200, "{label}: UNLOCK while forwarding: {}", got.text());

    let before = snapshot(repo);
    let stored = before.state.clone().unwrap_or_else(|| panic!("{label}: no {STATE} on main after the write"));
    assert_eq!(json(&stored), json(&first), "{label}: stored state");
    assert!(!before.refs.contains("refs/heads/locks/"), "{label}: lock left behind: {}", before.refs);
    fsck_clean(repo);

    // Stalled: every operation answers 503 + Retry-After by the deadline.
    proxy.stall();
    let connections = proxy.connections();
    let bound = REQUEST_TIMEOUT + SLACK;
    let lock2 = lock_info("bbbbbbbb-0000-4000-8000-000000000002");
    let second = state(2, "two");
    let attempts: [(&str, String, Option<&[u8]>); 3] = [
        ("LOCK", url.clone(), Some(lock2.as_bytes())),
        ("GET", url.clone(), None),
        ("POST", url.clone(), Some(second.as_bytes())),
    ];
    for (method, target, body) in attempts {
        let (got, elapsed) = timed(method, &target, &json_headers, body);
        println!(
            "{label}: {method} with the git host stalled: {} after {} ms (deadline {} ms)",
            got.status,
            elapsed.as_millis(),
            REQUEST_TIMEOUT.as_millis()
        );
        assert_retry_within(&format!("{label}: {method}"), &got, elapsed, bound);
        serve.assert_running();
    }
    assert!(
        proxy.connections() > connections,
        "{label}: no request reached the stalled proxy ({} connections before and after): the 503s were not about the git host",
        connections
    );

    // Nothing half-written.
    assert_eq!(snapshot(repo), before, "{label}: the server repository changed while the git host stalled");
    fsck_clean(repo);

    // Forwarding again: the process is not wedged and serves the stored state.
    proxy.forward();
    let (got, elapsed) = timed("GET", &url, auth, None);
    println!("{label}: GET after forward(): {} after {} ms", got.status, elapsed.as_millis());
    assert_eq!(got.status, 200, "{label}: GET once the host answers again: {}", got.text());
    assert_eq!(json(&got.text()), json(&stored), "{label}: GET after the stall");
    assert_eq!(snapshot(repo), before, "{label}: the server repository changed");
    report_overruns(label, &serve.stderr_log());
}

/// Print the server's log lines saying that an answer went out without the git work, which
/// overran its deadline (its sockets should have timed out at the deadline).
fn report_overruns(label: &str, log: &str) {
    for line in log.lines().filter(|l| l.contains("git work still running")) {
        println!("{label}: server log: {line}");
    }
}

// ---------------------------------------------------------------------------
// serve
// ---------------------------------------------------------------------------

/// git:// through a stalling proxy: LOCK, GET and POST each answer 503 + Retry-After
/// within `GITSTATE_REQUEST_TIMEOUT` + slack, refs and state unchanged; then it serves again.
#[test]
fn serve_answers_503_when_the_git_daemon_stalls() {
    let daemon = GitDaemon::start();
    daemon.create_repo("states.git");
    let proxy = StallProxy::start(loopback(daemon.port()));
    let url = format!("git://127.0.0.1:{}/states.git", proxy.port());
    let mut serve = Serve::start(
        ServeOpts::new().repository(url).env("GITSTATE_REQUEST_TIMEOUT", REQUEST_TIMEOUT.as_secs().to_string()),
    );
    stall_scenario("git://", &mut serve, &proxy, &daemon.repo_dir("states.git"), &[]);
}

/// The same over smart HTTP: lighttpd + `git http-backend` with basic auth behind the
/// stalling proxy; Terraform's credentials are handed through to the git host.
#[test]
fn serve_answers_503_when_the_http_git_host_stalls() {
    let httpd = GitHttpServer::start();
    httpd.create_repo("states.git");
    let proxy = StallProxy::start(loopback(httpd.port()));
    let url = format!("http://127.0.0.1:{}/git/states.git", proxy.port());
    let mut serve = Serve::start(
        ServeOpts::new()
            .repository(url)
            .env("GITSTATE_AUTH", "passthrough")
            .env("GITSTATE_REQUEST_TIMEOUT", REQUEST_TIMEOUT.as_secs().to_string()),
    );
    let auth = basic(DEFAULT_USER, DEFAULT_PASSWORD);
    stall_scenario("smart HTTP", &mut serve, &proxy, &httpd.repo_dir("states.git"), &[("Authorization", &auth)]);
}

/// One process, two allowed repositories on the same daemon, one of them reached through
/// the stalling proxy: while 8 GETs hang on the stalled one, a GET of the healthy one
/// answers in under a second; then the 8 come back 503 by their deadline.
#[test]
fn a_healthy_repository_stays_fast_while_another_stalls() {
    const TIMEOUT: Duration = Duration::from_secs(4);
    const STALLED_GETS: usize = 8;
    let daemon = GitDaemon::start();
    daemon.create_repo("stalled.git");
    let healthy_url = daemon.create_repo("healthy.git");
    let proxy = StallProxy::start(loopback(daemon.port()));
    let stalled_url = format!("git://127.0.0.1:{}/stalled.git", proxy.port());
    let allowed = format!("git://127.0.0.1:{}/*,git://127.0.0.1:{}/*", proxy.port(), daemon.port());
    let mut serve = Serve::start(
        ServeOpts::new()
            .env("GITSTATE_ALLOWED_REPOSITORIES", allowed)
            .env("GITSTATE_REQUEST_TIMEOUT", TIMEOUT.as_secs().to_string()),
    );
    let stalled = format!("{}?repository={}", serve.state_url(STATE), url_encode(&stalled_url));
    let healthy = format!("{}?repository={}", serve.state_url(STATE), url_encode(&healthy_url));
    let json_headers = [("Content-Type", "application/json")];

    // Both answer while the proxy forwards; each gets a state (and a warm cache).
    for (name, target, value) in [("stalled", &stalled, "s"), ("healthy", &healthy, "h")] {
        let got = http("POST", target, &json_headers, Some(state(1, value).as_bytes()));
        assert_eq!(got.status, 200, "POST to the {name} repository while forwarding: {}", got.text());
        let got = http("GET", target, &[], None);
        assert_eq!(got.status, 200, "GET of the {name} repository while forwarding: {}", got.text());
        assert_eq!(json(&got.text())["outputs"]["x"]["value"], value);
    }
    let stalled_before = snapshot(&daemon.repo_dir("stalled.git"));

    proxy.stall();
    let connections = proxy.connections();
    let hanging: Vec<JoinHandle<(HttpResponse, Duration)>> = (0..STALLED_GETS)
        .map(|_| {
            let target = stalled.clone();
            std::thread::spawn(move || timed("GET", &target, &[], None))
        })
        .collect();
    // Until the stalled requests reach the proxy (at least one: fetches of one repository may queue).
    let waited = Instant::now();
    while proxy.connections() == connections {
        assert!(waited.elapsed() < Duration::from_secs(3), "no stalled GET reached the proxy within 3 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));

    let (got, elapsed) = timed("GET", &healthy, &[], None);
    let still_hanging = hanging.iter().filter(|h| !h.is_finished()).count();
    println!(
        "healthy GET while {still_hanging} of {STALLED_GETS} GETs of the stalled repository hung: {} after {} ms",
        got.status,
        elapsed.as_millis()
    );
    assert!(matches!(got.status, 200 | 204), "GET of the healthy repository: {} {}", got.status, got.text());
    assert_eq!(json(&got.text())["outputs"]["x"]["value"], "h");
    assert!(elapsed < Duration::from_secs(1), "the healthy repository took {elapsed:?} while another one stalled");
    assert_eq!(
        still_hanging, STALLED_GETS,
        "the healthy GET was not measured while every stalled GET still hung (it must run in parallel with them)"
    );

    let bound = TIMEOUT + SLACK;
    let mut times = Vec::new();
    for (i, h) in hanging.into_iter().enumerate() {
        let (got, elapsed) = h.join().expect("a stalled GET's thread panicked");
        assert_retry_within(&format!("stalled GET #{i}"), &got, elapsed, bound);
        times.push(elapsed.as_millis());
    }
    println!("stalled GETs (deadline {} ms) answered 503 after {times:?} ms", TIMEOUT.as_millis());
    serve.assert_running();
    assert_eq!(snapshot(&daemon.repo_dir("stalled.git")), stalled_before, "the stalled repository changed");

    // And the stalled one serves again once its host answers.
    proxy.forward();
    let got = http("GET", &stalled, &[], None);
    assert_eq!(got.status, 200, "GET of the formerly stalled repository: {}", got.text());
    assert_eq!(json(&got.text())["outputs"]["x"]["value"], "s");
}

// ---------------------------------------------------------------------------
// Lambda
// ---------------------------------------------------------------------------

/// Under `cargo lambda watch` with an invocation timeout of 6 s (cargo-lambda's
/// `[watch] timeout`, read from the file named by `CARGO_LAMBDA_GLOBAL`): with the git host
/// stalled, the function itself answers 503 + Retry-After, sooner than the emulator's
/// timeout, which would answer an empty 408.
///
/// cargo-lambda 1.9 hands every invocation the constant `Lambda-Runtime-Deadline-Ms: 600000`
/// (an instant in 1970), so the function's deadline is its floor, not the emulator's 6 s;
/// this test checks the answer and its bound, whatever the deadline the function derived.
#[test]
fn lambda_invocation_returns_503_before_the_function_times_out() {
    let daemon = GitDaemon::start();
    daemon.create_repo("states.git");
    let repo = daemon.repo_dir("states.git");
    let proxy = StallProxy::start(loopback(daemon.port()));
    let url = format!("git://127.0.0.1:{}/states.git", proxy.port());

    let config = tempfile::tempdir().unwrap();
    let config_file = config.path().join("CargoLambda.toml");
    std::fs::write(&config_file, format!("[watch]\ntimeout = {LAMBDA_TIMEOUT_SECS}\n")).unwrap();
    let config_file = config_file.display().to_string();
    let emu = Emulator::start(&[("GITSTATE_REPOSITORY", url.as_str()), ("CARGO_LAMBDA_GLOBAL", config_file.as_str())]);

    let before = snapshot(&repo);
    proxy.stall();
    let connections = proxy.connections();
    let timeout = Duration::from_secs(LAMBDA_TIMEOUT_SECS);
    for (method, body) in [("GET", None), ("LOCK", Some(lock_info("cccccccc-0000-4000-8000-000000000003")))] {
        let (got, elapsed) = timed(
            method,
            &emu.state_url(STATE),
            &[("Content-Type", "application/json")],
            body.as_deref().map(str::as_bytes),
        );
        println!(
            "Lambda: {method} with the git host stalled: {} after {} ms (emulator timeout {} ms)",
            got.status,
            elapsed.as_millis(),
            timeout.as_millis()
        );
        assert_ne!(
            got.status, 408,
            "Lambda {method}: the emulator timed the invocation out: the function did not answer"
        );
        assert_eq!(got.status, 503, "Lambda {method}: expected the function's 503, got {}: {}", got.status, got.text());
        assert!(got.header("Retry-After").is_some(), "Lambda {method}: 503 without Retry-After: {:?}", got.headers);
        assert!(elapsed < timeout, "Lambda {method}: answered after {elapsed:?}, not before the {timeout:?} timeout");
    }
    assert!(proxy.connections() > connections, "no invocation reached the stalled git host");
    assert_eq!(snapshot(&repo), before, "the server repository changed while the git host stalled");
    proxy.forward();
    for i in 0..3 {
        let (got, elapsed) = timed("GET", &emu.state_url(STATE), &[], None);
        println!("PROBE Lambda GET #{i} forwarded: {} after {} ms: {}", got.status, elapsed.as_millis(), got.text());
    }
    let (got, elapsed) =
        timed("POST", &emu.state_url(STATE), &[("Content-Type", "application/json")], Some(state(1, "l").as_bytes()));
    println!("PROBE Lambda POST forwarded: {} after {} ms: {}", got.status, elapsed.as_millis(), got.text());
}
