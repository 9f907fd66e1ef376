//! Wrapper mode (issue 12, item 5): `gitstate run [flags] -- <command>` with a real
//! Terraform 1.0.3 whose configuration has only `backend "http" {}`.
//!
//! - `init` + `apply` through the wrapper: the state lands on `main` of the embedded
//!   repository, no lock is left, and the working directory holds only what Terraform itself
//!   writes, with no backend address or credentials in `.terraform/terraform.tfstate`.
//! - What the command is given: the `TF_HTTP_*` variables, a one-time pair that the backend
//!   requires (and no other pair), no git credentials; the server is gone once it exits.
//! - Exit codes passed through (Terraform's 1, `exit 7`, death by a signal), usage errors.
//! - SIGINT / SIGTERM to the wrapper while Terraform holds the lock: passed on, Terraform
//!   stops and releases its lock through the still-running server, nothing is left behind.
//! - Ctrl-C on a pseudo-terminal (the wrapper its foreground job): the command is interrupted
//!   by the terminal once, not a second time by the wrapper; Terraform unlocks.
//! - Git credentials from `GITSTATE_GIT_USERNAME`/`_PASSWORD` reach a smart-HTTP git host.
//!
//! Each test has its own data directory, Terraform directory and wrapper.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use gitstate_testkit::gitd::{git_out, git_try};
use gitstate_testkit::httpd::{GitHttpServer, DEFAULT_PASSWORD, DEFAULT_USER};
use gitstate_testkit::serve::{http, path_without_git, server_bin};
use gitstate_testkit::terraform::terraform_bin;
use serde_json::Value;
use tempfile::TempDir;

/// How long one wrapped command may run before the test gives up.
const TIMEOUT: Duration = Duration::from_secs(180);

const BACKEND: &str = "terraform {\n  backend \"http\" {}\n}\n";

/// A Terraform working directory holding only `main.tf`, with a home of its own outside it
/// (CLI configuration, the wrapper's data directory and the logs of each run).
struct Workdir {
    dir: TempDir,
    home: TempDir,
    runs: std::cell::Cell<usize>,
}

/// What one wrapped command did.
struct Ran {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}]\n--- stdout ---\n{}\n--- stderr ---\n{}", self.status, self.stdout, self.stderr)
    }
}

