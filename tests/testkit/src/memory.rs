//! [`MemoryStore`]: the whole [`Storage`] contract in memory (refs, commits with their file
//! trees, typed path conflicts, all-or-nothing compare-and-swap with guards and absence checks),
//! with inspection helpers and injected faults, so the backend rules are tested in milliseconds.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use gitstate::storage::{ObjectId, RefUpdate, RequestContext, Storage, StorageError, Tips, UpdateOutcome};

/// How often a delayed sync looks at the request's deadline.
const DELAY_STEP: Duration = Duration::from_millis(5);

/// One commit: its parent, the files of its tree (path → content) and its message.
#[derive(Debug, Clone)]
struct Commit {
    parent: Option<ObjectId>,
    files: BTreeMap<String, Vec<u8>>,
    message: String,
    /// Seconds since the epoch when it was written (what the web view shows as a lock's age).
    time: i64,
}

#[derive(Default)]
struct Inner {
    refs: BTreeMap<String, ObjectId>,
    commits: HashMap<ObjectId, Commit>,
    /// Every file content ever committed, by its git blob id.
    blobs: HashMap<ObjectId, Vec<u8>>,
    next_id: u64,
}

/// Another writer's commit, landed right before our next update.
struct Move {
    reference: String,
    path: String,
    content: Vec<u8>,
}

#[derive(Default)]
struct Faults {
    /// Updates still to reject as lost races although they would apply.
    reject_updates: u32,
    /// Commits of another writer to land at the start of the next update.
    moves: Vec<Move>,
    fail_syncs: Option<fn() -> StorageError>,
    fail_updates: Option<fn() -> StorageError>,
    sync_delay: Duration,
}

/// An in-memory [`Storage`]; see the module docs. Ref arguments of the helpers take a full
/// name (`refs/heads/locks/a`) or a branch name (`main`, meaning `refs/heads/main`).
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    faults: Mutex<Faults>,
    syncs: AtomicU64,
    updates: AtomicU64,
}

/// `name` as a full ref name: as it is when it starts with `refs/`, else a branch.
pub fn full_ref(name: &str) -> String {
    if name.starts_with("refs/") {
        name.to_string()
    } else {
        format!("refs/heads/{name}")
    }
}

impl Inner {
    fn commit(&self, id: ObjectId) -> Result<&Commit, StorageError> {
        self.commits.get(&id).ok_or_else(|| StorageError::Local(format!("no commit {id} in the memory store")))
    }

    fn write_commit(
        &mut self,
        parent: Option<ObjectId>,
        path: &str,
        content: Option<&[u8]>,
        message: &str,
    ) -> Result<ObjectId, StorageError> {
        if path.is_empty() || path.starts_with('/') || path.split('/').any(str::is_empty) {
            return Err(StorageError::Local(format!("invalid tree path {path:?}")));
        }
        let mut files = match parent {
            Some(p) => self.commit(p)?.files.clone(),
            None => BTreeMap::new(),
        };
        check_no_collision(&files, path)?;
        match content {
            Some(c) => {
                self.blobs.insert(blob_id(c), c.to_vec());
                files.insert(path.to_string(), c.to_vec())
            }
            None => files.remove(path),
        };
        self.next_id += 1;
        let mut bytes = [0u8; 20];
        bytes[..4].copy_from_slice(b"mem\0");
        bytes[12..].copy_from_slice(&self.next_id.to_be_bytes());
        let id = ObjectId::from_bytes_or_panic(&bytes);
        let time = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        self.commits.insert(id, Commit { parent, files, message: message.to_string(), time });
        Ok(id)
    }
}

/// The git blob id of `content`.
fn blob_id(content: &[u8]) -> ObjectId {
    gix::objs::compute_hash(gix::hash::Kind::Sha1, gix::objs::Kind::Blob, content).expect("hashing")
}

/// As git trees allow: a state's file cannot become a directory of other states, nor the reverse.
fn check_no_collision(files: &BTreeMap<String, Vec<u8>>, path: &str) -> Result<(), StorageError> {
    let mut prefix = String::new();
    let components: Vec<&str> = path.split('/').collect();
    for (i, c) in components.iter().enumerate() {
        if i > 0 {
            prefix.push('/');
        }
        prefix.push_str(c);
        let last = i + 1 == components.len();
        if !last && files.contains_key(&prefix) {
            return Err(StorageError::PathConflict { path: path.into(), blocker: prefix, blocker_is_state: true });
        }
        if last {
            let dir = format!("{prefix}/");
            if files.range(dir.clone()..).next().is_some_and(|(f, _)| f.starts_with(&dir)) {
                return Err(StorageError::PathConflict { path: path.into(), blocker: prefix, blocker_is_state: false });
            }
        }
    }
    Ok(())
}

