//! gitstate over smart HTTP with credentials (issue 4), against a real git
//! host: `git http-backend` behind lighttpd with basic auth
//! (`gitstate_testkit::httpd`), driven by a real Terraform 1.0.3 and by plain
//! HTTP requests, and checked with the git CLI on the server's repository
//! and with lighttpd's access log.
//!
//! - `passthrough` (the default): Terraform's basic auth is handed to the git
//!   host; wrong credentials → 401, nothing committed.
//! - `env`: the git credentials come from `GITSTATE_GIT_USERNAME`/`_PASSWORD`;
//!   `GITSTATE_USERNAME`/`_PASSWORD` add backend basic auth.
//! - The repository allowlist refuses other repositories with 403 before any
//!   request reaches the git host, and URLs with credentials with 400.
//! - A full Terraform cycle at the most verbose log level leaks neither the
//!   password nor base64(`user:password`) into logs, bodies, commits or files.
//!
//! Each test starts its own lighttpd and `gitstate serve`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;

use base64::Engine as _;
use gitstate_testkit::fixtures::{fsck_clean, lock_info_value};
use gitstate_testkit::gitd::{git_command, git_out, rev_parse};
use gitstate_testkit::httpd::{AccessEntry, GitHttpServer, DEFAULT_PASSWORD, DEFAULT_USER};
use gitstate_testkit::serve::{http, HttpResponse, Serve, ServeOpts};
use gitstate_testkit::terraform::{HttpBackend, TfWorkdir};
use serde_json::Value;

const STATE: &str = "envs/http/terraform.tfstate";

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

/// `gitstate serve` on `repo_url` (an http:// URL of `httpd`) with extra environment.
fn serve_on(repo_url: &str, env: &[(&str, &str)]) -> Serve {
    let mut opts = ServeOpts::new().repository(repo_url);
    for (k, v) in env {
        opts = opts.env(*k, *v);
    }
    Serve::start(opts)
}

/// A Terraform directory whose backend is `serve`'s `/state/<STATE>` with
/// LOCK/UNLOCK, and `username`/`password` when given.
fn tf_for(serve: &Serve, creds: Option<(&str, &str)>) -> TfWorkdir {
    let mut backend = HttpBackend::lock_unlock(serve.state_url(STATE));
    if let Some((u, p)) = creds {
        backend.username = Some(u.into());
        backend.password = Some(p.into());
    }
    TfWorkdir::new(backend)
}

/// The commit `main` points at on the git host, if any.
fn main_tip(httpd: &GitHttpServer, repo: &str) -> Option<String> {
    rev_parse(&httpd.repo_dir(repo), "refs/heads/main")
}

/// Commits on `main` of the git host's `repo` touching `path`, newest first.
fn state_commits(httpd: &GitHttpServer, repo: &str, path: &str) -> Vec<String> {
    git_out(&httpd.repo_dir(repo), &["log", "--format=%H", "main", "--", path]).lines().map(str::to_string).collect()
}

/// Every ref of the git host's `repo`.
fn refs(httpd: &GitHttpServer, repo: &str) -> String {
    git_out(&httpd.repo_dir(repo), &["for-each-ref", "--format=%(objectname) %(refname)"])
}

/// The state on `main` of the git host is `Update <path>`'s content, equal to
/// what Terraform pulls, with output `x` = `expect_x`.
#[track_caller]
fn assert_stored_state(httpd: &GitHttpServer, repo: &str, tf: &TfWorkdir, expect_x: &str) {
    let dir = httpd.repo_dir(repo);
    let subject = git_out(&dir, &["log", "-1", "--format=%s", "main"]);
    assert_eq!(subject.trim(), format!("Update {STATE}"), "subject of main's tip on the git host");
    let stored = git_out(&dir, &["show", &format!("main:{STATE}")]);
    let stored_json: Value = serde_json::from_str(&stored)
        .unwrap_or_else(|e| panic!("main:{STATE} on the git host is not JSON ({e}):\n{stored}"));
    assert_eq!(stored_json["outputs"]["x"]["value"], expect_x, "stored state:\n{stored}");
    let pulled = tf.state_pull();
    pulled.assert_success();
    let pulled_json: Value =
        serde_json::from_str(&pulled.stdout).unwrap_or_else(|e| panic!("state pull printed no JSON ({e}):\n{pulled}"));
    assert_eq!(stored_json, pulled_json, "git show main:{STATE} and `terraform state pull` differ");
    let locks = git_out(&dir, &["for-each-ref", "--format=%(refname)", "refs/heads/locks/"]);
    assert_eq!(locks.trim(), "", "lock branches left on the git host");
    fsck_clean(&dir);
}

