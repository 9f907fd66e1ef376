//! Every setting of gitstate, declared once in [`Settings`] (flag, environment variable, help)
//! and read once into a checked [`Config`] that `serve`, `run`, `doctor`, `decrypt` and the
//! Lambda entry all build from. The table of docs/configuration.md is checked against it.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory, FromArgMatches};

use crate::backend::sealing::SealingSettings;
use crate::storage::{Credentials, RepoUrl, UrlPattern};

/// Every setting, as given: a flag overrides its environment variable, an empty value counts as
/// unset, and [`Config::from_settings`] reads and checks them (so an error names the variable).
/// Defaults are stated in each help text and kept in [`Config::default`].
#[derive(Args, Clone, Default)]
#[command(next_help_heading = "Settings (each flag overrides its GITSTATE_* variable)")]
pub struct Settings {
    /// Git repository URL (git://, http://, https://), without credentials (default: an embedded
    /// bare repository in the data directory; required under Lambda)
    #[arg(long, env = "GITSTATE_REPOSITORY", value_name = "URL")]
    pub repository: Option<String>,
    /// Branch that holds the states (default: main)
    #[arg(long = "ref", env = "GITSTATE_REF", value_name = "BRANCH")]
    pub branch: Option<String>,
    /// Address `serve` listens on (default: 127.0.0.1:6061)
    #[arg(long, env = "GITSTATE_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Directory of the embedded repository (and, for `serve` and `run`, of the caches) (default: ./.gitstate)
    #[arg(long, env = "GITSTATE_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<String>,
    /// Bare cache repositories of remotes (default: /tmp/gitstate; `serve`, `run`: `<data dir>/cache`)
    #[arg(long, env = "GITSTATE_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<String>,
    /// `Name <email>` of every commit gitstate writes (default: `gitstate <gitstate@localhost>`)
    #[arg(long, env = "GITSTATE_COMMIT_AUTHOR", value_name = "AUTHOR")]
    pub commit_author: Option<String>,
    /// Largest request body in bytes, 413 above it (default: 67108864)
    #[arg(long, env = "GITSTATE_MAX_BODY_BYTES", value_name = "BYTES")]
    pub max_body_bytes: Option<String>,
    /// Pushes a write may make on a branch that keeps moving; 0: as many as the request's deadline allows (default: 0)
    #[arg(long, env = "GITSTATE_WRITE_RETRIES", value_name = "N")]
    pub write_retries: Option<String>,
    /// Comma-separated URL patterns a `repository` parameter must match (`*` within one path
    /// segment or host label) (default: only the configured repository)
    #[arg(long, env = "GITSTATE_ALLOWED_REPOSITORIES", value_name = "PATTERNS")]
    pub allowed_repositories: Option<String>,
    /// Where git credentials come from: passthrough, env or secret (default: passthrough)
    #[arg(long, env = "GITSTATE_AUTH", value_name = "MODE")]
    pub auth: Option<String>,
    /// In passthrough mode, the username a bearer token goes to the git host with (default: x-access-token)
    #[arg(long, env = "GITSTATE_BEARER_USERNAME", value_name = "NAME")]
    pub bearer_username: Option<String>,
    /// Git user name (`env` mode, `doctor`)
    #[arg(long, env = "GITSTATE_GIT_USERNAME", value_name = "NAME", hide_env_values = true)]
    pub git_username: Option<String>,
    /// Git password or token (`env` mode, `doctor`); prefer the variable: flags are visible to other users
    #[arg(long, env = "GITSTATE_GIT_PASSWORD", value_name = "TOKEN", hide_env_values = true)]
    pub git_password: Option<String>,
    /// `ssh://` repositories: the deployment's SSH private key (OpenSSH format), as text; prefer the variable or the file
    #[arg(long, env = "GITSTATE_SSH_KEY", value_name = "KEY", hide_env_values = true)]
    pub ssh_key: Option<String>,
    /// `ssh://` repositories: a file holding the deployment's SSH private key
    #[arg(long, env = "GITSTATE_SSH_KEY_FILE", value_name = "FILE")]
    pub ssh_key_file: Option<String>,
    /// known_hosts lines pinning the key of every SSH host the settings admit
    #[arg(long, env = "GITSTATE_SSH_KNOWN_HOSTS", value_name = "LINES")]
    pub ssh_known_hosts: Option<String>,
    /// Secrets Manager id of the git credentials (`secret` mode)
    #[arg(long, env = "GITSTATE_GIT_CREDENTIALS_SECRET", value_name = "ID")]
    pub git_credentials_secret: Option<String>,
    /// Basic-auth user the backend itself requires (required in `env` and `secret` modes)
    #[arg(long, env = "GITSTATE_USERNAME", value_name = "NAME", hide_env_values = true)]
    pub username: Option<String>,
    /// Basic-auth password the backend itself requires; prefer the variable: flags are visible to other users
    #[arg(long, env = "GITSTATE_PASSWORD", value_name = "PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Seconds a request may take under `serve` (Lambda: the invocation's deadline) (default: 25)
    #[arg(long, env = "GITSTATE_REQUEST_TIMEOUT", value_name = "SECONDS")]
    pub request_timeout: Option<String>,
    /// Repositories besides the default kept open (default: 16)
    #[arg(long, env = "GITSTATE_MAX_REPOSITORIES", value_name = "N")]
    pub max_repositories: Option<String>,
    /// Requests per repository worked on at once (default: 8)
    #[arg(long, env = "GITSTATE_REPOSITORY_CONCURRENCY", value_name = "N")]
    pub repository_concurrency: Option<String>,
    /// Requests on repositories other than the configured one worked on at once, all together (default: 64)
    #[arg(long, env = "GITSTATE_MAX_BLOCKING", value_name = "N")]
    pub max_blocking: Option<String>,
    /// Comma-separated age public keys every state is encrypted to
    #[arg(long, env = "GITSTATE_AGE_RECIPIENTS", value_name = "KEYS")]
    pub age_recipients: Option<String>,
    /// age secret keys that open stored states; prefer the variable or the file
    #[arg(long, env = "GITSTATE_AGE_IDENTITIES", value_name = "KEYS", hide_env_values = true)]
    pub age_identities: Option<String>,
    /// A file of age secret keys that open stored states
    #[arg(long, env = "GITSTATE_AGE_IDENTITY_FILE", value_name = "FILE")]
    pub age_identity_file: Option<String>,
    /// KMS key every state is sealed under
    #[arg(long, env = "GITSTATE_KMS_KEY_ID", value_name = "KEY")]
    pub kms_key_id: Option<String>,
    /// Further KMS key ids whose envelopes may be opened (rotation), comma-separated
    #[arg(long, env = "GITSTATE_KMS_DECRYPT_KEY_IDS", value_name = "KEYS")]
    pub kms_decrypt_key_ids: Option<String>,
    /// `serve`: open connections (default: 256)
    #[arg(long, env = "GITSTATE_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<String>,
    /// `serve`: bytes of request bodies held at once (default: 268435456)
    #[arg(long, env = "GITSTATE_BODY_MEMORY_BYTES", value_name = "BYTES")]
    pub body_memory_bytes: Option<String>,
    /// `serve`: seconds for a whole request head (also the idle keep-alive timeout) (default: 10)
    #[arg(long, env = "GITSTATE_HEADER_READ_TIMEOUT", value_name = "SECONDS")]
    pub header_read_timeout: Option<String>,
    /// `serve`: seconds for the whole body after its head (default: 30)
    #[arg(long, env = "GITSTATE_BODY_READ_TIMEOUT", value_name = "SECONDS")]
    pub body_read_timeout: Option<String>,
    /// `serve`: seconds an answer may go unread before the connection is dropped (default: 30)
    #[arg(long, env = "GITSTATE_WRITE_TIMEOUT", value_name = "SECONDS")]
    pub write_timeout: Option<String>,
    /// Log level or filter (tracing EnvFilter syntax); RUST_LOG when unset (default: info)
    #[arg(long, env = "GITSTATE_LOG", value_name = "FILTER")]
    pub log: Option<String>,
}

