//! The domain the backend works in: operations on one state, their outcomes, the
//! LockInfo Terraform sends, and why a request was refused. Protocol decodes into
//! these and encodes from them.

use bytes::Bytes;

use super::decide::StateBody;
use super::lock_info::LockInfo;
use crate::storage::StorageError;

/// The backend operations on one state, plus reading a lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    GetState,
    /// A write; `body` is a state checked where it arrived, whose Content-MD5 (if sent) matched.
    /// `force` (query `force=true`) skips the lineage/serial guard, for a deliberate `terraform state push -force`.
    PutState {
        lock_id: Option<String>,
        body: StateBody,
        force: bool,
    },
    DeleteState {
        lock_id: Option<String>,
    },
    Lock(LockInfo),
    /// `id: None` is a force-unlock (Terraform's `force-unlock` sends no body).
    Unlock {
        id: Option<String>,
    },
    GetLock,
    /// Versions of the state, newest first (`before`: older than that commit).
    History {
        limit: usize,
        before: Option<gix::ObjectId>,
    },
    /// The state as stored at a commit of the branch's history.
    GetVersion {
        commit: gix::ObjectId,
    },
    /// What changed between two versions.
    Diff {
        from: gix::ObjectId,
        to: gix::ObjectId,
    },
    /// Write an old version back as a new one.
    Restore {
        commit: gix::ObjectId,
        lock_id: Option<String>,
        force: bool,
    },
    /// The states of the branch by path, `limit` of them after `after` (the web view, `/states`).
    /// The request's path is empty: this is about the whole branch.
    ListStates {
        limit: usize,
        after: Option<String>,
    },
    /// One state as the web view shows it, with up to `history` versions older than `before`.
    ViewState {
        history: usize,
        before: Option<gix::ObjectId>,
    },
    /// What changed between two versions, attribute by attribute (the web view's diff).
    Compare {
        from: gix::ObjectId,
        to: gix::ObjectId,
    },
    /// Release the lock held under `id` from the web view, asked by `by` (the caller's basic-auth
    /// username, logged: a delete leaves no commit to carry a trailer).
    ForceUnlock {
        id: String,
        by: Option<String>,
    },
}

impl Operation {
    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Operation::GetState => "get",
            Operation::PutState { .. } => "update",
            Operation::DeleteState { .. } => "delete",
            Operation::Lock(_) => "lock",
            Operation::Unlock { .. } => "unlock",
            Operation::GetLock => "get-lock",
            Operation::History { .. } => "history",
            Operation::GetVersion { .. } => "get-version",
            Operation::Diff { .. } => "diff",
            Operation::Restore { .. } => "restore",
            Operation::ListStates { .. } => "list-states",
            Operation::ViewState { .. } => "view-state",
            Operation::Compare { .. } => "compare",
            Operation::ForceUnlock { .. } => "force-unlock",
        }
    }
}

/// A successful outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The stored state.
    State(Bytes),
    /// No state stored at this path yet.
    NoState,
    /// The current LockInfo of a lock.
    LockInfo(Bytes),
    /// Done (written, deleted, locked, unlocked).
    Done,
    /// A JSON document of our own (history, diff).
    Json(Bytes),
    /// A page of the branch's states.
    States(super::browse::StateList),
    /// One state as the web view shows it.
    StateView(Box<super::browse::StateView>),
    /// Two versions compared attribute by attribute.
    Comparison(Box<super::diff::Comparison>),
}

/// Why the lineage/serial guard refused a write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Stale {
    #[error("lineage mismatch: the stored state has lineage {stored:?}, the new one {incoming:?}; this is another state (use ?force=true for a deliberate `state push -force`)")]
    Lineage { stored: String, incoming: String },
    #[error("stale serial: the stored state has serial {stored}, the new one {incoming}; someone else wrote in between (use ?force=true for a deliberate `state push -force`)")]
    Serial { stored: u64, incoming: u64 },
    #[error("serial {serial} is already stored with different content; a new state needs a higher serial")]
    SameSerial { serial: u64 },
    #[error("the stored state has a lineage and serial and this body does not carry both; it cannot be shown to be newer (use ?force=true for a deliberate overwrite)")]
    Unguarded,
    #[error("what is stored is not a Terraform state ({0}); use ?force=true to replace it")]
    StoredNotAState(super::decide::NotAState),
}

/// Why the backend refused or failed a request. Statuses are assigned in `crate::error`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// The lock is held by someone else; carries the holder's LockInfo JSON.
    #[error("the state is locked by another client")]
    Locked { holder: Bytes },
    /// UNLOCK with an ID that is not the holder's; carries the holder's LockInfo JSON.
    #[error("the lock is held under another ID")]
    WrongLockId { holder: Bytes },
    /// A write under a lock ID that holds no lock.
    #[error("no lock is held with ID {0:?}")]
    NotLocked(String),
    /// The write would overwrite a newer or unrelated state (lineage/serial guard).
    #[error(transparent)]
    StaleState(Stale),
    /// The lock cannot be created while a lock of a nesting state exists (`a` and `a/b`):
    /// git cannot hold both refs.
    #[error("the lock of `{0}` cannot be taken while a lock of a state above or below it is held (`a` and `a/b` cannot be locked at once)")]
    NestedLock(String),
    /// The commit named is not in the branch's history, or does not hold the state.
    #[error("that commit is not a version of this state on this branch")]
    NoSuchVersion,
    /// The version asked to be restored cannot be written back as a state.
    #[error("cannot restore: {0}")]
    NotRestorable(&'static str),
    /// A version compared is not a readable state.
    #[error(transparent)]
    Diff(#[from] super::diff::DiffError),
    /// What is stored at `path` is not a state document: never served as one.
    #[error("the file stored at `{path}` is not a Terraform state ({why}); see the server log")]
    StoredNotAState { path: String, why: super::decide::NotAState },
    /// `before` of a history page names no commit of the branch's history.
    #[error("`before` names {0}, which is not a commit of this branch's history")]
    UnknownCursor(gix::ObjectId),
    /// GET of a lock that nobody holds.
    #[error("no lock is held on this state")]
    NoLock,
    /// Lost the race for the branch too often; the client should retry.
    #[error("the branch kept moving under {attempts} attempts; retry later")]
    Contended { attempts: u32 },
    /// The request's deadline passed between attempts.
    #[error("the request ran out of time after {pushes} push attempts; retry later")]
    DeadlineExceeded { pushes: u32 },
    /// A state could not be encrypted or decrypted.
    #[error(transparent)]
    Sealing(#[from] super::sealing::SealError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}
