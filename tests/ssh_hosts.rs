//! gitstate over SSH (issue 19) against a real OpenSSH sshd on loopback
//! (`gitstate_testkit::sshd`), with gitstate's own in-process SSH client: `gitstate serve`
//! runs with an empty `PATH` (no `ssh`, no `git`).
//!
//! - lock, write, read, unlock, delete over ssh://, checked with the git CLI on the host's
//!   repository; a real Terraform apply/plan/force-unlock through it;
//! - two instances racing for one lock: exactly one wins;
//! - refusals: a key sshd does not accept → 502 naming the host; a host key other than the
//!   pinned one → 502 naming the host and the key's fingerprint; nothing listening → 503 with
//!   Retry-After; a host that accepts and stays silent → 503 at the deadline; a missing
//!   repository → 502;
//! - start refusals: no pinned host key, passthrough mode with ssh://, an unreadable key.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use gitstate_testkit::fixtures::{fsck_clean, lock_info_value, state};
use gitstate_testkit::gitd::{git_out, rev_parse};
use gitstate_testkit::serve::{http, server_bin, HttpResponse, Serve, ServeOpts};
use gitstate_testkit::sshd::Sshd;
use gitstate_testkit::terraform::{HttpBackend, TfWorkdir};

const STATE: &str = "envs/ssh/terraform.tfstate";
const USER: &str = "tf";
const PASSWORD: &str = "backend-pw";

fn auth() -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}")))
}

