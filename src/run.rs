//! `gitstate run -- terraform <args>`: wrapper mode. Starts the backend on a free loopback
//! port behind a random one-time basic-auth pair, runs the command (Terraform, OpenTofu,
//! anything) attached to the terminal with the backend handed over in its environment
//! (`TF_HTTP_ADDRESS`, `TF_HTTP_LOCK_ADDRESS`, `TF_HTTP_UNLOCK_ADDRESS`, `TF_HTTP_USERNAME`,
//! `TF_HTTP_PASSWORD`; nothing is written into the working directory), passes SIGINT and
//! SIGTERM on, keeps serving until the command has exited (an interrupted Terraform still
//! releases its lock through the server), and exits with the command's exit code.
//!
//! Settings are those of `serve` (flags override `GITSTATE_*`), plus `--state` /
//! `GITSTATE_STATE`. The backend's own basic auth is always the one-time pair; git
//! credentials come from `GITSTATE_GIT_USERNAME`/`GITSTATE_GIT_PASSWORD` (or the secret of
//! `GITSTATE_AUTH=secret`), so they are reachable only with the pair the child was given.

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::process::{Child, ExitCode, ExitStatus};
use std::sync::Arc;
use std::time::Duration;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use tokio::signal::unix::{signal, SignalKind};

mod sys;

use crate::app::App;
use crate::config::{AuthMode, Config, Entry, Settings};
use crate::storage::Credentials;

/// The state path when neither `--state` nor `GITSTATE_STATE` names one.
pub const DEFAULT_STATE: &str = "terraform.tfstate";

/// Exit code for a failure of the wrapper itself (settings aside): `env`'s convention.
pub const EXIT_WRAPPER_FAILED: u8 = 125;
/// Exit code when the command exists but cannot be run.
pub const EXIT_CANNOT_RUN: u8 = 126;
/// Exit code when the command is not found.
pub const EXIT_NOT_FOUND: u8 = 127;
/// Exit code for settings that cannot be used (as for a usage error).
pub const EXIT_USAGE: u8 = 2;

/// Variables the wrapper sets for the command: the whole `http` backend configuration, so
/// that no inherited value (a `TF_HTTP_LOCK_METHOD=POST` meant for another backend) mixes in.
const BACKEND_VARIABLES: [&str; 8] = [
    "TF_HTTP_ADDRESS",
    "TF_HTTP_LOCK_ADDRESS",
    "TF_HTTP_UNLOCK_ADDRESS",
    "TF_HTTP_LOCK_METHOD",
    "TF_HTTP_UNLOCK_METHOD",
    "TF_HTTP_UPDATE_METHOD",
    "TF_HTTP_USERNAME",
    "TF_HTTP_PASSWORD",
];

/// Secrets of the wrapper that the command has no use for: it reaches the backend with the
/// one-time pair only.
const WITHHELD_VARIABLES: [&str; 5] = [
    "GITSTATE_GIT_USERNAME",
    "GITSTATE_GIT_PASSWORD",
    "GITSTATE_USERNAME",
    "GITSTATE_PASSWORD",
    "GITSTATE_AGE_IDENTITIES",
];

/// `gitstate run` flags: the settings of `serve`, the state path and the command.
#[derive(clap::Args, Clone)]
pub struct RunArgs {
    /// Path of the state in the repository [default: terraform.tfstate]
    #[arg(long, env = "GITSTATE_STATE", value_name = "PATH")]
    pub state: Option<String>,
    #[command(flatten)]
    pub settings: Settings,
    /// The command and its arguments, after `--` (e.g. `-- terraform apply`, `-- tofu plan`).
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// What the wrapper runs with, once its settings are read.
pub struct Plan {
    pub config: Config,
    /// The state path (validated), e.g. `envs/prod/terraform.tfstate`.
    pub state: String,
    /// The one-time basic-auth pair the backend requires and the command is given.
    pub credentials: Credentials,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan").field("state", &self.state).field("username", &self.credentials.username).finish()
    }
}

