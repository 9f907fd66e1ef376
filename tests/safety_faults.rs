//! Safety under faults (issue 5): each fault must leave the stored state intact and
//! the next request working. Real components only: a `git daemon` that these tests
//! stop, kill (with its receive-pack and hooks) and restart on the same port, the
//! git CLI as the "someone else" who rewrites or deletes branches, and `App::handle`
//! in-process with its own cache directory.
//!
//! Each test prints its rows of the fault table (`FAULT | fault | request | status | ...`);
//! see them with `cargo test --test safety_faults -- --nocapture --test-threads=1`.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use gitstate::app::App;
use gitstate::protocol::content_md5;
use gitstate_testkit::fixtures::{fsck_clean, lock_info, state, state_with_lineage};
use gitstate_testkit::gitd::{git, git_out, rev_parse, GitDaemon};
use gitstate_testkit::races::{self, new_app, server_commits, server_file};

/// One App over one daemon repository, with its cache directory in view.
struct Setup {
    daemon: GitDaemon,
    name: String,
    url: String,
    tmp: tempfile::TempDir,
}

impl Setup {
    fn new(name: &str) -> Self {
        init_log();
        let daemon = GitDaemon::start();
        let url = daemon.create_repo(name);
        Setup { daemon, name: name.into(), url, tmp: tempfile::tempdir().unwrap() }
    }

    /// An App with its own cache directory `cache-<n>`.
    fn app(&self, n: u32) -> Arc<App> {
        new_app(&self.url, self.cache_dir(n))
    }

    fn cache_dir(&self, n: u32) -> PathBuf {
        self.tmp.path().join(format!("cache-{n}"))
    }

    fn server(&self) -> PathBuf {
        self.daemon.repo_dir(&self.name)
    }
}

/// gitstate's log on the test's output when `GITSTATE_TEST_LOG` is set (e.g. `gitstate=debug`).
fn init_log() {
    if let Ok(filter) = std::env::var("GITSTATE_TEST_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false).with_test_writer().try_init();
    }
}

/// What came back, with the header that tells Terraform when to retry.
struct Answer {
    status: u16,
    body: String,
    retry_after: Option<String>,
}

async fn send(app: &Arc<App>, method: &str, uri: &str, body: &str) -> Answer {
    let mut b = http::Request::builder().method(method).uri(uri);
    if method == "POST" && uri.starts_with("/state/") {
        b = b.header("Content-MD5", content_md5(body.as_bytes()));
    }
    let r = app.handle(b.body(Bytes::from(body.to_string())).unwrap()).await;
    Answer {
        status: r.status().as_u16(),
        body: String::from_utf8_lossy(r.body()).into_owned(),
        retry_after: r.headers().get("retry-after").map(|v| v.to_str().unwrap_or("?").to_string()),
    }
}

/// A row of the fault table.
fn row(fault: &str, request: &str, a: &Answer) {
    let body: String = a.body.split_whitespace().collect::<Vec<_>>().join(" ").chars().take(90).collect();
    let extra = a.retry_after.as_ref().map(|r| format!(" (Retry-After: {r})")).unwrap_or_default();
    println!("FAULT | {fault:<46} | {request:<30} | {}{extra} | {body}", a.status);
}

fn transient(a: &Answer, what: &str) {
    assert!(
        matches!(a.status, 502 | 503),
        "{what}: expected 502 or 503 (Terraform retries those), got {}: {}",
        a.status,
        a.body
    );
}

fn ok(a: &Answer, what: &str) {
    assert_eq!(a.status, 200, "{what}: {}", a.body);
}

