//! The git network layer against a real `git daemon`: fetching tips at depth 1
//! into a bare cache, and our receive-pack push with its compare-and-swap
//! semantics (stale old ids, creations, deletions, atomic guards, races).

use std::path::Path;
use std::sync::{Arc, Barrier};

use gitstate::context::RequestContext;
use gitstate::storage::git::{pack, push, remote};
use gitstate::storage::{ObjectId, RefUpdate, RepoUrl, StorageError, UpdateOutcome};
use gitstate_testkit::fixtures::fsck_clean;
use gitstate_testkit::gitd::{git_out, rev_parse, GitDaemon};

/// Anonymous access: the daemon asks for no credentials.
fn push_(
    repo: &gix::Repository,
    url: &RepoUrl,
    updates: &[gitstate::storage::RefUpdate],
) -> Result<gitstate::storage::UpdateOutcome, gitstate::storage::StorageError> {
    push::push(repo, url, updates, &RequestContext::unbounded()).map(|p| p.outcome)
}

fn fetch_(
    repo: &gix::Repository,
    url: &RepoUrl,
    refs: &[String],
) -> Result<gitstate::storage::Tips, gitstate::storage::StorageError> {
    remote::fetch_tips(repo, url, refs, &RequestContext::unbounded(), &std::sync::Mutex::new(()))
}

const MAIN: &str = "refs/heads/main";
const LOCK: &str = "refs/heads/locks/envs/prod/terraform.tfstate";

fn url(s: &str) -> RepoUrl {
    RepoUrl::parse(s).expect("valid URL")
}

fn cache(dir: &Path) -> gix::Repository {
    gix::init_bare(dir).expect("init cache repository")
}

/// A commit on `parent` (or a root commit) with `path` set to `content`.
fn commit(repo: &gix::Repository, parent: Option<ObjectId>, path: &str, content: &str) -> ObjectId {
    let base = match parent {
        Some(p) => repo.find_commit(p).unwrap().tree_id().unwrap().detach(),
        None => ObjectId::empty_tree(repo.object_hash()),
    };
    let blob = repo.write_blob(content.as_bytes()).unwrap().detach();
    let mut editor = repo.edit_tree(base).unwrap();
    editor.upsert(path, gix::object::tree::EntryKind::Blob, blob).unwrap();
    let tree = editor.write().unwrap().detach();
    let sig = gix::actor::Signature {
        name: "gitstate test".into(),
        email: "test@example.com".into(),
        time: gix::date::Time::new(1_700_000_000, 0),
    };
    let commit = gix::objs::Commit {
        tree,
        parents: parent.into_iter().collect(),
        author: sig.clone(),
        committer: sig,
        encoding: None,
        message: format!("Update {path}\n").into(),
        extra_headers: Vec::new(),
    };
    repo.write_object(&commit).unwrap().detach()
}

fn update(name: &str, old: Option<ObjectId>, new: Option<ObjectId>) -> RefUpdate {
    RefUpdate { name: name.into(), old, new }
}

fn server_ref(daemon: &GitDaemon, repo: &str, name: &str) -> Option<ObjectId> {
    rev_parse(&daemon.repo_dir(repo), name).map(|hex| ObjectId::from_hex(hex.as_bytes()).unwrap())
}

fn assert_rejected(outcome: UpdateOutcome, name: &str) -> String {
    match outcome {
        UpdateOutcome::Rejected(refs) => {
            let (_, reason) = refs
                .iter()
                .find(|(r, _)| r == name)
                .unwrap_or_else(|| panic!("{name} not among the rejected refs {refs:?}"));
            reason.clone()
        }
        other => panic!("expected {name} to be rejected, the push came to {other:?}"),
    }
}

#[test]
fn fetch_tips_of_an_empty_remote_is_empty() {
    let daemon = GitDaemon::start();
    let remote_url = url(&daemon.create_repo("empty.git"));
    let dir = tempfile::tempdir().unwrap();
    let repo = cache(dir.path());
    let tips = fetch_(&repo, &remote_url, &[MAIN.to_owned(), LOCK.to_owned()]).unwrap();
    assert!(tips.is_empty(), "{tips:?}");
}

