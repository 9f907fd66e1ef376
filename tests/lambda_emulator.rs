//! End to end through the real Lambda emulator: `cargo lambda watch` runs the
//! `gitstate` binary as a Lambda function (its runtime API, function-URL events
//! at `/lambda-url/gitstate/<path>`), against a real `git daemon`, driven by a
//! real Terraform 1.0.3 in both locking modes (LOCK/UNLOCK on the state
//! address, and POST/DELETE on `/lock/<path>`, the mode API Gateway needs), and
//! by `cargo lambda invoke` with the API Gateway events of `events/`. Also:
//! a warm invocation reuses the `/tmp` cache and what the process knows, so a
//! second read of an unchanged state is one request to the git host and no fetch.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use base64::Engine as _;
use gitstate_testkit::fixtures::{fsck_clean, lock_info_value};
use gitstate_testkit::gitd::{git, git_out, rev_parse, GitDaemon};
use gitstate_testkit::lambda::Emulator;
use gitstate_testkit::repo_root;
use gitstate_testkit::serve::{http, http_json, HttpResponse};
use gitstate_testkit::terraform::{HttpBackend, TfWorkdir};
use md5::{Digest, Md5};
use serde_json::Value;

#[derive(Clone, Copy, Debug)]
enum LockMode {
    /// Terraform's default: LOCK/UNLOCK on the state address.
    LockUnlock,
    /// `lock_method = "POST"`, `unlock_method = "DELETE"` on `/lock/<path>`.
    PostDelete,
}

impl LockMode {
    fn backend(self, emu: &Emulator, path: &str) -> HttpBackend {
        match self {
            LockMode::LockUnlock => HttpBackend::lock_unlock(emu.state_url(path)),
            LockMode::PostDelete => HttpBackend::post_delete(emu.state_url(path), emu.lock_url(path)),
        }
    }

    fn lock(self, emu: &Emulator, path: &str, info: &Value) -> HttpResponse {
        match self {
            LockMode::LockUnlock => http_json("LOCK", &emu.state_url(path), info),
            LockMode::PostDelete => http_json("POST", &emu.lock_url(path), info),
        }
    }
}

/// `git daemon` with an empty `states.git`, and the emulator running gitstate on it.
struct Setup {
    daemon: GitDaemon,
    emu: Emulator,
    repo: PathBuf,
}

impl Setup {
    fn start() -> Setup {
        let daemon = GitDaemon::start();
        let url = daemon.create_repo("states.git");
        let repo = daemon.repo_dir("states.git");
        let emu = Emulator::start(&[("GITSTATE_REPOSITORY", url.as_str())]);
        Setup { daemon, emu, repo }
    }

    /// Connections the git daemon accepted so far (`git daemon --verbose` logs one line each).
    fn git_connections(&self) -> usize {
        self.daemon.log().lines().filter(|l| l.contains("Connection from")).count()
    }

    fn commits_touching(&self, path: &str) -> Vec<String> {
        git_out(&self.repo, &["log", "--format=%H", "main", "--", path]).lines().map(str::to_string).collect()
    }

    fn stored(&self, path: &str) -> Value {
        let text = git_out(&self.repo, &["show", &format!("main:{path}")]);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("main:{path} is not JSON ({e}):\n{text}"))
    }

    fn lock_branch(&self, path: &str) -> Option<String> {
        rev_parse(&self.repo, &format!("refs/heads/locks/{path}"))
    }
}

#[track_caller]
fn trailer(repo: &Path, commit: &str, key: &str) -> Option<String> {
    git_out(repo, &["log", "-1", "--format=%(trailers:only,unfold)", commit])
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_string())
}

