//! End-to-end: a real Terraform v1.0.3 against `gitstate serve` on its
//! embedded repository, checked through Terraform, through HTTP and through
//! the git CLI on the repository itself.
//!
//! Every scenario runs in both locking modes Terraform users configure:
//! Terraform's default `LOCK`/`UNLOCK` on the state address, and
//! `lock_method = "POST"`, `unlock_method = "DELETE"` on `/lock/<path>`.
//! Each test has its own server, data directory and Terraform directories.

use base64::Engine as _;
use gitstate_testkit::fixtures::{fsck_clean, lock_info_value};
use gitstate_testkit::serve::{http, http_json, HttpResponse, Serve, ServeOpts};
use gitstate_testkit::terraform::{HttpBackend, TfWorkdir};
use md5::{Digest, Md5};
use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq)]
enum LockMode {
    /// `lock_address = unlock_address = /state/<path>`, default methods LOCK/UNLOCK.
    LockUnlock,
    /// `lock_address = unlock_address = /lock/<path>`, POST/DELETE.
    PostDelete,
}

impl LockMode {
    fn backend(self, serve: &Serve, path: &str) -> HttpBackend {
        match self {
            LockMode::LockUnlock => HttpBackend::lock_unlock(serve.state_url(path)),
            LockMode::PostDelete => HttpBackend::post_delete(serve.state_url(path), serve.lock_url(path)),
        }
    }

    /// Take the lock the way Terraform configured in this mode would.
    fn lock(self, serve: &Serve, path: &str, info: &Value) -> HttpResponse {
        match self {
            LockMode::LockUnlock => http_json("LOCK", &serve.state_url(path), info),
            LockMode::PostDelete => http_json("POST", &serve.lock_url(path), info),
        }
    }

    /// Release the lock the way Terraform configured in this mode would.
    fn unlock(self, serve: &Serve, path: &str, info: &Value) -> HttpResponse {
        match self {
            LockMode::LockUnlock => http_json("UNLOCK", &serve.state_url(path), info),
            LockMode::PostDelete => http_json("DELETE", &serve.lock_url(path), info),
        }
    }
}

fn state_path(mode: LockMode) -> String {
    match mode {
        LockMode::LockUnlock => "envs/lock-unlock/terraform.tfstate".into(),
        LockMode::PostDelete => "envs/post-delete/terraform.tfstate".into(),
    }
}

/// Commits on `main` that touch `path`, newest first.
fn state_commits(serve: &Serve, path: &str) -> Vec<String> {
    serve.git_ok(&["log", "--format=%H", "main", "--", path]).lines().map(str::to_string).collect()
}

/// The trailers of `commit` as (key, value) pairs.
fn trailers(serve: &Serve, commit: &str) -> Vec<(String, String)> {
    serve
        .git_ok(&["log", "-1", "--format=%(trailers:only,unfold)", commit])
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn trailer<'a>(t: &'a [(String, String)], key: &str) -> Option<&'a str> {
    t.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// The lock branch `locks/<path>` exists in the repository.
fn lock_branch_exists(serve: &Serve, path: &str) -> bool {
    let out = serve.git(&["show-ref", "--verify", "--quiet", &format!("refs/heads/locks/{path}")]);
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!("git show-ref failed: {}", String::from_utf8_lossy(&out.stderr)),
    }
}

/// The state at `path` as stored on `main`, as Terraform pulls it, and as
/// gitstate serves it over HTTP are the same; returns it.
#[track_caller]
fn assert_stored_state(serve: &Serve, tf: &TfWorkdir, path: &str, expect_x: &str) -> Value {
    let stored = serve.git_raw(&["show", &format!("main:{path}")]);
    let stored_json: Value =
        serde_json::from_str(&stored).unwrap_or_else(|e| panic!("main:{path} is not JSON ({e}):\n{stored}"));
    assert_eq!(stored_json["outputs"]["x"]["value"], expect_x, "stored state:\n{stored}");

    let pulled = tf.state_pull();
    pulled.assert_success();
    let pulled_json: Value =
        serde_json::from_str(&pulled.stdout).unwrap_or_else(|e| panic!("state pull printed no JSON ({e}):\n{pulled}"));
    assert_eq!(stored_json, pulled_json, "git show main:{path} and `terraform state pull` differ");

    let got = http("GET", &serve.state_url(path), &[], None);
    assert_eq!(got.status, 200, "GET /state/{path}: {}", got.text());
    assert_eq!(got.text(), stored, "GET /state/{path} is not byte-equal to the blob on main");
    let md5 = base64::engine::general_purpose::STANDARD.encode(Md5::digest(&got.body));
    assert_eq!(got.header("Content-MD5"), Some(md5.as_str()), "GET /state/{path}: Content-MD5");
    stored_json
}