/// Only the settings, for parsing them without a subcommand.
#[derive(clap::Parser)]
#[command(name = "gitstate")]
struct SettingsOnly {
    #[command(flatten)]
    settings: Settings,
}

impl Settings {
    /// The settings of the process environment (no flags): the Lambda entry without a subcommand.
    pub fn from_env() -> Result<Self, ConfigError> {
        let matches = SettingsOnly::command().try_get_matches_from(["gitstate"]).map_err(ConfigError::unreadable)?;
        Ok(SettingsOnly::from_arg_matches(&matches).map_err(ConfigError::unreadable)?.settings)
    }

    /// The settings from `flags` (long name, value) over `env`, a stand-in for the environment,
    /// parsed as clap parses the command line: for tests and the benchmark.
    pub fn from_sources(flags: &[(&str, &str)], env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let declared = SettingsOnly::command();
        let mut argv = vec!["gitstate".to_string()];
        for arg in declared.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            let from_env = || arg.get_env().and_then(|name| env(name.to_str()?));
            if let Some(value) = flags.iter().find(|(n, _)| *n == long).map(|(_, v)| v.to_string()).or_else(from_env) {
                argv.push(format!("--{long}={value}"));
            }
        }
        let without_env = declared.mut_args(|a| a.env(None::<&'static str>));
        let matches = without_env.try_get_matches_from(argv).map_err(ConfigError::unreadable)?;
        Ok(SettingsOnly::from_arg_matches(&matches).map_err(ConfigError::unreadable)?.settings)
    }

    /// Every variable a setting is read from, in declaration order.
    pub fn variables() -> Vec<String> {
        SettingsOnly::command()
            .get_arguments()
            .filter_map(|a| a.get_env().map(|n| n.to_string_lossy().into_owned()))
            .collect()
    }

    /// The log filter: `GITSTATE_LOG`, else `RUST_LOG`, else `default`.
    pub fn log_filter(&self, default: &str) -> tracing_subscriber::EnvFilter {
        set(&self.log)
            .and_then(|f| tracing_subscriber::EnvFilter::try_new(f).ok())
            .or_else(|| tracing_subscriber::EnvFilter::try_from_default_env().ok())
            .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(default))
    }
}