/// Read the settings. The backend's own basic auth is the one-time pair, whatever
/// GITSTATE_AUTH and GITSTATE_USERNAME/PASSWORD say; git credentials come from GITSTATE_GIT_*
/// (or the secret).
pub fn plan(args: &RunArgs) -> Result<Plan, String> {
    let mode = match args.settings.auth.as_deref().filter(|m| !m.is_empty()) {
        Some(given) => given.parse::<AuthMode>().map_err(|e| e.to_string())?,
        None => AuthMode::Passthrough,
    };
    let mode = if mode == AuthMode::Secret { AuthMode::Secret } else { AuthMode::Env };
    let settings = Settings { username: None, password: None, auth: None, ..args.settings.clone() };
    let mut config = Config::from_settings(&settings, Entry::Local).map_err(|e| e.to_string())?;
    let state = args.state.clone().filter(|s| !s.is_empty()).unwrap_or_else(|| DEFAULT_STATE.to_string());
    crate::protocol::path::check_state_path(&state).map_err(|why| format!("--state / GITSTATE_STATE: {why}"))?;
    let credentials = one_time_credentials()?;
    // `env` mode with the one-time pair as backend auth: the git host gets GITSTATE_GIT_* when
    // set, and nothing (anonymous, or the embedded repository) otherwise. `secret` mode reads
    // its git credentials from Secrets Manager; the one-time pair takes precedence over any
    // backend pair of the secret.
    config.auth = mode;
    config.backend_credentials = Some(credentials.clone());
    Ok(Plan { config, state, credentials })
}

/// A fresh user and password of 32 hex digits each, from the operating system's generator.
fn one_time_credentials() -> Result<Credentials, String> {
    use aes_gcm::aead::rand_core::RngCore as _;
    let hex = || -> Result<String, String> {
        let mut bytes = [0u8; 16];
        aes_gcm::aead::OsRng
            .try_fill_bytes(&mut bytes)
            .map_err(|e| format!("cannot draw a random one-time password: {e}"))?;
        Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
    };
    Ok(Credentials { username: hex()?, password: hex()? })
}

/// Characters kept as they are in the address's path: unreserved ones and `/` between components.
const PATH_KEEP: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~').remove(b'/');

/// `http://127.0.0.1:<port>/state/<state>`, the path percent-encoded where it must be.
pub fn state_address(port: u16, state: &str) -> String {
    format!("http://127.0.0.1:{port}/state/{}", utf8_percent_encode(state, PATH_KEEP))
}

/// The variables handed to the command (the backend configuration of Terraform's `http` backend).
pub fn backend_environment(address: &str, credentials: &Credentials) -> Vec<(&'static str, String)> {
    let values = [
        address.to_string(),
        address.to_string(),
        address.to_string(),
        "LOCK".into(),
        "UNLOCK".into(),
        "POST".into(),
        credentials.username.clone(),
        credentials.password.clone(),
    ];
    BACKEND_VARIABLES.into_iter().zip(values).collect()
}

/// `gitstate run`: the whole wrapper, returning the command's exit code.
pub fn main(args: RunArgs) -> ExitCode {
    init_logging(&args.settings);
    let plan = match plan(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("gitstate run: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gitstate run: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_WRAPPER_FAILED);
        }
    };
    let code = runtime.block_on(serve_and_wait(plan, &args.command));
    // The command is gone; a connection it left open must not keep the wrapper alive.
    runtime.shutdown_timeout(Duration::from_secs(2));
    match code {
        Ok(code) => ExitCode::from(code),
        Err((code, message)) => {
            eprintln!("gitstate run: {message}");
            ExitCode::from(code)
        }
    }
}

/// Serve, run the command, wait for it; the command's exit code.
async fn serve_and_wait(plan: Plan, command: &[OsString]) -> Result<u8, (u8, String)> {
    let failed = |what: &str, e: &dyn std::fmt::Display| (EXIT_WRAPPER_FAILED, format!("{what}: {e}"));
    let (program, arguments) = command.split_first().ok_or((EXIT_USAGE, "no command given after `--`".to_string()))?;
    let app = Arc::new(App::load(plan.config).await.map_err(|e| failed("cannot start the backend", &e))?);
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .map_err(|e| failed("cannot listen on 127.0.0.1", &e))?;
    let port = listener.local_addr().map_err(|e| failed("cannot listen on 127.0.0.1", &e))?.port();
    let address = state_address(port, &plan.state);
    tracing::info!(storage = %app.describe_storage(), state = %plan.state, %port, "serving the backend for the command");
    let limits = app.config().serve_limits.clone();
    let mut server = tokio::spawn(crate::serve::serve(app, listener, limits));

    // Listen before the command exists, so that no signal and no exit can be missed.
    let listen = |kind: SignalKind| signal(kind).map_err(|e| failed("cannot handle signals", &e));
    let mut signals = Signals {
        interrupt: listen(SignalKind::interrupt())?,
        terminate: listen(SignalKind::terminate())?,
        child_exited: listen(SignalKind::child())?,
    };
    let own_group = !terminal_foreground();
    let mut child = spawn(program, arguments, own_group, &address, &plan.credentials)?;
    let status = signals.wait_for(&mut child, own_group, &mut server).await;
    server.abort();
    status.map(exit_code).map_err(|e| failed("cannot wait for the command", &e))
}