/// The newest commit on `main` is `Update <path>` by a Terraform apply, with
/// trailers matching `state`.
#[track_caller]
fn assert_apply_commit(serve: &Serve, commit: &str, path: &str, state: &Value) {
    let subject = serve.git_ok(&["log", "-1", "--format=%s", commit]);
    assert_eq!(subject.trim(), format!("Update {path}"), "commit {commit} subject");
    let t = trailers(serve, commit);
    let msg = serve.git_ok(&["log", "-1", "--format=%B", commit]);
    let lock_id = trailer(&t, "Lock-ID").unwrap_or_else(|| panic!("no Lock-ID trailer in:\n{msg}"));
    // Terraform's lock IDs are UUIDs.
    assert!(
        lock_id.len() == 36 && lock_id.matches('-').count() == 4,
        "Lock-ID trailer {lock_id:?} is not Terraform's lock ID (a UUID):\n{msg}"
    );
    let who = trailer(&t, "Who").unwrap_or_else(|| panic!("no Who trailer in:\n{msg}"));
    assert!(who.contains('@'), "Who trailer {who:?} is not Terraform's user@host:\n{msg}");
    assert_eq!(trailer(&t, "Operation"), Some("OperationTypeApply"), "Operation trailer in:\n{msg}");
    assert_eq!(trailer(&t, "Serial"), Some(state["serial"].to_string().as_str()), "Serial trailer in:\n{msg}");
    assert_eq!(trailer(&t, "Lineage"), state["lineage"].as_str(), "Lineage trailer in:\n{msg}");
}

/// `git fsck --strict` finds nothing wrong and no lock branch is left.
#[track_caller]
fn assert_repo_clean(serve: &Serve, path: &str) {
    fsck_clean(&serve.repo_git_dir());
    assert!(!lock_branch_exists(serve, path), "branch locks/{path} is left behind");
    let locks = serve.git_ok(&["for-each-ref", "--format=%(refname)", "refs/heads/locks/"]);
    assert_eq!(locks.trim(), "", "lock branches left behind");
}

/// init, apply, apply a change, plan: two commits with trailers, the stored
/// state equal to what Terraform pulls, no lock left.
fn apply_history(mode: LockMode) {
    let mut serve = Serve::start(ServeOpts::new());
    let path = state_path(mode);
    let mut tf = TfWorkdir::new(mode.backend(&serve, &path));
    tf.set_outputs(&[("x", "one")]);

    tf.init().assert_success();
    // init only reads: no state yet, so nothing is written.
    let got = http("GET", &serve.state_url(&path), &[], None);
    assert_eq!(got.status, 204, "GET before any apply: {}", got.text());

    let out = tf.apply();
    out.assert_success();
    assert!(out.stdout.contains("x = \"one\""), "apply output:\n{out}");
    assert!(!tf.has_errored_state(), "Terraform wrote errored.tfstate");
    let first_state = assert_stored_state(&serve, &tf, &path, "one");
    let commits = state_commits(&serve, &path);
    assert_eq!(commits.len(), 1, "commits touching {path} after the first apply: {commits:?}");
    assert_apply_commit(&serve, &commits[0], &path, &first_state);
    assert!(!lock_branch_exists(&serve, &path), "lock left after the first apply");

    tf.set_outputs(&[("x", "two")]);
    let out = tf.apply();
    out.assert_success();
    assert!(out.stdout.contains("x = \"two\""), "apply output:\n{out}");
    assert!(!tf.has_errored_state(), "Terraform wrote errored.tfstate");
    let second_state = assert_stored_state(&serve, &tf, &path, "two");
    let commits = state_commits(&serve, &path);
    assert_eq!(commits.len(), 2, "commits touching {path} after the second apply: {commits:?}");
    assert_apply_commit(&serve, &commits[0], &path, &second_state);
    assert_eq!(
        serve.git_ok(&["rev-parse", &format!("{}^", commits[0])]).trim(),
        commits[1],
        "the second write's parent is the first"
    );
    assert_eq!(second_state["lineage"], first_state["lineage"], "lineage changed");
    assert!(
        second_state["serial"].as_u64() > first_state["serial"].as_u64(),
        "serial did not grow: {} then {}",
        first_state["serial"],
        second_state["serial"]
    );
    // The older version is still in history.
    let old = serve.git_raw(&["show", &format!("{}:{path}", commits[1])]);
    assert_eq!(serde_json::from_str::<Value>(&old).unwrap(), first_state);

    // plan: locks (OperationTypePlan), reads, unlocks, writes nothing.
    let tip = serve.git_ok(&["rev-parse", "main"]);
    let out = tf.plan();
    assert_eq!(out.code(), Some(0), "plan should report no changes (exit 0):\n{out}");
    assert!(out.stdout.contains("No changes"), "plan output:\n{out}");
    assert_eq!(serve.git_ok(&["rev-parse", "main"]), tip, "plan moved main");
    let got = http("GET", &serve.lock_url(&path), &[], None);
    assert_eq!(got.status, 404, "GET /lock/{path} after plan: {}", got.text());

    // An apply with no change writes nothing either.
    let out = tf.apply();
    out.assert_success();
    assert_eq!(serve.git_ok(&["rev-parse", "main"]), tip, "an apply without changes moved main");

    serve.assert_running();
    assert_repo_clean(&serve, &path);
}

