//! Who may call the backend, and which credentials reach the git host. Modes
//! (`GITSTATE_AUTH`): `passthrough` hands Terraform's basic auth to the git host;
//! `env` and `secret` use credentials of the deployment and require backend basic auth.

use base64::Engine as _;
use http::HeaderMap;
use subtle::ConstantTimeEq;

use std::sync::Arc;

use crate::config::{AuthMode, Config};
use crate::context::SshIdentity;
use crate::storage::url::Scheme;
use crate::storage::Credentials;

/// Why a caller was not let in. Statuses are assigned in `crate::error`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("this backend requires basic auth")]
    Missing,
    #[error("wrong username or password")]
    Wrong,
    #[error("the Authorization header is not valid basic auth")]
    Malformed,
    /// A bearer token where the backend's own basic auth is required (`env`, `secret`).
    #[error("this backend requires basic auth; a bearer token is only handed on to the git host in passthrough mode")]
    BearerNotAccepted,
}

/// Credentials could not be loaded at start-up.
#[derive(Debug, thiserror::Error)]
#[error("cannot load credentials: {0}")]
pub struct LoadError(pub String);

/// The access rules of one process.
pub struct Auth {
    mode: AuthMode,
    /// The username a bearer token goes to the git host with (passthrough).
    bearer_username: String,
    /// Basic auth the backend itself requires, if any.
    backend: Option<Credentials>,
    /// Credentials for the git host (`env`, `secret`).
    git: Option<Credentials>,
    /// `secret` mode: age identities from the secret's `age_identities` field.
    age_identities: Option<zeroize::Zeroizing<String>>,
    /// The deployment's SSH identity for `ssh://` remotes (`env`, `secret`).
    ssh: Option<Arc<SshIdentity>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").field("mode", &self.mode).field("backend_auth", &self.backend.is_some()).finish()
    }
}

#[derive(serde::Deserialize)]
struct SecretJson {
    username: Option<String>,
    password: Option<String>,
    backend_username: Option<String>,
    backend_password: Option<String>,
    /// age identities that open stored states (encryption at rest), when they live in the secret.
    age_identities: Option<String>,
    /// The deployment's SSH private key (OpenSSH format) for `ssh://` remotes.
    ssh_private_key: Option<String>,
    /// known_hosts lines pinning the key of every SSH host.
    ssh_known_hosts: Option<String>,
}

/// The SSH identity a deployment uses, checked at start: the key and known hosts read, and
/// every SSH host the settings admit (the repository, each `ssh://` allowlist entry) has a
/// pinned key. `ssh://` in passthrough mode, and SSH settings there, are refused: a caller's
/// basic auth is never an SSH password. Key and known hosts come from the settings, or else
/// from the secret (`secret`).
pub fn ssh_identity(
    config: &Config,
    secret_key: Option<String>,
    secret_known_hosts: Option<String>,
) -> Result<Option<Arc<SshIdentity>>, LoadError> {
    let mut hosts: Vec<(String, u16)> = Vec::new();
    if let Some(url) = config.repository.as_ref().filter(|u| u.scheme() == Scheme::Ssh) {
        hosts.push((url.host().to_owned(), url.port()));
    }
    for pattern in config.allowed_repositories.iter().filter(|p| p.scheme() == Scheme::Ssh) {
        let Some(host) = pattern.exact_host() else {
            return Err(LoadError(format!(
                "GITSTATE_ALLOWED_REPOSITORIES: {pattern}: an ssh:// entry must name its host exactly (each SSH host needs its pinned key)"
            )));
        };
        hosts.push(host);
    }
    let private_key = config.ssh.private_key.clone().or(secret_key.map(zeroize::Zeroizing::new));
    let known_hosts = config.ssh.known_hosts.clone().or(secret_known_hosts);
    if config.auth == AuthMode::Passthrough {
        if !hosts.is_empty() {
            return Err(LoadError(
                "ssh:// repositories need GITSTATE_AUTH=env or secret with the deployment's SSH key: \
                 in passthrough mode a caller's basic auth is never used as an SSH credential"
                    .into(),
            ));
        }
        if private_key.is_some() || known_hosts.is_some() {
            return Err(LoadError(
                "GITSTATE_SSH_KEY/GITSTATE_SSH_KNOWN_HOSTS are used only with GITSTATE_AUTH=env or secret".into(),
            ));
        }
        return Ok(None);
    }
    let Some(private_key) = private_key else {
        if hosts.is_empty() {
            return Ok(None);
        }
        return Err(LoadError(
            "ssh:// repositories need the deployment's SSH key: GITSTATE_SSH_KEY, GITSTATE_SSH_KEY_FILE or the secret's ssh_private_key".into(),
        ));
    };
    let identity = SshIdentity { private_key, known_hosts: known_hosts.unwrap_or_default() };
    let known = crate::storage::git::ssh::check_identity(&identity).map_err(LoadError)?;
    for (host, port) in &hosts {
        if crate::storage::git::ssh::pinned_for(&known, host, *port).is_empty() {
            return Err(LoadError(format!(
                "no host key pinned for {host} port {port}: add its known_hosts line to GITSTATE_SSH_KNOWN_HOSTS \
                 (or the secret's ssh_known_hosts); gitstate does not trust a host on first use"
            )));
        }
    }
    Ok(Some(Arc::new(identity)))
}