#[test]
fn unreachable_host_is_unavailable() {
    // A port nobody listens on: bind, note, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let repo = cache(dir.path());
    let u = url(&format!("git://127.0.0.1:{port}/x.git"));
    let err = fetch_(&repo, &u, &[MAIN.to_owned()]).unwrap_err();
    assert!(matches!(err, StorageError::HostUnavailable(_)), "{err:?}");
    let err = push_(&repo, &u, &[update(MAIN, None, None)]).unwrap_err();
    assert!(matches!(err, StorageError::HostUnavailable(_)), "{err:?}");
}

/// Only git://, http://, https:// and ssh:// can be named at all: anything else would make gix
/// spawn git. ssh:// is gitstate's own client, and without the deployment's key (as here) it
/// refuses before connecting: never an `ssh` binary (tests/ssh_hosts.rs runs it against sshd).
#[test]
fn file_urls_are_refused_and_ssh_needs_the_deployments_key() {
    let dir = tempfile::tempdir().unwrap();
    for u in [format!("file://{}", dir.path().display()), dir.path().display().to_string()] {
        assert_eq!(RepoUrl::parse(&u), Err(gitstate::storage::UrlError::Scheme), "{u}");
    }
    let repo = cache(dir.path());
    // TEST-NET: nothing would answer there.
    let u = url("ssh://git@192.0.2.1/x.git");
    let err = fetch_(&repo, &u, &[MAIN.to_owned()]).unwrap_err();
    assert!(matches!(err, StorageError::Local(_)), "{err:?}");
}

/// A repository the daemon does not have is a permanent "not found", not "try again".
#[test]
fn missing_repository_is_not_found() {
    let daemon = GitDaemon::start();
    let dir = tempfile::tempdir().unwrap();
    let repo = cache(dir.path());
    let u = url(&daemon.url("nope.git"));
    let err = fetch_(&repo, &u, &[MAIN.to_owned()]).unwrap_err();
    assert!(matches!(err, StorageError::RepositoryNotFound(_)), "{err:?}");
    assert!(!err.is_spurious());
    let err = push_(&repo, &u, &[update(MAIN, None, None)]).unwrap_err();
    assert!(matches!(err, StorageError::RepositoryNotFound(_)), "{err:?}");
}

#[test]
fn empty_pack_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let repo = cache(dir.path());
    let bytes = pack::build_pack(&repo, &[], &[]).unwrap();
    assert_eq!(bytes.len(), 12 + 20, "header and checksum only");
    assert_eq!(&bytes[..4], b"PACK");
    assert_eq!(&bytes[8..12], &[0, 0, 0, 0]);
}

/// Only the parent is looked at, and what it has is left out: the new commit, the
/// root tree, the changed subtree and the new blob.
#[test]
fn pack_holds_only_what_the_parent_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let repo = cache(dir.path());
    let c1 = commit(&repo, None, "a/terraform.tfstate", "a\n");
    let c1 = commit(&repo, Some(c1), "b/terraform.tfstate", "b\n");
    let c2 = commit(&repo, Some(c1), "b/terraform.tfstate", "b2\n");
    let bytes = pack::build_pack(&repo, &[c2], &[c1]).unwrap();
    assert_eq!(&bytes[..4], b"PACK");
    assert_eq!(u32::from_be_bytes(bytes[8..12].try_into().unwrap()), 4);
}