/// A value that was given and is not empty.
fn set(value: &Option<String>) -> Option<&str> {
    value.as_deref().filter(|v| !v.is_empty())
}

/// Where the credentials for the git host come from (`GITSTATE_AUTH`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// The basic auth Terraform sends is handed to the git host; gitstate keeps no secret.
    Passthrough,
    /// `GITSTATE_GIT_USERNAME`/`GITSTATE_GIT_PASSWORD` (a workstation or CI).
    Env,
    /// A JSON secret in AWS Secrets Manager (`GITSTATE_GIT_CREDENTIALS_SECRET`), read once per process.
    Secret,
}

/// Settings shared by the Lambda entry and `gitstate serve`.
#[derive(Debug, Clone)]
pub struct Config {
    /// `GITSTATE_REPOSITORY`: URL of the default git repository. `None` means the
    /// embedded bare repository under `data_dir` (only for `gitstate serve`).
    pub repository: Option<RepoUrl>,
    /// `GITSTATE_REF`: branch that holds the states (default `main`).
    pub branch: String,
    /// `GITSTATE_CACHE_DIR`: where bare cache repositories of remotes live (default `/tmp/gitstate`).
    pub cache_dir: PathBuf,
    /// `GITSTATE_DATA_DIR`: home of the embedded repository for `serve` (default `./.gitstate`).
    pub data_dir: PathBuf,
    /// `GITSTATE_COMMIT_AUTHOR`: `Name <email>` of every commit gitstate writes.
    pub commit_author: (String, String),
    /// `GITSTATE_MAX_BODY_BYTES`: largest request body accepted (default 64 MiB).
    pub max_body_bytes: usize,
    /// `GITSTATE_ALLOWED_REPOSITORIES`: comma-separated URL patterns a `repository` query
    /// parameter must match (`*` matches within one path segment or host label). Empty: only `repository`.
    pub allowed_repositories: Vec<UrlPattern>,
    /// `GITSTATE_AUTH`: `passthrough` (default), `env` or `secret`.
    pub auth: AuthMode,
    /// `GITSTATE_GIT_USERNAME`/`GITSTATE_GIT_PASSWORD`: git credentials for `env` mode.
    pub git_credentials: Option<Credentials>,
    /// `GITSTATE_GIT_CREDENTIALS_SECRET`: Secrets Manager id for `secret` mode.
    pub git_credentials_secret: Option<String>,
    /// `GITSTATE_USERNAME`/`GITSTATE_PASSWORD`: basic auth the backend itself requires.
    pub backend_credentials: Option<Credentials>,
    /// `GITSTATE_WRITE_RETRIES`: pushes a write may make on a branch that keeps moving; 0 (the
    /// default): as many as the request's deadline allows (a count left writers of a busy
    /// repository failing while time remained).
    pub write_retries: u32,
    /// `GITSTATE_REQUEST_TIMEOUT`: seconds a request may take under `serve` (default 25); under
    /// Lambda the invocation's own deadline, less a margin, is used.
    pub request_timeout: Duration,
    /// `GITSTATE_MAX_REPOSITORIES`: repositories other than the default kept open (default 16);
    /// the least recently used one is closed and its cache deleted to make room.
    pub max_repositories: usize,
    /// `GITSTATE_REPOSITORY_CONCURRENCY`: requests per repository worked on at once (default 8);
    /// more wait, within their deadline, so one slow host cannot take every worker thread.
    pub repository_concurrency: usize,
    /// `GITSTATE_MAX_BLOCKING`: requests on repositories other than the configured one worked
    /// on at once, all of them together (default 64); more are answered 503 at once, so hosts
    /// that hang cannot take every thread. The configured repository keeps its own
    /// `GITSTATE_REPOSITORY_CONCURRENCY` in reserve.
    pub max_blocking: usize,
    /// `GITSTATE_BEARER_USERNAME`: in `passthrough` mode, an `Authorization: Bearer <token>`
    /// (OpenTofu 1.8+ sends one without a username) goes to the git host as basic auth with
    /// this username and the token as password (default `x-access-token`, which GitHub, GitLab
    /// and Gitea accept with a token).
    pub bearer_username: String,
    /// Encryption at rest: `GITSTATE_AGE_RECIPIENTS`, `GITSTATE_AGE_IDENTITIES` or
    /// `GITSTATE_AGE_IDENTITY_FILE`, `GITSTATE_KMS_KEY_ID`, `GITSTATE_KMS_DECRYPT_KEY_IDS`.
    pub sealing: SealingSettings,
    /// What `gitstate serve` lets callers hold (connections, body memory, timeouts).
    pub serve_limits: ServeLimits,
    /// `GITSTATE_LISTEN`: where `gitstate serve` listens (default `127.0.0.1:6061`).
    pub listen: std::net::SocketAddr,
    /// `ssh://` remotes: `GITSTATE_SSH_KEY` or `GITSTATE_SSH_KEY_FILE`, `GITSTATE_SSH_KNOWN_HOSTS`.
    pub ssh: SshSettings,
}

