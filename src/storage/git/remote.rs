//! A remote repository reached through a bare cache repository on local disk:
//! tips fetched at depth 1 (only the refs asked for), commits written into the cache,
//! ref updates pushed with our own receive-pack push. The cache is only a cache:
//! anything wrong with it is `CacheCorrupt`, and a rebuild never disturbs a reader.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use gix::protocol::transport::client::blocking_io::Transport;
use gix::protocol::transport::Protocol;
use gix::remote::fetch::{Shallow, Tags};
use gix::remote::Direction;

use super::fetch;
use super::smart_http::{Blind, SmartHttp};
use super::transport::{self, classify};
use super::tree::{self, Author, MAX_CACHE_PACKS};
use crate::storage::{ObjectId, RefUpdate, RepoUrl, RequestContext, Storage, StorageError, Tips, UpdateOutcome};

/// One cache repository on disk. A generation that was replaced is deleted once the last
/// request that still reads it lets go.
struct Generation {
    dir: PathBuf,
    repo: gix::ThreadSafeRepository,
    discard: AtomicBool,
    /// A rebuilt generation's [`in_use_path`], locked while this process may work in it.
    in_use: Option<std::fs::File>,
}

impl Drop for Generation {
    fn drop(&mut self) {
        if self.discard.load(Ordering::Relaxed) {
            let _ = std::fs::remove_dir_all(&self.dir);
            if self.in_use.is_some() {
                let _ = std::fs::remove_file(in_use_path(&self.dir));
            }
        }
    }
}

/// Rebuilt generations whose process is gone are removed; one without a lock file (an older
/// version's, or a crashed start's staging directory) once it is this old.
const LEFTOVER_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// The lock file beside a rebuilt generation `dir`. Its process holds an exclusive lock on it
/// (flock) from before the directory exists until it lets go of the directory, so a sweep that
/// can take the lock knows nobody works there. Process ids are no such proof: they repeat
/// across Lambda sandboxes and containers sharing a disk.
fn in_use_path(dir: &Path) -> PathBuf {
    let mut name = dir.as_os_str().to_owned();
    name.push(".in-use");
    PathBuf::from(name)
}

/// Remove what earlier processes left of `base`'s cache: rebuilt generations nobody holds,
/// and old leftovers without a lock. `<base>.git`, shared by every process, stays.
fn sweep_leftovers(base: &Path) {
    let (Some(parent), Some(stem)) = (base.parent(), base.file_name().and_then(|n| n.to_str())) else { return };
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    let shared = format!("{stem}.git");
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let rebuilt = name.starts_with(&format!("{stem}.")) && name.ends_with(".git") && name != shared;
        let staging = name.starts_with(&format!(".{stem}.")) && name.ends_with(".new");
        if !(rebuilt || staging) || !path.is_dir() {
            continue;
        }
        let lock = in_use_path(&path);
        let unused = match std::fs::OpenOptions::new().write(true).open(&lock) {
            Ok(file) => file.try_lock().is_ok(),
            Err(_) => entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > LEFTOVER_AGE)),
        };
        if unused {
            tracing::info!(cache = %path.display(), "removing a cache no process uses");
            let _ = std::fs::remove_dir_all(&path);
            let _ = std::fs::remove_file(&lock);
        }
    }
}

pub struct RemoteStore {
    url: RepoUrl,
    /// `<cache dir>/<digest of the URL>`: generations are `<base>.git` (shared by every
    /// process), then, after a rebuild, `<base>.<pid>-<n>-<random>.git` (this process's own).
    base: PathBuf,
    current: RwLock<Arc<Generation>>,
    generations: AtomicU32,
    /// gix takes the cache's `shallow` file lock without waiting: our own fetches take turns here.
    fetch_turn: Mutex<()>,
    /// Smart HTTP without advertisement round trips (`http://`, `https://` only).
    smart: Option<SmartHttp>,
    /// The SSH session kept between operations (`ssh://` only).
    kept: Option<Arc<super::ssh::KeptSessions>>,
    author: Author,
}