/// The environment of a deployment holding `key` and pinning `known_hosts`.
fn ssh_env(key: &str, known_hosts: &str) -> Vec<(String, String)> {
    [
        ("GITSTATE_AUTH", "env"),
        ("GITSTATE_USERNAME", USER),
        ("GITSTATE_PASSWORD", PASSWORD),
        ("GITSTATE_SSH_KEY", key),
        ("GITSTATE_SSH_KNOWN_HOSTS", known_hosts),
        // No ssh, no git: the SSH client is gitstate's own.
        ("PATH", ""),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn serve_with(repo_url: &str, env: &[(String, String)]) -> Serve {
    let mut opts = ServeOpts::new().repository(repo_url);
    for (k, v) in env {
        opts = opts.env(k, v);
    }
    Serve::start(opts)
}

fn serve_on(sshd: &Sshd, repo_url: &str) -> Serve {
    serve_with(repo_url, &ssh_env(&sshd.client_key().private, &sshd.known_hosts_line()))
}

fn call(method: &str, url: &str, body: Option<&[u8]>) -> HttpResponse {
    http(method, url, &[("Authorization", &auth())], body)
}

/// `gitstate serve` that must refuse to start: its stderr.
fn refused_start(repo_url: &str, env: &[(String, String)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(server_bin());
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--repository", repo_url, "--data-dir"]).arg(dir.path());
    for (k, _) in std::env::vars() {
        if k.starts_with("GITSTATE_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("GITSTATE_CACHE_DIR", dir.path().join("cache"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn gitstate serve");
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(!status.success(), "serve should refuse to start:\n{stderr}");
            return stderr;
        }
        if Instant::now() > until {
            let _ = child.kill();
            panic!("gitstate serve started although it should have refused to");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn serve_over_ssh_locks_writes_reads_unlocks_and_deletes() {
    let sshd = Sshd::start();
    let url = sshd.create_repo("states.git");
    let serve = serve_on(&sshd, &url);
    let repo = sshd.repo_dir("states.git");

    let info = lock_info_value("lock-1", "alice@test", "OperationTypeApply").to_string();
    let r = call("LOCK", &serve.lock_url(STATE), Some(info.as_bytes()));
    assert_eq!(r.status, 200, "lock: {}\n{}", r.text(), serve.stderr_log());
    let lock_ref = format!("refs/heads/locks/{STATE}");
    assert!(rev_parse(&repo, &lock_ref).is_some(), "the lock branch is on the SSH host");

    // A second holder is refused with the first one's LockInfo.
    let other = lock_info_value("lock-2", "bob@test", "OperationTypeApply").to_string();
    let r = call("LOCK", &serve.lock_url(STATE), Some(other.as_bytes()));
    assert_eq!(r.status, 423, "{}", r.text());
    assert_eq!(r.json()["ID"], "lock-1");

    let body = state(1, "over-ssh");
    let r = call("POST", &format!("{}?ID=lock-1", serve.state_url(STATE)), Some(body.as_bytes()));
    assert!(r.status == 200, "write: {} {}", r.status, r.text());
    let stored = git_out(&repo, &["show", &format!("main:{STATE}")]);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&stored).unwrap()["outputs"]["x"]["value"], "over-ssh");

    let r = call("GET", &serve.state_url(STATE), None);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["serial"], 1);

    let r = call("UNLOCK", &serve.lock_url(STATE), Some(info.as_bytes()));
    assert_eq!(r.status, 200, "unlock: {}", r.text());
    assert!(rev_parse(&repo, &lock_ref).is_none(), "the lock branch is gone");

    let r = call("DELETE", &serve.state_url(STATE), None);
    assert_eq!(r.status, 200, "delete: {}", r.text());
    assert!(git_out(&repo, &["ls-tree", "-r", "--name-only", "main"]).lines().all(|l| l != STATE));
    fsck_clean(&repo);
    // More operations than sshd lets one session hold channels at once (MaxSessions 10): each
    // channel is closed after its operation.
    for i in 0..8 {
        let info = lock_info_value(&format!("cycle-{i}"), "alice@test", "OperationTypeApply").to_string();
        assert_eq!(call("LOCK", &serve.lock_url(STATE), Some(info.as_bytes())).status, 200);
        assert_eq!(call("UNLOCK", &serve.lock_url(STATE), Some(info.as_bytes())).status, 200);
    }
    // Every operation ran on the one session kept while warm: one key exchange, one login.
    assert_eq!(sshd.sessions_accepted(), 1, "{}", sshd.log());

    // A missing repository on the same host: 502, not an outage.
    let missing = serve_on(&sshd, &url.replace("states.git", "nothing-here.git"));
    let r = call("GET", &missing.state_url(STATE), None);
    assert_eq!(r.status, 502, "{}\n{}", r.text(), missing.stderr_log());
    assert!(r.header("retry-after").is_none());

    // The key never reaches the log.
    let key_line = sshd.client_key().private.lines().nth(1).unwrap().to_owned();
    assert!(!serve.stderr_log().contains(&key_line), "the private key is in the log");
}

#[test]
fn terraform_apply_plan_and_force_unlock_over_ssh() {
    let sshd = Sshd::start();
    let url = sshd.create_repo("tf.git");
    let serve = serve_on(&sshd, &url);
    let mut backend = HttpBackend::lock_unlock(serve.state_url(STATE));
    backend.username = Some(USER.into());
    backend.password = Some(PASSWORD.into());
    let mut tf = TfWorkdir::new(backend);
    tf.set_outputs(&[("x", "one")]);
    tf.init().assert_success();
    tf.apply().assert_success();
    tf.set_outputs(&[("x", "two")]);
    tf.apply().assert_success();
    tf.plan().assert_success();
    let stored = git_out(&sshd.repo_dir("tf.git"), &["show", &format!("main:{STATE}")]);
    assert!(stored.contains("\"two\""), "{stored}");
    // A lock left behind is broken by force-unlock.
    let info = lock_info_value("stale-lock", "gone@test", "OperationTypeApply").to_string();
    assert_eq!(call("LOCK", &serve.lock_url(STATE), Some(info.as_bytes())).status, 200);
    tf.apply().assert_failure();
    tf.force_unlock("stale-lock").assert_success();
    tf.apply().assert_success();
    fsck_clean(&sshd.repo_dir("tf.git"));

    // History from a fresh instance (its cache holds the tip only): deepened over SSH.
    let fresh = serve_on(&sshd, &url);
    let r = call("GET", &format!("{}/history/{STATE}?limit=10", fresh.base_url()), None);
    assert_eq!(r.status, 200, "{}\n{}", r.text(), fresh.stderr_log());
    let versions = r.json()["versions"].as_array().cloned().unwrap_or_default();
    let commits = git_out(&sshd.repo_dir("tf.git"), &["rev-list", "--count", "main"]);
    assert_eq!(versions.len().to_string(), commits, "every version of the state, read over SSH: {}", r.text());
    assert!(versions.len() >= 2);
}

#[test]
fn two_instances_race_for_one_lock_over_ssh_and_one_wins() {
    let sshd = Sshd::start();
    let url = sshd.create_repo("race.git");
    let a = serve_on(&sshd, &url);
    let b = serve_on(&sshd, &url);
    let lock_urls = [a.lock_url(STATE), b.lock_url(STATE)];
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let lock_url = lock_urls[i % 2].clone();
                s.spawn(move || {
                    let info = lock_info_value(&format!("racer-{i}"), "racer@test", "OperationTypeApply").to_string();
                    call("LOCK", &lock_url, Some(info.as_bytes())).status
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 1, "exactly one lock holder: {statuses:?}");
    assert!(statuses.iter().all(|s| *s == 200 || *s == 423), "{statuses:?}");
    // The holder on the host is the one both instances report.
    let holder = call("GET", &a.lock_url(STATE), None).json()["ID"].clone();
    assert_eq!(call("GET", &b.lock_url(STATE), None).json()["ID"], holder);
}

#[test]
fn a_refused_key_and_an_unpinned_host_key_are_502_naming_the_host() {
    let sshd = Sshd::start();
    let url = sshd.create_repo("states.git");

    // A key sshd does not accept: the deployment's own, so 502 (the caller cannot fix it).
    let stranger = sshd.stranger_key("stranger");
    let serve = serve_with(&url, &ssh_env(&stranger.private, &sshd.known_hosts_line()));
    let r = call("GET", &serve.state_url(STATE), None);
    assert_eq!(r.status, 502, "{}\n{}", r.text(), serve.stderr_log());
    assert!(r.text().contains("127.0.0.1"), "names the host: {}", r.text());
    assert!(r.header("retry-after").is_none() && r.header("www-authenticate").is_none());
    drop(serve);

    // Another key pinned for the host: sshd's key is refused, its fingerprint named.
    let impostor = sshd.stranger_key("impostor-host");
    let pinned = format!("[127.0.0.1]:{} {}", sshd.port(), impostor.public_key());
    let serve = serve_with(&url, &ssh_env(&sshd.client_key().private, &pinned));
    let r = call("GET", &serve.state_url(STATE), None);
    assert_eq!(r.status, 502, "{}", r.text());
    let fingerprint = sshd.host_key().fingerprint();
    assert!(r.text().contains("127.0.0.1") && r.text().contains(&fingerprint), "{fingerprint}: {}", r.text());
    assert!(r.header("retry-after").is_none());
    drop(serve);

    // Only a key of a type the host does not have is pinned: refused the same way.
    let rsa = gitstate_testkit::sshd::KeyPair::generate(tempfile::tempdir().unwrap().path(), "other-rsa", "rsa");
    let pinned = format!("[127.0.0.1]:{} {}", sshd.port(), rsa.public_key());
    let serve = serve_with(&url, &ssh_env(&sshd.client_key().private, &pinned));
    let r = call("GET", &serve.state_url(STATE), None);
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("127.0.0.1") && r.text().contains("ssh-ed25519"), "{}", r.text());
    // Nothing was written or authenticated: sshd saw no accepted key.
    assert!(!sshd.log().contains("Accepted publickey"), "{}", sshd.log());
}

#[test]
fn an_unreachable_or_silent_host_is_503() {
    let mut sshd = Sshd::start();
    let url = sshd.create_repo("states.git");
    let serve = serve_on(&sshd, &url);
    assert_eq!(call("GET", &serve.state_url(STATE), None).status, 204, "no state yet, host reached");
    sshd.stop();
    let r = call("GET", &serve.state_url(STATE), None);
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some());
    // Back again: the dead session is replaced by a new one.
    sshd.restart();
    assert_eq!(call("GET", &serve.state_url(STATE), None).status, 204);
    sshd.stop();
    sshd.restart();
    let info = lock_info_value("after-restart", "dave@test", "OperationTypeApply").to_string();
    assert_eq!(call("LOCK", &serve.lock_url(STATE), Some(info.as_bytes())).status, 200, "{}", serve.stderr_log());

    // A host that accepts the connection and never speaks: the deadline answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for c in silent.incoming().take(4) {
            conns.push(c);
        }
        std::thread::sleep(Duration::from_secs(30));
        drop(conns);
    });
    let silent_url = format!("ssh://git@127.0.0.1:{port}/x.git");
    let pinned = format!("[127.0.0.1]:{port} {}", sshd.host_key().public_key());
    let mut env = ssh_env(&sshd.client_key().private, &pinned);
    env.push(("GITSTATE_REQUEST_TIMEOUT".into(), "2".into()));
    let serve = serve_with(&silent_url, &env);
    let r = call("GET", &serve.state_url(STATE), None);
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some());
    drop(held);
}