#[test]
fn push_create_update_delete_with_compare_and_swap() {
    let daemon = GitDaemon::start();
    let remote_url = url(&daemon.create_repo("states.git"));
    let dir = tempfile::tempdir().unwrap();
    let repo = cache(dir.path());

    // Create.
    let c1 = commit(&repo, None, "envs/prod/terraform.tfstate", "{\"serial\": 1}\n");
    let out = push_(&repo, &remote_url, &[update(MAIN, None, Some(c1))]).unwrap();
    assert_eq!(out, UpdateOutcome::Applied);
    assert_eq!(server_ref(&daemon, "states.git", MAIN), Some(c1));
    fsck_clean(&daemon.repo_dir("states.git"));

    // Creating again (old = must not exist) loses.
    let other = commit(&repo, None, "envs/prod/terraform.tfstate", "{\"serial\": 99}\n");
    let out = push_(&repo, &remote_url, &[update(MAIN, None, Some(other))]).unwrap();
    assert_rejected(out, MAIN);
    assert_eq!(server_ref(&daemon, "states.git", MAIN), Some(c1));

    // Update from the right tip: only the new objects travel (the parent is on the remote).
    let c2 = commit(&repo, Some(c1), "envs/dev/terraform.tfstate", "{\"serial\": 1}\n");
    let out = push_(&repo, &remote_url, &[update(MAIN, Some(c1), Some(c2))]).unwrap();
    assert_eq!(out, UpdateOutcome::Applied);
    assert_eq!(server_ref(&daemon, "states.git", MAIN), Some(c2));
    fsck_clean(&daemon.repo_dir("states.git"));
    assert_eq!(
        git_out(&daemon.repo_dir("states.git"), &["show", "main:envs/prod/terraform.tfstate"]),
        "{\"serial\": 1}"
    );

    // Update from a stale tip loses and leaves the server alone.
    let c3 = commit(&repo, Some(c1), "envs/prod/terraform.tfstate", "{\"serial\": 2}\n");
    let out = push_(&repo, &remote_url, &[update(MAIN, Some(c1), Some(c3))]).unwrap();
    assert_rejected(out, MAIN);
    assert_eq!(server_ref(&daemon, "states.git", MAIN), Some(c2));

    // Deleting with a wrong old id loses (receive-pack would not check it: we do).
    let lock = commit(&repo, None, "envs/prod/terraform.tfstate.lock", "{\"ID\": \"a\"}\n");
    let out = push_(&repo, &remote_url, &[update(LOCK, None, Some(lock))]).unwrap();
    assert_eq!(out, UpdateOutcome::Applied);
    let out = push_(&repo, &remote_url, &[update(LOCK, Some(c1), None)]).unwrap();
    assert_rejected(out, LOCK);
    assert_eq!(server_ref(&daemon, "states.git", LOCK), Some(lock));

    // Deleting with the right old id (a delete-only push sends no pack).
    let out = push_(&repo, &remote_url, &[update(LOCK, Some(lock), None)]).unwrap();
    assert_eq!(out, UpdateOutcome::Applied);
    assert_eq!(server_ref(&daemon, "states.git", LOCK), None);
    fsck_clean(&daemon.repo_dir("states.git"));

    // Deleting what does not exist loses.
    let out = push_(&repo, &remote_url, &[update(LOCK, Some(lock), None)]).unwrap();
    assert_rejected(out, LOCK);
}

#[test]
fn atomic_guard_on_a_moved_ref_rejects_everything() {
    let daemon = GitDaemon::start();
    let remote_url = url(&daemon.create_repo("atomic.git"));
    let dir = tempfile::tempdir().unwrap();
    let repo = cache(dir.path());
    let state = "envs/prod/terraform.tfstate";

    let base = commit(&repo, None, state, "{\"serial\": 1}\n");
    let lock_a = commit(&repo, None, "envs/prod/terraform.tfstate.lock", "{\"ID\": \"a\"}\n");
    let out = push_(&repo, &remote_url, &[update(MAIN, None, Some(base)), update(LOCK, None, Some(lock_a))]).unwrap();
    assert_eq!(out, UpdateOutcome::Applied);

    // A write under lock A with the guard, when the lock is still A: applied together.
    let w1 = commit(&repo, Some(base), state, "{\"serial\": 2}\n");
    let out =
        push_(&repo, &remote_url, &[update(MAIN, Some(base), Some(w1)), update(LOCK, Some(lock_a), Some(lock_a))])
            .unwrap();
    assert_eq!(out, UpdateOutcome::Applied);
    assert_eq!(server_ref(&daemon, "atomic.git", MAIN), Some(w1));
    assert_eq!(server_ref(&daemon, "atomic.git", LOCK), Some(lock_a));

    // Someone force-unlocks and relocks (as B) behind our back.
    let clone = tempfile::tempdir().unwrap();
    let clone_dir = clone.path().join("w");
    git_out(
        clone.path(),
        &["clone", "-q", daemon.repo_dir("atomic.git").to_str().unwrap(), clone_dir.to_str().unwrap()],
    );
    git_out(&clone_dir, &["checkout", "-q", "--orphan", "lockb"]);
    std::fs::write(clone_dir.join("x.lock"), "{\"ID\": \"b\"}\n").unwrap();
    git_out(&clone_dir, &["add", "x.lock"]);
    git_out(&clone_dir, &["commit", "-q", "-m", "lock b"]);
    git_out(&clone_dir, &["push", "-q", "--force", "origin", &format!("HEAD:{LOCK}")]);
    let lock_b = server_ref(&daemon, "atomic.git", LOCK).unwrap();
    assert_ne!(lock_b, lock_a);

    // Check-first catches the moved guard from the advertisement.
    let w2 = commit(&repo, Some(w1), state, "{\"serial\": 3}\n");
    let out = push_(&repo, &remote_url, &[update(MAIN, Some(w1), Some(w2)), update(LOCK, Some(lock_a), Some(lock_a))])
        .unwrap();
    assert_rejected(out, LOCK);
    assert_eq!(server_ref(&daemon, "atomic.git", MAIN), Some(w1));
    assert_eq!(server_ref(&daemon, "atomic.git", LOCK), Some(lock_b));
    fsck_clean(&daemon.repo_dir("atomic.git"));
}