impl RemoteStore {
    /// The store of `url`, with its cache under `cache_dir` (one per URL, reused across processes).
    pub fn open(url: RepoUrl, cache_dir: &Path, author: Author) -> Result<Self, StorageError> {
        let base = cache_dir.join(digest(&url.to_string()));
        let first = base.with_extension("git");
        let repo = match tree::open_or_init_bare(&first) {
            Ok(repo) => repo,
            Err(e) => {
                // A cache that does not open is thrown away and made anew.
                tracing::warn!(cache = %first.display(), error = %e, "cache repository unusable; rebuilding it");
                std::fs::remove_dir_all(&first).map_err(StorageError::local)?;
                tree::open_or_init_bare(&first)?
            }
        };
        // Earlier versions remembered receive-pack's capabilities here; pushes no longer trust
        // anything but the push's own advertisement.
        let _ = std::fs::remove_file(first.join("gitstate-receive-caps"));
        let smart = SmartHttp::new(&url);
        let kept = (url.scheme() == crate::storage::url::Scheme::Ssh).then(Default::default);
        sweep_leftovers(&base);
        let generation = Generation { dir: first, repo, discard: AtomicBool::new(false), in_use: None };
        Ok(RemoteStore {
            url,
            base,
            current: RwLock::new(Arc::new(generation)),
            generations: AtomicU32::new(0),
            fetch_turn: Mutex::new(()),
            smart,
            kept,
            author,
        })
    }

    pub fn url(&self) -> &RepoUrl {
        &self.url
    }

    /// The cache directory in use (tests and tools look at it).
    pub fn cache_dir(&self) -> PathBuf {
        self.generation().dir.clone()
    }

    /// Delete the cache from disk once nobody reads it any more (the store is being evicted).
    pub fn discard_cache(&self) {
        self.generation().discard.store(true, Ordering::Relaxed);
    }

    fn generation(&self) -> Arc<Generation> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The repository of the current generation, with the generation kept alive by the caller.
    fn local(&self) -> (Arc<Generation>, gix::Repository) {
        let generation = self.generation();
        let repo = generation.repo.to_thread_local();
        (generation, repo)
    }

    fn needs_rebuild(dir: &Path) -> bool {
        !dir.join("objects").is_dir() || !dir.join("HEAD").is_file() || pack_count(dir) > MAX_CACHE_PACKS
    }

    /// Rebuild the cache when [`Self::needs_rebuild`] says so; the packs it then holds (none:
    /// nothing was fetched into it yet).
    fn rebuilt_if_needed(&self) -> Result<usize, StorageError> {
        let dir = self.generation().dir.clone();
        if Self::needs_rebuild(&dir) {
            self.reset_cache()?;
            return Ok(0);
        }
        Ok(pack_count(&dir))
    }
}

/// Current tips of `refs` on the remote at `url`; fetches, at depth 1, every tip whose commit
/// is not yet in `repo`. Writes no refs (only the `shallow` file and a pack). One connection;
/// a call that needs no objects sends nothing but the handshake and `ls-refs`. `turn`
/// serialises the fetches of one cache (gix takes its `shallow` lock without waiting).
pub fn fetch_tips(
    repo: &gix::Repository,
    url: &RepoUrl,
    refs: &[String],
    ctx: &RequestContext,
    turn: &Mutex<()>,
) -> Result<Tips, StorageError> {
    fetch_tips_via(repo, url, refs, ctx, turn, None)
}

/// [`fetch_tips`] on the SSH session `kept` holds (`ssh://`), else on a connection of its own.
fn fetch_tips_via(
    repo: &gix::Repository,
    url: &RepoUrl,
    refs: &[String],
    ctx: &RequestContext,
    turn: &Mutex<()>,
    kept: Option<&Arc<super::ssh::KeptSessions>>,
) -> Result<Tips, StorageError> {
    if refs.is_empty() {
        return Ok(Tips::new());
    }
    // Fetching changes no ref and writes packs whole: a broken attempt can simply be repeated.
    transport::retrying(ctx, || fetch_tips_once(repo, url, refs, ctx, turn, kept))
}