fn check_ref_name(name: &str) -> Result<(), StorageError> {
    if !name.starts_with("refs/") || gix::validate::reference::name(name.into()).is_err() {
        return Err(StorageError::Local(format!("invalid ref name {name:?}")));
    }
    Ok(())
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("memory store poisoned")
    }

    fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.faults.lock().expect("memory store faults poisoned")
    }

    // --- setting up and inspecting -------------------------------------------------------

    /// Commit `content` at `path` (removed when `None`) on top of `reference` and move it
    /// there, as another writer would. Panics on a path conflict or an invalid name.
    pub fn put(&self, reference: &str, path: &str, content: Option<&[u8]>, message: &str) -> ObjectId {
        let name = full_ref(reference);
        check_ref_name(&name).unwrap_or_else(|e| panic!("{e}"));
        let mut inner = self.inner();
        let parent = inner.refs.get(&name).copied();
        let id = inner.write_commit(parent, path, content, message).unwrap_or_else(|e| panic!("put {path}: {e}"));
        inner.refs.insert(name, id);
        id
    }

    /// One commit on top of `reference` setting every file of `files` (path, content), moved
    /// there: a large repository built in one step.
    pub fn put_files(
        &self,
        reference: &str,
        files: impl IntoIterator<Item = (String, Vec<u8>)>,
        message: &str,
    ) -> ObjectId {
        let name = full_ref(reference);
        check_ref_name(&name).unwrap_or_else(|e| panic!("{e}"));
        let mut inner = self.inner();
        let parent = inner.refs.get(&name).copied();
        let mut all = match parent {
            Some(p) => inner.commits[&p].files.clone(),
            None => BTreeMap::new(),
        };
        for (path, content) in files {
            let id = blob_id(&content);
            inner.blobs.insert(id, content.clone());
            all.insert(path, content);
        }
        inner.next_id += 1;
        let mut bytes = [0u8; 20];
        bytes[..4].copy_from_slice(b"mem\0");
        bytes[12..].copy_from_slice(&inner.next_id.to_be_bytes());
        let id = ObjectId::from_bytes_or_panic(&bytes);
        let time = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        inner.commits.insert(id, Commit { parent, files: all, message: message.to_string(), time });
        inner.refs.insert(name, id);
        id
    }

    /// The tip of `reference`, `None` when it does not exist.
    pub fn tip(&self, reference: &str) -> Option<ObjectId> {
        self.inner().refs.get(&full_ref(reference)).copied()
    }

    /// The file at `path` on the tip of `reference`.
    pub fn file(&self, reference: &str, path: &str) -> Option<Vec<u8>> {
        let inner = self.inner();
        let tip = inner.refs.get(&full_ref(reference))?;
        inner.commits[tip].files.get(path).cloned()
    }

    /// The paths of every file on the tip of `reference` (sorted).
    pub fn files(&self, reference: &str) -> Vec<String> {
        let inner = self.inner();
        inner
            .refs
            .get(&full_ref(reference))
            .map(|tip| inner.commits[tip].files.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The message of `commit`.
    pub fn message(&self, commit: ObjectId) -> Option<String> {
        self.inner().commits.get(&commit).map(|c| c.message.clone())
    }

    /// The parent of `commit`.
    pub fn parent(&self, commit: ObjectId) -> Option<ObjectId> {
        self.inner().commits.get(&commit).and_then(|c| c.parent)
    }

    /// The commits of `reference`, tip first (empty when it does not exist).
    pub fn history(&self, reference: &str) -> Vec<ObjectId> {
        let inner = self.inner();
        let mut out = Vec::new();
        let mut next = inner.refs.get(&full_ref(reference)).copied();
        while let Some(id) = next {
            out.push(id);
            next = inner.commits[&id].parent;
        }
        out
    }

    /// Every ref and its tip. Commits never change, so equal maps mean equal contents.
    pub fn refs(&self) -> BTreeMap<String, ObjectId> {
        self.inner().refs.clone()
    }

    /// Commits written so far, reachable or not (a lost race leaves its commit behind, as git does).
    pub fn commit_count(&self) -> usize {
        self.inner().commits.len()
    }

    /// Calls of [`Storage::sync`] so far.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Calls of [`Storage::update`] so far (push attempts, applied or not).
    pub fn updates(&self) -> u64 {
        self.updates.load(Ordering::Relaxed)
    }

    // --- faults --------------------------------------------------------------------------

    /// Reject the next `n` updates as lost races even though they would apply (another
    /// writer keeps winning). Replaces any count still pending; 0 stops.
    pub fn reject_next_updates(&self, n: u32) {
        self.faults().reject_updates = n;
    }

    /// Right before the next update is checked, another writer commits `content` at `path`
    /// on `reference` (see [`MemoryStore::put`]): the update's compare-and-swap truly fails
    /// if it expected the old tip. Several calls queue several commits for that one update.
    pub fn move_branch_before_next_update(&self, reference: &str, path: &str, content: impl Into<Vec<u8>>) {
        self.faults().moves.push(Move {
            reference: full_ref(reference),
            path: path.to_string(),
            content: content.into(),
        });
    }

    /// Make every sync fail with the error `f` returns (e.g. host unavailable); `None` heals.
    pub fn fail_syncs_with(&self, f: Option<fn() -> StorageError>) {
        self.faults().fail_syncs = f;
    }

    /// Make every update fail with the error `f` returns; `None` heals.
    pub fn fail_updates_with(&self, f: Option<fn() -> StorageError>) {
        self.faults().fail_updates = f;
    }

    /// Make every sync take `delay`, giving up with [`StorageError::DeadlineExceeded`] as
    /// soon as the request is out of time (checked every few milliseconds). Zero: no delay.
    pub fn sync_delay(&self, delay: Duration) {
        self.faults().sync_delay = delay;
    }
}

impl Storage for MemoryStore {
    fn fetch_tips(&self, ctx: &RequestContext, refs: &[String]) -> Result<Tips, StorageError> {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        let (delay, fail) = {
            let f = self.faults();
            (f.sync_delay, f.fail_syncs)
        };
        let started = Instant::now();
        let waited = (|| {
            while started.elapsed() < delay {
                if ctx.out_of_time() {
                    return Err(StorageError::DeadlineExceeded("while syncing with the memory store"));
                }
                std::thread::sleep(DELAY_STEP.min(delay.saturating_sub(started.elapsed())));
            }
            Ok(())
        })();
        ctx.counters.record(started.elapsed());
        waited?;
        if let Some(f) = fail {
            return Err(f());
        }
        for name in refs {
            check_ref_name(name)?;
        }
        let inner = self.inner();
        Ok(refs.iter().filter_map(|r| inner.refs.get(r).map(|id| (r.clone(), *id))).collect())
    }

    fn read_file(&self, commit: ObjectId, path: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.inner().commit(commit)?.files.get(path).cloned())
    }

    fn commit_info(&self, id: ObjectId) -> Result<Option<gitstate::storage::CommitInfo>, StorageError> {
        let inner = self.inner();
        Ok(inner.commits.get(&id).map(|c| gitstate::storage::CommitInfo {
            id,
            parents: c.parent.into_iter().collect(),
            time: c.time,
            message: c.message.clone(),
        }))
    }

    fn file_id(&self, commit: ObjectId, path: &str) -> Result<Option<ObjectId>, StorageError> {
        let content = self.inner().commit(commit)?.files.get(path).cloned();
        Ok(content.map(|c| gix::objs::compute_hash(gix::hash::Kind::Sha1, gix::objs::Kind::Blob, &c).expect("hashing")))
    }

    fn commit(
        &self,
        parent: Option<ObjectId>,
        path: &str,
        content: Option<&[u8]>,
        message: &str,
    ) -> Result<ObjectId, StorageError> {
        self.inner().write_commit(parent, path, content, message)
    }

    fn update(&self, ctx: &RequestContext, updates: &[RefUpdate]) -> Result<UpdateOutcome, StorageError> {
        self.updates.fetch_add(1, Ordering::Relaxed);
        ctx.counters.record(Duration::ZERO);
        {
            let inner = self.inner();
            for (i, u) in updates.iter().enumerate() {
                check_ref_name(&u.name)?;
                if updates[..i].iter().any(|v| v.name == u.name) {
                    return Err(StorageError::Local(format!("{} updated twice in one set", u.name)));
                }
                if let Some(new) = u.new {
                    inner.commit(new)?;
                }
            }
        }
        let (fail, moves, reject) = {
            let mut f = self.faults();
            let reject = f.reject_updates > 0;
            if reject {
                f.reject_updates -= 1;
            }
            (f.fail_updates, std::mem::take(&mut f.moves), reject)
        };
        if let Some(f) = fail {
            return Err(f());
        }
        for m in moves {
            self.put(&m.reference, &m.path, Some(&m.content), &format!("Update {}\n\nWho: another writer\n", m.path));
        }
        if reject {
            let why = "rejected by fault injection: another writer won".to_string();
            return Ok(UpdateOutcome::Rejected(updates.iter().map(|u| (u.name.clone(), why.clone())).collect()));
        }

        let mut inner = self.inner();
        // All or nothing: every ref (guards and absence checks included) must be at its old value.
        let stale: Vec<(String, String)> = updates
            .iter()
            .filter(|u| inner.refs.get(&u.name) != u.old.as_ref())
            .map(|u| {
                let why = match (u.old, inner.refs.get(&u.name)) {
                    (None, Some(actual)) => format!("already exists at {actual}"),
                    (Some(_), None) => "does not exist".to_string(),
                    (_, actual) => format!("is at {actual:?}, not at {:?}", u.old),
                };
                (u.name.clone(), why)
            })
            .collect();
        if !stale.is_empty() {
            return Ok(UpdateOutcome::Rejected(stale));
        }
        let mut after = inner.refs.clone();
        for u in updates {
            match u.new {
                Some(new) => after.insert(u.name.clone(), new),
                None => after.remove(&u.name),
            };
        }
        // Git keeps refs as files: `refs/heads/a` and `refs/heads/a/b` cannot both exist.
        // receive-pack reports that as "failed to update ref", which the remote store takes for a lost race.
        for u in updates.iter().filter(|u| u.new.is_some() && !inner.refs.contains_key(&u.name)) {
            if let Some(other) =
                after.keys().find(|o| o.starts_with(&format!("{}/", u.name)) || u.name.starts_with(&format!("{o}/")))
            {
                return Ok(UpdateOutcome::Rejected(vec![(
                    u.name.clone(),
                    format!("failed to update ref: {other} exists"),
                )]));
            }
        }
        inner.refs = after;
        Ok(UpdateOutcome::Applied)
    }

    fn read_blob(&self, id: ObjectId) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.inner().blobs.get(&id).cloned())
    }

    fn list_files(
        &self,
        commit: ObjectId,
        after: Option<&str>,
        limit: usize,
    ) -> Result<gitstate::storage::FilePage, StorageError> {
        let inner = self.inner();
        let files = &inner.commit(commit)?.files;
        let mut page = gitstate::storage::FilePage::default();
        let start = match after {
            Some(a) => std::ops::Bound::Excluded(a.to_string()),
            None => std::ops::Bound::Unbounded,
        };
        for (path, content) in files.range((start, std::ops::Bound::Unbounded)) {
            if page.files.len() >= limit {
                page.more = true;
                break;
            }
            let id = blob_id(content);
            page.files.push(gitstate::storage::TreeFile { path: path.clone(), id, size: content.len() as u64 });
        }
        Ok(page)
    }

    fn list_refs(
        &self,
        ctx: &RequestContext,
        prefix: &str,
        limit: usize,
    ) -> Result<gitstate::storage::RefListing, StorageError> {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        ctx.counters.record(Duration::ZERO);
        if let Some(f) = self.faults().fail_syncs {
            return Err(f());
        }
        let inner = self.inner();
        let mut listing = gitstate::storage::RefListing::default();
        for (name, id) in inner.refs.range(prefix.to_string()..).take_while(|(n, _)| n.starts_with(prefix)) {
            if listing.tips.len() >= limit {
                listing.truncated = true;
                break;
            }
            listing.tips.insert(name.clone(), *id);
        }
        Ok(listing)
    }

    fn describe(&self) -> String {
        "memory store".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(name: &str, old: Option<ObjectId>, new: Option<ObjectId>) -> RefUpdate {
        RefUpdate { name: name.into(), old, new }
    }

    #[test]
    fn compare_and_swap_is_all_or_nothing() {
        let s = MemoryStore::new();
        let ctx = RequestContext::unbounded();
        let a = s.commit(None, "a", Some(b"1"), "Update a").unwrap();
        let b = s.commit(Some(a), "b", Some(b"2"), "Update b").unwrap();
        assert_eq!(s.update(&ctx, &[update("refs/heads/main", None, Some(a))]).unwrap(), UpdateOutcome::Applied);
        // Creating an existing ref, and a guard on a missing ref, reject the whole set.
        let out = s
            .update(
                &ctx,
                &[update("refs/heads/main", Some(a), Some(b)), update("refs/heads/locks/x", Some(a), Some(a))],
            )
            .unwrap();
        assert!(matches!(out, UpdateOutcome::Rejected(ref v) if v.len() == 1 && v[0].0 == "refs/heads/locks/x"));
        assert_eq!(s.tip("main"), Some(a));
        // An absence check that holds, then one that does not.
        let ok = [update("refs/heads/main", Some(a), Some(b)), update("refs/heads/locks/x", None, None)];
        assert_eq!(s.update(&ctx, &ok).unwrap(), UpdateOutcome::Applied);
        assert_eq!(s.tip("locks/x"), None);
        s.put("locks/x", "x.lock", Some(b"{}"), "Lock x");
        let c = s.commit(Some(b), "c", Some(b"3"), "Update c").unwrap();
        let out =
            s.update(&ctx, &[update("refs/heads/main", Some(b), Some(c)), update("refs/heads/locks/x", None, None)]);
        assert!(matches!(out.unwrap(), UpdateOutcome::Rejected(_)));
        assert_eq!(s.tip("main"), Some(b));
        assert_eq!(s.file("main", "b").as_deref(), Some(&b"2"[..]));
        assert_eq!(s.history("main"), vec![b, a]);
        // Delete with the right old value; invalid names are errors.
        let lock = s.tip("locks/x");
        assert_eq!(s.update(&ctx, &[update("refs/heads/locks/x", lock, None)]).unwrap(), UpdateOutcome::Applied);
        assert!(s.update(&ctx, &[update("refs/heads/a..b", None, Some(a))]).is_err());
        assert!(s.update(&ctx, &[update("main", None, Some(a))]).is_err());
    }

    #[test]
    fn path_conflicts_are_typed() {
        let s = MemoryStore::new();
        let a = s.commit(None, "a", Some(b"1"), "Update a").unwrap();
        match s.commit(Some(a), "a/b", Some(b"2"), "Update a/b") {
            Err(StorageError::PathConflict { blocker, blocker_is_state: true, .. }) => assert_eq!(blocker, "a"),
            other => panic!("{other:?}"),
        }
        let ab = s.commit(None, "a/b", Some(b"2"), "Update a/b").unwrap();
        match s.commit(Some(ab), "a", Some(b"1"), "Update a") {
            Err(StorageError::PathConflict { blocker, blocker_is_state: false, .. }) => assert_eq!(blocker, "a"),
            other => panic!("{other:?}"),
        }
        // A sibling whose name only starts like the path is no conflict.
        assert!(s.commit(Some(ab), "a.b", Some(b"3"), "Update a.b").is_ok());
        assert!(s.commit(Some(a), "ab/c", Some(b"3"), "Update ab/c").is_ok());
    }

    #[test]
    fn faults() {
        let s = MemoryStore::new();
        let ctx = RequestContext::unbounded();
        let a = s.commit(None, "a", Some(b"1"), "Update a").unwrap();
        s.reject_next_updates(1);
        assert!(matches!(
            s.update(&ctx, &[update("refs/heads/main", None, Some(a))]).unwrap(),
            UpdateOutcome::Rejected(_)
        ));
        assert_eq!(s.update(&ctx, &[update("refs/heads/main", None, Some(a))]).unwrap(), UpdateOutcome::Applied);
        s.move_branch_before_next_update("main", "other", b"x".to_vec());
        let b = s.commit(Some(a), "b", Some(b"2"), "Update b").unwrap();
        assert!(matches!(
            s.update(&ctx, &[update("refs/heads/main", Some(a), Some(b))]).unwrap(),
            UpdateOutcome::Rejected(_)
        ));
        assert_eq!(s.files("main"), vec!["a".to_string(), "other".to_string()]);
        s.fail_syncs_with(Some(|| StorageError::HostUnavailable("down".into())));
        assert!(matches!(s.fetch_tips(&ctx, &["refs/heads/main".into()]), Err(StorageError::HostUnavailable(_))));
        s.fail_syncs_with(None);
        s.sync_delay(Duration::from_secs(10));
        let short = RequestContext::new(None, gitstate::context::Deadline::after(Duration::from_millis(30)));
        let started = Instant::now();
        assert!(matches!(s.fetch_tips(&short, &["refs/heads/main".into()]), Err(StorageError::DeadlineExceeded(_))));
        assert!(started.elapsed() < Duration::from_millis(500));
        assert_eq!((s.syncs(), s.updates()), (2, 3));
    }
}
