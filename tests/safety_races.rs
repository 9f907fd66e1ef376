//! Safety under races (issue 5), against a real `git daemon`, every racer its own
//! `App` with its own cache: a small round of the stress command's scenarios
//! (`gitstate_testkit::races`, the same code `examples/stress.rs` runs 1,000 times),
//! and lock/write atomicity: a write under a lock that was force-unlocked and
//! taken by someone else is refused and leaves the state exactly as the new
//! holder left it, on a server with receive-pack's `atomic` and on one without
//! (the check-then-push fallback); and, where `atomic` is offered, even when the
//! lock moves inside the push itself (a `pre-receive` hook moves it).
//!
//! Run: `cargo test --test safety_races -- --nocapture`.

use std::sync::Arc;

use gitstate::app::App;
use gitstate_testkit::fixtures::{fsck_clean, lock_info, state, state_with_lineage};
use gitstate_testkit::gitd::{git_out, git_with_input, GitDaemon};
use gitstate_testkit::races::{self, call, new_app, server_commits, server_file};

/// Separate instances over one daemon repository.
struct Fleet {
    daemon: GitDaemon,
    repo: String,
    url: String,
    tmp: tempfile::TempDir,
    made: std::sync::atomic::AtomicUsize,
}

impl Fleet {
    fn new(repo: &str) -> Self {
        init_log();
        let daemon = GitDaemon::start();
        let url = daemon.create_repo(repo);
        Fleet { daemon, repo: repo.into(), url, tmp: tempfile::tempdir().unwrap(), made: 0.into() }
    }

    /// A repository whose receive-pack does not offer `atomic` (gitstate falls back to check-then-push).
    fn without_atomic(repo: &str) -> Self {
        let f = Fleet::new(repo);
        git_out(&f.server_repo(), &["config", "receive.advertiseAtomic", "false"]);
        f
    }

    /// A new App instance with a cache directory of its own.
    fn app(&self) -> Arc<App> {
        let n = self.made.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        new_app(&self.url, self.tmp.path().join(format!("cache-{n}")))
    }

    fn apps(&self, n: usize) -> Vec<Arc<App>> {
        (0..n).map(|_| self.app()).collect()
    }

    fn server_repo(&self) -> std::path::PathBuf {
        self.daemon.repo_dir(&self.repo)
    }
}

/// gitstate's log on the test's output when `GITSTATE_TEST_LOG` is set (e.g. `gitstate=debug`).
fn init_log() {
    if let Ok(filter) = std::env::var("GITSTATE_TEST_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false).with_test_writer().try_init();
    }
}

/// 5 rounds × 10 lockers, fresh instances (cold caches) every round: exactly one winner each round.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lock_race_exactly_one_winner_every_round() {
    let f = Fleet::new("locks.git");
    let (rounds, lockers) = (5, 10);
    let mut winners = Vec::new();
    for round in 0..rounds {
        let apps = f.apps(lockers);
        let r = races::lock_round(&apps, &f.server_repo(), "envs/race/terraform.tfstate", round).await;
        assert!(r.violations.is_empty(), "{}", r.violations.join("\n"));
        assert_eq!((r.winners, r.refused), (1, lockers - 1));
        winners.push(r.winners);
    }
    println!("lock race: {} trials, winners per round {winners:?}", rounds * lockers);
    fsck_clean(&f.server_repo());
}

/// 16 instances write 16 distinct states of one repository at once, twice: all land and the
/// final tree holds each state with the content its writer sent last.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_writers_on_distinct_states_all_land() {
    let f = Fleet::new("writers.git");
    let apps = f.apps(16);
    for round in 0..2 {
        let r = races::writers_round(&apps, &f.server_repo(), "team", round).await;
        assert!(r.violations.is_empty(), "{}", r.violations.join("\n"));
        assert_eq!((r.writes, r.landed, r.lost), (16, 16, 0));
    }
    // Every landed write is one commit: nothing was rebuilt into a duplicate or dropped.
    assert_eq!(server_commits(&f.server_repo(), "main"), 32);
    for i in 0..16 {
        let want = state_with_lineage(&format!("writer-{i}"), 2, &format!("writer {i}, round 1"));
        assert_eq!(
            server_file(&f.server_repo(), "main", &format!("team/{i}.tfstate")).as_deref(),
            Some(want.as_bytes())
        );
    }
    fsck_clean(&f.server_repo());
}

/// Two instances read the same state and write the next serial at once without a lock:
/// exactly one lands, the stale one gets 409, the winner's body is what is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_writers_one_state_the_guard_refuses_the_stale_one() {
    let f = Fleet::new("pair.git");
    let (a, b) = (f.app(), f.app());
    for round in 0..4 {
        let r = races::pair_round([&a, &b], &f.server_repo(), "shared.tfstate", round).await;
        assert!(r.violations.is_empty(), "{}", r.violations.join("\n"));
        assert_eq!((r.landed, r.refused, r.lost), (1, 1, 0));
    }
    assert_eq!(server_commits(&f.server_repo(), "main"), 4, "one commit per round: the refused writes stored nothing");
}

