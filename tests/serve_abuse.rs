//! `gitstate serve` under abuse (issue 10, §5): slow headers, bodies from callers who are
//! refused anyway, trickled bodies, clients that stop reading, descriptor exhaustion, more
//! connections than the limit, and the warning for an open non-loopback listener. Real
//! server processes; the attacking clients are raw TCP sockets.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine as _;
use gitstate_testkit::fixtures;
use gitstate_testkit::gitd::free_port;
use gitstate_testkit::serve::{http, path_without_git, server_bin, Serve, ServeOpts};

const USER: &str = "tf";
const PASSWORD: &str = "tf-pass";

/// Backend basic auth in `env` mode (which also needs git credentials of its own).
fn with_auth(opts: ServeOpts) -> ServeOpts {
    opts.env("GITSTATE_AUTH", "env")
        .env("GITSTATE_GIT_USERNAME", "git-user")
        .env("GITSTATE_GIT_PASSWORD", "git-pass")
        .env("GITSTATE_USERNAME", USER)
        .env("GITSTATE_PASSWORD", PASSWORD)
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

// ---------------------------------------------------------------------------
// Raw HTTP/1.1 over std::net
// ---------------------------------------------------------------------------

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_nodelay(true).unwrap();
    s
}

/// What a client saw while waiting for an answer.
#[derive(Debug)]
#[allow(dead_code)] // The texts are read through `Debug`, in failure messages.
enum Seen {
    /// A response head: its status and its text.
    Head(u16, String),
    /// The server closed (EOF or reset) before a whole head; what arrived.
    Closed(String),
    /// Nothing (or only part of a head) within the time.
    Nothing,
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Read one response head, giving up after `within`. Bytes after the head stay unread
/// except for what arrived with it.
fn read_head(s: &mut TcpStream, within: Duration) -> Seen {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).into_owned();
            let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
            return Seen::Head(status, head);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Seen::Nothing;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Seen::Closed(String::from_utf8_lossy(&got).into_owned()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if is_timeout(&e) => return Seen::Nothing,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Seen::Closed(format!("{}<{e}>", String::from_utf8_lossy(&got))),
        }
    }
}

#[track_caller]
fn expect_status(seen: Seen, want: u16, what: &str) -> String {
    match seen {
        Seen::Head(status, head) if status == want => head,
        other => panic!("{what}: expected a {want} answer, saw {other:?}"),
    }
}

/// Read and discard until the server closes; how long that took, or `None` if it had not
/// closed within `within`.
fn wait_closed(s: &mut TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 64 << 10];
    loop {
        let left = (start + within).saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e) if is_timeout(&e) => return None,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
}

