//! `gitstate serve` as a child process, plus a small blocking HTTP client. The git CLI
//! helpers of [`super::gitd`] look at what the server stored.
//!
//! The server runs with a `PATH` from which every directory holding a `git`
//! executable has been removed: gitstate must never run git's own programs.
//! The tests themselves use the git CLI (normal `PATH`) to inspect results.

use std::ffi::OsString;
use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::gitd::{free_port, git_out, git_try};

/// How long the server may take to accept connections after it was spawned.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Options for [`Serve::start`].
#[derive(Clone, Debug, Default)]
pub struct ServeOpts {
    /// `--repository URL`: a remote (e.g. `git://127.0.0.1:N/x.git`) instead
    /// of the embedded repository under the data directory.
    pub repository: Option<String>,
    /// `--ref BRANCH` (the server's default is `main`).
    pub git_ref: Option<String>,
    /// Extra command line arguments after `serve`'s own.
    pub args: Vec<String>,
    /// Extra environment variables for the server.
    pub env: Vec<(String, String)>,
}

impl ServeOpts {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn repository(mut self, url: impl Into<String>) -> Self {
        self.repository = Some(url.into());
        self
    }
    pub fn git_ref(mut self, r: impl Into<String>) -> Self {
        self.git_ref = Some(r.into());
        self
    }
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }
    pub fn env(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
}

/// A running `gitstate serve`; killed on drop.
pub struct Serve {
    child: Option<Child>,
    addr: SocketAddr,
    /// Holds `--data-dir` (`data/`) and the server's logs (`stdout.log`, `stderr.log`).
    dir: TempDir,
}

impl Serve {
    /// Start `gitstate serve` on a free loopback port with a fresh data
    /// directory and wait until it accepts connections.
    pub fn start(opts: ServeOpts) -> Serve {
        // The free port is found by binding port 0 and letting it go; another
        // process could take it in between, so try a few times.
        let mut last_err = String::new();
        for _attempt in 0..3 {
            let dir = tempfile::Builder::new().prefix("gitstate-serve-").tempdir().expect("create temp dir");
            let data_dir = dir.path().join("data");
            std::fs::create_dir_all(&data_dir).unwrap();
            let port = free_port();
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let stdout = File::create(dir.path().join("stdout.log")).unwrap();
            let stderr = File::create(dir.path().join("stderr.log")).unwrap();

            let mut cmd = Command::new(server_bin());
            cmd.arg("serve").arg("--listen").arg(addr.to_string()).arg("--data-dir").arg(&data_dir);
            if let Some(r) = &opts.repository {
                cmd.arg("--repository").arg(r);
            }
            if let Some(r) = &opts.git_ref {
                cmd.arg("--ref").arg(r);
            }
            cmd.args(&opts.args);
            // Nothing from the test environment's configuration leaks in.
            for (k, _) in std::env::vars_os() {
                if let Some(k) = k.to_str() {
                    if k.starts_with("GITSTATE_") || k.starts_with("GIT_") {
                        cmd.env_remove(k);
                    }
                }
            }
            cmd.env("PATH", path_without_git())
                .env("HOME", dir.path())
                .env("RUST_LOG", std::env::var("GITSTATE_TEST_LOG").unwrap_or_else(|_| "info,gitstate=debug".into()))
                .env("GITSTATE_CACHE_DIR", dir.path().join("cache"))
                // Plain logs in stderr.log.
                .env("NO_COLOR", "1")
                .envs(opts.env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null())
                .stdout(stdout)
                .stderr(stderr);
            let child = cmd.spawn().expect("spawn gitstate serve");
            let mut serve = Serve { child: Some(child), addr, dir };

            match serve.wait_ready() {
                Ok(()) => return serve,
                Err(e) => {
                    if let Some(mut c) = serve.child.take() {
                        let _ = c.kill();
                        let _ = c.wait();
                    }
                    let logs = serve.stderr_log();
                    if !logs.to_ascii_lowercase().contains("in use") {
                        panic!("gitstate serve did not start: {e}\n--- server stderr ---\n{logs}");
                    }
                    last_err = format!("{e}\n--- server stderr ---\n{logs}");
                }
            }
        }
        panic!("gitstate serve did not start: {last_err}");
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return Err(format!("exited before accepting connections: {status}"));
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("not accepting connections on {} after {:?}", self.addr, START_TIMEOUT));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT/state/<path>`.
    pub fn state_url(&self, path: &str) -> String {
        format!("{}/state/{}", self.base_url(), path)
    }

    /// `http://127.0.0.1:PORT/lock/<path>`.
    pub fn lock_url(&self, path: &str) -> String {
        format!("{}/lock/{}", self.base_url(), path)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's `--data-dir`.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The embedded bare repository, `<data-dir>/repo.git`.
    pub fn repo_git_dir(&self) -> PathBuf {
        self.data_dir().join("repo.git")
    }

    /// What the server printed on stderr so far (its log).
    pub fn stderr_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// What the server printed on stdout so far.
    pub fn stdout_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout.log")).unwrap_or_default()
    }

