//! `App::handle`: the one function both entry points (Lambda and `gitstate serve`)
//! call. Decodes, picks the repository, runs the backend on the blocking pool
//! (gix's network calls block) and turns every outcome into a response.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use tracing::Instrument;

use crate::auth::{Auth, LoadError};
use crate::backend::{Backend, Rules};
use crate::config::{normalize_url, Config};
use crate::error::Error;
use crate::protocol::{self, ProtocolError};
use crate::storage::git::GitStore;
use crate::storage::{Storage, StorageError};

/// The backend application: configuration and the stores, built once per process.
pub struct App {
    config: Config,
    auth: Auth,
    /// The configured repository (or the embedded one).
    backend: Arc<Backend>,
    /// Other allowed repositories, opened on first use and kept for the life of the process.
    others: Mutex<HashMap<String, Arc<Backend>>>,
}

impl App {
    /// Load the access rules (reading the secret in `secret` mode) and open the configured repository.
    pub async fn load(config: Config) -> Result<Self, StartError> {
        let auth = Auth::load(&config).await?;
        let app = tokio::task::spawn_blocking(move || Self::new(config))
            .await
            .map_err(|e| StartError::Storage(StorageError::Local(e.to_string())))??;
        Ok(app.with_auth(auth))
    }

    /// Replace the access rules.
    pub fn with_auth(mut self, auth: Auth) -> Self {
        self.auth = auth;
        self
    }

    /// Open the configured repository: a remote through its cache, or the embedded one under the
    /// data directory. Access rules come from the configuration (`secret` mode needs [`App::load`]).
    pub fn new(config: Config) -> Result<Self, StartError> {
        let store: Arc<dyn Storage> = match &config.repository {
            Some(url) => Arc::new(GitStore::open_remote(url, &config.cache_dir, config.commit_author.clone())?),
            None => Arc::new(GitStore::open_embedded(&config.data_dir.join("repo.git"), config.commit_author.clone())?),
        };
        let auth = match config.auth {
            // Replaced by `load` once the secret is read; until then nobody gets in.
            crate::config::AuthMode::Secret => Auth::deny_all(),
            _ => Auth::from_config(&config)?,
        };
        Ok(Self::with_storage(config, store).with_auth(auth))
    }

    /// An App over a given store (used by `new` and by tests).
    pub fn with_storage(config: Config, storage: Arc<dyn Storage>) -> Self {
        let backend = Arc::new(Backend::new(storage, Self::rules(&config)));
        // Until a caller sets other rules: passthrough, which lets everyone in and hands on what they send.
        let auth = Auth::from_config(&Config::default()).expect("the default access rules are valid");
        App { backend, config, auth, others: Mutex::new(HashMap::new()) }
    }

    fn rules(config: &Config) -> Rules {
        Rules { branch: config.branch.clone(), write_retries: config.write_retries }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Where states are kept, for logs and the start-up banner (no credentials).
    pub fn describe_storage(&self) -> String {
        self.backend.storage().describe()
    }

    /// Handle one HTTP request. Never fails: every outcome is a response with its status.
    pub async fn handle(self: &Arc<Self>, req: http::Request<Bytes>) -> http::Response<Bytes> {
        let started = Instant::now();
        let span = tracing::info_span!(
            "request",
            method = %req.method(),
            operation = tracing::field::Empty,
            path = tracing::field::Empty,
            git_round_trips = tracing::field::Empty,
            git_ms = tracing::field::Empty
        );
        let this = Arc::clone(self);
        async move {
            let response = match this.run(req).await {
                Ok(outcome) => protocol::encode(outcome),
                Err(e) => {
                    let status = e.status();
                    if status.is_server_error() {
                        tracing::error!(error = %e, "request failed");
                    } else {
                        tracing::info!(error = %e, "request refused");
                    }
                    e.into_response()
                }
            };
            tracing::info!(
                status = response.status().as_u16(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "done"
            );
            response
        }
        .instrument(span)
        .await
    }

    async fn run(self: &Arc<Self>, req: http::Request<Bytes>) -> Result<protocol::Outcome, Error> {
        let (parts, body) = req.into_parts();
        let creds = self.auth.authorize(&parts.headers)?;
        if body.len() > self.config.max_body_bytes {
            return Err(ProtocolError::PayloadTooLarge { limit: self.config.max_body_bytes }.into());
        }
        let request = protocol::decode(&parts.method, parts.uri.path(), parts.uri.query(), &parts.headers, body)?;
        let span = tracing::Span::current();
        span.record("operation", request.op.name());
        span.record("path", request.target.path.as_str());
        if let Some(url) = &request.target.repository {
            if crate::storage::git::url_has_credentials(url) {
                return Err(ProtocolError::BadRequest("the repository URL must not carry credentials".into()).into());
            }
            if !self.config.repository_allowed(url) {
                tracing::warn!(repository = %redact_for_log(url), "repository not in the allowlist");
                return Err(Error::RepositoryNotAllowed);
            }
        }

        let this = Arc::clone(self);
        let blocking_span = span.clone();
        tokio::task::spawn_blocking(move || {
            let _enter = blocking_span.enter();
            crate::storage::git::take_git_calls();
            let backend = this.backend_for(request.target.repository.as_deref())?;
            let result = backend
                .handle(creds.as_ref(), request.target.branch.as_deref(), &request.target.path, request.op)
                .map_err(Error::from);
            let (round_trips, time) = crate::storage::git::take_git_calls();
            blocking_span.record("git_round_trips", round_trips);
            blocking_span.record("git_ms", time.as_millis() as u64);
            result
        })
        .await
        .map_err(|e| Error::Internal(format!("backend task failed: {e}")))?
    }

    /// The backend of an allowed repository (checked by the caller). Blocking: may create a cache.
    fn backend_for(&self, repository: Option<&str>) -> Result<Arc<Backend>, Error> {
        let Some(url) = repository else { return Ok(Arc::clone(&self.backend)) };
        if let Some(default) = &self.config.repository {
            if normalize_url(default) == normalize_url(url) {
                return Ok(Arc::clone(&self.backend));
            }
        }
        let key = normalize_url(url);
        let mut others = self.others.lock().expect("others poisoned");
        if let Some(b) = others.get(&key) {
            return Ok(Arc::clone(b));
        }
        let store = GitStore::open_remote(url, &self.config.cache_dir, self.config.commit_author.clone()).map_err(
            |e| match e {
                StorageError::Local(why) if why.contains("URL") => Error::Protocol(ProtocolError::BadRequest(why)),
                other => other.into(),
            },
        )?;
        let backend = Arc::new(Backend::new(Arc::new(store), Self::rules(&self.config)));
        others.insert(key, Arc::clone(&backend));
        Ok(backend)
    }
}

/// Why the App could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Auth(#[from] LoadError),
}

/// A URL as it may appear in a log line: everything before `@` in the authority is dropped.
fn redact_for_log(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            format!("{scheme}://{host}{path}")
        }
        None => "<unparsable URL>".into(),
    }
}