/// A transport to `url`: on the kept SSH session where there is one.
fn connect(
    url: &RepoUrl,
    version: Protocol,
    ctx: &RequestContext,
    kept: Option<&Arc<super::ssh::KeptSessions>>,
) -> Result<Box<dyn Transport + Send>, StorageError> {
    match kept {
        Some(kept) => Ok(Box::new(super::ssh::connect_kept(url, version, ctx, Some(Arc::clone(kept)))?)),
        None => transport::connect(url, version, ctx),
    }
}

/// A fetch of `refs` from `url` with the ref listing done (one connection; nothing received yet).
fn prepare<'repo>(
    repo: &'repo gix::Repository,
    url: &RepoUrl,
    refs: &[String],
    ctx: &RequestContext,
    kept: Option<&Arc<super::ssh::KeptSessions>>,
) -> Result<gix::remote::fetch::Prepare<'repo, 'repo, Box<dyn Transport + Send>>, StorageError> {
    let connection: Box<dyn Transport + Send> =
        Box::new(transport::WithoutSymrefs(connect(url, Protocol::V2, ctx, kept)?));
    // Refspecs without a destination: the objects are fetched, no local ref is written.
    let remote = repo
        .remote_at_without_url_rewrite(url.to_gix())
        .and_then(|r| r.with_refspecs(refs.iter().map(String::as_str), Direction::Fetch))
        .map_err(|e| StorageError::CacheCorrupt(format!("cannot set up a fetch: {}", transport::chain(&e))))?
        .with_fetch_tags(Tags::None);
    let mut connection = remote.to_connection_with_transport(connection);
    if matches!(url.scheme(), crate::storage::url::Scheme::Http | crate::storage::url::Scheme::Https) {
        // gix configures the transport again from the repository's settings; keep our timeouts.
        connection = connection.with_transport_options(Box::new(transport::http_options(ctx)));
    }
    connection
        // The credentials went with the first request already; a refusal is final. Without this,
        // gix would ask git's credential helpers, which spawn `git`.
        .with_credentials(|_action| Ok(None))
        .prepare_fetch(gix::progress::Discard, Default::default())
        .map_err(|e| classify(url, ctx, &e))
}

/// Receive the pack of a prepared fetch at `depth` commits from each tip.
fn receive(
    prepare: gix::remote::fetch::Prepare<'_, '_, Box<dyn Transport + Send>>,
    url: &RepoUrl,
    depth: u32,
    ctx: &RequestContext,
) -> Result<(), StorageError> {
    let depth = NonZeroU32::new(depth.max(1)).expect("at least 1");
    let outcome = prepare
        .with_shallow(Shallow::DepthAtRemote(depth))
        .receive(gix::progress::Discard, &ctx.interrupt)
        .map_err(|e| classify(url, ctx, &e))?;
    // The .keep file protects a new pack until refs point into it; our refs live in
    // memory, and a cache nobody runs gc on needs no protection.
    if let gix::remote::fetch::Status::Change { write_pack_bundle, .. } = &outcome.status {
        if let Some(keep) = &write_pack_bundle.keep_path {
            let _ = std::fs::remove_file(keep);
        }
    }
    Ok(())
}

fn fetch_tips_once(
    repo: &gix::Repository,
    url: &RepoUrl,
    refs: &[String],
    ctx: &RequestContext,
    turn: &Mutex<()>,
    kept: Option<&Arc<super::ssh::KeptSessions>>,
) -> Result<Tips, StorageError> {
    let prepare = prepare(repo, url, refs, ctx, kept)?;
    let tips: Tips = prepare
        .ref_map()
        .mappings
        .iter()
        .filter_map(|m| {
            let name = m.remote.as_name()?.to_string();
            let id = m.remote.as_id()?.to_owned();
            refs.contains(&name).then_some((name, id))
        })
        .collect();
    if !missing(repo, &tips) {
        // Dropping the connection sends the flush that ends a v2 session politely.
        return Ok(tips);
    }
    // Another thread may have fetched the tip while we waited for our turn: look again.
    let _turn = turn.lock().unwrap_or_else(|p| p.into_inner());
    if !missing(repo, &tips) {
        return Ok(tips);
    }
    receive(prepare, url, 1, ctx)?;
    if missing(repo, &tips) {
        // Usually our cache, not the host: unreadable packs look like missing objects.
        return Err(StorageError::CacheCorrupt(format!(
            "{url} did not send all requested tips, or the cache cannot read them"
        )));
    }
    Ok(tips)
}