/// init, two applies (two commits), a lock taken over HTTP that stops Terraform
/// (which names the holder), force-unlock from another Terraform, a third apply.
fn terraform_cycle(mode: LockMode, path: &str) {
    let s = Setup::start();
    let mut tf = TfWorkdir::new(mode.backend(&s.emu, path));
    tf.set_outputs(&[("x", "one")]);

    tf.init().assert_success();
    let got = http("GET", &s.emu.state_url(path), &[], None);
    assert_eq!(got.status, 204, "GET before any apply: {}", got.text());

    let out = tf.apply();
    out.assert_success();
    assert!(!tf.has_errored_state(), "Terraform wrote errored.tfstate:\n{out}");
    assert_eq!(s.stored(path)["outputs"]["x"]["value"], "one");
    let commits = s.commits_touching(path);
    assert_eq!(commits.len(), 1, "commits after the first apply: {commits:?}");
    let lock_id = trailer(&s.repo, &commits[0], "Lock-ID").expect("Lock-ID trailer");
    assert!(lock_id.len() == 36 && lock_id.matches('-').count() == 4, "Lock-ID {lock_id:?} is not Terraform's UUID");
    assert_eq!(trailer(&s.repo, &commits[0], "Operation").as_deref(), Some("OperationTypeApply"));
    assert_eq!(s.lock_branch(path), None, "lock left after apply");

    tf.set_outputs(&[("x", "two")]);
    tf.apply().assert_success();
    let second = s.stored(path);
    assert_eq!(second["outputs"]["x"]["value"], "two");
    let commits = s.commits_touching(path);
    assert_eq!(commits.len(), 2, "commits after the second apply: {commits:?}");
    assert_eq!(git_out(&s.repo, &["rev-parse", &format!("{}^", commits[0])]), commits[1], "parent of the second write");
    assert_eq!(trailer(&s.repo, &commits[0], "Serial").as_deref(), Some(second["serial"].to_string().as_str()));

    // What the function serves is the blob on main, with its Content-MD5.
    let got = http("GET", &s.emu.state_url(path), &[], None);
    assert_eq!(got.status, 200, "GET: {}", got.text());
    let blob = git(&s.repo, &["show", &format!("main:{path}")]).stdout;
    assert_eq!(got.body, blob, "GET is not byte-equal to main:{path}");
    let md5 = base64::engine::general_purpose::STANDARD.encode(Md5::digest(&got.body));
    assert_eq!(got.header("Content-MD5"), Some(md5.as_str()));

    // Someone else holds the lock: Terraform fails and names the holder.
    let held = lock_info_value("held-by-test", "tester@elsewhere", "OperationTypeApply");
    let got = mode.lock(&s.emu, path, &held);
    assert_eq!(got.status, 200, "taking a free lock: {}", got.text());
    assert!(s.lock_branch(path).is_some(), "no branch locks/{path} while held");
    let got = http("GET", &s.emu.lock_url(path), &[], None);
    assert_eq!(got.status, 200, "GET /lock/{path}: {}", got.text());
    assert_eq!(got.json()["ID"], "held-by-test");
    let tip = git_out(&s.repo, &["rev-parse", "main"]);
    tf.set_outputs(&[("x", "three")]);
    let out = tf.apply();
    out.assert_failure();
    assert!(out.stderr.contains("held-by-test"), "apply should name the lock holder:\n{out}");
    assert_eq!(git_out(&s.repo, &["rev-parse", "main"]), tip, "a refused apply moved main");

    // force-unlock from a fresh Terraform process (an unlock with an empty body).
    let other = TfWorkdir::new(mode.backend(&s.emu, path));
    other.init().assert_success();
    let out = other.force_unlock("held-by-test");
    out.assert_success();
    assert!(out.stdout.contains("successfully unlocked"), "force-unlock output:\n{out}");
    assert_eq!(s.lock_branch(path), None, "lock branch left after force-unlock");

    tf.apply().assert_success();
    assert_eq!(s.stored(path)["outputs"]["x"]["value"], "three");
    assert_eq!(s.commits_touching(path).len(), 3);

    let locks = git_out(&s.repo, &["for-each-ref", "--format=%(refname)", "refs/heads/locks/"]);
    assert_eq!(locks, "", "lock branches left behind");
    fsck_clean(&s.repo);
    // The function logged JSON lines with the request span.
    let log = s.emu.log();
    assert!(
        log.lines()
            .any(|l| l.starts_with('{') && l.contains("\"operation\":\"update\"") && l.contains("\"aws_request_id\"")),
        "no JSON log line of an update with its AWS request id in the emulator's output"
    );
}

#[test]
fn terraform_through_the_emulator_with_lock_and_unlock() {
    terraform_cycle(LockMode::LockUnlock, "envs/lock-unlock/terraform.tfstate");
}

#[test]
fn terraform_through_the_emulator_with_post_and_delete_on_lock() {
    terraform_cycle(LockMode::PostDelete, "envs/post-delete/terraform.tfstate");
}

/// Every file under `dir` with its size and modification time.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u64, SystemTime)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                out.insert(e.path().strip_prefix(dir).unwrap().to_path_buf(), (meta.len(), meta.modified().unwrap()));
            }
        }
    }
    out
}

