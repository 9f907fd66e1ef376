//! The backend rules: who holds a lock, when a write may land, what a commit
//! says. Works over any [`Storage`]; every decision that must hold across
//! processes is settled by the storage's compare-and-swap, never by a local mutex.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::protocol::{LockInfo, Operation, Outcome};
use crate::storage::{Credentials, ObjectId, RefUpdate, Storage, StorageError, Tips, UpdateOutcome};

/// Why the backend refused or failed a request. Statuses are assigned in `crate::error`.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The lock is held by someone else; carries the holder's LockInfo JSON.
    #[error("the state is locked by another client")]
    Locked { holder: Bytes },
    /// UNLOCK with an ID that is not the holder's; carries the holder's LockInfo JSON.
    #[error("the lock is held under another ID")]
    WrongLockId { holder: Bytes },
    /// A write under a lock ID that holds no lock.
    #[error("no lock is held with ID {0}")]
    NotLocked(String),
    /// The write would overwrite a newer or unrelated state (lineage/serial guard).
    #[error("{0}")]
    StaleState(String),
    /// GET of a lock that nobody holds.
    #[error("no lock is held on this state")]
    NoLock,
    /// The write cannot be stored at this path (a directory or file of another state is in the way).
    #[error("{0}")]
    PathConflict(String),
    /// Lost the race for the branch too often; the client should retry.
    #[error("the branch kept moving under {attempts} attempts; retry later")]
    Contended { attempts: u32 },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Tuning of the backend.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Branch that holds the states when the request names none.
    pub branch: String,
    /// Rebuilds of a write that lost the race for the branch.
    pub write_retries: u32,
}

/// The backend over one repository.
pub struct Backend {
    storage: Arc<dyn Storage>,
    rules: Rules,
    /// LockInfo by lock-commit id: a lock commit never changes, so this never goes stale.
    lock_infos: Mutex<HashMap<ObjectId, Bytes>>,
    /// Last tip seen of each ref (`None`: seen absent). Only ever a guess to push against:
    /// every push carries its expected old ids, and any answer other than a push is given
    /// only from a fresh look at the remote.
    known_tips: Mutex<HashMap<String, Option<ObjectId>>>,
}

/// What a lock branch currently says.
struct Holder {
    commit: ObjectId,
    info: Bytes,
    id: String,
}

