//! A real smart-HTTP git server on 127.0.0.1: `git http-backend` as a CGI
//! program behind lighttpd (Debian package `lighttpd`, installed by
//! `scripts/test.sh`), with HTTP basic auth required for everything under
//! `/git/` (fetch and push alike), the `Git-Protocol` header passed through
//! as `GIT_PROTOCOL` (so protocol v2 works) and an access log that counts
//! the requests made to the git host (DESIGN.md §7).
//!
//! Why lighttpd: one Debian package, one config file, runs in the
//! foreground as any user, and serves CGI itself (nginx would need
//! fcgiwrap as a second daemon).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::gitd::{free_port, git, git_exec_path, wait_until_listening};

/// How long to wait for lighttpd to flush its (buffered) access log.
const LOG_FLUSH_TIMEOUT: Duration = Duration::from_secs(15);

/// The user [`GitHttpServer::start`] accepts.
pub const DEFAULT_USER: &str = "git-user";
/// The password of [`DEFAULT_USER`].
pub const DEFAULT_PASSWORD: &str = "git-pass";

const NOT_FOUND: &str = "lighttpd not found (on PATH or in /usr/sbin): the smart-HTTP git server of the tests needs it; install the test tools with `bash scripts/test.sh`";

/// The lighttpd binary: `$GITSTATE_LIGHTTPD`, else `lighttpd` on `PATH`,
/// else `/usr/sbin/lighttpd` (Debian's place, often not on a user's `PATH`).
pub fn lighttpd_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("GITSTATE_LIGHTTPD") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "GITSTATE_LIGHTTPD={} is not a file. {NOT_FOUND}", p.display());
        return p;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join("lighttpd"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{NOT_FOUND}"))
}

/// `$(git --exec-path)/git-http-backend`.
fn git_http_backend() -> PathBuf {
    let p = git_exec_path().join("git-http-backend");
    assert!(p.is_file(), "{} is missing", p.display());
    p
}

/// One line of the access log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessEntry {
    /// `GET`, `POST`, ...
    pub method: String,
    /// Path and query, e.g. `/git/states.git/info/refs?service=git-upload-pack`.
    pub target: String,
    pub status: u16,
    /// The authenticated user, or `None` for `-` (no or refused credentials).
    pub user: Option<String>,
    pub user_agent: String,
    /// The request's `Git-Protocol` header (`version=2` for protocol v2), if any.
    pub git_protocol: Option<String>,
    /// The whole line.
    pub line: String,
}

impl AccessEntry {
    /// Parse the format of [`ACCESS_LOG_FORMAT`] (lighttpd's default plus the
    /// `Git-Protocol` header): `host vhost user [date] "METHOD target HTTP/1.1"
    /// status bytes "referer" "agent" "git-protocol"`.
    pub fn parse(line: &str) -> Option<AccessEntry> {
        let mut head = line.split_whitespace();
        let _host = head.next()?;
        let _vhost = head.next()?;
        let user = head.next()?;
        let (_, rest) = line.split_once("] \"")?;
        let (request, rest) = rest.split_once('"')?;
        let mut req = request.split(' ');
        let method = req.next()?.to_string();
        let target = req.next()?.to_string();
        let mut tail = rest.split_whitespace();
        let status = tail.next()?.parse().ok()?;
        // ` 200 131 "referer" "agent" "git-protocol"`
        let quoted: Vec<&str> = rest.split('"').collect();
        let user_agent = quoted.get(3).copied().unwrap_or("").to_string();
        let git_protocol = quoted.get(5).copied().filter(|v| !v.is_empty() && *v != "-").map(str::to_string);
        Some(AccessEntry {
            method,
            target,
            status,
            user: (user != "-").then(|| user.to_string()),
            user_agent,
            git_protocol,
            line: line.to_string(),
        })
    }
}

/// A running lighttpd serving `git http-backend` under `/git/`; killed (and
/// its directory removed) on drop.
pub struct GitHttpServer {
    child: Child,
    port: u16,
    dir: TempDir,
    markers: AtomicU32,
}

impl GitHttpServer {
    /// Start a server accepting [`DEFAULT_USER`] / [`DEFAULT_PASSWORD`].
    pub fn start() -> Self {
        Self::start_with_users(&[(DEFAULT_USER, DEFAULT_PASSWORD)])
    }

    /// Start a server accepting exactly these `(user, password)` pairs.
    pub fn start_with_users(users: &[(&str, &str)]) -> Self {
        Self::start_with(users, "")
    }

