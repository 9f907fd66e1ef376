//! Every setting of gitstate, read once from the environment (and, for
//! `gitstate serve`, from command-line flags that override it). README.md and
//! template.yaml list the same names.

use std::path::PathBuf;

use crate::storage::Credentials;

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
    pub repository: Option<String>,
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
    /// parameter must match (`*` matches within one path segment). Empty: only `repository`.
    pub allowed_repositories: Vec<String>,
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
        let mut c = Config { repository: get("GITSTATE_REPOSITORY"), ..Config::default() };
        if let Some(b) = get("GITSTATE_REF") {
            c.branch = b;
        }
        if let Some(d) = get("GITSTATE_CACHE_DIR") {
            c.cache_dir = d.into();
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
            c.allowed_repositories =
                list.split(',').map(str::trim).filter(|p| !p.is_empty()).map(String::from).collect();
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
        c.validate()?;
        Ok(c)
    }

    /// True when a caller may name `url` as its repository: the default repository, or a match of the allowlist.
    pub fn repository_allowed(&self, url: &str) -> bool {
        let url = normalize_url(url);
        self.repository.as_deref().is_some_and(|r| normalize_url(r) == url)
            || self.allowed_repositories.iter().any(|p| glob_match(&normalize_url(p), &url))
    }

    /// Checks that hold whatever the source of the settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !crate::protocol::path::is_valid_ref_component_path(&self.branch) {
            return Err(ConfigError { name: "GITSTATE_REF", reason: "not a valid branch name".into() });
        }
        if let Some(url) = &self.repository {
            if crate::storage::git::url_has_credentials(url) {
                return Err(ConfigError {
                    name: "GITSTATE_REPOSITORY",
                    reason: "must not embed credentials in the URL".into(),
                });
            }
        }
        Ok(())
    }
}

/// Equal repositories compare equal: no trailing slash, no `.git` suffix.
pub fn normalize_url(url: &str) -> String {
    let u = url.trim().trim_end_matches('/');
    u.strip_suffix(".git").unwrap_or(u).to_string()
}

/// `*` matches any run of characters other than `/`, so a pattern never reaches another host or a parent path.
fn glob_match(pattern: &str, text: &str) -> bool {
    fn go(p: &[u8], t: &[u8]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some((b'*', rest)) => {
                let mut i = 0;
                loop {
                    if go(rest, &t[i..]) {
                        return true;
                    }
                    if i == t.len() || t[i] == b'/' {
                        return false;
                    }
                    i += 1;
                }
            }
            Some((c, rest)) => t.first() == Some(c) && go(rest, &t[1..]),
        }
    }
    go(pattern.as_bytes(), text.as_bytes())
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
        let bad_ref = |k: &str| (k == "GITSTATE_REF").then(|| "a..b".to_string());
        assert!(Config::from_lookup(bad_ref).is_err());
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
        assert!(c.repository_allowed("https://git.example.com/team/states"));
        assert!(c.repository_allowed("https://git.example.com/team/states.git/"));
        assert!(c.repository_allowed("https://git.example.com/org/infra.git"));
        assert!(c.repository_allowed("git://127.0.0.1:9418/x.git"));
        assert!(!c.repository_allowed("https://git.example.com/org/a/b.git"));
        assert!(!c.repository_allowed("https://git.example.com.evil.net/org/x"));
        assert!(!c.repository_allowed("https://evil.net/org/x"));
        assert!(!c.repository_allowed("https://git.example.com/team/other"));
        assert!(!Config::default().repository_allowed("https://git.example.com/team/states"));
    }
}