/// A GET on a fresh connection: its status, or what went wrong within `within`.
fn raw_get(addr: SocketAddr, path: &str, within: Duration) -> Seen {
    let mut s = match TcpStream::connect_timeout(&addr, within) {
        Ok(s) => s,
        Err(e) => return Seen::Closed(format!("<connect: {e}>")),
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: gitstate\r\nConnection: close\r\n\r\n");
    if let Err(e) = s.write_all(req.as_bytes()) {
        return Seen::Closed(format!("<write: {e}>"));
    }
    read_head(&mut s, within)
}

/// GET until one answers (with any HTTP status) or `within` passes; how long it took.
fn get_answers_within(addr: SocketAddr, within: Duration) -> Result<Duration, Seen> {
    let start = Instant::now();
    loop {
        let left = (start + within).saturating_duration_since(Instant::now());
        match raw_get(addr, "/state/probe.tfstate", left.max(Duration::from_millis(100))) {
            Seen::Head(..) => return Ok(start.elapsed()),
            other if start.elapsed() >= within => return Err(other),
            _ => thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Send a body from another thread (up to `total` bytes, stopping at the first write error,
/// e.g. when the server closed) while the caller reads the answer.
fn send_in_background(s: &TcpStream, chunk: Vec<u8>, total: usize) -> thread::JoinHandle<usize> {
    let mut w = s.try_clone().unwrap();
    w.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    thread::spawn(move || {
        let mut sent = 0;
        while sent < total {
            match w.write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        sent
    })
}

// ---------------------------------------------------------------------------
// The server process: pid, memory, CPU time
// ---------------------------------------------------------------------------

/// The pid of the `gitstate serve` child of `serve` (the harness does not expose it): the
/// process whose command line names its data directory.
fn pid_of(serve: &Serve) -> u32 {
    let needle = serve.data_dir().to_string_lossy().into_owned();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        if args.iter().any(|a| a == "serve") && args.iter().any(|a| a == &needle) {
            return pid;
        }
    }
    panic!("no process serves {needle}");
}

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS in /proc/<pid>/status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / clock_ticks_per_second()
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// `gitstate serve` started the way the harness cannot: through `sh -c '<prefix>; exec ...'`
/// (e.g. `ulimit -n 64`) and with any `--listen`. Killed on drop.
struct RawServe {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl RawServe {
    fn start(shell_prefix: &str, listen: &str, env: &[(&str, &str)]) -> RawServe {
        let dir = tempfile::Builder::new().prefix("gitstate-abuse-").tempdir().unwrap();
        let data_dir = dir.path().join("data");
        std::fs::create_dir_all(&data_dir).unwrap();
        let port: u16 = listen.rsplit(':').next().unwrap().parse().unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg(format!("{shell_prefix}\nexec \"$0\" \"$@\"")).arg(server_bin());
        cmd.args(["serve", "--listen", listen, "--data-dir"]).arg(&data_dir);
        for (k, _) in std::env::vars() {
            if k.starts_with("GITSTATE_") || k.starts_with("GIT_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("PATH", path_without_git())
            .env("HOME", dir.path())
            .env("RUST_LOG", "info,gitstate=debug")
            .env("GITSTATE_CACHE_DIR", dir.path().join("cache"))
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("stdout.log")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap());
        let child = cmd.spawn().expect("spawn /bin/sh");
        let mut serve = RawServe { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = serve.child.try_wait().unwrap() {
                panic!("gitstate serve exited: {status}\n{}", serve.stderr_log());
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return serve;
            }
            assert!(Instant::now() < deadline, "gitstate serve did not start:\n{}", serve.stderr_log());
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stderr_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// stderr once the banner is on stdout (start-up warnings come before it).
    fn stderr_after_banner(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(self.dir.path().join("stdout.log")).unwrap_or_default().contains("listening on")
        {
            assert!(Instant::now() < deadline, "no banner on stdout:\n{}", self.stderr_log());
            thread::sleep(Duration::from_millis(20));
        }
        self.stderr_log()
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("gitstate serve exited: {status}\n{}", self.stderr_log());
        }
    }
}

impl Drop for RawServe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("--- gitstate serve stderr ---\n{}\n--- end ---", self.stderr_log());
        }
    }
}

// ---------------------------------------------------------------------------
// Slow headers and idle connections
// ---------------------------------------------------------------------------

/// With a 2 s header timeout, every way of not finishing a request head ends in a closed
/// connection after about 2 s: nothing sent, half a request line, headers trickled a byte at a
/// time (progress does not reset the clock), and a kept-alive connection left idle.
#[test]
fn slow_headers_and_idle_connections_are_closed() {
    let serve = Serve::start(ServeOpts::new().env("GITSTATE_HEADER_READ_TIMEOUT", "2"));
    let addr = serve.addr();
    let timeout = Duration::from_secs(2);
    let slack = Duration::from_secs(4);

    let silent = thread::spawn(move || {
        let mut s = connect(addr);
        wait_closed(&mut s, timeout + slack)
    });
    let half_line = thread::spawn(move || {
        let mut s = connect(addr);
        s.write_all(b"GET /state/a.tfst").unwrap();
        wait_closed(&mut s, timeout + slack)
    });
    let trickle = thread::spawn(move || {
        let mut s = connect(addr);
        s.write_all(b"GET /state/a.tfstate HTTP/1.1\r\nHost: x\r\n").unwrap();
        let start = Instant::now();
        // One header byte every 200 ms, until the server closes or long after the timeout.
        s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut buf = [0u8; 1024];
        while start.elapsed() < timeout + slack {
            if s.write_all(b"X").is_err() {
                return Some(start.elapsed());
            }
            match s.read(&mut buf) {
                Ok(0) => return Some(start.elapsed()),
                Ok(_) => {}
                Err(e) if is_timeout(&e) => {}
                Err(_) => return Some(start.elapsed()),
            }
        }
        None
    });
    let idle_after_answer = thread::spawn(move || {
        let mut s = connect(addr);
        s.write_all(b"GET /state/a.tfstate HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let head = expect_status_any(read_head(&mut s, Duration::from_secs(10)), "keep-alive GET");
        assert!(!head.to_ascii_lowercase().contains("connection: close"), "the GET closed its connection:\n{head}");
        wait_closed(&mut s, timeout + slack)
    });

    for (what, t) in [
        ("silent", silent),
        ("half a request line", half_line),
        ("trickled headers", trickle),
        ("idle keep-alive", idle_after_answer),
    ] {
        let closed = t.join().unwrap();
        let Some(after) = closed else { panic!("{what}: still open {:?} after connecting", timeout + slack) };
        eprintln!("{what}: closed after {after:?}");
        assert!(after >= timeout - Duration::from_millis(500), "{what}: closed after {after:?}, before the timeout");
    }
}

/// The head of any answer.
#[track_caller]
fn expect_status_any(seen: Seen, what: &str) -> String {
    match seen {
        Seen::Head(_, head) => head,
        other => panic!("{what}: expected an answer, saw {other:?}"),
    }
}

/// At the default settings: 200 clients stuck in their headers do not keep a normal GET
/// from answering at once, and each of them is closed within the default 10 s.
#[test]
fn many_slow_header_clients_do_not_block_a_get() {
    let serve = Serve::start(ServeOpts::new());
    let addr = serve.addr();
    let started = Instant::now();
    let mut slow: Vec<TcpStream> = (0..200)
        .map(|i| {
            let mut s = connect(addr);
            s.write_all(format!("POST /state/s{i}.tfstate HTTP/1.1\r\nHost: x\r\nContent-Le").as_bytes()).unwrap();
            s
        })
        .collect();
    thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let got = http("GET", &serve.state_url("normal.tfstate"), &[], None);
    let took = t.elapsed();
    eprintln!("GET beside 200 slow-header clients: {} in {took:?}", got.status);
    assert!(got.status < 500, "GET failed: {} {}", got.status, got.text());
    assert!(took < Duration::from_secs(2), "GET took {took:?} beside slow-header clients");

    // Default header timeout 10 s; allow 5 s of slack on a loaded machine.
    let limit = Duration::from_secs(15);
    for (i, s) in slow.iter_mut().enumerate() {
        let left = limit.saturating_sub(started.elapsed());
        assert!(
            wait_closed(s, left.max(Duration::from_millis(1))).is_some(),
            "slow client {i} still open after {limit:?}"
        );
    }
    let all_closed = started.elapsed();
    eprintln!("200 slow-header clients all closed {all_closed:?} after they connected");
    assert!(all_closed >= Duration::from_secs(9), "slow clients closed after {all_closed:?}, before the 10 s default");
}

/// A request head larger than the server buffers is refused, not accumulated.
#[test]
fn oversized_request_head_is_refused() {
    let serve = Serve::start(ServeOpts::new());
    let mut s = connect(serve.addr());
    let filler = "a".repeat(1 << 20);
    let req = format!("GET /state/a.tfstate HTTP/1.1\r\nHost: x\r\nX-Filler: {filler}\r\n\r\n");
    let writer = send_in_background(&s, req.into_bytes(), 1 << 20);
    let seen = read_head(&mut s, Duration::from_secs(10));
    eprintln!("1 MiB header: {seen:?}");
    match seen {
        Seen::Head(status, head) => assert_eq!(status, 431, "1 MiB header:\n{head}"),
        Seen::Closed(_) => {}
        Seen::Nothing => panic!("no answer to a 1 MiB header within 10 s"),
    }
    let sent = writer.join().unwrap();
    eprintln!("client got out {sent} of a 1 MiB header before the server refused");
    assert!(wait_closed(&mut s, Duration::from_secs(5)).is_some(), "connection still open after the 431");
    let mut serve = serve;
    serve.assert_running();
}

// ---------------------------------------------------------------------------
// Bodies of callers who are refused anyway
// ---------------------------------------------------------------------------

/// One attack of [`unauthenticated_large_bodies_are_refused_unread`]; the status it must get.
#[derive(Clone, Copy, Debug)]
enum BodyAttack {
    /// No credentials, `Content-Length: 1000000000`, a few MiB actually sent.
    NoAuthHugeLength,
    /// Wrong password, same.
    WrongAuthHugeLength,
    /// No credentials, `Expect: 100-continue`: refused without a 100 Continue first.
    NoAuthExpectContinue,
    /// No credentials, chunked, chunks keep coming.
    NoAuthChunked,
    /// Right credentials, `Content-Length` above the limit: 413 before any body byte.
    AuthLengthAboveLimit,
    /// Right credentials, chunked and longer than the limit: 413 once the limit is passed.
    AuthChunkedAboveLimit,
}

impl BodyAttack {
    const ALL: [BodyAttack; 6] = [
        BodyAttack::NoAuthHugeLength,
        BodyAttack::WrongAuthHugeLength,
        BodyAttack::NoAuthExpectContinue,
        BodyAttack::NoAuthChunked,
        BodyAttack::AuthLengthAboveLimit,
        BodyAttack::AuthChunkedAboveLimit,
    ];

    /// Run against `addr`; panics unless the expected answer comes within 10 s. The client
    /// first sends 4 KiB of body (1 MiB + 4 KiB where the server must read past its limit to
    /// know), then waits for the answer; with `flood`, a second thread keeps sending up to
    /// 4 MiB meanwhile. Returns the bytes the client's writes took (its own kernel buffer
    /// takes megabytes, so this is not what the server read).
    fn run(self, addr: SocketAddr, flood: bool) -> usize {
        let good = format!("Authorization: {}\r\n", basic(USER, PASSWORD));
        let wrong = format!("Authorization: {}\r\n", basic(USER, "nope"));
        let (auth, framing, first, status) = match self {
            BodyAttack::NoAuthHugeLength => ("", "Content-Length: 1000000000\r\n", 4 << 10, 401),
            BodyAttack::WrongAuthHugeLength => (wrong.as_str(), "Content-Length: 1000000000\r\n", 4 << 10, 401),
            BodyAttack::NoAuthExpectContinue => ("", "Content-Length: 1000000000\r\nExpect: 100-continue\r\n", 0, 401),
            BodyAttack::NoAuthChunked => ("", "Transfer-Encoding: chunked\r\n", 4 << 10, 401),
            BodyAttack::AuthLengthAboveLimit => (good.as_str(), "Content-Length: 2097152\r\n", 0, 413),
            BodyAttack::AuthChunkedAboveLimit => {
                (good.as_str(), "Transfer-Encoding: chunked\r\n", (1 << 20) + (4 << 10), 413)
            }
        };
        let what = format!("{self:?}");
        let chunked = framing.contains("chunked");
        let piece = |n: usize| {
            if chunked {
                let mut c = format!("{n:x}\r\n").into_bytes();
                c.extend(std::iter::repeat_n(b'{', n));
                c.extend_from_slice(b"\r\n");
                c
            } else {
                vec![b'{'; n]
            }
        };
        let mut s = connect(addr);
        let head = format!("POST /state/big.tfstate HTTP/1.1\r\nHost: x\r\n{auth}{framing}\r\n");
        s.write_all(head.as_bytes()).unwrap();
        let mut sent = 0;
        if first > 0 {
            // Up to the limit the server reads (or refuses at once); the rest may meet a reset.
            for _ in 0..first / (4 << 10) {
                match s.write_all(&piece(4 << 10)) {
                    Ok(()) => sent += 4 << 10,
                    Err(_) if status == 413 && sent >= 1 << 20 => break,
                    Err(e) => panic!("{what}: write failed after {sent} bytes: {e}"),
                }
            }
        }
        let writer = (flood && first > 0).then(|| send_in_background(&s, piece(16 << 10), 4 << 20));
        let answer = expect_status(read_head(&mut s, Duration::from_secs(10)), status, &what);
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{what}: the answer does not close the connection:\n{answer}"
        );
        assert!(
            wait_closed(&mut s, Duration::from_secs(10)).is_some(),
            "{what}: connection still open after the answer"
        );
        sent + writer.map_or(0, |w| w.join().unwrap())
    }
}

/// With backend auth and a 1 MiB body limit: bodies of refused callers get their 401 without
/// being read (the answer comes while the client still has almost all of the claimed 1 GB to
/// send), a declared length above the limit gets 413 before any body byte, a chunked body above
/// the limit 413 once it passes the limit; a normal write still works; and the server's memory
/// stays flat across 50 rounds of all of it.
#[test]
fn unauthenticated_large_bodies_are_refused_unread() {
    let mut serve = Serve::start(with_auth(ServeOpts::new()).env("GITSTATE_MAX_BODY_BYTES", "1048576"));
    let addr = serve.addr();
    let pid = pid_of(&serve);

    // Each attack once, on its own, for a clear failure message.
    for attack in BodyAttack::ALL {
        let t = Instant::now();
        let sent = attack.run(addr, false);
        eprintln!("{attack:?}: answered in {:?} after {sent} body bytes", t.elapsed());
    }

    // A normal authorized write and read still work next to the refusals.
    let state = fixtures::state(1, "ok");
    let auth = basic(USER, PASSWORD);
    let put = http("POST", &serve.state_url("ok.tfstate"), &[("Authorization", &auth)], Some(state.as_bytes()));
    assert_eq!(put.status, 200, "authorized POST: {}", put.text());
    let got = http("GET", &serve.state_url("ok.tfstate"), &[("Authorization", &auth)], None);
    assert_eq!((got.status, got.text()), (200, state.clone()));
    let anonymous = http("GET", &serve.state_url("ok.tfstate"), &[], None);
    assert_eq!(anonymous.status, 401);

    let before = rss_kib(pid);
    for round in 0..50 {
        // Every kind at once, so refused bodies overlap.
        let threads: Vec<_> = BodyAttack::ALL.iter().map(|a| (*a, thread::spawn(move || a.run(addr, true)))).collect();
        for (attack, t) in threads {
            if t.join().is_err() {
                panic!("round {round}: {attack:?} failed (see above)");
            }
        }
    }
    let after = rss_kib(pid);
    println!("serve RSS before 50 rounds of refused large bodies: {before} KiB, after: {after} KiB");
    assert!(after < before + 50 * 1024, "RSS grew from {before} KiB to {after} KiB");
    serve.assert_running();
    let got = http("GET", &serve.state_url("ok.tfstate"), &[("Authorization", &auth)], None);
    assert_eq!((got.status, got.text()), (200, state));
}

/// With a 1 MiB body limit and 1 MiB of body memory: a body that reserved all of it (and
/// then sends nothing) makes the next body wait instead of being read into more memory; the
/// waiting one goes through once the first is cut off (408 at the 2 s body timeout).
#[test]
fn body_memory_is_bounded() {
    let serve = Serve::start(
        with_auth(ServeOpts::new())
            .env("GITSTATE_MAX_BODY_BYTES", "1048576")
            .env("GITSTATE_BODY_MEMORY_BYTES", "1048576")
            .env("GITSTATE_BODY_READ_TIMEOUT", "2"),
    );
    let addr = serve.addr();
    let auth = basic(USER, PASSWORD);
    let mut holder = connect(addr);
    let head = format!(
        "POST /state/hold.tfstate HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 1048576\r\n\r\n"
    );
    holder.write_all(head.as_bytes()).unwrap();
    thread::sleep(Duration::from_millis(300));

    let state = fixtures::state(1, "small");
    let t = Instant::now();
    let waited = http("POST", &serve.state_url("small.tfstate"), &[("Authorization", &auth)], Some(state.as_bytes()));
    let waited_for = t.elapsed();
    eprintln!("a small POST while another body held all body memory: {} after {waited_for:?}", waited.status);
    expect_status(read_head(&mut holder, Duration::from_secs(5)), 408, "the holder");
    assert_eq!(waited.status, 200, "small POST after the holder was cut off: {}", waited.text());
    assert!(
        waited_for >= Duration::from_millis(1400),
        "the small POST was read after {waited_for:?}, while another body held all body memory"
    );
    let got = http("GET", &serve.state_url("small.tfstate"), &[("Authorization", &auth)], None);
    assert_eq!((got.status, got.text()), (200, state));
}

// ---------------------------------------------------------------------------
// Trickled bodies and clients that stop reading
// ---------------------------------------------------------------------------

/// Send `piece` once a second until the server answers; the answer and when it came.
fn trickle(addr: SocketAddr, head: &str, piece: &[u8], give_up: Duration) -> (Seen, Duration) {
    let mut s = connect(addr);
    s.write_all(head.as_bytes()).unwrap();
    let start = Instant::now();
    while start.elapsed() < give_up {
        if s.write_all(piece).is_err() {
            break;
        }
        match read_head(&mut s, Duration::from_secs(1)) {
            Seen::Nothing => {}
            seen => return (seen, start.elapsed()),
        }
    }
    (read_head(&mut s, Duration::from_secs(2)), start.elapsed())
}

/// With a 3 s body timeout: an authorized body trickled a byte per second (by length, and
/// chunked) gets a 408 and a closed connection after about 3 s, while a body sent at once
/// on the same server is stored.
#[test]
fn trickled_body_is_cut_off() {
    let serve = Serve::start(with_auth(ServeOpts::new()).env("GITSTATE_BODY_READ_TIMEOUT", "3"));
    let addr = serve.addr();
    let auth = basic(USER, PASSWORD);
    let by_length = {
        let head = format!(
            "POST /state/t1.tfstate HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 100\r\n\r\n"
        );
        thread::spawn(move || trickle(addr, &head, b"{", Duration::from_secs(20)))
    };
    let chunked = {
        let head = format!(
            "POST /state/t2.tfstate HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        thread::spawn(move || trickle(addr, &head, b"1\r\n{\r\n", Duration::from_secs(20)))
    };
    let state = fixtures::state(1, "fast");
    let put = http("POST", &serve.state_url("fast.tfstate"), &[("Authorization", &auth)], Some(state.as_bytes()));
    assert_eq!(put.status, 200, "a body sent at once beside trickled ones: {}", put.text());

    for (what, t) in [("trickled by length", by_length), ("trickled chunks", chunked)] {
        let (seen, after) = t.join().unwrap();
        eprintln!("{what}: {seen:?} after {after:?}");
        let head = expect_status(seen, 408, what);
        assert!(head.to_ascii_lowercase().contains("connection: close"), "{what}: 408 without `Connection: close`");
        assert!(
            after >= Duration::from_millis(2500) && after < Duration::from_secs(8),
            "{what}: answered after {after:?}, not about 3 s"
        );
    }
    let got = http("GET", &serve.state_url("t1.tfstate"), &[("Authorization", &auth)], None);
    assert_ne!(got.status, 500);
    assert!(!got.text().contains('{') || got.status != 200, "a trickled body was stored: {}", got.text());
}

/// With a 2 s write timeout: a client that asks for a 12 MiB state and does not read is
/// dropped (it later finds the answer cut short), and the server answers others meanwhile.
#[test]
fn client_that_stops_reading_is_dropped() {
    let serve = Serve::start(ServeOpts::new().env("GITSTATE_WRITE_TIMEOUT", "2"));
    let addr = serve.addr();
    let state = fixtures::state(1, &"v".repeat(12 << 20));
    let put = http("POST", &serve.state_url("big.tfstate"), &[], Some(state.as_bytes()));
    assert_eq!(put.status, 200, "POST of a 12 MiB state: {}", put.text());

    let mut s = connect(addr);
    s.write_all(b"GET /state/big.tfstate HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    // Stop reading well past the write timeout; another client is served meanwhile.
    thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    assert!(matches!(raw_get(addr, "/state/other.tfstate", Duration::from_secs(5)), Seen::Head(..)));
    assert!(t.elapsed() < Duration::from_secs(2));
    thread::sleep(Duration::from_secs(5));

    let mut received = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let ended = loop {
        match s.read(&mut buf) {
            Ok(0) => break "EOF".to_string(),
            Ok(n) => received += n,
            Err(e) if is_timeout(&e) => panic!("still open after a read stall, {received} bytes in"),
            Err(e) => break e.to_string(),
        }
    };
    eprintln!("stalled reader got {received} of {} body bytes, then {ended}", state.len());
    assert!(received < state.len(), "the whole answer arrived although the client stopped reading for 6 s");
}

// ---------------------------------------------------------------------------
// Descriptor exhaustion and the connection bound
// ---------------------------------------------------------------------------

/// Under `ulimit -n 64`, 150 held connections exhaust the server's descriptors: it must not
/// spin (CPU time and log stay nearly still) and it answers again once they close.
#[test]
fn descriptor_exhaustion_does_not_spin() {
    let port = free_port();
    let mut serve = RawServe::start(
        "ulimit -n 64 || exit 97",
        &format!("127.0.0.1:{port}"),
        // Held connections must not be closed by the header timeout during the measurement.
        &[("GITSTATE_HEADER_READ_TIMEOUT", "120")],
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", serve.pid())).unwrap();
    let nofile = limits.lines().find(|l| l.starts_with("Max open files")).unwrap().to_string();
    assert!(nofile.split_whitespace().nth(3) == Some("64"), "ulimit did not apply: {nofile}");
    let addr = serve.addr;
    let held: Vec<TcpStream> = (0..150).map(|_| connect(addr)).collect();
    // Let the server run into EMFILE and settle into its backoff.
    thread::sleep(Duration::from_secs(2));
    serve.assert_running();

    let pid = serve.pid();
    let (cpu0, lines0, t0) = (cpu_seconds(pid), serve.stderr_log().lines().count(), Instant::now());
    thread::sleep(Duration::from_secs(4));
    let (cpu1, lines1, elapsed) = (cpu_seconds(pid), serve.stderr_log().lines().count(), t0.elapsed().as_secs_f64());
    let log = serve.stderr_log();
    let cpu_share = (cpu1 - cpu0) / elapsed;
    let lines_per_s = (lines1 - lines0) as f64 / elapsed;
    eprintln!(
        "out of descriptors: CPU {:.3} s in {elapsed:.1} s ({:.1}%), {} log lines ({lines_per_s:.1}/s)",
        cpu1 - cpu0,
        cpu_share * 100.0,
        lines1 - lines0
    );
    assert!(
        log.contains("accept failed") && log.to_ascii_lowercase().contains("too many open files"),
        "the server never ran out of descriptors; the test proves nothing:\n{log}"
    );
    assert!(cpu_share < 0.2, "the server used {:.0}% CPU while out of descriptors", cpu_share * 100.0);
    assert!(lines_per_s <= 3.0, "the server logged {lines_per_s:.1} lines/s while out of descriptors:\n{log}");
    let accept_lines = log.lines().filter(|l| l.contains("accept failed")).collect::<Vec<_>>();
    assert!(accept_lines.iter().any(|l| l.contains("suppressed")), "no suppressed count: {accept_lines:?}");

    drop(held);
    let took = get_answers_within(addr, Duration::from_secs(15))
        .unwrap_or_else(|seen| panic!("no answer after the connections closed: {seen:?}\n{}", serve.stderr_log()));
    eprintln!("a GET answered {took:?} after the held connections closed");
    serve.assert_running();
}

/// `GITSTATE_MAX_CONNECTIONS=8` and 50 idle connections: the server holds 8, the rest wait,
/// so a GET waits too (the bound holds) without the server failing; once most idle ones
/// close, the waiting GET is answered.
#[test]
fn connection_bound_holds_and_recovers() {
    let mut serve =
        Serve::start(ServeOpts::new().env("GITSTATE_MAX_CONNECTIONS", "8").env("GITSTATE_HEADER_READ_TIMEOUT", "60"));
    let addr = serve.addr();
    let mut idle: Vec<TcpStream> = (0..50).map(|_| connect(addr)).collect();
    thread::sleep(Duration::from_millis(500));

    let mut waiting = connect(addr);
    waiting.write_all(b"GET /state/w.tfstate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    match read_head(&mut waiting, Duration::from_millis(1500)) {
        Seen::Nothing => {}
        other => panic!("a GET got {other:?} while 50 idle connections held a limit of 8"),
    }
    serve.assert_running();

    // Keep the first 4 (the server holds them), close the rest.
    idle.truncate(4);
    let t = Instant::now();
    let head = expect_status_any(read_head(&mut waiting, Duration::from_secs(10)), "waiting GET");
    eprintln!(
        "the waiting GET answered {:?} after 46 idle connections closed: {}",
        t.elapsed(),
        head.lines().next().unwrap()
    );
    let got = http("GET", &serve.state_url("x.tfstate"), &[], None);
    assert!(got.status < 500, "{} {}", got.status, got.text());
    serve.assert_running();
}

// ---------------------------------------------------------------------------
// The warning for an open non-loopback listener
// ---------------------------------------------------------------------------

const WARNING: &str = "anyone who can reach this address can read and write states";

/// `--listen 0.0.0.0:<port>` without backend auth warns on stderr at start; with backend
/// auth, or on loopback, it does not.
#[test]
fn non_loopback_listener_without_auth_warns() {
    let open = RawServe::start("", &format!("0.0.0.0:{}", free_port()), &[]);
    let log = open.stderr_after_banner();
    eprintln!("0.0.0.0 without auth, stderr:\n{log}");
    assert!(log.contains("WARNING") && log.contains(WARNING), "no warning for 0.0.0.0 without auth:\n{log}");
    assert!(log.contains("GITSTATE_USERNAME"), "the warning does not say how to fix it:\n{log}");

    let env = [
        ("GITSTATE_AUTH", "env"),
        ("GITSTATE_GIT_USERNAME", "git-user"),
        ("GITSTATE_GIT_PASSWORD", "git-pass"),
        ("GITSTATE_USERNAME", USER),
        ("GITSTATE_PASSWORD", PASSWORD),
    ];
    let authed = RawServe::start("", &format!("0.0.0.0:{}", free_port()), &env);
    let log = authed.stderr_after_banner();
    assert!(!log.contains(WARNING) && !log.contains("WARNING"), "warning although backend auth is set:\n{log}");

    let loopback = Serve::start(ServeOpts::new());
    while !loopback.stdout_log().contains("listening on") {
        thread::sleep(Duration::from_millis(20));
    }
    let log = loopback.stderr_log();
    assert!(!log.contains(WARNING), "warning on loopback:\n{log}");
}
