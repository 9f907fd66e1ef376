//! Requests to a smart-HTTP git host per Terraform operation, counted from a real lighttpd
//! access log. A look is one protocol-v2 `POST /git-upload-pack` (`ls-refs`) with no
//! `GET info/refs` before it. A push is always `GET info/refs?service=git-receive-pack` and
//! `POST /git-receive-pack`: only the push's own advertisement says whether the host offers
//! `atomic` now and whether a lock commit named as old id still holds the ref (lock safety,
//! issue 16), whether or not the host offers `atomic`. Behaviour, not timing: these are counts.
//! Also the trap of blind deletes: a lock commit pruned on the host must not let a stale
//! UNLOCK delete a newer lock.

use gitstate_testkit::fixtures::{lock_info, state};
use gitstate_testkit::gitd::{git, git_out, git_try, rev_parse};
use gitstate_testkit::httpd::{AccessEntry, GitHttpServer, DEFAULT_PASSWORD, DEFAULT_USER};
use gitstate_testkit::serve::{http, Serve, ServeOpts};
use gitstate_testkit::terraform::{terraform_version_bin, HttpBackend, TfWorkdir};

const STATE: &str = "envs/counts/terraform.tfstate";

fn basic() -> String {
    use base64::Engine as _;
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{DEFAULT_USER}:{DEFAULT_PASSWORD}")))
}

fn tf_for(serve: &Serve) -> TfWorkdir {
    TfWorkdir::new(backend_for(serve))
}

fn backend_for(serve: &Serve) -> HttpBackend {
    let mut backend = HttpBackend::lock_unlock(serve.state_url(STATE));
    backend.username = Some(DEFAULT_USER.into());
    backend.password = Some(DEFAULT_PASSWORD.into());
    backend
}

/// The requests `f` made the git host answer (lighttpd flushes its log on `access_log`).
fn requests(httpd: &GitHttpServer, f: impl FnOnce()) -> Vec<AccessEntry> {
    let before = httpd.access_log().len();
    f();
    httpd.access_log()[before..].to_vec()
}

fn describe(reqs: &[AccessEntry]) -> String {
    reqs.iter().map(|r| format!("{} {} {}", r.method, r.target, r.status)).collect::<Vec<_>>().join("\n")
}

fn advertisements(reqs: &[AccessEntry]) -> usize {
    reqs.iter().filter(|r| r.target.contains("info/refs")).count()
}

#[test]
fn warm_terraform_operations_cost_a_look_or_a_push_each() {
    warm_counts(true);
}

#[test]
fn a_host_without_atomic_costs_the_same() {
    warm_counts(false);
}

/// Terraform 1.15 reads the state before it locks (and again after): one look more per apply
/// and per plan than 1.0.3.
#[test]
fn terraform_1_15_reads_before_it_locks() {
    let httpd = GitHttpServer::start();
    let url = httpd.create_repo("states.git");
    let serve = Serve::start(ServeOpts::new().repository(&url));
    let mut tf = TfWorkdir::with_terraform(backend_for(&serve), terraform_version_bin("1.15.5"));
    tf.set_outputs(&[("x", "one")]);
    tf.init().assert_success();
    tf.apply().assert_success();
    tf.set_outputs(&[("x", "two")]);
    let apply = requests(&httpd, || {
        tf.apply().assert_success();
    });
    println!("Terraform 1.15.5, warm apply with a change: {} requests\n{}", apply.len(), describe(&apply));
    assert_eq!(advertisements(&apply), 3, "one advertisement per push:\n{}", describe(&apply));
    assert_eq!(apply.len(), 3 * PUSH + 2, "GET 1 + LOCK 2 + GET 1 + POST 2 + UNLOCK 2:\n{}", describe(&apply));
    let plan = requests(&httpd, || {
        tf.plan().assert_success();
    });
    println!("Terraform 1.15.5, warm plan: {} requests\n{}", plan.len(), describe(&plan));
    assert_eq!(plan.len(), 2 * PUSH + 2, "GET 1 + LOCK 2 + GET 1 + UNLOCK 2:\n{}", describe(&plan));
}

/// A push: its advertisement and its POST.
const PUSH: usize = 2;

