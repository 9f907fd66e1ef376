//! Files in trees and commits on top of them: what the embedded and the remote store
//! share. Failures of the repository are `Local`; a store whose repository is only a
//! cache turns them into `CacheCorrupt`.

use std::path::Path;

use gix::bstr::BString;

use crate::storage::{FilePage, ObjectId, StorageError, TreeFile};

/// Who signs the commits gitstate writes.
#[derive(Debug, Clone)]
pub struct Author {
    pub name: String,
    pub email: String,
}

impl Author {
    pub fn signature(&self) -> gix::actor::Signature {
        gix::actor::Signature {
            name: self.name.as_str().into(),
            email: self.email.as_str().into(),
            time: gix::date::Time::now_utc(),
        }
    }
}

impl From<(String, String)> for Author {
    fn from((name, email): (String, String)) -> Self {
        Author { name, email }
    }
}

/// Contents of `path` in the tree of `commit`, `None` when absent or not a file.
pub fn read_file(repo: &gix::Repository, commit: ObjectId, path: &str) -> Result<Option<Vec<u8>>, StorageError> {
    let tree = repo
        .find_commit(commit)
        .and_then(|c| c.tree())
        .map_err(|e| StorageError::Local(format!("cannot read commit {commit}: {e}")))?;
    let Some(entry) = tree.lookup_entry_by_path(path).map_err(StorageError::local)? else { return Ok(None) };
    if !entry.mode().is_blob() {
        return Ok(None);
    }
    let object = entry.object().map_err(StorageError::local)?;
    Ok(Some(object.detach().data))
}

/// The commit `id`, if the repository has it.
pub fn commit_info(repo: &gix::Repository, id: ObjectId) -> Result<Option<crate::storage::CommitInfo>, StorageError> {
    if !repo.has_object(id) {
        return Ok(None);
    }
    let commit = repo.find_commit(id).map_err(StorageError::local)?;
    let decoded = commit.decode().map_err(StorageError::local)?;
    Ok(Some(crate::storage::CommitInfo {
        id,
        parents: decoded.parents().collect(),
        time: decoded.committer().map_err(StorageError::local)?.seconds(),
        message: decoded.message.to_string(),
    }))
}

/// The content of the blob `id`, `None` when the repository does not have it.
pub fn read_blob(repo: &gix::Repository, id: ObjectId) -> Result<Option<Vec<u8>>, StorageError> {
    if !repo.has_object(id) {
        return Ok(None);
    }
    let object = repo.find_object(id).map_err(StorageError::local)?;
    Ok(object.kind.is_blob().then(|| object.detach().data))
}

/// The id of the file `path` in the tree of `commit`, `None` when absent or not a file.
pub fn file_id(repo: &gix::Repository, commit: ObjectId, path: &str) -> Result<Option<ObjectId>, StorageError> {
    let tree = repo
        .find_commit(commit)
        .and_then(|c| c.tree())
        .map_err(|e| StorageError::Local(format!("cannot read commit {commit}: {e}")))?;
    let Some(entry) = tree.lookup_entry_by_path(path).map_err(StorageError::local)? else { return Ok(None) };
    Ok(entry.mode().is_blob().then(|| entry.object_id()))
}

/// Up to `limit` files of the tree of `commit` whose paths sort after `after`, in byte order.
/// A depth-first walk in git's tree order gives byte order of the full paths (git sorts a
/// subtree `a` as `a/`), so the walk stops at the first file past the page, and skips every
/// subtree whose paths all sort before `after` without opening it.
pub fn list_files(
    repo: &gix::Repository,
    commit: ObjectId,
    after: Option<&str>,
    limit: usize,
) -> Result<FilePage, StorageError> {
    let tree = repo
        .find_commit(commit)
        .and_then(|c| c.tree())
        .map_err(|e| StorageError::Local(format!("cannot read commit {commit}: {e}")))?;
    let mut page = FilePage::default();
    list_tree(repo, tree.id, "", after, limit, &mut page)?;
    Ok(page)
}

/// One tree of [`list_files`]' walk; `true` once the page is full.
fn list_tree(
    repo: &gix::Repository,
    tree: ObjectId,
    prefix: &str,
    after: Option<&str>,
    limit: usize,
    page: &mut FilePage,
) -> Result<bool, StorageError> {
    let tree = repo.find_tree(tree).map_err(StorageError::local)?;
    for entry in tree.iter() {
        let entry = entry.map_err(StorageError::local)?;
        let (name, mode, id) = (entry.filename(), entry.mode(), entry.oid().to_owned());
        let path = if prefix.is_empty() { name.to_string() } else { format!("{prefix}/{name}") };
        if mode.is_tree() {
            let dir = format!("{path}/");
            // Every path below sorts before `after`: past the first byte where they differ,
            // `after` is the greater.
            if after.is_some_and(|a| a > dir.as_str() && !a.starts_with(&dir)) {
                continue;
            }
            if list_tree(repo, id, &path, after, limit, page)? {
                return Ok(true);
            }
        } else if mode.is_blob() {
            if after.is_some_and(|a| path.as_str() <= a) {
                continue;
            }
            if page.files.len() >= limit {
                page.more = true;
                return Ok(true);
            }
            let size = repo.find_header(id).map_err(StorageError::local)?.size();
            page.files.push(TreeFile { path, id, size });
        }
    }
    Ok(false)
}