    /// Start a server ([`DEFAULT_USER`]) whose lighttpd configuration ends with `extra`: e.g.
    /// a condition that hands the receive-pack POSTs other git settings than the
    /// advertisements (two differently configured servers behind one name, as after a
    /// failover), or a shorter keep-alive idle time.
    pub fn start_with_config(extra: &str) -> Self {
        Self::start_with(&[(DEFAULT_USER, DEFAULT_PASSWORD)], extra)
    }

    /// Start a server ([`DEFAULT_USER`]) over HTTPS with `pemfile` (certificate and key, see
    /// [`super::tls::server_cert`]); its repositories' URLs come from [`GitHttpServer::https_url`].
    /// The access log is only written on the plain port, so it is not for HTTPS servers.
    pub fn start_tls(pemfile: &Path) -> Self {
        let conf = format!(
            "server.modules += ( \"mod_openssl\" )\nssl.engine = \"enable\"\nssl.pemfile = \"{}\"\n",
            pemfile.display()
        );
        Self::start_with(&[(DEFAULT_USER, DEFAULT_PASSWORD)], &conf)
    }

    /// `https://127.0.0.1:PORT/git/<name>` (for a server of [`GitHttpServer::start_tls`]).
    pub fn https_url(&self, name: &str) -> String {
        format!("https://127.0.0.1:{}/git/{name}", self.port)
    }

    fn start_with(users: &[(&str, &str)], extra: &str) -> Self {
        let bin = lighttpd_bin();
        let backend = git_http_backend();
        let dir = tempfile::Builder::new()
            .prefix("gitstate-httpd-")
            .tempdir()
            .expect("create a temporary directory for lighttpd");
        let root = dir.path();
        std::fs::create_dir_all(root.join("repos")).unwrap();
        std::fs::create_dir_all(root.join("htdocs")).unwrap();
        let mut userfile = String::new();
        for (u, p) in users {
            assert!(!u.contains(':') && !u.contains('\n') && !p.contains('\n'));
            userfile.push_str(&format!("{u}:{p}\n"));
        }
        std::fs::write(root.join("users"), userfile).unwrap();

        for _ in 0..5 {
            let port = free_port();
            let conf = config(root, port, &backend, extra);
            std::fs::write(root.join("lighttpd.conf"), conf).unwrap();
            let _ = std::fs::remove_file(root.join("error.log"));
            let stderr = std::fs::File::create(root.join("lighttpd.out")).unwrap();
            let mut child = Command::new(&bin)
                .arg("-D")
                .arg("-f")
                .arg(root.join("lighttpd.conf"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}. {NOT_FOUND}", bin.display()));
            if wait_until_listening(&mut child, port) {
                return GitHttpServer { child, port, dir, markers: AtomicU32::new(0) };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "lighttpd did not start:\n{}\n{}",
            std::fs::read_to_string(root.join("lighttpd.out")).unwrap_or_default(),
            std::fs::read_to_string(root.join("error.log")).unwrap_or_default()
        );
    }

    /// Create the bare repository `name` (e.g. `states.git`, branch `main`,
    /// pushes accepted) and return its URL, without credentials.
    pub fn create_repo(&self, name: &str) -> String {
        let path = self.repo_dir(name);
        git(self.dir.path(), &["init", "--bare", "-q", "-b", "main", &path.display().to_string()]);
        for (k, v) in [("http.receivepack", "true"), ("receive.fsckObjects", "true")] {
            git(&path, &["config", k, v]);
        }
        self.url(name)
    }

    /// `http://127.0.0.1:PORT/git/<name>`.
    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/git/{name}", self.port)
    }

    /// `http://user:password@127.0.0.1:PORT/git/<name>` (for the git CLI in tests).
    pub fn url_with_credentials(&self, name: &str, user: &str, password: &str) -> String {
        format!("http://{user}:{password}@127.0.0.1:{}/git/{name}", self.port)
    }

    /// The directory of repository `name` on the server side.
    pub fn repo_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join("repos").join(name)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn base_dir(&self) -> &Path {
        self.dir.path()
    }

    /// lighttpd's error log (CGI stderr included), for failure messages.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    /// Every request served so far, oldest first, as raw access-log lines.
    ///
    /// lighttpd buffers its access log; to read it complete, this sends a
    /// marker request (`GET /.flush-marker-N`, outside `/git/`) and waits until
    /// the marker's line is written: every earlier request is then in the file.
    /// Marker lines are left out.
    pub fn access_log_lines(&self) -> Vec<String> {
        let n = self.markers.fetch_add(1, Ordering::SeqCst);
        let marker = format!("/.flush-marker-{n} ");
        self.send_marker(n);
        let path = self.dir.path().join("access.log");
        let deadline = Instant::now() + LOG_FLUSH_TIMEOUT;
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.contains(&marker) {
                return text.lines().filter(|l| !l.contains("/.flush-marker-")).map(str::to_string).collect();
            }
            assert!(
                Instant::now() < deadline,
                "lighttpd did not write the marker request to {} within {LOG_FLUSH_TIMEOUT:?}:\n{text}",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every request served so far, parsed, for a server whose port speaks TLS (the flush
    /// marker of [`GitHttpServer::access_log_lines`] is plain HTTP): SIGHUP makes lighttpd
    /// reopen, and so write out, its buffered access log.
    pub fn access_log_by_signal(&self) -> Vec<AccessEntry> {
        let path = self.dir.path().join("access.log");
        let _ = Command::new("kill").args(["-HUP", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + LOG_FLUSH_TIMEOUT;
        let mut last = std::fs::read_to_string(&path).unwrap_or_default();
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let now = std::fs::read_to_string(&path).unwrap_or_default();
            if (now == last && !now.is_empty()) || Instant::now() > deadline {
                break;
            }
            last = now;
        }
        last.lines()
            .filter(|l| !l.contains("/.flush-marker-"))
            .map(|l| AccessEntry::parse(l).unwrap_or_else(|| panic!("unparsable access log line {l:?}")))
            .collect()
    }

    /// [`GitHttpServer::access_log_lines`], parsed.
    pub fn access_log(&self) -> Vec<AccessEntry> {
        self.access_log_lines()
            .iter()
            .map(|l| AccessEntry::parse(l).unwrap_or_else(|| panic!("unparsable access log line {l:?}")))
            .collect()
    }

    fn send_marker(&self, n: u32) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to lighttpd");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET /.flush-marker-{n} HTTP/1.0\r\nHost: 127.0.0.1\r\nUser-Agent: test-marker\r\n\r\n").unwrap();
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
}

impl Drop for GitHttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- lighttpd on 127.0.0.1:{} error log ---\n{}\n--- access log ---\n{}",
                self.port,
                self.error_log(),
                std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
            );
        }
    }
}