#[test]
fn settings_that_cannot_work_refuse_to_start() {
    let sshd = Sshd::start();
    let url = sshd.create_repo("states.git");
    let key = sshd.client_key().private.clone();

    // No pinned key for the host (no trust on first use).
    let stderr = refused_start(&url, &ssh_env(&key, ""));
    assert!(stderr.contains("no host key pinned for 127.0.0.1"), "{stderr}");
    let other_port = format!("[127.0.0.1]:1 {}", sshd.host_key().public_key());
    let stderr = refused_start(&url, &ssh_env(&key, &other_port));
    assert!(stderr.contains("no host key pinned"), "{stderr}");

    // An ssh:// allowlist entry must name its host, whose key must be pinned too.
    let mut env = ssh_env(&key, &sshd.known_hosts_line());
    env.push(("GITSTATE_ALLOWED_REPOSITORIES".into(), "ssh://git@*.example.com/*".into()));
    assert!(refused_start(&url, &env).contains("must name its host"));
    let mut env = ssh_env(&key, &sshd.known_hosts_line());
    env.push(("GITSTATE_ALLOWED_REPOSITORIES".into(), "git@github.com:team/*".into()));
    assert!(refused_start(&url, &env).contains("no host key pinned for github.com"));

    // Passthrough: a caller's basic auth is never an SSH credential.
    let stderr = refused_start(&url, &[("GITSTATE_SSH_KNOWN_HOSTS".into(), sshd.known_hosts_line())]);
    assert!(stderr.contains("passthrough"), "{stderr}");
    let stderr = refused_start(&url, &[]);
    assert!(stderr.contains("passthrough"), "{stderr}");

    // No key, or one that cannot be read (never echoed).
    let mut env = ssh_env(&key, &sshd.known_hosts_line());
    env.retain(|(k, _)| k != "GITSTATE_SSH_KEY");
    env.push(("GITSTATE_GIT_USERNAME".into(), "u".into()));
    env.push(("GITSTATE_GIT_PASSWORD".into(), "p".into()));
    assert!(refused_start(&url, &env).contains("SSH key"));
    let stderr = refused_start(&url, &ssh_env("not-a-key-secret-material", &sshd.known_hosts_line()));
    assert!(stderr.contains("cannot be read") && !stderr.contains("secret-material"), "{stderr}");
}

