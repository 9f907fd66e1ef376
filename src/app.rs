//! `App::handle`: the one function both entry points (Lambda and `gitstate serve`) call.
//! Authorizes, decodes, picks the repository, runs the backend on the blocking pool under
//! the request's deadline, and turns every outcome into a response.

use std::num::NonZeroUsize;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lru::LruCache;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::auth::{Auth, LoadError};
use crate::backend::sealing::{Sealing, SealingConfigError};
use crate::backend::{Backend, BackendSettings, Outcome};
use crate::config::{AuthMode, Config};
use crate::context::{Deadline, RequestContext};
use crate::error::Error;
use crate::protocol::{self, BackendRequest, ProtocolError};
use crate::storage::git::{EmbeddedStore, RemoteStore};
use crate::storage::{RepoUrl, Storage, StorageError};

/// How long the blocking work may overrun the deadline before the answer goes out without it
/// (its sockets time out at the deadline, so this is only a safety net).
const DEADLINE_GRACE: Duration = Duration::from_millis(500);

/// The backend application: configuration, access rules and the stores, built once per process.
pub struct App {
    config: Config,
    auth: Auth,
    /// Encryption at rest, shared by every repository.
    sealing: Arc<Sealing>,
    /// The configured repository (or the embedded one).
    default: Arc<ServedRepository>,
    /// Other allowed repositories, one store (and cache directory) each, opened on first use;
    /// the least recently used is closed (and its cache deleted) when there are too many.
    other_repositories: Mutex<LruCache<RepoUrl, Arc<ServedRepository>>>,
    /// Blocking work on repositories other than the default, all together: the overflow is
    /// refused at once, so hosts that hang cannot hold every thread or connection.
    others_in_flight: Arc<Semaphore>,
    /// Body checks (MD5, a JSON scan of up to the body limit) in flight: CPU work that never
    /// waits on a host, bounded so a flood of large bodies cannot take every blocking thread.
    decoding: Arc<Semaphore>,
}

/// One repository being served: its backend, and the bulkhead that bounds the requests
/// working on it at once.
struct ServedRepository {
    bulkhead: Arc<Semaphore>,
    /// Opened on the blocking pool by the first request that needs it.
    opened: OnceLock<Opened>,
}

struct Opened {
    backend: Arc<Backend>,
    /// Set for a remote opened on request, whose cache goes when it is evicted.
    remote: Option<Arc<RemoteStore>>,
}

impl ServedRepository {
    fn new(concurrency: usize) -> Self {
        ServedRepository { bulkhead: Arc::new(Semaphore::new(concurrency)), opened: OnceLock::new() }
    }
}

impl Drop for ServedRepository {
    fn drop(&mut self) {
        if let Some(remote) = self.opened.get().and_then(|o| o.remote.as_ref()) {
            tracing::info!(repository = %remote.url(), "closing a repository; its cache goes once unused");
            remote.discard_cache();
        }
    }
}

impl App {
    /// The one constructor: settings, access rules and the store of the default repository.
    pub fn new(config: Config, auth: Auth, storage: Arc<dyn Storage>, sealing: Sealing) -> Self {
        let sealing = Arc::new(sealing);
        let default = ServedRepository::new(config.repository_concurrency);
        let backend = Backend::new(storage, settings(&config), Arc::clone(&sealing));
        let _ = default.opened.set(Opened { backend: Arc::new(backend), remote: None });
        let capacity = NonZeroUsize::new(config.max_repositories).unwrap_or(NonZeroUsize::MIN);
        let other_repositories = Mutex::new(LruCache::new(capacity));
        let others_in_flight = Arc::new(Semaphore::new(config.max_blocking.max(1)));
        let cores = std::thread::available_parallelism().map_or(2, NonZeroUsize::get);
        let decoding = Arc::new(Semaphore::new(2 * cores));
        App { config, auth, sealing, default: Arc::new(default), other_repositories, others_in_flight, decoding }
    }

