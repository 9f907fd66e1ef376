//! `GITSTATE_AUTH=secret` against a real AWS API emulator (`moto_server`,
//! `gitstate_testkit::moto`) and a real smart-HTTP git host (lighttpd +
//! `git http-backend`, `gitstate_testkit::httpd`):
//!
//! - the git credentials come from a Secrets Manager secret created in moto;
//! - the backend requires basic auth (here from the same secret's
//!   `backend_username`/`backend_password`): missing → 401 with
//!   `WWW-Authenticate: Basic realm="gitstate"`, wrong → 401, right → normal;
//! - Terraform with the backend credentials lands a commit on the git host,
//!   and only the secret's git user ever reaches the git host;
//! - the secret is read once per process.

use base64::Engine as _;
use gitstate_testkit::fixtures::lock_info_value;
use gitstate_testkit::gitd::{git_out, rev_parse};
use gitstate_testkit::httpd::GitHttpServer;
use gitstate_testkit::moto::Moto;
use gitstate_testkit::serve::{http, Serve, ServeOpts};
use gitstate_testkit::terraform::{HttpBackend, TfWorkdir};
use serde_json::Value;

const STATE: &str = "envs/secret/terraform.tfstate";
const SECRET: &str = "gitstate/git-credentials";
const GIT_USER: &str = "git-user";
const GIT_PASSWORD: &str = "git-pass";
const TF_USER: &str = "tf";
const TF_PASSWORD: &str = "tf-pass";

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

struct Setup {
    // Dropped in reverse order of start: gitstate first.
    serve: Serve,
    httpd: GitHttpServer,
    moto: Moto,
    /// Requests moto had served before gitstate started (creating the secret).
    moto_requests_before_serve: usize,
}

/// moto with the secret, lighttpd with `git-user:git-pass`, and `gitstate
/// serve` in secret mode on `states.git` of that git host.
fn setup(secret: &Value, extra_env: &[(&str, &str)]) -> Setup {
    let moto = Moto::start();
    moto.create_secret(SECRET, &secret.to_string());
    let moto_requests_before_serve = moto_requests(&moto).len();
    assert!(moto_requests_before_serve >= 1, "moto's log shows no request:\n{}", moto.log());
    let httpd = GitHttpServer::start_with_users(&[(GIT_USER, GIT_PASSWORD)]);
    let url = httpd.create_repo("states.git");
    let mut opts =
        ServeOpts::new().repository(url).env("GITSTATE_AUTH", "secret").env("GITSTATE_GIT_CREDENTIALS_SECRET", SECRET);
    for (k, v) in moto.aws_env() {
        opts = opts.env(k, v);
    }
    for (k, v) in extra_env {
        opts = opts.env(*k, *v);
    }
    let serve = Serve::start(opts);
    Setup { serve, httpd, moto, moto_requests_before_serve }
}

fn full_secret() -> Value {
    serde_json::json!({
        "username": GIT_USER,
        "password": GIT_PASSWORD,
        "backend_username": TF_USER,
        "backend_password": TF_PASSWORD,
    })
}

/// Requests moto served (werkzeug's request log lines).
fn moto_requests(moto: &Moto) -> Vec<String> {
    moto.log()
        .lines()
        .filter(|l| l.contains("\"POST ") || l.contains("\"GET "))
        .filter(|l| !l.contains("/moto-api/"))
        .map(str::to_string)
        .collect()
}

fn main_tip(httpd: &GitHttpServer) -> Option<String> {
    rev_parse(&httpd.repo_dir("states.git"), "refs/heads/main")
}