impl Workdir {
    fn new(main_tf: &str) -> Workdir {
        let dir = tempfile::Builder::new().prefix("gitstate-run-tf-").tempdir().unwrap();
        let home = tempfile::Builder::new().prefix("gitstate-run-home-").tempdir().unwrap();
        std::fs::write(dir.path().join("main.tf"), main_tf).unwrap();
        std::fs::write(home.path().join("terraformrc"), "").unwrap();
        Workdir { dir, home, runs: Default::default() }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The wrapper's `--data-dir`.
    fn data_dir(&self) -> PathBuf {
        self.home.path().join("data")
    }

    /// The embedded repository the wrapper writes.
    fn repo(&self) -> PathBuf {
        self.data_dir().join("repo.git")
    }

    /// `gitstate run --data-dir <data> <flags> -- <command>` in this directory, with only the
    /// test's own `TF_*`/`GITSTATE_*` settings, stdout and stderr in files of the home.
    fn command(&self, flags: &[&str], command: &[&str], env: &[(&str, &str)]) -> (Command, PathBuf, PathBuf) {
        let n = self.runs.get();
        self.runs.set(n + 1);
        let out = self.home.path().join(format!("out-{n}.log"));
        let err = self.home.path().join(format!("err-{n}.log"));
        let mut cmd = Command::new(server_bin());
        cmd.arg("run").arg("--data-dir").arg(self.data_dir()).args(flags).arg("--").args(command);
        cmd.current_dir(self.path());
        for (k, _) in std::env::vars_os() {
            if let Some(k) = k.to_str() {
                if k.starts_with("TF_") || k.starts_with("GITSTATE_") || k.starts_with("GIT_") {
                    cmd.env_remove(k);
                }
            }
        }
        // gitstate never runs git's programs: they are not on its PATH (commands are given by path).
        cmd.env("PATH", path_without_git())
            .env("HOME", self.home.path())
            .env("TF_IN_AUTOMATION", "1")
            .env("TF_INPUT", "0")
            .env("CHECKPOINT_DISABLE", "1")
            .env("TF_CLI_CONFIG_FILE", self.home.path().join("terraformrc"))
            .env("GITSTATE_CACHE_DIR", self.home.path().join("cache"))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(File::create(&out).unwrap())
            .stderr(File::create(&err).unwrap());
        (cmd, out, err)
    }

    /// Run the wrapper to its end.
    fn run(&self, flags: &[&str], command: &[&str], env: &[(&str, &str)]) -> Ran {
        let (mut cmd, out, err) = self.command(flags, command, env);
        let mut child = cmd.spawn().expect("spawn gitstate run");
        let status = wait(&mut child, TIMEOUT)
            .unwrap_or_else(|| panic!("gitstate run {command:?} still running after {TIMEOUT:?}:\n{}", read(&err)));
        Ran { status, stdout: read(&out), stderr: read(&err) }
    }

    /// `gitstate run -- terraform <args>`.
    fn terraform(&self, args: &[&str]) -> Ran {
        let tf = terraform_bin();
        let mut command = vec![tf.to_str().unwrap()];
        command.extend_from_slice(args);
        self.run(&[], &command, &[])
    }

    /// Every file under the working directory, relative to it.
    fn files(&self) -> BTreeSet<String> {
        let mut found = BTreeSet::new();
        let mut stack = vec![self.path().to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                if entry.file_type().unwrap().is_dir() {
                    stack.push(path);
                } else {
                    found.insert(path.strip_prefix(self.path()).unwrap().to_string_lossy().into_owned());
                }
            }
        }
        found
    }

    /// The branches of the embedded repository under `locks/`.
    fn lock_branches(&self) -> String {
        git_out(&self.repo(), &["for-each-ref", "--format=%(refname)", "refs/heads/locks/"])
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Wait for `child` at most `limit`; `None` (and the child killed) when it did not end.
fn wait(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Send `signal` (`INT`, `TERM`) to process `pid` with procps `kill`.
fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().expect("run kill");
    assert!(status.success(), "kill -{signal} {pid}: {status}");
}

/// The processes whose parent is `pid` (from /proc).
fn children_of(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else { continue };
        if after.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
            found.push(child);
        }
    }
    found
}

/// `pid`'s children, their children, and so on.
fn descendants_of(pid: u32) -> Vec<u32> {
    let mut found = children_of(pid);
    let mut i = 0;
    while i < found.len() {
        let more = children_of(found[i]);
        found.extend(more);
        i += 1;
    }
    found
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn state_json(repo: &Path, path: &str) -> Value {
    let text = git_out(repo, &["show", &format!("main:{path}")]);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("stored state is not JSON ({e}):\n{text}"))
}

