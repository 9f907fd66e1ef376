//! Request deadlines (issue 9 §2, DESIGN.md §5): a git host that accepts connections but
//! never answers (the testkit's `StallProxy` in front of a real `git daemon` or lighttpd +
//! `git http-backend`) must not hold a request past its deadline. gitstate answers 503 with
//! `Retry-After` at most ~0.5 s after the deadline, leaves the server repository exactly as
//! it was, and serves again as soon as the host does.
//!
//! - under `gitstate serve` the deadline is `GITSTATE_REQUEST_TIMEOUT` (2 s here), over
//!   git:// and over smart HTTP;
//! - a stalled repository does not slow down another one served by the same process;
//! - under the Lambda emulator the function answers 503 itself, before a 6 s function
//!   timeout: with a real invocation deadline (now + 6 s, stamped by a shim between the
//!   function and the emulator's runtime API, since `cargo lambda watch` cannot set one) at
//!   that deadline less 1.5 s; and under plain `cargo lambda watch` before its own 6 s
//!   invocation timeout turns the call into a 408.
//!
//! Measured answer times are printed (`cargo test --test deadline -- --nocapture`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use gitstate_testkit::fixtures::{fsck_clean, lock_info, state};
use gitstate_testkit::gitd::{free_port, git_out, git_try, signal_group, wait_until_listening, GitDaemon};
use gitstate_testkit::httpd::{GitHttpServer, DEFAULT_PASSWORD, DEFAULT_USER};
use gitstate_testkit::lambda::{cargo_lambda_bin, Emulator};
use gitstate_testkit::repo_root;
use gitstate_testkit::serve::{http, path_without_git, server_bin, HttpResponse, Serve, ServeOpts};
use gitstate_testkit::stall::StallProxy;
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

/// The function timeout of the Lambda tests.
const LAMBDA_TIMEOUT: Duration = Duration::from_secs(LAMBDA_TIMEOUT_SECS);

/// gitstate's margin under Lambda: its deadline is the invocation's less this.
const LAMBDA_MARGIN: Duration = Duration::from_millis(1500);

/// The emulator's invocation timeout, as cargo-lambda reads it from the file that
/// `CARGO_LAMBDA_GLOBAL` names (the same as `cargo lambda watch --timeout N`): when it
/// passes, the emulator answers an empty 408.
fn cargo_lambda_config(dir: &Path) -> String {
    let file = dir.join("CargoLambda.toml");
    std::fs::write(&file, format!("[watch]\ntimeout = {LAMBDA_TIMEOUT_SECS}\n")).unwrap();
    file.display().to_string()
}

