//! Every setting of gitstate, read once from the environment (and, for
//! `gitstate serve`, from command-line flags that override it). README.md and
//! template.yaml list the same names.

use std::path::PathBuf;
use std::time::Duration;

use crate::backend::sealing::SealingSettings;
use crate::storage::{Credentials, RepoUrl, UrlPattern};

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
    /// `GITSTATE_WRITE_RETRIES`: how often a write that lost the race for the branch is rebuilt (default 16:
    /// 8 left some of 16 concurrent writers on one repository without a turn).
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
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let private_key = match (get("GITSTATE_SSH_KEY"), get("GITSTATE_SSH_KEY_FILE")) {
            (Some(_), Some(_)) => {
                return Err(ConfigError {
                    name: "GITSTATE_SSH_KEY_FILE",
                    reason: "set GITSTATE_SSH_KEY or GITSTATE_SSH_KEY_FILE, not both".into(),
                })
            }
            (Some(text), None) => Some(zeroize::Zeroizing::new(text)),
            (None, Some(path)) => Some(zeroize::Zeroizing::new(std::fs::read_to_string(&path).map_err(|e| {
                ConfigError { name: "GITSTATE_SSH_KEY_FILE", reason: format!("cannot read {path}: {}", e.kind()) }
            })?)),
            (None, None) => None,
        };
        Ok(SshSettings { private_key, known_hosts: get("GITSTATE_SSH_KNOWN_HOSTS") })
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
            write_retries: 16,
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