#[test]
fn init_and_apply_with_only_an_empty_http_backend_block() {
    let w = Workdir::new(&format!("{BACKEND}output \"greeting\" {{\n  value = \"hello from the wrapper\"\n}}\n"));
    let init = w.terraform(&["init", "-input=false", "-no-color"]);
    assert!(init.status.success(), "init:\n{init:?}");
    let apply = w.terraform(&["apply", "-auto-approve", "-input=false", "-no-color"]);
    assert!(apply.status.success(), "apply:\n{apply:?}");
    assert!(apply.stdout.contains("hello from the wrapper"), "{apply:?}");

    let state = state_json(&w.repo(), "terraform.tfstate");
    assert_eq!(state["outputs"]["greeting"]["value"], "hello from the wrapper", "{state:#}");
    let message = git_out(&w.repo(), &["log", "-1", "--format=%B", "main"]);
    assert!(message.starts_with("Update terraform.tfstate") && message.contains("Operation: OperationTypeApply"));
    assert_eq!(w.lock_branches(), "", "no lock may remain");

    // Only what Terraform itself writes: no state, no credentials, no backend file of ours.
    let files = w.files();
    let allowed: BTreeSet<String> =
        ["main.tf", ".terraform/terraform.tfstate", ".terraform.lock.hcl"].into_iter().map(String::from).collect();
    assert!(files.is_subset(&allowed), "unexpected files in the working directory: {files:?}");
    // The backend configuration Terraform saves records only attributes of the configuration
    // (all unset here), never what came from TF_HTTP_*: no address (whose port changes every
    // run), no username, no password.
    let saved: Value =
        serde_json::from_str(&std::fs::read_to_string(w.path().join(".terraform/terraform.tfstate")).unwrap()).unwrap();
    assert_eq!(saved["backend"]["type"], "http");
    let config = saved["backend"]["config"].as_object().expect("backend config");
    for key in ["address", "lock_address", "unlock_address", "username", "password"] {
        assert!(config.get(key).is_some_and(Value::is_null), "{key} recorded: {saved:#}");
    }
    assert!(config.values().all(Value::is_null), "{saved:#}");

    // A second run (new port, new pair) needs no re-init and sees the stored state.
    let plan = w.terraform(&["plan", "-input=false", "-no-color", "-detailed-exitcode"]);
    assert_eq!(plan.status.code(), Some(0), "no changes expected:\n{plan:?}");
}

#[test]
fn the_command_gets_the_backend_and_a_one_time_pair_only() {
    let w = Workdir::new(BACKEND);
    let env_file = w.home.path().join("env.txt");
    let stop = w.home.path().join("stop");
    let script = format!(
        "PATH=/usr/bin:/bin; env > '{}'; while [ ! -e '{}' ]; do sleep 0.05; done",
        env_file.display(),
        stop.display()
    );
    let secrets = [("GITSTATE_GIT_USERNAME", "git-user"), ("GITSTATE_GIT_PASSWORD", "git-secret-token")];
    let (mut cmd, _out, err) =
        w.command(&["--state", "envs/ü#1.tfstate", "--ref", "states"], &["/bin/sh", "-c", &script], &secrets);
    let mut wrapper = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !env_file.exists() || !read(&env_file).contains("TF_HTTP_PASSWORD") {
        assert!(Instant::now() < deadline, "the command never ran:\n{}", read(&err));
        assert!(wrapper.try_wait().unwrap().is_none(), "the wrapper ended early:\n{}", read(&err));
        std::thread::sleep(Duration::from_millis(20));
    }
    let env_text = read(&env_file);
    let var = |name: &str| env_text.lines().find_map(|l| l.strip_prefix(&format!("{name}="))).map(str::to_string);
    let address = var("TF_HTTP_ADDRESS").expect("TF_HTTP_ADDRESS");
    let port: u16 = address
        .strip_prefix("http://127.0.0.1:")
        .and_then(|rest| rest.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("address on loopback expected: {address}"));
    assert_eq!(address, format!("http://127.0.0.1:{port}/state/envs/%C3%BC%231.tfstate"));
    assert_eq!(var("TF_HTTP_LOCK_ADDRESS").as_ref(), Some(&address));
    assert_eq!(var("TF_HTTP_UNLOCK_ADDRESS").as_ref(), Some(&address));
    assert_eq!(var("TF_HTTP_LOCK_METHOD").as_deref(), Some("LOCK"));
    assert_eq!(var("TF_HTTP_UNLOCK_METHOD").as_deref(), Some("UNLOCK"));
    let user = var("TF_HTTP_USERNAME").expect("TF_HTTP_USERNAME");
    let password = var("TF_HTTP_PASSWORD").expect("TF_HTTP_PASSWORD");
    for v in [&user, &password] {
        assert!(v.len() == 32 && v.bytes().all(|b| b.is_ascii_hexdigit()), "random hex expected: {v}");
    }
    assert!(!env_text.contains("git-secret-token") && var("GITSTATE_GIT_PASSWORD").is_none(), "{env_text}");

    // The backend answers the one-time pair only (204: nothing stored yet, on branch `states`).
    let auth = |u: &str, p: &str| {
        use base64::Engine as _;
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}")))
    };
    assert_eq!(http("GET", &address, &[], None).status, 401);
    assert_eq!(http("GET", &address, &[("Authorization", &auth(&user, "wrong"))], None).status, 401);
    assert_eq!(http("GET", &address, &[("Authorization", &auth("git-user", "git-secret-token"))], None).status, 401);
    assert_eq!(http("GET", &address, &[("Authorization", &auth(&user, &password))], None).status, 204);

    std::fs::write(&stop, "").unwrap();
    let status = wait(&mut wrapper, TIMEOUT).expect("the wrapper ends with its command");
    assert!(status.success(), "{status}\n{}", read(&err));
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "the server must stop with the command");

    // A new run, a new pair.
    let again = w.run(&[], &["/bin/sh", "-c", "printf %s \"$TF_HTTP_PASSWORD\""], &[]);
    assert!(again.status.success(), "{again:?}");
    assert_eq!(again.stdout.len(), 32);
    assert_ne!(again.stdout, password);
}

