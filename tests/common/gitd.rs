//! A real `git daemon` serving bare repositories of a temporary directory over
//! git:// (push enabled), plus git CLI helpers to set up and inspect them.
//! Only tests use the git CLI; gitstate itself never runs git.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `git daemon` on 127.0.0.1; killed (and its directory removed) on drop.
pub struct GitDaemon {
    child: Child,
    port: u16,
    dir: TempDir,
}

impl GitDaemon {
    /// Start a daemon exporting every repository under a fresh temporary directory.
    pub fn start() -> Self {
        Self::start_with_env(&[])
    }

    /// Like [`GitDaemon::start`], with extra environment variables for the daemon and
    /// the git programs it runs (e.g. `GIT_TRACE_PACKET` to record the conversation).
    pub fn start_with_env(env: &[(&str, &str)]) -> Self {
        require_git();
        let dir = tempfile::tempdir().expect("create a temporary directory for git daemon");
        // Another process may grab the port between our probe and the daemon's bind: retry.
        for _ in 0..5 {
            let port = free_port();
            let log = std::fs::File::create(dir.path().join("daemon.log")).expect("create daemon.log");
            // `git daemon` forks `git-daemon`; killing the wrapper would strand the real daemon,
            // so start `git-daemon` itself.
            let mut child = Command::new(daemon_program())
                .arg("--export-all")
                .arg("--enable=receive-pack")
                .arg("--informative-errors")
                .arg("--reuseaddr")
                .arg("--verbose")
                .arg("--listen=127.0.0.1")
                .arg(format!("--port={port}"))
                .arg(format!("--base-path={}", dir.path().display()))
                .arg(dir.path())
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn git daemon");
            if wait_until_listening(&mut child, port) {
                return GitDaemon { child, port, dir };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("git daemon did not start; see {}", dir.path().join("daemon.log").display());
    }

    /// Create the bare repository `name` (e.g. `states.git`) and return its git:// URL.
    pub fn create_repo(&self, name: &str) -> String {
        let path = self.repo_dir(name);
        git(self.dir.path(), &["init", "--bare", "-q", "-b", "main", &path.display().to_string()]);
        // Make the server check every object we push, as hosting services do.
        git_out(&path, &["config", "receive.fsckObjects", "true"]);
        self.url(name)
    }

    /// The git:// URL of repository `name`.
    pub fn url(&self, name: &str) -> String {
        format!("git://127.0.0.1:{}/{name}", self.port)
    }

    /// The directory of repository `name` on the server side.
    pub fn repo_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// What the daemon logged so far (its stderr), for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// The directory holding all served repositories (and `daemon.log`).
    pub fn base_dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `$(git --exec-path)/git-daemon`.
fn daemon_program() -> PathBuf {
    let out = Command::new("git").arg("--exec-path").output().expect("run git --exec-path");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("git-daemon")
}

/// Panic with the set-up command when the git CLI is missing.
pub fn require_git() {
    let found = Command::new("git")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "the tests need the git CLI (for `git daemon` and inspection); install the test tools with `bash scripts/test.sh`"
    );
}

/// Run `git -C repo args...`; panics unless it succeeds. Returns stdout, trimmed.
pub fn git_out(repo: &Path, args: &[&str]) -> String {
    let out = git(repo, args);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Run `git -C repo args...` and return its output; panics unless it succeeds.
pub fn git(repo: &Path, args: &[&str]) -> Output {
    let out = git_try(repo, args);
    assert!(
        out.status.success(),
        "git -C {} {} failed: {}{}",
        repo.display(),
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run `git -C repo args...` whatever its exit status (for expected failures).
pub fn git_try(repo: &Path, args: &[&str]) -> Output {
    require_git();
    Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        // Independent of the user's configuration.
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com")
        .output()
        .expect("run git")
}

/// The id `rev` resolves to in `repo`, or `None` when it does not exist.
pub fn rev_parse(repo: &Path, rev: &str) -> Option<String> {
    let out = git_try(repo, &["rev-parse", "--verify", "-q", rev]);
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A port on 127.0.0.1 that was free a moment ago (shared by every harness).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("find a free port").port()
}

/// Wait until `port` accepts connections; false if `child` exits or the start timeout passes.
pub fn wait_until_listening(child: &mut Child, port: u16) -> bool {
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
