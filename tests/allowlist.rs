//! The repository allowlist under attack (issue 10, section 1) and log lines under forged
//! input (issue 10, section 5), through a real `gitstate serve` in `env` mode (it holds git
//! credentials of its own and hands them to whatever repository a request names).
//!
//! - `escape_attempts_contact_nothing_outside_the_pattern`: a table of `repository=` values
//!   that try to leave the allowed patterns (dot segments, encoded and double-encoded
//!   separators, backslashes, `?`/`#`/`@` in the host part, other notations of the host and
//!   port, IPv6, a host `*` fed two labels, overlong and unicode input, control characters,
//!   the ports of two trap listeners), each sent URL-encoded and, where it survives query
//!   parsing, raw, as GET, LOCK and POST on `/state/`, POST on `/lock/` and GET in the
//!   terraform-backend-git form. Every answer is 400 or 403; the traps (TCP proxies in front
//!   of the real hosts) accept no connection; neither git host sees a request at all; no
//!   body carries the git password. Then the allowed repositories still work (write, read,
//!   lock, in both the `x` and `x.git` spellings), and a second server whose patterns name
//!   the traps proves that the traps do count gitstate's connections.
//! - `refused_repository_values_cannot_forge_log_lines`: newlines, CR LF, a forged log line,
//!   ANSI and C1 escapes and Unicode line breaks in `repository=`, `ref=`, `state=`, the state
//!   path and a LockInfo `ID`, plus odd bytes in the method and path: every answer is 4xx, the
//!   log gains no raw ESC, CR, C1 CSI or Unicode line break, and every line it gains starts
//!   with the log's own prefix (a timestamp and a level), none with the forged text. A
//!   password inside a refused URL appears in neither the log nor a body.
//! - `refused_lock_ids_cannot_forge_log_lines`: the same values in the `ID=` query parameter
//!   of a POST or DELETE when no lock is held (a 409 "no lock is held with ID ...").

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use base64::Engine as _;
use gitstate_testkit::fixtures::{lock_info, state};
use gitstate_testkit::gitd::{git_out, git_try, rev_parse, GitDaemon};
use gitstate_testkit::httpd::GitHttpServer;
use gitstate_testkit::serve::{Serve, ServeOpts};
use gitstate_testkit::stall::StallProxy;

/// The git host's user and password: `gitstate serve` holds them (`GITSTATE_AUTH=env`).
const GIT_USER: &str = "deploy-bot";
const GIT_PASSWORD: &str = "G1t-T0ken-QUUXPLUGH";
/// The backend's own basic auth.
const TF_USER: &str = "tf";
const TF_PASSWORD: &str = "tf-Pa55-backend";

// ---------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------

/// An answer read off the socket.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: Vec<u8>,
}

impl Answer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