#[test]
fn exit_codes_are_passed_through() {
    let w = Workdir::new(&format!("{BACKEND}output \"broken\" {{\n  value = \n"));
    let apply = w.terraform(&["apply", "-auto-approve", "-input=false", "-no-color"]);
    assert_eq!(apply.status.code(), Some(1), "Terraform's own exit code:\n{apply:?}");
    assert!(apply.stderr.contains("Error"), "{apply:?}");

    let seven = w.run(&[], &["/bin/sh", "-c", "exit 7"], &[]);
    assert_eq!(seven.status.code(), Some(7), "{seven:?}");
    let zero = w.run(&[], &["/bin/sh", "-c", "true"], &[]);
    assert_eq!(zero.status.code(), Some(0), "{zero:?}");
    let killed = w.run(&[], &["/bin/sh", "-c", "kill -TERM $$"], &[]);
    assert_eq!(killed.status.code(), Some(128 + 15), "death by SIGTERM: {killed:?}");

    let missing = w.run(&[], &[], &[]);
    assert_eq!(missing.status.code(), Some(2), "{missing:?}");
    assert!(missing.stderr.contains("<COMMAND>"), "a usage error naming the command: {missing:?}");
    let not_found = w.run(&[], &["/nonexistent/terraform", "plan"], &[]);
    assert_eq!(not_found.status.code(), Some(127), "{not_found:?}");
    assert!(not_found.stderr.contains("/nonexistent/terraform: command not found"), "{not_found:?}");
    let bad_state = w.run(&["--state", "../outside"], &["/bin/sh", "-c", "exit 0"], &[]);
    assert_eq!(bad_state.status.code(), Some(2), "{bad_state:?}");
    assert!(bad_state.stderr.contains("--state"), "{bad_state:?}");
    let bad_env = w.run(&[], &["/bin/sh", "-c", "exit 0"], &[("GITSTATE_STATE", "a//b")]);
    assert_eq!(bad_env.status.code(), Some(2), "GITSTATE_STATE is read: {bad_env:?}");
}

/// An HTTP server on 127.0.0.1 that holds every request until the test lets it answer (with
/// a small state): what a `terraform_remote_state` data source waits on, in the middle of
/// an apply that holds the lock.
struct SlowServer {
    port: u16,
    arrived: mpsc::Receiver<()>,
    release: mpsc::Sender<()>,
}

