//! The versions of one state, read from commits alone (trailers, no blob per version),
//! walking first parents from the branch tip and deepening a shallow cache only as far as a
//! page needs; an old version by commit id; a restore of one as a new version.

use bytes::Bytes;

use super::decide::{StateBody, Write};
use super::{Backend, BackendError, LockName, Outcome};
use crate::storage::{CommitInfo, ObjectId, RequestContext};

/// Commits walked at most looking for a version or a `before` commit: the longest history
/// gitstate reads, so that an unknown commit id cannot make it fetch an unbounded history
/// (the request's deadline bounds it too).
const MAX_WALK: usize = 50_000;

/// One version of a state, as the history lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Version {
    pub commit: String,
    /// Committer time, seconds since the epoch.
    pub time: i64,
    pub deleted: bool,
    pub serial: Option<u64>,
    pub lineage: Option<String>,
    pub who: Option<String>,
    pub operation: Option<String>,
    pub lock_id: Option<String>,
    /// The commit's subject (`Update <path>`, `Delete <path>`, `Restore <path> to <commit>`).
    pub subject: String,
}

impl Version {
    fn of(commit: &CommitInfo, deleted: bool) -> Self {
        let trailers = super::trailers::Trailers::read(&commit.message);
        Version {
            commit: commit.id.to_string(),
            time: commit.time,
            deleted,
            serial: trailers.serial,
            lineage: trailers.lineage,
            who: trailers.who,
            operation: trailers.operation,
            lock_id: trailers.lock_id,
            subject: commit.message.lines().next().unwrap_or_default().to_owned(),
        }
    }
}

/// A page of history: newest first; `next` is the `before` of the following page.
#[derive(Debug, serde::Serialize)]
pub struct Page {
    pub path: String,
    pub versions: Vec<Version>,
    pub next: Option<String>,
}

/// First parents from a tip, with each commit's position, deepening the store on demand.
struct Walk<'a> {
    backend: &'a Backend,
    ctx: &'a RequestContext,
    reference: &'a str,
    /// Commits of history known to be readable, counted from the tip.
    depth: u32,
    next: Option<(ObjectId, u32)>,
}

impl<'a> Walk<'a> {
    fn new(backend: &'a Backend, ctx: &'a RequestContext, reference: &'a str, tip: ObjectId, want: u32) -> Self {
        Walk { backend, ctx, reference, depth: want.max(2), next: Some((tip, 0)) }
    }

    /// The commit at `position`, deepening when the store does not have it yet. `None`: the
    /// history ends (the commit is beyond what the host has).
    fn load(&mut self, id: ObjectId, position: u32) -> Result<Option<CommitInfo>, BackendError> {
        if let Some(c) = self.backend.storage.commit_info(id)? {
            return Ok(Some(c));
        }
        if self.ctx.out_of_time() {
            return Err(BackendError::DeadlineExceeded { pushes: 0 });
        }
        // Deepen in growing steps: one round trip per page, not per commit.
        self.depth = self.depth.max(position + 2).saturating_mul(2);
        self.backend.storage.deepen(self.ctx, self.reference, self.depth)?;
        Ok(self.backend.storage.commit_info(id)?)
    }

    /// The next commit and its first parent (loaded too, so a change can be told).
    fn step(&mut self) -> Result<Option<(CommitInfo, Option<ObjectId>)>, BackendError> {
        let Some((id, position)) = self.next.take() else { return Ok(None) };
        let Some(commit) = self.load(id, position)? else { return Ok(None) };
        let parent = commit.parents.first().copied();
        if let Some(p) = parent {
            if self.load(p, position + 1)?.is_some() {
                self.next = Some((p, position + 1));
            }
        }
        let parent = self.next.map(|(p, _)| p);
        Ok(Some((commit, parent)))
    }
}

impl Backend {
    /// Up to `limit` versions of `path`, newest first, older than `before` when given.
    pub(super) fn history(
        &self,
        ctx: &RequestContext,
        branch: &str,
        path: &str,
        limit: usize,
        before: Option<ObjectId>,
    ) -> Result<Outcome, BackendError> {
        Ok(Outcome::Json(to_json(&self.history_page(ctx, branch, path, limit, before)?)))
    }