/// lighttpd's default access-log format plus the `Git-Protocol` request header.
pub const ACCESS_LOG_FORMAT: &str =
    r#"%h %V %u %t \"%r\" %>s %b \"%{Referer}i\" \"%{User-Agent}i\" \"%{Git-Protocol}i\""#;

fn config(root: &Path, port: u16, backend: &Path, extra: &str) -> String {
    let q = |p: &Path| {
        let s = p.display().to_string();
        assert!(!s.contains('"'), "path with a quote: {s}");
        s
    };
    format!(
        r#"# gitstate tests: git http-backend behind lighttpd (DESIGN.md section 7)
server.document-root = "{htdocs}"
server.bind = "127.0.0.1"
server.port = {port}
server.errorlog = "{root}/error.log"
server.modules = ( "mod_alias", "mod_setenv", "mod_auth", "mod_authn_file", "mod_cgi", "mod_accesslog" )
accesslog.filename = "{root}/access.log"
accesslog.format = "{ACCESS_LOG_FORMAT}"
auth.backend = "plain"
auth.backend.plain.userfile = "{root}/users"

$HTTP["url"] =~ "^/git/" {{
  alias.url = ( "/git/" => "{backend}/" )
  cgi.assign = ( "" => "" )
  setenv.add-environment = (
    "GIT_PROJECT_ROOT" => "{root}/repos",
    "GIT_HTTP_EXPORT_ALL" => "1",
    "GIT_CONFIG_NOSYSTEM" => "1",
    "HOME" => "{root}"
  )
  # Both fetch and push need credentials; git http-backend enables
  # receive-pack for authenticated users (REMOTE_USER, set by mod_auth).
  auth.require = ( "" => ( "method" => "basic", "realm" => "git", "require" => "valid-user" ) )
  # Protocol v2: pass the client's Git-Protocol header through.
  $REQUEST_HEADER["Git-Protocol"] =~ "version=2" {{
    setenv.set-environment = ( "GIT_PROTOCOL" => "version=2" )
  }}
}}
{extra}
"#,
        htdocs = q(&root.join("htdocs")),
        root = q(root),
        backend = q(backend),
    )
}