/// The object files of every cache repository under `dir` (packs and loose objects).
fn objects(dir: &Path) -> BTreeMap<PathBuf, (u64, SystemTime)> {
    snapshot(dir).into_iter().filter(|(p, _)| p.components().any(|c| c.as_os_str() == "objects")).collect()
}

/// Write `content` at `path` on `main` of the bare repository `repo` with the git CLI, as another writer would.
fn seed_state(repo: &Path, path: &str, content: &str) {
    let work = tempfile::tempdir().unwrap();
    git(work.path(), &["init", "-q", "-b", "main"]);
    let file = work.path().join(path);
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, content).unwrap();
    git(work.path(), &["add", "."]);
    git(work.path(), &["commit", "-q", "-m", &format!("Update {path}")]);
    git(work.path(), &["push", "-q", &repo.display().to_string(), "main"]);
}

/// Two reads of an unchanged state in one warm environment: the first fills the
/// cache, the second costs one connection to the git host and fetches nothing.
/// Then `cargo lambda invoke` with REST v1 event files.
#[test]
fn warm_invocations_reuse_the_cache_and_invoke_takes_event_files() {
    let s = Setup::start();
    let path = "envs/prod/terraform.tfstate";
    // An earlier version of the state that events/v1-update.json writes (same lineage, lower serial).
    let seeded = "{\n  \"version\": 4,\n  \"serial\": 0,\n  \"lineage\": \"4c1f0e7a-3b2d-4e5f-8a9b-0c1d2e3f4a5b\",\n  \"outputs\": {}\n}\n";
    seed_state(&s.repo, path, seeded);
    let cache = s.emu.cache_dir();

    let before = s.git_connections();
    let objects_before = objects(&cache);
    let got = http("GET", &s.emu.state_url(path), &[], None);
    assert_eq!(got.status, 200, "first GET: {}", got.text());
    assert_eq!(got.text(), seeded);
    let after_first = s.git_connections();
    assert!(after_first > before, "the first GET did not reach the git host");
    assert_ne!(objects(&cache), objects_before, "the first GET fetched nothing into {}", cache.display());

    let objects_warm = objects(&cache);
    let got = http("GET", &s.emu.state_url(path), &[], None);
    assert_eq!(got.status, 200, "second GET: {}", got.text());
    assert_eq!(got.text(), seeded);
    assert_eq!(
        s.git_connections() - after_first,
        1,
        "a warm GET of an unchanged state should make exactly one connection to the git host\n--- daemon.log ---\n{}",
        s.daemon.log()
    );
    assert_eq!(objects(&cache), objects_warm, "the warm GET wrote objects: it fetched");

    // The REST v1 events (stage `prod`) through `cargo lambda invoke`, same environment.
    let events = repo_root().join("events");
    let answer = s.emu.invoke(&events.join("v1-get.json"));
    assert_eq!(answer["statusCode"], 200, "v1-get: {answer}");
    assert_eq!(answer["body"], seeded, "v1-get: {answer}");

    let connections = s.git_connections();
    let answer = s.emu.invoke(&events.join("v1-rejected.json"));
    assert_eq!(answer["statusCode"], 400, "v1-rejected: {answer}");
    assert!(answer["body"].as_str().unwrap_or("").contains("Content-MD5"), "v1-rejected: {answer}");
    assert_eq!(s.git_connections(), connections, "a rejected request reached the git host");

    let answer = s.emu.invoke(&events.join("v1-lock.json"));
    assert_eq!(answer["statusCode"], 200, "v1-lock: {answer}");
    let answer = s.emu.invoke(&events.join("v1-update.json"));
    assert_eq!(answer["statusCode"], 200, "v1-update: {answer}");
    let event: Value = serde_json::from_str(&std::fs::read_to_string(events.join("v1-update.json")).unwrap()).unwrap();
    let stored = git(&s.repo, &["show", &format!("main:{path}")]).stdout;
    assert_eq!(
        Some(String::from_utf8(stored).unwrap().as_str()),
        event["body"].as_str(),
        "main:{path} after v1-update"
    );
    let answer = s.emu.invoke(&events.join("v1-unlock.json"));
    assert_eq!(answer["statusCode"], 200, "v1-unlock: {answer}");
    assert_eq!(s.lock_branch(path), None, "lock branch left after v1-unlock");
}