/// The first request after a fault must work. When it does not, the same request is sent
/// twice more, so that the failure tells a transient answer from a stuck instance.
async fn next_request_works(app: &Arc<App>, fault: &str, request: &str, method: &str, uri: &str, body: &str) -> Answer {
    let r = send(app, method, uri, body).await;
    row(fault, request, &r);
    if r.status != 200 {
        let mut then = Vec::new();
        for _ in 0..2 {
            let again = send(app, method, uri, body).await;
            then.push(format!("{} {}", again.status, again.body.trim()));
        }
        panic!("{fault}: {request} answered {} ({}); sent again: {}", r.status, r.body.trim(), then.join("; then "));
    }
    r
}

fn main_file(server: &Path, file: &str) -> Option<String> {
    server_file(server, "refs/heads/main", file).map(|b| String::from_utf8(b).unwrap())
}

fn lock_tip(server: &Path, file: &str) -> Option<String> {
    rev_parse(server, &format!("refs/heads/locks/{file}"))
}

/// The git host is down (connection refused) when LOCK, POST and UNLOCK arrive: each
/// answers 502/503, nothing changes, and once the host is back the same request works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_host_down_during_lock_post_unlock() {
    let mut s = Setup::new("down.git");
    let a = s.app(0);
    let (p, file) = ("/state/down.tfstate", "down.tfstate");
    let one = state(1, "one");
    let two = state(2, "two");
    ok(&send(&a, "POST", p, &one).await, "first write");

    s.daemon.stop();
    let r = send(&a, "GET", p, "").await;
    row("git host down", "GET", &r);
    transient(&r, "GET while down");
    let r = send(&a, "LOCK", p, &lock_info("A")).await;
    row("git host down", "LOCK", &r);
    transient(&r, "LOCK while down");
    s.daemon.restart();
    assert_eq!(lock_tip(&s.server(), file), None, "no lock was half-taken");
    ok(&send(&a, "LOCK", p, &lock_info("A")).await, "LOCK after restart");

    s.daemon.stop();
    let r = send(&a, "POST", &format!("{p}?ID=A"), &two).await;
    row("git host down", "POST ?ID=A", &r);
    transient(&r, "POST while down");
    s.daemon.restart();
    assert_eq!(main_file(&s.server(), file), Some(one.clone()), "state intact");
    ok(&send(&a, "POST", &format!("{p}?ID=A"), &two).await, "POST after restart");

    s.daemon.stop();
    let r = send(&a, "UNLOCK", p, &lock_info("A")).await;
    row("git host down", "UNLOCK", &r);
    transient(&r, "UNLOCK while down");
    s.daemon.restart();
    assert!(lock_tip(&s.server(), file).is_some(), "the lock is still held");
    ok(&send(&a, "UNLOCK", p, &lock_info("A")).await, "UNLOCK after restart");
    assert_eq!(lock_tip(&s.server(), file), None);
    assert_eq!(send(&a, "GET", p, "").await.body, two);
    assert_eq!(server_commits(&s.server(), "main"), 2);
    fsck_clean(&s.server());
}