/// Refs of `repo` whose full names start with `prefix`, the first `limit` by name.
pub fn list_refs(
    repo: &gix::Repository,
    prefix: &str,
    limit: usize,
) -> Result<crate::storage::RefListing, StorageError> {
    let platform = repo.references().map_err(StorageError::local)?;
    let mut found = Vec::new();
    for r in platform.prefixed(prefix).map_err(StorageError::local)? {
        let mut r = r.map_err(StorageError::local)?;
        let name = r.name().as_bstr().to_string();
        let id = r.peel_to_id().map_err(StorageError::local)?.detach();
        found.push((name, id));
    }
    Ok(bounded_listing(found, limit))
}

/// The first `limit` of `refs` by name.
pub fn bounded_listing(mut refs: Vec<(String, ObjectId)>, limit: usize) -> crate::storage::RefListing {
    refs.sort();
    let truncated = refs.len() > limit;
    refs.truncate(limit);
    crate::storage::RefListing { tips: refs.into_iter().collect(), truncated }
}

/// Write a commit: `parent`'s tree with `path` set to `content` (removed when `None`).
pub fn write_commit(
    repo: &gix::Repository,
    author: &Author,
    parent: Option<ObjectId>,
    path: &str,
    content: Option<&[u8]>,
    message: &str,
) -> Result<ObjectId, StorageError> {
    let base = match parent {
        Some(p) => repo.find_commit(p).and_then(|c| c.tree()).map_err(StorageError::local)?,
        None => repo.empty_tree(),
    };
    check_no_collision(&base, path)?;
    let mut editor = base.edit().map_err(StorageError::local)?;
    match content {
        Some(bytes) => {
            let blob = repo.write_blob(bytes).map_err(StorageError::local)?;
            editor.upsert(path, gix::object::tree::EntryKind::Blob, blob.detach()).map_err(StorageError::local)?;
        }
        None => {
            editor.remove(path).map_err(StorageError::local)?;
        }
    }
    let tree = editor.write().map_err(StorageError::local)?.detach();
    let sig = author.signature();
    let commit = gix::objs::Commit {
        tree,
        parents: parent.into_iter().collect(),
        author: sig.clone(),
        committer: sig,
        encoding: None,
        message: BString::from(message),
        extra_headers: Vec::new(),
    };
    Ok(repo.write_object(&commit).map_err(StorageError::local)?.detach())
}

/// Refuse a write that would turn another state's file into a directory or the reverse.
fn check_no_collision(tree: &gix::Tree<'_>, path: &str) -> Result<(), StorageError> {
    let mut prefix = String::new();
    let components: Vec<&str> = path.split('/').collect();
    for (i, c) in components.iter().enumerate() {
        if i > 0 {
            prefix.push('/');
        }
        prefix.push_str(c);
        let Some(entry) = tree.lookup_entry_by_path(&prefix).map_err(StorageError::local)? else { return Ok(()) };
        let last = i + 1 == components.len();
        if !last && !entry.mode().is_tree() {
            return Err(StorageError::PathConflict { path: path.into(), blocker: prefix, blocker_is_state: true });
        }
        if last && entry.mode().is_tree() {
            return Err(StorageError::PathConflict { path: path.into(), blocker: prefix, blocker_is_state: false });
        }
    }
    Ok(())
}

/// A cache with more packs than this is rebuilt before the next fetch (a depth-1 cache is cheap to refill).
pub const MAX_CACHE_PACKS: usize = 64;

/// Open the bare repository at `dir`, creating it when missing.
pub fn open_or_init_bare(dir: &Path) -> Result<gix::ThreadSafeRepository, StorageError> {
    // gix sizes its pack index slots from the packs on disk at open time; a warm cache gains a
    // pack per fetch, so give it room (and see MAX_CACHE_PACKS).
    let slots = gix::odb::store::init::Slots::Given(MAX_CACHE_PACKS as u16 * 4);
    let open = || gix::open_opts(dir, gix::open::Options::isolated().object_store_slots(slots)).map(|r| r.into_sync());
    if dir.exists() {
        return match open() {
            Ok(repo) if repo.to_thread_local().is_bare() => Ok(repo),
            Ok(_) => Err(StorageError::Local(format!("{} is not a bare repository", dir.display()))),
            Err(e) => Err(StorageError::Local(format!("cannot open {}: {e}", dir.display()))),
        };
    }
    let parent = dir.parent().ok_or_else(|| StorageError::Local(format!("{} has no parent", dir.display())))?;
    std::fs::create_dir_all(parent).map_err(StorageError::local)?;
    // Built beside and renamed into place, so that another process starting on the same
    // directory sees either nothing or a whole repository.
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let staging = parent.join(format!(".{name}.{}.{:x}.new", std::process::id(), fastrand::u64(..)));
    gix::init_bare(&staging).map_err(|e| StorageError::Local(format!("cannot create {}: {e}", staging.display())))?;
    if std::fs::rename(&staging, dir).is_err() {
        let _ = std::fs::remove_dir_all(&staging);
        if !dir.join("HEAD").is_file() {
            return Err(StorageError::Local(format!("cannot create {}", dir.display())));
        }
    }
    open().map_err(|e| StorageError::Local(format!("cannot open {}: {e}", dir.display())))
}