impl SlowServer {
    fn start() -> SlowServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (arrived_tx, arrived) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            let body = r#"{"version":4,"terraform_version":"1.0.3","serial":1,"lineage":"slow","outputs":{"v":{"value":"slow","type":"string"}},"resources":[]}"#;
            let mut released = false;
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) && line != "\r\n" {
                    line.clear();
                }
                let _ = arrived_tx.send(());
                if !released {
                    // Hold the request until released (or the test is gone).
                    let _ = release_rx.recv_timeout(TIMEOUT);
                    released = true;
                }
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        SlowServer { port, arrived, release }
    }
}

/// A signal to the wrapper while Terraform holds the lock: Terraform is told, stops, and
/// unlocks through the server, which is still there; nothing is left behind.
fn interrupt_during_apply(sig: &str) {
    let slow = SlowServer::start();
    let w = Workdir::new(&format!(
        "{BACKEND}data \"terraform_remote_state\" \"slow\" {{\n  backend = \"http\"\n  config = {{\n    address = \"http://127.0.0.1:{}/slow.tfstate\"\n  }}\n}}\noutput \"seen\" {{\n  value = data.terraform_remote_state.slow.outputs\n}}\n",
        slow.port
    ));
    let init = w.terraform(&["init", "-input=false", "-no-color"]);
    assert!(init.status.success(), "init:\n{init:?}");

    let tf = terraform_bin();
    let (mut cmd, out, err) =
        w.command(&[], &[tf.to_str().unwrap(), "apply", "-auto-approve", "-input=false", "-no-color"], &[]);
    // A group of its own: the signal below reaches the wrapper only (not a terminal's Ctrl-C,
    // which the test's terminal, if any, would send to its foreground group).
    cmd.process_group(0);
    let mut wrapper = cmd.spawn().unwrap();
    let wrapper_pid = wrapper.id();
    slow.arrived.recv_timeout(TIMEOUT).unwrap_or_else(|_| {
        let _ = wrapper.kill();
        panic!("Terraform never read the data source:\n{}\n{}", read(&out), read(&err))
    });
    // The data source is read within the locked operation.
    assert_eq!(w.lock_branches(), "refs/heads/locks/terraform.tfstate", "Terraform holds the lock");
    // Terraform 1.0.3 is two processes (panicwrap): the wrapper's child and grandchild.
    let descendants = descendants_of(wrapper_pid);
    assert!(descendants.len() >= 2, "Terraform runs under the wrapper: {descendants:?}");

    signal(wrapper_pid, sig);
    // Terraform says it received the interrupt (passed on by the wrapper) ...
    let deadline = Instant::now() + Duration::from_secs(60);
    while !read(&out).contains("Interrupt received") {
        assert!(Instant::now() < deadline, "Terraform was not interrupted:\n{}\n{}", read(&out), read(&err));
        assert!(wrapper.try_wait().unwrap().is_none(), "the wrapper ended before Terraform:\n{}", read(&err));
        std::thread::sleep(Duration::from_millis(20));
    }
    // ... and finishes its operation once the data source answers.
    let _ = slow.release.send(());
    let status = wait(&mut wrapper, TIMEOUT).expect("the wrapper ends after Terraform");
    let (stdout, stderr) = (read(&out), read(&err));
    assert!(status.code().is_some(), "the wrapper exits, it does not die of the signal: {status}\n{stderr}");
    assert!(!stderr.contains("Two interrupts"), "the signal reached Terraform once:\n{stderr}");
    assert_eq!(w.lock_branches(), "", "the lock was released:\n{stdout}\n{stderr}");
    assert!(!stderr.contains("Error releasing the state lock"), "{stderr}");
    for pid in descendants {
        assert!(!alive(pid), "process {pid} outlived the wrapper");
    }
    eprintln!("wrapper exit after SIG{sig}: {status}");
}

#[test]
fn sigint_during_apply_leaves_no_lock() {
    interrupt_during_apply("INT");
}

#[test]
fn sigterm_during_apply_leaves_no_lock() {
    interrupt_during_apply("TERM");
}