#[test]
fn doctor_checks_an_ssh_host() {
    let sshd = Sshd::start();
    let url = sshd.create_repo("states.git");
    let run = |env: &[(String, String)]| {
        let mut cmd = Command::new(server_bin());
        cmd.args(["doctor", "--repository", &url]);
        for (k, _) in std::env::vars() {
            if k.starts_with("GITSTATE_") {
                cmd.env_remove(k);
            }
        }
        let out = cmd.envs(env.iter().map(|(k, v)| (k, v))).stdin(Stdio::null()).output().expect("run gitstate doctor");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.code().unwrap_or(-1), text)
    };
    let (code, text) = run(&ssh_env(&sshd.client_key().private, &sshd.known_hosts_line()));
    println!("doctor over SSH:\n{text}");
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("PASS  protocol v2"), "GIT_PROTOCOL reaches git-upload-pack: {text}");
    assert!(text.contains("PASS  atomic: offered") && text.contains("gitstate's promises hold on this host"), "{text}");
    assert!(git_out(&sshd.repo_dir("states.git"), &["for-each-ref", "refs/gitstate-doctor/"]).is_empty());
    // A refused key is named as such.
    let stranger = sshd.stranger_key("stranger");
    let (code, text) = run(&ssh_env(&stranger.private, &sshd.known_hosts_line()));
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("refused the deployment's SSH key"), "{text}");
}

