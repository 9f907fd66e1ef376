//! What the web view and the `/states` listing read: the states of a branch with their locks
//! (from the tree and the lock branches; a state's file is read once per blob id only to tell
//! whether it is sealed), and one state's summary with its lock and a page of its history.

use serde::Serialize;
use serde_json::Value;

use super::history::Version;
use super::{Backend, BackendError, LockName};
use crate::storage::{ObjectId, RequestContext, Tips};

/// Where every lock branch lives (both layouts: `locks/<path>` and `locks/@/<branch>/@/<path>`).
pub const LOCKS_PREFIX: &str = "refs/heads/locks/";
/// Lock branches one listing reads at most; past it some badges may be missing (and it says so).
const MAX_LOCK_REFS: usize = 1000;
/// Outputs and resource groups a state's page lists at most (the rest are counted).
const MAX_OUTPUTS: usize = 500;
const MAX_RESOURCE_GROUPS: usize = 2000;
/// Instance keys listed per resource group at most.
const MAX_INSTANCE_KEYS: usize = 50;

/// Who holds a lock, from its LockInfo, and since when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lock {
    pub id: String,
    pub who: String,
    pub operation: String,
    pub info: String,
    pub version: String,
    pub created: String,
    /// When the lock branch was written (its commit's time, seconds since the epoch).
    pub since: i64,
    /// The lock branch (full ref name).
    pub reference: String,
}

/// One state of a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StateEntry {
    pub path: String,
    /// Bytes as stored (sealed, when encrypted).
    pub size: u64,
    pub blob: String,
    /// Stored sealed (encryption at rest).
    pub encrypted: bool,
    pub lock: Option<Lock>,
}

/// A lock held on a path that holds no state (a first apply locks before it writes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PathLock {
    pub path: String,
    pub lock: Lock,
}

/// A page of the states of a branch, by path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StateList {
    pub branch: String,
    pub states: Vec<StateEntry>,
    /// The `after` of the next page (`null` on the last).
    pub next: Option<String>,
    /// On the first page: locks on this branch of paths that hold no state.
    pub other_locks: Vec<PathLock>,
    /// More lock branches exist than one listing reads: some badges may be missing.
    pub locks_truncated: bool,
}

/// One state as its page shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StateView {
    pub path: String,
    pub branch: String,
    /// `None`: no state is stored at this path (never written, or deleted).
    pub stored: Option<Stored>,
    pub lock: Option<Lock>,
    /// The newest version (the last writer), when the path has history.
    pub newest: Option<Version>,
    /// A page of history, newest first.
    pub history: Vec<Version>,
    /// The `before` of the next history page.
    pub history_next: Option<String>,
    /// The version just older than the last one listed (the `from` of its diff).
    pub older: Option<String>,
}

/// The stored state and what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stored {
    pub size: u64,
    pub blob: String,
    pub encrypted: bool,
    /// OpenTofu's client-side encryption: only `serial` and `lineage` are in clear.
    pub encrypted_by_client: bool,
    pub serial: Option<u64>,
    pub lineage: Option<String>,
    pub terraform_version: Option<String>,
    /// Sorted by name.
    pub outputs: Vec<OutputRow>,
    pub outputs_more: usize,
    /// Sorted by module, mode, type and name.
    pub resources: Vec<ResourceGroup>,
    pub resources_more: usize,
}

/// An output: a sensitive one has no value here, ever.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutputRow {
    pub name: String,
    pub sensitive: bool,
    /// The type, as compact JSON.
    pub kind: String,
    /// Compact JSON, cut at [`super::diff::MAX_VALUE_CHARS`].
    pub value: Option<String>,
}

/// A resource (module, mode, type, name) and its instance keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResourceGroup {
    /// `""` for the root module.
    pub module: String,
    pub data: bool,
    pub kind: String,
    pub name: String,
    pub provider: String,
    pub instances: usize,
    /// `[0]`, `["key"]`; empty for a single instance without a key.
    pub keys: Vec<String>,
}

