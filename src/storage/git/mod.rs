//! The git store: files on branches of one repository, either a remote reached
//! through a bare cache repository (fetch + our push) or the embedded bare
//! repository of `gitstate serve`, moved by gix ref transactions.

pub mod pack;
pub mod push;
pub mod remote;

use std::path::{Path, PathBuf};

use gix::bstr::BString;
use gix::refs::transaction::{Change, LogChange, PreviousValue, RefEdit, RefLog};
use gix::refs::Target;

use super::{Credentials, ObjectId, RefUpdate, Storage, StorageError, Tips, UpdateOutcome};
use crate::backend::PATH_CONFLICT;

/// A git repository holding states.
pub struct GitStore {
    /// Swapped for a fresh one when a cache is found broken.
    repo: std::sync::RwLock<gix::ThreadSafeRepository>,
    /// Where the repository lives.
    dir: PathBuf,
    /// `None`: `repo` itself is the source of truth (embedded store).
    remote: Option<gix::Url>,
    author: (String, String),
    label: String,
}

impl GitStore {
    /// The embedded store: a bare repository at `dir`, created when missing.
    pub fn open_embedded(dir: &Path, author: (String, String)) -> Result<Self, StorageError> {
        let repo = open_or_init(dir, false)?.into();
        Ok(GitStore {
            repo,
            dir: dir.to_owned(),
            remote: None,
            author,
            label: format!("embedded repository {}", dir.display()),
        })
    }

    /// A remote store, with its bare cache repository under `cache_dir` (one per URL, reused).
    pub fn open_remote(url: &str, cache_dir: &Path, author: (String, String)) -> Result<Self, StorageError> {
        let parsed = parse_url(url)?;
        let label = redacted(&parsed);
        let dir = cache_path(cache_dir, url);
        // A cache is only a cache: one that does not open cleanly is thrown away and rebuilt.
        let repo = open_or_init(&dir, true)?.into();
        Ok(GitStore { repo, dir, remote: Some(parsed), author, label })
    }

    fn signature(&self) -> gix::actor::Signature {
        gix::actor::Signature {
            name: self.author.0.as_str().into(),
            email: self.author.1.as_str().into(),
            time: gix::date::Time::now_utc(),
        }
    }

    fn local(&self) -> gix::Repository {
        self.repo.read().unwrap_or_else(|p| p.into_inner()).to_thread_local()
    }

    fn update_embedded(&self, repo: &gix::Repository, updates: &[RefUpdate]) -> Result<UpdateOutcome, StorageError> {
        let mut edits = Vec::with_capacity(updates.len());
        for u in updates.iter().filter(|u| u.is_absence_check()) {
            if repo.try_find_reference(u.name.as_str()).map_err(StorageError::local)?.is_some() {
                return Ok(UpdateOutcome::Rejected(vec![(u.name.clone(), "exists".into())]));
            }
        }
        for u in updates.iter().filter(|u| !u.is_absence_check()) {
            let name: gix::refs::FullName =
                u.name.as_str().try_into().map_err(|_| StorageError::Local(format!("invalid ref name {}", u.name)))?;
            let expected = match u.old {
                Some(old) => PreviousValue::MustExistAndMatch(Target::Object(old)),
                None => PreviousValue::MustNotExist,
            };
            let change = match u.new {
                Some(new) => Change::Update {
                    log: LogChange {
                        mode: RefLog::AndReference,
                        force_create_reflog: false,
                        message: "gitstate".into(),
                    },
                    expected,
                    new: Target::Object(new),
                },
                None => Change::Delete { expected, log: RefLog::AndReference },
            };
            edits.push(RefEdit { change, name, deref: false });
        }
        let sig = self.signature();
        let mut time_buf = Default::default();
        match repo.edit_references_as(edits, Some(sig.to_ref(&mut time_buf))) {
            Ok(_) => Ok(UpdateOutcome::Applied),
            // Out of date, already exists, or another writer holds the ref's lock file: a lost race.
            Err(e) if e.is_conflict() || e.is_retryable() || e.is_not_found() => {
                Ok(UpdateOutcome::Rejected(updates.iter().map(|u| (u.name.clone(), e.to_string())).collect()))
            }
            Err(e) => Err(StorageError::local(e)),
        }
    }
}

impl Storage for GitStore {
    fn sync(&self, refs: &[String], creds: Option<&Credentials>) -> Result<Tips, StorageError> {
        if self.remote.is_some() && cache_needs_rebuild(&self.dir) {
            self.reset_cache()?;
        }
        let repo = self.local();
        match &self.remote {
            Some(url) => timed(|| remote::fetch_tips(&repo, url, refs, creds)),
            None => {
                let mut tips = Tips::new();
                for name in refs {
                    if let Some(r) = repo.try_find_reference(name.as_str()).map_err(StorageError::local)? {
                        let id = r.into_fully_peeled_id().map_err(StorageError::local)?;
                        tips.insert(name.clone(), id.detach());
                    }
                }
                Ok(tips)
            }
        }
    }