/// The git host dies in the middle of a push: a `pre-receive` hook (which runs once the pack
/// has arrived, before any ref moves) signals and sleeps, and the daemon's whole process group
/// is killed while gitstate waits for the report. Each of POST, LOCK and UNLOCK answers
/// 502/503, no ref moved, and Terraform's retry of the same request after the restart works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_host_killed_in_the_middle_of_a_push() {
    let mut s = Setup::new("killed.git");
    let a = s.app(0);
    let (p, file) = ("/state/killed.tfstate", "killed.tfstate");
    let one = state(1, "one");
    let two = state(2, "two");
    ok(&send(&a, "POST", p, &one).await, "first write");
    let marker = s.tmp.path().join("push-arrived");
    let hook = s.server().join("hooks").join("pre-receive");

    for (request, method, uri, body) in [
        ("POST (push killed)", "POST", p.to_string(), two.clone()),
        ("LOCK (push killed)", "LOCK", p.to_string(), lock_info("A")),
        ("UNLOCK (push killed)", "UNLOCK", p.to_string(), lock_info("A")),
    ] {
        std::fs::write(&hook, format!("#!/bin/sh\ncat >/dev/null\ntouch '{}'\nexec sleep 120\n", marker.display()))
            .unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let (before_main, before_lock) = (rev_parse(&s.server(), "refs/heads/main"), lock_tip(&s.server(), file));
        let task = {
            let (a, method, uri, body) = (Arc::clone(&a), method.to_string(), uri.clone(), body.clone());
            tokio::spawn(async move { send(&a, &method, &uri, &body).await })
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !marker.exists() {
            assert!(Instant::now() < deadline, "{request}: the push never reached the hook");
            assert!(!task.is_finished(), "{request}: finished before its push reached the hook");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        s.daemon.stop();
        let r = task.await.unwrap();
        row("git host killed mid-push (pre-receive waits)", request, &r);
        transient(&r, request);
        std::fs::remove_file(&marker).unwrap();
        std::fs::remove_file(&hook).unwrap();
        s.daemon.restart();
        assert_eq!(rev_parse(&s.server(), "refs/heads/main"), before_main, "{request}: main did not move");
        assert_eq!(lock_tip(&s.server(), file), before_lock, "{request}: the lock branch did not move");
        // Terraform retries the same request.
        let r = send(&a, method, &uri, &body).await;
        row("  ... and Terraform's retry after restart", request, &r);
        ok(&r, &format!("{request}: retry after restart"));
    }
    assert_eq!(main_file(&s.server(), file), Some(two));
    assert_eq!(lock_tip(&s.server(), file), None);
    assert_eq!(server_commits(&s.server(), "main"), 2, "the retried write is one commit");
    fsck_clean(&s.server());
}

/// The cache directory vanishes between requests (e.g. /tmp cleaned under a warm instance):
/// every next request works from the remote again. `first` is the request that meets the
/// missing cache first; the other steps follow, each after another `rm -rf`.
async fn cache_directory_deleted(name: &str, first: &str) {
    let s = Setup::new(name);
    let a = s.app(0);
    let (p, file) = ("/state/rm.tfstate", "rm.tfstate");
    ok(&send(&a, "POST", p, &state(1, "one")).await, "first write");
    assert_eq!(send(&a, "GET", p, "").await.body, state(1, "one"));
    let mut steps: Vec<(&str, &str, String, String)> = vec![
        ("GET", "GET", p.into(), String::new()),
        ("POST", "POST", p.into(), state(2, "two")),
        ("LOCK", "LOCK", p.into(), lock_info("A")),
        ("POST ?ID=A", "POST", format!("{p}?ID=A"), state(3, "three")),
        ("UNLOCK", "UNLOCK", p.into(), lock_info("A")),
    ];
    if first == "POST" {
        steps.swap(0, 1);
    }
    for (request, method, uri, body) in steps {
        std::fs::remove_dir_all(s.cache_dir(0)).expect("remove the cache directory");
        let r = next_request_works(&a, "cache directory deleted (rm -rf)", request, method, &uri, &body).await;
        if request == "GET" {
            let serial = if first == "POST" { 2 } else { 1 };
            assert_eq!(serial_of(&r.body), Some(serial), "{}", r.body);
        }
    }
    assert_eq!(main_file(&s.server(), file), Some(state(3, "three")));
    assert_eq!(lock_tip(&s.server(), file), None);
    fsck_clean(&s.server());
}

fn serial_of(body: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(body).ok()?.get("serial")?.as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_directory_deleted_then_get() {
    cache_directory_deleted("rmcache-get.git", "GET").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_directory_deleted_then_post() {
    cache_directory_deleted("rmcache-post.git", "POST").await;
}

/// Overwrite every file under the cache's `objects/` (loose objects, packs, indexes) with
/// garbage of the same length (same length: a shrinking file under a live mmap would be a
/// different fault, SIGBUS, which no program survives).
fn corrupt_objects(cache_dir: &Path) -> usize {
    fn walk(dir: &Path, n: &mut usize) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(&path, n);
            } else if path.is_file() {
                let len = std::fs::metadata(&path).unwrap().len() as usize;
                let garbage: Vec<u8> = (0..len).map(|_| fastrand::u8(..)).collect();
                let mut perms = std::fs::metadata(&path).unwrap().permissions();
                #[allow(clippy::permissions_set_readonly_false)]
                perms.set_readonly(false);
                std::fs::set_permissions(&path, perms).unwrap();
                let mut f = OpenOptions::new().write(true).open(&path).unwrap();
                std::io::Write::write_all(&mut f, &garbage).unwrap();
                *n += 1;
            }
        }
    }
    let mut n = 0;
    for repo in std::fs::read_dir(cache_dir).unwrap().flatten() {
        walk(&repo.path().join("objects"), &mut n);
    }
    n
}