/// Start the command with the backend in its environment and the wrapper's secrets withheld.
fn spawn(
    program: &OsString,
    arguments: &[OsString],
    own_group: bool,
    address: &str,
    credentials: &Credentials,
) -> Result<Child, (u8, String)> {
    let mut cmd = std::process::Command::new(program);
    cmd.args(arguments);
    // At a terminal, the command stays in the wrapper's process group, the terminal's
    // foreground job: it reads the terminal (Terraform's approval prompt), and Ctrl-C and
    // Ctrl-Z reach it directly, as without the wrapper. Elsewhere (CI, a service, a
    // background job) it gets a group of its own: a signal sent to the wrapper's group reaches
    // the command once, passed on by the wrapper, and not a second time directly.
    if own_group {
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    }
    for name in WITHHELD_VARIABLES {
        cmd.env_remove(name);
    }
    cmd.envs(backend_environment(address, credentials));
    cmd.spawn().map_err(|e| {
        let name = program.to_string_lossy();
        match e.kind() {
            std::io::ErrorKind::NotFound => (EXIT_NOT_FOUND, format!("{name}: command not found")),
            _ => (EXIT_CANNOT_RUN, format!("{name}: cannot run: {e}")),
        }
    })
}

/// The signals the wrapper handles while the command runs.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    child_exited: tokio::signal::unix::Signal,
}

impl Signals {
    /// Pass SIGINT and SIGTERM on until the command exits; its exit status.
    async fn wait_for(
        &mut self,
        child: &mut Child,
        own_group: bool,
        server: &mut tokio::task::JoinHandle<std::io::Result<()>>,
    ) -> std::io::Result<ExitStatus> {
        // SIGCHLD says when to look; the tick is only a safety net.
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut server_ended = false;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            tokio::select! {
                _ = self.child_exited.recv() => {}
                _ = tick.tick() => {}
                _ = self.interrupt.recv() => pass_on(child, own_group, libc::SIGINT),
                _ = self.terminate.recv() => pass_on(child, own_group, libc::SIGTERM),
                ended = &mut *server, if !server_ended => {
                    server_ended = true;
                    tracing::error!(outcome = ?ended.map(|r| r.map_err(|e| e.to_string())), "the backend server stopped before the command");
                }
            }
        }
    }
}

/// Pass `signal` on to the command, the way each signal arrives without the wrapper.
///
/// SIGINT is a terminal's signal, sent to a whole job: in a group of its own the command's
/// group gets it (Terraform 1.0.3 runs as two processes, panicwrap, whose outer one ignores
/// SIGINT and counts on the terminal interrupting the inner one). In the wrapper's group (at
/// a terminal) a SIGINT is taken for the terminal's Ctrl-C, which the command received
/// already: a second one would make Terraform exit at once ("Two interrupts received")
/// instead of stopping cleanly. SIGTERM is sent to a process: the command's own (Terraform's
/// outer process passes it on; sent to its group as well, the inner one would count two).
fn pass_on(child: &Child, own_group: bool, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else { return };
    let target = match (signal == libc::SIGINT, own_group) {
        (true, true) => -pid,
        (true, false) if terminal_foreground() => {
            tracing::debug!("interrupt from the terminal: the command received it directly");
            return;
        }
        _ => pid,
    };
    // The child is reaped only by the loop that calls this (try_wait), so `pid` (and the
    // group it leads) is still the command's.
    if let Err(error) = sys::kill(target, signal) {
        tracing::debug!(%error, "could not pass a signal on to the command");
    }
}

/// True when the wrapper's process group is the foreground job of its controlling terminal
/// (so the terminal's Ctrl-C and reads reach that group).
fn terminal_foreground() -> bool {
    use std::os::unix::fs::OpenOptionsExt as _;
    use std::os::unix::io::AsRawFd as _;
    let Ok(tty) = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOCTTY).open("/dev/tty") else {
        return false;
    };
    sys::owns_terminal(tty.as_raw_fd())
}

/// The command's exit code; 128 + the signal's number when a signal ended it.
pub fn exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(1),
        (None, Some(signal)) => u8::try_from(128 + signal).unwrap_or(255),
        (None, None) => 1,
    }
}

