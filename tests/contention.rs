//! Scale under contention (issue 22): many writers on distinct states of one repository, spread
//! over several App instances (as Lambda instances), against a git host 20 ms away each way.
//! Every write must land within its request deadline; none may be lost.

use std::sync::Arc;
use std::time::Duration;

use gitstate::app::App;
use gitstate_testkit::fixtures::state_with_lineage;
use gitstate_testkit::gitd::{git_out, GitDaemon};
use gitstate_testkit::latency::LatencyProxy;
use gitstate_testkit::races::{self, new_app, server_commits, server_file};

/// `writers` writers over `instances` Apps, each writing its own state once, all at once, to a
/// git daemon behind a proxy adding `delay` each way.
async fn all_land(writers: usize, instances: usize, delay: Duration) {
    if let Ok(filter) = std::env::var("GITSTATE_TEST_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false).with_test_writer().try_init();
    }
    let daemon = GitDaemon::start();
    daemon.create_repo("busy.git");
    let server = daemon.repo_dir("busy.git");
    let proxy = LatencyProxy::start(daemon.port(), delay);
    let url = format!("git://127.0.0.1:{}/busy.git", proxy.port);
    let tmp = tempfile::tempdir().unwrap();
    let apps: Vec<Arc<App>> = (0..instances).map(|n| new_app(&url, tmp.path().join(format!("instance-{n}")))).collect();
    // Warm instances: each has looked at the repository once (as a Lambda instance that served before).
    for app in &apps {
        let (status, _) = races::call(app, "GET", "/state/warm.tfstate", "").await;
        assert!(status == 204 || status == 200, "warm-up GET answered {status}");
    }
    let writers_apps: Vec<Arc<App>> = (0..writers).map(|w| Arc::clone(&apps[w % instances])).collect();
    let started = std::time::Instant::now();
    let round = races::writers_round(&writers_apps, &server, "team", 0).await;
    println!(
        "{writers} writers through {instances} instances, {delay:?} each way: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        round.violations.is_empty(),
        "{} of {writers} writes failed:\n{}",
        round.violations.len(),
        round.violations.join("\n")
    );
    assert_eq!((round.writes, round.landed, round.lost), (writers, writers, 0));
    // One commit per landed write, each state as its writer sent it.
    assert_eq!(server_commits(&server, "main"), writers as u64);
    for i in 0..writers {
        let want = state_with_lineage(&format!("writer-{i}"), 1, &format!("writer {i}, round 0"));
        assert_eq!(
            server_file(&server, "main", &format!("team/{i}.tfstate")).as_deref(),
            Some(want.as_bytes()),
            "team/{i}"
        );
    }
    let fsck = git_out(&server, &["fsck", "--no-dangling"]);
    assert!(!fsck.contains("error"), "{fsck}");
}

/// The required figure of issue 22: 64 writers through 16 instances, 20 ms each way; then many
/// writers in one instance, whose writes go out together instead of racing each other. One
/// after the other: each scenario has the machine to itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn sixty_four_writers_through_sixteen_instances_twenty_ms_away_all_land() {
    all_land(64, 16, Duration::from_millis(20)).await;
    all_land(32, 1, Duration::from_millis(5)).await;
}