/// Two instances' worth of history in a cache: a write of our own (loose objects) and one
/// fetched from the other instance's write (a pack).
async fn cache_with_history(s: &Setup) -> Arc<App> {
    let a = s.app(0);
    let p = "/state/corrupt.tfstate";
    ok(&send(&a, "POST", p, &state(1, "one")).await, "first write");
    let other = s.app(1);
    ok(&send(&other, "POST", p, &state(2, "two")).await, "other instance");
    assert_eq!(send(&a, "GET", p, "").await.body, state(2, "two"));
    a
}

/// Cache objects corrupted between requests of a warm instance: every next request works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_object_corrupted_between_requests_warm_instance() {
    let s = Setup::new("corrupt-warm.git");
    let a = cache_with_history(&s).await;
    let (p, file) = ("/state/corrupt.tfstate", "corrupt.tfstate");
    let fault = "cache objects corrupted (warm instance)";
    assert!(corrupt_objects(&s.cache_dir(0)) > 0, "there were objects to corrupt");
    let r = next_request_works(&a, fault, "GET", "GET", p, "").await;
    assert_eq!(r.body, state(2, "two"));
    corrupt_objects(&s.cache_dir(0));
    next_request_works(&a, fault, "POST", "POST", p, &state(3, "three")).await;
    corrupt_objects(&s.cache_dir(0));
    next_request_works(&a, fault, "LOCK", "LOCK", p, &lock_info("A")).await;
    corrupt_objects(&s.cache_dir(0));
    next_request_works(&a, fault, "UNLOCK", "UNLOCK", p, &lock_info("A")).await;
    assert_eq!(main_file(&s.server(), file), Some(state(3, "three")));
    fsck_clean(&s.server());
}

/// A new instance opens a cache whose objects are corrupt (a process restarted on the same
/// /tmp): its requests work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_object_corrupted_under_a_new_instance() {
    let s = Setup::new("corrupt-cold.git");
    drop(cache_with_history(&s).await);
    let (p, file) = ("/state/corrupt.tfstate", "corrupt.tfstate");
    let fault = "cache objects corrupted (new instance)";
    assert!(corrupt_objects(&s.cache_dir(0)) > 0, "there were objects to corrupt");
    let b = s.app(0);
    let r = next_request_works(&b, fault, "GET", "GET", p, "").await;
    assert_eq!(r.body, state(2, "two"));
    corrupt_objects(&s.cache_dir(0));
    let c = s.app(0);
    next_request_works(&c, fault, "POST", "POST", p, &state(3, "three")).await;
    assert_eq!(main_file(&s.server(), file), Some(state(3, "three")));
    fsck_clean(&s.server());
}