fn warm_counts(atomic: bool) {
    let httpd = GitHttpServer::start();
    let url = httpd.create_repo("states.git");
    if !atomic {
        git(&httpd.repo_dir("states.git"), &["config", "receive.advertiseAtomic", "false"]);
    }
    let serve = Serve::start(ServeOpts::new().repository(&url));
    let mut tf = tf_for(&serve);
    tf.set_outputs(&[("x", "one")]);

    let cold = requests(&httpd, || {
        tf.init().assert_success();
        tf.apply().assert_success();
    });
    println!("cold init + first apply: {} requests\n{}", cold.len(), describe(&cold));

    // A warm apply with a change: LOCK (a push), GET (a look), POST (a push), UNLOCK (a push).
    tf.set_outputs(&[("x", "two")]);
    let apply = requests(&httpd, || {
        tf.apply().assert_success();
    });
    println!("warm apply with a change (atomic {atomic}): {} requests\n{}", apply.len(), describe(&apply));
    assert_eq!(advertisements(&apply), 3, "one advertisement per push:\n{}", describe(&apply));
    assert_eq!(apply.len(), 3 * PUSH + 1, "a warm apply is LOCK 2 + GET 1 + POST 2 + UNLOCK 2:\n{}", describe(&apply));
    let stored = git_out(&httpd.repo_dir("states.git"), &["show", &format!("main:{STATE}")]);
    assert!(stored.contains("\"two\""), "the apply did not land: {stored}");

    // A plan: LOCK, GET, UNLOCK.
    let plan = requests(&httpd, || {
        tf.plan().assert_success();
    });
    println!("warm plan: {} requests\n{}", plan.len(), describe(&plan));
    assert_eq!(plan.len(), 2 * PUSH + 1, "a warm plan is LOCK 2 + GET 1 + UNLOCK 2:\n{}", describe(&plan));

    // A GET of an unchanged state: one ls-refs.
    let auth = basic();
    let get = requests(&httpd, || {
        let got = http("GET", &serve.state_url(STATE), &[("Authorization", &auth)], None);
        assert_eq!(got.status, 200, "{}", got.text());
    });
    assert_eq!(get.len(), 1, "a GET of an unchanged state is one request:\n{}", describe(&get));
    assert_eq!(advertisements(&get), 0, "{}", describe(&get));

    // Someone else writes: the next GET sees the new tip (a fetch follows the look).
    let server = httpd.repo_dir("states.git");
    let other = git_out(&server, &["commit-tree", "main^{tree}", "-p", "main", "-m", "someone else"]);
    git(&server, &["update-ref", "refs/heads/main", &other]);
    let moved = requests(&httpd, || {
        let got = http("GET", &serve.state_url(STATE), &[("Authorization", &auth)], None);
        assert_eq!(got.status, 200, "{}", got.text());
    });
    println!("GET after another writer moved main ({other}): {} requests\n{}", moved.len(), describe(&moved));
    // One ls-refs, then one fetch of the new tip on the same pooled client: no advertisement.
    assert_eq!(moved.len(), 2, "{}", describe(&moved));
    assert_eq!(advertisements(&moved), 0, "{}", describe(&moved));

    // A fresh process on an empty cache: at most a few more than warm for a whole apply.
    let fresh = Serve::start(ServeOpts::new().repository(&url));
    let mut tf2 = tf_for(&fresh);
    tf2.set_outputs(&[("x", "three")]);
    tf2.init().assert_success();
    let cold_apply = requests(&httpd, || {
        tf2.apply().assert_success();
    });
    println!("cold apply with a change (empty cache): {} requests\n{}", cold_apply.len(), describe(&cold_apply));
    assert!(cold_apply.len() <= 3 * PUSH + 1 + 2, "{}", describe(&cold_apply));
}

/// git's receive-pack deletes a ref unchecked when the old id is an object it does not have.
/// A lock commit force-unlocked and pruned on the host, then a new lock taken by someone else:
/// an UNLOCK under the old lock's ID must not delete the new lock.
#[test]
fn a_stale_unlock_never_deletes_a_newer_lock() {
    let httpd = GitHttpServer::start();
    let url = httpd.create_repo("states.git");
    let repo = httpd.repo_dir("states.git");
    let a = Serve::start(ServeOpts::new().repository(&url));
    let b = Serve::start(ServeOpts::new().repository(&url));
    let auth = basic();
    let h = [("Authorization", auth.as_str())];
    let lock_ref = format!("refs/heads/locks/{STATE}");

    // A takes the lock (and so knows its commit: a blind UNLOCK would name it).
    assert_eq!(http("LOCK", &a.state_url(STATE), &h, Some(lock_info("old").as_bytes())).status, 200);
    let old_commit = rev_parse(&repo, &lock_ref).expect("the lock branch");
    // Someone force-unlocks it on the host and the commit is pruned.
    git(&repo, &["update-ref", "-d", &lock_ref]);
    git(&repo, &["reflog", "expire", "--expire=now", "--all"]);
    git(&repo, &["gc", "-q", "--prune=now"]);
    assert!(
        !git_try(&repo, &["cat-file", "-e", &old_commit]).status.success(),
        "the old lock commit is still on the host; the trap needs it pruned"
    );
    // B takes a new lock.
    assert_eq!(http("LOCK", &b.state_url(STATE), &h, Some(lock_info("new").as_bytes())).status, 200);
    let new_commit = rev_parse(&repo, &lock_ref).expect("B's lock");
    // A's UNLOCK with its old ID: refused (another ID holds it), and B's lock stays.
    let got = http("UNLOCK", &a.state_url(STATE), &h, Some(lock_info("old").as_bytes()));
    assert_eq!(got.status, 409, "the stale UNLOCK: {}", got.text());
    assert_eq!(rev_parse(&repo, &lock_ref).as_deref(), Some(new_commit.as_str()), "B's lock was deleted");
    // A force-unlock still works (it looks first).
    assert_eq!(http("UNLOCK", &a.state_url(STATE), &h, Some(b"")).status, 200);
    assert_eq!(rev_parse(&repo, &lock_ref), None);
}

