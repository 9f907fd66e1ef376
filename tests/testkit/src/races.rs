//! The race scenarios of the safety proof, shared word for word by
//! `tests/safety_races.rs` (a small round in every `cargo test`) and
//! `examples/stress.rs` (the full 1,000 trials). Every racer is its own `App`
//! with its own cache directory, as separate processes or Lambda instances
//! would be; the only thing they share is the git server, whose ref updates
//! (compare-and-swap pushes) are the only arbiter.
//!
//! Each scenario checks its invariants against the server repository with the
//! git CLI (an oracle independent of gitstate) and returns what it saw; a
//! broken invariant is reported in `violations`, never silently counted.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use super::fixtures::{lock_info, state_with_lineage};
use super::gitd::git_try;
use gitstate::storage::RepoUrl;
use gitstate::{app::App, config::Config, protocol::content_md5};

/// A new App over the remote `url` with its own cache under `cache_dir`.
pub fn new_app(url: &str, cache_dir: PathBuf) -> Arc<App> {
    new_app_with(Config::default(), url, cache_dir)
}

/// Like [`new_app`], with the other settings taken from `config`.
pub fn new_app_with(mut config: Config, url: &str, cache_dir: PathBuf) -> Arc<App> {
    config.repository = Some(RepoUrl::parse(url).unwrap_or_else(|e| panic!("repository URL {url}: {e}")));
    config.cache_dir = cache_dir;
    Arc::new(App::open(config).expect("open the store"))
}

/// A request as Terraform would send it (a POST of a state carries Content-MD5).
pub fn request(method: &str, uri: &str, body: &str) -> http::Request<Bytes> {
    let mut b = http::Request::builder().method(method).uri(uri);
    if method == "POST" && uri.starts_with("/state/") {
        b = b.header("Content-MD5", content_md5(body.as_bytes()));
    }
    b.body(Bytes::from(body.to_string())).unwrap_or_else(|e| panic!("{method} {uri}: {e}"))
}

/// One [`request`] through `App::handle`: (status, body).
pub async fn call(app: &Arc<App>, method: &str, uri: &str, body: &str) -> (u16, String) {
    let r = app.handle(request(method, uri, body)).await;
    (r.status().as_u16(), String::from_utf8_lossy(r.body()).into_owned())
}

/// `git show <rev>:<path>` on the server repository `repo`, `None` when absent.
pub fn server_file(repo: &Path, rev: &str, path: &str) -> Option<Vec<u8>> {
    let out = git_try(repo, &["show", &format!("{rev}:{path}")]);
    out.status.success().then_some(out.stdout)
}

/// Commits on `rev` of the server repository (0 when it does not exist).
pub fn server_commits(repo: &Path, rev: &str) -> u64 {
    let out = git_try(repo, &["rev-list", "--count", rev]);
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
}

/// Whether `refs/heads/<branch>` exists on the server.
pub fn server_has_branch(repo: &Path, branch: &str) -> bool {
    git_try(repo, &["rev-parse", "--verify", "-q", &format!("refs/heads/{branch}")]).status.success()
}

fn id_of(lock_info_json: &str) -> Option<String> {
    serde_json::from_str::<serde_json::Value>(lock_info_json).ok()?.get("ID")?.as_str().map(str::to_string)
}

fn serial_of(state_json: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(state_json).ok()?.get("serial")?.as_u64()
}

/// What one round of the lock race showed.
#[derive(Debug, Default)]
pub struct LockRound {
    /// LOCK answered 200.
    pub winners: usize,
    /// LOCK answered 423 naming the winner.
    pub refused: usize,
    pub violations: Vec<String>,
}

/// `apps.len()` lockers, each with its own ID, LOCK `path` at the same moment.
/// Exactly one must get 200; every other one 423 with the winner's LockInfo;
/// the server's lock branch must hold the winner's LockInfo. The winner then
/// releases the lock, and the lock branch must be gone.
pub async fn lock_round(apps: &[Arc<App>], server_repo: &Path, path: &str, round: usize) -> LockRound {
    let barrier = Arc::new(tokio::sync::Barrier::new(apps.len()));
    let mut tasks = Vec::new();
    for (i, app) in apps.iter().enumerate() {
        let app = Arc::clone(app);
        let barrier = Arc::clone(&barrier);
        let uri = format!("/state/{path}");
        let id = format!("r{round}-locker{i}");
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let (status, body) = call(&app, "LOCK", &uri, &lock_info(&id)).await;
            (id, status, body)
        }));
    }
    let mut out = LockRound::default();
    let mut winner_ids = Vec::new();
    let mut refusals = Vec::new();
    for t in tasks {
        let (id, status, body) = t.await.expect("locker task");
        match status {
            200 => {
                out.winners += 1;
                winner_ids.push(id);
            }
            423 => refusals.push((id, body)),
            other => out.violations.push(format!("round {round}: {id}: LOCK answered {other}: {}", body.trim())),
        }
    }
    if out.winners != 1 {
        out.violations.push(format!("round {round}: {} winners ({winner_ids:?}), expected exactly 1", out.winners));
    }
    let Some(winner) = winner_ids.first().cloned() else { return out };
    for (id, body) in refusals {
        match id_of(&body) {
            Some(holder) if holder == winner => out.refused += 1,
            holder => out
                .violations
                .push(format!("round {round}: {id} was refused naming {holder:?}, the winner is {winner}")),
        }
    }
    let lock_file = format!("{path}.lock");
    let stored = server_file(server_repo, &format!("refs/heads/locks/{path}"), &lock_file)
        .map(|b| String::from_utf8_lossy(&b).into_owned());
    if stored.as_deref().and_then(id_of).as_deref() != Some(winner.as_str()) {
        out.violations
            .push(format!("round {round}: the server's lock branch holds {stored:?}, the winner is {winner}"));
    }
    let winner_app = &apps[winner.rsplit("locker").next().unwrap().parse::<usize>().unwrap()];
    let (status, body) = call(winner_app, "UNLOCK", &format!("/state/{path}"), &lock_info(&winner)).await;
    if status != 200 {
        out.violations.push(format!("round {round}: the winner's UNLOCK answered {status}: {}", body.trim()));
    }
    if server_has_branch(server_repo, &format!("locks/{path}")) {
        out.violations.push(format!("round {round}: the lock branch survived the winner's UNLOCK"));
    }
    out
}