/// Backend basic auth in secret mode: missing → 401 with a Basic challenge,
/// wrong → 401, right → 204 (no state yet) / 200; the git host sees only
/// the secret's git user.
#[test]
fn secret_mode_enforces_backend_basic_auth() {
    let s = setup(&full_secret(), &[]);
    let url = s.serve.state_url(STATE);

    let got = http("GET", &url, &[], None);
    assert_eq!(got.status, 401, "GET without Authorization: {}", got.text());
    let challenge = got.header("WWW-Authenticate").unwrap_or_default().to_string();
    assert!(
        challenge.starts_with("Basic") && challenge.contains("realm=\"gitstate\""),
        "401 without `WWW-Authenticate: Basic realm=\"gitstate\"`: {:?}",
        got.headers
    );
    for (u, p) in [
        (TF_USER, "wrong"),
        ("someone", TF_PASSWORD),
        (TF_USER, ""),
        (GIT_USER, GIT_PASSWORD), // the git credentials are not backend credentials
    ] {
        let got = http("GET", &url, &[("Authorization", &basic(u, p))], None);
        assert_eq!(got.status, 401, "GET with backend credentials {u:?}:{p:?}: {}", got.text());
        assert!(
            got.header("WWW-Authenticate").is_some(),
            "401 for {u:?}:{p:?} without WWW-Authenticate: {:?}",
            got.headers
        );
    }
    for bad in ["Bearer abc", "Basic !!!not-base64!!!", "Basic"] {
        let got = http("GET", &url, &[("Authorization", bad)], None);
        assert_eq!(got.status, 401, "GET with Authorization {bad:?}: {}", got.text());
    }
    // Refused requests never reach the git host.
    let log = s.httpd.access_log();
    assert!(log.is_empty(), "refused backend requests reached the git host:\n{log:#?}");

    let right = basic(TF_USER, TF_PASSWORD);
    let got = http("GET", &url, &[("Authorization", &right)], None);
    assert_eq!(got.status, 204, "GET with the right backend credentials, no state yet: {}", got.text());
    let got = http("GET", &s.serve.lock_url(STATE), &[("Authorization", &right)], None);
    assert_eq!(got.status, 404, "GET lock with the right backend credentials, no lock: {}", got.text());
    let body =
        serde_json::to_vec(&lock_info_value("cccccccc-0000-0000-0000-000000000003", "t@h", "OperationTypeApply"))
            .unwrap();
    let got = http("LOCK", &url, &[("Authorization", &right)], Some(&body));
    assert_eq!(got.status, 200, "LOCK with the right backend credentials: {}", got.text());
    let got = http("UNLOCK", &url, &[("Authorization", &right)], Some(&body));
    assert_eq!(got.status, 200, "UNLOCK with the right backend credentials: {}", got.text());

    let log = s.httpd.access_log();
    assert!(!log.is_empty(), "no request reached the git host");
    for e in &log {
        assert!(
            e.user.as_deref() == Some(GIT_USER) || e.status == 401,
            "a request reached the git host without the secret's git user: {}",
            e.line
        );
        assert!(e.status == 200 || e.status == 401, "git host answered {}: {}", e.status, e.line);
    }
    assert!(
        log.iter().any(|e| e.target.ends_with("/git-receive-pack") && e.status == 200),
        "the lock was not pushed to the git host:\n{log:#?}"
    );
    assert!(!log.iter().any(|e| e.user.as_deref() == Some(TF_USER)), "the backend credentials reached the git host");
}

