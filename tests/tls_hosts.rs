//! Git hosts over HTTPS (lighttpd with `mod_openssl`, Debian `lighttpd-mod-openssl`, and
//! certificates made here with the `openssl` CLI): a host whose certificate chains to a CA
//! given in `SSL_CERT_FILE` is used like any other; a certificate that fails verification
//! (untrusted issuer, expired, issued for another name) is a 502 that says so, with no
//! `Retry-After` (retrying does not heal it), and the cause with the host in the log line.

use std::path::{Path, PathBuf};

use gitstate_testkit::fixtures::{lock_info, state};
use gitstate_testkit::httpd::{GitHttpServer, DEFAULT_PASSWORD, DEFAULT_USER};
use gitstate_testkit::serve::{http, HttpResponse, Serve, ServeOpts};
use gitstate_testkit::stall::StallProxy;
use gitstate_testkit::tls::{server_cert, test_ca};

const P: &str = "envs/tls/terraform.tfstate";

fn ca(dir: &Path, name: &str) -> PathBuf {
    test_ca(dir, name)
}

fn leaf(dir: &Path, ca: &str, name: &str, san: &str, expired: bool) -> PathBuf {
    server_cert(dir, ca, name, san, expired)
}

/// lighttpd serving `git http-backend` over HTTPS with `pem`, and its repository's URL.
fn https_host(pem: &Path) -> (GitHttpServer, String) {
    let httpd = GitHttpServer::start_tls(pem);
    httpd.create_repo("states.git");
    let url = httpd.https_url("states.git");
    (httpd, url)
}

fn auth() -> String {
    use base64::Engine as _;
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{DEFAULT_USER}:{DEFAULT_PASSWORD}")))
}

fn call(serve: &Serve, method: &str, body: Option<&[u8]>) -> HttpResponse {
    let auth = auth();
    http(method, &serve.state_url(P), &[("Authorization", auth.as_str())], body)
}

#[test]
fn a_host_whose_certificate_chains_to_ssl_cert_file_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let ca_pem = ca(dir.path(), "ca");
    let (_httpd, url) = https_host(&leaf(dir.path(), "ca", "good", "IP:127.0.0.1", false));
    let serve = Serve::start(ServeOpts::new().repository(&url).env("SSL_CERT_FILE", ca_pem.display().to_string()));
    assert_eq!(call(&serve, "LOCK", Some(lock_info("tls").as_bytes())).status, 200);
    let auth = auth();
    let url = format!("{}?ID=tls", serve.state_url(P));
    let wrote = http("POST", &url, &[("Authorization", auth.as_str())], Some(state(1, "over tls").as_bytes()));
    assert_eq!(wrote.status, 200, "{}", wrote.text());
    assert_eq!(call(&serve, "UNLOCK", Some(lock_info("tls").as_bytes())).status, 200);
    let got = call(&serve, "GET", None);
    assert_eq!((got.status, got.text()), (200, state(1, "over tls")));
}

#[test]
fn a_refused_certificate_is_a_502_that_says_so_never_a_retry() {
    let dir = tempfile::tempdir().unwrap();
    let ca_pem = ca(dir.path(), "ca");
    ca(dir.path(), "other-ca");
    for (what, pem, cause) in [
        ("an untrusted issuer", leaf(dir.path(), "other-ca", "stranger", "IP:127.0.0.1", false), "UnknownIssuer"),
        ("an expired certificate", leaf(dir.path(), "ca", "expired", "IP:127.0.0.1", true), "Expired"),
        (
            "a certificate for another name",
            leaf(dir.path(), "ca", "elsewhere", "DNS:elsewhere.invalid", false),
            "NotValidForName",
        ),
    ] {
        let (_httpd, url) = https_host(&pem);
        let serve = Serve::start(ServeOpts::new().repository(&url).env("SSL_CERT_FILE", ca_pem.display().to_string()));
        for (method, body) in [("GET", None), ("LOCK", Some(lock_info("tls"))), ("POST", Some(state(1, "x")))] {
            let got = call(&serve, method, body.as_deref().map(str::as_bytes));
            assert_eq!(got.status, 502, "{what}, {method}: {} {}", got.status, got.text());
            assert!(got.header("retry-after").is_none(), "{what}, {method}: a Retry-After on a refused certificate");
            assert!(got.text().contains("certificate"), "{what}, {method}: {}", got.text());
        }
        let log = serve.stderr_log();
        let line = log
            .lines()
            .find(|l| l.contains("certificate was refused"))
            .unwrap_or_else(|| panic!("{what}: no log line names the refused certificate:\n{log}"));
        assert!(line.contains("127.0.0.1") && line.contains(cause), "{what}: {line}");
    }
}