/// The deployment's SSH identity as configured (`env` mode; in `secret` mode the secret's
/// `ssh_private_key`/`ssh_known_hosts` fill what is not set here). Checked at start in
/// `auth.rs` (`ssh_identity`): every SSH host the settings admit needs a pinned key.
#[derive(Clone, Default)]
pub struct SshSettings {
    /// `GITSTATE_SSH_KEY` (the key's text) or `GITSTATE_SSH_KEY_FILE` (a path to it): an
    /// OpenSSH private key without passphrase (ed25519, ECDSA or RSA).
    pub private_key: Option<zeroize::Zeroizing<String>>,
    /// `GITSTATE_SSH_KNOWN_HOSTS`: known_hosts lines pinning the key of every SSH host
    /// (`github.com ssh-ed25519 AAAA…`, `[host]:2222 ssh-ed25519 AAAA…`).
    pub known_hosts: Option<String>,
}

impl std::fmt::Debug for SshSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshSettings")
            .field("private_key", &self.private_key.as_ref().map(|_| "<redacted>"))
            .field("known_hosts", &self.known_hosts.is_some())
            .finish()
    }
}

impl SshSettings {
    /// The one reading of the SSH settings.
    fn read(s: &Settings) -> Result<Self, ConfigError> {
        let private_key = match (set(&s.ssh_key), set(&s.ssh_key_file)) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "GITSTATE_SSH_KEY_FILE",
                    "set GITSTATE_SSH_KEY or GITSTATE_SSH_KEY_FILE, not both",
                ))
            }
            (Some(text), None) => Some(zeroize::Zeroizing::new(text.to_string())),
            (None, Some(path)) => Some(zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new("GITSTATE_SSH_KEY_FILE", format!("cannot read {path}: {}", e.kind()))
            })?)),
            (None, None) => None,
        };
        Ok(SshSettings { private_key, known_hosts: set(&s.ssh_known_hosts).map(String::from) })
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            repository: None,
            branch: "main".into(),
            cache_dir: PathBuf::from("/tmp/gitstate"),
            data_dir: PathBuf::from("./.gitstate"),
            commit_author: ("gitstate".into(), "gitstate@localhost".into()),
            max_body_bytes: 64 << 20,
            allowed_repositories: Vec::new(),
            auth: AuthMode::Passthrough,
            git_credentials: None,
            git_credentials_secret: None,
            backend_credentials: None,
            write_retries: 0,
            request_timeout: Duration::from_secs(25),
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 6061)),
            max_repositories: 16,
            repository_concurrency: 8,
            max_blocking: 64,
            bearer_username: "x-access-token".into(),
            serve_limits: ServeLimits::default(),
            sealing: SealingSettings::default(),
            ssh: SshSettings::default(),
        }
    }
}

/// What `gitstate serve` lets callers hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeLimits {
    /// `GITSTATE_MAX_CONNECTIONS` (default 256): open connections. When all are taken the
    /// accept loop waits, so new connections queue in the kernel's backlog rather than being
    /// refused: a legitimate client is served late instead of failing.
    pub max_connections: usize,
    /// `GITSTATE_BODY_MEMORY_BYTES` (default 256 MiB, never below `GITSTATE_MAX_BODY_BYTES`):
    /// request bodies held at once, from being read until their answer. A body reserves its
    /// `Content-Length` (a chunked one, the whole body limit) before its first byte is read,
    /// so memory stays bounded while small states still go through by the thousand.
    pub body_memory_bytes: usize,
    /// `GITSTATE_HEADER_READ_TIMEOUT` seconds (default 10): a connection must deliver a whole
    /// request head within this time of being opened or of its previous answer, so this is
    /// also the idle keep-alive timeout (hyper starts its clock when it waits for a request).
    pub header_read_timeout: Duration,
    /// `GITSTATE_BODY_READ_TIMEOUT` seconds (default 30): the whole body, including the wait
    /// for body memory, must arrive within this time of its head (a trickled body is cut off).
    pub body_read_timeout: Duration,
    /// `GITSTATE_WRITE_TIMEOUT` seconds (default 30): an answer the client stops reading for
    /// this long is dropped with its connection, instead of holding its memory for good.
    pub write_timeout: Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            max_connections: 256,
            body_memory_bytes: 256 << 20,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// A setting that could not be understood.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {name}: {reason}")]