/// The refs under `prefix` on the remote (one glob refspec: `ls-refs` with a `ref-prefix`), the
/// first `limit` by name, with every listed tip's commit fetched at depth 1 when missing.
fn list_refs_once(
    repo: &gix::Repository,
    url: &RepoUrl,
    prefix: &str,
    limit: usize,
    ctx: &RequestContext,
    turn: &Mutex<()>,
    kept: Option<&Arc<super::ssh::KeptSessions>>,
) -> Result<crate::storage::RefListing, StorageError> {
    // gix wants a destination for a glob; it is never written: the listing's connection ends
    // without a fetch, and missing tips are fetched by their exact names.
    let spec = format!("{prefix}*:refs/gitstate-listing/*");
    let found: Vec<(String, ObjectId)> = {
        let prepare = prepare(repo, url, std::slice::from_ref(&spec), ctx, kept)?;
        prepare
            .ref_map()
            .mappings
            .iter()
            .filter_map(|m| {
                let name = m.remote.as_name()?.to_string();
                let id = m.remote.as_id()?.to_owned();
                name.starts_with(prefix).then_some((name, id))
            })
            .collect()
    };
    let mut listing = tree::bounded_listing(found, limit);
    if missing(repo, &listing.tips) {
        let names: Vec<String> = listing.tips.keys().cloned().collect();
        fetch_tips_once(repo, url, &names, ctx, turn, kept)?;
        // A lock released between the two looks is gone: so is its entry.
        listing.tips.retain(|_, id| repo.has_object(*id));
    }
    Ok(listing)
}

/// Fetch `refs` so that `depth` commits of their history are in `repo` (the shallow
/// boundary moves back; what is already here is not sent again).
fn deepen_once(
    repo: &gix::Repository,
    url: &RepoUrl,
    refs: &[String],
    depth: u32,
    ctx: &RequestContext,
    turn: &Mutex<()>,
    kept: Option<&Arc<super::ssh::KeptSessions>>,
) -> Result<(), StorageError> {
    let prepare = prepare(repo, url, refs, ctx, kept)?;
    let _turn = turn.lock().unwrap_or_else(|p| p.into_inner());
    receive(prepare, url, depth, ctx)
}

/// Whether some tip's commit is not in `repo` (a miss makes gix re-read the packs on disk).
fn missing(repo: &gix::Repository, tips: &Tips) -> bool {
    tips.values().any(|id| !repo.has_object(id))
}