#[test]
fn git_credentials_reach_the_git_host_only_through_the_wrapper() {
    let httpd = GitHttpServer::start();
    let url = httpd.create_repo("states.git");
    let w = Workdir::new(&format!("{BACKEND}output \"x\" {{\n  value = \"over http\"\n}}\n"));
    let tf = terraform_bin();
    let tf = tf.to_str().unwrap();
    let creds = [("GITSTATE_GIT_USERNAME", DEFAULT_USER), ("GITSTATE_GIT_PASSWORD", DEFAULT_PASSWORD)];
    let init = w.run(&["--repository", &url], &[tf, "init", "-input=false", "-no-color"], &creds);
    assert!(init.status.success(), "init:\n{init:?}");
    let apply = w.run(&["--repository", &url], &[tf, "apply", "-auto-approve", "-input=false", "-no-color"], &creds);
    assert!(apply.status.success(), "apply:\n{apply:?}\n{}", httpd.error_log());
    let state = state_json(&httpd.repo_dir("states.git"), "terraform.tfstate");
    assert_eq!(state["outputs"]["x"]["value"], "over http");

    // Without git credentials the host refuses, and Terraform's failure is the exit code.
    let refused = w.run(&["--repository", &url], &[tf, "apply", "-auto-approve", "-input=false", "-no-color"], &[]);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let refs = git_try(&httpd.repo_dir("states.git"), &["for-each-ref", "refs/heads/locks/"]);
    assert!(refs.stdout.is_empty(), "no lock on the host");
}

/// Runs argv[1..] on a new pseudo-terminal (its session, its foreground job), copies what it
/// writes to stdout, types Ctrl-C whenever a `c` arrives on stdin, and exits with its code.
const PTY_SCRIPT: &str = r#"
import os, pty, select, sys
pid, fd = pty.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
out, inp = sys.stdout.buffer, sys.stdin.fileno()
watch = [fd, inp]
while True:
    ready = select.select(watch, [], [])[0]
    if inp in ready:
        data = os.read(inp, 64)
        if not data:
            watch.remove(inp)
        elif b"c" in data:
            os.write(fd, b"\x03")
    if fd in ready:
        try:
            data = os.read(fd, 4096)
        except OSError:
            data = b""
        if not data:
            break
        out.write(data)
        out.flush()
code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
sys.exit(code if code >= 0 else 128 - code)
"#;

/// `gitstate run -- <command>` in `w` on a new pseudo-terminal whose foreground job it is;
/// writing `c` to the returned child's stdin types Ctrl-C. Output (both streams) in `out`.
fn on_a_terminal(w: &Workdir, command: &[&str], env: &[(&str, &str)]) -> (Child, PathBuf, PathBuf) {
    let python = gitstate_testkit::repo_root().join(".venv/bin/python");
    let python = if python.is_file() { python } else { PathBuf::from("python3") };
    let (wrapper, out, err) = w.command(&[], command, env);
    let mut cmd = Command::new(&python);
    cmd.arg("-c").arg(PTY_SCRIPT).arg(wrapper.get_program()).args(wrapper.get_args());
    cmd.current_dir(w.path());
    for (k, v) in wrapper.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    cmd.stdin(Stdio::piped()).stdout(File::create(&out).unwrap()).stderr(File::create(&err).unwrap());
    let terminal = cmd.spawn().unwrap_or_else(|e| panic!("spawn {}: {e}", python.display()));
    (terminal, out, err)
}

