//! Bad input (issue 5): every malformed or hostile request gets a 4xx with a message
//! that says what is wrong, and nothing is stored: after each request the server
//! repository's refs (every branch, lock branches included) are exactly what they were.
//!
//! The table runs through `App::handle` on the embedded store and on a real `git daemon`;
//! a few cases also go through `gitstate serve` over raw TCP, to cover hyper's side
//! (a chunked body above the limit, an unknown method, traversal in the request line).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use gitstate::{app::App, config::Config, protocol::content_md5};
use gitstate_testkit::fixtures::{lock_info, state};
use gitstate_testkit::gitd::{git_out, GitDaemon};
use gitstate_testkit::serve::{http, Serve, ServeOpts};

const LIMIT: usize = 1024;

/// One bad request and what must come back.
struct Case {
    name: String,
    method: &'static str,
    uri: String,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    status: u16,
    /// Text the answer must contain (case-insensitive): the "clear message".
    says: &'static str,
}

fn case(
    name: impl Into<String>,
    method: &'static str,
    uri: impl Into<String>,
    body: impl Into<Vec<u8>>,
    status: u16,
    says: &'static str,
) -> Case {
    let body = body.into();
    let mut headers = Vec::new();
    // Terraform sends Content-MD5 with every write; a correct one must not rescue a bad request.
    if method == "POST" && !body.is_empty() {
        headers.push(("Content-MD5", content_md5(&body)));
    }
    Case { name: name.into(), method, uri: uri.into(), headers, body, status, says }
}