/// One HTTP/1.1 exchange over raw TCP, so that no client library normalises the target:
/// `target` goes onto the request line byte for byte.
fn send(addr: SocketAddr, method: &[u8], target: &[u8], auth: Option<&str>, body: &[u8]) -> Answer {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut req = Vec::new();
    req.extend_from_slice(method);
    req.push(b' ');
    req.extend_from_slice(target);
    req.extend_from_slice(b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    if let Some(a) = auth {
        req.extend_from_slice(format!("Authorization: {a}\r\n").as_bytes());
    }
    if !body.is_empty() {
        req.extend_from_slice(b"Content-Type: application/json\r\n");
    }
    req.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
    req.extend_from_slice(body);
    // The server may answer and close before reading everything: the answer is what counts.
    let _ = s.write_all(&req);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n");
    let (head, body) = match split {
        Some(i) => (&answer[..i], answer[i + 4..].to_vec()),
        None => (&answer[..], Vec::new()),
    };
    let head = String::from_utf8_lossy(head);
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Answer { status, body }
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn contains(hay: &[u8], needle: &str) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Whether `value` can stand raw in a query and arrive as itself (or as something that must
/// be refused just the same): no whitespace or control bytes (not allowed on a request line),
/// no `&` (ends the parameter) and no `#` (ends the target), either of which could cut a
/// refused value down to an allowed one.
fn raw_form_survives(value: &str) -> bool {
    value.bytes().all(|b| b > 0x20 && b != 0x7f && b != b'&' && b != b'#')
}

/// `s` with control characters escaped and cut short, for failure messages.
fn show(s: &str) -> String {
    let escaped: String = s.chars().flat_map(char::escape_debug).collect();
    if escaped.len() > 160 {
        format!(
            "{}... ({} bytes)",
            &escaped[..escaped.char_indices().nth(150).map_or(escaped.len(), |(i, _)| i)],
            s.len()
        )
    } else {
        escaped
    }
}

/// Lines of the git daemon's log that record a client (a connection or a request).
fn daemon_activity(log: &str) -> Vec<String> {
    log.lines().filter(|l| l.contains("Connection from") || l.contains("Request ")).map(str::to_string).collect()
}

/// Every ref of a bare repository (empty when there is none).
fn refs_of(dir: &std::path::Path) -> String {
    String::from_utf8_lossy(&git_try(dir, &["for-each-ref"]).stdout).trim().to_string()
}

// ---------------------------------------------------------------------------
// 1. escape attempts
// ---------------------------------------------------------------------------

/// The table: (what the row tries, the `repository=` value).
fn escape_table(h: u16, d: u16, th: u16, td: u16, base_dir: &str) -> Vec<(&'static str, String)> {
    let hu = format!("http://127.0.0.1:{h}/git");
    let du = format!("git://127.0.0.1:{d}");
    vec![
        // Plainly outside the patterns.
        ("another repository on the allowed http host", format!("{hu}/other.git")),
        ("another repository, `x` spelling", format!("{hu}/secret")),
        ("another directory on the allowed git host", format!("{du}/other/secret.git")),
        ("another directory, `x` spelling", format!("{du}/other/secret")),
        // `..` segments.
        ("`..` after the star's segment (git)", format!("{du}/team/../other/secret.git")),
        ("`..` twice after an allowed repository", format!("{du}/team/ok.git/../../other/secret.git")),
        ("`..` inside the star's prefix (http)", format!("{hu}/team-x/../other.git")),
        ("`..` after an allowed repository (http)", format!("{hu}/team-a.git/../secret.git")),
        ("`...` segment", format!("{du}/team/...")),
        ("`..` deep, under 2 KB", format!("{du}/team/{}other/secret.git", "../".repeat(600))),
        // Percent-encoded dots and separators.
        ("%2e%2e segment", format!("{du}/team/%2e%2e/other/secret.git")),
        ("mixed-case %2E%2e segment", format!("{du}/team/%2E%2e/other/secret.git")),
        ("%2f inside the star", format!("{du}/team/..%2fother%2fsecret.git")),
        ("%2F inside the star (http)", format!("{hu}/team-x%2F..%2Fother.git")),
        ("everything encoded", format!("{du}/team/%2e%2e%2f%2e%2e%2fother%2fsecret.git")),
        ("%5c inside the star (http)", format!("{hu}/team-..%5c..%5csecret.git")),
        ("%5C inside the star (git)", format!("{du}/team/..%5Cother%5Csecret.git")),
        ("double-encoded %252f", format!("{hu}/team-x%252f..%252fother.git")),
        ("double-encoded %252e", format!("{du}/team/%252e%252e/other/secret.git")),
        ("%00 then `..`", format!("{du}/team/ok.git%00/../../other/secret.git")),
        ("%0a in the path", format!("{du}/team/ok.git%0a")),
        // Backslashes.
        ("backslash `..` (git)", format!("{du}/team/..\\other\\secret.git")),
        ("backslash `..` in the star (http)", format!("{hu}/team-\\..\\..\\secret.git")),
        ("backslashes for every slash", format!("http:\\\\127.0.0.1:{h}\\git\\team-a.git")),
        // `./`, `//`, trailing `/`.
        ("`./` segment (git)", format!("{du}/team/./ok.git")),
        ("`./` segment (http)", format!("{hu}/./team-a.git")),
        ("`//` inside the path", format!("{du}/team//ok.git")),
        ("`//` at the start of the path", format!("{du}//other/secret.git")),
        ("trailing `/`", format!("{hu}/team-a.git/")),
        // Query and fragment.
        ("`?` in the path", format!("{hu}/team-a.git?/../secret.git")),
        ("`#` in the path", format!("{du}/team/ok.git#/../../other/secret.git")),
        // `?` `#` `\` `/` `@` in the host part (the trap is where a lax parser would connect).
        ("`?` in the host part", format!("http://127.0.0.1:{th}?.127.0.0.1:{h}/git/team-a.git")),
        ("`#` in the host part", format!("http://127.0.0.1:{th}#.127.0.0.1:{h}/git/team-a.git")),
        ("`?` before a host-star label", format!("http://127.0.0.1:{th}?.localhost:{h}/git/team-a.git")),
        ("`#` before a host-star label", format!("http://127.0.0.1:{th}#.localhost:{h}/git/team-a.git")),
        ("`\\` before a host-star label", format!("http://127.0.0.1:{th}\\.localhost:{h}/git/team-a.git")),
        ("`/` before a host-star label", format!("http://127.0.0.1:{th}/.localhost:{h}/git/team-a.git")),
        ("%2f before a host-star label", format!("http://127.0.0.1:{th}%2f.localhost:{h}/git/team-a.git")),
        ("user info: allowed host as the user", format!("http://127.0.0.1:{h}@127.0.0.1:{th}/git/team-a.git")),
        (
            "user info with the git credentials",
            format!("http://{GIT_USER}:{GIT_PASSWORD}@127.0.0.1:{th}/git/team-a.git"),
        ),
        ("user info before a host-star host", format!("http://127.0.0.1:{th}@x.localhost:{h}/git/team-a.git")),
        ("`\\@` in the host part", format!("http://127.0.0.1:{th}\\@127.0.0.1:{h}/git/team-a.git")),
        ("%40 in the host part", format!("http://127.0.0.1:{th}%40127.0.0.1:{h}/git/team-a.git")),
        ("`@` and a port in the path", format!("{hu}/team-a.git@127.0.0.1:{th}/x.git")),
        ("two ports", format!("http://127.0.0.1:{th}:{h}/git/team-a.git")),
        // Host star fed two labels, and other spellings of the host.
        ("host star fed `a.b`", format!("http://a.b.localhost:{h}/git/team-a.git")),
        ("host star with the trap's port", format!("http://x.localhost:{th}/git/team-a.git")),
        ("uppercase host-star host", format!("http://X.LOCALHOST:{h}/git/team-a.git")),
        ("trailing dot on the host", format!("http://127.0.0.1.:{h}/git/team-a.git")),
        ("localhost for 127.0.0.1 (http)", format!("http://localhost:{h}/git/team-a.git")),
        ("localhost for 127.0.0.1 (git)", format!("git://localhost:{d}/team/ok.git")),
        ("uppercase scheme", format!("HTTP://127.0.0.1:{h}/git/team-a.git")),
        ("mixed-case scheme", format!("Git://127.0.0.1:{d}/team/ok.git")),
        ("uppercase host", format!("http://LOCALHOST:{h}/git/team-a.git")),
        ("uppercase path (http)", format!("{hu}/TEAM-A.git")),
        ("uppercase directory (git)", format!("{du}/TEAM/ok.git")),
        // Ports.
        ("port with a leading zero (http)", format!("http://127.0.0.1:0{h}/git/team-a.git")),
        ("port with leading zeros (git)", format!("git://127.0.0.1:00{d}/team/ok.git")),
        (
            "port above 65535 (wraps to the allowed one)",
            format!("http://127.0.0.1:{}/git/team-a.git", h as u32 + 65536),
        ),
        ("empty port", "http://127.0.0.1:/git/team-a.git".to_string()),
        ("the http trap's port", format!("http://127.0.0.1:{th}/git/team-a.git")),
        ("the git trap's port", format!("git://127.0.0.1:{td}/team/ok.git")),
        ("another scheme on the allowed port", format!("git://127.0.0.1:{h}/git/team-a.git")),
        ("https on the allowed port", format!("https://127.0.0.1:{h}/git/team-a.git")),
        // IPv4 in other notations.
        ("IPv4 as one decimal number", format!("http://2130706433:{h}/git/team-a.git")),
        ("IPv4 as one hex number", format!("http://0x7f000001:{h}/git/team-a.git")),
        ("IPv4 with a hex label", format!("http://0x7f.0.0.1:{h}/git/team-a.git")),
        ("IPv4 short form 127.1", format!("http://127.1:{h}/git/team-a.git")),
        ("IPv4 octal", format!("git://0177.0.0.1:{d}/team/ok.git")),
        ("IPv4 with a zero-padded label", format!("http://127.0.0.01:{h}/git/team-a.git")),
        // IPv6 loopback forms.
        ("IPv6 ::1 (http)", format!("http://[::1]:{h}/git/team-a.git")),
        ("IPv6 ::1 (git)", format!("git://[::1]:{d}/team/ok.git")),
        ("IPv6 loopback written out", format!("http://[0:0:0:0:0:0:0:1]:{h}/git/team-a.git")),
        ("IPv4-mapped IPv6", format!("http://[::ffff:127.0.0.1]:{h}/git/team-a.git")),
        ("IPv4-mapped IPv6 in hex", format!("http://[::ffff:7f00:1]:{h}/git/team-a.git")),
        ("IPv6 with a zone", format!("http://[::1%25lo]:{h}/git/team-a.git")),
        ("IPv4 in brackets", format!("http://[127.0.0.1]:{h}/git/team-a.git")),
        // The star never crosses a separator.
        ("star fed two segments (git)", format!("{du}/team/ok.git/x")),
        ("star fed two segments (http)", format!("{hu}/team-a/b.git")),
        ("many segments", format!("{du}/{}ok.git", "team/".repeat(400))),
        // Overlong input.
        ("10 KB segment", format!("{hu}/team-{}.git", "a".repeat(10_000))),
        ("10 KB of segments", format!("{du}/team/{}x", "a/".repeat(5_000))),
        // Unicode lookalikes.
        ("one-dot leader for `.`", format!("{hu}/team-a\u{2024}git")),
        ("division slash for `/`", format!("{hu}/team-a.git\u{2215}..\u{2215}secret.git")),
        ("fullwidth dots", format!("{du}/team/\u{ff0e}\u{ff0e}/other/secret.git")),
        ("fullwidth solidus", format!("{du}/team/..\u{ff0f}other\u{ff0f}secret.git")),
        ("fullwidth digit in the host", format!("http://\u{ff11}27.0.0.1:{h}/git/team-a.git")),
        ("Cyrillic o in localhost", format!("http://x.l\u{043e}calhost:{h}/git/team-a.git")),
        ("non-breaking hyphen in the star's prefix", format!("{hu}/team\u{2011}a.git")),
        // Whitespace and control characters.
        ("trailing tab", format!("{hu}/team-a.git\t")),
        ("trailing newline", format!("{du}/team/ok.git\n")),
        ("newline then `..`", format!("{du}/team/\n../../other/secret.git")),
        ("CR LF in the star", format!("{hu}/team-\r\n../secret.git")),
        ("leading space", format!(" {hu}/team-a.git")),
        ("NUL byte", format!("{du}/team/ok.git\0")),
        ("tab inside the host", format!("http://127.0.0.1\t:{h}/git/team-a.git")),
        // Schemes and forms that need git's own programs, or no scheme at all; ssh:// (a
        // scheme of gitstate's own since issue 19) outside the patterns.
        ("file://", format!("file://{base_dir}/other/secret.git")),
        ("ssh://", "ssh://127.0.0.1/other/secret.git".to_string()),
        ("scp-like with a user", format!("git@127.0.0.1:{base_dir}/other/secret.git")),
        ("scp-like", format!("127.0.0.1:{base_dir}/other/secret.git")),
        ("ext:: transport", "ext::sh -c touch% /tmp/gitstate-pwned".to_string()),
        ("git+http://", format!("git+http://127.0.0.1:{h}/git/team-a.git")),
        ("scheme-relative", format!("//127.0.0.1:{h}/git/team-a.git")),
        ("one slash after the scheme", format!("http:/127.0.0.1:{h}/git/team-a.git")),
        ("a local path", format!("{base_dir}/other/secret.git")),
    ]
}

/// A pattern of the git daemon, one of lighttpd, one with a `*` host label; two trap proxies
/// (one in front of each host) that nothing may connect to; a table of escape attempts.
#[test]
fn escape_attempts_contact_nothing_outside_the_pattern() {
    let started = Instant::now();
    let httpd = GitHttpServer::start_with_users(&[(GIT_USER, GIT_PASSWORD)]);
    for name in ["team-a.git", "other.git", "secret.git"] {
        httpd.create_repo(name);
    }
    let daemon = GitDaemon::start();
    daemon.create_repo("team/ok.git");
    daemon.create_repo("other/secret.git");
    let (h, d) = (httpd.port(), daemon.port());
    let trap_h = StallProxy::start(SocketAddr::from(([127, 0, 0, 1], h)));
    let trap_d = StallProxy::start(SocketAddr::from(([127, 0, 0, 1], d)));
    let (th, td) = (trap_h.port(), trap_d.port());

    let patterns = format!(
        "http://127.0.0.1:{h}/git/team-*.git, git://127.0.0.1:{d}/team/*, http://*.localhost:{h}/git/team-*.git"
    );
    let env_mode = |patterns: &str| {
        ServeOpts::new()
            .env("GITSTATE_AUTH", "env")
            .env("GITSTATE_GIT_USERNAME", GIT_USER)
            .env("GITSTATE_GIT_PASSWORD", GIT_PASSWORD)
            .env("GITSTATE_USERNAME", TF_USER)
            .env("GITSTATE_PASSWORD", TF_PASSWORD)
            .env("GITSTATE_ALLOWED_REPOSITORIES", patterns)
    };
    let serve = Serve::start(env_mode(&patterns));
    let addr = serve.addr();
    let auth = basic(TF_USER, TF_PASSWORD);
    let git_basic = base64::engine::general_purpose::STANDARD.encode(format!("{GIT_USER}:{GIT_PASSWORD}"));
    let setup = started.elapsed();
    // The harness's own readiness probe connected once at start-up: only what follows counts.
    let daemon_before = daemon_activity(&daemon.log()).len();

    let base_dir = daemon.base_dir().display().to_string();
    let table = escape_table(h, d, th, td, &base_dir);
    assert!(table.len() >= 40, "the table has {} rows", table.len());

    let lock_body = lock_info("eeeeeeee-0000-0000-0000-000000000001");
    let state_body = state(1, "escaped");
    const PATH: &str = "esc/terraform.tfstate";
    // Per (method, address) and form: the target given a query value.
    type Target = fn(&str) -> String;
    let shapes: [(&str, Target, &str); 5] = [
        ("GET", |q| format!("/state/{PATH}?repository={q}"), ""),
        ("LOCK", |q| format!("/state/{PATH}?repository={q}"), "lock"),
        ("POST", |q| format!("/state/{PATH}?repository={q}&ID=eeeeeeee-0000-0000-0000-000000000001"), "state"),
        ("POST", |q| format!("/lock/{PATH}?repository={q}"), "lock"),
        ("GET", |q| format!("/?type=git&ref=main&state={PATH}&repository={q}"), ""),
    ];

    let mut failures = Vec::new();
    let mut report = Vec::new();
    let mut requests = 0usize;
    let mut slowest = (Duration::ZERO, String::new());
    let table_started = Instant::now();
    for (what, value) in &table {
        let mut forms = vec![("encoded", enc(value))];
        if raw_form_survives(value) {
            forms.push(("raw", value.clone()));
        }
        let mut seen = Vec::new();
        for (form, q) in &forms {
            for (method, target, body) in &shapes {
                let body = match *body {
                    "lock" => lock_body.as_bytes(),
                    "state" => state_body.as_bytes(),
                    _ => b"".as_slice(),
                };
                let target = target(q);
                let t0 = Instant::now();
                let got = send(addr, method.as_bytes(), target.as_bytes(), Some(&auth), body);
                let took = t0.elapsed();
                requests += 1;
                if took > slowest.0 {
                    slowest = (took, format!("{method} {}", show(&target)));
                }
                seen.push(got.status);
                if got.status != 400 && got.status != 403 {
                    failures.push(format!(
                        "{what}: {method} {} ({form}) answered {}: {}",
                        show(&target),
                        got.status,
                        show(&got.text())
                    ));
                }
                for secret in [GIT_PASSWORD, git_basic.as_str(), TF_PASSWORD] {
                    if contains(&got.body, secret) {
                        failures.push(format!("{what}: {method} {} ({form}): the body holds a secret", show(&target)));
                    }
                }
            }
        }
        seen.sort_unstable();
        seen.dedup();
        report.push(format!("{seen:?} {what}: {}", show(value)));
    }

    // Parameter pollution: a refused value next to an allowed one is refused whatever the order.
    let allowed = format!("http://127.0.0.1:{h}/git/team-a.git");
    let refused = format!("http://127.0.0.1:{h}/git/other.git");
    for query in [
        format!("repository={}&repository={}", enc(&refused), enc(&allowed)),
        format!("repository={}&ref=main&repository={}", enc(&refused), enc(&allowed)),
    ] {
        let target = format!("/state/{PATH}?{query}");
        let got = send(addr, b"GET", target.as_bytes(), Some(&auth), b"");
        requests += 1;
        if got.status != 400 && got.status != 403 {
            failures.push(format!("repeated parameter: GET {target} answered {}: {}", got.status, show(&got.text())));
        }
    }
    let table_time = table_started.elapsed();

    eprintln!(
        "--- {} rows, {requests} requests in {table_time:?} (slowest {:?}: {}) ---",
        table.len(),
        slowest.0,
        slowest.1
    );
    for line in &report {
        eprintln!("{line}");
    }

    // Nothing was contacted: not the traps, and neither real host at all (every request above
    // was refused before any network access).
    if trap_h.connections() != 0 || trap_d.connections() != 0 {
        failures.push(format!(
            "the traps were contacted: http trap {} connection(s), git trap {}",
            trap_h.connections(),
            trap_d.connections()
        ));
    }
    let http_log = httpd.access_log_lines();
    if !http_log.is_empty() {
        failures.push(format!("refused requests reached lighttpd:\n{}", http_log.join("\n")));
    }
    let daemon_seen = daemon_activity(&daemon.log()).split_off(daemon_before);
    if !daemon_seen.is_empty() {
        failures.push(format!("refused requests reached the git daemon:\n{}", daemon_seen.join("\n")));
    }
    let log = serve.stderr_log();
    if log.contains(GIT_PASSWORD) || log.contains(&git_basic) {
        failures.push("the git password is in the server log".into());
    }
    assert!(failures.is_empty(), "{} failure(s):\n{}", failures.len(), failures.join("\n"));

    // The allowed repositories still work, in both spellings of the last segment.
    let allowed_started = Instant::now();
    let ok = |got: &Answer, what: &str| assert!(got.status == 200, "{what}: {} {}", got.status, got.text());
    let q = |url: &str| enc(url);
    let team_a = format!("http://127.0.0.1:{h}/git/team-a.git");
    let team_a_bare = format!("http://127.0.0.1:{h}/git/team-a");
    let ok_git = format!("git://127.0.0.1:{d}/team/ok.git");
    let ok_bare = format!("git://127.0.0.1:{d}/team/ok");

    let s1 = state(1, "http-1");
    let got = send(
        addr,
        b"POST",
        format!("/state/allow/http.tfstate?repository={}", q(&team_a)).as_bytes(),
        Some(&auth),
        s1.as_bytes(),
    );
    ok(&got, "POST to team-a.git");
    let got = send(
        addr,
        b"GET",
        format!("/state/allow/http.tfstate?repository={}", q(&team_a_bare)).as_bytes(),
        Some(&auth),
        b"",
    );
    ok(&got, "GET from team-a");
    assert_eq!(got.text(), s1, "team-a and team-a.git are one repository");
    let s2 = state(2, "http-2");
    let got = send(
        addr,
        b"POST",
        format!("/state/allow/http.tfstate?repository={}", q(&team_a_bare)).as_bytes(),
        Some(&auth),
        s2.as_bytes(),
    );
    ok(&got, "POST to team-a");
    // Unencoded, as a hand-written address would be.
    let got = send(addr, b"GET", format!("/state/allow/http.tfstate?repository={team_a}").as_bytes(), Some(&auth), b"");
    ok(&got, "GET from team-a.git (raw)");
    assert_eq!(got.text(), s2);
    let stored = git_out(&httpd.repo_dir("team-a.git"), &["show", "main:allow/http.tfstate"]);
    assert_eq!(stored, s2.trim_end(), "team-a.git on the http host holds the last write");

    let g1 = state(1, "git-1");
    let got = send(
        addr,
        b"POST",
        format!("/state/allow/git.tfstate?repository={}", q(&ok_git)).as_bytes(),
        Some(&auth),
        g1.as_bytes(),
    );
    ok(&got, "POST to team/ok.git");
    let got =
        send(addr, b"GET", format!("/state/allow/git.tfstate?repository={}", q(&ok_bare)).as_bytes(), Some(&auth), b"");
    ok(&got, "GET from team/ok");
    assert_eq!(got.text(), g1);
    let id = "aaaaaaaa-0000-0000-0000-00000000000a";
    let lock_target = format!("/state/allow/git.tfstate?repository={}", q(&ok_bare));
    ok(&send(addr, b"LOCK", lock_target.as_bytes(), Some(&auth), lock_info(id).as_bytes()), "LOCK on team/ok");
    let g2 = state(2, "git-2");
    let got = send(
        addr,
        b"POST",
        format!("/state/allow/git.tfstate?repository={}&ID={id}", q(&ok_git)).as_bytes(),
        Some(&auth),
        g2.as_bytes(),
    );
    ok(&got, "POST under the lock to team/ok.git");
    ok(&send(addr, b"UNLOCK", lock_target.as_bytes(), Some(&auth), lock_info(id).as_bytes()), "UNLOCK on team/ok");
    let ok_dir = daemon.repo_dir("team/ok.git");
    assert_eq!(git_out(&ok_dir, &["show", "main:allow/git.tfstate"]), g2.trim_end());
    assert_eq!(rev_parse(&ok_dir, "refs/heads/locks/allow/git.tfstate"), None, "the lock branch is gone");
    let allowed_time = allowed_started.elapsed();

    // Still nothing reached a trap or anything outside the patterns.
    assert_eq!(trap_h.connections(), 0, "the http trap was contacted");
    assert_eq!(trap_d.connections(), 0, "the git trap was contacted");
    let access = httpd.access_log();
    assert!(!access.is_empty(), "the allowed requests did not reach lighttpd");
    for e in &access {
        assert!(
            e.target.starts_with("/git/team-a.git/") || e.target.starts_with("/git/team-a/"),
            "lighttpd served something outside the pattern: {}",
            e.line
        );
        assert!(e.user.as_deref() == Some(GIT_USER) || e.status == 401, "unexpected user: {}", e.line);
    }
    let daemon_log = daemon.log();
    let requests_seen: Vec<String> =
        daemon_log.lines().filter(|l| l.contains("Request ")).map(str::to_string).collect();
    assert!(!requests_seen.is_empty(), "the allowed requests did not reach the git daemon:\n{daemon_log}");
    for l in &requests_seen {
        assert!(
            l.contains("'/team/ok.git'") || l.contains("'/team/ok'"),
            "the git daemon served something outside the pattern: {l}"
        );
    }
    assert!(
        !daemon_log.contains("other") && !daemon_log.contains("secret"),
        "the daemon saw other/secret:\n{daemon_log}"
    );
    for name in ["other.git", "secret.git"] {
        assert_eq!(refs_of(&httpd.repo_dir(name)), "", "{name} on the http host was written");
    }
    assert_eq!(refs_of(&daemon.repo_dir("other/secret.git")), "", "other/secret.git was written");
    let log = serve.stderr_log();
    assert!(!log.contains(GIT_PASSWORD) && !log.contains(&git_basic), "the git password is in the server log");

    // Control: the traps do count gitstate's connections when a pattern names them.
    let control = Serve::start(env_mode(&format!("http://127.0.0.1:{th}/git/team-*.git, git://127.0.0.1:{td}/team/*")));
    let via_trap_d = format!("git://127.0.0.1:{td}/team/ok.git");
    let got = send(
        control.addr(),
        b"GET",
        format!("/state/allow/git.tfstate?repository={}", q(&via_trap_d)).as_bytes(),
        Some(&auth),
        b"",
    );
    ok(&got, "GET through the git trap");
    assert_eq!(got.text(), g2);
    assert!(trap_d.connections() > 0, "the git trap did not see the control request");
    let via_trap_h = format!("http://127.0.0.1:{th}/git/team-a.git");
    let got = send(
        control.addr(),
        b"GET",
        format!("/state/allow/http.tfstate?repository={}", q(&via_trap_h)).as_bytes(),
        Some(&auth),
        b"",
    );
    ok(&got, "GET through the http trap");
    assert_eq!(got.text(), s2);
    assert!(trap_h.connections() > 0, "the http trap did not see the control request");

    eprintln!(
        "timings: set-up {setup:?}, escape table {table_time:?} ({requests} requests), allowed cases {allowed_time:?}, total {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// 2. log lines
// ---------------------------------------------------------------------------

/// The start of a line the log writes itself: `2026-01-01T00:00:00.123456Z  INFO ` (an
/// RFC 3339 timestamp in UTC, then the level).
fn has_log_prefix(line: &str) -> bool {
    let b = line.as_bytes();
    let digits = |r: std::ops::Range<usize>| r.clone().all(|i| b.get(i).is_some_and(u8::is_ascii_digit));
    let shape = digits(0..4)
        && b.get(4) == Some(&b'-')
        && digits(5..7)
        && b.get(7) == Some(&b'-')
        && digits(8..10)
        && b.get(10) == Some(&b'T')
        && digits(11..13)
        && b.get(13) == Some(&b':')
        && digits(14..16)
        && b.get(16) == Some(&b':')
        && digits(17..19);
    if !shape {
        return false;
    }
    let rest = &line[19..];
    let rest = rest.strip_prefix('.').map_or(rest, |r| r.trim_start_matches(|c: char| c.is_ascii_digit()));
    let Some(rest) = rest.strip_prefix('Z') else { return false };
    let level = rest.trim_start();
    ["TRACE ", "DEBUG ", "INFO ", "WARN ", "ERROR "].iter().any(|l| level.starts_with(l))
}

/// The year of the forged lines: a real line of this run never starts with it.
const FORGED_YEAR: &str = "2099-";

/// A line the log could be made to show, as if a request had succeeded.
fn forged_line() -> String {
    format!(
        "{FORGED_YEAR}01-01T00:00:00.000000Z  INFO request{{method=GET operation=\"get\" path=\"x\"}}: gitstate::app: done status=200 forged-marker"
    )
}

/// Caller-sent values that try to forge log lines or drive the terminal reading the log.
fn forgeries() -> Vec<(&'static str, String)> {
    let forged = forged_line();
    vec![
        ("newline + forged line", format!("http://127.0.0.1:9/x.git\n{forged}")),
        ("CR LF + forged line", format!("http://127.0.0.1:9/x.git\r\n{forged}")),
        ("CR only + forged line", format!("http://127.0.0.1:9/x.git\r{forged}")),
        ("forged line without timestamp", "x\nINFO gitstate::app: done status=200 forged-marker".to_string()),
        ("ANSI red", "\u{1b}[31mhttp://127.0.0.1:9/x.git\u{1b}[0m".to_string()),
        ("ANSI erase line + forged", format!("\u{1b}[2K\r{forged}")),
        ("OSC title", "http://127.0.0.1:9/\u{1b}]0;pwned\u{7}x.git".to_string()),
        ("C1 CSI", "http://127.0.0.1:9/x.git\u{9b}31m".to_string()),
        ("NEL and line separator", format!("x\u{85}{forged}\u{2028}{forged}")),
        ("in the path of an allowed host", format!("git://127.0.0.1:9/team/x\n{forged}")),
        ("valid form, not allowed, then newline", format!("git://127.0.0.1:9/other/x.git\n{forged}")),
    ]
}

/// How one forged value is sent: method, target from (encoded value, value), body from the value.
type Shape = (&'static str, fn(&str, &str) -> String, fn(&str) -> Vec<u8>);

fn no_body(_: &str) -> Vec<u8> {
    Vec::new()
}

fn a_state(_: &str) -> Vec<u8> {
    state(1, "forged").into_bytes()
}

fn a_lock_info(_: &str) -> Vec<u8> {
    lock_info("ffffffff-0000-0000-0000-00000000000f").into_bytes()
}

/// A `gitstate serve` (embedded repository, an allowlist naming port 9, never contacted)
/// and a warm-up request whose log line shows the log's own prefix. Returns the server and
/// the length of its log so far.
fn serve_for_logs() -> (Serve, usize) {
    let serve = Serve::start(
        ServeOpts::new().env("GITSTATE_ALLOWED_REPOSITORIES", "git://127.0.0.1:9/team/*, http://127.0.0.1:9/git/*"),
    );
    let warm = send(serve.addr(), b"GET", b"/state/warm/terraform.tfstate", None, b"");
    assert_eq!(warm.status, 204, "warm-up GET: {}", warm.text());
    let log = serve.stderr_log();
    let done: Vec<&str> = log.lines().filter(|l| l.contains("done")).collect();
    assert!(
        !done.is_empty() && done.iter().all(|l| has_log_prefix(l)),
        "the log's lines do not look as expected:\n{log}"
    );
    eprintln!("a normal log line: {}", done[0]);
    (serve, log.len())
}

/// Send every forged value in every shape; failures: an answer that is not 4xx.
fn send_forgeries(addr: SocketAddr, shapes: &[Shape], failures: &mut Vec<String>) -> usize {
    let mut sent = 0;
    for (what, value) in forgeries() {
        let q = enc(&value);
        for (method, target, body) in shapes {
            let target = target(&q, &value);
            let got = send(addr, method.as_bytes(), target.as_bytes(), None, &body(&value));
            sent += 1;
            if !(400..500).contains(&got.status) {
                failures.push(format!(
                    "{what}: {method} {} answered {}: {}",
                    show(&target),
                    got.status,
                    show(&got.text())
                ));
            }
        }
    }
    sent
}

/// What the log gained after `baseline`: no raw ESC, CR, C1 CSI or Unicode line break, no
/// `secret`, and every line starts with the log's own prefix (never with forged text).
fn check_log(serve: &Serve, baseline: usize, secret: Option<&str>, failures: &mut Vec<String>) -> usize {
    let whole = serve.stderr_log();
    let added = &whole[baseline..];
    for (c, name) in [
        ('\u{1b}', "ESC"),
        ('\r', "CR"),
        ('\u{9b}', "C1 CSI"),
        ('\u{85}', "NEL"),
        ('\u{2028}', "LINE SEPARATOR"),
        ('\u{2029}', "PARAGRAPH SEPARATOR"),
    ] {
        let hits = added.lines().filter(|l| l.contains(c)).count();
        if hits > 0 {
            failures.push(format!("{hits} log line(s) hold a raw {name}"));
        }
    }
    if let Some(secret) = secret.filter(|s| added.contains(s)) {
        let lines: Vec<String> = added.lines().filter(|l| l.contains(secret)).map(show).collect();
        failures.push(format!("the password of a refused URL is in the log:\n{}", lines.join("\n")));
    }
    let mut lines = 0;
    for line in added.lines() {
        lines += 1;
        if line.starts_with(FORGED_YEAR) || !has_log_prefix(line) {
            failures.push(format!("a log line does not start with the log's own prefix: {}", show(line)));
        }
    }
    lines
}

/// `repository=` (and the other request fields that reach gitstate's handling, but for the
/// `ID=` parameter: see the next test) carrying newlines, a forged log line, ANSI escapes;
/// odd bytes in the method and path; a password inside a refused URL.
#[test]
fn refused_repository_values_cannot_forge_log_lines() {
    let started = Instant::now();
    let (serve, baseline) = serve_for_logs();
    let addr = serve.addr();
    let shapes: Vec<Shape> = vec![
        ("GET", |q, _| format!("/state/logs/x.tfstate?repository={q}"), no_body),
        ("LOCK", |q, _| format!("/state/logs/x.tfstate?repository={q}"), a_lock_info),
        ("POST", |q, _| format!("/state/logs/x.tfstate?repository={q}"), a_state),
        ("DELETE", |q, _| format!("/lock/logs/x.tfstate?repository={q}"), no_body),
        ("GET", |q, _| format!("/?type=git&state=logs/x.tfstate&repository={q}"), no_body),
        // The other caller-sent values that reach the request's handling.
        ("GET", |q, _| format!("/state/logs/x.tfstate?ref={q}"), no_body),
        ("GET", |q, _| format!("/?type=git&state={q}"), no_body),
        ("GET", |q, _| format!("/state/logs/{q}"), no_body),
        ("GET", |_, v| format!("/lock/{}", v.bytes().map(|b| format!("%{b:02X}")).collect::<String>()), no_body),
        (
            "LOCK",
            |_, _| "/state/logs/x.tfstate".into(),
            |v| serde_json::to_vec(&serde_json::json!({ "ID": v })).unwrap(),
        ),
        (
            "UNLOCK",
            |_, _| "/state/logs/x.tfstate".into(),
            |v| serde_json::to_vec(&serde_json::json!({ "ID": v })).unwrap(),
        ),
    ];
    let mut failures = Vec::new();
    let mut sent = send_forgeries(addr, &shapes, &mut failures);

    // Odd bytes where the HTTP layer may or may not let them through (raw on the request line).
    let odd: [(&str, &[u8], &[u8]); 9] = [
        ("method INFO", b"INFO", b"/state/logs/x.tfstate"),
        ("method with ESC", b"LO\x1bCK", b"/state/logs/x.tfstate"),
        ("method 2099-forged", b"2099-FORGED", b"/state/logs/x.tfstate"),
        ("raw ESC in the path", b"GET", b"/state/\x1b[31mred"),
        ("raw 0xff in the path", b"GET", b"/state/x\xff\xfe"),
        ("raw C1 CSI in the path", b"GET", b"/state/x\xc2\x9b31m"),
        ("overlong UTF-8 dots", b"GET", b"/state/%c0%ae%c0%ae/x"),
        ("raw ESC in the query", b"GET", b"/state/logs/x.tfstate?repository=\x1b[31mx"),
        ("raw NEL in the query", b"GET", b"/state/logs/x.tfstate?repository=x\xc2\x85INFO"),
    ];
    for (what, method, target) in odd {
        sent += 1;
        let got = send(addr, method, target, None, b"");
        if !(400..500).contains(&got.status) {
            failures.push(format!("{what}: answered {}: {}", got.status, show(&got.text())));
        }
    }

    // A git credential inside a refused URL: never in the log, never in a body.
    const PW: &str = "S3cr3tPW";
    let forged = forged_line();
    for url in [
        format!("http://user:{PW}@127.0.0.1:9/x.git"),
        format!("http://user:{PW}@127.0.0.1:9/git/x.git"),
        format!("https://{PW}@127.0.0.1:9/x.git"),
        format!("http://user:{PW}@127.0.0.1:9/x.git\n{forged}"),
        format!("http://user:{PW}/x@127.0.0.1:9/x.git"),
        format!("http://user:{PW}?@127.0.0.1:9/x.git"),
        format!("http://user:{PW}#@127.0.0.1:9/x.git"),
        format!("http://user:{PW}%40127.0.0.1:9/x.git"),
        format!("git://user:{PW}@127.0.0.1:9/team/x.git"),
        format!("HTTP://user:{PW}@127.0.0.1:9/x.git"),
        format!("http://127.0.0.1:9/x.git?password={PW}"),
        format!("http://127.0.0.1:9/x.git#{PW}"),
        format!("http://127.0.0.1:9/{PW}/../x.git"),
    ] {
        for target in [
            format!("/state/logs/x.tfstate?repository={}", enc(&url)),
            format!("/?type=git&state=logs/x.tfstate&repository={}", enc(&url)),
        ] {
            sent += 1;
            let got = send(addr, b"GET", target.as_bytes(), None, b"");
            if !(400..500).contains(&got.status) {
                failures.push(format!("credential URL {}: answered {}: {}", show(&url), got.status, show(&got.text())));
            }
            if got.text().contains(PW) {
                failures.push(format!("the body for {} repeats the password: {}", show(&url), show(&got.text())));
            }
        }
    }

    let lines = check_log(&serve, baseline, Some(PW), &mut failures);
    // Requests the HTTP layer refuses itself (a method with ESC, raw bytes) may log nothing;
    // every forged value that reaches gitstate adds lines of its own.
    if lines < forgeries().len() * shapes.len() {
        failures.push(format!("{sent} requests added only {lines} log lines"));
    }
    eprintln!("{sent} requests, {lines} log lines added, {:?}", started.elapsed());
    assert!(failures.is_empty(), "{} failure(s):\n{}", failures.len(), failures.join("\n"));
}

/// The `ID=` query parameter of a write or delete (the lock ID Terraform holds) with the same
/// forged values: a 409 "no lock is held with ID ..." must not write the caller's text into
/// the log unescaped.
#[test]
fn refused_lock_ids_cannot_forge_log_lines() {
    let (serve, baseline) = serve_for_logs();
    let shapes: Vec<Shape> = vec![
        ("POST", |q, _| format!("/state/logs/x.tfstate?ID={q}"), a_state),
        ("DELETE", |q, _| format!("/state/logs/x.tfstate?ID={q}"), no_body),
    ];
    let mut failures = Vec::new();
    let sent = send_forgeries(serve.addr(), &shapes, &mut failures);
    let lines = check_log(&serve, baseline, None, &mut failures);
    eprintln!("{sent} requests, {lines} log lines added");
    assert!(failures.is_empty(), "{} failure(s):\n{}", failures.len(), failures.join("\n"));
}