impl Backend {
    pub fn new(storage: Arc<dyn Storage>, rules: Rules) -> Self {
        Backend { storage, rules, lock_infos: Mutex::new(HashMap::new()), known_tips: Mutex::new(HashMap::new()) }
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Run one operation on the state at `path` of `branch` (default branch when `None`), reaching
    /// the git host with `creds` where it needs any. Blocking.
    pub fn handle(
        &self,
        creds: Option<&Credentials>,
        branch: Option<&str>,
        path: &str,
        op: Operation,
    ) -> Result<Outcome, BackendError> {
        match self.handle_once(creds, branch, path, op.clone()) {
            // A local failure of a cache (deleted directory, corrupt object) is cured by
            // throwing the cache away and doing the request again from the remote.
            Err(BackendError::Storage(StorageError::Local(why))) if self.storage.reset_cache()? => {
                tracing::warn!(error = %why, "cache failed; retrying on a fresh cache");
                self.known_tips.lock().expect("known_tips poisoned").clear();
                self.handle_once(creds, branch, path, op)
            }
            other => other,
        }
    }

    fn handle_once(
        &self,
        creds: Option<&Credentials>,
        branch: Option<&str>,
        path: &str,
        op: Operation,
    ) -> Result<Outcome, BackendError> {
        let branch = branch.unwrap_or(&self.rules.branch);
        match op {
            Operation::GetState => self.get(creds, branch, path),
            Operation::PutState { lock_id, body, force } => {
                self.write(creds, branch, path, Some(body), lock_id.as_deref(), force)
            }
            Operation::DeleteState { lock_id } => self.write(creds, branch, path, None, lock_id.as_deref(), true),
            Operation::Lock(info) => self.lock(creds, path, info),
            Operation::Unlock { id } => self.unlock(creds, path, id.as_deref()),
            Operation::GetLock => match self.holder(creds, path)? {
                Some(h) => Ok(Outcome::LockInfo(h.info)),
                None => Err(BackendError::NoLock),
            },
        }
    }

    fn get(&self, creds: Option<&Credentials>, branch: &str, path: &str) -> Result<Outcome, BackendError> {
        let branch_ref = branch_ref(branch);
        let tips = self.sync(std::slice::from_ref(&branch_ref), creds)?;
        let Some(tip) = tips.get(&branch_ref) else { return Ok(Outcome::NoState) };
        Ok(match self.storage.read_file(*tip, path)? {
            Some(content) if !content.is_empty() => Outcome::State(content.into()),
            _ => Outcome::NoState,
        })
    }

    fn lock(&self, creds: Option<&Credentials>, path: &str, info: LockInfo) -> Result<Outcome, BackendError> {
        let lock_ref = lock_ref(path);
        let message = format!(
            "Lock {path}\n\nLock-ID: {}\nWho: {}\nOperation: {}\n",
            one_line(&info.id),
            one_line(&info.who),
            one_line(&info.operation)
        );
        let commit = self.storage.commit(None, &lock_file(path), Some(&info.raw), &message)?;
        let create = [RefUpdate { name: lock_ref.clone(), old: None, new: Some(commit) }];
        // A rejected create means a lock exists, unless it vanished between our push and our look.
        for _ in 0..self.rules.write_retries.max(1) {
            match self.update(&create, creds)? {
                UpdateOutcome::Applied => {
                    self.remember(commit, info.raw.clone());
                    tracing::info!(lock_id = %info.id, "lock taken");
                    return Ok(Outcome::Done);
                }
                UpdateOutcome::Rejected(_) => match self.holder(creds, path)? {
                    Some(h) if h.id == info.id => return Ok(Outcome::Done),
                    Some(h) => return Err(BackendError::Locked { holder: h.info }),
                    None => jitter(1),
                },
            }
        }
        Err(BackendError::Contended { attempts: self.rules.write_retries.max(1) })
    }

    fn unlock(&self, creds: Option<&Credentials>, path: &str, id: Option<&str>) -> Result<Outcome, BackendError> {
        let lock_ref = lock_ref(path);
        // Usually this process took the lock itself: try the delete against what it knows first.
        let mut guess = match self.guess(std::slice::from_ref(&lock_ref)).and_then(|t| t.get(&lock_ref).copied()) {
            Some(commit) => self.known_holder(commit),
            None => None,
        };
        let mut attempt = 0;
        while attempt < self.rules.write_retries.max(1) {
            let fresh = guess.is_none();
            let holder = match guess.take() {
                Some(h) => Some(h),
                None => {
                    attempt += 1;
                    self.holder(creds, path)?
                }
            };
            let Some(h) = holder else { return Ok(Outcome::Done) };
            if let Some(id) = id {
                if h.id != id {
                    if fresh {
                        return Err(BackendError::WrongLockId { holder: h.info });
                    }
                    continue;
                }
            }
            let delete = [RefUpdate { name: lock_ref.clone(), old: Some(h.commit), new: None }];
            match self.update(&delete, creds)? {
                UpdateOutcome::Applied => {
                    tracing::info!(lock_id = %h.id, forced = id.is_none(), "lock released");
                    return Ok(Outcome::Done);
                }
                UpdateOutcome::Rejected(_) if fresh => jitter(attempt),
                UpdateOutcome::Rejected(_) => {}
            }
        }
        Err(BackendError::Contended { attempts: self.rules.write_retries.max(1) })
    }

    fn write(
        &self,
        creds: Option<&Credentials>,
        branch: &str,
        path: &str,
        content: Option<Bytes>,
        lock_id: Option<&str>,
        force: bool,
    ) -> Result<Outcome, BackendError> {
        let branch_ref = branch_ref(branch);
        let lock_ref = lock_ref(path);
        let started = Instant::now();
        let attempts = self.rules.write_retries.max(1);
        let refs = [branch_ref.clone(), lock_ref.clone()];
        // First try against what this process last saw (one round trip when nobody else wrote);
        // a guess may only lead to a push, never to an answer.
        let mut guess = self.guess(&refs);
        let mut pushes = 0;
        while pushes < attempts {
            let fresh = guess.is_none();
            let tips = match guess.take() {
                Some(t) => t,
                None => self.sync(&refs, creds)?,
            };
            let holder = match tips.get(&lock_ref) {
                Some(commit) => Some(self.holder_at_path(*commit, path)?),
                None => None,
            };
            let decided = |answer: Result<Outcome, BackendError>| if fresh { Some(answer) } else { None };
            let guard = match (lock_id, holder) {
                (Some(id), Some(h)) if h.id == id => Some(h),
                (Some(_), Some(h)) | (None, Some(h)) => match decided(Err(BackendError::Locked { holder: h.info })) {
                    Some(answer) => return answer,
                    None => continue,
                },
                (Some(id), None) => match decided(Err(BackendError::NotLocked(id.to_string()))) {
                    Some(answer) => return answer,
                    None => continue,
                },
                (None, None) => None,
            };
            let base = tips.get(&branch_ref).copied();
            let current = match base {
                Some(tip) => self.storage.read_file(tip, path)?,
                None => None,
            };
            if current.as_deref() == content.as_deref() {
                // A retried write (or deleting what is not there): already in place, nothing to commit.
                match decided(Ok(Outcome::Done)) {
                    Some(answer) => return answer,
                    None => continue,
                }
            }
            if let (Some(stored), Some(incoming)) = (current.as_deref(), content.as_deref()) {
                match guard_serial(stored, incoming) {
                    Verdict::Write => {}
                    Verdict::AlreadyStored => match decided(Ok(Outcome::Done)) {
                        Some(answer) => return answer,
                        None => continue,
                    },
                    Verdict::Refuse(why) if !force => match decided(Err(BackendError::StaleState(why))) {
                        Some(answer) => return answer,
                        None => continue,
                    },
                    Verdict::Refuse(why) => tracing::warn!(reason = %why, "guard overridden with force=true"),
                }
            }
            let message = commit_message(path, content.as_deref(), guard.as_ref());
            let commit = match self.storage.commit(base, path, content.as_deref(), &message) {
                Err(StorageError::Local(e)) if e.starts_with(PATH_CONFLICT) => {
                    match decided(Err(BackendError::PathConflict(e))) {
                        Some(answer) => return answer,
                        None => continue,
                    }
                }
                other => other?,
            };
            let mut updates = vec![RefUpdate { name: branch_ref.clone(), old: base, new: Some(commit) }];
            match &guard {
                // The write lands only if the lock is still this one at that instant (atomic push).
                Some(h) => updates.push(RefUpdate { name: lock_ref.clone(), old: Some(h.commit), new: Some(h.commit) }),
                // No lock may appear meanwhile (checked against the push's own ref advertisement).
                None => updates.push(RefUpdate { name: lock_ref.clone(), old: None, new: None }),
            }
            pushes += 1;
            match self.update(&updates, creds)? {
                UpdateOutcome::Applied => {
                    tracing::info!(
                        attempts = pushes,
                        guessed = !fresh,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "state written"
                    );
                    return Ok(Outcome::Done);
                }
                UpdateOutcome::Rejected(why) => {
                    tracing::info!(attempt = pushes, rejected = ?why, "lost the race for the branch; rebuilding on the new tip");
                    if fresh {
                        jitter(pushes);
                    }
                }
            }
        }
        tracing::warn!(attempts, elapsed_ms = started.elapsed().as_millis() as u64, "write gave up");
        Err(BackendError::Contended { attempts })
    }

    /// Fresh tips from the source of truth, remembered as the latest guess.
    fn sync(&self, refs: &[String], creds: Option<&Credentials>) -> Result<Tips, BackendError> {
        let tips = self.storage.sync(refs, creds)?;
        let mut known = self.known_tips.lock().expect("known_tips poisoned");
        for r in refs {
            known.insert(r.clone(), tips.get(r).copied());
        }
        Ok(tips)
    }

    /// The remembered tips of `refs`, if every one of them has been seen.
    fn guess(&self, refs: &[String]) -> Option<Tips> {
        let known = self.known_tips.lock().expect("known_tips poisoned");
        let mut tips = Tips::new();
        for r in refs {
            if let Some(id) = known.get(r)? {
                tips.insert(r.clone(), *id);
            }
        }
        Some(tips)
    }

    /// Push `updates` and remember what came of it.
    fn update(&self, updates: &[RefUpdate], creds: Option<&Credentials>) -> Result<UpdateOutcome, BackendError> {
        let outcome = self.storage.update(updates, creds)?;
        let mut known = self.known_tips.lock().expect("known_tips poisoned");
        for u in updates {
            match outcome {
                UpdateOutcome::Applied => known.insert(u.name.clone(), u.new),
                UpdateOutcome::Rejected(_) => known.remove(&u.name),
            };
        }
        Ok(outcome)
    }

    fn holder(&self, creds: Option<&Credentials>, path: &str) -> Result<Option<Holder>, BackendError> {
        let lock_ref = lock_ref(path);
        let tips = self.sync(std::slice::from_ref(&lock_ref), creds)?;
        match tips.get(&lock_ref) {
            Some(commit) => Ok(Some(self.holder_at_path(*commit, path)?)),
            None => Ok(None),
        }
    }

    /// The holder at `commit` if its LockInfo is already known, without any I/O.
    fn known_holder(&self, commit: ObjectId) -> Option<Holder> {
        let info = self.lock_infos.lock().expect("lock_infos poisoned").get(&commit).cloned()?;
        Some(Holder { commit, id: lock_id_of(&info), info })
    }

    fn holder_at_path(&self, commit: ObjectId, path: &str) -> Result<Holder, BackendError> {
        let known = self.lock_infos.lock().expect("lock_infos poisoned").get(&commit).cloned();
        let info = match known {
            Some(info) => info,
            None => {
                // A lock branch without a readable LockInfo (made by hand?) still blocks: show what is there.
                let info: Bytes = self.storage.read_file(commit, &lock_file(path))?.unwrap_or_default().into();
                self.remember(commit, info.clone());
                info
            }
        };
        Ok(Holder { commit, id: lock_id_of(&info), info })
    }

    fn remember(&self, commit: ObjectId, info: Bytes) {
        let mut known = self.lock_infos.lock().expect("lock_infos poisoned");
        if known.len() > 10_000 {
            known.clear();
        }
        known.insert(commit, info);
    }
}

/// Prefix of the storage error text for a path that collides with another state's file or directory.
pub const PATH_CONFLICT: &str = "path conflict";

fn branch_ref(branch: &str) -> String {
    format!("refs/heads/{branch}")
}

fn lock_ref(path: &str) -> String {
    format!("refs/heads/locks/{path}")
}

fn lock_file(path: &str) -> String {
    format!("{path}.lock")
}

fn lock_id_of(info: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(info)
        .ok()
        .and_then(|v| v.get("ID").and_then(|id| id.as_str()).map(str::to_string))
        .unwrap_or_default()
}

/// Trailers must stay on one line and short, whatever the client sent.
fn one_line(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).take(200).collect()
}