impl Backend {
    /// A page of the states of `branch`: `limit` paths after `after`, each with its lock.
    pub(super) fn list_states(
        &self,
        ctx: &RequestContext,
        branch: &str,
        limit: usize,
        after: Option<&str>,
    ) -> Result<StateList, BackendError> {
        let branch_ref = super::branch_ref(branch);
        let tips = self.fetch_tips(ctx, std::slice::from_ref(&branch_ref))?;
        let locks = self.storage.list_refs(ctx, LOCKS_PREFIX, MAX_LOCK_REFS)?;
        let mut list = StateList {
            branch: branch.to_owned(),
            states: Vec::new(),
            next: None,
            other_locks: Vec::new(),
            locks_truncated: locks.truncated,
        };
        let tip = tips.get(&branch_ref).copied();
        if let Some(tip) = tip {
            let page = self.storage.list_files(tip, after, limit)?;
            for file in page.files {
                let lock = self.lock_of(&locks.tips, branch, &file.path)?;
                let encrypted = self.sealed(file.id)?;
                list.states.push(StateEntry {
                    path: file.path,
                    size: file.size,
                    blob: file.id.to_string(),
                    encrypted,
                    lock,
                });
            }
            if page.more {
                list.next = list.states.last().map(|s| s.path.clone());
            }
        }
        if after.is_none() {
            let mut seen = std::collections::BTreeSet::new();
            for name in locks.tips.keys() {
                let Some(path) = locked_path(name, branch) else { continue };
                if !seen.insert(path.to_owned()) {
                    continue;
                }
                let stored = match tip {
                    Some(tip) => self.storage.file_id(tip, path)?.is_some(),
                    None => false,
                };
                if stored {
                    continue;
                }
                if let Some(lock) = self.lock_of(&locks.tips, branch, path)? {
                    list.other_locks.push(PathLock { path: path.to_owned(), lock });
                }
            }
        }
        Ok(list)
    }

    /// Who holds the lock of (`branch`, `path`) according to `tips` (both layouts, as every
    /// other operation reads them).
    fn lock_of(&self, tips: &Tips, branch: &str, path: &str) -> Result<Option<Lock>, BackendError> {
        let lock = LockName::new(branch, path);
        let Some(holder) = self.lock_view(tips, &lock)?.holder else { return Ok(None) };
        let since = self.storage.commit_info(holder.commit)?.map_or(0, |c| c.time);
        let info: Value = serde_json::from_slice(&holder.info.raw).unwrap_or_default();
        let field = |k: &str| info.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
        Ok(Some(Lock {
            id: holder.info.id,
            who: holder.info.who,
            operation: holder.info.operation,
            info: field("Info"),
            version: field("Version"),
            created: field("Created"),
            since,
            reference: holder.reference,
        }))
    }

    /// Whether the stored file `blob` is sealed; read once per blob id (by id: a lookup by path
    /// would walk a large directory again for every file of the page).
    fn sealed(&self, blob: ObjectId) -> Result<bool, BackendError> {
        if let Some(known) = self.memory.is_sealed(&blob) {
            return Ok(known);
        }
        let stored = self.storage.read_blob(blob)?.unwrap_or_default();
        let sealed = super::sealing::is_sealed(&stored);
        self.memory.remember_sealed(blob, sealed);
        Ok(sealed)
    }

    /// The state at `path` of `branch` as its page shows it, with `history` versions older than `before`.
    pub(super) fn view_state(
        &self,
        ctx: &RequestContext,
        branch: &str,
        path: &str,
        history: usize,
        before: Option<ObjectId>,
    ) -> Result<StateView, BackendError> {
        let lock = LockName::new(branch, path);
        let branch_ref = super::branch_ref(branch);
        let mut refs = vec![branch_ref.clone()];
        refs.extend(lock.refs());
        let tips = self.fetch_tips(ctx, &refs)?;
        let mut view = StateView {
            path: path.to_owned(),
            branch: branch.to_owned(),
            stored: None,
            lock: self.lock_of(&tips, branch, path)?,
            newest: None,
            history: Vec::new(),
            history_next: None,
            older: None,
        };
        if let Some(&tip) = tips.get(&branch_ref) {
            if let Some(blob) = self.storage.file_id(tip, path)? {
                let raw = self.storage.read_file(tip, path)?.unwrap_or_default();
                if !raw.is_empty() {
                    let plain = self.sealing.open(ctx, &raw)?;
                    let state = super::checked_state(path, plain.as_slice())?;
                    let encrypted = super::sealing::is_sealed(&raw);
                    self.memory.remember_sealed(blob, encrypted);
                    view.stored = Some(summarize(&state, raw.len() as u64, blob, encrypted));
                }
            }
        }
        let mut page = self.history_page(ctx, branch, path, history.saturating_add(1), before)?;
        if page.versions.len() > history {
            view.older = page.versions.get(history).map(|v| v.commit.clone());
            page.versions.truncate(history);
            view.history_next = page.versions.last().map(|v| v.commit.clone());
        }
        view.newest = match before {
            None => page.versions.first().cloned(),
            Some(_) => self.history_page(ctx, branch, path, 1, None)?.versions.into_iter().next(),
        };
        view.history = page.versions;
        Ok(view)
    }
}

/// The state path a lock branch `name` locks on `branch`, if it may lock one there (the lock
/// view then decides from the branch's commit which layout holds).
fn locked_path<'a>(name: &'a str, branch: &str) -> Option<&'a str> {
    let rest = name.strip_prefix(LOCKS_PREFIX)?;
    match rest.strip_prefix("@/") {
        Some(tagged) => {
            let (locked_branch, path) = tagged.split_once("/@/")?;
            (locked_branch == branch).then_some(path)
        }
        None => Some(rest),
    }
}

