//! The backend rules through `App::handle`, against the embedded store and against
//! a real `git daemon` (push enabled): lock races, concurrent writers from separate
//! instances, re-lock, force-unlock, rejected writes, commit trailers, fsck.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use gitstate::{app::App, config::Config, protocol::content_md5};
use gitstate_testkit::fixtures::{fsck_clean, lock_info, state};
use gitstate_testkit::gitd::{git, git_out, GitDaemon};
use gitstate_testkit::races::{call, request};

/// Where a test's repository lives and how to build more App instances over it.
enum Backing {
    Embedded { data_dir: PathBuf },
    Daemon { daemon: GitDaemon, url: String },
}

struct Fixture {
    backing: Backing,
    tmp: tempfile::TempDir,
    instances: std::cell::Cell<u32>,
}

impl Fixture {
    fn embedded() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        Fixture { backing: Backing::Embedded { data_dir: tmp.path().join("data") }, tmp, instances: 0.into() }
    }

    fn daemon() -> Self {
        let daemon = GitDaemon::start();
        let url = daemon.create_repo("states.git");
        Fixture { backing: Backing::Daemon { daemon, url }, tmp: tempfile::tempdir().unwrap(), instances: 0.into() }
    }

    /// A new App instance, as a separate process would have: its own cache directory.
    fn app(&self) -> Arc<App> {
        let n = self.instances.get();
        self.instances.set(n + 1);
        let mut config = Config { cache_dir: self.tmp.path().join(format!("cache-{n}")), ..Config::default() };
        match &self.backing {
            Backing::Embedded { data_dir } => config.data_dir = data_dir.clone(),
            Backing::Daemon { url, .. } => config.repository = Some(gitstate::storage::RepoUrl::parse(url).unwrap()),
        }
        Arc::new(App::open(config).expect("open the store"))
    }

    fn server_repo(&self) -> PathBuf {
        match &self.backing {
            Backing::Embedded { data_dir } => data_dir.join("repo.git"),
            Backing::Daemon { daemon, .. } => daemon.repo_dir("states.git"),
        }
    }
}

fn show(repo: &Path, spec: &str) -> String {
    String::from_utf8_lossy(&git(repo, &["show", spec]).stdout).into_owned()
}