fn commit_message(path: &str, content: Option<&[u8]>, lock: Option<&Holder>) -> String {
    let mut m = match content {
        Some(_) => format!("Update {path}\n\n"),
        None => format!("Delete {path}\n\n"),
    };
    if let Some(h) = lock {
        let v: serde_json::Value = serde_json::from_slice(&h.info).unwrap_or_default();
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(one_line).unwrap_or_default();
        m.push_str(&format!(
            "Lock-ID: {}\nWho: {}\nOperation: {}\n",
            one_line(&h.id),
            field("Who"),
            field("Operation")
        ));
    }
    if let Some(state) = content.and_then(StateHead::parse) {
        if let Some(serial) = state.serial {
            m.push_str(&format!("Serial: {serial}\n"));
        }
        if let Some(lineage) = state.lineage {
            m.push_str(&format!("Lineage: {}\n", one_line(&lineage)));
        }
    }
    m
}

/// The fields of a state the guard and the trailers need, read without building the whole document.
#[derive(serde::Deserialize)]
struct StateHead {
    serial: Option<u64>,
    lineage: Option<String>,
}

impl StateHead {
    fn parse(state: &[u8]) -> Option<Self> {
        serde_json::from_slice(state).ok()
    }
}

/// Equal as JSON (formatting aside). Only reached for two states of the same serial.
fn same_json(a: &[u8], b: &[u8]) -> bool {
    let parse = |x: &[u8]| serde_json::from_slice::<serde_json::Value>(x).ok();
    matches!((parse(a), parse(b)), (Some(x), Some(y)) if x == y)
}

