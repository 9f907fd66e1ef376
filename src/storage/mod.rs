//! Storage: where states and locks live. Knows refs, trees, files and commits,
//! nothing of Terraform. The backend talks to it through [`Storage`]; the git
//! implementations are a remote through a cache ([`git::RemoteStore`]) and the embedded repository ([`git::EmbeddedStore`]).

pub mod git;
pub(crate) mod url;

use std::collections::HashMap;

pub use crate::context::{Credentials, RequestContext};
pub use gix::ObjectId;
pub use url::{RepoUrl, UrlError, UrlPattern};

/// Errors of the storage layer, by what the caller can do about them.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    /// Writing `path` would turn another state's file into a directory, or the reverse.
    #[error("path conflict: `{path}` cannot be stored because `{blocker}` {}", if *.blocker_is_state { "is a state" } else { "is a directory of other states" })]
    PathConflict { path: String, blocker: String, blocker_is_state: bool },
    /// The local cache of a remote is unusable (deleted, corrupt objects): rebuild it and retry.
    #[error("the cache repository is broken: {0}")]
    CacheCorrupt(String),
    /// The git host could not be reached, or the connection broke: try again later.
    #[error("git host unavailable: {0}")]
    HostUnavailable(String),
    /// An established connection was dropped (reset, closed early) before the host could act
    /// on it; a busy `git daemon` resets those it has no room for. May be resent at once.
    #[error("the git host dropped the connection: {0}")]
    ConnectionDropped(String),
    /// The git host's TLS certificate failed verification (untrusted issuer, expired, another
    /// name): retrying does not heal it.
    #[error("the git host's TLS certificate was refused: {0}")]
    CertificateRefused(String),
    /// The SSH host's key is not the one pinned for it (GITSTATE_SSH_KNOWN_HOSTS): a
    /// man in the middle, or a host that changed its key. Retrying does not heal it.
    #[error("the host key of {host} ({fingerprint}) is not pinned for it")]
    HostKeyRefused { host: String, fingerprint: String },
    /// The SSH host refused the deployment's own key: only whoever runs gitstate can fix it.
    #[error("{host} refused the deployment's SSH key")]
    SshKeyRefused { host: String },
    /// The git host refused the credentials (401/403 or equivalent).
    #[error("git host refused the credentials")]
    CredentialsRefused,
    /// The git host has no such repository (HTTP 404, git daemon's "not found").
    #[error("repository not found on the git host: {0}")]
    RepositoryNotFound(String),
    /// The git host refused an update for good (hook declined, protected branch, deletes denied).
    #[error("the git host refused to update {reference}: {reason}")]
    PushRefused { reference: String, reason: String },
    /// The git host answered something we could not understand.
    #[error("git protocol error: {0}")]
    Protocol(String),
    /// The connection broke after a push's commands were sent: it may or may not have been
    /// applied. Never resent as it is; a look at the refs tells.
    #[error("the git host's answer to a push was lost: {0}")]
    OutcomeUnknown(String),
    /// The request's deadline passed while talking to the git host.
    #[error("deadline passed {0}")]
    DeadlineExceeded(&'static str),
    /// The local repository (embedded store, or our own disk) failed.
    #[error("local repository error: {0}")]
    Local(String),
}

impl StorageError {
    pub fn local(e: impl std::fmt::Display) -> Self {
        StorageError::Local(e.to_string())
    }

    /// Transient: the same request may succeed later (answered 503 with `Retry-After`).
    pub fn is_spurious(&self) -> bool {
        matches!(
            self,
            StorageError::HostUnavailable(_)
                | StorageError::ConnectionDropped(_)
                | StorageError::DeadlineExceeded(_)
                | StorageError::OutcomeUnknown(_)
        )
    }

    /// The request never reached the host: the same request may be sent again now, on a fresh
    /// connection (a few times, briefly paused), before the caller hears of it.
    pub fn may_resend_at_once(&self) -> bool {
        matches!(self, StorageError::ConnectionDropped(_))
    }

    /// The cache is broken and must be rebuilt; the only error that triggers a rebuild.
    pub fn is_cache_corrupt(&self) -> bool {
        matches!(self, StorageError::CacheCorrupt(_))
    }
}

/// One compare-and-swap ref update. `old: None` means "must not exist",
/// `new: None` means delete; `old == new` is a guard that only checks (with both
/// `None`: the ref must be absent, checked before the push, not atomically).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefUpdate {
    /// Full ref name, e.g. `refs/heads/main`.
    pub name: String,
    pub old: Option<ObjectId>,
    pub new: Option<ObjectId>,
}

impl RefUpdate {
    pub fn is_guard(&self) -> bool {
        self.old.is_some() && self.old == self.new
    }

    /// A check that the ref does not exist; never sent as a command.
    pub fn is_absence_check(&self) -> bool {
        self.old.is_none() && self.new.is_none()
    }
}