    /// [`Backend::history`] as a typed page.
    pub(super) fn history_page(
        &self,
        ctx: &RequestContext,
        branch: &str,
        path: &str,
        limit: usize,
        before: Option<ObjectId>,
    ) -> Result<Page, BackendError> {
        let reference = super::branch_ref(branch);
        let tips = self.fetch_tips(ctx, std::slice::from_ref(&reference))?;
        let mut page = Page { path: path.to_owned(), versions: Vec::new(), next: None };
        let Some(&tip) = tips.get(&reference) else {
            return match before {
                Some(id) => Err(BackendError::UnknownCursor(id)),
                None => Ok(page),
            };
        };
        let mut walk = Walk::new(self, ctx, &reference, tip, (limit as u32).saturating_add(2));
        let mut skipping = before.is_some();
        let mut walked = 0;
        while let Some((commit, parent)) = walk.step()? {
            walked += 1;
            if walked > MAX_WALK {
                break;
            }
            if skipping {
                skipping = Some(commit.id) != before;
                continue;
            }
            let here = self.storage.file_id(commit.id, path)?;
            let there = match parent {
                Some(p) => self.storage.file_id(p, path)?,
                None => None,
            };
            if here == there {
                continue;
            }
            if page.versions.len() == limit {
                page.next = page.versions.last().map(|v| v.commit.clone());
                break;
            }
            page.versions.push(Version::of(&commit, here.is_none()));
        }
        // A cursor never met is no end of history: a client would stop paging for good.
        if let (true, Some(id)) = (skipping, before) {
            return Err(BackendError::UnknownCursor(id));
        }
        Ok(page)
    }

    /// The state as it was stored at `commit`, which must be in the branch's history.
    pub(super) fn version(
        &self,
        ctx: &RequestContext,
        branch: &str,
        path: &str,
        commit: ObjectId,
    ) -> Result<Outcome, BackendError> {
        match self.stored_at(ctx, branch, path, commit)? {
            Some(plain) => Ok(Outcome::State(super::checked_state(path, plain)?)),
            None => Err(BackendError::NoSuchVersion),
        }
    }

    fn stored_at(
        &self,
        ctx: &RequestContext,
        branch: &str,
        path: &str,
        commit: ObjectId,
    ) -> Result<Option<Bytes>, BackendError> {
        let reference = super::branch_ref(branch);
        let tips = self.fetch_tips(ctx, std::slice::from_ref(&reference))?;
        let Some(&tip) = tips.get(&reference) else { return Ok(None) };
        let mut walk = Walk::new(self, ctx, &reference, tip, 64);
        let mut walked = 0;
        while let Some((c, _)) = walk.step()? {
            walked += 1;
            if c.id == commit {
                return match self.storage.read_file(commit, path)? {
                    Some(stored) if !stored.is_empty() => Ok(Some(self.sealing.open(ctx, &stored)?.to_vec().into())),
                    _ => Ok(None),
                };
            }
            if walked > MAX_WALK {
                break;
            }
        }
        Ok(None)
    }

    /// Write the version at `commit` back as a new version: its content with a serial above
    /// the current one, in a commit `Restore <path> to <commit>`.
    pub(super) fn restore(
        &self,
        ctx: &RequestContext,
        branch: &str,
        lock: &LockName,
        commit: ObjectId,
        lock_id: Option<&str>,
        force: bool,
    ) -> Result<Outcome, BackendError> {
        let path = lock.path.as_str();
        let old = self.stored_at(ctx, branch, path, commit)?.ok_or(BackendError::NoSuchVersion)?;
        let mut state: serde_json::Value = serde_json::from_slice(&old)
            .map_err(|_| BackendError::NotRestorable("that version is not a JSON state"))?;
        let current = match self.get(ctx, branch, path)? {
            Outcome::State(body) => serde_json::from_slice::<serde_json::Value>(&body).ok(),
            _ => None,
        };
        let current_serial = current.as_ref().and_then(|c| c.get("serial")).and_then(serde_json::Value::as_u64);
        let old_serial = state.get("serial").and_then(serde_json::Value::as_u64);
        let Some(object) = state.as_object_mut() else {
            return Err(BackendError::NotRestorable("that version is not a JSON object"));
        };
        let serial = current_serial.max(old_serial).map_or(1, |s| s.saturating_add(1));
        object.insert("serial".into(), serial.into());
        let mut body = serde_json::to_vec_pretty(&state).expect("a JSON value serializes");
        body.push(b'\n');
        let body = StateBody::check(body.into())
            .map_err(|_| BackendError::NotRestorable("that version is not a state document"))?;
        let subject = format!("Restore {path} to {commit}");
        let write = Write { path, content: Some(&body), lock_id, force, subject: Some(&subject) };
        self.write(ctx, branch, lock, &write)
    }
}

fn to_json(page: &Page) -> Bytes {
    let mut body = serde_json::to_vec_pretty(page).expect("a page serializes");
    body.push(b'\n');
    Bytes::from(body)
}