pub struct ConfigError {
    pub name: &'static str,
    pub reason: String,
}

/// Which entry point reads the settings: where caches live by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Lambda (and tests): caches in `/tmp/gitstate`.
    Lambda,
    /// `serve` and `run`: caches under the data directory, beside the embedded repository.
    Local,
}

impl ConfigError {
    fn new(name: &'static str, reason: impl Into<String>) -> Self {
        ConfigError { name, reason: reason.into() }
    }

    fn unreadable(e: clap::Error) -> Self {
        ConfigError::new("settings", e.kind().to_string())
    }
}

impl Config {
    /// Read every setting from the process environment (no flags), as the Lambda entry does.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_settings(&Settings::from_env()?, Entry::Lambda)
    }

    /// Like [`Config::from_env`] over any lookup (tests and the benchmark use a map).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        Self::from_settings(&Settings::from_sources(&[], get)?, Entry::Lambda)
    }

    /// Read and check the settings: the one place a value becomes a setting.
    pub fn from_settings(s: &Settings, entry: Entry) -> Result<Self, ConfigError> {
        let d = Config::default();
        let data_dir = set(&s.data_dir).map_or(d.data_dir, PathBuf::from);
        let cache_dir = match (set(&s.cache_dir), entry) {
            (Some(dir), _) => PathBuf::from(dir),
            (None, Entry::Lambda) => d.cache_dir,
            (None, Entry::Local) => data_dir.join("cache"),
        };
        let c = Config {
            repository: set(&s.repository).map(parse_repository).transpose()?,
            branch: set(&s.branch).map_or(d.branch, String::from),
            cache_dir,
            data_dir,
            commit_author: match set(&s.commit_author) {
                Some(a) => parse_author(a)
                    .ok_or_else(|| ConfigError::new("GITSTATE_COMMIT_AUTHOR", "expected `Name <email>`"))?,
                None => d.commit_author,
            },
            max_body_bytes: parse_or(
                "GITSTATE_MAX_BODY_BYTES",
                &s.max_body_bytes,
                d.max_body_bytes,
                "expected a number of bytes",
            )?,
            allowed_repositories: set(&s.allowed_repositories).map_or(Ok(Vec::new()), parse_allowlist)?,
            auth: set(&s.auth).map_or(Ok(d.auth), str::parse)?,
            git_credentials: pair(
                ("GITSTATE_GIT_USERNAME", &s.git_username),
                ("GITSTATE_GIT_PASSWORD", &s.git_password),
            )?,
            git_credentials_secret: set(&s.git_credentials_secret).map(String::from),
            backend_credentials: pair(("GITSTATE_USERNAME", &s.username), ("GITSTATE_PASSWORD", &s.password))?,
            write_retries: parse_or("GITSTATE_WRITE_RETRIES", &s.write_retries, d.write_retries, "expected a number")?,
            request_timeout: seconds("GITSTATE_REQUEST_TIMEOUT", &s.request_timeout, 900.0)?
                .unwrap_or(d.request_timeout),
            max_repositories: count("GITSTATE_MAX_REPOSITORIES", &s.max_repositories)?.unwrap_or(d.max_repositories),
            repository_concurrency: count("GITSTATE_REPOSITORY_CONCURRENCY", &s.repository_concurrency)?
                .unwrap_or(d.repository_concurrency),
            max_blocking: count("GITSTATE_MAX_BLOCKING", &s.max_blocking)?.unwrap_or(d.max_blocking),
            bearer_username: set(&s.bearer_username).map_or(Ok(d.bearer_username), parse_bearer_username)?,
            sealing: read_sealing(s)?,
            serve_limits: read_serve_limits(s)?,
            listen: parse_or("GITSTATE_LISTEN", &s.listen, d.listen, "expected an address like 127.0.0.1:6061")?,
            ssh: SshSettings::read(s)?,
        };
        c.validate()?;
        Ok(c)
    }

    /// True when a caller may name `url` as its repository: the default repository, or a match of the allowlist.
    pub fn repository_allowed(&self, url: &RepoUrl) -> bool {
        self.repository.as_ref().is_some_and(|r| r.same_repository(url))
            || self.allowed_repositories.iter().any(|p| p.matches(url))
    }

    /// Checks that hold whatever the source of the settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        crate::protocol::path::check_branch(&self.branch)
            .map_err(|reason| ConfigError { name: "GITSTATE_REF", reason })?;
        // A mode that holds git credentials of its own hands them to whoever may call: only
        // callers who authenticate to the backend. (`secret` mode checks this once its secret is read.)
        if self.auth == AuthMode::Env && self.backend_credentials.is_none() {
            return Err(ConfigError {
                name: "GITSTATE_USERNAME",
                reason: "GITSTATE_AUTH=env holds git credentials of its own and requires backend basic auth: set GITSTATE_USERNAME and GITSTATE_PASSWORD".into(),
            });
        }
        if self.auth == AuthMode::Env && self.git_credentials.is_none() && self.ssh.private_key.is_none() {
            return Err(ConfigError {
                name: "GITSTATE_GIT_USERNAME",
                reason: "GITSTATE_AUTH=env needs GITSTATE_GIT_USERNAME and GITSTATE_GIT_PASSWORD (or, for ssh:// only, GITSTATE_SSH_KEY)".into(),
            });
        }
        Ok(())
    }
}