/// The guard must hold at the moment the refs move, not only at advertisement
/// time: a hook that moves the lock between our check and git's ref update proves
/// that receive-pack's atomic transaction checks the guard's old value.
#[test]
fn atomic_guard_is_checked_by_receive_pack_itself() {
    let daemon = GitDaemon::start();
    let remote_url = url(&daemon.create_repo("race.git"));
    let dir = tempfile::tempdir().unwrap();
    let repo = cache(dir.path());
    let state = "envs/prod/terraform.tfstate";

    let base = commit(&repo, None, state, "{\"serial\": 1}\n");
    let lock_a = commit(&repo, None, "envs/prod/terraform.tfstate.lock", "{\"ID\": \"a\"}\n");
    let out = push_(&repo, &remote_url, &[update(MAIN, None, Some(base)), update(LOCK, None, Some(lock_a))]).unwrap();
    assert_eq!(out, UpdateOutcome::Applied);

    // pre-receive runs after the advertisement and before the ref transaction:
    // it moves the lock to another commit (the base commit will do).
    let server = daemon.repo_dir("race.git");
    let hook = server.join("hooks").join("pre-receive");
    std::fs::write(
        &hook,
        format!("#!/bin/sh\ncat >/dev/null\nunset GIT_QUARANTINE_PATH\ngit update-ref {LOCK} {base}\n"),
    )
    .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    let w1 = commit(&repo, Some(base), state, "{\"serial\": 2}\n");
    let out =
        push_(&repo, &remote_url, &[update(MAIN, Some(base), Some(w1)), update(LOCK, Some(lock_a), Some(lock_a))])
            .unwrap();
    let reason = assert_rejected(out, LOCK);
    eprintln!("guard rejected with: {reason}");
    assert_eq!(server_ref(&daemon, "race.git", MAIN), Some(base), "main must not move");
    assert_eq!(server_ref(&daemon, "race.git", LOCK), Some(base), "the hook moved the lock");
}

