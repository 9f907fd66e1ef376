//! The embedded store of `gitstate serve`: a bare repository on local disk that is its
//! own source of truth. Objects are written through gix; refs move by gix ref
//! transactions, whose expected previous values are the compare-and-swap.

use std::path::{Path, PathBuf};

use gix::refs::transaction::{Change, LogChange, PreviousValue, RefEdit, RefLog};
use gix::refs::Target;

use super::tree::{self, Author};
use crate::storage::{ObjectId, RefUpdate, RequestContext, Storage, StorageError, Tips, UpdateOutcome};

pub struct EmbeddedStore {
    repo: gix::ThreadSafeRepository,
    dir: PathBuf,
    author: Author,
}

impl EmbeddedStore {
    /// The bare repository at `dir`, created when missing.
    pub fn open(dir: &Path, author: Author) -> Result<Self, StorageError> {
        Ok(EmbeddedStore { repo: tree::open_or_init_bare(dir)?, dir: dir.to_owned(), author })
    }

    fn local(&self) -> gix::Repository {
        self.repo.to_thread_local()
    }

    fn edit(u: &RefUpdate) -> Result<RefEdit, StorageError> {
        let name: gix::refs::FullName =
            u.name.as_str().try_into().map_err(|_| StorageError::Local(format!("invalid ref name {:?}", u.name)))?;
        let expected = match u.old {
            Some(old) => PreviousValue::MustExistAndMatch(Target::Object(old)),
            None => PreviousValue::MustNotExist,
        };
        let change = match u.new {
            Some(new) => Change::Update {
                log: LogChange { mode: RefLog::AndReference, force_create_reflog: false, message: "gitstate".into() },
                expected,
                new: Target::Object(new),
            },
            None => Change::Delete { expected, log: RefLog::AndReference },
        };
        Ok(RefEdit { change, name, deref: false })
    }
}

/// A ref lock file is held for milliseconds; one this old was left behind.
const STALE_LOCK_FILE: std::time::Duration = std::time::Duration::from_secs(10);

impl EmbeddedStore {
    fn stale_lock_file(&self, updates: &[RefUpdate]) -> Option<PathBuf> {
        updates
            .iter()
            .map(|u| self.dir.join(format!("{}.lock", u.name)))
            .chain([self.dir.join("packed-refs.lock")])
            .find(|file| {
                std::fs::metadata(file)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > STALE_LOCK_FILE)
            })
    }
}

impl EmbeddedStore {
    /// An existing ref that `name` would nest with, if any.
    fn nesting_ref(repo: &gix::Repository, name: &str) -> Result<Option<String>, StorageError> {
        let mut prefix = String::new();
        let components: Vec<&str> = name.split('/').collect();
        for c in &components[..components.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(c);
            if prefix.matches('/').count() >= 2
                && repo.try_find_reference(prefix.as_str()).map_err(StorageError::local)?.is_some()
            {
                return Ok(Some(prefix));
            }
        }
        let below = format!("{name}/");
        let platform = repo.references().map_err(StorageError::local)?;
        let mut iter = platform.prefixed(below.as_str()).map_err(StorageError::local)?;
        Ok(iter.next().and_then(Result::ok).map(|r| r.name().as_bstr().to_string()))
    }
}

impl Storage for EmbeddedStore {
    fn fetch_tips(&self, _ctx: &RequestContext, refs: &[String]) -> Result<Tips, StorageError> {
        let repo = self.local();
        let mut tips = Tips::new();
        for name in refs {
            if let Some(r) = repo.try_find_reference(name.as_str()).map_err(StorageError::local)? {
                let id = r.into_fully_peeled_id().map_err(StorageError::local)?;
                tips.insert(name.clone(), id.detach());
            }
        }
        Ok(tips)
    }

    fn read_file(&self, commit: ObjectId, path: &str) -> Result<Option<Vec<u8>>, StorageError> {
        tree::read_file(&self.local(), commit, path)
    }

    fn commit_info(&self, id: ObjectId) -> Result<Option<crate::storage::CommitInfo>, StorageError> {
        tree::commit_info(&self.local(), id)
    }

    fn file_id(&self, commit: ObjectId, path: &str) -> Result<Option<ObjectId>, StorageError> {
        tree::file_id(&self.local(), commit, path)
    }

    fn commit(
        &self,
        parent: Option<ObjectId>,
        path: &str,
        content: Option<&[u8]>,
        message: &str,
    ) -> Result<ObjectId, StorageError> {
        tree::write_commit(&self.local(), &self.author, parent, path, content, message)
    }

    fn update(&self, _ctx: &RequestContext, updates: &[RefUpdate]) -> Result<UpdateOutcome, StorageError> {
        let repo = self.local();
        for u in updates.iter().filter(|u| u.is_absence_check()) {
            if repo.try_find_reference(u.name.as_str()).map_err(StorageError::local)?.is_some() {
                return Ok(UpdateOutcome::Rejected(vec![(u.name.clone(), "exists".into())]));
            }
        }
        // As receive-pack does: a ref cannot be created where another ref is its parent
        // directory or lives below it (`a` and `a/b`).
        for u in updates.iter().filter(|u| u.old.is_none() && u.new.is_some()) {
            if let Some(blocker) = Self::nesting_ref(&repo, &u.name)? {
                return Ok(UpdateOutcome::Rejected(vec![(u.name.clone(), format!("{blocker} exists"))]));
            }
        }
        let edits = updates.iter().filter(|u| !u.is_absence_check()).map(Self::edit).collect::<Result<Vec<_>, _>>()?;
        let sig = self.author.signature();
        let mut time_buf = Default::default();
        match repo.edit_references_as(edits, Some(sig.to_ref(&mut time_buf))) {
            Ok(_) => Ok(UpdateOutcome::Applied),
            // Out of date or already exists: a lost race.
            Err(e) if e.is_conflict() || e.is_not_found() => {
                Ok(UpdateOutcome::Rejected(updates.iter().map(|u| (u.name.clone(), e.to_string())).collect()))
            }
            // Another writer holds the ref's lock file. gix takes it without waiting, so a
            // concurrent writer of this process shows up here too: a lost race, retried. A lock
            // file that stays is left over by a crash and blocks for good: say so.
            Err(e) if e.is_retryable() => match self.stale_lock_file(updates) {
                Some(file) => Err(StorageError::Local(format!(
                    "{} is older than {} s: a crashed writer left it; remove it if no git process is running",
                    file.display(),
                    STALE_LOCK_FILE.as_secs()
                ))),
                None => Ok(UpdateOutcome::Rejected(updates.iter().map(|u| (u.name.clone(), e.to_string())).collect())),
            },
            Err(e) => Err(StorageError::local(e)),
        }
    }

    fn read_blob(&self, id: ObjectId) -> Result<Option<Vec<u8>>, StorageError> {
        tree::read_blob(&self.local(), id)
    }

    fn list_files(
        &self,
        commit: ObjectId,
        after: Option<&str>,
        limit: usize,
    ) -> Result<crate::storage::FilePage, StorageError> {
        tree::list_files(&self.local(), commit, after, limit)
    }

    fn list_refs(
        &self,
        _ctx: &RequestContext,
        prefix: &str,
        limit: usize,
    ) -> Result<crate::storage::RefListing, StorageError> {
        tree::list_refs(&self.local(), prefix, limit)
    }

    fn describe(&self) -> String {
        format!("embedded repository {}", self.dir.display())
    }
}