/// The table of bad requests. `good.tfstate` exists and `held.tfstate` is locked by `A`.
fn cases() -> Vec<Case> {
    let valid = state(7, "bad input");
    let mut c = vec![
        // Bodies of writes.
        case("malformed JSON", "POST", "/state/good.tfstate", "{\"version\": 4, \"serial\": ", 400, "not JSON"),
        case("non-JSON body", "POST", "/state/good.tfstate", "hello, world\n", 400, "not JSON"),
        case("JSON that is not an object", "POST", "/state/good.tfstate", "[1, 2, 3]", 400, "JSON object"),
        case("JSON string", "POST", "/state/good.tfstate", "\"state\"", 400, "JSON object"),
        case("binary body", "POST", "/state/good.tfstate", vec![0xff, 0xfe, 0x00, 0x01], 400, "not UTF-8"),
        case("force=maybe", "POST", "/state/good.tfstate?force=maybe", valid.clone(), 400, "force"),
    ];
    let mut md5 = case("Content-MD5 mismatch", "POST", "/state/good.tfstate", valid.clone(), 400, "Content-MD5");
    md5.headers = vec![("Content-MD5", content_md5(b"some other body"))];
    c.push(md5);
    let mut md5 = case("Content-MD5 not base64", "POST", "/state/good.tfstate", valid.clone(), 400, "Content-MD5");
    md5.headers = vec![("Content-MD5", "not base64!".into())];
    c.push(md5);

    // Paths: traversal, absolute, hidden, encoded.
    for (what, path) in [
        ("traversal ../", "../x.tfstate"),
        ("traversal a/../../", "a/../../x.tfstate"),
        ("traversal a/..", "a/.."),
        ("absolute //x", "/etc/passwd"),
        ("absolute ///x", "//x.tfstate"),
        (".git/", ".git/config"),
        ("a/.git/HEAD", "a/.git/HEAD"),
        ("./x", "./x.tfstate"),
        ("%2e%2e encoded", "%2e%2e/x.tfstate"),
        ("%2E%2E%2F encoded", "%2E%2E%2Fx.tfstate"),
        ("%2F..%2F encoded", "a%2F..%2Fb.tfstate"),
        ("..%2F encoded", "..%2Fx.tfstate"),
        ("%2e%2git encoded", "%2egit/config"),
        ("empty path", ""),
        ("empty component a//b", "a//b.tfstate"),
        ("trailing slash", "a/"),
        ("not UTF-8", "%ff%fe.tfstate"),
        ("over 1024 bytes", &format!("{}x", "a/".repeat(600))),
    ] {
        c.push(case(format!("path {what} (GET)"), "GET", format!("/state/{path}"), "", 400, ""));
        c.push(case(format!("path {what} (POST)"), "POST", format!("/state/{path}"), valid.clone(), 400, ""));
        c.push(case(format!("path {what} (LOCK)"), "LOCK", format!("/lock/{path}"), lock_info("T"), 400, ""));
    }
    // Characters git does not allow in a ref name (the lock is the branch `locks/<path>`).
    for (what, enc) in [
        ("space", "%20"),
        ("~", "~"),
        ("^", "%5E"),
        (":", ":"),
        ("?", "%3F"),
        ("*", "*"),
        ("[", "%5B"),
        ("\\", "%5C"),
        ("NUL", "%00"),
        ("\\x01", "%01"),
        ("\\x1f", "%1F"),
        ("DEL", "%7F"),
        ("newline", "%0A"),
        ("tab", "%09"),
        ("@{", "%40%7B"),
        ("..", ".."),
    ] {
        c.push(case(
            format!("ref-invalid {what} (POST)"),
            "POST",
            format!("/state/a{enc}b.tfstate"),
            valid.clone(),
            400,
            "path",
        ));
        c.push(case(
            format!("ref-invalid {what} (LOCK)"),
            "LOCK",
            format!("/state/a{enc}b.tfstate"),
            lock_info("T"),
            400,
            "path",
        ));
    }
    for (what, path) in [
        ("lone @", "@"),
        ("component ending in .", "a./b.tfstate"),
        ("ending in .lock", "x.lock"),
        ("ending in .tfstate.lock", "envs/x.tfstate.lock"),
        ("directory ending in .lock", "a.lock/b.tfstate"),
    ] {
        c.push(case(format!("path {what} (POST)"), "POST", format!("/state/{path}"), valid.clone(), 400, "path"));
        c.push(case(format!("path {what} (LOCK)"), "LOCK", format!("/lock/{path}"), lock_info("T"), 400, "path"));
    }
    c.push(case("invalid ref parameter", "POST", "/state/good.tfstate?ref=..bad", valid.clone(), 400, "ref"));
    c.push(case(
        "ref parameter ending in .lock",
        "POST",
        "/state/good.tfstate?ref=main.lock",
        valid.clone(),
        400,
        "ref",
    ));
    c.push(case("unknown address", "POST", "/elsewhere/x.tfstate", valid.clone(), 404, "/state/"));
    c.push(case("compat form without state", "GET", "/?type=git&ref=main", "", 400, "state"));
    c.push(case(
        "repository not allowed",
        "POST",
        "/state/good.tfstate?repository=git://127.0.0.1:1/other.git",
        valid.clone(),
        403,
        "not allowed",
    ));
    c.push(case(
        "repository URL with credentials",
        "POST",
        "/state/good.tfstate?repository=https://u:pw@127.0.0.1:1/x.git",
        valid.clone(),
        400,
        "credentials",
    ));

    // Bytes that are not UTF-8 (RFC 8259: JSON is UTF-8), wherever they stand: refused with
    // the offset of the first bad byte, never stored for Terraform to choke on later.
    let head = br#"{"version":4,"serial":8,"lineage":"lin-1","outputs":{"#.to_vec();
    for (what, bad) in [
        ("0xff in a string value", &b"\"x\":{\"value\":\"a\xffb\",\"type\":\"string\"}"[..]),
        ("a lone continuation byte in a value", b"\"x\":{\"value\":\"\x80\"}"),
        ("an overlong encoding in a value", b"\"x\":{\"value\":\"\xc0\xaf\"}"),
        ("a UTF-16 surrogate in a value", b"\"x\":{\"value\":\"\xed\xa0\x80\"}"),
        ("a sequence cut short at the end of a string", b"\"x\":{\"value\":\"\xe2\x82\"}"),
        ("a code point above U+10FFFF", b"\"x\":{\"value\":\"\xf4\x90\x80\x80\"}"),
        ("0xff in a nested key", b"\"\xc3\x28\":{\"value\":1}"),
        ("Latin-1 text in a nested key", b"\"caf\xe9\":{\"value\":1}"),
    ] {
        let mut body = head.clone();
        body.extend_from_slice(bad);
        body.extend_from_slice(b"}}");
        c.push(case(format!("state with {what}"), "POST", "/state/good.tfstate", body, 400, "offset"));
    }
    for (field, body) in [
        ("ID", &b"{\"ID\":\"a\xffb\",\"Who\":\"me\"}"[..]),
        ("Who", b"{\"ID\":\"u8\",\"Who\":\"m\xe9\"}"),
        ("Info", b"{\"ID\":\"u8\",\"Info\":\"\xed\xa0\x80\"}"),
        ("a key", b"{\"ID\":\"u8\",\"\xff\":\"x\"}"),
    ] {
        c.push(case(format!("LockInfo with non-UTF-8 {field}"), "LOCK", "/state/new.tfstate", body, 400, "UTF-8"));
        c.push(case(
            format!("UNLOCK LockInfo with non-UTF-8 {field}"),
            "UNLOCK",
            "/state/held.tfstate",
            body,
            400,
            "UTF-8",
        ));
    }
    for (what, query) in [
        ("ID=%FF", "ID=%FF"),
        ("ID=%C3%28", "ID=a%C3%28b"),
        ("ID with an overlong encoding", "ID=%C0%AF"),
        ("ref=%FF", "ref=ma%FFin"),
        ("a parameter name %FF", "%FF=1"),
    ] {
        c.push(case(
            format!("query {what}"),
            "POST",
            format!("/state/held.tfstate?{query}"),
            valid.clone(),
            400,
            "UTF-8",
        ));
        c.push(case(
            format!("query {what} (DELETE)"),
            "DELETE",
            format!("/state/held.tfstate?{query}"),
            "",
            400,
            "UTF-8",
        ));
    }

    // LOCK bodies that are not a LockInfo.
    for (what, body) in [
        ("not JSON", "lock me"),
        ("empty", ""),
        ("JSON array", "[]"),
        ("no ID", r#"{"Who":"me","Operation":"OperationTypeApply"}"#),
        ("empty ID", r#"{"ID":""}"#),
        ("blank ID", r#"{"ID":"   "}"#),
        ("numeric ID", r#"{"ID":42}"#),
        ("control character in ID", r#"{"ID":"a\u0001b"}"#),
        ("newline in ID", r#"{"ID":"a\nb"}"#),
    ] {
        c.push(case(format!("LOCK body {what}"), "LOCK", "/state/new.tfstate", body, 400, ""));
        c.push(case(format!("POST /lock body {what}"), "POST", "/lock/new.tfstate", body, 400, ""));
    }
    c.push(case("UNLOCK body not a LockInfo", "UNLOCK", "/state/held.tfstate", "unlock me", 400, "LockInfo"));

    // Lock conflicts: 409 with the holder's LockInfo, as Terraform expects.
    c.push(case("UNLOCK with a foreign ID", "UNLOCK", "/state/held.tfstate", lock_info("B"), 409, "\"ID\":\"A\""));
    c.push(case("DELETE /lock with a foreign ID", "DELETE", "/lock/held.tfstate", lock_info("B"), 409, "\"ID\":\"A\""));
    c.push(case("LOCK of a held lock", "LOCK", "/state/held.tfstate", lock_info("B"), 423, "\"ID\":\"A\""));
    c.push(case(
        "write under a foreign ID",
        "POST",
        "/state/held.tfstate?ID=B",
        state(1, "bad input"),
        423,
        "\"ID\":\"A\"",
    ));
    c.push(case(
        "write without ID to a held state",
        "POST",
        "/state/held.tfstate",
        state(1, "bad input"),
        423,
        "\"ID\":\"A\"",
    ));
    c.push(case(
        "write under an ID that holds nothing",
        "POST",
        "/state/good.tfstate?ID=nobody",
        state(8, "bad input"),
        409,
        "nobody",
    ));

    // Methods.
    for (method, uri) in [
        ("PATCH", "/state/good.tfstate"),
        ("PROPFIND", "/state/good.tfstate"),
        ("OPTIONS", "/state/good.tfstate"),
        ("TRACE", "/lock/good.tfstate"),
        ("BREW", "/lock/good.tfstate"),
    ] {
        c.push(case(format!("unknown method {method} on {uri}"), method, uri, "", 405, "method"));
    }

    // Bodies above the limit.
    let big = format!("{{\"serial\": 9, \"lineage\": \"bad-input\", \"pad\": \"{}\"}}", "x".repeat(LIMIT));
    c.push(case("state above the body limit", "POST", "/state/good.tfstate", big.clone(), 413, "limit"));
    c.push(case("LOCK above the body limit", "LOCK", "/state/new.tfstate", big, 413, "limit"));

    // Found by the `lockinfo` fuzz target: serde reads a struct from a JSON array too, so
    // `["G"]` would take a lock whose stored LockInfo has no ID (nobody can release it but a
    // force-unlock), and `["A"]` would release A's lock. Last, so that a failure here does
    // not disturb the cases above.
    c.push(case("LOCK body a JSON array holding an ID", "LOCK", "/state/new.tfstate", r#"["G"]"#, 400, "LockInfo"));
    c.push(case(
        "POST /lock body a JSON array holding an ID",
        "POST",
        "/lock/new2.tfstate",
        r#"["G"]"#,
        400,
        "LockInfo",
    ));
    c.push(case(
        "UNLOCK body a JSON array holding the holder's ID",
        "UNLOCK",
        "/state/held.tfstate",
        r#"["A"]"#,
        400,
        "LockInfo",
    ));
    c
}

/// Every ref of the server repository with its id: a commit anywhere changes this.
fn refs(repo: &Path) -> String {
    git_out(repo, &["for-each-ref", "--format=%(refname) %(objectname)"])
}

async fn run_table(app: &Arc<App>, server_repo: &Path, store: &str) {
    // Something to protect: a state, and a lock held by A.
    let r = app.handle(post("/state/good.tfstate", &state(7, "bad input"))).await;
    assert_eq!(r.status(), 200);
    let r = app.handle(req("LOCK", "/state/held.tfstate", &[], lock_info("A").into_bytes())).await;
    assert_eq!(r.status(), 200);
    let mut before = refs(server_repo);
    assert!(before.contains("refs/heads/main") && before.contains("refs/heads/locks/held.tfstate"), "{before}");

    let mut failures = Vec::new();
    let cases = cases();
    for c in &cases {
        let headers: Vec<(&str, &str)> = c.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = app.handle(req(c.method, &c.uri, &headers, c.body.clone())).await;
        let status = r.status().as_u16();
        let body = String::from_utf8_lossy(r.body()).into_owned();
        println!(
            "[{store}] {:<48} {status} {}",
            c.name,
            body.split_whitespace().collect::<Vec<_>>().join(" ").chars().take(110).collect::<String>()
        );
        let mut wrong = Vec::new();
        if status != c.status {
            wrong.push(format!("status {status}, expected {}", c.status));
        }
        if body.trim().is_empty() {
            wrong.push("no message in the body".into());
        }
        if !body.to_lowercase().contains(&c.says.to_lowercase()) {
            wrong.push(format!("the message does not say {:?}", c.says));
        }
        if status == 405 {
            match r.headers().get("allow").and_then(|v| v.to_str().ok()) {
                Some(allow) if allow.contains("GET") && allow.contains("LOCK") => {}
                other => wrong.push(format!("405 without a proper Allow header: {other:?}")),
            }
        }
        if status == 400 && body.len() > 400 {
            wrong.push(format!("a 400 message of {} bytes is not short", body.len()));
        }
        let after = refs(server_repo);
        if after != before {
            wrong.push(format!("something was stored:\nbefore:\n{before}\nafter:\n{after}"));
            // Judge the next cases on their own.
            before = after;
        }
        if !wrong.is_empty() {
            failures.push(format!(
                "[{store}] {} ({} {:?}) -> {status} {:?}: {}",
                c.name,
                c.method,
                c.uri,
                body.trim(),
                wrong.join("; ")
            ));
        }
    }
    println!("[{store}] {} bad requests, {} answered as expected", cases.len(), cases.len() - failures.len());
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n\n"));
    // The good state and the lock are still there and usable.
    let r = app.handle(req("GET", "/state/good.tfstate", &[], Vec::new())).await;
    assert_eq!((r.status().as_u16(), r.body().as_ref()), (200, state(7, "bad input").as_bytes()));
    let r = app.handle(req("UNLOCK", "/state/held.tfstate", &[], lock_info("A").into_bytes())).await;
    assert_eq!(r.status(), 200);
}

fn req(method: &str, uri: &str, headers: &[(&str, &str)], body: Vec<u8>) -> http::Request<Bytes> {
    let mut b = http::Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Bytes::from(body)).unwrap_or_else(|e| panic!("{method} {uri}: {e}"))
}

fn post(uri: &str, body: &str) -> http::Request<Bytes> {
    req("POST", uri, &[("Content-MD5", &content_md5(body.as_bytes()))], body.as_bytes().to_vec())
}

fn config(cache: PathBuf) -> Config {
    Config { max_body_bytes: LIMIT, cache_dir: cache, ..Config::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_on_the_embedded_store() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = config(tmp.path().join("cache"));
    c.data_dir = tmp.path().join("data");
    let app = Arc::new(App::open(c).unwrap());
    run_table(&app, &tmp.path().join("data/repo.git"), "embedded").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_on_a_git_daemon() {
    let daemon = GitDaemon::start();
    let url = daemon.create_repo("bad.git");
    let tmp = tempfile::tempdir().unwrap();
    let mut c = config(tmp.path().join("cache"));
    c.repository = Some(gitstate::storage::RepoUrl::parse(&url).unwrap());
    let app = Arc::new(App::open(c).unwrap());
    run_table(&app, &daemon.repo_dir("bad.git"), "git daemon").await;
}

/// One raw HTTP/1.1 exchange: `head` (request line and headers, without the blank line),
/// then `body` as given (already chunk-encoded when the head says so). Returns the status,
/// the head of the answer and its body. Raw TCP, so that nothing normalises the path.
fn raw(serve: &Serve, head: &str, body: &[u8]) -> (u16, String, String) {
    let mut s = TcpStream::connect(serve.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut request = format!("{head}\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").into_bytes();
    request.extend_from_slice(body);
    // The server may answer (413) and close before reading everything: a failed write is fine,
    // the answer is what counts.
    let _ = s.write_all(&request);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

fn chunked(body: &[u8], chunk: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for piece in body.chunks(chunk) {
        out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// Through `gitstate serve` (hyper): the body limit holds for chunked bodies that announce no
/// length, unknown methods get 405 with Allow, traversal in the raw request line gets 400.
#[test]
fn bad_requests_through_gitstate_serve() {
    let serve = Serve::start(ServeOpts::new().env("GITSTATE_MAX_BODY_BYTES", LIMIT.to_string()));
    let good = state(3, "bad input");
    let r = http(
        "POST",
        &serve.state_url("good.tfstate"),
        &[("Content-MD5", &content_md5(good.as_bytes()))],
        Some(good.as_bytes()),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let before = serve.git_ok(&["for-each-ref", "--format=%(refname) %(objectname)"]);

    let big = format!("{{\"serial\": 9, \"lineage\": \"x\", \"pad\": \"{}\"}}", "x".repeat(4 * LIMIT));
    let huge = format!("{{\"serial\": 9, \"lineage\": \"x\", \"pad\": \"{}\"}}", "x".repeat(256 * LIMIT));
    let traversal_body = state(9, "bad input");
    let cases: Vec<(&str, String, Vec<u8>, u16, &str)> = vec![
        (
            "chunked body above the limit",
            "POST /state/good.tfstate HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json".into(),
            chunked(big.as_bytes(), 512),
            413,
            "limit",
        ),
        (
            "chunked body far above the limit",
            "POST /state/good.tfstate HTTP/1.1\r\nTransfer-Encoding: chunked".into(),
            chunked(huge.as_bytes(), 8192),
            413,
            "limit",
        ),
        (
            "Content-Length body above the limit",
            format!("POST /state/good.tfstate HTTP/1.1\r\nContent-Length: {}", big.len()),
            big.clone().into_bytes(),
            413,
            "limit",
        ),
        (
            "chunked LOCK above the limit",
            "LOCK /state/good.tfstate HTTP/1.1\r\nTransfer-Encoding: chunked".into(),
            chunked(big.as_bytes(), 100),
            413,
            "limit",
        ),
        (
            "unknown method PATCH",
            "PATCH /state/good.tfstate HTTP/1.1\r\nContent-Length: 0".into(),
            Vec::new(),
            405,
            "method",
        ),
        (
            "unknown method BREW",
            "BREW /lock/good.tfstate HTTP/1.1\r\nContent-Length: 0".into(),
            Vec::new(),
            405,
            "method",
        ),
        (
            "traversal in the request line",
            format!("POST /state/../etc/passwd HTTP/1.1\r\nContent-Length: {}", traversal_body.len()),
            traversal_body.clone().into_bytes(),
            400,
            "path",
        ),
        (
            "encoded traversal",
            format!("POST /state/%2e%2e/%2e%2e/x HTTP/1.1\r\nContent-Length: {}", traversal_body.len()),
            traversal_body.clone().into_bytes(),
            400,
            "path",
        ),
        (".git in the request line", "GET /state/.git/config HTTP/1.1".into(), Vec::new(), 400, "path"),
        (
            "ref-invalid character",
            format!("LOCK /state/a~b HTTP/1.1\r\nContent-Length: {}", lock_info("T").len()),
            lock_info("T").into_bytes(),
            400,
            "path",
        ),
        (
            "chunked LOCK body that is not a LockInfo",
            "LOCK /state/good.tfstate HTTP/1.1\r\nTransfer-Encoding: chunked".into(),
            chunked(b"not a lock", 4),
            400,
            "LockInfo",
        ),
    ];
    let mut failures = Vec::new();
    for (name, head, body, want, says) in &cases {
        let (status, head_out, text) = raw(&serve, head, body);
        println!("[gitstate serve] {name}: {status} {}", text.trim());
        let mut wrong = Vec::new();
        if status != *want {
            wrong.push(format!("status {status}, expected {want}"));
        }
        if !text.to_lowercase().contains(&says.to_lowercase()) || text.trim().is_empty() {
            wrong.push(format!("the message does not say {says:?}"));
        }
        if *want == 405 && !head_out.to_lowercase().contains("\r\nallow: ") {
            wrong.push("405 without Allow".into());
        }
        if serve.git_ok(&["for-each-ref", "--format=%(refname) %(objectname)"]) != before {
            wrong.push("something was stored".into());
        }
        if !wrong.is_empty() {
            failures.push(format!("{name}: {}\n{head_out}\n{text}", wrong.join("; ")));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Still serving, state intact.
    let r = http("GET", &serve.state_url("good.tfstate"), &[], None);
    assert_eq!((r.status, r.text()), (200, good));
}
