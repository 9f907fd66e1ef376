//! What a real git host does to connections (issue 17): it closes kept-alive connections that
//! sat idle, and a connection can break after a push was sent and before its answer came
//! back. A look is resent once on a fresh connection; a push whose answer was lost is never
//! resent blindly: one look tells whether it landed (then it is answered as landed), and
//! only otherwise is it redone.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gitstate_testkit::fixtures::{lock_info, state};
use gitstate_testkit::gitd::{git_out, rev_parse, GitDaemon};
use gitstate_testkit::httpd::{GitHttpServer, DEFAULT_PASSWORD, DEFAULT_USER};
use gitstate_testkit::serve::{http, Serve, ServeOpts};

const P: &str = "envs/edge/terraform.tfstate";

/// A proxy in front of the smart-HTTP host that closes a kept-alive connection the moment a
/// request of gitstate's arrives on it after the connection sat idle (over 400 ms since the
/// last answer): what a host that closes idle connections does to the request that races its
/// close. Requests that follow an answer at once (a push's POST after its advertisement) pass.
struct CloseKeptAlive {
    port: u16,
    closed: Arc<AtomicUsize>,
}

impl CloseKeptAlive {
    fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let closed = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&closed);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { break };
                let count = Arc::clone(&count);
                std::thread::spawn(move || {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else { return };
                    let answered = Arc::new(std::sync::Mutex::new(None::<std::time::Instant>));
                    let (mut s_read, mut c_write) = (server.try_clone().unwrap(), client.try_clone().unwrap());
                    let flag = Arc::clone(&answered);
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 8192];
                        while let Ok(n) = s_read.read(&mut buf) {
                            if n == 0 || c_write.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            *flag.lock().unwrap() = Some(std::time::Instant::now());
                        }
                        let _ = c_write.shutdown(Shutdown::Both);
                    });
                    let (mut c_read, mut s_write) = (client, server);
                    let mut buf = [0u8; 8192];
                    while let Ok(n) = c_read.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let look = String::from_utf8_lossy(&buf[..n]).contains("git/gitstate");
                        let idle = answered.lock().unwrap().is_some_and(|t| t.elapsed() > Duration::from_millis(400));
                        if idle && look {
                            count.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                        if s_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = c_read.shutdown(Shutdown::Both);
                    let _ = s_write.shutdown(Shutdown::Both);
                });
            }
        });
        CloseKeptAlive { port, closed }
    }
}

/// Every request that arrives on a kept-alive connection after it sat idle meets it closed:
/// looks and push advertisements are sent again on a fresh connection, and every operation is
/// answered, none with a 5xx.
#[test]
fn a_request_on_a_connection_the_host_closed_is_sent_again() {
    use base64::Engine as _;
    let httpd = GitHttpServer::start();
    httpd.create_repo("states.git");
    let proxy = CloseKeptAlive::start(httpd.port());
    let url = format!("http://127.0.0.1:{}/git/states.git", proxy.port);
    let serve = Serve::start(ServeOpts::new().repository(&url));
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{DEFAULT_USER}:{DEFAULT_PASSWORD}"))
    );
    let h = [("Authorization", auth.as_str())];
    assert_eq!(http("POST", &serve.state_url(P), &h, Some(state(1, "idle").as_bytes())).status, 200);
    let mut failures = Vec::new();
    for i in 0..12 {
        std::thread::sleep(Duration::from_millis(600));
        let (method, body) = match i % 4 {
            2 => ("LOCK", Some(lock_info("idle").into_bytes())),
            3 => ("UNLOCK", Some(lock_info("idle").into_bytes())),
            _ => ("GET", None),
        };
        let got = http(method, &serve.state_url(P), &h, body.as_deref());
        if got.status != 200 {
            failures.push(format!("{method}: {} {}", got.status, got.text()));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}\n{}", serve.stderr_log());
    assert!(proxy.closed.load(Ordering::SeqCst) >= 4, "the proxy closed {} looks", proxy.closed.load(Ordering::SeqCst));
}

/// A TCP proxy in front of git daemon that, while armed, lets a receive-pack connection
/// deliver the client's push to the daemon, throws the daemon's answer away and then closes
/// the client's socket: the push was applied and its answer lost. Other connections pass.
struct LoseAnswers {
    port: u16,
    armed: Arc<AtomicUsize>,
}

impl LoseAnswers {
    fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed = Arc::new(AtomicUsize::new(0));
        let shared = Arc::clone(&armed);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { break };
                let armed = Arc::clone(&shared);
                std::thread::spawn(move || relay(client, target, &armed));
            }
        });
        LoseAnswers { port, armed }
    }

    /// Lose the answers of the next `n` pushes.
    fn lose_next(&self, n: usize) {
        self.armed.store(n, Ordering::SeqCst);
    }
}

fn relay(mut client: TcpStream, target: u16, armed: &AtomicUsize) {
    let Ok(mut server) = TcpStream::connect(("127.0.0.1", target)) else { return };
    let mut first = [0u8; 512];
    let Ok(n) = client.read(&mut first) else { return };
    let push = String::from_utf8_lossy(&first[..n]).contains("git-receive-pack");
    let lose = push && armed.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |a| a.checked_sub(1)).is_ok();
    if server.write_all(&first[..n]).is_err() {
        return;
    }
    // The daemon speaks first (its advertisement); whatever the client sends after that is
    // the push itself, and what the daemon answers to it is lost when armed.
    let pushed = Arc::new(AtomicBool::new(false));
    let (mut c_read, mut s_write) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let seen = Arc::clone(&pushed);
    let upstream = std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = c_read.read(&mut buf) {
            if n == 0 || s_write.write_all(&buf[..n]).is_err() {
                break;
            }
            seen.store(true, Ordering::SeqCst);
        }
        let _ = s_write.shutdown(Shutdown::Write);
    });
    let mut buf = [0u8; 8192];
    while let Ok(n) = server.read(&mut buf) {
        if n == 0 {
            break;
        }
        if lose && pushed.load(Ordering::SeqCst) {
            continue;
        }
        if client.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = client.shutdown(Shutdown::Both);
    let _ = upstream.join();
}