fn get(serve: &Serve, path: &str) -> gitstate_testkit::serve::HttpResponse {
    http("GET", &serve.state_url(path), &[("Authorization", &basic())], None)
}

fn post(serve: &Serve, path: &str, body: &str) {
    let put = http("POST", &serve.state_url(path), &[("Authorization", &basic())], Some(body.as_bytes()));
    assert_eq!(put.status, 200, "{}", put.text());
}

/// A fresh process's first read: one `fetch` naming the branch where the host takes
/// `want-ref`; where it does not, the refusal, a look and a fetch (never gix's handshake).
#[test]
fn a_cold_read_is_one_request_where_the_host_takes_want_ref() {
    let httpd = GitHttpServer::start();
    let url = httpd.create_repo("states.git");
    let server = httpd.repo_dir("states.git");
    let writer = Serve::start(ServeOpts::new().repository(&url));
    post(&writer, STATE, &state(1, "one"));

    for allowed in [true, false] {
        git(&server, &["config", "uploadpack.allowRefInWant", if allowed { "true" } else { "false" }]);
        let fresh = Serve::start(ServeOpts::new().repository(&url));
        let first = requests(&httpd, || {
            let got = get(&fresh, STATE);
            assert_eq!(got.status, 200, "{}", got.text());
            assert!(got.text().contains("\"one\""), "{}", got.text());
        });
        println!("cold GET, allowRefInWant {allowed}: {} requests\n{}", first.len(), describe(&first));
        assert_eq!(advertisements(&first), 0, "{}", describe(&first));
        assert!(
            first.iter().all(|r| r.method == "POST" && r.target.ends_with("git-upload-pack")),
            "{}",
            describe(&first)
        );
        // Without `want-ref`: the refused fetch by name (learnt for the process), a look, a fetch.
        assert_eq!(first.len(), if allowed { 1 } else { 3 }, "{}", describe(&first));
        // Warm from then on: an unchanged state is one look.
        let again = requests(&httpd, || assert_eq!(get(&fresh, STATE).status, 200));
        assert_eq!(again.len(), 1, "{}", describe(&again));
    }
}

/// `want-ref` of a branch that does not exist yet is refused too: that refusal says nothing of
/// the host, so the next cold read still asks by name (one request once the branch exists).
#[test]
fn a_missing_branch_does_not_teach_that_the_host_refuses_want_ref() {
    let httpd = GitHttpServer::start();
    let url = httpd.create_repo("states.git");
    let server = httpd.repo_dir("states.git");
    git(&server, &["config", "uploadpack.allowRefInWant", "true"]);
    let reader = Serve::start(ServeOpts::new().repository(&url).git_ref("staging"));
    // No state yet: 204, as for any state never written.
    let empty = requests(&httpd, || assert_eq!(get(&reader, STATE).status, 204));
    println!("cold GET of a missing branch: {} requests\n{}", empty.len(), describe(&empty));
    assert_eq!(empty.len(), 2, "a refused fetch by name, then a look:\n{}", describe(&empty));

    let writer = Serve::start(ServeOpts::new().repository(&url).git_ref("staging"));
    post(&writer, STATE, &state(1, "one"));
    let first = requests(&httpd, || {
        let got = get(&reader, STATE);
        assert_eq!(got.status, 200, "{}", got.text());
        assert!(got.text().contains("\"one\""), "{}", got.text());
    });
    assert_eq!(first.len(), 1, "still asked by name:\n{}", describe(&first));
}