/// What a state's page shows of a checked state document.
fn summarize(state: &[u8], size: u64, blob: ObjectId, encrypted: bool) -> Stored {
    let doc: Value = serde_json::from_slice(state).unwrap_or_default();
    let text = |k: &str| doc.get(k).and_then(Value::as_str).map(str::to_owned);
    let mut stored = Stored {
        size,
        blob: blob.to_string(),
        encrypted,
        encrypted_by_client: doc.get("encrypted_data").is_some(),
        serial: doc.get("serial").and_then(Value::as_u64),
        lineage: text("lineage"),
        terraform_version: text("terraform_version"),
        outputs: Vec::new(),
        outputs_more: 0,
        resources: Vec::new(),
        resources_more: 0,
    };
    if let Some(outputs) = doc.get("outputs").and_then(Value::as_object) {
        let mut names: Vec<&String> = outputs.keys().collect();
        names.sort();
        for name in names {
            if stored.outputs.len() >= MAX_OUTPUTS {
                stored.outputs_more += 1;
                continue;
            }
            let output = &outputs[name];
            // As the diff reads it: anything but an absent or `false` flag is sensitive.
            let sensitive = !matches!(output.get("sensitive"), None | Some(Value::Null) | Some(Value::Bool(false)));
            stored.outputs.push(OutputRow {
                name: name.clone(),
                sensitive,
                kind: output.get("type").map(super::diff::shown).unwrap_or_default(),
                value: (!sensitive).then(|| super::diff::shown(output.get("value").unwrap_or(&Value::Null))),
            });
        }
    }
    if let Some(resources) = doc.get("resources").and_then(Value::as_array) {
        let mut groups: Vec<ResourceGroup> = resources
            .iter()
            .map(|r| {
                let text = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
                let instances = r.get("instances").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
                let keys = instances
                    .iter()
                    .filter_map(|i| match i.get("index_key") {
                        None | Some(Value::Null) => None,
                        Some(key) => Some(format!("[{key}]")),
                    })
                    .take(MAX_INSTANCE_KEYS)
                    .collect();
                ResourceGroup {
                    module: text("module"),
                    data: r.get("mode").and_then(Value::as_str) == Some("data"),
                    kind: text("type"),
                    name: text("name"),
                    provider: text("provider"),
                    instances: instances.len(),
                    keys,
                }
            })
            .collect();
        groups.sort_by(|a, b| (&a.module, a.data, &a.kind, &a.name).cmp(&(&b.module, b.data, &b.kind, &b.name)));
        stored.resources_more = groups.len().saturating_sub(MAX_RESOURCE_GROUPS);
        groups.truncate(MAX_RESOURCE_GROUPS);
        stored.resources = groups;
    }
    stored
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_branches_name_their_path_on_this_branch_only() {
        assert_eq!(locked_path("refs/heads/locks/envs/prod.tfstate", "main"), Some("envs/prod.tfstate"));
        // The plain layout may hold other branches too (older layouts): the lock view decides.
        assert_eq!(locked_path("refs/heads/locks/a", "dev"), Some("a"));
        assert_eq!(locked_path("refs/heads/locks/@/dev/@/x/y", "dev"), Some("x/y"));
        assert_eq!(locked_path("refs/heads/locks/@/team/dev/@/x", "team/dev"), Some("x"));
        assert_eq!(locked_path("refs/heads/locks/@/dev/@/x", "main"), None);
        assert_eq!(locked_path("refs/heads/main", "main"), None);
    }

    #[test]
    fn summaries_never_carry_sensitive_values() {
        let state = br#"{"version": 4, "serial": 3, "lineage": "l", "terraform_version": "1.0.3",
            "outputs": {"b": {"value": "shown", "type": "string"}, "a": {"value": "hidden-secret", "type": "string", "sensitive": true},
                        "c": {"value": "odd-secret", "type": "string", "sensitive": "yes"}},
            "resources": [{"mode": "managed", "type": "t", "name": "n", "provider": "p", "instances": [{"index_key": 1}, {"index_key": "k"}]},
                          {"module": "module.m", "mode": "data", "type": "d", "name": "x", "instances": [{}]}]}"#;
        let s = summarize(state, 10, ObjectId::null(gix::hash::Kind::Sha1), false);
        let text = serde_json::to_string(&s).unwrap();
        assert!(!text.contains("secret"), "{text}");
        let names: Vec<_> = s.outputs.iter().map(|o| (o.name.as_str(), o.sensitive, o.value.as_deref())).collect();
        assert_eq!(names, [("a", true, None), ("b", false, Some("\"shown\"")), ("c", true, None)]);
        assert_eq!((s.serial, s.lineage.as_deref()), (Some(3), Some("l")));
        assert_eq!(s.resources[0].keys, ["[1]", "[\"k\"]"]);
        assert_eq!((s.resources[1].module.as_str(), s.resources[1].data), ("module.m", true));
    }
}