fn parse_repository(url: &str) -> Result<RepoUrl, ConfigError> {
    RepoUrl::parse(url).map_err(|e| ConfigError::new("GITSTATE_REPOSITORY", e.to_string()))
}

fn parse_author(s: &str) -> Option<(String, String)> {
    let (name, rest) = s.split_once('<')?;
    let email = rest.strip_suffix('>')?;
    let name = name.trim();
    (!name.is_empty() && !email.is_empty() && !email.contains(['<', '>', '\n']) && !name.contains('\n'))
        .then(|| (name.to_string(), email.to_string()))
}

fn parse_allowlist(list: &str) -> Result<Vec<UrlPattern>, ConfigError> {
    split_list(list)
        .map(|p| {
            UrlPattern::parse(p).map_err(|e| {
                ConfigError::new(
                    "GITSTATE_ALLOWED_REPOSITORIES",
                    format!("{}: {e}", crate::storage::url::redact_raw(p)),
                )
            })
        })
        .collect()
}

impl std::str::FromStr for AuthMode {
    type Err = ConfigError;

    fn from_str(mode: &str) -> Result<Self, ConfigError> {
        match mode {
            "passthrough" => Ok(AuthMode::Passthrough),
            "env" => Ok(AuthMode::Env),
            "secret" => Ok(AuthMode::Secret),
            _ => Err(ConfigError::new("GITSTATE_AUTH", "expected passthrough, env or secret")),
        }
    }
}

fn parse_bearer_username(name: &str) -> Result<String, ConfigError> {
    if name.contains(':') || name.chars().any(char::is_control) {
        return Err(ConfigError::new("GITSTATE_BEARER_USERNAME", "no `:` or control characters"));
    }
    Ok(name.to_string())
}

/// A user and a password set together, or neither.
fn pair(
    (user, username): (&'static str, &Option<String>),
    (pass, password): (&'static str, &Option<String>),
) -> Result<Option<Credentials>, ConfigError> {
    match (set(username), set(password)) {
        (Some(username), Some(password)) => {
            Ok(Some(Credentials { username: username.to_string(), password: password.to_string() }))
        }
        (None, None) => Ok(None),
        _ => Err(ConfigError::new(user, format!("set both {user} and {pass}, or neither"))),
    }
}

/// Comma-separated items, trimmed, empty ones dropped.
fn split_list(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').map(str::trim).filter(|x| !x.is_empty())
}

fn parse_or<T: std::str::FromStr>(
    name: &'static str,
    value: &Option<String>,
    default: T,
    expected: &str,
) -> Result<T, ConfigError> {
    match set(value) {
        Some(v) => v.trim().parse().map_err(|_| ConfigError::new(name, expected)),
        None => Ok(default),
    }
}

/// A whole number above 0.
fn count(name: &'static str, value: &Option<String>) -> Result<Option<usize>, ConfigError> {
    set(value)
        .map(|v| {
            v.trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| ConfigError::new(name, "expected a whole number above 0"))
        })
        .transpose()
}

/// Seconds above 0 and at most `max`.
fn seconds(name: &'static str, value: &Option<String>, max: f64) -> Result<Option<Duration>, ConfigError> {
    set(value)
        .map(|v| {
            v.trim()
                .parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s > 0.0 && *s <= max)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| ConfigError::new(name, format!("expected seconds, above 0 and at most {max}")))
        })
        .transpose()
}