/// A real Terraform with the backend credentials lands a commit; with a
/// wrong backend password it fails and nothing is committed. The secret is
/// read from Secrets Manager once for the whole process.
#[test]
fn secret_mode_terraform_apply_lands_a_commit() {
    let s = setup(&full_secret(), &[]);

    let mut backend = HttpBackend::lock_unlock(s.serve.state_url(STATE));
    backend.username = Some(TF_USER.into());
    backend.password = Some(TF_PASSWORD.into());
    let mut tf = TfWorkdir::new(backend);
    tf.set_outputs(&[("x", "from-secret")]);
    tf.init().assert_success();
    tf.apply().assert_success();

    let dir = s.httpd.repo_dir("states.git");
    let subject = git_out(&dir, &["log", "-1", "--format=%s", "main"]);
    assert_eq!(subject.trim(), format!("Update {STATE}"), "main's tip on the git host");
    let stored = git_out(&dir, &["show", &format!("main:{STATE}")]);
    let stored_json: Value = serde_json::from_str(&stored).unwrap();
    assert_eq!(stored_json["outputs"]["x"]["value"], "from-secret", "stored:\n{stored}");
    let pulled = tf.state_pull();
    pulled.assert_success();
    let pulled_json: Value = serde_json::from_str(&pulled.stdout).unwrap();
    assert_eq!(stored_json, pulled_json, "git show and terraform state pull differ");
    let tip = main_tip(&s.httpd).unwrap();

    // Wrong backend password: init fails, and an initialised directory
    // applying with a wrong TF_HTTP_PASSWORD fails; main stays.
    let mut bad = HttpBackend::lock_unlock(s.serve.state_url(STATE));
    bad.username = Some(TF_USER.into());
    bad.password = Some("wrong".into());
    let bad_tf = TfWorkdir::new(bad);
    let out = bad_tf.init();
    out.assert_failure();
    assert!(
        format!("{}{}", out.stdout, out.stderr).to_lowercase().contains("auth"),
        "init with a wrong backend password should report an auth error:\n{out}"
    );
    let mut b = HttpBackend::lock_unlock(s.serve.state_url(STATE));
    b.username = Some(TF_USER.into());
    let mut tf2 = TfWorkdir::new(b);
    tf2.set_outputs(&[("x", "evil")]);
    tf2.env = vec![("TF_HTTP_PASSWORD".into(), TF_PASSWORD.into())];
    tf2.init().assert_success();
    tf2.env = vec![("TF_HTTP_PASSWORD".into(), "wrong".into())];
    let out = tf2.apply();
    out.assert_failure();
    assert!(
        format!("{}{}", out.stdout, out.stderr).to_lowercase().contains("auth"),
        "apply with a wrong backend password should report an auth error:\n{out}"
    );
    tf2.run(&["apply", "-auto-approve", "-input=false", "-no-color", "-lock=false"]).assert_failure();
    assert_eq!(main_tip(&s.httpd).as_deref(), Some(tip.as_str()), "main moved");
    let locks = git_out(&dir, &["for-each-ref", "--format=%(refname)", "refs/heads/locks/"]);
    assert_eq!(locks.trim(), "", "lock branches on the git host");

    // Read once per process: however many requests, one call to moto.
    let calls = moto_requests(&s.moto);
    let by_gitstate = &calls[s.moto_requests_before_serve..];
    assert_eq!(
        by_gitstate.len(),
        1,
        "gitstate should read the secret once per process; moto served:\n{}",
        by_gitstate.join("\n")
    );
    println!(
        "secret mode: {} call(s) to Secrets Manager for init + apply + state pull + refused applies",
        by_gitstate.len()
    );

    // The secret's git password is nowhere in the server's log.
    let log = s.serve.stderr_log();
    for n in [GIT_PASSWORD, TF_PASSWORD] {
        assert!(!log.contains(n), "{n:?} appears in the server log");
    }
}

/// `GITSTATE_USERNAME`/`GITSTATE_PASSWORD` supply the backend credentials
/// when the secret has only the git ones.
#[test]
fn secret_mode_backend_credentials_from_the_environment() {
    let secret = serde_json::json!({ "username": GIT_USER, "password": GIT_PASSWORD });
    let s = setup(&secret, &[("GITSTATE_USERNAME", "env-tf"), ("GITSTATE_PASSWORD", "env-tf-pass")]);
    let url = s.serve.state_url(STATE);
    let got = http("GET", &url, &[], None);
    assert_eq!(got.status, 401, "GET without Authorization: {}", got.text());
    assert!(got.header("WWW-Authenticate").is_some(), "401 without WWW-Authenticate: {:?}", got.headers);
    let got = http("GET", &url, &[("Authorization", &basic("env-tf", "wrong"))], None);
    assert_eq!(got.status, 401, "GET with a wrong password: {}", got.text());
    let got = http("GET", &url, &[("Authorization", &basic("env-tf", "env-tf-pass"))], None);
    assert_eq!(got.status, 204, "GET with the right credentials, no state yet: {}", got.text());
}