    fn read_file(&self, commit: ObjectId, path: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let repo = self.local();
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

    fn commit(
        &self,
        parent: Option<ObjectId>,
        path: &str,
        content: Option<&[u8]>,
        message: &str,
    ) -> Result<ObjectId, StorageError> {
        let repo = self.local();
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
        let sig = self.signature();
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

    fn update(&self, updates: &[RefUpdate], creds: Option<&Credentials>) -> Result<UpdateOutcome, StorageError> {
        let repo = self.local();
        match &self.remote {
            Some(url) => timed(|| push::push(&repo, url, updates, creds)),
            None => self.update_embedded(&repo, updates),
        }
    }

    fn describe(&self) -> String {
        self.label.clone()
    }

    fn reset_cache(&self) -> Result<bool, StorageError> {
        if self.remote.is_none() {
            return Ok(false);
        }
        let mut repo = self.repo.write().unwrap_or_else(|p| p.into_inner());
        tracing::warn!(cache = %self.dir.display(), "throwing the cache repository away and rebuilding it");
        if self.dir.exists() {
            std::fs::remove_dir_all(&self.dir).map_err(StorageError::local)?;
        }
        *repo = open_or_init(&self.dir, true)?;
        Ok(true)
    }
}

thread_local! {
    /// Conversations with the git host on this thread, and their time: a request runs on one
    /// blocking thread, so the entry point reads them for its log line.
    static GIT_CALLS: std::cell::Cell<(u32, std::time::Duration)> = const { std::cell::Cell::new((0, std::time::Duration::ZERO)) };
}

fn timed<T>(f: impl FnOnce() -> T) -> T {
    let started = std::time::Instant::now();
    let out = f();
    GIT_CALLS.with(|c| {
        let (n, d) = c.get();
        c.set((n + 1, d + started.elapsed()));
    });
    out
}

/// Take (and reset) the number of conversations with the git host made on this thread, and their total time.
pub fn take_git_calls() -> (u32, std::time::Duration) {
    GIT_CALLS.with(|c| c.replace((0, std::time::Duration::ZERO)))
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
            return Err(StorageError::Local(format!(
                "{PATH_CONFLICT}: `{prefix}` is a state, so `{path}` cannot be stored below it"
            )));
        }
        if last && entry.mode().is_tree() {
            return Err(StorageError::Local(format!("{PATH_CONFLICT}: `{path}` is a directory of other states")));
        }
    }
    Ok(())
}

fn open_or_init(dir: &Path, rebuild_on_failure: bool) -> Result<gix::ThreadSafeRepository, StorageError> {
    // gix sizes its pack index slots from the packs on disk at open time; a warm cache gains a
    // pack per fetch, so give it room (and see MAX_CACHE_PACKS).
    let slots = gix::odb::store::init::Slots::Given(MAX_CACHE_PACKS as u16 * 4);
    let open = || gix::open_opts(dir, gix::open::Options::isolated().object_store_slots(slots)).map(|r| r.into_sync());
    if dir.exists() {
        match open() {
            Ok(repo) if repo.to_thread_local().is_bare() => return Ok(repo),
            Ok(_) | Err(_) if rebuild_on_failure => {
                tracing::warn!(dir = %dir.display(), "cache repository unusable; rebuilding it");
                std::fs::remove_dir_all(dir).map_err(StorageError::local)?;
            }
            Ok(_) => return Err(StorageError::Local(format!("{} is not a bare repository", dir.display()))),
            Err(e) => return Err(StorageError::Local(format!("cannot open {}: {e}", dir.display()))),
        }
    }
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(StorageError::local)?;
    }
    match gix::init_bare(dir) {
        Ok(_) => {}
        // Another process (or thread) created it first: fine, open theirs.
        Err(_) if dir.join("HEAD").exists() => {}
        Err(e) => return Err(StorageError::Local(format!("cannot create {}: {e}", dir.display()))),
    }
    open().map_err(|e| StorageError::Local(format!("cannot open {}: {e}", dir.display())))
}

/// A cache with more packs than this is rebuilt before the next fetch (a depth-1 cache is cheap to refill).
const MAX_CACHE_PACKS: usize = 64;

/// Whether the cache at `dir` must be rebuilt before use: gone, or grown too many packs.
fn cache_needs_rebuild(dir: &Path) -> bool {
    if !dir.join("objects").is_dir() || !dir.join("HEAD").is_file() {
        return true;
    }
    std::fs::read_dir(dir.join("objects/pack"))
        .map(|entries| {
            entries.filter_map(Result::ok).filter(|e| e.file_name().to_string_lossy().ends_with(".idx")).count()
        })
        .unwrap_or(0)
        > MAX_CACHE_PACKS
}

fn cache_path(cache_dir: &Path, url: &str) -> PathBuf {
    use md5::{Digest, Md5};
    let digest = Md5::digest(url.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    cache_dir.join(format!("{hex}.git"))
}

fn parse_url(url: &str) -> Result<gix::Url, StorageError> {
    let parsed = gix::url::parse(gix::bstr::BStr::new(url))
        .map_err(|_| StorageError::Local("the repository URL cannot be parsed".into()))?;
    match parsed.scheme {
        gix::url::Scheme::Git | gix::url::Scheme::Http | gix::url::Scheme::Https => Ok(parsed),
        _ => Err(StorageError::Local(
            "only git://, http:// and https:// repository URLs are supported (file:// and ssh need git's own programs)"
                .into(),
        )),
    }
}

/// True when `url` carries a password or, for HTTP(S), any user info: such URLs are refused.
pub fn url_has_credentials(url: &str) -> bool {
    match gix::url::parse(gix::bstr::BStr::new(url)) {
        Ok(u) => {
            u.password().is_some()
                || (matches!(u.scheme, gix::url::Scheme::Http | gix::url::Scheme::Https) && u.user().is_some())
        }
        Err(_) => url.contains('@') && url.contains("://"),
    }
}

/// The URL for logs: never with user info.
pub fn redacted(url: &gix::Url) -> String {
    let mut u = url.clone();
    u.set_user(None);
    u.set_password(None);
    u.to_bstring().to_string()
}