/// A Lambda function whose git host stalls answers GET and LOCK with its own 503 +
/// Retry-After, before the function timeout (6 s).
///
/// `cargo lambda watch` (1.9) cannot be given a function timeout: every invocation it hands
/// out carries the constant `Lambda-Runtime-Deadline-Ms: 600000`, an instant in 1970 (its
/// `--timeout`/`[watch] timeout` only bounds how long the emulator waits before answering
/// 408). So this test runs the emulator's runtime API and function-URL front
/// (`--only-lambda-apis`, invocation timeout 6 s), starts the gitstate binary itself, and
/// puts [`DeadlineShim`] between the two: it stamps every invocation with
/// `Lambda-Runtime-Deadline-Ms` = now + 6 s, as Lambda does for a 6 s function. gitstate
/// must then answer at its own deadline (6 s - 1.5 s, plus at most its 0.5 s grace).
#[test]
fn lambda_invocation_returns_503_before_the_function_times_out() {
    let daemon = GitDaemon::start();
    daemon.create_repo("states.git");
    let repo = daemon.repo_dir("states.git");
    let proxy = StallProxy::start(loopback(daemon.port()));
    let url = format!("git://127.0.0.1:{}/states.git", proxy.port());
    let mut lambda = TimedLambda::start(&[("GITSTATE_REPOSITORY", url.as_str())], LAMBDA_TIMEOUT);
    let target = lambda.url(&format!("/state/{STATE}"));
    let json_headers = [("Content-Type", "application/json")];

    // The host answers: the function writes and reads within the invocation's deadline.
    let got = http("POST", &target, &json_headers, Some(state(1, "lambda").as_bytes()));
    assert_eq!(got.status, 200, "POST while forwarding: {}", got.text());
    let before = snapshot(&repo);
    assert!(before.state.is_some(), "no state on main after the POST");

    proxy.stall();
    let connections = proxy.connections();
    let earliest = LAMBDA_TIMEOUT - LAMBDA_MARGIN - Duration::from_millis(500);
    for (method, body) in [("GET", None), ("LOCK", Some(lock_info("cccccccc-0000-4000-8000-000000000003")))] {
        let (got, elapsed) = timed(method, &target, &json_headers, body.as_deref().map(str::as_bytes));
        println!(
            "Lambda (deadline now + {} ms): {method} with the git host stalled: {} after {} ms",
            LAMBDA_TIMEOUT.as_millis(),
            got.status,
            elapsed.as_millis()
        );
        assert_ne!(got.status, 408, "Lambda {method}: the invocation timed out: the function did not answer in time");
        assert_eq!(got.status, 503, "Lambda {method}: expected the function's 503, got {}: {}", got.status, got.text());
        assert!(got.header("Retry-After").is_some(), "Lambda {method}: 503 without Retry-After: {:?}", got.headers);
        assert!(
            elapsed < LAMBDA_TIMEOUT,
            "Lambda {method}: answered after {elapsed:?}, not before the {LAMBDA_TIMEOUT:?} timeout"
        );
        assert!(
            elapsed >= earliest,
            "Lambda {method}: answered after {elapsed:?}, before the invocation's deadline less the margin ({earliest:?} at the earliest): the deadline did not come from Lambda-Runtime-Deadline-Ms"
        );
    }
    assert!(proxy.connections() > connections, "no invocation reached the stalled git host");
    assert_eq!(snapshot(&repo), before, "the server repository changed while the git host stalled");
    lambda.assert_running();

    // The same warm process serves again once the host does.
    proxy.forward();
    let got = http("GET", &target, &[], None);
    assert_eq!(got.status, 200, "GET once the host answers again: {}", got.text());
    assert_eq!(json(&got.text())["outputs"]["x"]["value"], "lambda");
}

/// Plain `cargo lambda watch` (the testkit's [`Emulator`]) with its invocation timeout at
/// 6 s: with the git host stalled, the answer is the function's 503 + Retry-After, not the
/// emulator's 408. The deadline cargo-lambda hands out is already past (see above), which no
/// real invocation has: gitstate then uses its request budget, `GITSTATE_REQUEST_TIMEOUT`
/// (3 s here), rather than answering at once.
#[test]
fn lambda_under_cargo_lambda_watch_answers_503_not_the_emulators_timeout() {
    let daemon = GitDaemon::start();
    daemon.create_repo("states.git");
    let repo = daemon.repo_dir("states.git");
    let proxy = StallProxy::start(loopback(daemon.port()));
    let url = format!("git://127.0.0.1:{}/states.git", proxy.port());
    let config = tempfile::tempdir().unwrap();
    let config_file = cargo_lambda_config(config.path());
    let emu = Emulator::start(&[
        ("GITSTATE_REPOSITORY", url.as_str()),
        ("CARGO_LAMBDA_GLOBAL", config_file.as_str()),
        ("GITSTATE_REQUEST_TIMEOUT", "3"),
    ]);

    let before = snapshot(&repo);
    proxy.stall();
    let connections = proxy.connections();
    for (method, body) in [("GET", None), ("LOCK", Some(lock_info("dddddddd-0000-4000-8000-000000000004")))] {
        let (got, elapsed) = timed(
            method,
            &emu.state_url(STATE),
            &[("Content-Type", "application/json")],
            body.as_deref().map(str::as_bytes),
        );
        println!(
            "cargo lambda watch: {method} with the git host stalled: {} after {} ms (emulator timeout {} ms)",
            got.status,
            elapsed.as_millis(),
            LAMBDA_TIMEOUT.as_millis()
        );
        assert_ne!(got.status, 408, "{method}: the emulator timed the invocation out: the function did not answer");
        assert_eq!(got.status, 503, "{method}: expected the function's 503, got {}: {}", got.status, got.text());
        assert!(got.header("Retry-After").is_some(), "{method}: 503 without Retry-After: {:?}", got.headers);
        assert!(
            elapsed < LAMBDA_TIMEOUT,
            "{method}: answered after {elapsed:?}, not before the {LAMBDA_TIMEOUT:?} timeout"
        );
        assert!(
            elapsed >= Duration::from_millis(2900),
            "{method}: answered after {elapsed:?}: the request budget of 3 s was not used"
        );
    }
    assert!(proxy.connections() > connections, "no invocation reached the stalled git host");
    assert_eq!(snapshot(&repo), before, "the server repository changed while the git host stalled");
}