#[test]
fn a_push_whose_answer_was_lost_is_looked_at_not_resent() {
    let daemon = GitDaemon::start();
    daemon.create_repo("states.git");
    let repo = daemon.repo_dir("states.git");
    let proxy = LoseAnswers::start(daemon.port());
    let url = format!("git://127.0.0.1:{}/states.git", proxy.port);
    let serve = Serve::start(ServeOpts::new().repository(&url));
    let pushes = || daemon.log().matches("Request receive-pack").count();

    for (what, method, body, check) in [
        ("a write", "POST", state(1, "lost"), "write"),
        ("a lock", "LOCK", lock_info("lost"), "lock"),
        ("a write under the lock", "POST?ID=lost", state(2, "lost-2"), "write2"),
        ("an unlock", "UNLOCK", lock_info("lost"), "unlock"),
    ] {
        let before = pushes();
        proxy.lose_next(1);
        let (method, query) = method.split_once('?').map_or((method, String::new()), |(m, q)| (m, format!("?{q}")));
        let got = http(method, &format!("{}{query}", serve.state_url(P)), &[], Some(body.as_bytes()));
        assert_eq!(
            got.status,
            200,
            "{what} whose answer was lost: {} {}\n{}",
            got.status,
            got.text(),
            serve.stderr_log()
        );
        assert_eq!(pushes() - before, 1, "{what} was pushed again:\n{}", daemon.log());
        match check {
            "write" => assert!(git_out(&repo, &["show", &format!("main:{P}")]).contains("\"lost\"")),
            "write2" => assert!(git_out(&repo, &["show", &format!("main:{P}")]).contains("\"lost-2\"")),
            "lock" => assert!(rev_parse(&repo, &format!("refs/heads/locks/{P}")).is_some()),
            _ => assert_eq!(rev_parse(&repo, &format!("refs/heads/locks/{P}")), None),
        }
    }
    assert!(serve.stderr_log().contains("answer to a push was lost"), "{}", serve.stderr_log());
}

fn cache_entries(cache: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(cache).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// The generations a process rebuilt beside the shared cache: kept while a process works in
/// them (whatever its pid), removed once nobody does, as soon as a process opens the cache
/// after a restart or rebuilds again; leftovers without a lock file go once they are old.
#[test]
fn rebuilt_caches_that_no_process_uses_are_removed() {
    let daemon = GitDaemon::start();
    let url = daemon.create_repo("states.git");
    let cache = tempfile::tempdir().unwrap();
    let opts = || ServeOpts::new().repository(&url).env("GITSTATE_CACHE_DIR", cache.path().display().to_string());
    let a = Serve::start(opts());
    assert_eq!(http("POST", &a.state_url(P), &[], Some(state(1, "a").as_bytes())).status, 200);
    let shared: Vec<String> = cache_entries(cache.path()).into_iter().filter(|n| n.ends_with(".git")).collect();
    assert_eq!(shared.len(), 1, "{shared:?}");
    // The shared cache breaks under A: A rebuilds beside it and works there.
    std::fs::remove_dir_all(cache.path().join(&shared[0]).join("objects")).unwrap();
    assert_eq!(http("POST", &a.state_url(P), &[], Some(state(2, "a2").as_bytes())).status, 200);
    let rebuilt: Vec<String> =
        cache_entries(cache.path()).into_iter().filter(|n| n.ends_with(".git") && *n != shared[0]).collect();
    assert_eq!(rebuilt.len(), 1, "no rebuilt generation: {:?}", cache_entries(cache.path()));

    // A leftover of an older version (no lock file), old; and a staging directory of a crash.
    let old = cache.path().join(format!("{}.4242-1.git", shared[0].trim_end_matches(".git")));
    let staging = cache.path().join(format!(".{}.4242.ffff.new", shared[0]));
    for dir in [&old, &staging] {
        std::fs::create_dir_all(dir.join("objects")).unwrap();
        let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
        std::fs::File::open(dir).unwrap().set_modified(two_hours_ago).unwrap();
    }
    // A young leftover without a lock stays (it may be a start in progress).
    let young = cache.path().join(format!("{}.4343-1.git", shared[0].trim_end_matches(".git")));
    std::fs::create_dir_all(&young).unwrap();

    // B starts on the same cache while A still works in its rebuilt generation: A's stays.
    let b = Serve::start(opts());
    assert_eq!(http("GET", &b.state_url(P), &[], None).status, 200);
    let now = cache_entries(cache.path());
    assert!(now.contains(&rebuilt[0]), "A's generation was removed while A uses it: {now:?}");
    assert!(!old.exists() && !staging.exists(), "old leftovers stayed: {now:?}");
    assert!(young.exists(), "a young directory was removed: {now:?}");
    assert_eq!(http("POST", &a.state_url(P), &[], Some(state(3, "a3").as_bytes())).status, 200, "A lost its cache");

    // A stops; the next process to open the cache removes A's generation.
    drop(a);
    drop(b);
    let c = Serve::start(opts());
    assert_eq!(http("GET", &c.state_url(P), &[], None).status, 200);
    let now = cache_entries(cache.path());
    assert!(!now.contains(&rebuilt[0]), "a generation nobody uses stayed: {now:?}");
    assert!(!now.iter().any(|n| n.ends_with(".in-use") && n.starts_with(&rebuilt[0])), "{now:?}");
}