impl Auth {
    /// Rules for `passthrough` and `env` (no network needed). `secret` mode needs [`Auth::load`].
    pub fn from_config(config: &Config) -> Result<Self, LoadError> {
        let backend = config.backend_credentials.clone();
        match config.auth {
            AuthMode::Passthrough => {
                if backend.is_some() {
                    return Err(LoadError(
                        "GITSTATE_USERNAME/GITSTATE_PASSWORD cannot be used with GITSTATE_AUTH=passthrough: \
                         the basic auth Terraform sends is the git host's"
                            .into(),
                    ));
                }
                Ok(Auth {
                    mode: AuthMode::Passthrough,
                    bearer_username: config.bearer_username.clone(),
                    backend: None,
                    git: None,
                    age_identities: None,
                    ssh: ssh_identity(config, None, None)?,
                })
            }
            AuthMode::Env => Ok(Auth {
                mode: AuthMode::Env,
                bearer_username: config.bearer_username.clone(),
                backend,
                git: config.git_credentials.clone(),
                age_identities: None,
                ssh: ssh_identity(config, None, None)?,
            }),
            AuthMode::Secret => Err(LoadError("secret mode loads its credentials with Auth::load".into())),
        }
    }

    /// Rules for any mode; in `secret` mode, reads the secret once from AWS Secrets Manager
    /// with the process's one AWS configuration `sdk`.
    pub async fn load(config: &Config, sdk: Option<&aws_config::SdkConfig>) -> Result<Self, LoadError> {
        if config.auth != AuthMode::Secret {
            return Self::from_config(config);
        }
        let id = config
            .git_credentials_secret
            .as_deref()
            .ok_or_else(|| LoadError("GITSTATE_AUTH=secret needs GITSTATE_GIT_CREDENTIALS_SECRET".into()))?;
        let sdk = sdk.ok_or_else(|| LoadError("secret mode needs the AWS configuration".into()))?;
        let client = aws_sdk_secretsmanager::Client::new(sdk);
        let out = client.get_secret_value().secret_id(id).send().await.map_err(|e| {
            LoadError(format!("reading secret {id}: {}", aws_sdk_secretsmanager::error::DisplayErrorContext(&e)))
        })?;
        let text = out.secret_string().ok_or_else(|| LoadError(format!("secret {id} has no string value")))?;
        // Parse errors must not echo the secret's text.
        let json: SecretJson = serde_json::from_str(text)
            .map_err(|_| LoadError(format!("secret {id} is not a JSON object with username and password")))?;
        let git = match (json.username, json.password) {
            (Some(username), Some(password)) => Some(Credentials { username, password }),
            // A secret for ssh:// remotes only needs no HTTP credentials.
            (None, None) if json.ssh_private_key.is_some() => None,
            _ => return Err(LoadError(format!("secret {id} lacks username or password"))),
        };
        let ssh = ssh_identity(config, json.ssh_private_key, json.ssh_known_hosts)?;
        let backend = config.backend_credentials.clone().or(match (json.backend_username, json.backend_password) {
            (Some(username), Some(password)) => Some(Credentials { username, password }),
            _ => None,
        });
        if backend.is_none() {
            return Err(LoadError(
                "GITSTATE_AUTH=secret requires backend basic auth: set GITSTATE_USERNAME/GITSTATE_PASSWORD \
                 or backend_username/backend_password in the secret"
                    .into(),
            ));
        }
        tracing::info!("git credentials loaded from Secrets Manager");
        Ok(Auth {
            mode: AuthMode::Secret,
            bearer_username: config.bearer_username.clone(),
            backend,
            git,
            age_identities: json.age_identities.map(zeroize::Zeroizing::new),
            ssh,
        })
    }

    /// The deployment's SSH identity (`env`, `secret`), for `ssh://` remotes.
    pub fn ssh(&self) -> Option<Arc<SshIdentity>> {
        self.ssh.clone()
    }

    /// age identities read from the secret, if it holds any.
    pub fn age_identities(&self) -> Option<&zeroize::Zeroizing<String>> {
        self.age_identities.as_ref()
    }