/// Wait until `path` holds `text`.
#[track_caller]
fn wait_for_text(path: &Path, text: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !read(path).contains(text) {
        assert!(Instant::now() < deadline, "no {text:?} in:\n{}", read(path));
        assert!(child.try_wait().unwrap().is_none(), "ended before {text:?}:\n{}", read(path));
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Ctrl-C at a terminal reaches the command once: from the terminal, not again from the wrapper.
#[test]
fn ctrl_c_at_a_terminal_reaches_the_command_once() {
    let w = Workdir::new(BACKEND);
    let stop = w.home.path().join("stop");
    let script = format!(
        "PATH=/usr/bin:/bin; n=0; trap 'n=$((n+1)); echo \"interrupt $n\"' INT; echo ready; \
         while [ ! -e '{}' ]; do sleep 0.05; done; exit 5",
        stop.display()
    );
    let (mut terminal, out, _err) =
        on_a_terminal(&w, &["/bin/sh", "-c", &script], &[("GITSTATE_LOG", "warn,gitstate::run=debug")]);
    wait_for_text(&out, "ready", &mut terminal);
    terminal.stdin.as_mut().unwrap().write_all(b"c").unwrap();
    wait_for_text(&out, "interrupt 1", &mut terminal);
    // Time for a second interrupt to arrive, were the wrapper to send one.
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(&stop, "").unwrap();
    drop(terminal.stdin.take());
    let status = wait(&mut terminal, TIMEOUT).expect("the wrapper ends with its command");
    let output = read(&out);
    assert_eq!(status.code(), Some(5), "{output}");
    assert!(!output.contains("interrupt 2"), "the command was interrupted twice:\n{output}");
    // Signals are not queued, so a second SIGINT close behind the first may go unseen above:
    // the wrapper says what it decided.
    assert!(output.contains("interrupt from the terminal"), "the wrapper's decision:\n{output}");
}

/// Ctrl-C at a terminal: the terminal interrupts Terraform itself, and the wrapper must not
/// interrupt it a second time (Terraform would exit at once, "Two interrupts received").
#[test]
fn ctrl_c_at_a_terminal_interrupts_terraform_once() {
    let slow = SlowServer::start();
    let w = Workdir::new(&format!(
        "{BACKEND}data \"terraform_remote_state\" \"slow\" {{\n  backend = \"http\"\n  config = {{\n    address = \"http://127.0.0.1:{}/slow.tfstate\"\n  }}\n}}\noutput \"seen\" {{\n  value = data.terraform_remote_state.slow.outputs\n}}\n",
        slow.port
    ));
    let init = w.terraform(&["init", "-input=false", "-no-color"]);
    assert!(init.status.success(), "init:\n{init:?}");

    let tf = terraform_bin();
    let (mut terminal, out, err) =
        on_a_terminal(&w, &[tf.to_str().unwrap(), "apply", "-auto-approve", "-input=false", "-no-color"], &[]);
    slow.arrived.recv_timeout(TIMEOUT).unwrap_or_else(|_| {
        let _ = terminal.kill();
        panic!("Terraform never read the data source:\n{}\n{}", read(&out), read(&err))
    });
    assert_eq!(w.lock_branches(), "refs/heads/locks/terraform.tfstate", "Terraform holds the lock");
    let descendants = descendants_of(terminal.id());
    assert!(descendants.len() >= 3, "wrapper and Terraform run on the terminal: {descendants:?}");

    terminal.stdin.as_mut().unwrap().write_all(b"c").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !read(&out).contains("Interrupt received") {
        assert!(Instant::now() < deadline, "Terraform was not interrupted:\n{}\n{}", read(&out), read(&err));
        std::thread::sleep(Duration::from_millis(20));
    }
    // Time for a second interrupt to arrive, were the wrapper to send one.
    std::thread::sleep(Duration::from_millis(500));
    let _ = slow.release.send(());
    drop(terminal.stdin.take());
    let status = wait(&mut terminal, TIMEOUT).expect("the wrapper ends after Terraform");
    let output = read(&out);
    assert!(status.code().is_some_and(|c| c < 128), "the wrapper exits with Terraform's code: {status}\n{output}");
    assert_eq!(output.matches("Interrupt received").count(), 1, "{output}");
    assert!(!output.contains("Two interrupts"), "the interrupt reached Terraform once:\n{output}");
    assert_eq!(w.lock_branches(), "", "the lock was released:\n{output}");
    for pid in descendants {
        assert!(!alive(pid), "process {pid} outlived the wrapper");
    }
}