/// What the lineage/serial guard says about writing `incoming` over `stored`.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Write,
    /// Same serial and the same JSON: a retried write, nothing to do.
    AlreadyStored,
    Refuse(String),
}

/// Terraform's own rule for a persistent state manager: never replace a state of another
/// lineage or a newer serial. Bodies without both fields (e.g. an encrypted envelope) pass.
fn guard_serial(stored: &[u8], incoming: &[u8]) -> Verdict {
    let (Some(old), Some(new)) = (StateHead::parse(stored), StateHead::parse(incoming)) else { return Verdict::Write };
    if let (Some(a), Some(b)) = (&old.lineage, &new.lineage) {
        if a != b {
            return Verdict::Refuse(format!(
                "lineage mismatch: the stored state has lineage {a:?}, the new one {b:?}; this is another state (use ?force=true for a deliberate `state push -force`)"
            ));
        }
    }
    match (old.serial, new.serial) {
        (Some(a), Some(b)) if b < a => Verdict::Refuse(format!(
            "stale serial: the stored state has serial {a}, the new one {b}; someone else wrote in between (use ?force=true for a deliberate `state push -force`)"
        )),
        (Some(a), Some(b)) if a == b && !same_json(stored, incoming) => Verdict::Refuse(format!(
            "serial {a} is already stored with different content; a new state needs a higher serial"
        )),
        (Some(a), Some(b)) if a == b => Verdict::AlreadyStored,
        _ => Verdict::Write,
    }
}