/// A warm fetch names the commits the cache holds as `have`s; the host must still send every
/// object of the new tip that those commits lack, even one only an older commit holds.
#[test]
fn a_warm_fetch_gets_every_object_the_cache_lacks() {
    let httpd = GitHttpServer::start();
    let url = httpd.create_repo("states.git");
    let server = httpd.repo_dir("states.git");
    let writer = Serve::start(ServeOpts::new().repository(&url));
    let reader = Serve::start(ServeOpts::new().repository(&url));
    let other = "envs/other/terraform.tfstate";
    let v1 = state(1, "one");
    post(&writer, STATE, &v1);
    post(&writer, other, &state(1, "other"));
    assert_eq!(get(&reader, STATE).status, 200);
    post(&writer, STATE, &state(2, "two"));
    assert!(get(&reader, STATE).text().contains("\"two\""));

    // Back to the first version's blob, by a commit the reader never saw, and a file added
    // in a new directory: the blob exists only in an ancestor of the reader's tip.
    let blob = git_out(&server, &["rev-parse", &format!("main~1:{STATE}")]);
    let base = git_out(&server, &["rev-parse", "main^{tree}"]);
    let index = server.join("revert-index");
    let run = |args: &[&str]| {
        let out =
            gitstate_testkit::gitd::git_command(&server).env("GIT_INDEX_FILE", &index).args(args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    run(&["read-tree", &base]);
    run(&["update-index", "--add", "--cacheinfo", &format!("100644,{blob},{STATE}")]);
    let tree = run(&["write-tree"]);
    let commit = git_out(&server, &["commit-tree", &tree, "-p", "main", "-m", "back to one"]);
    git(&server, &["update-ref", "refs/heads/main", &commit]);

    let moved = requests(&httpd, || {
        let got = get(&reader, STATE);
        assert_eq!(got.status, 200, "{}", got.text());
        assert_eq!(got.text(), v1, "the reverted state reads back whole");
    });
    assert_eq!(moved.len(), 2, "{}", describe(&moved));
    assert!(get(&reader, other).text().contains("\"other\""));
    // The reader's cache reads as a sound shallow repository, history and all.
    let history = http("GET", &format!("{}/history/{STATE}", reader.base_url()), &[("Authorization", &basic())], None);
    assert_eq!(history.status, 200, "{}", history.text());
    assert!(
        history.text().contains("back to one") || history.json().to_string().contains(&commit),
        "{}",
        history.text()
    );
}

/// The `have`s of a warm fetch work: when one state of many changed, the fetch brings the new
/// commit, the trees on the changed path and the changed blob, not the whole tree again.
#[test]
fn a_warm_fetch_brings_only_what_changed() {
    let httpd = GitHttpServer::start();
    let url = httpd.create_repo("states.git");
    let writer = Serve::start(ServeOpts::new().repository(&url));
    let reader = Serve::start(ServeOpts::new().repository(&url));
    let path = |i: usize| format!("envs/{}/{i}.tfstate", i % 5);
    for i in 0..30 {
        post(&writer, &path(i), &state(1, &format!("state {i}")));
    }
    assert_eq!(get(&reader, &path(7)).status, 200);
    post(&writer, &path(7), &state(2, "changed"));
    let packs_before = packs(&reader.cache_dir());
    let moved = requests(&httpd, || assert!(get(&reader, &path(7)).text().contains("\"changed\"")));
    assert_eq!(moved.len(), 2, "{}", describe(&moved));
    let new: Vec<_> = packs(&reader.cache_dir()).into_iter().filter(|p| !packs_before.contains(p)).collect();
    assert_eq!(new.len(), 1, "one new pack: {new:?}");
    let index = std::fs::read(&new[0]).unwrap();
    let listed = gitstate_testkit::gitd::git_with_input(new[0].parent().unwrap(), &["show-index"], &index);
    let objects = listed.lines().count();
    println!("objects in the warm fetch's pack: {objects}\n{listed}");
    // The commit, the root tree, `envs`, `envs/2` and the blob; the whole tree would be 38.
    assert_eq!(objects, 5, "{listed}");
    assert!(get(&reader, &path(12)).text().contains("\"state 12\""), "another state still reads");
}

/// Every pack index under `dir`, recursively.
fn packs(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return found };
    for entry in entries.flatten() {
        let p = entry.path();
        if p.is_dir() {
            found.extend(packs(&p));
        } else if p.extension().is_some_and(|x| x == "idx") {
            found.push(p);
        }
    }
    found
}