    /// Read the access rules (the secret in `secret` mode) and open the configured repository.
    pub async fn load(config: Config) -> Result<Self, StartError> {
        // The AWS configuration is loaded once, and only when a feature needs AWS.
        let sdk = match config.auth == AuthMode::Secret || config.sealing.kms_key_id.is_some() {
            true => Some(aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await),
            false => None,
        };
        let auth = Auth::load(&config, sdk.as_ref()).await?;
        let mut keys = config.sealing.clone();
        if keys.age_identities.is_none() {
            keys.age_identities = auth.age_identities().cloned();
        }
        let kms = sdk.as_ref().filter(|_| keys.kms_key_id.is_some());
        let sealing = Sealing::new(&keys, kms.map(|sdk| (sdk, tokio::runtime::Handle::current())))?;
        let opened = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || open_default_storage(&config))
                .await
                .map_err(|e| StartError::Storage(StorageError::Local(e.to_string())))??
        };
        Ok(Self::new(config, auth, opened, sealing))
    }

    /// [`App::load`] without a runtime, for modes whose access rules need no network (not `secret`).
    pub fn open(config: Config) -> Result<Self, StartError> {
        if config.auth == AuthMode::Secret {
            return Err(StartError::Auth(LoadError("secret mode needs App::load".into())));
        }
        let auth = Auth::from_config(&config)?;
        let sealing = Sealing::new(&config.sealing, None)?;
        let storage = open_default_storage(&config)?;
        Ok(Self::new(config, auth, storage, sealing))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Where states are kept, for logs and the start-up banner (no credentials).
    pub fn describe_storage(&self) -> String {
        self.default.opened.get().map(|o| o.backend.storage().describe()).unwrap_or_default()
    }

    /// Refuse a request whose headers do not authorize it, before its body is read: the
    /// response to send instead. [`App::handle`] checks again; this only lets an entry
    /// point avoid reading a body for a caller who is refused anyway.
    pub fn refuse_unauthorized(&self, headers: &http::HeaderMap) -> Option<http::Response<Bytes>> {
        self.auth.authorize(headers).err().map(|e| Error::from(e).into_response())
    }

    /// Handle one HTTP request within the configured request budget.
    pub async fn handle(self: &Arc<Self>, req: http::Request<Bytes>) -> http::Response<Bytes> {
        self.handle_until(req, Deadline::after(self.config.request_timeout)).await
    }

    /// Handle one HTTP request that must be answered by `deadline`. Never fails: every
    /// outcome is a response with its status.
    pub async fn handle_until(
        self: &Arc<Self>,
        req: http::Request<Bytes>,
        deadline: Deadline,
    ) -> http::Response<Bytes> {
        let started = Instant::now();
        let span = tracing::info_span!(
            "request",
            method = %req.method().as_str().escape_debug(),
            operation = tracing::field::Empty,
            path = tracing::field::Empty,
            git_round_trips = tracing::field::Empty,
            git_ms = tracing::field::Empty
        );
        let this = Arc::clone(self);
        async move {
            if let Some(rest) = protocol::ui::ui_rest(req.uri().path()) {
                let root = protocol::ui::root_of(rest);
                let response = match this.run_ui(req, deadline).await {
                    Ok(response) => response,
                    Err(e) => {
                        if e.status().is_server_error() {
                            tracing::error!(error = %e, "page failed");
                        } else {
                            tracing::info!(error = %e, "page refused");
                        }
                        crate::ui::error_page(&root, e.into_response())
                    }
                };
                tracing::info!(
                    status = response.status().as_u16(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "done"
                );
                return response;
            }
            let response = match this.respond(req, deadline).await {
                Ok(outcome) => protocol::encode(outcome),
                Err(e) => {
                    if e.status().is_server_error() {
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

    async fn respond(self: &Arc<Self>, req: http::Request<Bytes>, deadline: Deadline) -> Result<Outcome, Error> {
        let (parts, body) = req.into_parts();
        let credentials = self.auth.authorize(&parts.headers)?;
        if body.len() > self.config.max_body_bytes {
            return Err(ProtocolError::PayloadTooLarge { limit: self.config.max_body_bytes }.into());
        }
        // The body checks (MD5, a JSON scan of up to the body limit) are CPU work: off the async workers.
        let decode_turn = tokio::time::timeout_at(
            tokio::time::Instant::from(deadline.instant()),
            Arc::clone(&self.decoding).acquire_owned(),
        )
        .await
        .map_err(|_| Error::DeadlineExceeded)?
        .map_err(|_| Error::Internal("the decoding bound closed".into()))?;
        let request = tokio::task::spawn_blocking(move || {
            let _turn = decode_turn;
            protocol::decode(&parts.method, parts.uri.path(), parts.uri.query(), &parts.headers, body)
        })
        .await
        .map_err(|e| Error::Internal(format!("decoding task failed: {e}")))??;
        let span = tracing::Span::current();
        span.record("operation", request.op.name());
        span.record("path", request.target.path.as_str());
        if let Some(url) = &request.target.repository {
            if !self.config.repository_allowed(url) {
                tracing::warn!(repository = %url, "repository not in the allowlist");
                return Err(Error::RepositoryNotAllowed);
            }
        }

        let ctx = RequestContext::new(credentials, deadline).with_ssh(self.auth.ssh());
        let result = self.run_backend(request, &ctx, &span).await;
        span.record("git_round_trips", ctx.counters.round_trips());
        span.record("git_ms", ctx.counters.time().as_millis() as u64);
        result
    }

    /// A page of the web view: the same authorization, allowlist and backend as the API, the
    /// outcome rendered as HTML.
    async fn run_ui(
        self: &Arc<Self>,
        req: http::Request<Bytes>,
        deadline: Deadline,
    ) -> Result<http::Response<Bytes>, Error> {
        let (parts, body) = req.into_parts();
        let credentials = self.auth.authorize(&parts.headers)?;
        if body.len() > protocol::ui::MAX_FORM_BYTES {
            return Err(ProtocolError::PayloadTooLarge { limit: protocol::ui::MAX_FORM_BYTES }.into());
        }
        let rest = protocol::ui::ui_rest(parts.uri.path()).unwrap_or_default();
        let mut ui = protocol::ui::decode(&parts.method, rest, parts.uri.query(), &parts.headers, body)?;
        if let Some(url) = &ui.repository {
            if !self.config.repository_allowed(url) {
                tracing::warn!(repository = %url, "repository not in the allowlist");
                return Err(Error::RepositoryNotAllowed);
            }
        }
        let Some(mut request) = ui.request.take() else { return Ok(crate::ui::render(&ui, None)) };
        if let crate::backend::Operation::ForceUnlock { by, .. } = &mut request.op {
            *by = crate::auth::caller_name(&parts.headers);
        }
        let span = tracing::Span::current();
        span.record("operation", request.op.name());
        span.record("path", request.target.path.as_str());
        let ctx = RequestContext::new(credentials, deadline);
        ui.request = Some(request.clone());
        let result = self.run_backend(request, &ctx, &span).await;
        span.record("git_round_trips", ctx.counters.round_trips());
        span.record("git_ms", ctx.counters.time().as_millis() as u64);
        Ok(crate::ui::render(&ui, Some(result?)))
    }

    /// The backend call on the blocking pool, once the repository's bulkhead lets it in.
    /// When the deadline passes, gix is interrupted; the answer goes out at the latest a grace
    /// period later.
    async fn run_backend(
        self: &Arc<Self>,
        request: BackendRequest,
        ctx: &RequestContext,
        span: &tracing::Span,
    ) -> Result<Outcome, Error> {
        let repository = self.repository(request.target.repository.as_ref());
        let deadline = tokio::time::Instant::from(ctx.deadline.instant());
        let permit = match tokio::time::timeout_at(deadline, Arc::clone(&repository.bulkhead).acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => return Err(Error::Internal("the repository's bulkhead closed".into())),
            Err(_) => {
                tracing::warn!("too many requests in flight on this repository until the deadline");
                return Err(Error::DeadlineExceeded);
            }
        };
        // The configured repository has its own bulkhead in reserve; every other one shares
        // one bound, and what does not fit is refused now rather than queued behind hung hosts.
        let shared = if Arc::ptr_eq(&repository, &self.default) {
            None
        } else {
            match Arc::clone(&self.others_in_flight).try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    tracing::warn!(limit = self.config.max_blocking, "too much work on other repositories in flight");
                    return Err(Error::Overloaded);
                }
            }
        };
        let this = Arc::clone(self);
        let work_ctx = ctx.clone();
        let work_span = span.clone();
        let work = tokio::task::spawn_blocking(move || {
            let _enter = work_span.enter();
            let _permits = (permit, shared);
            let backend = this.backend_of(&repository, request.target.repository.as_ref())?;
            backend
                .handle(&work_ctx, request.target.branch.as_deref(), &request.target.path, &request.op)
                .map_err(Error::from)
        });
        tokio::pin!(work);
        let joined = tokio::select! {
            joined = &mut work => joined,
            () = tokio::time::sleep_until(deadline) => {
                ctx.interrupt.store(true, Ordering::Relaxed);
                match tokio::time::timeout(DEADLINE_GRACE, &mut work).await {
                    Ok(joined) => joined,
                    Err(_) => {
                        tracing::warn!("deadline passed with the git work still running; answering without it");
                        return Err(Error::DeadlineExceeded);
                    }
                }
            }
        };
        joined.map_err(|e| Error::Internal(format!("backend task failed: {e}")))?
    }

    /// The entry of an allowed repository (checked by the caller). Never blocks on I/O.
    fn repository(&self, url: Option<&RepoUrl>) -> Arc<ServedRepository> {
        let Some(url) = url else { return Arc::clone(&self.default) };
        if self.config.repository.as_ref().is_some_and(|default| default.same_repository(url)) {
            return Arc::clone(&self.default);
        }
        let mut others = self.other_repositories.lock().expect("other_repositories poisoned");
        Arc::clone(
            others.get_or_insert(url.clone(), || Arc::new(ServedRepository::new(self.config.repository_concurrency))),
        )
    }

    /// The backend of `repository`, opening its store on first use. Blocking: may create a cache.
    fn backend_of(&self, repository: &ServedRepository, url: Option<&RepoUrl>) -> Result<Arc<Backend>, Error> {
        if let Some(opened) = repository.opened.get() {
            return Ok(Arc::clone(&opened.backend));
        }
        let url = url.ok_or_else(|| Error::Internal("the default repository was not opened".into()))?;
        let store =
            Arc::new(RemoteStore::open(url.clone(), &self.config.cache_dir, self.config.commit_author.clone().into())?);
        let backend = Arc::new(Backend::new(
            Arc::clone(&store) as Arc<dyn Storage>,
            settings(&self.config),
            Arc::clone(&self.sealing),
        ));
        // Two first requests may race here: one store wins, the other is dropped unused.
        let opened = repository.opened.get_or_init(|| Opened { backend, remote: Some(store) });
        Ok(Arc::clone(&opened.backend))
    }
}

fn settings(config: &Config) -> BackendSettings {
    BackendSettings { branch: config.branch.clone(), write_retries: config.write_retries }
}

/// The configured repository through its cache, or the embedded one under the data directory.
fn open_default_storage(config: &Config) -> Result<Arc<dyn Storage>, StorageError> {
    let author = config.commit_author.clone().into();
    Ok(match &config.repository {
        Some(url) => Arc::new(RemoteStore::open(url.clone(), &config.cache_dir, author)?),
        None => Arc::new(EmbeddedStore::open(&config.data_dir.join("repo.git"), author)?),
    })
}

/// Why the App could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Auth(#[from] LoadError),
    #[error(transparent)]
    Sealing(#[from] SealingConfigError),
}
