//! A real `git daemon` serving bare repositories of a temporary directory over
//! git:// (push enabled), which can be stopped and restarted on the same port,
//! plus the git CLI helpers every harness, test and example uses to set up and
//! inspect repositories. Only tests use the git CLI; gitstate itself never runs git.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long [`GitDaemon::restart`] keeps trying to bind the old port again.
const RESTART_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `git daemon` on 127.0.0.1, in a process group of its own. [`GitDaemon::stop`]
/// kills the whole group (the daemon, its per-connection children, receive-pack and any
/// hook they run); [`GitDaemon::restart`] starts it again on the same port and directory.
/// Stopped (and its directory removed) on drop.
pub struct GitDaemon {
    child: Option<Child>,
    port: u16,
    env: Vec<(String, String)>,
    /// Extra `git-daemon` options (e.g. `--max-connections=0`).
    args: Vec<String>,
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
        Self::start_with(env, &[])
    }

    /// Like [`GitDaemon::start`], with extra `git-daemon` options: e.g. `--max-connections=0`
    /// for many concurrent clients (git-daemon's default is 32, and past it, it kills
    /// another connection from the same address: every test client is 127.0.0.1).
    pub fn start_with_args(args: &[&str]) -> Self {
        Self::start_with(&[], args)
    }

    fn start_with(env: &[(&str, &str)], args: &[&str]) -> Self {
        require_git();
        let dir = tempfile::Builder::new()
            .prefix("gitstate-gitd-")
            .tempdir()
            .expect("create a temporary directory for git daemon");
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let args = args.iter().map(|a| a.to_string()).collect();
        let mut daemon = GitDaemon { child: None, port: 0, env, args, dir };
        // Another process may grab the port between our probe and the daemon's bind: retry.
        for _ in 0..5 {
            daemon.port = free_port();
            if daemon.spawn() {
                return daemon;
            }
        }
        panic!("git daemon did not start; see {}:\n{}", daemon.log_path().display(), daemon.log());
    }

    /// Spawn `git-daemon` on `self.port`; true once it accepts connections.
    fn spawn(&mut self) -> bool {
        let mut log = OpenOptions::new().create(true).append(true).open(self.log_path()).expect("open daemon.log");
        let _ = writeln!(log, "--- gitstate testkit: starting git-daemon on 127.0.0.1:{} ---", self.port);
        // `git daemon` forks `git-daemon`; killing the wrapper would strand the real daemon,
        // so start `git-daemon` itself.
        let mut child = Command::new(daemon_program())
            .arg("--export-all")
            .arg("--enable=receive-pack")
            .arg("--informative-errors")
            .arg("--reuseaddr")
            .arg("--verbose")
            .arg("--listen=127.0.0.1")
            .arg(format!("--port={}", self.port))
            .arg(format!("--base-path={}", self.dir.path().display()))
            .args(&self.args)
            .arg(self.dir.path())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            // Its own process group, so that `stop` ends everything it started.
            .process_group(0)
            .spawn()
            .expect("spawn git-daemon");
        if wait_until_listening(&mut child, self.port) {
            self.child = Some(child);
            return true;
        }
        signal_group(child.id(), "KILL");
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// SIGKILL to the daemon's whole process group: the daemon, its per-connection
    /// children, receive-pack and any hook they run; nothing gets to clean up. Returns
    /// once the port refuses connections. Does nothing when already stopped.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        signal_group(child.id(), "KILL");
        let _ = child.kill();
        let _ = child.wait();
        // The connection must really be refused before the caller goes on.
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Start the daemon again on the same port, serving the same directory (URLs stay
    /// valid). Panics when it is running, or when the port cannot be bound again.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart of a running git daemon (stop it first)");
        // The old socket may linger for a moment.
        let deadline = Instant::now() + RESTART_TIMEOUT;
        while Instant::now() < deadline {
            if self.spawn() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("git daemon did not restart on port {}:\n{}", self.port, self.log());
    }

    /// Whether the daemon runs (not stopped, and has not exited).
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
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

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    /// What the daemon logged so far (its stderr, across restarts), for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The directory holding all served repositories (and `daemon.log`).
    pub fn base_dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `$(git --exec-path)/git-daemon`.
fn daemon_program() -> PathBuf {
    git_exec_path().join("git-daemon")
}

/// `git --exec-path`: where git's own programs (`git-daemon`, `git-http-backend`) are.
pub fn git_exec_path() -> PathBuf {
    require_git();
    let out = Command::new("git").arg("--exec-path").output().expect("run `git --exec-path`");
    assert!(out.status.success(), "git --exec-path failed: {out:?}");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Send `signal` (`TERM`, `KILL`, ...) to the process group `pgid` with procps `kill`
/// (Python's `os.killpg` from `.venv` where `kill` is missing).
pub fn signal_group(pgid: u32, signal: &str) {
    let sent = Command::new("kill")
        .args([&format!("-{signal}"), "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !sent {
        let _ = Command::new(crate::repo_root().join(".venv/bin/python"))
            .args(["-c", &format!("import os, signal; os.killpg({pgid}, signal.SIG{signal})")])
            .stderr(Stdio::null())
            .status();
    }
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

/// `git -C dir`, isolated from the user's and the system's configuration and from
/// `GIT_DIR`/`GIT_WORK_TREE`, with a fixed author and committer and no stdin. `dir` may be
/// a work tree or a bare repository. The base of every helper below; add arguments,
/// environment (e.g. credentials) or a piped stdin for what they do not cover.
pub fn git_command(dir: &Path) -> Command {
    require_git();
    let mut cmd = Command::new("git");
    cmd.arg("-C")
        .arg(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env("GIT_AUTHOR_NAME", "test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com")
        .stdin(Stdio::null());
    cmd
}

/// Run `git -C repo args...` whatever its exit status (for expected failures).
pub fn git_try(repo: &Path, args: &[&str]) -> Output {
    git_command(repo).args(args).output().expect("run git")
}

/// Run `git -C repo args...` and return its output; panics unless it succeeds.
#[track_caller]
pub fn git(repo: &Path, args: &[&str]) -> Output {
    let out = git_try(repo, args);
    assert_success(repo, args, &out);
    out
}

/// Run `git -C repo args...`; panics unless it succeeds. Returns stdout, trimmed.
#[track_caller]
pub fn git_out(repo: &Path, args: &[&str]) -> String {
    let out = git(repo, args);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Run `git -C repo args...` with `input` on its stdin (`hash-object --stdin`, `mktree`,
/// `fast-import`); panics unless it succeeds. Returns stdout, trimmed.
#[track_caller]
pub fn git_with_input(repo: &Path, args: &[&str], input: &[u8]) -> String {
    let mut child = git_command(repo)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run git");
    // A thread writes, so that a large input cannot dead-lock against a full stdout pipe.
    let mut stdin = child.stdin.take().expect("git's stdin");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().expect("wait for git");
    let written = writer.join().expect("the thread writing git's stdin");
    assert_success(repo, args, &out);
    written.unwrap_or_else(|e| panic!("git -C {} {}: writing stdin: {e}", repo.display(), args.join(" ")));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[track_caller]
fn assert_success(repo: &Path, args: &[&str], out: &Output) {
    assert!(
        out.status.success(),
        "git -C {} {} failed ({}): {}{}",
        repo.display(),
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
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