/// A warm instance keeps its TLS connections: a warm apply (LOCK, GET, POST, UNLOCK, each
/// push an advertisement and a POST) opens no new connection to the host.
#[test]
fn a_warm_apply_makes_no_new_tls_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let ca_pem = ca(dir.path(), "ca");
    let (httpd, _) = https_host(&leaf(dir.path(), "ca", "good", "IP:127.0.0.1", false));
    // A forwarding proxy that counts the connections it accepts: each a TLS handshake.
    let proxy = StallProxy::start(([127, 0, 0, 1], httpd.port()).into());
    let url = format!("https://127.0.0.1:{}/git/states.git", proxy.port());
    let serve = Serve::start(ServeOpts::new().repository(&url).env("SSL_CERT_FILE", ca_pem.display().to_string()));
    let apply = |serial: u64| {
        let auth = auth();
        let h = [("Authorization", auth.as_str())];
        let url = serve.state_url(P);
        assert_eq!(http("LOCK", &url, &h, Some(lock_info("warm").as_bytes())).status, 200);
        assert_eq!(http("GET", &url, &h, None).status, if serial == 1 { 204 } else { 200 });
        let wrote = http("POST", &format!("{url}?ID=warm"), &h, Some(state(serial, "warm").as_bytes()));
        assert_eq!(wrote.status, 200, "{}", wrote.text());
        assert_eq!(http("UNLOCK", &url, &h, Some(lock_info("warm").as_bytes())).status, 200);
    };
    apply(1);
    let cold = proxy.connections();
    let before = httpd.access_log_by_signal().len();
    apply(2);
    let warm = proxy.connections() - cold;
    println!("TLS handshakes: cold apply {cold}, warm apply {warm}");
    assert_eq!(warm, 0, "a warm apply opened {warm} new TLS connections");
    // The same requests as over plain HTTP: LOCK 2, GET 1, POST 2, UNLOCK 2.
    let requests = httpd.access_log_by_signal()[before..].to_vec();
    let lines: Vec<String> = requests.iter().map(|r| format!("{} {} {}", r.method, r.target, r.status)).collect();
    println!("warm apply over HTTPS: {} requests\n{}", lines.len(), lines.join("\n"));
    assert_eq!(requests.len(), 7, "{lines:#?}");
    assert_eq!(requests.iter().filter(|r| r.target.contains("info/refs")).count(), 3, "{lines:#?}");
}

/// The smart-HTTP classes over HTTPS: credentials passed through (a wrong password is the
/// host's 401), racing locks from two instances (one winner each time), writes and history.
#[test]
fn credentials_races_and_history_over_https() {
    let dir = tempfile::tempdir().unwrap();
    let ca_pem = ca(dir.path(), "ca");
    let (_httpd, url) = https_host(&leaf(dir.path(), "ca", "good", "IP:127.0.0.1", false));
    let opts = || ServeOpts::new().repository(&url).env("SSL_CERT_FILE", ca_pem.display().to_string());
    let (a, b) = (Serve::start(opts()), Serve::start(opts()));
    let auth = auth();
    let h = [("Authorization", auth.as_str())];
    use base64::Engine as _;
    let wrong = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{DEFAULT_USER}:nope")));
    assert_eq!(http("GET", &a.state_url(P), &[("Authorization", wrong.as_str())], None).status, 401);

    for round in 0..10 {
        let (ua, ub) = (a.lock_url(P), b.lock_url(P));
        let (ha, hb) = (auth.clone(), auth.clone());
        let ta = std::thread::spawn(move || {
            http("LOCK", &ua, &[("Authorization", ha.as_str())], Some(lock_info(&format!("a{round}")).as_bytes()))
                .status
        });
        let tb = std::thread::spawn(move || {
            http("LOCK", &ub, &[("Authorization", hb.as_str())], Some(lock_info(&format!("b{round}")).as_bytes()))
                .status
        });
        let (sa, sb) = (ta.join().unwrap(), tb.join().unwrap());
        assert_eq!([sa, sb].iter().filter(|s| **s == 200).count(), 1, "round {round}: {sa} {sb}");
        assert_eq!(http("UNLOCK", &a.lock_url(P), &h, Some(b"")).status, 200);
    }
    for serial in 1..=3 {
        let wrote = http("POST", &a.state_url(P), &h, Some(state(serial, &format!("v{serial}")).as_bytes()));
        assert_eq!(wrote.status, 200, "{}", wrote.text());
    }
    let history = http("GET", &format!("{}/history/{P}", b.base_url()), &h, None);
    assert_eq!(history.status, 200, "{}", history.text());
    let versions = history.json()["versions"].as_array().unwrap().len();
    assert_eq!(versions, 3, "{}", history.text());
    assert_eq!(http("GET", &b.state_url(P), &h, None).text(), state(3, "v3"));
}