/// A holds the lock; an operator force-unlocks it (empty UNLOCK, as `terraform force-unlock`
/// sends); B takes it. A's writes under its old ID are refused, whether B has written yet or
/// not, and the stored state stays byte for byte what B left.
async fn force_unlocked_writer_is_refused(f: &Fleet) {
    let (a, b, operator) = (f.app(), f.app(), f.app());
    let p = "/state/envs/prod/terraform.tfstate";
    let file = "envs/prod/terraform.tfstate";
    let base = state(1, "base");
    assert_eq!(call(&a, "POST", p, &base).await.0, 200);
    assert_eq!(call(&a, "LOCK", p, &lock_info("A")).await.0, 200);
    assert_eq!(call(&a, "GET", p, "").await, (200, base.clone()));

    assert_eq!(call(&operator, "UNLOCK", p, "").await.0, 200, "force-unlock");
    assert_eq!(call(&b, "LOCK", p, &lock_info("B")).await.0, 200);

    // B holds the lock and has written nothing yet: A's write (a newer serial, so only the lock can refuse it).
    let commits = server_commits(&f.server_repo(), "main");
    let (s, body) = call(&a, "POST", &format!("{p}?ID=A"), &state(2, "A's stale plan")).await;
    assert!(s == 423 || s == 409, "A's write under a lost lock answered {s}: {body}");
    assert_eq!(server_file(&f.server_repo(), "main", file).as_deref(), Some(base.as_bytes()));
    assert_eq!(server_commits(&f.server_repo(), "main"), commits);

    // B writes its view; A tries again, even with a higher serial.
    let b_view = state(2, "B's view");
    assert_eq!(call(&b, "POST", &format!("{p}?ID=B"), &b_view).await.0, 200);
    for serial in [2, 3] {
        let (s, body) = call(&a, "POST", &format!("{p}?ID=A"), &state(serial, "A's stale plan")).await;
        assert!(s == 423 || s == 409, "A's write (serial {serial}) answered {s}: {body}");
        if s == 423 {
            assert!(body.contains("\"ID\":\"B\""), "423 names the holder: {body}");
        }
    }
    assert_eq!(
        server_file(&f.server_repo(), "main", file).as_deref(),
        Some(b_view.as_bytes()),
        "the state is B's view, byte for byte"
    );
    assert_eq!(call(&a, "GET", p, "").await, (200, b_view.clone()));
    // A's UNLOCK with its old ID must not release B's lock.
    assert_eq!(call(&a, "UNLOCK", p, &lock_info("A")).await.0, 409);
    assert!(call(&a, "GET", "/lock/envs/prod/terraform.tfstate", "").await.1.contains("\"ID\":\"B\""));
    assert_eq!(call(&b, "UNLOCK", p, &lock_info("B")).await.0, 200);
    fsck_clean(&f.server_repo());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_under_a_lost_lock_is_refused_atomic_push() {
    force_unlocked_writer_is_refused(&Fleet::new("atomic.git")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_under_a_lost_lock_is_refused_without_atomic() {
    force_unlocked_writer_is_refused(&Fleet::without_atomic("plain.git")).await;
}

/// The narrowest window: the lock changes hands after gitstate checked it and inside the push
/// that moves the branch (a `pre-receive` hook, which runs after the pack arrived and before
/// the refs move, hands the lock to B). With `atomic`, the guard on the lock branch makes
/// receive-pack refuse the whole push; gitstate then sees B's lock and answers 423.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lock_taken_inside_the_push_window_is_refused() {
    let f = Fleet::new("window.git");
    let a = f.app();
    let p = "/state/window.tfstate";
    let base = state(1, "base");
    assert_eq!(call(&a, "POST", p, &base).await.0, 200);
    assert_eq!(call(&a, "LOCK", p, &lock_info("A")).await.0, 200);
    let server = f.server_repo();
    let lock_a = git_out(&server, &["rev-parse", "refs/heads/locks/window.tfstate"]);

    // B's lock commit, made on the server the way gitstate makes one: `window.tfstate.lock` = LockInfo.
    let blob = git_with_input(&server, &["hash-object", "-w", "--stdin"], lock_info("B").as_bytes());
    let tree = git_with_input(&server, &["mktree"], format!("100644 blob {blob}\twindow.tfstate.lock\n").as_bytes());
    let lock_b = git_out(
        &server,
        &["-c", "user.name=B", "-c", "user.email=b@race", "commit-tree", &tree, "-m", "Lock window.tfstate"],
    );

    // The hook hands the lock from A to B once, while A's push waits for its report.
    let marker = f.tmp.path().join("hook-fired");
    let hook = server.join("hooks").join("pre-receive");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\ncat >/dev/null\nif [ ! -e '{m}' ]; then\n  touch '{m}'\n  unset GIT_QUARANTINE_PATH\n  git update-ref refs/heads/locks/window.tfstate {lock_b} {lock_a}\nfi\n",
            m = marker.display()
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    let (s, body) = call(&a, "POST", &format!("{p}?ID=A"), &state(2, "A's write")).await;
    assert!(marker.exists(), "the hook ran inside A's push");
    assert!(s == 423 || s == 409, "a write whose lock moved inside the push answered {s}: {body}");
    if s == 423 {
        assert!(body.contains("\"ID\":\"B\""), "423 names the new holder: {body}");
    }
    assert_eq!(server_file(&server, "main", "window.tfstate").as_deref(), Some(base.as_bytes()), "main did not move");
    assert_eq!(git_out(&server, &["rev-parse", "refs/heads/locks/window.tfstate"]), lock_b);
    std::fs::remove_file(&hook).unwrap();
    fsck_clean(&server);
}