    /// Let the request in or not; the answer is the credentials to use for the git host.
    pub fn authorize(&self, headers: &HeaderMap) -> Result<Option<Credentials>, AuthError> {
        let sent = match sent_credentials(headers)? {
            Sent::Basic(c) => c,
            // In passthrough a token is the git host's: as basic auth with a fixed username.
            Sent::Bearer(token) if self.mode == AuthMode::Passthrough => {
                Some(Credentials { username: self.bearer_username.clone(), password: token })
            }
            Sent::Bearer(_) => return Err(AuthError::BearerNotAccepted),
        };
        if let Some(expected) = &self.backend {
            let sent = sent.as_ref().ok_or(AuthError::Missing)?;
            // Compare both fields in full whatever the first gives, so timing tells nothing.
            let user_ok = sent.username.as_bytes().ct_eq(expected.username.as_bytes());
            let pass_ok = sent.password.as_bytes().ct_eq(expected.password.as_bytes());
            if !bool::from(user_ok & pass_ok) {
                return Err(AuthError::Wrong);
            }
        }
        Ok(match self.mode {
            AuthMode::Passthrough => sent,
            AuthMode::Env | AuthMode::Secret => self.git.clone(),
        })
    }
}

/// Who a request says it is, for a log line: the username of its basic auth (never the
/// password), `bearer token` for a token, `None` when it sent no credentials.
pub fn caller_name(headers: &HeaderMap) -> Option<String> {
    match sent_credentials(headers) {
        Ok(Sent::Basic(Some(c))) => Some(c.username),
        Ok(Sent::Bearer(_)) => Some("bearer token".into()),
        _ => None,
    }
}

/// The `Authorization: Basic` credentials of a request, if it sent any.
/// What an `Authorization` header carries.
enum Sent {
    Basic(Option<Credentials>),
    Bearer(String),
}

fn sent_credentials(headers: &HeaderMap) -> Result<Sent, AuthError> {
    let Some(value) = headers.get(http::header::AUTHORIZATION) else { return Ok(Sent::Basic(None)) };
    let value = value.to_str().map_err(|_| AuthError::Malformed)?;
    let (scheme, rest) = value.trim().split_once(' ').ok_or(AuthError::Malformed)?;
    if scheme.eq_ignore_ascii_case("bearer") {
        let token = rest.trim();
        if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(AuthError::Malformed);
        }
        return Ok(Sent::Bearer(token.to_owned()));
    }
    basic_auth(scheme, rest).map(Sent::Basic)
}

fn basic_auth(scheme: &str, encoded: &str) -> Result<Option<Credentials>, AuthError> {
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(AuthError::Malformed);
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).map_err(|_| AuthError::Malformed)?;
    let text = String::from_utf8(decoded).map_err(|_| AuthError::Malformed)?;
    let (username, password) = text.split_once(':').ok_or(AuthError::Malformed)?;
    Ok(Some(Credentials { username: username.to_string(), password: password.to_string() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(user: &str, pass: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let v = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        h.insert(http::header::AUTHORIZATION, format!("Basic {v}").parse().unwrap());
        h
    }

    #[test]
    fn passthrough_hands_on_what_terraform_sends() {
        let auth = Auth::from_config(&Config::default()).unwrap();
        let creds = auth.authorize(&headers("u", "p:with:colons")).unwrap().unwrap();
        assert_eq!((creds.username.as_str(), creds.password.as_str()), ("u", "p:with:colons"));
        assert_eq!(auth.authorize(&HeaderMap::new()).unwrap(), None);
        let bearer = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert(http::header::AUTHORIZATION, value.parse().unwrap());
            h
        };
        // A bearer token goes on as basic auth with the configured username.
        let creds = auth.authorize(&bearer("Bearer glpat-xyz")).unwrap().unwrap();
        assert_eq!((creds.username.as_str(), creds.password.as_str()), ("x-access-token", "glpat-xyz"));
        let creds = auth.authorize(&bearer("bearer  tok")).unwrap().unwrap();
        assert_eq!(creds.password, "tok");
        for bad in ["Bearer", "Bearer ", "Bearer a b", "Token xyz", "Digest x=y"] {
            assert_eq!(auth.authorize(&bearer(bad)), Err(AuthError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn env_mode_checks_backend_auth_and_uses_its_own_git_credentials() {
        let c = Config {
            auth: AuthMode::Env,
            backend_credentials: Some(Credentials { username: "tf".into(), password: "pw".into() }),
            git_credentials: Some(Credentials { username: "git".into(), password: "token".into() }),
            ..Config::default()
        };
        let auth = Auth::from_config(&c).unwrap();
        assert_eq!(auth.authorize(&HeaderMap::new()), Err(AuthError::Missing));
        assert_eq!(auth.authorize(&headers("tf", "nope")), Err(AuthError::Wrong));
        assert_eq!(auth.authorize(&headers("tf", "pw")).unwrap().unwrap().username, "git");
        let mut bearer = HeaderMap::new();
        bearer.insert(http::header::AUTHORIZATION, "Bearer tok".parse().unwrap());
        assert_eq!(auth.authorize(&bearer), Err(AuthError::BearerNotAccepted));
        assert!(!format!("{auth:?}").contains("token"));
    }

    #[test]
    fn passthrough_refuses_backend_credentials() {
        let c = Config {
            backend_credentials: Some(Credentials { username: "tf".into(), password: "pw".into() }),
            ..Config::default()
        };
        assert!(Auth::from_config(&c).is_err());
    }
}