/// Log lines go to standard error, between the command's own output: warnings only unless
/// `GITSTATE_LOG` or `RUST_LOG` ask for more.
fn init_logging(settings: &Settings) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(settings.log_filter("warn"))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use std::path::PathBuf;

    /// `gitstate run` with these flags over this environment, as clap reads them.
    fn plan_of(flags: &[(&str, &str)], env: impl Fn(&str) -> Option<String>) -> Result<Plan, String> {
        let flag = |k: &str| flags.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
        let state = flag("state").or_else(|| env("GITSTATE_STATE"));
        let settings = Settings::from_sources(flags, env).map_err(|e| e.to_string())?;
        plan(&RunArgs { state, settings, command: vec!["terraform".into()] })
    }

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    fn basic(user: &str, password: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        let v = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        h.insert(http::header::AUTHORIZATION, format!("Basic {v}").parse().unwrap());
        h
    }

    #[test]
    fn flags_override_the_environment_and_the_pair_is_fresh() {
        let e = env(&[("GITSTATE_REF", "states"), ("GITSTATE_STATE", "a/b.tfstate"), ("GITSTATE_DATA_DIR", "/x")]);
        let p = plan_of(&[], &e).unwrap();
        assert_eq!((p.config.branch.as_str(), p.state.as_str()), ("states", "a/b.tfstate"));
        assert_eq!(p.config.cache_dir, PathBuf::from("/x/cache"));
        let q = plan_of(&[("ref", "other"), ("state", "c.tfstate"), ("data-dir", "/y")], &e).unwrap();
        assert_eq!((q.config.branch.as_str(), q.state.as_str()), ("other", "c.tfstate"));
        assert_eq!(q.config.data_dir, PathBuf::from("/y"));
        assert_eq!(plan_of(&[], env(&[])).unwrap().state, DEFAULT_STATE);
        for c in [&p.credentials, &q.credentials] {
            assert_eq!((c.username.len(), c.password.len()), (32, 32));
            assert!(c.password.bytes().all(|b| b.is_ascii_hexdigit()));
        }
        assert_ne!(p.credentials.password, q.credentials.password);
        assert!(!format!("{p:?}").contains(&p.credentials.password));
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(plan_of(&[("state", "../x")], env(&[])).is_err());
        assert!(plan_of(&[("ref", "locks/x")], env(&[])).is_err());
        assert!(plan_of(&[("repository", "ftp://h/x")], env(&[])).is_err());
        assert!(plan_of(&[], env(&[("GITSTATE_AUTH", "nope")])).is_err());
    }

    #[test]
    fn only_the_one_time_pair_gets_in_and_git_credentials_go_to_the_host() {
        // GITSTATE_AUTH=env without GITSTATE_USERNAME would refuse to start under `serve`;
        // the wrapper brings its own backend auth.
        let e = env(&[
            ("GITSTATE_AUTH", "env"),
            ("GITSTATE_GIT_USERNAME", "git"),
            ("GITSTATE_GIT_PASSWORD", "token"),
            ("GITSTATE_USERNAME", "ignored"),
            ("GITSTATE_PASSWORD", "ignored"),
        ]);
        for (e, git) in [(Box::new(e) as Box<dyn Fn(&str) -> Option<String>>, Some("git")), (Box::new(env(&[])), None)]
        {
            let p = plan_of(&[], &*e).unwrap();
            let auth = crate::auth::Auth::from_config(&p.config).unwrap();
            let c = &p.credentials;
            assert_eq!(auth.authorize(&http::HeaderMap::new()), Err(crate::auth::AuthError::Missing));
            assert_eq!(auth.authorize(&basic("ignored", "ignored")), Err(crate::auth::AuthError::Wrong));
            assert_eq!(auth.authorize(&basic(&c.username, "wrong")), Err(crate::auth::AuthError::Wrong));
            let handed = auth.authorize(&basic(&c.username, &c.password)).unwrap();
            assert_eq!(handed.as_ref().map(|h| h.username.as_str()), git);
        }
    }

    #[test]
    fn address_and_environment() {
        assert_eq!(state_address(6061, "envs/prod/x.tfstate"), "http://127.0.0.1:6061/state/envs/prod/x.tfstate");
        assert_eq!(state_address(1, "a b/ü#?.tfstate"), "http://127.0.0.1:1/state/a%20b/%C3%BC%23%3F.tfstate");
        let c = Credentials { username: "u".into(), password: "p".into() };
        let vars = backend_environment("http://a", &c);
        let get = |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("TF_HTTP_LOCK_ADDRESS"), Some("http://a"));
        assert_eq!(get("TF_HTTP_UNLOCK_METHOD"), Some("UNLOCK"));
        assert_eq!((get("TF_HTTP_USERNAME"), get("TF_HTTP_PASSWORD")), (Some("u"), Some("p")));
    }
}
