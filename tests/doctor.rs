//! `gitstate doctor` (issue 24) against real hosts: it passes on git daemon and on
//! `git http-backend` (with and without `atomic`, which it reports), fails on dulwich naming
//! the compare-and-swap, exits 2 on a usage error, leaves no scratch ref behind; and
//! `serve --check-host` refuses to start where a promise is broken.

use std::process::{Command, Output, Stdio};

use gitstate_testkit::dulwich::{Dialect, DulwichServer};
use gitstate_testkit::gitd::{git, git_out, GitDaemon};
use gitstate_testkit::httpd::{GitHttpServer, DEFAULT_PASSWORD, DEFAULT_USER};
use gitstate_testkit::serve::{http, path_without_git, server_bin, Serve, ServeOpts};

fn doctor(args: &[&str]) -> (i32, String) {
    let out: Output = Command::new(server_bin())
        .arg("doctor")
        .args(args)
        .env("PATH", path_without_git())
        .env_remove("GITSTATE_REPOSITORY")
        .env_remove("GITSTATE_GIT_USERNAME")
        .env_remove("GITSTATE_GIT_PASSWORD")
        .stdin(Stdio::null())
        .output()
        .expect("run gitstate doctor");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

fn scratch_refs(repo: &std::path::Path) -> String {
    git_out(repo, &["for-each-ref", "refs/gitstate-doctor/"])
}

const CAS_CHECKS: [&str; 3] = [
    "a create of a ref that exists is refused",
    "an update naming a wrong old id is refused",
    "a delete naming a wrong old id is refused",
];

#[track_caller]
fn assert_healthy(what: &str, (code, text): &(i32, String), atomic: bool) {
    assert_eq!(*code, 0, "{what}: doctor exit code:\n{text}");
    for check in CAS_CHECKS {
        assert!(text.contains(&format!("PASS  compare-and-swap: {check}\n")), "{what}: {check}:\n{text}");
    }
    assert!(text.contains("PASS  write accepted"), "{what}:\n{text}");
    assert!(text.contains("gitstate's promises hold on this host"), "{what}:\n{text}");
    if atomic {
        assert!(text.contains("PASS  atomic: offered"), "{what}:\n{text}");
        assert!(text.contains("PASS  compare-and-swap: an atomic push with one failing command applies nothing"));
    } else {
        assert!(text.contains("NOTE  atomic: not offered"), "{what}:\n{text}");
    }
}

#[test]
fn doctor_passes_on_git_daemon_with_and_without_atomic() {
    let daemon = GitDaemon::start();
    let url = daemon.create_repo("states.git");
    let repo = daemon.repo_dir("states.git");
    let report = doctor(&["--repository", &url]);
    println!("git daemon:\n{}", report.1);
    assert_healthy("git daemon", &report, true);
    assert_eq!(scratch_refs(&repo), "", "scratch refs left behind");
    git(&repo, &["config", "receive.advertiseAtomic", "false"]);
    let report = doctor(&["--repository", &url]);
    println!("git daemon without atomic:\n{}", report.1);
    assert_healthy("git daemon without atomic", &report, false);
    assert_eq!(scratch_refs(&repo), "");
}

#[test]
fn doctor_passes_on_git_http_backend_and_names_refused_credentials() {
    let httpd = GitHttpServer::start();
    let url = httpd.create_repo("states.git");
    let repo = httpd.repo_dir("states.git");
    let report = doctor(&["--repository", &url, "--git-username", DEFAULT_USER, "--git-password", DEFAULT_PASSWORD]);
    println!("git http-backend:\n{}", report.1);
    assert_healthy("git http-backend", &report, true);
    assert_eq!(scratch_refs(&repo), "");
    git(&repo, &["config", "receive.advertiseAtomic", "false"]);
    let report = doctor(&["--repository", &url, "--git-username", DEFAULT_USER, "--git-password", DEFAULT_PASSWORD]);
    assert_healthy("git http-backend without atomic", &report, false);
    // Wrong credentials: broken, and said so; the password never printed.
    let (code, text) =
        doctor(&["--repository", &url, "--git-username", DEFAULT_USER, "--git-password", "not-the-password"]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("FAIL  reachable, read accepted") && text.contains("credentials"), "{text}");
    assert!(!text.contains("not-the-password"), "the password was printed:\n{text}");
}

#[test]
fn doctor_fails_on_dulwich_naming_the_compare_and_swap() {
    for dialect in [Dialect::Git, Dialect::Http] {
        let host = DulwichServer::start(dialect);
        let url = host.create_repo("states.git");
        let (code, text) = doctor(&["--repository", &url]);
        println!("dulwich {dialect:?}:\n{text}");
        assert_eq!(code, 1, "{dialect:?}:\n{text}");
        assert!(text.contains("FAIL  compare-and-swap"), "{dialect:?}:\n{text}");
        assert!(text.contains("broken on this host: compare-and-swap"), "{dialect:?}:\n{text}");
    }
}

#[test]
fn doctor_usage_errors_exit_2() {
    for args in [
        &[][..],
        &["--repository", "ftp://127.0.0.1/x.git"],
        &["--repository", "git://127.0.0.1:1/x.git", "--username", "u"],
        &["--repository", "https://u:p@127.0.0.1/x.git"],
        &["--no-such-flag"],
    ] {
        let (code, text) = doctor(args);
        assert_eq!(code, 2, "{args:?}:\n{text}");
    }
}

#[test]
fn serve_check_host_refuses_to_start_on_a_broken_host() {
    let host = DulwichServer::start(Dialect::Git);
    let url = host.create_repo("states.git");
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(server_bin())
        .args(["serve", "--check-host", "--listen", "127.0.0.1:0", "--repository", &url, "--data-dir"])
        .arg(data.path())
        .env("PATH", path_without_git())
        .stdin(Stdio::null())
        .output()
        .expect("run gitstate serve --check-host");
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("refusing to start") && text.contains("FAIL  compare-and-swap"), "{text}");

    // On a host that keeps the promises it starts and serves.
    let daemon = GitDaemon::start();
    let url = daemon.create_repo("states.git");
    let serve = Serve::start(ServeOpts::new().repository(&url).arg("--check-host"));
    assert_eq!(http("GET", &serve.state_url("x.tfstate"), &[], None).status, 204);
    assert!(serve.stderr_log().contains("gitstate's promises hold on this host"), "{}", serve.stderr_log());
}