#[test]
fn fetch_tips_into_a_fresh_cache_at_depth_one() {
    let daemon = GitDaemon::start();
    let remote_url = url(&daemon.create_repo("fetch.git"));
    let writer_dir = tempfile::tempdir().unwrap();
    let writer = cache(writer_dir.path());
    let c1 = commit(&writer, None, "a/terraform.tfstate", "one\n");
    let c2 = commit(&writer, Some(c1), "b/terraform.tfstate", "two\n");
    let lock = commit(&writer, None, "a/terraform.tfstate.lock", "{}\n");
    // Two pushes so the server has the history c1 <- c2.
    assert_eq!(push_(&writer, &remote_url, &[update(MAIN, None, Some(c1))]).unwrap(), UpdateOutcome::Applied);
    assert_eq!(
        push_(&writer, &remote_url, &[update(MAIN, Some(c1), Some(c2)), update(LOCK, None, Some(lock))]).unwrap(),
        UpdateOutcome::Applied
    );
    fsck_clean(&daemon.repo_dir("fetch.git"));

    let dir = tempfile::tempdir().unwrap();
    let repo = cache(dir.path());
    let wanted = [MAIN.to_owned(), LOCK.to_owned(), "refs/heads/absent".to_owned()];
    let tips = fetch_(&repo, &remote_url, &wanted).unwrap();
    assert_eq!(tips.len(), 2, "{tips:?}");
    assert_eq!(tips[MAIN], c2);
    assert_eq!(tips[LOCK], lock);

    // Readable: the tip, its tree and blobs; not the parent (depth 1).
    let tree = repo.find_commit(c2).unwrap().tree().unwrap();
    let entry = tree.lookup_entry_by_path("b/terraform.tfstate").unwrap().unwrap();
    assert_eq!(repo.find_blob(entry.object_id()).unwrap().data, b"two\n");
    assert!(!repo.has_object(c1), "the parent must not be fetched");
    assert!(repo.is_shallow().unwrap());
    assert_eq!(repo.references().unwrap().all().unwrap().count(), 0, "no refs written");

    // Warm: nothing missing, no fetch.
    let again = fetch_(&repo, &remote_url, &wanted).unwrap();
    assert_eq!(again, tips);

    // Build on the shallow cache and push: only the new objects are needed.
    let c3 = commit(&repo, Some(c2), "a/terraform.tfstate", "three\n");
    let out = push_(&repo, &remote_url, &[update(MAIN, Some(c2), Some(c3))]).unwrap();
    assert_eq!(out, UpdateOutcome::Applied);
    fsck_clean(&daemon.repo_dir("fetch.git"));
    assert_eq!(git_out(&daemon.repo_dir("fetch.git"), &["show", "main:a/terraform.tfstate"]), "three");

    // The new tip arrives in the cache on the next call.
    let tips = fetch_(&repo, &remote_url, &[MAIN.to_owned()]).unwrap();
    assert_eq!(tips[MAIN], c3);
}

/// What the server side of a warm call sees: the handshake and `ls-refs` limited to
/// our refs, no `fetch` command.
#[test]
fn warm_fetch_sends_only_ls_refs() {
    let trace_dir = tempfile::tempdir().unwrap();
    let trace = trace_dir.path().join("packets.log");
    let daemon = GitDaemon::start_with_env(&[("GIT_TRACE_PACKET", trace.to_str().unwrap())]);
    let remote_url = url(&daemon.create_repo("warm.git"));
    let dir = tempfile::tempdir().unwrap();
    let repo = cache(dir.path());
    let c1 = commit(&repo, None, "a/terraform.tfstate", "one\n");
    assert_eq!(push_(&repo, &remote_url, &[update(MAIN, None, Some(c1))]).unwrap(), UpdateOutcome::Applied);

    let cold_dir = tempfile::tempdir().unwrap();
    let cold = cache(cold_dir.path());
    fetch_(&cold, &remote_url, &[MAIN.to_owned()]).unwrap();
    let log = std::fs::read_to_string(&trace).unwrap();
    assert!(log.contains("command=fetch"), "a cold call fetches");

    std::fs::write(&trace, "").unwrap();
    let tips = fetch_(&cold, &remote_url, &[MAIN.to_owned()]).unwrap();
    assert_eq!(tips[MAIN], c1);
    let log = std::fs::read_to_string(&trace).unwrap();
    assert!(log.contains("command=ls-refs"), "{log}");
    assert!(!log.contains("command=fetch"), "a warm call must not fetch:\n{log}");
    let prefixes: Vec<&str> = log.lines().filter_map(|l| l.split("ref-prefix ").nth(1)).map(str::trim).collect();
    assert_eq!(prefixes, vec![MAIN], "ls-refs asks for exactly our refs:\n{log}");
}