fn digest(text: &str) -> String {
    use md5::{Digest, Md5};
    Md5::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// Failures of the cache repository are the cache's, whatever the shared code called them.
fn cache_error(e: StorageError) -> StorageError {
    match e {
        StorageError::Local(detail) => StorageError::CacheCorrupt(detail),
        other => other,
    }
}

impl RemoteStore {
    /// The tips of `refs`, their commits in the cache: over the pooled smart-HTTP client where
    /// the host allows, else gix's fetch (its own connection and handshake).
    fn sync_tips(&self, ctx: &RequestContext, refs: &[String]) -> Result<Tips, StorageError> {
        let cold = self.rebuilt_if_needed()? == 0;
        let (_generation, repo) = self.local();
        if let Some(smart) = &self.smart {
            if let Some(tips) = self.sync_pooled(smart, &repo, ctx, refs, cold)? {
                return Ok(tips);
            }
        }
        ctx.count_round_trip(|| fetch_tips_via(&repo, &self.url, refs, ctx, &self.fetch_turn, self.kept.as_ref()))
    }

    /// A `cold` cache (no fetched pack: pushes leave loose objects) asks for the refs by name
    /// (one request, where the host takes `want-ref`); otherwise one `ls-refs`, then one fetch
    /// of the tips the cache lacks. `None`: the host did not answer these without a handshake.
    fn sync_pooled(
        &self,
        smart: &SmartHttp,
        repo: &gix::Repository,
        ctx: &RequestContext,
        refs: &[String],
        cold: bool,
    ) -> Result<Option<Tips>, StorageError> {
        // Only a read of one branch: a write's refs include lock refs that mostly do not exist,
        // which `want-ref` refuses.
        let by_name = cold && refs.len() == 1 && smart.may_want_refs();
        if by_name {
            let fetched = ctx.count_round_trip(|| self.fetch_pooled(smart, repo, ctx, &fetch::Want::Refs(refs)))?;
            if let Blind::Done(tips) = fetched {
                return Ok(Some(tips));
            }
        }
        let Blind::Done(tips) = ctx.count_round_trip(|| smart.ls_refs(ctx, refs))? else {
            return Ok(None);
        };
        let lacking: Vec<ObjectId> = tips.values().copied().filter(|id| !repo.has_object(id)).collect();
        if lacking.is_empty() {
            return Ok(Some(tips));
        }
        match ctx.count_round_trip(|| self.fetch_pooled(smart, repo, ctx, &fetch::Want::Ids(&lacking)))? {
            Blind::Done(_) => Ok(Some(tips)),
            Blind::Fallback => Ok(None),
        }
    }

    /// One fetch over the pooled client into the cache (pack and shallow boundary), with the
    /// newest commits the cache holds whole as `have`s; the ids of the refs wanted by name.
    fn fetch_pooled(
        &self,
        smart: &SmartHttp,
        repo: &gix::Repository,
        ctx: &RequestContext,
        want: &fetch::Want<'_>,
    ) -> Result<Blind<Tips>, StorageError> {
        let _turn = self.fetch_turn.lock().unwrap_or_else(|p| p.into_inner());
        if let fetch::Want::Ids(ids) = want {
            // Another request may have fetched them while we waited for our turn.
            if ids.iter().all(|id| repo.has_object(id)) {
                return Ok(Blind::Done(Tips::new()));
            }
        }
        let haves = newest_boundary(repo, HAVES);
        let answer = match smart.fetch(ctx, want, &haves, &repo.git_dir().join("objects").join("pack"))? {
            Blind::Done(answer) => answer,
            Blind::Fallback => return Ok(Blind::Fallback),
        };
        write_shallow(repo, &answer.shallow)?;
        let got: Vec<ObjectId> = match want {
            fetch::Want::Ids(ids) => ids.to_vec(),
            fetch::Want::Refs(names) => names.iter().filter_map(|n| answer.wanted.get(n).copied()).collect(),
        };
        if got.iter().any(|id| !repo.has_object(id)) {
            return Err(StorageError::CacheCorrupt(format!(
                "{} did not send all requested tips, or the cache cannot read them",
                self.url
            )));
        }
        Ok(Blind::Done(answer.wanted))
    }
}

/// The packs (their indexes) in the cache at `dir`.
fn pack_count(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("objects/pack"))
        .map(|entries| {
            entries.filter_map(Result::ok).filter(|e| e.file_name().to_string_lossy().ends_with(".idx")).count()
        })
        .unwrap_or(0)
}

/// How many commits a pooled fetch names as `have`s.
const HAVES: usize = 8;

/// The newest commits on the cache's shallow boundary: each was fetched whole (its tree
/// complete), so the host may leave out whatever they hold.
fn newest_boundary(repo: &gix::Repository, n: usize) -> Vec<ObjectId> {
    let Ok(Some(boundary)) = repo.shallow_commits() else {
        return Vec::new();
    };
    let mut dated: Vec<(i64, ObjectId)> =
        boundary.iter().filter_map(|id| Some((repo.find_commit(*id).ok()?.time().ok()?.seconds, *id))).collect();
    dated.sort_unstable_by(|a, b| b.cmp(a));
    dated.into_iter().take(n).map(|(_, id)| id).collect()
}

