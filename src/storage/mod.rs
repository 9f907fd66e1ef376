//! Storage: where states and locks live. Knows refs, trees, files and commits,
//! nothing of Terraform. The backend talks to it through [`Storage`]; the one
//! implementation is a git repository ([`git::GitStore`]), remote or embedded.

pub mod git;

use std::collections::HashMap;

pub use gix::ObjectId;

/// Errors of the storage layer. `Unavailable` and `Protocol` are about the git
/// host (transient for the caller); `Local` is our own disk or repository.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The git host could not be reached or the connection broke.
    #[error("git host unavailable: {0}")]
    Unavailable(String),
    /// The git host answered something we could not understand or refused the push as a whole.
    #[error("git protocol error: {0}")]
    Protocol(String),
    /// The git host refused our credentials (401/403 or equivalent).
    #[error("git host refused the credentials")]
    AuthRejected,
    /// The local (cache or embedded) repository failed.
    #[error("local repository error: {0}")]
    Local(String),
}

impl StorageError {
    pub fn local(e: impl std::fmt::Display) -> Self {
        StorageError::Local(e.to_string())
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
}

/// Credentials for the git host (HTTP basic auth). Never printed: `Debug` hides them.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

/// Tips of branches, by full ref name; a missing key means the ref does not exist.
pub type Tips = HashMap<String, ObjectId>;

/// A store of files on branches with compare-and-swap ref updates.
pub trait Storage: Send + Sync {
    /// Current tips of `refs` (full names) at the source of truth, with each tip's
    /// commit made readable locally.
    fn sync(&self, refs: &[String], creds: Option<&Credentials>) -> Result<Tips, StorageError>;
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
    fn update(&self, updates: &[RefUpdate], creds: Option<&Credentials>) -> Result<UpdateOutcome, StorageError>;
    /// A name for logs (never carries credentials).
    fn describe(&self) -> String;
    /// Throw away local copies that can be fetched again (a cache found broken). Returns
    /// whether there was anything to throw away; a store that is its own source of truth returns false.
    fn reset_cache(&self) -> Result<bool, StorageError> {
        Ok(false)
    }
}