/// What became of a set of ref updates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateOutcome {
    /// Every update was applied.
    Applied,
    /// Nothing was applied: some ref was not at its expected old value (a lost race).
    Rejected(Vec<(String, String)>),
    /// The host applied some updates and refused others: it did not honour `atomic` (or
    /// skipped a command). Read per ref from the host's report; never pushed again.
    PartlyApplied { applied: Vec<String>, rejected: Vec<(String, String)> },
}

impl UpdateOutcome {
    /// Whether the update of `name` was applied.
    pub fn applied(&self, name: &str) -> bool {
        match self {
            UpdateOutcome::Applied => true,
            UpdateOutcome::Rejected(_) => false,
            UpdateOutcome::PartlyApplied { applied, .. } => applied.iter().any(|a| a == name),
        }
    }
}

/// A commit as stored: what history needs of it, without its tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitInfo {
    pub id: ObjectId,
    pub parents: Vec<ObjectId>,
    /// Committer time, seconds since the epoch.
    pub time: i64,
    pub message: String,
}

/// Tips of branches, by full ref name; a missing key means the ref does not exist.
pub type Tips = HashMap<String, ObjectId>;

/// A file of a commit's tree, as a listing shows it (its content is not read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeFile {
    /// The path from the root of the tree, `/`-separated.
    pub path: String,
    pub id: ObjectId,
    /// Bytes, as stored.
    pub size: u64,
}

/// One page of a tree's files, in byte order of their paths (git's own tree order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilePage {
    pub files: Vec<TreeFile>,
    /// More files follow the last one listed.
    pub more: bool,
}

/// The refs under a prefix, up to a bound.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefListing {
    pub tips: Tips,
    /// More refs exist under the prefix than were listed (the first by name were kept).
    pub truncated: bool,
}

/// A store of files on branches with compare-and-swap ref updates. Every call that may
/// wait on the network is bounded by the context's deadline.
pub trait Storage: Send + Sync {
    /// Current tips of `refs` (full names) at the source of truth, with each tip's
    /// commit made readable locally.
    fn fetch_tips(&self, ctx: &RequestContext, refs: &[String]) -> Result<Tips, StorageError>;
    /// Contents of `path` in the tree of `commit`, `None` when absent.
    fn read_file(&self, commit: ObjectId, path: &str) -> Result<Option<Vec<u8>>, StorageError>;
    /// Write a commit locally: `parent`'s tree with `path` set to `content` (removed when `None`).
    fn commit(
        &self,
        parent: Option<ObjectId>,
        path: &str,
        content: Option<&[u8]>,
        message: &str,
    ) -> Result<ObjectId, StorageError>;
    /// Apply all `updates` as one compare-and-swap: all or nothing where the store can.
    fn update(&self, ctx: &RequestContext, updates: &[RefUpdate]) -> Result<UpdateOutcome, StorageError>;
    /// The commit `id` if it is readable here (a shallow cache may not have it yet).
    fn commit_info(&self, id: ObjectId) -> Result<Option<CommitInfo>, StorageError>;
    /// The object id of the file `path` in the tree of `commit` (`None`: absent), without reading it.
    fn file_id(&self, commit: ObjectId, path: &str) -> Result<Option<ObjectId>, StorageError>;
    /// Make `depth` commits of the history of `reference` (counted from its tip) readable here.
    /// A store that holds all history has nothing to do.
    fn deepen(&self, _ctx: &RequestContext, _reference: &str, _depth: u32) -> Result<(), StorageError> {
        Ok(())
    }
    /// The content of the blob `id` (a file's id from [`Storage::list_files`] or
    /// [`Storage::file_id`]), `None` when absent here.
    fn read_blob(&self, id: ObjectId) -> Result<Option<Vec<u8>>, StorageError>;
    /// Up to `limit` files of the tree of `commit` whose paths sort after `after` (byte order),
    /// with their sizes and blob ids, without reading their contents. Work is bounded by the
    /// page, not by the size of the tree: subtrees wholly before `after` are not opened.
    fn list_files(&self, commit: ObjectId, after: Option<&str>, limit: usize) -> Result<FilePage, StorageError>;
    /// Current refs whose full names start with `prefix` (e.g. `refs/heads/locks/`) at the source
    /// of truth, the first `limit` by name, each tip's commit made readable locally.
    fn list_refs(&self, ctx: &RequestContext, prefix: &str, limit: usize) -> Result<RefListing, StorageError>;
    /// A name for logs (never carries credentials).
    fn describe(&self) -> String;
    /// Throw away local copies that can be fetched again (a cache found broken). Returns
    /// whether there was anything to throw away; a store that is its own source of truth returns false.
    fn reset_cache(&self) -> Result<bool, StorageError> {
        Ok(false)
    }
}