/// Requests in `after` that were not in `before` (the access log only grows).
fn new_requests(before: &[AccessEntry], after: &[AccessEntry]) -> Vec<AccessEntry> {
    assert!(after.len() >= before.len(), "the access log shrank");
    after[before.len()..].to_vec()
}

/// A one-line summary of requests to the git host, for the closing note.
fn summarize(label: &str, reqs: &[AccessEntry]) -> String {
    let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
    for r in reqs {
        let kind = match (r.method.as_str(), r.target.as_str()) {
            (_, t) if t.contains("info/refs?service=git-upload-pack") => "GET info/refs upload-pack",
            (_, t) if t.contains("info/refs?service=git-receive-pack") => "GET info/refs receive-pack",
            ("POST", t) if t.ends_with("/git-upload-pack") => "POST git-upload-pack",
            ("POST", t) if t.ends_with("/git-receive-pack") => "POST git-receive-pack",
            _ => "other",
        };
        *by_kind.entry(format!("{kind} {}", r.status)).or_default() += 1;
    }
    let unauth = reqs.iter().filter(|r| r.status == 401).count();
    format!(
        "git host requests for {label}: {} total ({} answered 401 = auth challenges); {:?}",
        reqs.len(),
        unauth,
        by_kind
    )
}

/// The git CLI as a client of the test git host ([`git_command`], never prompting for
/// credentials), with extra environment.
fn git_client(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    git_command(cwd)
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "/bin/false")
        .env("SSH_ASKPASS", "/bin/false")
        .envs(env.iter().copied())
        .output()
        .expect("run git")
}