impl Config {
    /// Read every `GITSTATE_*` variable, falling back to the defaults.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    /// Like [`Config::from_env`] over any lookup (tests use a map).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut c = Config::default();
        if let Some(url) = get("GITSTATE_REPOSITORY") {
            c.repository = Some(parse_repository(&url)?);
        }
        if let Some(b) = get("GITSTATE_REF") {
            c.branch = b;
        }
        if let Some(d) = get("GITSTATE_CACHE_DIR") {
            c.cache_dir = d.into();
        }
        if let Some(l) = get("GITSTATE_LISTEN") {
            c.listen = l.parse().map_err(|_| ConfigError {
                name: "GITSTATE_LISTEN",
                reason: "expected an address like 127.0.0.1:6061".into(),
            })?;
        }
        if let Some(d) = get("GITSTATE_DATA_DIR") {
            c.data_dir = d.into();
        }
        if let Some(a) = get("GITSTATE_COMMIT_AUTHOR") {
            c.commit_author = parse_author(&a).ok_or_else(|| ConfigError {
                name: "GITSTATE_COMMIT_AUTHOR",
                reason: "expected `Name <email>`".into(),
            })?;
        }
        if let Some(n) = get("GITSTATE_MAX_BODY_BYTES") {
            c.max_body_bytes = n.parse().map_err(|_| ConfigError {
                name: "GITSTATE_MAX_BODY_BYTES",
                reason: "expected a number of bytes".into(),
            })?;
        }
        if let Some(list) = get("GITSTATE_ALLOWED_REPOSITORIES") {
            c.allowed_repositories = list
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|p| {
                    UrlPattern::parse(p).map_err(|e| ConfigError {
                        name: "GITSTATE_ALLOWED_REPOSITORIES",
                        reason: format!("{}: {e}", crate::storage::url::redact_raw(p)),
                    })
                })
                .collect::<Result<_, _>>()?;
        }
        c.auth = match get("GITSTATE_AUTH").as_deref() {
            None | Some("passthrough") => AuthMode::Passthrough,
            Some("env") => AuthMode::Env,
            Some("secret") => AuthMode::Secret,
            Some(_) => {
                return Err(ConfigError { name: "GITSTATE_AUTH", reason: "expected passthrough, env or secret".into() })
            }
        };
        let pair = |user: &'static str, pass: &'static str| -> Result<Option<Credentials>, ConfigError> {
            match (get(user), get(pass)) {
                (Some(username), Some(password)) => Ok(Some(Credentials { username, password })),
                (None, None) => Ok(None),
                _ => Err(ConfigError { name: user, reason: format!("set both {user} and {pass}, or neither") }),
            }
        };
        c.git_credentials = pair("GITSTATE_GIT_USERNAME", "GITSTATE_GIT_PASSWORD")?;
        c.backend_credentials = pair("GITSTATE_USERNAME", "GITSTATE_PASSWORD")?;
        c.git_credentials_secret = get("GITSTATE_GIT_CREDENTIALS_SECRET");
        if let Some(n) = get("GITSTATE_WRITE_RETRIES") {
            c.write_retries = n
                .parse()
                .map_err(|_| ConfigError { name: "GITSTATE_WRITE_RETRIES", reason: "expected a number".into() })?;
        }
        let count = |name: &'static str| -> Result<Option<usize>, ConfigError> {
            get(name)
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or(ConfigError { name, reason: "expected a whole number above 0".into() })
                })
                .transpose()
        };
        let seconds = |name: &'static str, max: f64| -> Result<Option<Duration>, ConfigError> {
            get(name)
                .map(|v| {
                    v.trim()
                        .parse::<f64>()
                        .ok()
                        .filter(|s| s.is_finite() && *s > 0.0 && *s <= max)
                        .map(Duration::from_secs_f64)
                        .ok_or(ConfigError { name, reason: format!("expected seconds, above 0 and at most {max}") })
                })
                .transpose()
        };
        if let Some(n) = count("GITSTATE_MAX_REPOSITORIES")? {
            c.max_repositories = n;
        }
        if let Some(n) = count("GITSTATE_REPOSITORY_CONCURRENCY")? {
            c.repository_concurrency = n;
        }
        if let Some(n) = count("GITSTATE_MAX_BLOCKING")? {
            c.max_blocking = n;
        }
        if let Some(name) = get("GITSTATE_BEARER_USERNAME").filter(|n| !n.is_empty()) {
            if name.contains(':') || name.chars().any(char::is_control) {
                return Err(ConfigError {
                    name: "GITSTATE_BEARER_USERNAME",
                    reason: "no `:` or control characters".into(),
                });
            }
            c.bearer_username = name;
        }
        if let Some(d) = seconds("GITSTATE_REQUEST_TIMEOUT", 900.0)? {
            c.request_timeout = d;
        }
        let list =
            |v: String| v.split(',').map(str::trim).filter(|x| !x.is_empty()).map(String::from).collect::<Vec<_>>();
        c.sealing.age_recipients = get("GITSTATE_AGE_RECIPIENTS").map(list).unwrap_or_default();
        c.sealing.age_identities = match (get("GITSTATE_AGE_IDENTITIES"), get("GITSTATE_AGE_IDENTITY_FILE")) {
            (Some(_), Some(_)) => {
                return Err(ConfigError {
                    name: "GITSTATE_AGE_IDENTITY_FILE",
                    reason: "set GITSTATE_AGE_IDENTITIES or GITSTATE_AGE_IDENTITY_FILE, not both".into(),
                })
            }
            (Some(text), None) => Some(zeroize::Zeroizing::new(text)),
            (None, Some(path)) => Some(zeroize::Zeroizing::new(std::fs::read_to_string(&path).map_err(|e| {
                ConfigError { name: "GITSTATE_AGE_IDENTITY_FILE", reason: format!("cannot read {path}: {e}") }
            })?)),
            (None, None) => None,
        };
        c.sealing.kms_key_id = get("GITSTATE_KMS_KEY_ID");
        c.sealing.kms_decrypt_key_ids = get("GITSTATE_KMS_DECRYPT_KEY_IDS").map(list).unwrap_or_default();
        let l = &mut c.serve_limits;
        if let Some(n) = count("GITSTATE_MAX_CONNECTIONS")? {
            // Far above any file descriptor limit; keeps the semaphore within its maximum.
            l.max_connections = n.min(1 << 20);
        }
        if let Some(n) = count("GITSTATE_BODY_MEMORY_BYTES")? {
            l.body_memory_bytes = n;
        }
        if let Some(d) = seconds("GITSTATE_HEADER_READ_TIMEOUT", 3600.0)? {
            l.header_read_timeout = d;
        }
        if let Some(d) = seconds("GITSTATE_BODY_READ_TIMEOUT", 3600.0)? {
            l.body_read_timeout = d;
        }
        if let Some(d) = seconds("GITSTATE_WRITE_TIMEOUT", 3600.0)? {
            l.write_timeout = d;
        }
        c.ssh = SshSettings::from_lookup(&get)?;
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
    RepoUrl::parse(url).map_err(|e| ConfigError { name: "GITSTATE_REPOSITORY", reason: e.to_string() })
}

fn parse_author(s: &str) -> Option<(String, String)> {
    let (name, rest) = s.split_once('<')?;
    let email = rest.strip_suffix('>')?;
    let name = name.trim();
    (!name.is_empty() && !email.is_empty() && !email.contains(['<', '>', '\n']) && !name.contains('\n'))
        .then(|| (name.to_string(), email.to_string()))
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
            SshSettings::from_lookup(move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()))
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