/// A server without `atomic`: guards are checked against the advertisement only,
/// then dropped from the commands.
#[test]
fn without_atomic_guards_are_checked_then_dropped() {
    let daemon = GitDaemon::start();
    let remote_url = url(&daemon.create_repo("plain.git"));
    git_out(&daemon.repo_dir("plain.git"), &["config", "receive.advertiseAtomic", "false"]);
    let dir = tempfile::tempdir().unwrap();
    let repo = cache(dir.path());
    let state = "envs/prod/terraform.tfstate";

    let base = commit(&repo, None, state, "{\"serial\": 1}\n");
    let lock_a = commit(&repo, None, "envs/prod/terraform.tfstate.lock", "{\"ID\": \"a\"}\n");
    let out = push_(&repo, &remote_url, &[update(MAIN, None, Some(base)), update(LOCK, None, Some(lock_a))]).unwrap();
    assert_eq!(out, UpdateOutcome::Applied, "several updates go without atomic too");

    let w1 = commit(&repo, Some(base), state, "{\"serial\": 2}\n");
    let out =
        push_(&repo, &remote_url, &[update(MAIN, Some(base), Some(w1)), update(LOCK, Some(lock_a), Some(lock_a))])
            .unwrap();
    assert_eq!(out, UpdateOutcome::Applied);
    assert_eq!(server_ref(&daemon, "plain.git", MAIN), Some(w1));

    let w2 = commit(&repo, Some(w1), state, "{\"serial\": 3}\n");
    let out =
        push_(&repo, &remote_url, &[update(MAIN, Some(w1), Some(w2)), update(LOCK, Some(base), Some(base))]).unwrap();
    assert_rejected(out, LOCK);
    assert_eq!(server_ref(&daemon, "plain.git", MAIN), Some(w1));

    // Only a guard: nothing to send once it checked out.
    let out = push_(&repo, &remote_url, &[update(LOCK, Some(lock_a), Some(lock_a))]).unwrap();
    assert_eq!(out, UpdateOutcome::Applied);
    fsck_clean(&daemon.repo_dir("plain.git"));
}

#[test]
fn concurrent_fetches_into_one_cache() {
    let daemon = GitDaemon::start();
    let remote_url = url(&daemon.create_repo("shared.git"));
    let writer_dir = tempfile::tempdir().unwrap();
    let writer = cache(writer_dir.path());
    let c1 = commit(&writer, None, "a/terraform.tfstate", "one\n");
    assert_eq!(push_(&writer, &remote_url, &[update(MAIN, None, Some(c1))]).unwrap(), UpdateOutcome::Applied);

    let dir = tempfile::tempdir().unwrap();
    cache(dir.path());
    let barrier = Arc::new(Barrier::new(8));
    // One store, one turn for its fetches: the threads of one process share it.
    let turn = Arc::new(std::sync::Mutex::new(()));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let path = dir.path().to_owned();
            let remote_url = remote_url.clone();
            let barrier = barrier.clone();
            let turn = Arc::clone(&turn);
            std::thread::spawn(move || {
                let repo = gix::open(path).unwrap();
                barrier.wait();
                remote::fetch_tips(&repo, &remote_url, &[MAIN.to_owned()], &RequestContext::unbounded(), &turn)
            })
        })
        .collect();
    for h in handles {
        let tips = h.join().unwrap().unwrap();
        assert_eq!(tips[MAIN], c1);
    }
    let repo = gix::open(dir.path()).unwrap();
    assert!(repo.has_object(c1));
}

#[test]
fn twenty_concurrent_creators_one_winner() {
    let daemon = GitDaemon::start();
    let remote_url = url(&daemon.create_repo("race20.git"));
    let n = 20;
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let remote_url = remote_url.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let dir = tempfile::tempdir().unwrap();
                let repo = cache(dir.path());
                let c = commit(&repo, None, "x/terraform.tfstate.lock", &format!("{{\"ID\": \"{i}\"}}\n"));
                barrier.wait();
                let out = push_(&repo, &remote_url, &[update(LOCK, None, Some(c))]);
                (c, out)
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let winners: Vec<ObjectId> = results
        .iter()
        .filter_map(|(c, out)| match out {
            Ok(UpdateOutcome::Applied) => Some(*c),
            Ok(UpdateOutcome::Rejected(_)) => None,
            Ok(partial @ UpdateOutcome::PartlyApplied { .. }) => {
                panic!("a single create was partly applied: {partial:?}")
            }
            Err(e) => panic!("push failed: {e}\n{}", daemon.log()),
        })
        .collect();
    assert_eq!(winners.len(), 1, "exactly one creator wins: {results:?}");
    assert_eq!(server_ref(&daemon, "race20.git", LOCK), Some(winners[0]));
    fsck_clean(&daemon.repo_dir("race20.git"));
}
