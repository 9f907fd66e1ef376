//! Lock safety on any git host (issue 16), against real git servers (git daemon and
//! `git http-backend` behind lighttpd) and real `gitstate serve` processes:
//! - I1: a write under lock X moves the branch only while X holds the lock, even when the
//!   host pruned X's lock commit or stopped honouring `atomic`;
//! - I2: an UNLOCK by X deletes the lock only while X holds it;
//! - I3: a push the host applied in part is answered as what happened (the write landed);
//! - I4: one lock per (branch, path) whatever the deployment's default branch, and locks of
//!   the older layouts are honoured until released.
//!
//! The stale instance is always warm when it acts: it took its lock, wrote under it and read
//! the state, so it knows the lock commit and the host's capabilities.

use gitstate_testkit::fixtures::{lock_info, state};
use gitstate_testkit::gitd::{git, git_out, git_try, git_with_input, rev_parse, GitDaemon};
use gitstate_testkit::httpd::{GitHttpServer, DEFAULT_PASSWORD, DEFAULT_USER};
use gitstate_testkit::serve::{http, HttpResponse, Serve, ServeOpts};
use std::path::PathBuf;

const STATE: &str = "envs/safe/terraform.tfstate";

/// How a test starts a host.
type HostStart = fn() -> Host;

/// A git host under test: its repository's URL and directory on the server side.
struct Host {
    url: String,
    dir: PathBuf,
    /// The `Authorization` header the smart-HTTP host wants (passed through by serve).
    auth: Option<String>,
    _daemon: Option<GitDaemon>,
    _httpd: Option<GitHttpServer>,
}

impl Host {
    fn daemon() -> Host {
        let daemon = GitDaemon::start();
        let url = daemon.create_repo("states.git");
        let dir = daemon.repo_dir("states.git");
        Host { url, dir, auth: None, _daemon: Some(daemon), _httpd: None }
    }

    fn http() -> Host {
        Self::http_with(GitHttpServer::start())
    }

    fn http_with(httpd: GitHttpServer) -> Host {
        use base64::Engine as _;
        let url = httpd.create_repo("states.git");
        let dir = httpd.repo_dir("states.git");
        let pair = base64::engine::general_purpose::STANDARD.encode(format!("{DEFAULT_USER}:{DEFAULT_PASSWORD}"));
        Host { url, dir, auth: Some(format!("Basic {pair}")), _daemon: None, _httpd: Some(httpd) }
    }

