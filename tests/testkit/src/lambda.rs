//! gitstate as a Lambda function under the real emulator: `cargo lambda watch`
//! (cargo-lambda from PyPI, installed into `.venv` by `scripts/test.sh`) started
//! in the repository root, which builds the `gitstate` binary with cargo, runs it
//! against its Lambda runtime API and serves it as function-URL events at
//! `http://127.0.0.1:<port>/lambda-url/gitstate/<path>`; plus `cargo lambda invoke`.
//! The emulator (and the function it started) is stopped on drop.

use std::fs::File;
use std::net::TcpStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::gitd::{free_port, signal_group};
use super::serve::server_bin;

/// How long the emulator may take to answer its first request: it runs
/// `cargo run`, which may have to build the binary first.
const FIRST_ANSWER_TIMEOUT: Duration = Duration::from_secs(900);

const NOT_FOUND: &str = "cargo-lambda not found: run `bash scripts/test.sh` (it installs cargo-lambda into .venv)";

/// The cargo-lambda executable: `$GITSTATE_CARGO_LAMBDA`, else `.venv/bin/cargo-lambda`.
/// It is called as `cargo-lambda lambda <command>`, as cargo would call it.
pub fn cargo_lambda_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("GITSTATE_CARGO_LAMBDA") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "GITSTATE_CARGO_LAMBDA={} is not a file. {NOT_FOUND}", p.display());
        return p;
    }
    let p = crate::repo_root().join(".venv/bin/cargo-lambda");
    assert!(p.is_file(), "{NOT_FOUND}");
    p
}

/// The target directory the test binaries were built in, so that the
/// emulator's `cargo run` reuses that build.
fn target_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(d);
    }
    // <target>/debug/gitstate (or <target>/<triple>/debug/gitstate).
    let bin = server_bin();
    let profile_dir = bin.parent().expect("bin dir");
    let target = profile_dir.parent().expect("target dir");
    if target.join("CACHEDIR.TAG").exists() {
        target.to_path_buf()
    } else {
        crate::repo_root().join("target")
    }
}

/// A running `cargo lambda watch` serving the `gitstate` function.
pub struct Emulator {
    child: Option<Child>,
    port: u16,
    /// Holds the function's cache (`cache/`) and the emulator's output (`watch.log`).
    dir: TempDir,
    /// How long the first answer took (build check, process start, first request).
    pub first_answer: Duration,
}

impl Emulator {
    /// Start the emulator with `env` for the function (e.g. `GITSTATE_REPOSITORY`)
    /// and wait until the function answers. `GITSTATE_CACHE_DIR` is set to a
    /// fresh directory unless `env` sets it.
    pub fn start(env: &[(&str, &str)]) -> Emulator {
        let bin = cargo_lambda_bin();
        let mut last = String::new();
        for _attempt in 0..3 {
            let dir = tempfile::Builder::new().prefix("gitstate-lambda-").tempdir().unwrap();
            let port = free_port();
            let log = File::create(dir.path().join("watch.log")).unwrap();
            let mut cmd = Command::new(&bin);
            cmd.args(["lambda", "watch", "-A", "127.0.0.1", "-P", &port.to_string()])
                .current_dir(crate::repo_root())
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                // Its own process group, so that drop stops cargo and the function with it.
                .process_group(0);
            // Nothing from the test environment's configuration leaks in.
            for (k, _) in std::env::vars_os() {
                if let Some(k) = k.to_str() {
                    if k.starts_with("GITSTATE_") || k.starts_with("AWS_") || k == "RUST_LOG" {
                        cmd.env_remove(k);
                    }
                }
            }
            cmd.env("CARGO_TARGET_DIR", target_dir()).env("GITSTATE_CACHE_DIR", dir.path().join("cache")).env(
                "GITSTATE_LOG",
                std::env::var("GITSTATE_TEST_LOG").unwrap_or_else(|_| "info,gitstate=debug".into()),
            );
            for (k, v) in env {
                cmd.env(k, v);
            }
            let started = Instant::now();
            let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {}: {e}. {NOT_FOUND}", bin.display()));
            let mut emulator = Emulator { child: Some(child), port, dir, first_answer: Duration::ZERO };
            match emulator.wait_ready() {
                Ok(()) => {
                    emulator.first_answer = started.elapsed();
                    return emulator;
                }
                Err(e) => {
                    let log = emulator.log();
                    emulator.stop();
                    if !log.to_ascii_lowercase().contains("in use") {
                        panic!("cargo lambda watch did not start: {e}\n--- watch.log ---\n{log}");
                    }
                    last = format!("{e}\n--- watch.log ---\n{log}");
                }
            }
        }
        panic!("cargo lambda watch did not start: {last}");
    }

    /// Wait for the port, then for an answer from the function itself: a
    /// request that gitstate refuses without contacting the git host.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + FIRST_ANSWER_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return Err(format!("exited: {status}"));
            }
            if TcpStream::connect_timeout(&([127, 0, 0, 1], self.port).into(), Duration::from_millis(200)).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                return Err("not listening".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let agent = ureq::AgentBuilder::new().timeout(FIRST_ANSWER_TIMEOUT).build();
        let probe = self.url("/");
        loop {
            let answer = match agent.get(&probe).call() {
                Ok(r) => Some((r.status(), r.into_string().unwrap_or_default())),
                Err(ureq::Error::Status(s, r)) => Some((s, r.into_string().unwrap_or_default())),
                Err(_) => None,
            };
            // gitstate's own 404 for an address that is neither /state/ nor /lock/.
            if let Some((404, body)) = &answer {
                if body.contains("/state/") {
                    return Ok(());
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return Err(format!("exited: {status}"));
            }
            if Instant::now() > deadline {
                return Err(format!("no answer from the function after {FIRST_ANSWER_TIMEOUT:?}; last: {answer:?}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>/lambda-url/gitstate<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/lambda-url/gitstate{path}", self.port)
    }

    /// The function-URL address of the state at `path`.
    pub fn state_url(&self, path: &str) -> String {
        self.url(&format!("/state/{path}"))
    }

    /// The function-URL address of the lock of `path`.
    pub fn lock_url(&self, path: &str) -> String {
        self.url(&format!("/lock/{path}"))
    }

    /// The function's `GITSTATE_CACHE_DIR` (unless the caller chose another).
    pub fn cache_dir(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    /// What the emulator and the function printed so far (the function's JSON log lines included).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("watch.log")).unwrap_or_default()
    }

    /// `cargo lambda invoke --data-file <file> gitstate` against this emulator;
    /// returns the function's answer (the API Gateway response JSON).
    pub fn invoke(&self, data_file: &Path) -> serde_json::Value {
        let out = Command::new(cargo_lambda_bin())
            .args(["lambda", "invoke", "--invoke-address", "127.0.0.1", "--invoke-port"])
            .arg(self.port.to_string())
            .arg("--data-file")
            .arg(data_file)
            .args(["--output-format", "json", "gitstate"])
            .current_dir(crate::repo_root())
            .stdin(Stdio::null())
            .output()
            .expect("run cargo lambda invoke");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "cargo lambda invoke --data-file {} failed ({}):\n{stdout}\n{}",
            data_file.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("cargo lambda invoke printed no JSON ({e}):\n{stdout}"))
    }

    /// Stop the emulator's process group (cargo-lambda, `cargo run`, the function).
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        signal_group(child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Whatever is left of the group (the function may outlive cargo-lambda).
        signal_group(child.id(), "KILL");
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("--- cargo lambda watch on port {} ---\n{}\n--- end of watch.log ---", self.port, self.log());
        }
    }
}
