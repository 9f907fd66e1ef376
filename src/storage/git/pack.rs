//! Packs for pushing: the objects new commits add compared to their parents,
//! built with gix-pack from the (shallow) cache repository. Entries are stored
//! whole (no deltas), which keeps the pack valid on its own.

use std::collections::HashSet;
use std::sync::atomic::AtomicBool;

use gix::objs::Exists;
use gix::parallel::InOrderIter;
use gix_pack::data::output::{self, count::objects::ObjectExpansion};

use crate::storage::{ObjectId, StorageError};

/// A pack (header, entries, checksum) holding `new_commits` and every object they
/// add compared to their parents, minus what the remote already has: the ids in
/// `remote_has` and, for those that are commits, their root trees. Only the direct
/// parents are looked at, so the cache may be shallow. No commits: an empty pack.
pub fn build_pack(
    repo: &gix::Repository,
    new_commits: &[ObjectId],
    remote_has: &[ObjectId],
) -> Result<Vec<u8>, StorageError> {
    ensure_empty_tree_stored(repo, new_commits)?;
    // The entry stage may run on other threads and needs a thread-safe handle; pack ids
    // recorded while counting must stay valid until the entries are copied.
    let mut db = repo
        .objects
        .clone()
        .into_inner()
        .into_arc()
        .map_err(|e| StorageError::CacheCorrupt(format!("cannot open object database: {e}")))?;
    db.prevent_pack_unload();
    let mut counts = count_objects(&db, new_commits)?;
    // Counting adds each parent commit and its tree (to diff against); the remote has those.
    let known = remote_known(repo, remote_has);
    counts.retain(|count| !known.contains(&count.id));
    let entries = encode_entries(db, counts)?;
    write_pack(entries, repo.object_hash())
}

type Db = gix::odb::Cache<gix::odb::store::Handle<std::sync::Arc<gix::odb::Store>>>;

/// Every object `new_commits` add compared to their parents (and the parents themselves).
fn count_objects(db: &Db, new_commits: &[ObjectId]) -> Result<Vec<output::Count>, StorageError> {
    if new_commits.is_empty() {
        return Ok(Vec::new());
    }
    let mut ids = new_commits.iter().map(|id| Ok(id.to_owned()));
    let interrupt = AtomicBool::new(false);
    let (counts, _) = output::count::objects_unthreaded(
        db,
        &mut ids,
        &gix::progress::Discard,
        &interrupt,
        ObjectExpansion::TreeAdditionsComparedToAncestor,
    )
    .map_err(|e| cache_corrupt("cannot list objects to push", &e))?;
    Ok(counts)
}

/// The pack entries of `counts`, whole objects (no deltas); an object missing from the cache fails.
fn encode_entries(db: Db, counts: Vec<output::Count>) -> Result<Vec<output::Entry>, StorageError> {
    if counts.is_empty() {
        return Ok(Vec::new());
    }
    let options = output::entry::iter_from_counts::Options {
        thread_limit: Some(1),
        allow_thin_pack: false,
        ..Default::default()
    };
    let chunks = output::entry::iter_from_counts(counts, db, Box::new(gix::progress::Discard), options)
        .map_err(|e| cache_corrupt("cannot prepare pack entries", &e))?;
    let mut entries = Vec::new();
    for chunk in InOrderIter::from(chunks) {
        entries.extend(chunk.map_err(|e| cache_corrupt("cannot encode pack entry", &e))?);
    }
    if entries.iter().any(output::Entry::is_invalid) {
        return Err(StorageError::CacheCorrupt("an object to push is missing from the cache".into()));
    }
    Ok(entries)
}

/// Header, `entries` and checksum.
fn write_pack(entries: Vec<output::Entry>, hash: gix::hash::Kind) -> Result<Vec<u8>, StorageError> {
    let num_entries =
        u32::try_from(entries.len()).map_err(|_| StorageError::Local("too many objects for one pack".into()))?;
    let mut pack = Vec::new();
    let writer = output::bytes::FromEntriesIter::new(
        std::iter::once(Ok(entries)),
        &mut pack,
        num_entries,
        gix_pack::data::Version::V2,
        hash,
    );
    for written in writer {
        written.map_err(|e| cache_corrupt("cannot write pack", &e))?;
    }
    Ok(pack)
}

fn cache_corrupt(what: &str, e: &dyn std::error::Error) -> StorageError {
    StorageError::CacheCorrupt(format!("{what}: {}", super::transport::chain(e)))
}

/// `remote_has` plus the root trees of those that are commits we hold.
fn remote_known(repo: &gix::Repository, remote_has: &[ObjectId]) -> HashSet<ObjectId> {
    let mut known: HashSet<ObjectId> = remote_has.iter().copied().collect();
    for id in remote_has {
        let tree = repo
            .try_find_object(*id)
            .ok()
            .flatten()
            .and_then(|object| object.try_into_commit().ok())
            .and_then(|commit| commit.tree_id().ok());
        if let Some(tree) = tree {
            known.insert(tree.detach());
        }
    }
    known
}

/// gix's repository API pretends the empty tree always exists, but the object
/// database the pack is read from only knows what is on disk.
fn ensure_empty_tree_stored(repo: &gix::Repository, new_commits: &[ObjectId]) -> Result<(), StorageError> {
    let empty = ObjectId::empty_tree(repo.object_hash());
    let needs_it = new_commits
        .iter()
        .any(|id| repo.find_commit(*id).ok().and_then(|c| c.tree_id().ok()).is_some_and(|tree| tree == empty));
    if needs_it && !repo.objects.exists(&empty) {
        repo.write_object(gix::objs::Tree::empty())
            .map_err(|e| StorageError::CacheCorrupt(format!("cannot store the empty tree: {e}")))?;
    }
    Ok(())
}
