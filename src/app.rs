//! `App::handle`: the one function both entry points (Lambda and `gitstate serve`)
//! call. Decodes, picks the repository, runs the backend on the blocking pool
//! (gix's network calls block) and turns every outcome into a response.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tracing::Instrument;

use crate::backend::{Backend, Rules};
use crate::config::Config;
use crate::error::Error;
use crate::protocol::{self, ProtocolError};
use crate::storage::git::GitStore;
use crate::storage::{Storage, StorageError};

/// The backend application: configuration and the store, built once per process.
pub struct App {
    config: Config,
    backend: Backend,
}

impl App {
    /// Open the configured repository: a remote through its cache, or the embedded one under the data directory.
    pub fn new(config: Config) -> Result<Self, StorageError> {
        let store: Arc<dyn Storage> = match &config.repository {
            Some(url) => Arc::new(GitStore::open_remote(url, &config.cache_dir, config.commit_author.clone())?),
            None => Arc::new(GitStore::open_embedded(&config.data_dir.join("repo.git"), config.commit_author.clone())?),
        };
        Ok(Self::with_storage(config, store))
    }

    /// An App over a given store (used by `new` and by tests).
    pub fn with_storage(config: Config, storage: Arc<dyn Storage>) -> Self {
        let rules = Rules { branch: config.branch.clone(), write_retries: config.write_retries };
        App { backend: Backend::new(storage, rules), config }
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
            path = tracing::field::Empty
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
            tracing::info!(status = response.status().as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "done");
            response
        }
        .instrument(span)
        .await
    }

    async fn run(self: &Arc<Self>, req: http::Request<Bytes>) -> Result<protocol::Outcome, Error> {
        let (parts, body) = req.into_parts();
        if body.len() > self.config.max_body_bytes {
            return Err(ProtocolError::PayloadTooLarge { limit: self.config.max_body_bytes }.into());
        }
        let request = protocol::decode(&parts.method, parts.uri.path(), parts.uri.query(), &parts.headers, body)?;
        let span = tracing::Span::current();
        span.record("operation", request.op.name());
        span.record("path", request.target.path.as_str());
        self.check_repository(request.target.repository.as_deref())?;

        let this = Arc::clone(self);
        let blocking_span = span.clone();
        tokio::task::spawn_blocking(move || {
            let _enter = blocking_span.enter();
            this.backend.handle(request.target.branch.as_deref(), &request.target.path, request.op)
        })
        .await
        .map_err(|e| Error::Internal(format!("backend task failed: {e}")))?
        .map_err(Error::from)
    }

    /// Until an allowlist exists, only the configured repository may be named: the server
    /// must never reach a host that a caller chose.
    fn check_repository(&self, requested: Option<&str>) -> Result<(), Error> {
        match (requested, self.config.repository.as_deref()) {
            (None, _) => Ok(()),
            (Some(r), Some(configured)) if same_repository(r, configured) => Ok(()),
            _ => Err(Error::RepositoryNotAllowed),
        }
    }
}

fn same_repository(a: &str, b: &str) -> bool {
    let norm = |s: &str| s.trim_end_matches('/').trim_end_matches(".git").to_string();
    norm(a) == norm(b)
}