#[track_caller]
fn git_client_ok(cwd: &Path, args: &[&str]) -> String {
    let out = git_client(cwd, args, &[]);
    assert!(
        out.status.success(),
        "git {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---------------------------------------------------------------------------
// The harness itself
// ---------------------------------------------------------------------------

/// The test git host works as the tests assume, checked with the git CLI:
/// clone and push with credentials, protocol v2 through the `Git-Protocol`
/// header, 401 for anonymous and wrong credentials (fetch and push alike),
/// every request in the access log.
#[test]
fn lighttpd_serves_git_over_http_with_basic_auth() {
    let httpd = GitHttpServer::start();
    httpd.create_repo("selftest.git");
    let good = httpd.url_with_credentials("selftest.git", DEFAULT_USER, DEFAULT_PASSWORD);
    let bad = httpd.url_with_credentials("selftest.git", DEFAULT_USER, "not-the-password");
    let work = tempfile::tempdir().unwrap();

    git_client_ok(work.path(), &["clone", "-q", &good, "w"]);
    let w = work.path().join("w");
    std::fs::write(w.join("hello.txt"), "hello\n").unwrap();
    git_client_ok(&w, &["add", "hello.txt"]);
    git_client_ok(&w, &["commit", "-q", "-m", "first"]);
    git_client_ok(&w, &["push", "-q", "origin", "HEAD:refs/heads/main"]);
    let local = git_client_ok(&w, &["rev-parse", "HEAD"]);
    assert_eq!(main_tip(&httpd, "selftest.git").as_deref(), Some(local.trim()), "pushed commit on the server");

    // Protocol v2 reaches git http-backend.
    let v2 = git_client(work.path(), &["-c", "protocol.version=2", "ls-remote", &good], &[("GIT_TRACE_PACKET", "1")]);
    assert!(v2.status.success(), "ls-remote v2: {v2:?}");
    assert!(
        String::from_utf8_lossy(&v2.stderr).contains("git< version 2"),
        "the server did not speak protocol v2:\n{}",
        String::from_utf8_lossy(&v2.stderr)
    );
    assert!(String::from_utf8_lossy(&v2.stdout).contains("refs/heads/main"));

    // Wrong credentials: fetch and push refused.
    let out = git_client(work.path(), &["ls-remote", &bad], &[]);
    assert!(!out.status.success(), "ls-remote with a wrong password succeeded");
    let out = git_client(&w, &["push", "-q", &bad, "HEAD:refs/heads/other"], &[]);
    assert!(!out.status.success(), "push with a wrong password succeeded");
    assert!(main_tip(&httpd, "selftest.git").is_some());
    assert!(!refs(&httpd, "selftest.git").contains("refs/heads/other"), "a push with a wrong password landed");

    // Anonymous and wrong credentials over plain HTTP: 401 with a challenge.
    let info = format!("{}/info/refs?service=git-upload-pack", httpd.url("selftest.git"));
    let anon = http("GET", &info, &[], None);
    assert_eq!(anon.status, 401, "anonymous GET {info}");
    assert!(
        anon.header("WWW-Authenticate").is_some_and(|h| h.starts_with("Basic")),
        "401 without a Basic challenge: {:?}",
        anon.headers
    );
    let wrong = http("GET", &info, &[("Authorization", &basic(DEFAULT_USER, "nope"))], None);
    assert_eq!(wrong.status, 401, "GET {info} with a wrong password");
    let right = http("GET", &info, &[("Authorization", &basic(DEFAULT_USER, DEFAULT_PASSWORD))], None);
    assert_eq!(right.status, 200, "GET {info} with the right password");
    let push_info = format!("{}/info/refs?service=git-receive-pack", httpd.url("selftest.git"));
    assert_eq!(http("GET", &push_info, &[], None).status, 401, "anonymous receive-pack advertisement");

    let log = httpd.access_log();
    assert!(
        log.iter().any(|e| e.target.ends_with("/git-receive-pack")
            && e.status == 200
            && e.user.as_deref() == Some(DEFAULT_USER)),
        "no authenticated receive-pack in the access log:\n{log:#?}"
    );
    assert!(log.iter().any(|e| e.status == 401), "no 401 in the access log");
    assert!(
        log.iter().any(|e| e.git_protocol.as_deref() == Some("version=2") && e.status == 200),
        "the access log shows no protocol v2 request (Git-Protocol header):\n{log:#?}"
    );
    assert_eq!(log.last().map(|e| e.status), Some(401), "the last request is in the log");
}

// ---------------------------------------------------------------------------
// passthrough
// ---------------------------------------------------------------------------

/// Terraform's credentials open the git host: apply lands `Update <path>` on
/// main, a changed apply lands a second commit on top; prints how many
/// requests one `terraform apply` makes to the git host.
#[test]
fn passthrough_apply_with_right_credentials_lands_commits() {
    let httpd = GitHttpServer::start();
    let url = httpd.create_repo("states.git");
    let serve = serve_on(&url, &[("GITSTATE_AUTH", "passthrough")]);
    let mut tf = tf_for(&serve, Some((DEFAULT_USER, DEFAULT_PASSWORD)));
    tf.set_outputs(&[("x", "one")]);

    let log0 = httpd.access_log();
    tf.init().assert_success();
    let log1 = httpd.access_log();
    let out = tf.apply();
    out.assert_success();
    assert!(!tf.has_errored_state(), "Terraform wrote errored.tfstate:\n{out}");
    let log2 = httpd.access_log();
    assert_stored_state(&httpd, "states.git", &tf, "one");
    let first = state_commits(&httpd, "states.git", STATE);
    assert_eq!(first.len(), 1, "commits after the first apply: {first:?}");

    tf.set_outputs(&[("x", "two")]);
    let log3 = httpd.access_log();
    let out = tf.apply();
    out.assert_success();
    let log4 = httpd.access_log();
    assert_stored_state(&httpd, "states.git", &tf, "two");
    let second = state_commits(&httpd, "states.git", STATE);
    assert_eq!(second.len(), 2, "commits after the second apply: {second:?}");
    assert_eq!(second[1], first[0], "the second commit sits on the first");

    // An apply with nothing to change.
    let log5 = httpd.access_log();
    tf.apply().assert_success();
    let log6 = httpd.access_log();
    assert_eq!(state_commits(&httpd, "states.git", STATE).len(), 2, "an unchanged apply committed");

    // Every request to the git host carried Terraform's user (or was the
    // anonymous first try answered 401).
    for e in &log6 {
        assert!(
            e.user.as_deref() == Some(DEFAULT_USER) || e.status == 401,
            "a request reached the git host without Terraform's credentials: {}",
            e.line
        );
        assert!(e.status == 200 || e.status == 401, "git host answered {}: {}", e.status, e.line);
    }

    let init = new_requests(&log0, &log1);
    let apply1 = new_requests(&log1, &log2);
    let apply2 = new_requests(&log3, &log4);
    let apply3 = new_requests(&log5, &log6);
    println!("{}", summarize("terraform init (no state yet, cold cache)", &init));
    println!("{}", summarize("first terraform apply (creates the state)", &apply1));
    println!("{}", summarize("terraform apply with a change (warm)", &apply2));
    println!("{}", summarize("terraform apply with no change (warm)", &apply3));
    for e in &apply2 {
        println!("    {} {} {} {}", e.method, e.target, e.status, e.user.as_deref().unwrap_or("-"));
    }
    assert!(apply1.iter().any(|e| e.target.ends_with("/git-receive-pack")), "the apply pushed nothing");
    // Fetches speak protocol v2 (depth 1 is ignored on v1).
    for e in log6.iter().filter(|e| e.target.contains("git-upload-pack")) {
        assert_eq!(e.git_protocol.as_deref(), Some("version=2"), "a fetch without protocol v2: {}", e.line);
    }
}

/// The default mode is passthrough. Wrong credentials from Terraform: init
/// and apply fail with an auth error, and nothing reaches main or the lock
/// branches, even when the server's cache is warm from a good apply.
#[test]
fn passthrough_wrong_credentials_fail_and_commit_nothing() {
    let httpd = GitHttpServer::start();
    let url = httpd.create_repo("states.git");
    let serve = serve_on(&url, &[]); // GITSTATE_AUTH unset: passthrough

    // Nothing stored yet: wrong password at init.
    let bad_tf = tf_for(&serve, Some((DEFAULT_USER, "wrong-password")));
    let out = bad_tf.init();
    out.assert_failure();
    let text = format!("{}{}", out.stdout, out.stderr).to_lowercase();
    assert!(text.contains("auth"), "init with a wrong password should report an auth error:\n{out}");
    assert_eq!(main_tip(&httpd, "states.git"), None, "main exists after a refused init");

    // Plain HTTP: each operation with a wrong password is 401, with the
    // message that the git host refused the credentials.
    let wrong = basic(DEFAULT_USER, "wrong-password");
    let state = serde_json::json!({"version": 4, "terraform_version": "1.0.3", "serial": 1,
        "lineage": "11111111-2222-3333-4444-555555555555", "outputs": {}, "resources": []});
    let body = serde_json::to_vec_pretty(&state).unwrap();
    let md5 = base64::engine::general_purpose::STANDARD.encode(<md5::Md5 as md5::Digest>::digest(&body));
    let lock =
        serde_json::to_vec(&lock_info_value("aaaaaaaa-0000-0000-0000-000000000001", "x@y", "OperationTypeApply"))
            .unwrap();
    let anon_get = http("GET", &serve.state_url(STATE), &[], None);
    assert_eq!(anon_get.status, 401, "GET without credentials (passthrough): {}", anon_get.text());
    for (method, target, body) in [
        ("GET", serve.state_url(STATE), None),
        ("POST", serve.state_url(STATE), Some(body.as_slice())),
        ("LOCK", serve.state_url(STATE), Some(lock.as_slice())),
        ("POST", serve.lock_url(STATE), Some(lock.as_slice())),
    ] {
        let got = http(
            method,
            &target,
            &[("Authorization", &wrong), ("Content-Type", "application/json"), ("Content-MD5", &md5)],
            body,
        );
        assert_eq!(got.status, 401, "{method} {target} with a wrong password: {}", got.text());
        assert!(
            got.text().to_lowercase().contains("git host refused"),
            "{method} {target}: 401 body should say the git host refused the credentials, got {:?}",
            got.text()
        );
    }
    assert_eq!(main_tip(&httpd, "states.git"), None, "main exists after refused requests");
    assert_eq!(refs(&httpd, "states.git").trim(), "", "refs after refused requests");

    // A good apply, so that the server's cache is warm...
    let mut tf = tf_for(&serve, Some((DEFAULT_USER, DEFAULT_PASSWORD)));
    tf.set_outputs(&[("x", "good")]);
    tf.init().assert_success();
    tf.apply().assert_success();
    let tip = main_tip(&httpd, "states.git").expect("main after a good apply");
    let refs_before = refs(&httpd, "states.git");

    // ... and still no read with a wrong password or none.
    let got = http("GET", &serve.state_url(STATE), &[("Authorization", &wrong)], None);
    assert_eq!(got.status, 401, "GET with a wrong password and a warm cache: {}", got.text());
    assert!(!got.text().contains("good"), "the state leaked to a wrong password: {}", got.text());
    let got = http("GET", &serve.state_url(STATE), &[], None);
    assert_eq!(got.status, 401, "GET without credentials and a warm cache: {}", got.text());

    // Terraform initialised with the right password, applying with a wrong
    // one (TF_HTTP_PASSWORD, not part of the configuration).
    let mut tf2 = TfWorkdir::new({
        let mut b = HttpBackend::lock_unlock(serve.state_url(STATE));
        b.username = Some(DEFAULT_USER.into());
        b
    });
    tf2.set_outputs(&[("x", "evil")]);
    tf2.env.push(("TF_HTTP_PASSWORD".into(), DEFAULT_PASSWORD.into()));
    tf2.init().assert_success();
    tf2.env = vec![("TF_HTTP_PASSWORD".into(), "wrong-password".into())];
    let out = tf2.apply();
    out.assert_failure();
    let text = format!("{}{}", out.stdout, out.stderr).to_lowercase();
    assert!(text.contains("auth"), "apply with a wrong password should report an auth error:\n{out}");
    let out = tf2.run(&["apply", "-auto-approve", "-input=false", "-no-color", "-lock=false"]);
    out.assert_failure();

    assert_eq!(main_tip(&httpd, "states.git").as_deref(), Some(tip.as_str()), "main moved");
    assert_eq!(refs(&httpd, "states.git"), refs_before, "refs changed after refused applies");
    let stored = git_out(&httpd.repo_dir("states.git"), &["show", &format!("main:{STATE}")]);
    assert!(!stored.contains("evil"), "the refused apply's state is stored:\n{stored}");
}

// ---------------------------------------------------------------------------
// env
// ---------------------------------------------------------------------------

/// `GITSTATE_AUTH=env`: the git credentials come from the server's
/// environment; Terraform sends none and its apply lands a commit.
#[test]
fn env_mode_uses_credentials_from_the_environment() {
    // Without backend auth, a mode that holds git credentials would hand them to anyone:
    // gitstate refuses to start, naming the variables, and never says the token.
    let data = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(gitstate_testkit::serve::server_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--repository", "git://127.0.0.1:9/x.git", "--data-dir"])
        .arg(data.path())
        .env("GITSTATE_AUTH", "env")
        .env("GITSTATE_GIT_USERNAME", DEFAULT_USER)
        .env("GITSTATE_GIT_PASSWORD", DEFAULT_PASSWORD)
        .env_remove("GITSTATE_USERNAME")
        .env_remove("GITSTATE_PASSWORD")
        .output()
        .expect("run gitstate serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "env mode without backend auth started: {stderr}");
    assert!(stderr.contains("GITSTATE_USERNAME") && stderr.contains("GITSTATE_PASSWORD"), "{stderr}");
    assert!(!stderr.contains(DEFAULT_PASSWORD), "the git password is in the refusal: {stderr}");

    // With backend auth, the git host sees only the configured git user.
    let httpd = GitHttpServer::start();
    let url = httpd.create_repo("states.git");
    let serve = serve_on(
        &url,
        &[
            ("GITSTATE_AUTH", "env"),
            ("GITSTATE_GIT_USERNAME", DEFAULT_USER),
            ("GITSTATE_GIT_PASSWORD", DEFAULT_PASSWORD),
            ("GITSTATE_USERNAME", "tf-user"),
            ("GITSTATE_PASSWORD", "tf-password"),
        ],
    );
    let mut tf = tf_for(&serve, Some(("tf-user", "tf-password")));
    tf.set_outputs(&[("x", "env")]);
    tf.init().assert_success();
    tf.apply().assert_success();
    assert_stored_state(&httpd, "states.git", &tf, "env");
    assert_eq!(state_commits(&httpd, "states.git", STATE).len(), 1);
    let log = httpd.access_log();
    assert!(
        log.iter().all(|e| e.status == 401 || e.user.as_deref() == Some(DEFAULT_USER)),
        "requests without the configured user:\n{log:#?}"
    );
    // An anonymous caller gets nothing.
    let got = http("GET", &serve.state_url(STATE), &[], None);
    assert_eq!(got.status, 401, "GET without backend auth in env mode: {}", got.text());
}

/// `GITSTATE_AUTH=env` with `GITSTATE_USERNAME`/`GITSTATE_PASSWORD`: the
/// backend requires basic auth (missing/wrong → 401 with a Basic challenge),
/// and Terraform with those credentials lands a commit; the backend
/// credentials are never handed to the git host.
#[test]
fn env_mode_with_backend_basic_auth() {
    let httpd = GitHttpServer::start();
    let url = httpd.create_repo("states.git");
    let serve = serve_on(
        &url,
        &[
            ("GITSTATE_AUTH", "env"),
            ("GITSTATE_GIT_USERNAME", DEFAULT_USER),
            ("GITSTATE_GIT_PASSWORD", DEFAULT_PASSWORD),
            ("GITSTATE_USERNAME", "tf"),
            ("GITSTATE_PASSWORD", "tf-pass"),
        ],
    );
    let state_url = serve.state_url(STATE);
    let got = http("GET", &state_url, &[], None);
    assert_eq!(got.status, 401, "GET without backend auth: {}", got.text());
    let challenge = got.header("WWW-Authenticate").unwrap_or_default().to_string();
    assert!(
        challenge.starts_with("Basic") && challenge.contains("realm=\"gitstate\""),
        "401 without `WWW-Authenticate: Basic realm=\"gitstate\"`: {:?}",
        got.headers
    );
    for (u, p) in [("tf", "wrong"), ("other", "tf-pass"), (DEFAULT_USER, DEFAULT_PASSWORD)] {
        let got = http("GET", &state_url, &[("Authorization", &basic(u, p))], None);
        assert_eq!(got.status, 401, "GET with backend credentials {u}:{p}: {}", got.text());
    }
    let got = http("GET", &state_url, &[("Authorization", &basic("tf", "tf-pass"))], None);
    assert_eq!(got.status, 204, "GET with the right backend credentials, no state yet: {}", got.text());

    // Terraform without credentials fails; with them it lands a commit.
    let mut anon = tf_for(&serve, None);
    anon.set_outputs(&[("x", "anon")]);
    anon.init().assert_failure();
    let mut tf = tf_for(&serve, Some(("tf", "tf-pass")));
    tf.set_outputs(&[("x", "authed")]);
    tf.init().assert_success();
    tf.apply().assert_success();
    assert_stored_state(&httpd, "states.git", &tf, "authed");
    let log = httpd.access_log();
    assert!(
        log.iter().all(|e| e.user.as_deref() != Some("tf")),
        "the backend credentials reached the git host:\n{log:#?}"
    );
}

// ---------------------------------------------------------------------------
// allowlist
// ---------------------------------------------------------------------------

/// Without `GITSTATE_ALLOWED_REPOSITORIES` only the default repository may
/// be named: another one → 403 and no request at all reaches the git host;
/// a repository URL with credentials → 400, no request either.
#[test]
fn allowlist_default_refuses_other_repositories_without_network_access() {
    let httpd = GitHttpServer::start();
    let url = httpd.create_repo("states.git");
    httpd.create_repo("other.git");
    let serve = serve_on(&url, &[]);
    let auth = basic(DEFAULT_USER, DEFAULT_PASSWORD);
    let before = httpd.access_log();
    let lock =
        serde_json::to_vec(&lock_info_value("dddddddd-0000-0000-0000-000000000004", "x@y", "OperationTypeApply"))
            .unwrap();

    let other = httpd.url("other.git");
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let refused = [
        format!("{}?repository={}", serve.state_url("x"), enc(&other)),
        format!("{}?repository={}", serve.state_url("x"), other),
        format!("{}?repository={}&ref=main", serve.lock_url("x"), enc(&other)),
        format!("{}/?type=git&repository={}&ref=main&state=x", serve.base_url(), enc(&other)),
        // Other host, other port, other scheme.
        format!("{}?repository={}", serve.state_url("x"), enc("http://127.0.0.2:9/git/states.git")),
        format!("{}?repository={}", serve.state_url("x"), enc(&url.replace("states.git", "states.git/../other.git"))),
        format!("{}?repository={}", serve.state_url("x"), enc("git://127.0.0.1:9418/states.git")),
    ];
    for target in &refused {
        for method in ["GET", "LOCK"] {
            let body = (method == "LOCK").then_some(lock.as_slice());
            let got = http(method, target, &[("Authorization", &auth)], body);
            // A `..` in the URL may be refused as invalid (400) or as not allowed (403).
            let ok = got.status == 403 || target.contains("..") && got.status == 400;
            assert!(ok, "{method} {target} (not allowed): expected 403, got {} {}", got.status, got.text());
        }
    }
    let with_creds = [
        url.replace("http://", &format!("http://{DEFAULT_USER}:{DEFAULT_PASSWORD}@")),
        url.replace("http://", &format!("http://{DEFAULT_USER}@")),
    ];
    for repo in &with_creds {
        let target = format!("{}?repository={}", serve.state_url("x"), enc(repo));
        let got = http("GET", &target, &[("Authorization", &auth)], None);
        assert_eq!(got.status, 400, "GET {target} (credentials in the URL): {}", got.text());
        assert!(!got.text().contains(DEFAULT_PASSWORD), "the 400 body repeats the password: {}", got.text());
    }
    let after = httpd.access_log();
    let new = new_requests(&before, &after);
    assert!(new.is_empty(), "refused requests reached the git host:\n{new:#?}");
    assert!(!serve.stderr_log().contains(DEFAULT_PASSWORD), "the password of a refused URL is in the server log");

    // The default repository named explicitly is fine.
    let target = format!("{}?repository={}", serve.state_url("x"), enc(&url));
    let got = http("GET", &target, &[("Authorization", &auth)], None);
    assert_eq!(got.status, 204, "GET {target} (the default repository): {}", got.text());
}

/// With patterns: `*` matches within one path segment; a matching
/// repository is used (a write lands there), others → 403 with no request
/// to the git host.
#[test]
fn allowlist_patterns_allow_matching_repositories_only() {
    let httpd = GitHttpServer::start();
    let url = httpd.create_repo("states.git");
    httpd.create_repo("team-a.git");
    httpd.create_repo("other.git");
    let base = format!("http://127.0.0.1:{}/git", httpd.port());
    let patterns = format!("{base}/team-*.git, {base}/states.git");
    let serve = serve_on(&url, &[("GITSTATE_ALLOWED_REPOSITORIES", patterns.as_str())]);
    let auth = basic(DEFAULT_USER, DEFAULT_PASSWORD);
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();

    let before = httpd.access_log();
    for repo in [
        format!("{base}/other.git"),
        format!("{base}/team-a/b.git"), // `*` does not cross `/`
        format!("{base}/team-x/../other.git"),
        format!("{base}/xteam-a.git"), // anchored at the start
        format!("{base}/team-a.git/extra.git"),
        format!("http://127.0.0.2:{}/git/team-a.git", httpd.port()),
        format!("http://127.0.0.1:{}/git/team-a.git", httpd.port() as u32 + 1),
    ] {
        let target = format!("{}?repository={}", serve.state_url("x"), enc(&repo));
        let got = http("GET", &target, &[("Authorization", &auth)], None);
        // A `..` in the URL may be refused as invalid (400) or as not allowed (403).
        let ok = got.status == 403 || repo.contains("..") && got.status == 400;
        assert!(ok, "GET {target} (outside {patterns}): expected 403, got {} {}", got.status, got.text());
    }
    let new = new_requests(&before, &httpd.access_log());
    assert!(new.is_empty(), "refused requests reached the git host:\n{new:#?}");

    // team-a.git matches: Terraform writes there, not to the default repository.
    let team = httpd.url("team-a.git");
    let address = format!("{}?repository={}", serve.state_url(STATE), enc(&team));
    let mut backend = HttpBackend::lock_unlock(address);
    backend.username = Some(DEFAULT_USER.into());
    backend.password = Some(DEFAULT_PASSWORD.into());
    let mut tf = TfWorkdir::new(backend);
    tf.set_outputs(&[("x", "team")]);
    tf.init().assert_success();
    tf.apply().assert_success();
    assert_stored_state(&httpd, "team-a.git", &tf, "team");
    assert_eq!(main_tip(&httpd, "states.git"), None, "the default repository was written");
    assert_eq!(main_tip(&httpd, "other.git"), None, "other.git was written");
}

// ---------------------------------------------------------------------------
// leak check
// ---------------------------------------------------------------------------

const LEAK_USER: &str = "leak-user";
const LEAK_PASSWORD: &str = "S3cr3t-Pa55-XYZZY";
const WRONG_PASSWORD: &str = "Wr0ng-Pa55-PLUGH";

/// Every file under `dir` (recursively) with its bytes.
fn files_under(dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            files_under(&p, out);
        } else if ft.is_file() {
            if let Ok(bytes) = std::fs::read(&p) {
                out.push((p.display().to_string(), bytes));
            }
        }
    }
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// A full Terraform cycle in passthrough mode at the most verbose log level,
/// with a recognisable password, plus refused requests (a wrong password, a
/// URL with credentials, a disallowed repository, a lock conflict and a
/// force-unlock): neither password nor base64(`user:password`) appears in
/// the server's stdout/stderr, any response body, any commit on the git host,
/// or any file the server wrote (cache, data directory).
#[test]
fn passthrough_full_cycle_leaks_no_secret() {
    let httpd = GitHttpServer::start_with_users(&[(LEAK_USER, LEAK_PASSWORD)]);
    let url = httpd.create_repo("states.git");
    let serve = serve_on(&url, &[("GITSTATE_LOG", "trace"), ("RUST_LOG", "trace")]);
    let mut bodies: Vec<(String, HttpResponse)> = Vec::new();
    let mut record = |label: String, r: HttpResponse| {
        bodies.push((label, r.clone()));
        r
    };
    let auth = basic(LEAK_USER, LEAK_PASSWORD);
    let wrong = basic(LEAK_USER, WRONG_PASSWORD);
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();

    let mut tf = tf_for(&serve, Some((LEAK_USER, LEAK_PASSWORD)));
    tf.set_outputs(&[("x", "one")]);
    let mut tf_outputs = Vec::new();
    tf_outputs.push(tf.init().assert_success().to_string());
    tf_outputs.push(tf.apply().assert_success().to_string());
    tf.set_outputs(&[("x", "two")]);
    tf_outputs.push(tf.apply().assert_success().to_string());
    tf_outputs.push(tf.run(&["plan", "-input=false", "-no-color"]).to_string());
    tf_outputs.push(tf.state_pull().assert_success().to_string());

    // A lock taken by someone else: Terraform reports the conflict, then
    // force-unlocks it.
    let held = lock_info_value("bbbbbbbb-0000-0000-0000-000000000002", "other@host", "OperationTypeApply");
    let got = record(
        "LOCK held".into(),
        http("LOCK", &serve.state_url(STATE), &[("Authorization", &auth)], Some(&serde_json::to_vec(&held).unwrap())),
    );
    assert_eq!(got.status, 200, "LOCK: {}", got.text());
    tf.set_outputs(&[("x", "three")]);
    let out = tf.apply();
    out.assert_failure();
    tf_outputs.push(out.to_string());
    tf_outputs.push(tf.force_unlock("bbbbbbbb-0000-0000-0000-000000000002").assert_success().to_string());
    tf_outputs.push(tf.apply().assert_success().to_string());

    // Refusals.
    for (m, target) in
        [("GET", serve.state_url(STATE)), ("LOCK", serve.state_url(STATE)), ("GET", serve.lock_url(STATE))]
    {
        let got = record(
            format!("{m} {target} wrong password"),
            http(m, &target, &[("Authorization", &wrong)], Some(&serde_json::to_vec(&held).unwrap())),
        );
        assert_eq!(got.status, 401, "{m} {target} with a wrong password: {}", got.text());
    }
    let cred_url = url.replace("http://", &format!("http://{LEAK_USER}:{LEAK_PASSWORD}@"));
    let target = format!("{}?repository={}", serve.state_url(STATE), enc(&cred_url));
    let got = record("credentials URL".into(), http("GET", &target, &[("Authorization", &auth)], None));
    assert_eq!(got.status, 400, "GET with a credentials URL: {}", got.text());
    let target = format!("{}?repository={}", serve.state_url(STATE), enc(&httpd.url("nope.git")));
    let got = record("disallowed".into(), http("GET", &target, &[("Authorization", &auth)], None));
    assert_eq!(got.status, 403, "GET of a disallowed repository: {}", got.text());
    let got = record("GET state".into(), http("GET", &serve.state_url(STATE), &[("Authorization", &auth)], None));
    assert_eq!(got.status, 200, "GET state: {}", got.text());
    let got = record("GET lock".into(), http("GET", &serve.lock_url(STATE), &[("Authorization", &auth)], None));
    assert_eq!(got.status, 404, "GET lock when none is held: {}", got.text());
    let _ = record;

    assert_eq!(state_commits(&httpd, "states.git", STATE).len(), 3, "commits of the cycle");

    // The haystacks.
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{LEAK_USER}:{LEAK_PASSWORD}"));
    let b64_wrong = base64::engine::general_purpose::STANDARD.encode(format!("{LEAK_USER}:{WRONG_PASSWORD}"));
    let needles = [LEAK_PASSWORD, WRONG_PASSWORD, b64.as_str(), b64_wrong.as_str()];
    let stderr = serve.stderr_log();
    let stdout = serve.stdout_log();
    let trace_lines = stderr.lines().filter(|l| l.contains("TRACE")).count();
    assert!(
        trace_lines > 0,
        "expected a log at trace level, got {} lines and none at TRACE:\n{stderr}",
        stderr.lines().count()
    );
    let commits = git_out(&httpd.repo_dir("states.git"), &["log", "--all", "--format=%H%n%an <%ae>%n%cn <%ce>%n%B"]);
    let mut hay: Vec<(String, Vec<u8>)> = vec![
        ("server stderr".into(), stderr.clone().into_bytes()),
        ("server stdout".into(), stdout.into_bytes()),
        ("commit messages on the git host".into(), commits.into_bytes()),
    ];
    for (label, r) in &bodies {
        hay.push((format!("response body of {label}"), r.body.clone()));
        let headers: String = r.headers.iter().map(|(k, v)| format!("{k}: {v}\n")).collect();
        hay.push((format!("response headers of {label}"), headers.into_bytes()));
    }
    for (i, o) in tf_outputs.iter().enumerate() {
        hay.push((format!("terraform output #{i}"), o.clone().into_bytes()));
    }
    // Everything the server wrote: data directory and cache (they share a parent).
    let server_dir = serve.data_dir().parent().unwrap().to_path_buf();
    files_under(&server_dir, &mut hay);
    // The git host's repository: no ref, object or config holds it either.
    files_under(&httpd.repo_dir("states.git"), &mut hay);

    // The detector itself finds the password where it must be: lighttpd's user file.
    let users = std::fs::read(httpd.base_dir().join("users")).unwrap();
    assert!(contains(&users, LEAK_PASSWORD), "the leak detector is broken");

    let mut leaks = Vec::new();
    for (label, bytes) in &hay {
        for n in needles {
            if contains(bytes, n) {
                let text = String::from_utf8_lossy(bytes);
                let line = text.lines().find(|l| l.contains(n)).unwrap_or("").to_string();
                leaks.push(format!("{n:?} in {label}: {line}"));
            }
        }
    }
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
    println!(
        "leak check: {} haystacks ({} server log lines, {} at TRACE) free of the password and its base64",
        hay.len(),
        stderr.lines().count(),
        trace_lines
    );
}