/// `cargo lambda watch --only-lambda-apis` (runtime API and function URLs, invocation
/// timeout `timeout`) with the `gitstate` binary, started here, polling it through a
/// [`DeadlineShim`] that gives every invocation a deadline of now + `timeout`. Everything
/// is stopped on drop.
struct TimedLambda {
    emulator: Option<Child>,
    function: Option<Child>,
    port: u16,
    shim: DeadlineShim,
    dir: tempfile::TempDir,
}

impl TimedLambda {
    fn start(env: &[(&str, &str)], timeout: Duration) -> TimedLambda {
        let dir = tempfile::Builder::new().prefix("gitstate-timed-lambda-").tempdir().unwrap();
        let config_file = cargo_lambda_config(dir.path());
        let port = free_port();
        let watch_log = std::fs::File::create(dir.path().join("watch.log")).unwrap();
        let mut emulator = Command::new(cargo_lambda_bin());
        emulator
            .args(["lambda", "watch", "--only-lambda-apis", "-A", "127.0.0.1", "-P", &port.to_string()])
            .current_dir(repo_root())
            .env("CARGO_LAMBDA_GLOBAL", &config_file)
            .stdin(Stdio::null())
            .stdout(watch_log.try_clone().unwrap())
            .stderr(watch_log)
            .process_group(0);
        scrub_env(&mut emulator);
        let emulator = emulator.spawn().unwrap_or_else(|e| panic!("spawn {}: {e}", cargo_lambda_bin().display()));
        let shim = DeadlineShim::start(loopback(port), timeout);
        let mut lambda = TimedLambda { emulator: Some(emulator), function: None, port, shim, dir };
        if !wait_until_listening(lambda.emulator.as_mut().unwrap(), port) {
            panic!("cargo lambda watch --only-lambda-apis did not listen on {port}:\n{}", lambda.log());
        }

        let function_log = std::fs::File::create(lambda.dir.path().join("function.log")).unwrap();
        let mut function = Command::new(server_bin());
        scrub_env(&mut function);
        function
            .env("PATH", path_without_git())
            .env("HOME", lambda.dir.path())
            .env("AWS_LAMBDA_RUNTIME_API", format!("http://127.0.0.1:{}/.rt/gitstate", lambda.shim.port))
            .env("AWS_LAMBDA_FUNCTION_NAME", "gitstate")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "1")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "4096")
            .env("GITSTATE_CACHE_DIR", lambda.dir.path().join("cache"))
            .env("GITSTATE_LOG", std::env::var("GITSTATE_TEST_LOG").unwrap_or_else(|_| "info,gitstate=debug".into()))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(function_log.try_clone().unwrap())
            .stderr(function_log)
            .process_group(0);
        lambda.function = Some(function.spawn().expect("spawn the gitstate function"));

        // Ready once the function polls for invocations and answers one (gitstate's own 404).
        let started = Instant::now();
        while lambda.shim.polls() == 0 {
            lambda.assert_running();
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the function did not poll for invocations:\n{}",
                lambda.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let probe = http("GET", &lambda.url("/"), &[], None);
        assert!(
            probe.status == 404 && probe.text().contains("/state/"),
            "the function's answer to GET /: {} {}\n{}",
            probe.status,
            probe.text(),
            lambda.log()
        );
        lambda
    }

    /// `http://127.0.0.1:<port>/lambda-url/gitstate<path>`.
    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/lambda-url/gitstate{path}", self.port)
    }

    #[track_caller]
    fn assert_running(&mut self) {
        let log = self.log();
        for (name, child) in [("cargo lambda watch", &mut self.emulator), ("the function", &mut self.function)] {
            if let Some(status) = child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("{name} exited: {status}\n{log}");
            }
        }
    }

    fn log(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!("--- watch.log ---\n{}\n--- function.log ---\n{}", read("watch.log"), read("function.log"))
    }
}

impl Drop for TimedLambda {
    fn drop(&mut self) {
        for child in [self.function.take(), self.emulator.take()].into_iter().flatten() {
            let mut child = child;
            signal_group(child.id(), "KILL");
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.log());
        }
    }
}