/// Apply the host's new shallow boundary to the cache's `shallow` file (under the fetch turn).
fn write_shallow(repo: &gix::Repository, updates: &[gix_shallow::Update]) -> Result<(), StorageError> {
    let corrupt =
        |e: &dyn std::fmt::Display| StorageError::CacheCorrupt(format!("cannot update the shallow file: {e}"));
    let file = repo.shallow_file().map_err(|e| corrupt(&e))?;
    let known = gix_shallow::read(&file).map_err(|e| corrupt(&e))?;
    let fresh: Vec<gix_shallow::Update> = updates
        .iter()
        .filter(|u| match (u, &known) {
            (gix_shallow::Update::Shallow(id), Some(known)) => !known.contains(id),
            _ => true,
        })
        .copied()
        .collect();
    if fresh.is_empty() {
        return Ok(());
    }
    let lock = gix::lock::File::acquire_to_update_resource(
        &file,
        gix::lock::acquire::Fail::AfterDurationWithBackoff(std::time::Duration::from_secs(5)),
        None,
        0,
    )
    .map_err(|e| corrupt(&e))?;
    gix_shallow::write(lock, known, &fresh).map_err(|e| corrupt(&e))
}

impl RemoteStore {
    /// One push: over smart HTTP's pooled client where the host answers there (kept-alive
    /// connections, no new TLS handshake while warm), else over gix's transport.
    fn push_once(
        &self,
        repo: &gix::Repository,
        ctx: &RequestContext,
        updates: &[crate::storage::RefUpdate],
    ) -> Result<super::push::PushReport, StorageError> {
        let url = &self.url;
        let open = || match (&self.smart, &self.kept) {
            (Some(smart), _) => match smart.start_push(ctx)? {
                Some(started) => Ok(started),
                None => super::push::over_transport(url, ctx),
            },
            (None, Some(kept)) => super::push::over(connect(url, Protocol::V1, ctx, Some(kept))?, url, ctx),
            (None, None) => super::push::over_transport(url, ctx),
        };
        super::push::push_with(open, repo, url, updates, ctx, true)
    }
}

/// Run `work` that talks to the host at `url`, turning a panic inside a dependency (gix met an
/// answer it did not expect) into a protocol error: nothing a host sends may take a request
/// down as our own bug (500), let alone the process. 502: the host's answer is at fault.
fn contained<T>(url: &RepoUrl, work: impl FnOnce() -> Result<T, StorageError>) -> Result<T, StorageError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).unwrap_or_else(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(remote = %url, panic = %what.escape_debug(), "the git library failed on the host's answer");
        Err(StorageError::Protocol(format!("{url}: the host's answer made the git library fail")))
    })
}

impl Storage for RemoteStore {
    fn fetch_tips(&self, ctx: &RequestContext, refs: &[String]) -> Result<Tips, StorageError> {
        contained(&self.url, || self.sync_tips(ctx, refs))
    }

    fn read_file(&self, commit: ObjectId, path: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let (_generation, repo) = self.local();
        tree::read_file(&repo, commit, path).map_err(cache_error)
    }

    fn commit_info(&self, id: ObjectId) -> Result<Option<crate::storage::CommitInfo>, StorageError> {
        let (_generation, repo) = self.local();
        tree::commit_info(&repo, id).map_err(cache_error)
    }

    fn file_id(&self, commit: ObjectId, path: &str) -> Result<Option<ObjectId>, StorageError> {
        let (_generation, repo) = self.local();
        tree::file_id(&repo, commit, path).map_err(cache_error)
    }

    fn deepen(&self, ctx: &RequestContext, reference: &str, depth: u32) -> Result<(), StorageError> {
        let (_generation, repo) = self.local();
        let refs = [reference.to_owned()];
        contained(&self.url, || {
            ctx.count_round_trip(|| {
                transport::retrying(ctx, || {
                    deepen_once(&repo, &self.url, &refs, depth, ctx, &self.fetch_turn, self.kept.as_ref())
                })
            })
        })
    }

    fn read_blob(&self, id: ObjectId) -> Result<Option<Vec<u8>>, StorageError> {
        let (_generation, repo) = self.local();
        tree::read_blob(&repo, id).map_err(cache_error)
    }