/// Someone force-pushes an unrelated history to `main`. gitstate shows what is there now,
/// the lineage guard refuses a write of the old lineage over it (409, unless `force=true`),
/// and a write of the new lineage lands on top of the new history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_branch_force_rewritten_by_someone_else() {
    let s = Setup::new("rewrite.git");
    let a = s.app(0);
    let (p, file) = ("/state/app.tfstate", "app.tfstate");
    ok(&send(&a, "POST", p, &state_with_lineage("ours", 5, "ours")).await, "our write");
    ok(&send(&a, "POST", "/state/other.tfstate", &state_with_lineage("o", 1, "other")).await, "another state");

    // Someone else, with the git CLI: an unrelated history, force-pushed over main.
    let work = s.tmp.path().join("someone");
    git(s.tmp.path(), &["init", "-q", "-b", "main", &work.display().to_string()]);
    let theirs = state_with_lineage("theirs", 1, "theirs");
    std::fs::write(work.join(file), &theirs).unwrap();
    git(&work, &["add", file]);
    git(&work, &["commit", "-q", "-m", "unrelated history"]);
    git(&work, &["push", "-q", "--force", &s.url, "main"]);
    let their_tip = git_out(&work, &["rev-parse", "HEAD"]);
    assert_eq!(rev_parse(&s.server(), "refs/heads/main").as_deref(), Some(their_tip.as_str()));

    let r = send(&a, "GET", p, "").await;
    row("main force-rewritten (unrelated history)", "GET", &r);
    ok(&r, "GET after the rewrite");
    assert_eq!(r.body, theirs, "GET shows what is there now");
    let r = send(&a, "GET", "/state/other.tfstate", "").await;
    row("main force-rewritten (unrelated history)", "GET (state not in new history)", &r);
    assert_eq!(r.status, 204);

    let r = send(&a, "POST", p, &state_with_lineage("ours", 6, "ours again")).await;
    row("main force-rewritten (unrelated history)", "POST old lineage", &r);
    assert_eq!(r.status, 409, "the lineage guard refuses: {}", r.body);
    assert!(r.body.contains("lineage"), "{}", r.body);
    assert_eq!(main_file(&s.server(), file), Some(theirs.clone()));

    let r = send(&a, "POST", p, &state_with_lineage("theirs", 2, "on their history")).await;
    row("main force-rewritten (unrelated history)", "POST new lineage", &r);
    ok(&r, "a write of the new lineage");
    assert_eq!(git_out(&s.server(), &["rev-parse", "main^"]), their_tip, "built on the new history");

    let r = send(&a, "POST", &format!("{p}?force=true"), &state_with_lineage("ours", 7, "forced")).await;
    row("main force-rewritten (unrelated history)", "POST old lineage ?force=true", &r);
    ok(&r, "force=true overrides the guard");
    assert_eq!(main_file(&s.server(), file), Some(state_with_lineage("ours", 7, "forced")));
    fsck_clean(&s.server());
}

/// Someone deletes the lock branch by hand while A holds it: A's write under its old ID
/// is refused (409: no lock with that ID), the state is untouched, and LOCK works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_branch_deleted_by_hand() {
    let s = Setup::new("dellock.git");
    let (a, b) = (s.app(0), s.app(1));
    let (p, file) = ("/state/envs/dev/terraform.tfstate", "envs/dev/terraform.tfstate");
    let one = state(1, "one");
    ok(&send(&a, "POST", p, &one).await, "first write");
    ok(&send(&a, "LOCK", p, &lock_info("A")).await, "A locks");
    git(&s.server(), &["update-ref", "-d", &format!("refs/heads/locks/{file}")]);

    let r = send(&a, "POST", &format!("{p}?ID=A"), &state(2, "A's write")).await;
    row("lock branch deleted by hand", "POST ?ID=<old id>", &r);
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(main_file(&s.server(), file), Some(one));
    let r = send(&a, "GET", "/lock/envs/dev/terraform.tfstate", "").await;
    row("lock branch deleted by hand", "GET /lock", &r);
    assert_eq!(r.status, 404);
    let r = send(&b, "LOCK", p, &lock_info("B")).await;
    row("lock branch deleted by hand", "LOCK (another client)", &r);
    ok(&r, "LOCK works again");
    ok(&send(&b, "POST", &format!("{p}?ID=B"), &state(2, "B's write")).await, "B writes");
    let r = send(&a, "UNLOCK", p, &lock_info("A")).await;
    row("lock branch deleted by hand", "UNLOCK <old id> (B holds)", &r);
    assert_eq!(r.status, 409, "A's UNLOCK must not release B's lock: {}", r.body);
    ok(&send(&b, "UNLOCK", p, &lock_info("B")).await, "B unlocks");
    fsck_clean(&s.server());
}