async fn lockers_race(f: &Fixture) {
    let apps: Vec<Arc<App>> = (0..20).map(|_| f.app()).collect();
    let mut tasks = Vec::new();
    for (i, app) in apps.iter().enumerate() {
        let app = Arc::clone(app);
        tasks.push(tokio::spawn(async move {
            (i, call(&app, "LOCK", "/state/race.tfstate", &lock_info(&format!("locker-{i}"))).await)
        }));
    }
    let mut winners = Vec::new();
    let mut holders = Vec::new();
    for t in tasks {
        let (i, (status, body)) = t.await.unwrap();
        match status {
            200 => winners.push(i),
            423 => holders.push(body),
            other => panic!("locker {i}: unexpected status {other}: {body}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one locker wins");
    let winner = format!("locker-{}", winners[0]);
    assert_eq!(holders.len(), 19);
    for h in holders {
        let v: serde_json::Value = serde_json::from_str(&h).expect("423 body is the holder's LockInfo");
        assert_eq!(v["ID"], winner.as_str());
    }
    // The lock branch holds the winner's LockInfo, where terraform-backend-git looks for it.
    let stored = show(&f.server_repo(), "locks/race.tfstate:race.tfstate.lock");
    assert!(stored.contains(&winner));
    // Release so later scenarios start clean.
    assert_eq!(call(&apps[0], "UNLOCK", "/state/race.tfstate", &lock_info(&winner)).await.0, 200);
}

async fn lock_rules(f: &Fixture) {
    let a = f.app();
    let b = f.app();
    let p = "/state/envs/prod/terraform.tfstate";
    assert_eq!(call(&a, "LOCK", p, &lock_info("A")).await.0, 200);
    // Terraform retries after a lost answer: the same ID locking again is fine.
    assert_eq!(call(&b, "LOCK", p, &lock_info("A")).await.0, 200);
    let (s, body) = call(&b, "LOCK", p, &lock_info("B")).await;
    assert_eq!(s, 423);
    assert!(body.contains("\"ID\":\"A\""));
    let (s, body) = call(&b, "GET", "/lock/envs/prod/terraform.tfstate", "").await;
    assert_eq!((s, body.contains("\"ID\":\"A\"")), (200, true));
    // UNLOCK with another ID: 409 with the holder.
    let (s, body) = call(&b, "UNLOCK", p, &lock_info("B")).await;
    assert_eq!(s, 409);
    assert!(body.contains("\"ID\":\"A\""));
    // Writes: another ID → 423; the holder → 200; no ID while locked → 423.
    assert_eq!(call(&b, "POST", &format!("{p}?ID=B"), &state(1, "b")).await.0, 423);
    assert_eq!(call(&b, "POST", p, &state(1, "b")).await.0, 423);
    assert_eq!(call(&a, "POST", &format!("{p}?ID=A"), &state(1, "a")).await.0, 200);
    // Force-unlock (empty body) from another instance.
    assert_eq!(call(&b, "UNLOCK", p, "").await.0, 200);
    assert_eq!(call(&b, "GET", "/lock/envs/prod/terraform.tfstate", "").await.0, 404);
    // Unlocking a lock that is gone: 200.
    assert_eq!(call(&a, "UNLOCK", p, &lock_info("A")).await.0, 200);
    // A write under an ID that holds nothing: 409, nothing stored.
    assert_eq!(call(&a, "POST", &format!("{p}?ID=A"), &state(2, "stale")).await.0, 409);
    let (s, body) = call(&b, "GET", p, "").await;
    assert_eq!(s, 200);
    assert_eq!(body, state(1, "a"));
    // The same with the GitLab-style POST/DELETE on /lock/.
    let l = "/lock/envs/prod/terraform.tfstate";
    assert_eq!(call(&a, "POST", l, &lock_info("C")).await.0, 200);
    assert_eq!(call(&b, "POST", l, &lock_info("D")).await.0, 423);
    assert_eq!(call(&b, "DELETE", l, &lock_info("C")).await.0, 200);
    // Trailers of the locked write.
    let log = git_out(&f.server_repo(), &["log", "-1", "--format=%B", "main", "--", "envs/prod/terraform.tfstate"]);
    for needle in [
        "Update envs/prod/terraform.tfstate",
        "Lock-ID: A",
        "Who: A@test",
        "Operation: OperationTypeApply",
        "Serial: 1",
        "Lineage: lin-1",
    ] {
        assert!(log.contains(needle), "commit message lacks {needle:?}:\n{log}");
    }
}

async fn reads_writes_and_rejections(f: &Fixture) {
    let a = f.app();
    let p = "/state/app.tfstate";
    assert_eq!(call(&a, "GET", p, "").await.0, 204);
    let r = a.handle(request("POST", p, &state(1, "one"))).await;
    assert_eq!(r.status(), 200);
    let r = a.handle(request("GET", p, "")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.body(), state(1, "one").as_bytes());
    assert_eq!(r.headers()["content-md5"], content_md5(state(1, "one").as_bytes()).as_str());
    let commits =
        |f: &Fixture| git_out(&f.server_repo(), &["rev-list", "--count", "main"]).trim().parse::<u32>().unwrap();
    let before = commits(f);
    // Retried identical write: no new commit.
    assert_eq!(call(&a, "POST", p, &state(1, "one")).await.0, 200);
    assert_eq!(commits(f), before);
    // Rejections store nothing.
    let bad_md5 = http::Request::builder()
        .method("POST")
        .uri(p)
        .header("Content-MD5", content_md5(b"something else"))
        .body(Bytes::from(state(2, "two")))
        .unwrap();
    assert_eq!(a.handle(bad_md5).await.status(), 400);
    assert_eq!(call(&a, "POST", p, "this is not json").await.0, 400);
    assert_eq!(call(&a, "GET", "/state/../etc/passwd", "").await.0, 400);
    assert_eq!(call(&a, "GET", "/state/x.lock", "").await.0, 400);
    assert_eq!(call(&a, "PATCH", p, "").await.0, 405);
    assert_eq!(call(&a, "GET", "/state/app.tfstate?repository=git://127.0.0.1:1/elsewhere.git", "").await.0, 403);
    assert_eq!(commits(f), before);
    assert_eq!(show(&f.server_repo(), "main:app.tfstate"), state(1, "one"));
    // Stage prefix and the terraform-backend-git address reach the same state.
    assert_eq!(call(&a, "GET", "/prod/state/app.tfstate", "").await.1, state(1, "one"));
    assert_eq!(call(&a, "GET", "/?type=git&state=app.tfstate&ref=main", "").await.1, state(1, "one"));
    // Lineage/serial guard: an older serial or another lineage is refused; force=true overrides.
    assert_eq!(call(&a, "POST", p, &state(2, "two")).await.0, 200);
    let (s, body) = call(&a, "POST", p, &state(1, "older")).await;
    assert_eq!(s, 409);
    assert!(body.contains("serial 2") && body.contains("new one 1"), "{body}");
    assert_eq!(call(&a, "POST", p, &state(2, "same serial, other content")).await.0, 409);
    let other_lineage = state(3, "x").replace("lin-1", "lin-2");
    assert_eq!(call(&a, "POST", p, &other_lineage).await.0, 409);
    assert_eq!(show(&f.server_repo(), "main:app.tfstate"), state(2, "two"));
    assert_eq!(call(&a, "POST", &format!("{p}?force=true"), &state(1, "forced")).await.0, 200);
    assert_eq!(show(&f.server_repo(), "main:app.tfstate"), state(1, "forced"));
    // A path below an existing state is refused instead of replacing it.
    assert_eq!(call(&a, "POST", "/state/app.tfstate/inner", &state(1, "x")).await.0, 409);
    // DELETE.
    assert_eq!(call(&a, "DELETE", p, "").await.0, 200);
    assert_eq!(call(&a, "GET", p, "").await.0, 204);
    assert!(git_out(&f.server_repo(), &["log", "-1", "--format=%s", "main"]).starts_with("Delete app.tfstate"));
}

async fn concurrent_writers(f: &Fixture) {
    let a = f.app();
    let b = f.app();
    let ta = tokio::spawn(async move { call(&a, "POST", "/state/one.tfstate", &state(1, "first")).await });
    let tb = tokio::spawn(async move { call(&b, "POST", "/state/two.tfstate", &state(1, "second")).await });
    assert_eq!(ta.await.unwrap().0, 200);
    assert_eq!(tb.await.unwrap().0, 200);
    assert_eq!(show(&f.server_repo(), "main:one.tfstate"), state(1, "first"));
    assert_eq!(show(&f.server_repo(), "main:two.tfstate"), state(1, "second"));
}

async fn all(f: Fixture) {
    reads_writes_and_rejections(&f).await;
    lockers_race(&f).await;
    lock_rules(&f).await;
    concurrent_writers(&f).await;
    fsck_clean(&f.server_repo());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_store() {
    all(Fixture::embedded()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn git_daemon_store() {
    all(Fixture::daemon()).await;
}