/// Back off before retrying a lost race: grows with the attempt, randomised so racers spread out.
fn jitter(attempt: u32) {
    let ceiling = 10u64 * (1 << attempt.min(6));
    std::thread::sleep(Duration::from_millis(fastrand::u64(1..=ceiling)));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(lineage: &str, serial: u64, v: &str) -> Vec<u8> {
        format!(r#"{{"version":4,"lineage":"{lineage}","serial":{serial},"outputs":{{"x":"{v}"}}}}"#).into_bytes()
    }

    #[test]
    fn serial_and_lineage_guard() {
        assert_eq!(guard_serial(&st("L", 1, "a"), &st("L", 2, "b")), Verdict::Write);
        assert!(
            matches!(guard_serial(&st("L", 1, "a"), &st("M", 2, "b")), Verdict::Refuse(w) if w.contains("\"L\"") && w.contains("\"M\""))
        );
        assert!(
            matches!(guard_serial(&st("L", 3, "a"), &st("L", 2, "b")), Verdict::Refuse(w) if w.contains('3') && w.contains('2'))
        );
        assert!(matches!(guard_serial(&st("L", 3, "a"), &st("L", 3, "b")), Verdict::Refuse(_)));
        // Same JSON, other formatting: a retry.
        let pretty =
            serde_json::to_vec_pretty(&serde_json::from_slice::<serde_json::Value>(&st("L", 3, "a")).unwrap()).unwrap();
        assert_eq!(guard_serial(&st("L", 3, "a"), &pretty), Verdict::AlreadyStored);
        // No serial/lineage (an encrypted envelope): stored as it is.
        assert_eq!(guard_serial(&st("L", 3, "a"), br#"{"encrypted_data":"xyz"}"#), Verdict::Write);
    }
}
