//! Git hosts over HTTPS (lighttpd with `mod_openssl`, Debian `lighttpd-mod-openssl`, and
//! certificates made here with the `openssl` CLI): a host whose certificate chains to a CA
//! given in `SSL_CERT_FILE` is used like any other; a certificate that fails verification
//! (untrusted issuer, expired, issued for another name) is a 502 that says so, with no
//! `Retry-After` (retrying does not heal it), and the cause with the host in the log line.

use std::path::{Path, PathBuf};
use std::process::Command;

use gitstate_testkit::fixtures::{lock_info, state};
use gitstate_testkit::httpd::{GitHttpServer, DEFAULT_PASSWORD, DEFAULT_USER};
use gitstate_testkit::serve::{http, HttpResponse, Serve, ServeOpts};

const P: &str = "envs/tls/terraform.tfstate";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().unwrap_or_else(|e| {
        panic!("openssl not found ({e}): the TLS tests make certificates with it; install the test tools with `bash scripts/test.sh`")
    });
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A test CA in `dir` (`<name>.pem`, `<name>.key`).
fn ca(dir: &Path, name: &str) -> PathBuf {
    let (pem, key) = (format!("{name}.pem"), format!("{name}.key"));
    let subject = format!("/CN=gitstate test {name}");
    openssl(
        dir,
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &pem, "-days", "2", "-subj",
            &subject,
        ],
    );
    dir.join(pem)
}

/// A server certificate (and its key, in one PEM file for lighttpd) signed by CA `ca`, for
/// `san` (e.g. `IP:127.0.0.1`), valid now, or valid only in 2020.
fn leaf(dir: &Path, ca: &str, name: &str, san: &str, expired: bool) -> PathBuf {
    let (key, csr, crt) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"));
    openssl(
        dir,
        &["req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", "/CN=gitstate test host"],
    );
    std::fs::write(dir.join(format!("{name}.ext")), format!("subjectAltName={san}\n")).unwrap();
    if expired {
        // `openssl ca` can date a certificate in the past; it wants a small database.
        let db = dir.join(format!("{name}-db"));
        std::fs::create_dir_all(&db).unwrap();
        std::fs::write(db.join("index.txt"), "").unwrap();
        std::fs::write(db.join("serial"), "1000\n").unwrap();
        let conf = format!(
            "[ca]\ndefault_ca = test\n[test]\ndatabase = {db}/index.txt\nserial = {db}/serial\nnew_certs_dir = {db}\n\
             default_md = sha256\npolicy = any\ncopy_extensions = none\n[any]\ncommonName = supplied\n",
            db = db.display()
        );
        std::fs::write(dir.join(format!("{name}.cnf")), conf).unwrap();
        openssl(
            dir,
            &[
                "ca",
                "-batch",
                "-config",
                &format!("{name}.cnf"),
                "-cert",
                &format!("{ca}.pem"),
                "-keyfile",
                &format!("{ca}.key"),
                "-in",
                &csr,
                "-out",
                &crt,
                "-startdate",
                "20200101000000Z",
                "-enddate",
                "20200201000000Z",
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
    } else {
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &format!("{ca}.pem"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
    }
    let pem = dir.join(format!("{name}.pem"));
    let mut both = std::fs::read(dir.join(&crt)).unwrap();
    both.extend(std::fs::read(dir.join(&key)).unwrap());
    std::fs::write(&pem, both).unwrap();
    pem
}

/// lighttpd serving `git http-backend` over HTTPS with `pem`, and its repository's URL.
fn https_host(pem: &Path) -> (GitHttpServer, String) {
    let httpd = GitHttpServer::start_with_config(&format!(
        "server.modules += ( \"mod_openssl\" )\nssl.engine = \"enable\"\nssl.pemfile = \"{}\"\n",
        pem.display()
    ));
    let url = httpd.create_repo("states.git").replacen("http://", "https://", 1);
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

/// A TCP proxy that counts the connections it accepts (each a TLS handshake with the host)
/// and pipes bytes both ways.
struct CountingProxy {
    port: u16,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl CountingProxy {
    fn start(target: u16) -> Self {
        use std::io::{Read, Write};
        use std::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = std::sync::Arc::clone(&accepted);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { break };
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else { continue };
                let pipe = |mut from: TcpStream, mut to: TcpStream| {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                };
                pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                pipe(server, client);
            }
        });
        CountingProxy { port, accepted }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A warm instance keeps its TLS connections: a warm apply (LOCK, GET, POST, UNLOCK, each
/// push an advertisement and a POST) opens no new connection to the host.
#[test]
fn a_warm_apply_makes_no_new_tls_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let ca_pem = ca(dir.path(), "ca");
    let (httpd, _) = https_host(&leaf(dir.path(), "ca", "good", "IP:127.0.0.1", false));
    let proxy = CountingProxy::start(httpd.port());
    let url = format!("https://127.0.0.1:{}/git/states.git", proxy.port);
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
    let cold = proxy.accepted();
    apply(2);
    let warm = proxy.accepted() - cold;
    println!("TLS handshakes: cold apply {cold}, warm apply {warm}");
    assert_eq!(warm, 0, "a warm apply opened {warm} new TLS connections");
}