/// A lock held by someone else stops Terraform, which names the holder;
/// `terraform force-unlock` from another process frees it.
fn lock_conflict(mode: LockMode) {
    let mut serve = Serve::start(ServeOpts::new());
    let path = state_path(mode);
    let mut tf = TfWorkdir::new(mode.backend(&serve, &path));
    tf.set_outputs(&[("x", "one")]);
    tf.init().assert_success();
    tf.apply().assert_success();
    let tip = serve.git_ok(&["rev-parse", "main"]);

    // Someone else takes the lock.
    let held = lock_info_value("held-by-test", "tester", "OperationTypeApply");
    let got = mode.lock(&serve, &path, &held);
    assert_eq!(got.status, 200, "taking a free lock: {}", got.text());
    let got = http("GET", &serve.lock_url(&path), &[], None);
    assert_eq!(got.status, 200, "GET /lock/{path} while held: {}", got.text());
    assert_eq!(got.json()["ID"], "held-by-test");
    assert_eq!(got.json()["Who"], "tester");
    // ... and it is the branch locks/<path> holding <path>.lock.
    assert!(lock_branch_exists(&serve, &path), "no branch locks/{path} while the lock is held");
    let file = serve.git_ok(&["show", &format!("refs/heads/locks/{path}:{path}.lock")]);
    let file: Value = serde_json::from_str(&file).unwrap_or_else(|e| panic!("{path}.lock is not JSON ({e}): {file}"));
    assert_eq!(file["ID"], "held-by-test", "{path}.lock: {file}");
    assert_eq!(file["Who"], "tester", "{path}.lock: {file}");

    // Taking it again with the same LockInfo (a retry after a lost answer) succeeds.
    let got = mode.lock(&serve, &path, &held);
    assert_eq!(got.status, 200, "re-taking a lock with the holder's own LockInfo: {}", got.text());
    // Another ID is refused with the holder's LockInfo.
    let other = lock_info_value("someone-else", "other", "OperationTypeApply");
    let got = mode.lock(&serve, &path, &other);
    assert_eq!(got.status, 423, "taking a held lock: {}", got.text());
    assert_eq!(got.json()["ID"], "held-by-test", "the 423 body names the holder");
    // Releasing with another ID is refused and the lock stays.
    let got = mode.unlock(&serve, &path, &other);
    assert!(
        (400..500).contains(&got.status),
        "unlock with a wrong ID should be refused with a 4xx, got {}: {}",
        got.status,
        got.text()
    );
    let got = http("GET", &serve.lock_url(&path), &[], None);
    assert_eq!(got.status, 200, "lock gone after an unlock with the wrong ID: {}", got.text());
    assert_eq!(got.json()["ID"], "held-by-test");

    // Terraform cannot apply and names the holder.
    tf.set_outputs(&[("x", "two")]);
    let out = tf.apply();
    out.assert_failure();
    assert!(out.stderr.contains("held-by-test"), "apply should name the lock holder:\n{out}");
    assert!(out.stderr.contains("lock"), "apply should say it is about the lock:\n{out}");
    assert_eq!(serve.git_ok(&["rev-parse", "main"]), tip, "a refused apply moved main");
    assert_stored_state(&serve, &tf, &path, "one");

    // force-unlock from a fresh Terraform process in another directory: an
    // UNLOCK (or DELETE) with an empty body.
    let mut other_tf = TfWorkdir::new(mode.backend(&serve, &path));
    other_tf.set_outputs(&[("x", "one")]);
    other_tf.init().assert_success();
    let out = other_tf.force_unlock("held-by-test");
    out.assert_success();
    assert!(out.stdout.contains("successfully unlocked"), "force-unlock output:\n{out}");
    let got = http("GET", &serve.lock_url(&path), &[], None);
    assert_eq!(got.status, 404, "GET /lock/{path} after force-unlock: {}", got.text());
    assert!(!lock_branch_exists(&serve, &path), "branch locks/{path} survived force-unlock");

    // Now the apply goes through.
    let out = tf.apply();
    out.assert_success();
    let state = assert_stored_state(&serve, &tf, &path, "two");
    let commits = state_commits(&serve, &path);
    assert_eq!(commits.len(), 2, "commits touching {path}: {commits:?}");
    assert_apply_commit(&serve, &commits[0], &path, &state);

    serve.assert_running();
    assert_repo_clean(&serve, &path);
}

#[test]
fn apply_history_lock_unlock() {
    apply_history(LockMode::LockUnlock);
}

#[test]
fn apply_history_post_delete() {
    apply_history(LockMode::PostDelete);
}

#[test]
fn lock_conflict_lock_unlock() {
    lock_conflict(LockMode::LockUnlock);
}

#[test]
fn lock_conflict_post_delete() {
    lock_conflict(LockMode::PostDelete);
}