#[test]
fn secret_mode_takes_the_key_and_known_hosts_from_the_secret() {
    use gitstate_testkit::moto::Moto;
    let sshd = Sshd::start();
    let url = sshd.create_repo("states.git");
    let moto = Moto::start();
    let secret = serde_json::json!({
        "ssh_private_key": sshd.client_key().private,
        "ssh_known_hosts": sshd.known_hosts_line(),
        "backend_username": USER,
        "backend_password": PASSWORD,
    });
    moto.create_secret("gitstate/ssh", &secret.to_string());
    let mut opts = ServeOpts::new()
        .repository(&url)
        .env("GITSTATE_AUTH", "secret")
        .env("GITSTATE_GIT_CREDENTIALS_SECRET", "gitstate/ssh")
        .env("PATH", "");
    for (k, v) in moto.aws_env() {
        opts = opts.env(k, v);
    }
    let serve = Serve::start(opts);
    let info = lock_info_value("secret-lock", "carol@test", "OperationTypeApply").to_string();
    let r = call("LOCK", &serve.lock_url(STATE), Some(info.as_bytes()));
    assert_eq!(r.status, 200, "{}\n{}", r.text(), serve.stderr_log());
    assert!(rev_parse(&sshd.repo_dir("states.git"), &format!("refs/heads/locks/{STATE}")).is_some());
    assert_eq!(call("UNLOCK", &serve.lock_url(STATE), Some(info.as_bytes())).status, 200);
    // Without the backend's basic auth nothing reaches the host.
    assert_eq!(http("GET", &serve.state_url(STATE), &[], None).status, 401);
    let key_line = sshd.client_key().private.lines().nth(1).unwrap().to_owned();
    assert!(!serve.stderr_log().contains(&key_line), "the private key is in the log");

    // A secret without a pinned key for the host: refused at start.
    let secret = serde_json::json!({
        "ssh_private_key": sshd.client_key().private,
        "backend_username": USER,
        "backend_password": PASSWORD,
    });
    moto.create_secret("gitstate/ssh-unpinned", &secret.to_string());
    let mut env = moto.aws_env();
    env.push(("GITSTATE_AUTH".into(), "secret".into()));
    env.push(("GITSTATE_GIT_CREDENTIALS_SECRET".into(), "gitstate/ssh-unpinned".into()));
    let stderr = refused_start(&url, &env);
    assert!(stderr.contains("no host key pinned for 127.0.0.1"), "{stderr}");
}

#[test]
fn rsa_and_ecdsa_keys_work_too() {
    let sshd = Sshd::start();
    let url = sshd.create_repo("states.git");
    for kind in ["rsa", "ecdsa"] {
        let key = sshd.authorized_key(&format!("client_{kind}"), kind);
        let serve = serve_with(&url, &ssh_env(&key.private, &sshd.known_hosts_line()));
        let info = lock_info_value(&format!("{kind}-lock"), "erin@test", "OperationTypeApply").to_string();
        let r = call("LOCK", &serve.lock_url(STATE), Some(info.as_bytes()));
        assert_eq!(r.status, 200, "{kind}: {}\n{}", r.text(), serve.stderr_log());
        assert_eq!(call("UNLOCK", &serve.lock_url(STATE), Some(info.as_bytes())).status, 200, "{kind}");
    }
    assert!(sshd.log().contains("Accepted publickey for") && sshd.log().contains("RSA"), "{}", sshd.log());
}

#[test]
fn a_host_with_several_keys_presents_the_pinned_one() {
    let sshd = Sshd::start_with_rsa_host_key();
    let url = sshd.create_repo("states.git");
    let rsa = sshd.second_host_key().unwrap();
    // Only the RSA host key is pinned: gitstate asks for it, as OpenSSH does with its known hosts.
    let pinned = format!("[127.0.0.1]:{} {}", sshd.port(), rsa.public_key());
    let serve = serve_with(&url, &ssh_env(&sshd.client_key().private, &pinned));
    let r = call("GET", &serve.state_url(STATE), None);
    assert_eq!(r.status, 204, "{}\n{}", r.text(), serve.stderr_log());
}
