//! The testkit's `StallProxy` in front of a real `git daemon`: forwarding, a `git ls-remote`
//! through it works; stalled, a client's connection is accepted and stays open, but not one
//! byte comes back; switched back, it forwards again; dropped, every connection is closed.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use gitstate_testkit::gitd::{git, git_out, git_with_input, GitDaemon};
use gitstate_testkit::stall::{Mode, StallProxy};

/// `git ls-remote` of `url`; stdout, trimmed.
fn ls_remote(daemon: &GitDaemon, url: &str) -> String {
    git_out(daemon.base_dir(), &["ls-remote", url])
}

#[test]
fn forwards_then_stalls_then_forwards_again() {
    let daemon = GitDaemon::start();
    daemon.create_repo("proxied.git");
    let repo = daemon.repo_dir("proxied.git");
    let tree = git_with_input(&repo, &["mktree"], b"");
    let commit = git_out(&repo, &["commit-tree", &tree, "-m", "first"]);
    git(&repo, &["update-ref", "refs/heads/main", &commit]);

    let proxy = StallProxy::start(SocketAddr::from(([127, 0, 0, 1], daemon.port())));
    assert_eq!(proxy.mode(), Mode::Forward);
    let url = format!("git://127.0.0.1:{}/proxied.git", proxy.port());

    // Forward: the daemon answers through the proxy.
    let refs = ls_remote(&daemon, &url);
    assert!(refs.contains(&format!("{commit}\trefs/heads/main")), "ls-remote through the proxy: {refs:?}");
    assert!(proxy.connections() >= 1, "the proxy accepted the connection");

    // Stall: accepted, read, never answered, kept open.
    proxy.stall();
    let before = proxy.connections();
    let mut client = TcpStream::connect(proxy.addr()).expect("connect to the stalled proxy");
    let request = "git-upload-pack /proxied.git\0host=127.0.0.1\0";
    client.write_all(format!("{:04x}{request}", request.len() + 4).as_bytes()).unwrap();
    client.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut buf = [0u8; 64];
    let started = Instant::now();
    match client.read(&mut buf) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        Ok(0) => panic!("the stalled connection was closed"),
        Ok(n) => panic!("the stalled proxy answered {:?}", String::from_utf8_lossy(&buf[..n])),
        Err(e) => panic!("reading from the stalled proxy: {e}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(450), "the read gave up early: {:?}", started.elapsed());
    assert_eq!(proxy.connections(), before + 1);
    // Still open: more can be sent, and still nothing comes back.
    client.write_all(b"0000").expect("the stalled connection is still open");
    let err = client.read(&mut buf).expect_err("still no answer, and not closed");
    assert!(matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut), "{err}");

    // Forward again: new connections reach the daemon; the stalled one stays stalled.
    proxy.forward();
    assert!(ls_remote(&daemon, &url).contains(&commit));
    let err = client.read(&mut buf).expect_err("the stalled connection keeps its mode");
    assert!(matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut), "{err}");

    // Drop: the stalled connection is closed.
    drop(proxy);
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    match client.read(&mut buf) {
        Ok(0) => {}
        Err(e) if !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("the connection outlived the proxy: {other:?}"),
    }
}