fn read_sealing(s: &Settings) -> Result<SealingSettings, ConfigError> {
    let list = |v: &Option<String>| set(v).map(|l| split_list(l).map(String::from).collect()).unwrap_or_default();
    let age_identities = match (set(&s.age_identities), set(&s.age_identity_file)) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(
                "GITSTATE_AGE_IDENTITY_FILE",
                "set GITSTATE_AGE_IDENTITIES or GITSTATE_AGE_IDENTITY_FILE, not both",
            ))
        }
        (Some(text), None) => Some(zeroize::Zeroizing::new(text.to_string())),
        (None, Some(path)) => Some(zeroize::Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| ConfigError::new("GITSTATE_AGE_IDENTITY_FILE", format!("cannot read {path}: {e}")))?,
        )),
        (None, None) => None,
    };
    Ok(SealingSettings {
        age_recipients: list(&s.age_recipients),
        age_identities,
        kms_key_id: set(&s.kms_key_id).map(String::from),
        kms_decrypt_key_ids: list(&s.kms_decrypt_key_ids),
    })
}

fn read_serve_limits(s: &Settings) -> Result<ServeLimits, ConfigError> {
    let d = ServeLimits::default();
    Ok(ServeLimits {
        // Far above any file descriptor limit; keeps the semaphore within its maximum.
        max_connections: count("GITSTATE_MAX_CONNECTIONS", &s.max_connections)?
            .map_or(d.max_connections, |n| n.min(1 << 20)),
        body_memory_bytes: count("GITSTATE_BODY_MEMORY_BYTES", &s.body_memory_bytes)?.unwrap_or(d.body_memory_bytes),
        header_read_timeout: seconds("GITSTATE_HEADER_READ_TIMEOUT", &s.header_read_timeout, 3600.0)?
            .unwrap_or(d.header_read_timeout),
        body_read_timeout: seconds("GITSTATE_BODY_READ_TIMEOUT", &s.body_read_timeout, 3600.0)?
            .unwrap_or(d.body_read_timeout),
        write_timeout: seconds("GITSTATE_WRITE_TIMEOUT", &s.write_timeout, 3600.0)?.unwrap_or(d.write_timeout),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_overrides_and_rejects_bad_author() {
        let env = |k: &str| match k {
            "GITSTATE_REF" => Some("states".to_string()),
            "GITSTATE_COMMIT_AUTHOR" => Some("Robot <robot@example.com>".to_string()),
            _ => None,
        };
        let c = Config::from_lookup(env).unwrap();
        assert_eq!(c.branch, "states");
        assert_eq!(c.commit_author, ("Robot".to_string(), "robot@example.com".to_string()));
        let bad = |k: &str| (k == "GITSTATE_COMMIT_AUTHOR").then(|| "nobody".to_string());
        assert!(Config::from_lookup(bad).is_err());
        for branch in ["a..b", "locks", "locks/main"] {
            let bad_ref = |k: &str| (k == "GITSTATE_REF").then(|| branch.to_string());
            assert!(Config::from_lookup(bad_ref).is_err(), "{branch}");
        }
    }

    #[test]
    fn serve_limits_default_and_override() {
        assert_eq!(Config::from_lookup(|_| None).unwrap().serve_limits, ServeLimits::default());
        let vars = [
            ("GITSTATE_MAX_CONNECTIONS", "8"),
            ("GITSTATE_BODY_MEMORY_BYTES", "1048576"),
            ("GITSTATE_HEADER_READ_TIMEOUT", "2.5"),
            ("GITSTATE_BODY_READ_TIMEOUT", "3"),
            ("GITSTATE_WRITE_TIMEOUT", "4"),
        ];
        let c = Config::from_lookup(|name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())).unwrap();
        assert_eq!(
            c.serve_limits,
            ServeLimits {
                max_connections: 8,
                body_memory_bytes: 1 << 20,
                header_read_timeout: Duration::from_millis(2500),
                body_read_timeout: Duration::from_secs(3),
                write_timeout: Duration::from_secs(4),
            }
        );
    }

    #[test]
    fn modes_holding_credentials_refuse_to_start_without_backend_auth() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        let no_auth = Config::from_lookup(env(&[
            ("GITSTATE_AUTH", "env"),
            ("GITSTATE_GIT_USERNAME", "git"),
            ("GITSTATE_GIT_PASSWORD", "token"),
        ]));
        let e = no_auth.unwrap_err();
        assert!(e.to_string().contains("GITSTATE_USERNAME") && !e.to_string().contains("token"), "{e}");
        assert!(
            Config::from_lookup(env(&[
                ("GITSTATE_AUTH", "env"),
                ("GITSTATE_USERNAME", "u"),
                ("GITSTATE_PASSWORD", "p")
            ]))
            .is_err(),
            "env mode without git credentials"
        );
        assert!(Config::from_lookup(env(&[
            ("GITSTATE_AUTH", "env"),
            ("GITSTATE_GIT_USERNAME", "git"),
            ("GITSTATE_GIT_PASSWORD", "token"),
            ("GITSTATE_USERNAME", "u"),
            ("GITSTATE_PASSWORD", "p"),
        ]))
        .is_ok());
    }

    #[test]
    fn ssh_settings_are_read_once_and_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "KEY-FROM-FILE").unwrap();
        let path = file.display().to_string();
        let from = |pairs: Vec<(&'static str, String)>| {
            let settings =
                Settings::from_sources(&[], move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()))?;
            SshSettings::read(&settings)
        };
        let s = from(vec![
            ("GITSTATE_SSH_KEY_FILE", path.clone()),
            ("GITSTATE_SSH_KNOWN_HOSTS", "h ssh-ed25519 AAAA".into()),
        ])
        .unwrap();
        assert_eq!(s.private_key.as_deref().map(String::as_str), Some("KEY-FROM-FILE"));
        assert_eq!(s.known_hosts.as_deref(), Some("h ssh-ed25519 AAAA"));
        assert!(!format!("{s:?}").contains("KEY-FROM-FILE"));
        let s = from(vec![("GITSTATE_SSH_KEY", "KEY-TEXT".into())]).unwrap();
        assert_eq!(s.private_key.as_deref().map(String::as_str), Some("KEY-TEXT"));
        assert!(from(vec![("GITSTATE_SSH_KEY", "a".into()), ("GITSTATE_SSH_KEY_FILE", path)]).is_err(), "not both");
        let missing = from(vec![("GITSTATE_SSH_KEY_FILE", "/nonexistent/key".into())]).unwrap_err();
        assert_eq!(missing.name, "GITSTATE_SSH_KEY_FILE");
        // env mode with an SSH key needs no HTTP git credentials.
        let env = |k: &str| match k {
            "GITSTATE_AUTH" => Some("env".to_string()),
            "GITSTATE_USERNAME" | "GITSTATE_PASSWORD" => Some("x".to_string()),
            "GITSTATE_SSH_KEY" => Some("k".to_string()),
            _ => None,
        };
        assert!(Config::from_lookup(env).is_ok());
    }

    #[test]
    fn allowlist() {
        let env = |k: &str| match k {
            "GITSTATE_REPOSITORY" => Some("https://git.example.com/team/states.git".to_string()),
            "GITSTATE_ALLOWED_REPOSITORIES" => {
                Some("https://git.example.com/org/*, git://127.0.0.1:9418/*.git".to_string())
            }
            _ => None,
        };
        let c = Config::from_lookup(env).unwrap();
        let allowed = |s: &str| c.repository_allowed(&RepoUrl::parse(s).unwrap());
        assert!(allowed("https://git.example.com/team/states"));
        assert!(allowed("https://git.example.com/team/states.git"));
        assert!(allowed("https://git.example.com/org/infra.git"));
        assert!(allowed("git://127.0.0.1:9418/x.git"));
        assert!(allowed("git://127.0.0.1/x.git"), "9418 is git's default port");
        assert!(!allowed("https://git.example.com/org/a/b.git"));
        assert!(!allowed("https://git.example.com.evil.net/org/x"));
        assert!(!allowed("https://evil.net/org/x"));
        assert!(!allowed("https://git.example.com/team/other"));
        assert!(!Config::default().repository_allowed(&RepoUrl::parse("https://git.example.com/team/states").unwrap()));
        // Settings that cannot be read refuse to start.
        for (k, v) in [
            ("GITSTATE_REPOSITORY", "https://u:p@h/x"),
            ("GITSTATE_REPOSITORY", "file:///tmp/x"),
            ("GITSTATE_ALLOWED_REPOSITORIES", "https://h/a**"),
            ("GITSTATE_REQUEST_TIMEOUT", "0"),
            ("GITSTATE_REQUEST_TIMEOUT", "soon"),
            ("GITSTATE_MAX_CONNECTIONS", "0"),
            ("GITSTATE_MAX_CONNECTIONS", "-1"),
            ("GITSTATE_BODY_MEMORY_BYTES", "lots"),
            ("GITSTATE_HEADER_READ_TIMEOUT", "0"),
            ("GITSTATE_BODY_READ_TIMEOUT", "inf"),
            ("GITSTATE_WRITE_TIMEOUT", "NaN"),
            ("GITSTATE_WRITE_TIMEOUT", "1e9"),
        ] {
            assert!(Config::from_lookup(|name| (name == k).then(|| v.to_string())).is_err(), "{k}={v}");
        }
    }
}