    fn both() -> [(&'static str, HostStart); 2] {
        [("git daemon", Host::daemon), ("git http-backend", Host::http)]
    }

    fn serve(&self) -> Serve {
        Serve::start(ServeOpts::new().repository(&self.url))
    }

    fn call(&self, method: &str, url: &str, body: Option<&[u8]>) -> HttpResponse {
        let headers: Vec<(&str, &str)> = self.auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        http(method, url, &headers, body)
    }

    fn tip(&self, reference: &str) -> Option<String> {
        rev_parse(&self.dir, reference)
    }

    /// Delete `reference` on the host and prune every object only it kept.
    fn delete_and_prune(&self, reference: &str) {
        let commit = self.tip(reference).expect("the ref to prune");
        git(&self.dir, &["update-ref", "-d", reference]);
        git(&self.dir, &["reflog", "expire", "--expire=now", "--all"]);
        git(&self.dir, &["gc", "-q", "--prune=now"]);
        assert!(
            !git_try(&self.dir, &["cat-file", "-e", &commit]).status.success(),
            "{commit} is still on the host; the trap needs it pruned"
        );
    }

    /// Make `reference` hold a lock commit with `<path>.lock` = LockInfo `id`, by hand (as
    /// an older version or terraform-backend-git would have left it).
    fn plant_lock(&self, reference: &str, path: &str, id: &str) {
        let blob = git_with_input(&self.dir, &["hash-object", "-w", "--stdin"], lock_info(id).as_bytes());
        let scratch = tempfile::tempdir().unwrap();
        let index = scratch.path().join("index");
        let run = |args: &[&str]| {
            let out = gitstate_testkit::gitd::git_command(&self.dir)
                .env("GIT_INDEX_FILE", &index)
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        run(&["update-index", "--add", "--cacheinfo", &format!("100644,{blob},{path}.lock")]);
        let tree = run(&["write-tree"]);
        let commit = run(&["commit-tree", &tree, "-m", &format!("Lock {path}")]);
        git(&self.dir, &["update-ref", reference, &commit, ""]);
    }
}

fn lock_ref(path: &str) -> String {
    format!("refs/heads/locks/{path}")
}

fn tagged_lock_ref(branch: &str, path: &str) -> String {
    format!("refs/heads/locks/@/{branch}/@/{path}")
}

/// A client that took lock `id` and wrote under it: warm, it knows its lock commit and the host.
fn warm_holder(host: &Host, serve: &Serve, id: &str) {
    assert_eq!(host.call("LOCK", &serve.state_url(STATE), Some(lock_info(id).as_bytes())).status, 200);
    let wrote = host.call("POST", &format!("{}?ID={id}", serve.state_url(STATE)), Some(state(1, "first").as_bytes()));
    assert_eq!(wrote.status, 200, "{}", wrote.text());
    assert_eq!(host.call("GET", &serve.state_url(STATE), None).status, 200);
}

fn assert_refused_naming(got: &HttpResponse, holder: &str, what: &str) {
    assert!(matches!(got.status, 409 | 423), "{what}: {} {}", got.status, got.text());
    assert!(got.text().contains(holder), "{what} does not name the holder {holder}: {}", got.text());
}

/// The pruned-lock trap: A holds L1; L1 is removed on the host and pruned; B takes L2. A's
/// write under L1 and A's UNLOCK with L1 are refused naming B, and change nothing.
#[test]
fn a_pruned_lock_commit_never_lets_a_stale_holder_write_or_unlock() {
    for (name, start) in Host::both() {
        let host = start();
        let a = host.serve();
        let b = host.serve();
        warm_holder(&host, &a, "old");
        host.delete_and_prune(&lock_ref(STATE));
        assert_eq!(host.call("LOCK", &b.state_url(STATE), Some(lock_info("new").as_bytes())).status, 200, "{name}");
        let new_lock = host.tip(&lock_ref(STATE)).expect("B's lock");
        let branch = host.tip("refs/heads/main").expect("the state branch");

        let write = host.call("POST", &format!("{}?ID=old", a.state_url(STATE)), Some(state(2, "stale").as_bytes()));
        assert_refused_naming(&write, "new", &format!("{name}: the stale write"));
        assert_eq!(host.tip("refs/heads/main").as_ref(), Some(&branch), "{name}: the stale write moved the branch");

        let unlock = host.call("UNLOCK", &a.state_url(STATE), Some(lock_info("old").as_bytes()));
        assert_refused_naming(&unlock, "new", &format!("{name}: the stale UNLOCK"));
        assert_eq!(host.tip(&lock_ref(STATE)).as_ref(), Some(&new_lock), "{name}: B's lock was deleted");

        // Through the GitLab-style lock address too, and a DELETE of the state under the old ID.
        let unlock = host.call("DELETE", &a.lock_url(STATE), Some(lock_info("old").as_bytes()));
        assert_refused_naming(&unlock, "new", &format!("{name}: the stale DELETE of the lock"));
        let delete = host.call("DELETE", &format!("{}?ID=old", a.state_url(STATE)), None);
        assert_refused_naming(&delete, "new", &format!("{name}: the stale DELETE of the state"));
        assert_eq!(host.tip(&lock_ref(STATE)).as_ref(), Some(&new_lock), "{name}: B's lock was deleted");
        assert_eq!(host.tip("refs/heads/main").as_ref(), Some(&branch), "{name}: the state was deleted");

        // B, the holder, still writes and unlocks; a force-unlock by A would have worked too.
        let wrote = host.call("POST", &format!("{}?ID=new", b.state_url(STATE)), Some(state(2, "b").as_bytes()));
        assert_eq!(wrote.status, 200, "{name}: {}", wrote.text());
        assert_eq!(host.call("UNLOCK", &b.state_url(STATE), Some(lock_info("new").as_bytes())).status, 200);
        assert_eq!(host.tip(&lock_ref(STATE)), None, "{name}");
        let stored = git_out(&host.dir, &["show", &format!("main:{STATE}")]);
        assert!(stored.contains("\"b\""), "{name}: {stored}");
    }
}

/// A host that offered `atomic` and stops (configuration changed under a running instance,
/// and for a process started afresh on the same cache directory): a write under a lock that
/// moved never lands, and the holder's own writes still do.
#[test]
fn a_host_that_stops_offering_atomic_never_takes_a_write_under_another_lock() {
    for (name, start) in Host::both() {
        let host = start();
        let cache = tempfile::tempdir().unwrap();
        let opts =
            || ServeOpts::new().repository(&host.url).env("GITSTATE_CACHE_DIR", cache.path().display().to_string());
        let a = Serve::start(opts());
        warm_holder(&host, &a, "a1");
        git(&host.dir, &["config", "receive.advertiseAtomic", "false"]);
        // Earlier versions kept the capabilities in the cache directory: a file claiming
        // `atomic` must not be believed by the next process.
        for entry in std::fs::read_dir(cache.path()).unwrap() {
            let dir = entry.unwrap().path();
            if dir.is_dir() {
                std::fs::write(dir.join("gitstate-receive-caps"), "atomic side-band-64k report-status quiet").unwrap();
            }
        }
        // The lock moves: force-unlocked by someone, taken by B.
        let b = host.serve();
        assert_eq!(host.call("UNLOCK", &b.state_url(STATE), Some(b"")).status, 200, "{name}");
        assert_eq!(host.call("LOCK", &b.state_url(STATE), Some(lock_info("b1").as_bytes())).status, 200, "{name}");
        let branch = host.tip("refs/heads/main");

        let write = host.call("POST", &format!("{}?ID=a1", a.state_url(STATE)), Some(state(2, "a").as_bytes()));
        assert_refused_naming(&write, "b1", &format!("{name}: warm instance, atomic gone"));
        drop(a);
        let fresh = Serve::start(opts());
        let write = host.call("POST", &format!("{}?ID=a1", fresh.state_url(STATE)), Some(state(2, "a").as_bytes()));
        assert_refused_naming(&write, "b1", &format!("{name}: fresh process on the old cache"));
        assert_eq!(host.tip("refs/heads/main"), branch, "{name}: a write landed under another's lock");

        // The holder writes without atomic (its lock checked in the push's advertisement).
        let wrote = host.call("POST", &format!("{}?ID=b1", fresh.state_url(STATE)), Some(state(2, "b").as_bytes()));
        assert_eq!(wrote.status, 200, "{name}: {}", wrote.text());
        assert_ne!(host.tip("refs/heads/main"), branch, "{name}");
        assert_eq!(host.call("UNLOCK", &b.state_url(STATE), Some(lock_info("b1").as_bytes())).status, 200);
    }
}

/// Two servers behind one name: advertisements offer `atomic`, the server taking the push
/// does not honour it, and a hook there declines the lock's guard. The host applies the branch
/// update and refuses the guard: the write landed, so the answer is 200 (never a refusal,
/// never pushed again), an error is logged naming both refs, and blind looks stop.
#[test]
fn a_partly_applied_push_is_answered_as_landed() {
    let httpd = GitHttpServer::start_with_config(
        r#"$HTTP["url"] =~ "^/git/.*/git-receive-pack$" {
  setenv.set-environment = ( "GIT_CONFIG_PARAMETERS" => "'receive.advertiseatomic'='false'" )
}"#,
    );
    let host = Host::http_with(httpd);
    let hook = host.dir.join("hooks/update");
    std::fs::write(
        &hook,
        "#!/bin/sh\ncase \"$1\" in refs/heads/locks/*) [ \"$2\" = \"$3\" ] && { echo 'no guards here' >&2; exit 1; } ;; esac\nexit 0\n",
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let a = host.serve();
    assert_eq!(host.call("LOCK", &a.state_url(STATE), Some(lock_info("p1").as_bytes())).status, 200);
    let before = host.tip("refs/heads/main");
    let posts =
        |httpd: &GitHttpServer| httpd.access_log().iter().filter(|e| e.target.ends_with("/git-receive-pack")).count();
    let httpd = host._httpd.as_ref().unwrap();
    let pushes_before = posts(httpd);
    let wrote = host.call("POST", &format!("{}?ID=p1", a.state_url(STATE)), Some(state(1, "landed").as_bytes()));
    assert_eq!(wrote.status, 200, "a write that landed was answered {} {}", wrote.status, wrote.text());
    assert_ne!(host.tip("refs/heads/main"), before, "the branch did not move");
    let stored = git_out(&host.dir, &["show", &format!("main:{STATE}")]);
    assert!(stored.contains("\"landed\""), "{stored}");
    assert_eq!(posts(httpd) - pushes_before, 1, "the landed write was pushed again");
    let log = a.stderr_log();
    let line = log
        .lines()
        .find(|l| l.contains("ERROR") && l.contains("does not honour"))
        .unwrap_or_else(|| panic!("no error line for the partly applied push:\n{log}"));
    assert!(line.contains("refs/heads/main") && line.contains(&lock_ref(STATE)), "{line}");
    // Off the blind path: the next look is gix's fetch with its advertisement.
    let before = httpd.access_log().len();
    assert_eq!(host.call("GET", &a.state_url(STATE), None).status, 200);
    let look = &httpd.access_log()[before..];
    assert!(look.iter().any(|e| e.target.contains("info/refs")), "still blind: {look:?}");
}

/// Two deployments with different default branches take the same lock for a (branch, path):
/// 20 races for the lock of (staging, p) and of (main, p), exactly one winner each time.
#[test]
fn deployments_with_different_default_branches_share_one_lock() {
    let host = Host::daemon();
    let on_main = Serve::start(ServeOpts::new().repository(&host.url));
    let on_staging = Serve::start(ServeOpts::new().repository(&host.url).git_ref("staging"));
    for branch in ["staging", "main"] {
        let lock_url = |s: &Serve| format!("{}?ref={branch}", s.lock_url(STATE));
        for round in 0..20 {
            let (x, y) = (format!("x{round}"), format!("y{round}"));
            let (ux, uy) = (lock_url(&on_main), lock_url(&on_staging));
            let tx = std::thread::spawn(move || http("LOCK", &ux, &[], Some(lock_info(&x).as_bytes())).status);
            let ty = std::thread::spawn(move || http("LOCK", &uy, &[], Some(lock_info(&y).as_bytes())).status);
            let (sx, sy) = (tx.join().unwrap(), ty.join().unwrap());
            let winners = [sx, sy].iter().filter(|s| **s == 200).count();
            assert_eq!(winners, 1, "{branch} round {round}: main-deployment {sx}, staging-deployment {sy}");
            assert!([sx, sy].iter().all(|s| matches!(s, 200 | 423)), "{branch} round {round}: {sx} {sy}");
            let owner = if sx == 200 { &on_main } else { &on_staging };
            assert_eq!(http("UNLOCK", &lock_url(owner), &[], Some(b"")).status, 200);
        }
    }
    // Independent locks per branch: (main, p) and (staging, p) are held at once, taken in
    // either order (main's `locks/<path>` says in its commit that it locks main only).
    let main_lock = format!("{}?ref=main", on_staging.lock_url(STATE));
    let staging_lock = format!("{}?ref=staging", on_main.lock_url(STATE));
    for (serial, (first, second)) in [(&main_lock, &staging_lock), (&staging_lock, &main_lock)].into_iter().enumerate()
    {
        assert_eq!(http("LOCK", first, &[], Some(lock_info("first").as_bytes())).status, 200);
        let got = http("LOCK", second, &[], Some(lock_info("second").as_bytes()));
        assert_eq!(got.status, 200, "{second} after {first}: {}", got.text());
        assert!(host.tip(&tagged_lock_ref("staging", STATE)).is_some());
        assert!(host.tip(&lock_ref(STATE)).is_some(), "main's lock is terraform-backend-git's layout");
        // Each is written and released under its own ID.
        let write = |lock: &str, id: &str| {
            let url = lock.replace("/lock/", "/state/").replace('?', &format!("?ID={id}&"));
            http("POST", &url, &[], Some(state(serial as u64 + 1, id).as_bytes())).status
        };
        assert_eq!(write(first, "first"), 200);
        assert_eq!(write(second, "second"), 200);
        assert_eq!(http("UNLOCK", first, &[], Some(lock_info("first").as_bytes())).status, 200);
        assert_eq!(http("UNLOCK", second, &[], Some(lock_info("second").as_bytes())).status, 200);
        assert_eq!(host.tip(&lock_ref(STATE)), None);
        assert_eq!(host.tip(&tagged_lock_ref("staging", STATE)), None);
    }
}

/// Locks an older layout left (a deployment whose default branch was another, or
/// terraform-backend-git) hold until released: they block others, and their holder writes
/// and unlocks.
#[test]
fn locks_of_the_older_layouts_are_honoured_until_released() {
    let host = Host::daemon();
    let serve = host.serve();
    // `locks/<path>` blocks the state on every branch.
    host.plant_lock(&lock_ref(STATE), STATE, "legacy");
    let staging = |url: String| format!("{url}?ref=staging");
    let got = http("LOCK", &staging(serve.lock_url(STATE)), &[], Some(lock_info("mine").as_bytes()));
    assert_refused_naming(&got, "legacy", "LOCK on staging under locks/<path>");
    assert_eq!(host.tip(&tagged_lock_ref("staging", STATE)), None, "a second lock was taken");
    let got = http("GET", &staging(serve.lock_url(STATE)), &[], None);
    assert!(got.status == 200 && got.text().contains("legacy"), "{} {}", got.status, got.text());
    let got = http("POST", &staging(serve.state_url(STATE)), &[], Some(state(1, "nolock").as_bytes()));
    assert_refused_naming(&got, "legacy", "unlocked write on staging");
    // Its holder writes on staging and unlocks it.
    let wrote =
        http("POST", &format!("{}?ref=staging&ID=legacy", serve.state_url(STATE)), &[], Some(state(1, "s").as_bytes()));
    assert_eq!(wrote.status, 200, "{}", wrote.text());
    assert!(host.tip("refs/heads/staging").is_some());
    let got = http("UNLOCK", &staging(serve.lock_url(STATE)), &[], Some(lock_info("other").as_bytes()));
    assert_refused_naming(&got, "legacy", "UNLOCK by another ID");
    assert_eq!(http("UNLOCK", &staging(serve.lock_url(STATE)), &[], Some(lock_info("legacy").as_bytes())).status, 200);
    assert_eq!(host.tip(&lock_ref(STATE)), None, "the old layout's lock was not released");
    assert_eq!(http("LOCK", &staging(serve.lock_url(STATE)), &[], Some(lock_info("mine").as_bytes())).status, 200);
    assert_eq!(http("UNLOCK", &staging(serve.lock_url(STATE)), &[], Some(b"")).status, 200);

    // `locks/@/main/@/<path>` (left by a deployment whose default was not main) blocks main,
    // and a force-unlock removes it.
    host.plant_lock(&tagged_lock_ref("main", STATE), STATE, "tagged");
    let got = http("LOCK", &serve.lock_url(STATE), &[], Some(lock_info("mine").as_bytes()));
    assert_refused_naming(&got, "tagged", "LOCK on main under locks/@/main/@/<path>");
    let got = http("POST", &serve.state_url(STATE), &[], Some(state(1, "nolock").as_bytes()));
    assert_refused_naming(&got, "tagged", "unlocked write on main");
    assert_eq!(http("UNLOCK", &serve.lock_url(STATE), &[], Some(b"")).status, 200);
    assert_eq!(host.tip(&tagged_lock_ref("main", STATE)), None);
    assert_eq!(http("LOCK", &serve.lock_url(STATE), &[], Some(lock_info("mine").as_bytes())).status, 200);
}