    fn list_files(
        &self,
        commit: ObjectId,
        after: Option<&str>,
        limit: usize,
    ) -> Result<crate::storage::FilePage, StorageError> {
        let (_generation, repo) = self.local();
        tree::list_files(&repo, commit, after, limit).map_err(cache_error)
    }

    fn list_refs(
        &self,
        ctx: &RequestContext,
        prefix: &str,
        limit: usize,
    ) -> Result<crate::storage::RefListing, StorageError> {
        self.rebuilt_if_needed()?;
        let (_generation, repo) = self.local();
        contained(&self.url, || {
            // One blind `ls-refs` where the host allows, as for the tips of a look.
            if let Some(smart) = &self.smart {
                if let Blind::Done(tips) = ctx.count_round_trip(|| smart.ls_prefix(ctx, prefix))? {
                    let listing = tree::bounded_listing(tips.into_iter().collect(), limit);
                    if !missing(&repo, &listing.tips) {
                        return Ok(listing);
                    }
                }
            }
            ctx.count_round_trip(|| {
                transport::retrying(ctx, || {
                    list_refs_once(&repo, &self.url, prefix, limit, ctx, &self.fetch_turn, self.kept.as_ref())
                })
            })
        })
    }

    fn commit(
        &self,
        parent: Option<ObjectId>,
        path: &str,
        content: Option<&[u8]>,
        message: &str,
    ) -> Result<ObjectId, StorageError> {
        let (_generation, repo) = self.local();
        tree::write_commit(&repo, &self.author, parent, path, content, message).map_err(cache_error)
    }

    fn update(&self, ctx: &RequestContext, updates: &[RefUpdate]) -> Result<UpdateOutcome, StorageError> {
        let (_generation, repo) = self.local();
        // Always with the advertisement of the same push: only it says whether the host offers
        // `atomic` now and whether a lock commit named as old id is still there (DESIGN §3).
        let push = || contained(&self.url, || ctx.count_round_trip(|| self.push_once(&repo, ctx, updates)));
        let mut pushed = push()?;
        if pushed.refused_by_host {
            // Refused by the host's report: if the refs moved, a lost race; if they did not,
            // the host's policy or a passing fault. A second push tells (its advertisement shows
            // whether the refs moved) and gives a passing fault its one more chance.
            tracing::info!(remote = %self.url, refused = ?pushed.outcome, "the host refused a push; trying it once more");
            pushed = push()?;
            if let (true, UpdateOutcome::Rejected(refused)) = (pushed.refused_by_host, &pushed.outcome) {
                let (reference, reason) = refused.first().cloned().unwrap_or_default();
                return Err(StorageError::PushRefused { reference, reason: reason.escape_debug().to_string() });
            }
        }
        let outcome = pushed.outcome;
        if let UpdateOutcome::PartlyApplied { applied, rejected } = &outcome {
            tracing::error!(
                remote = %self.url,
                ?applied,
                ?rejected,
                "the git host applied part of an atomic push; it does not honour `atomic`"
            );
            if let Some(smart) = &self.smart {
                smart.disable("a push was partly applied");
            }
        }
        Ok(outcome)
    }

    fn describe(&self) -> String {
        self.url.to_string()
    }

    fn reset_cache(&self) -> Result<bool, StorageError> {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        let n = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        let dir = self.base.with_extension(format!("{}-{n}-{:x}.git", std::process::id(), fastrand::u32(..)));
        // Locked before the directory exists: a sweep never sees it unclaimed. (The whole cache
        // directory may be gone: that is one way a cache breaks.)
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent).map_err(StorageError::local)?;
        }
        let in_use = std::fs::File::create(in_use_path(&dir)).map_err(StorageError::local)?;
        in_use.lock().map_err(StorageError::local)?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(StorageError::local)?;
        }
        tracing::warn!(old = %current.dir.display(), new = %dir.display(), "rebuilding the cache repository beside the old one");
        let repo = tree::open_or_init_bare(&dir)?;
        current.discard.store(true, Ordering::Relaxed);
        *current = Arc::new(Generation { dir, repo, discard: AtomicBool::new(false), in_use: Some(in_use) });
        sweep_leftovers(&self.base);
        Ok(true)
    }
}