/// What one round of concurrent writers showed.
#[derive(Debug, Default)]
pub struct WritersRound {
    pub writes: usize,
    /// POST answered 200.
    pub landed: usize,
    /// A write answered 200 whose content is not in the final tree.
    pub lost: usize,
    pub violations: Vec<String>,
}

/// Every app writes its own state `<dir>/<i>.tfstate` (serial `round + 1`) at the same
/// moment, without a lock. All must land (200) and the server's final tree must hold
/// every state with exactly the content its writer sent last.
pub async fn writers_round(apps: &[Arc<App>], server_repo: &Path, dir: &str, round: usize) -> WritersRound {
    let barrier = Arc::new(tokio::sync::Barrier::new(apps.len()));
    let mut tasks = Vec::new();
    for (i, app) in apps.iter().enumerate() {
        let app = Arc::clone(app);
        let barrier = Arc::clone(&barrier);
        let path = format!("{dir}/{i}.tfstate");
        let body = state_with_lineage(&format!("writer-{i}"), round as u64 + 1, &format!("writer {i}, round {round}"));
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let (status, answer) = call(&app, "POST", &format!("/state/{path}"), &body).await;
            (path, body, status, answer)
        }));
    }
    let mut out = WritersRound::default();
    for t in tasks {
        let (path, body, status, answer) = t.await.expect("writer task");
        out.writes += 1;
        if status != 200 {
            out.violations.push(format!("round {round}: POST {path} answered {status}: {}", answer.trim()));
            continue;
        }
        out.landed += 1;
        let stored = server_file(server_repo, "refs/heads/main", &path);
        if stored.as_deref() != Some(body.as_bytes()) {
            out.lost += 1;
            out.violations.push(format!(
                "round {round}: {path} answered 200 but the final tree holds {:?}",
                stored.map(|s| String::from_utf8_lossy(&s).into_owned())
            ));
        }
    }
    out
}

/// What one round of two writers on one state showed.
#[derive(Debug, Default)]
pub struct PairRound {
    /// POST answered 200 (must be exactly 1).
    pub landed: usize,
    /// POST answered 409 (the stale writer; must be exactly 1).
    pub refused: usize,
    /// A 200 whose content was overwritten by the other writer.
    pub lost: usize,
    pub violations: Vec<String>,
}

/// Two apps read the state at `path` (each its own GET), then both write the next serial
/// with their own content at the same moment, without a lock (`terraform apply -lock=false`
/// twice). The guard must let exactly one land and refuse the other with 409; the server
/// must hold the winner's body byte for byte.
pub async fn pair_round(apps: [&Arc<App>; 2], server_repo: &Path, path: &str, round: usize) -> PairRound {
    let uri = format!("/state/{path}");
    let mut out = PairRound::default();
    let mut serials = Vec::new();
    for app in apps {
        match call(app, "GET", &uri, "").await {
            (200, body) => serials.push(serial_of(&body).unwrap_or(0)),
            (204, _) => serials.push(0),
            (status, body) => {
                out.violations.push(format!("round {round}: GET {path} answered {status}: {}", body.trim()));
                return out;
            }
        }
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let mut tasks = Vec::new();
    for (i, app) in apps.into_iter().enumerate() {
        let app = Arc::clone(app);
        let barrier = Arc::clone(&barrier);
        let uri = uri.clone();
        let body = state_with_lineage("pair", serials[i] + 1, &format!("writer {i}, round {round}"));
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let (status, answer) = call(&app, "POST", &uri, &body).await;
            (body, status, answer)
        }));
    }
    let mut landed = Vec::new();
    for t in tasks {
        let (body, status, answer) = t.await.expect("writer task");
        match status {
            200 => landed.push(body),
            409 => out.refused += 1,
            other => out.violations.push(format!("round {round}: POST {path} answered {other}: {}", answer.trim())),
        }
    }
    out.landed = landed.len();
    let stored = server_file(server_repo, "refs/heads/main", path).unwrap_or_default();
    out.lost = landed.iter().filter(|b| b.as_bytes() != stored.as_slice()).count();
    if out.landed != 1 || out.refused != 1 {
        out.violations.push(format!(
            "round {round}: {} writes landed and {} were refused; expected 1 and 1",
            out.landed, out.refused
        ));
    }
    if out.lost > 0 {
        out.violations.push(format!(
            "round {round}: {} acknowledged write(s) not stored; the server holds {:?}",
            out.lost,
            String::from_utf8_lossy(&stored)
        ));
    }
    out
}