/// The remote repository is replaced by an empty one (rm -rf, git init --bare): no state,
/// no lock; a write creates the branch; LOCK works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_repository_replaced_by_an_empty_one() {
    let s = Setup::new("replaced.git");
    let a = s.app(0);
    let (p, file) = ("/state/replaced.tfstate", "replaced.tfstate");
    ok(&send(&a, "POST", p, &state(3, "before")).await, "first write");
    ok(&send(&a, "LOCK", p, &lock_info("A")).await, "A locks");
    std::fs::remove_dir_all(s.server()).unwrap();
    s.daemon.create_repo(&s.name);

    let r = send(&a, "GET", p, "").await;
    row("remote replaced by an empty repository", "GET", &r);
    assert_eq!(r.status, 204, "{}", r.body);
    let r = send(&a, "GET", "/lock/replaced.tfstate", "").await;
    row("remote replaced by an empty repository", "GET /lock", &r);
    assert_eq!(r.status, 404);
    let r = send(&a, "POST", &format!("{p}?ID=A"), &state(4, "under a lost lock")).await;
    row("remote replaced by an empty repository", "POST ?ID=<old id>", &r);
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(!races::server_has_branch(&s.server(), "main"));
    let r = send(&a, "POST", p, &state(4, "after")).await;
    row("remote replaced by an empty repository", "POST", &r);
    ok(&r, "a write creates the branch");
    assert_eq!(main_file(&s.server(), file), Some(state(4, "after")));
    assert_eq!(server_commits(&s.server(), "main"), 1);
    let r = send(&a, "LOCK", p, &lock_info("A")).await;
    row("remote replaced by an empty repository", "LOCK", &r);
    ok(&r, "LOCK on the new repository");
    ok(&send(&a, "UNLOCK", p, &lock_info("A")).await, "UNLOCK");
    fsck_clean(&s.server());
}

/// A warm instance lives through many requests while others move the branch: every sync
/// then fetches the new tip into its cache, one pack per fetch. It must keep working however
/// many requests it serves (e.g. a Lambda instance kept warm for hours).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_instance_keeps_working_after_many_fetches() {
    let s = Setup::new("warm.git");
    let (a, b) = (s.app(0), s.app(1));
    let p = "/state/warm.tfstate";
    let mut first_failure = None;
    for serial in 1..=40u64 {
        // B writes, so A's next request has a new tip to fetch; then A reads and writes on top.
        ok(&send(&b, "POST", "/state/other.tfstate", &state_with_lineage("other", serial, "b")).await, "B's write");
        let r = send(&a, "POST", p, &state(serial, "a")).await;
        if r.status != 200 && first_failure.is_none() {
            let packs = std::fs::read_dir(s.cache_dir(0))
                .unwrap()
                .flatten()
                .filter_map(|repo| std::fs::read_dir(repo.path().join("objects/pack")).ok())
                .flat_map(|d| d.flatten())
                .filter(|e| e.path().extension().is_some_and(|x| x == "idx"))
                .count();
            row("warm instance, many fetched packs", &format!("POST #{serial} ({packs} packs in cache)"), &r);
            first_failure = Some(format!(
                "write #{serial} answered {} with {packs} packs in the cache: {}",
                r.status,
                r.body.trim()
            ));
        }
    }
    let r = send(&a, "GET", p, "").await;
    row("warm instance, many fetched packs", "GET after 40 rounds", &r);
    assert!(first_failure.is_none(), "{}", first_failure.unwrap());
    assert_eq!(r.body, state(40, "a"));
}