    /// Panics (with the server's log) if the server process has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("gitstate serve exited: {status}\n--- server stderr ---\n{}", self.stderr_log());
        }
    }

    /// Run the git CLI on the embedded repository ([`git_try`] on `<data-dir>/repo.git`).
    pub fn git(&self, args: &[&str]) -> Output {
        git_try(&self.repo_git_dir(), args)
    }

    /// Like [`Serve::git`] but panics unless git succeeds; returns stdout, trimmed ([`git_out`]).
    #[track_caller]
    pub fn git_ok(&self, args: &[&str]) -> String {
        git_out(&self.repo_git_dir(), args)
    }

    /// Like [`Serve::git_ok`], stdout exactly as git wrote it (for blobs compared byte by byte).
    pub fn git_raw(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&crate::gitd::git(&self.repo_git_dir(), args).stdout).into_owned()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- gitstate serve on {} (data dir {}) stderr ---\n{}\n--- end of server stderr ---",
                self.addr,
                self.data_dir().display(),
                self.stderr_log()
            );
            if std::env::var_os("GITSTATE_TEST_KEEP").is_some() {
                // Keep the data directory for a post-mortem.
                let kept = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
                eprintln!("kept {}", kept.keep().display());
            }
        }
    }
}

/// The program under test: `$GITSTATE_TEST_BIN` if set (e.g. a release build), else the
/// `gitstate` binary cargo built next to the running test or example
/// (`CARGO_BIN_EXE_gitstate` when cargo sets it at run time, else found from the
/// running executable: `<target>/<profile>/{deps,examples}/<name>` ->
/// `<target>/<profile>/gitstate`).
pub fn server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("GITSTATE_TEST_BIN").or_else(|| std::env::var_os("CARGO_BIN_EXE_gitstate")) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("the path of the running test");
    let mut dir = exe.parent().expect("the directory of the running test").to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps" || n == "examples") {
        dir.pop();
    }
    let bin = dir.join("gitstate");
    assert!(
        bin.is_file(),
        "{} is missing: build it (`cargo build`; cargo builds it before integration tests) or set GITSTATE_TEST_BIN",
        bin.display()
    );
    bin
}

/// The current `PATH` less every directory that holds a `git` executable.
pub fn path_without_git() -> OsString {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = std::env::split_paths(&path).filter(|d| !is_executable_file(&d.join("git"))).collect();
    std::env::join_paths(dirs).expect("join PATH")
}

fn is_executable_file(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

// ---------------------------------------------------------------------------
// HTTP client
// ---------------------------------------------------------------------------

/// An HTTP answer, whatever its status.
#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics with the body if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): status {} body {:?}", self.status, self.text()))
    }
}

/// Send one request and return the answer, whatever its status.
/// Panics on a transport error (connection refused, timeout).
pub fn http(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> HttpResponse {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(60)).redirects(0).build();
    let mut req = agent.request(method, url);
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let result = match body {
        Some(b) => req.send_bytes(b),
        None => req.call(),
    };
    let resp = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    let status = resp.status();
    let headers =
        resp.headers_names().into_iter().filter_map(|n| resp.header(&n).map(|v| (n.clone(), v.to_string()))).collect();
    let mut body = Vec::new();
    std::io::Read::read_to_end(&mut resp.into_reader(), &mut body)
        .unwrap_or_else(|e| panic!("{method} {url}: reading body: {e}"));
    HttpResponse { status, headers, body }
}

/// `http` with a JSON body and `Content-Type: application/json`.
pub fn http_json(method: &str, url: &str, body: &serde_json::Value) -> HttpResponse {
    let bytes = serde_json::to_vec(body).unwrap();
    http(method, url, &[("Content-Type", "application/json")], Some(&bytes))
}

// ---------------------------------------------------------------------------
// Where the server keeps things (for tests that look at everything it wrote)
// ---------------------------------------------------------------------------

impl Serve {
    /// The server's own temporary directory: `data/` (`--data-dir`), `cache/`
    /// (`GITSTATE_CACHE_DIR`), `stdout.log`, `stderr.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `GITSTATE_CACHE_DIR` as the harness sets it (the bare caches of remotes), unless the
    /// test overrode it in [`ServeOpts::env`].
    pub fn cache_dir(&self) -> PathBuf {
        self.dir.path().join("cache")
    }
}

impl Serve {
    /// The id of the `gitstate serve` process while it runs (e.g. for `/proc/<pid>/status`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}