/// Nothing from the test environment's configuration reaches the emulator or the function.
fn scrub_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if let Some(k) = k.to_str() {
            if k.starts_with("GITSTATE_") || k.starts_with("AWS_") || k.starts_with("GIT_") || k == "RUST_LOG" {
                cmd.env_remove(k);
            }
        }
    }
}

/// An HTTP relay on 127.0.0.1 between a Lambda function and the emulator's runtime API that
/// sets `Lambda-Runtime-Deadline-Ms` of every invocation it passes to now + `budget`. One
/// request per connection (`Connection: close` both ways); bodies with `Content-Length`
/// or chunked. Its threads end when their sockets close.
struct DeadlineShim {
    port: u16,
    polls: Arc<AtomicUsize>,
    stopping: Arc<AtomicBool>,
}

impl DeadlineShim {
    fn start(upstream: SocketAddr, budget: Duration) -> DeadlineShim {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the deadline shim");
        let port = listener.local_addr().unwrap().port();
        let polls = Arc::new(AtomicUsize::new(0));
        let stopping = Arc::new(AtomicBool::new(false));
        let (p, s) = (Arc::clone(&polls), Arc::clone(&stopping));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = conn else { continue };
                let p = Arc::clone(&p);
                std::thread::spawn(move || {
                    let _ = relay(client, upstream, budget, &p);
                });
            }
        });
        DeadlineShim { port, polls, stopping }
    }

    /// How many `invocation/next` polls the function sent so far.
    fn polls(&self) -> usize {
        self.polls.load(Ordering::SeqCst)
    }
}

impl Drop for DeadlineShim {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&loopback(self.port), Duration::from_secs(1));
    }
}

/// One request from `client` to `upstream` and its answer back, with a new deadline.
fn relay(client: TcpStream, upstream: SocketAddr, budget: Duration, polls: &AtomicUsize) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut head = read_head(&mut reader)?;
    let request_line = head.lines().next().unwrap_or_default().to_string();
    if request_line.contains("/runtime/invocation/next") {
        polls.fetch_add(1, Ordering::SeqCst);
    }
    let body = read_body(&mut reader, &head)?;
    head = set_header(&head, "Connection", "close");
    let mut up = TcpStream::connect(upstream)?;
    up.write_all(head.as_bytes())?;
    up.write_all(&body)?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4).unwrap_or(answer.len());
    let mut answer_head = String::from_utf8_lossy(&answer[..split]).into_owned();
    if answer_head.to_ascii_lowercase().contains("\r\nlambda-runtime-deadline-ms:") {
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis();
        answer_head =
            set_header(&answer_head, "Lambda-Runtime-Deadline-Ms", &(now_ms + budget.as_millis()).to_string());
    }
    answer_head = set_header(&answer_head, "Connection", "close");
    let mut client = client;
    client.write_all(answer_head.as_bytes())?;
    client.write_all(&answer[split..])?;
    client.flush()
}

/// The request line and headers, through the empty line.
fn read_head(reader: &mut impl BufRead) -> std::io::Result<String> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push_str(&line);
        if line == "\r\n" || line == "\n" {
            return Ok(head);
        }
    }
}

/// The body as sent (chunked bodies stay chunked).
fn read_body(reader: &mut impl BufRead, head: &str) -> std::io::Result<Vec<u8>> {
    let header = |name: &str| {
        head.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_ascii_lowercase())
    };
    let mut body = Vec::new();
    if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            let mut size_line = String::new();
            reader.read_line(&mut size_line)?;
            body.extend_from_slice(size_line.as_bytes());
            let size = usize::from_str_radix(size_line.trim().split(';').next().unwrap_or("0"), 16)
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))?;
            if size == 0 {
                // Trailers, through the empty line.
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line)?;
                    body.extend_from_slice(line.as_bytes());
                    if line == "\r\n" || line.is_empty() {
                        return Ok(body);
                    }
                }
            }
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk)?;
            body.extend_from_slice(&chunk);
        }
    }
    if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.resize(len, 0);
        reader.read_exact(&mut body)?;
    }
    Ok(body)
}

/// `head` with every `name` header replaced by `name: value`.
fn set_header(head: &str, name: &str, value: &str) -> String {
    let mut lines: Vec<&str> = head.trim_end_matches("\r\n").split("\r\n").collect();
    lines.retain(|l| !l.split_once(':').is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case(name)));
    let added = format!("{name}: {value}");
    lines.push(&added);
    format!("{}\r\n\r\n", lines.join("\r\n"))
}
