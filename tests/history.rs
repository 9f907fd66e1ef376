//! History, old versions, diff and restore (`/history/`, `/state/?version=`, `/diff/`,
//! `/restore/`) against a real `git daemon` repository, with a real Terraform 1.0.3 writing
//! the versions, checked through HTTP and through the git CLI on the server's repository.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use base64::Engine as _;
use gitstate_testkit::fixtures::lock_info_value;
use gitstate_testkit::gitd::{git_out, git_with_input, GitDaemon};
use gitstate_testkit::serve::{http, http_json, HttpResponse, Serve, ServeOpts};
use gitstate_testkit::terraform::{hcl_string, HttpBackend, TfWorkdir};
use md5::{Digest, Md5};
use serde_json::Value;

const REPO: &str = "states.git";

/// A git daemon with an empty repository and `gitstate serve` on it (empty cache).
fn start() -> (GitDaemon, Serve) {
    let gitd = GitDaemon::start();
    let url = gitd.create_repo(REPO);
    let serve = Serve::start(ServeOpts::new().repository(url));
    (gitd, serve)
}

/// `git -C <server repository> args`, stdout trimmed.
#[track_caller]
fn server_git(gitd: &GitDaemon, args: &[&str]) -> String {
    git_out(&gitd.repo_dir(REPO), args)
}

/// The blob `<commit>:<path>` on the server, byte for byte.
fn server_blob(gitd: &GitDaemon, commit: &str, path: &str) -> Vec<u8> {
    gitstate_testkit::gitd::git(&gitd.repo_dir(REPO), &["show", &format!("{commit}:{path}")]).stdout
}

/// The value of trailer `key` of `commit` on the server, if any.
fn server_trailer(gitd: &GitDaemon, commit: &str, key: &str) -> Option<String> {
    let v = server_git(gitd, &["log", "-1", &format!("--format=%(trailers:key={key},valueonly,unfold)"), commit]);
    let v = v.trim();
    (!v.is_empty()).then(|| v.to_string())
}

fn md5_b64(body: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Md5::digest(body))
}

#[track_caller]
fn get_ok(url: &str) -> HttpResponse {
    let got = http("GET", url, &[], None);
    assert_eq!(got.status, 200, "GET {url}: {}", got.text());
    got
}

/// One history page as JSON (status 200 asserted).
#[track_caller]
fn history(serve: &Serve, path: &str, query: &str) -> Value {
    let url = format!("{}/history/{path}{}{query}", serve.base_url(), if query.is_empty() { "" } else { "?" });
    let page = get_ok(&url).json();
    assert_eq!(page["path"], path, "GET {url}: {page}");
    assert!(page["versions"].is_array(), "GET {url}: {page}");
    page
}

fn versions(page: &Value) -> Vec<Value> {
    page["versions"].as_array().unwrap().clone()
}

fn commits_of(versions: &[Value]) -> Vec<String> {
    versions.iter().map(|v| v["commit"].as_str().unwrap().to_string()).collect()
}

/// Terraform's lock IDs are UUIDs.
fn is_uuid(s: &str) -> bool {
    s.len() == 36 && s.matches('-').count() == 4 && s.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

/// Every version `GET /state/<path>?version=` serves: exactly the blob of that commit on the
/// server, with its Content-MD5.
#[track_caller]
fn assert_version_served(serve: &Serve, gitd: &GitDaemon, path: &str, commit: &str) -> Value {
    let got = get_ok(&format!("{}?version={commit}", serve.state_url(path)));
    let stored = server_blob(gitd, commit, path);
    assert_eq!(got.body, stored, "?version={commit} is not byte-equal to `git show {commit}:{path}`");
    assert_eq!(got.header("Content-MD5"), Some(md5_b64(&stored).as_str()), "?version={commit}: Content-MD5");
    serde_json::from_slice(&stored).unwrap()
}

// ---------------------------------------------------------------------------
// 1. History and old versions after real applies and a delete
// ---------------------------------------------------------------------------

#[test]
fn history_and_versions_after_terraform_applies_and_a_delete() {
    let (gitd, mut serve) = start();
    let path = "envs/prod/terraform.tfstate";
    let mut tf = TfWorkdir::new(HttpBackend::lock_unlock(serve.state_url(path)));
    tf.init().assert_success();

    // Empty history before any write.
    let page = history(&serve, path, "");
    assert_eq!(versions(&page).len(), 0, "history before any write: {page}");
    assert_eq!(page["next"], Value::Null);

    for x in ["one", "two", "three", "four"] {
        tf.set_outputs(&[("x", x)]);
        tf.apply().assert_success();
    }
    let got = http("DELETE", &serve.state_url(path), &[], None);
    assert_eq!(got.status, 200, "DELETE /state/{path}: {}", got.text());
    assert_eq!(http("GET", &serve.state_url(path), &[], None).status, 204, "state still there after DELETE");
    tf.set_outputs(&[("x", "five")]);
    tf.apply().assert_success();

    // What git says, newest first.
    let log: Vec<String> =
        server_git(&gitd, &["log", "--format=%H", "main", "--", path]).lines().map(str::to_string).collect();
    assert_eq!(log.len(), 6, "commits touching {path}: {log:?}");

    let start = Instant::now();
    let page = history(&serve, path, "");
    eprintln!("history of 6 versions: {:?}", start.elapsed());
    let all = versions(&page);
    assert_eq!(page["next"], Value::Null, "one page holds all: {page}");
    assert_eq!(commits_of(&all), log, "history lists git's commits newest first: {page:#}");

    let deleted: Vec<bool> = all.iter().map(|v| v["deleted"].as_bool().unwrap()).collect();
    assert_eq!(deleted, [false, true, false, false, false, false], "the delete in the middle: {page:#}");
    let subjects: Vec<&str> = all.iter().map(|v| v["subject"].as_str().unwrap()).collect();
    let update = format!("Update {path}");
    let delete = format!("Delete {path}");
    assert_eq!(subjects, [&update, &delete, &update, &update, &update, &update], "{page:#}");

    let mut lock_ids = HashSet::new();
    for v in &all {
        let commit = v["commit"].as_str().unwrap();
        let time: i64 = server_git(&gitd, &["log", "-1", "--format=%ct", commit]).parse().unwrap();
        assert_eq!(v["time"].as_i64(), Some(time), "time of {commit}: {v}");
        if v["deleted"] == true {
            // An unlocked curl DELETE: no lock, no state.
            for key in ["serial", "lineage", "who", "operation", "lock_id"] {
                assert_eq!(v[key], Value::Null, "{key} of the delete: {v}");
            }
            continue;
        }
        // Serial and lineage are those of the stored state; who/operation/lock ID those of
        // Terraform's LockInfo (and the commit's trailers).
        let state: Value = serde_json::from_slice(&server_blob(&gitd, commit, path)).unwrap();
        assert_eq!(v["serial"], state["serial"], "serial of {commit}: {v}");
        assert_eq!(v["lineage"], state["lineage"], "lineage of {commit}: {v}");
        let lock_id = v["lock_id"].as_str().unwrap_or_else(|| panic!("no lock_id: {v}"));
        assert!(is_uuid(lock_id), "lock_id {lock_id:?} is not Terraform's: {v}");
        assert!(lock_ids.insert(lock_id.to_string()), "lock_id {lock_id} twice: {page:#}");
        assert_eq!(v["operation"], "OperationTypeApply", "{v}");
        let who = v["who"].as_str().unwrap_or_else(|| panic!("no who: {v}"));
        assert!(who.contains('@'), "who {who:?} is not Terraform's user@host: {v}");
        for (key, trailer) in [("lock_id", "Lock-ID"), ("who", "Who"), ("operation", "Operation")] {
            assert_eq!(v[key].as_str().map(str::to_string), server_trailer(&gitd, commit, trailer), "{key}: {v}");
        }
    }
    // The four applies before the delete: one lineage, serials growing in time (newest first
    // in the list: strictly decreasing). The apply after the delete starts a new state.
    let before_delete: Vec<u64> = all[2..].iter().map(|v| v["serial"].as_u64().unwrap()).collect();
    assert!(before_delete.windows(2).all(|w| w[0] > w[1]), "serials not in order: {before_delete:?}");
    assert!(all[2..].iter().all(|v| v["lineage"] == all[2]["lineage"]), "{page:#}");
    assert_ne!(all[0]["lineage"], all[2]["lineage"], "the apply after the delete starts a new lineage: {page:#}");
    let outputs: Vec<String> = all
        .iter()
        .filter(|v| v["deleted"] == false)
        .map(|v| {
            let s: Value = serde_json::from_slice(&server_blob(&gitd, v["commit"].as_str().unwrap(), path)).unwrap();
            s["outputs"]["x"]["value"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(outputs, ["five", "four", "three", "two", "one"]);
    let serials: Vec<String> = all.iter().map(|v| v["serial"].to_string()).collect();
    eprintln!("serials newest first: {}", serials.join(", "));

    // Pages of 2, through `next` as `before`, concatenate to the whole list.
    let mut paged = Vec::new();
    let mut pages = 0;
    let mut before: Option<String> = None;
    loop {
        let query = match &before {
            Some(b) => format!("limit=2&before={b}"),
            None => "limit=2".to_string(),
        };
        let page = history(&serve, path, &query);
        pages += 1;
        let list = versions(&page);
        assert!(list.len() <= 2, "limit=2 gave {}: {page}", list.len());
        paged.extend(list.clone());
        match page["next"].as_str() {
            Some(next) => {
                assert_eq!(Some(next), list.last().and_then(|v| v["commit"].as_str()), "next is the last: {page}");
                before = Some(next.to_string());
            }
            None => break,
        }
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(pages, 3, "6 versions in pages of 2");
    assert_eq!(paged, all, "the pages of 2 concatenated differ from the whole list");

    // Every version that holds the state is served as stored then.
    for v in all.iter().filter(|v| v["deleted"] == false) {
        let commit = v["commit"].as_str().unwrap();
        let start = Instant::now();
        let state = assert_version_served(&serve, &gitd, path, commit);
        eprintln!("?version={commit}: {:?}", start.elapsed());
        assert_eq!(state["serial"], v["serial"]);
    }
    // Upper-case hex is the same id.
    let got = get_ok(&format!("{}?version={}", serve.state_url(path), log[2].to_uppercase()));
    assert_eq!(got.body, server_blob(&gitd, &log[2], path));

    // The delete commit holds no state: 404.
    let got = http("GET", &format!("{}?version={}", serve.state_url(path), log[1]), &[], None);
    assert_eq!(got.status, 404, "?version= of the delete: {}", got.text());

    // A commit of another branch holding the state (a child of main's tip): not in main's
    // history → 404; through `ref=other` it is served.
    let tree = server_git(&gitd, &["rev-parse", "main^{tree}"]);
    let other = server_git(&gitd, &["commit-tree", &tree, "-p", "main", "-m", "elsewhere"]);
    server_git(&gitd, &["update-ref", "refs/heads/other", &other]);
    let got = http("GET", &format!("{}?version={other}", serve.state_url(path)), &[], None);
    assert_eq!(got.status, 404, "?version= of a commit on another branch: {}", got.text());
    let got = http("GET", &format!("{}?version={other}&ref=other", serve.state_url(path)), &[], None);
    assert_eq!(got.status, 200, "?version=&ref=other of a commit on that branch: {}", got.text());
    assert_eq!(got.body, server_blob(&gitd, &other, path));

    // A random id → 404; malformed ids → 400.
    let random = "0123456789abcdef0123456789abcdef01234567";
    let got = http("GET", &format!("{}?version={random}", serve.state_url(path)), &[], None);
    assert_eq!(got.status, 404, "?version= of a random id: {}", got.text());
    for bad in
        ["abc", "0123456789abcdef0123456789abcdef012345678", "g123456789abcdef0123456789abcdef01234567", &log[0][..39]]
    {
        let got = http("GET", &format!("{}?version={bad}", serve.state_url(path)), &[], None);
        assert_eq!(got.status, 400, "?version={bad}: {}", got.text());
        let got = http("GET", &format!("{}/history/{path}?before={bad}", serve.base_url()), &[], None);
        assert_eq!(got.status, 400, "history ?before={bad}: {}", got.text());
    }
    for bad in ["0", "501", "x", "-1"] {
        let got = http("GET", &format!("{}/history/{path}?limit={bad}", serve.base_url()), &[], None);
        assert_eq!(got.status, 400, "history ?limit={bad}: {}", got.text());
    }
    // Another path has no history.
    let page = history(&serve, "envs/none/terraform.tfstate", "");
    assert_eq!(versions(&page).len(), 0, "{page}");

    serve.assert_running();
}

// ---------------------------------------------------------------------------
// 2. Pagination across a shallow cache
// ---------------------------------------------------------------------------

/// `git fast-import` input: `n` commits on `main`, commit `i` (1-based) setting `path` to a
/// state of serial `i` with trailers `Serial: i` and `Lineage:`.
fn fast_import_stream(path: &str, n: u64) -> Vec<u8> {
    let mut s = Vec::new();
    for i in 1..=n {
        let message = format!("Update {path}\n\nSerial: {i}\nLineage: big-lineage\n");
        let state = gitstate_testkit::fixtures::state_with_lineage("big-lineage", i, &format!("v{i}"));
        s.extend_from_slice(format!("commit refs/heads/main\nmark :{i}\n").as_bytes());
        s.extend_from_slice(format!("committer test <test@example.com> {} +0000\n", 1_700_000_000 + i).as_bytes());
        s.extend_from_slice(format!("data {}\n{message}\n", message.len()).as_bytes());
        s.extend_from_slice(format!("M 100644 inline {path}\ndata {}\n{state}\n", state.len()).as_bytes());
    }
    s
}

/// The one cache repository `gitstate serve` made for its remote.
fn cache_repo(serve: &Serve) -> PathBuf {
    let found: Vec<PathBuf> = std::fs::read_dir(serve.cache_dir())
        .unwrap_or_else(|e| panic!("read {}: {e}", serve.cache_dir().display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "git") && p.is_dir())
        .collect();
    assert_eq!(found.len(), 1, "cache repositories under {}: {found:?}", serve.cache_dir().display());
    found[0].clone()
}

/// Commit objects in a repository (works on a shallow cache without refs).
fn commits_in(repo: &Path) -> usize {
    let out = git_out(repo, &["cat-file", "--batch-all-objects", "--batch-check"]);
    out.lines().filter(|l| l.split(' ').nth(1) == Some("commit")).count()
}

/// upload-pack requests the daemon served so far.
fn upload_packs(gitd: &GitDaemon) -> usize {
    gitd.log().lines().filter(|l| l.contains("Request upload-pack")).count()
}

#[test]
fn history_pages_deepen_a_shallow_cache_only_as_far_as_needed() {
    const N: u64 = 1_000;
    let gitd = GitDaemon::start();
    let url = gitd.create_repo(REPO);
    let path = "envs/big/terraform.tfstate";
    let start = Instant::now();
    git_with_input(&gitd.repo_dir(REPO), &["fast-import", "--quiet"], &fast_import_stream(path, N));
    eprintln!("fast-import of {N} commits: {:?}", start.elapsed());
    let rev_list: Vec<String> = server_git(&gitd, &["rev-list", "main"]).lines().map(str::to_string).collect();
    assert_eq!(rev_list.len(), N as usize);

    let serve = Serve::start(ServeOpts::new().repository(url));
    let mut before: Option<String> = None;
    let mut counts = Vec::new();
    for page_no in 0..3usize {
        let query = match &before {
            Some(b) => format!("limit=50&before={b}"),
            None => "limit=50".to_string(),
        };
        let requests = upload_packs(&gitd);
        let start = Instant::now();
        let page = history(&serve, path, &query);
        let took = start.elapsed();
        let list = versions(&page);
        let serials: Vec<u64> = list.iter().map(|v| v["serial"].as_u64().unwrap()).collect();
        let top = N - 50 * page_no as u64;
        let expected: Vec<u64> = (top - 49..=top).rev().collect();
        assert_eq!(serials, expected, "page {}: {page}", page_no + 1);
        assert_eq!(commits_of(&list), rev_list[50 * page_no..50 * page_no + 50], "page {} commits", page_no + 1);
        assert!(list.iter().all(|v| v["deleted"] == false && v["lineage"] == "big-lineage"), "{page}");
        assert!(list.iter().all(|v| v["lock_id"].is_null() && v["who"].is_null()), "{page}");
        let next = page["next"].as_str().unwrap_or_else(|| panic!("page {} has no next: {page}", page_no + 1));
        assert_eq!(next, list.last().unwrap()["commit"]);
        before = Some(next.to_string());

        let cache = cache_repo(&serve);
        let commits = commits_in(&cache);
        let requests = upload_packs(&gitd) - requests;
        eprintln!("page {}: {took:?}, {requests} upload-pack requests, {commits} commits in the cache", page_no + 1);
        counts.push(commits);
    }
    assert!(counts.windows(2).all(|w| w[0] <= w[1]), "the cache lost commits: {counts:?}");
    assert!(counts[0] >= 50, "page 1 listed 50 versions from {} commits?", counts[0]);
    assert!(counts[2] >= 150, "page 3 listed versions 851..1000 from {} commits?", counts[2]);
    assert!(counts[2] < 400, "page 3 fetched {} of {N} commits: the cache was deepened too far", counts[2]);

    // Page 3 again (warm): nothing more is fetched.
    let requests = upload_packs(&gitd);
    let start = Instant::now();
    let page = history(&serve, path, &format!("limit=50&before={}", rev_list[99]));
    let took = start.elapsed();
    assert_eq!(versions(&page)[0]["serial"], 900);
    let commits = commits_in(&cache_repo(&serve));
    eprintln!(
        "page 3 again: {took:?}, {} upload-pack requests, {commits} commits in the cache",
        upload_packs(&gitd) - requests
    );
    assert_eq!(commits, counts[2], "a warm page 3 fetched more commits");

    // An old version beyond what the cache holds is still served (deepening as needed).
    let oldest = &rev_list[N as usize - 1];
    let start = Instant::now();
    let got = get_ok(&format!("{}?version={oldest}", serve.state_url(path)));
    eprintln!("?version= of the root commit (1000 deep): {:?}", start.elapsed());
    let state: Value = got.json();
    assert_eq!(state["serial"], 1);
    assert_eq!(got.body, server_blob(&gitd, oldest, path));
}

// ---------------------------------------------------------------------------
// 3. Restore, with real Terraform afterwards
// ---------------------------------------------------------------------------

#[test]
fn restore_an_old_version_then_terraform_sees_it() {
    let (gitd, mut serve) = start();
    let path = "envs/restore/terraform.tfstate";
    let mut tf = TfWorkdir::new(HttpBackend::lock_unlock(serve.state_url(path)));
    tf.init().assert_success();
    tf.set_outputs(&[("x", "one")]);
    tf.apply().assert_success();
    let one = server_git(&gitd, &["rev-parse", "main"]);
    tf.set_outputs(&[("x", "two")]);
    tf.apply().assert_success();
    let two = server_git(&gitd, &["rev-parse", "main"]);
    assert_ne!(one, two);
    let state_two: Value = serde_json::from_slice(&server_blob(&gitd, &two, path)).unwrap();
    let serial_two = state_two["serial"].as_u64().unwrap();
    let restore_url = format!("{}/restore/{path}?version={one}", serve.base_url());

    // With x=one in the configuration, Terraform has an output change to make.
    tf.set_outputs(&[("x", "one")]);
    let out = tf.plan();
    assert_eq!(out.code(), Some(2), "plan with x=one over the stored x=two should show a change:\n{out}");

    // Someone else holds the lock: 423 with the holder, nothing written.
    let held = lock_info_value("someone-else", "other@host", "OperationTypeApply");
    let got = http_json("LOCK", &serve.state_url(path), &held);
    assert_eq!(got.status, 200, "LOCK: {}", got.text());
    for url in [restore_url.clone(), format!("{restore_url}&ID=not-the-holder")] {
        let got = http("POST", &url, &[], None);
        assert_eq!(got.status, 423, "POST {url} while someone else holds the lock: {}", got.text());
        assert_eq!(got.json()["ID"], "someone-else", "the 423 names the holder");
    }
    assert_eq!(server_git(&gitd, &["rev-parse", "main"]), two, "a refused restore wrote something");
    let got = http_json("UNLOCK", &serve.state_url(path), &held);
    assert_eq!(got.status, 200, "UNLOCK: {}", got.text());

    // Unknown versions: 404, nothing written.
    let random = "0123456789abcdef0123456789abcdef01234567";
    let got = http("POST", &format!("{}/restore/{path}?version={random}", serve.base_url()), &[], None);
    assert_eq!(got.status, 404, "restore of a random id: {}", got.text());
    let got = http("POST", &format!("{}/restore/{path}", serve.base_url()), &[], None);
    assert_eq!(got.status, 400, "restore without version: {}", got.text());
    assert_eq!(server_git(&gitd, &["rev-parse", "main"]), two);

    // The recipe of docs/history.md: LOCK, POST /restore/...&ID=, UNLOCK.
    let mine = lock_info_value("restore-1", "admin@laptop", "OperationTypeRestore");
    let got = http_json("LOCK", &serve.state_url(path), &mine);
    assert_eq!(got.status, 200, "LOCK: {}", got.text());
    let start = Instant::now();
    let got = http("POST", &format!("{restore_url}&ID=restore-1"), &[], None);
    eprintln!("restore: {:?}", start.elapsed());
    assert_eq!(got.status, 200, "POST {restore_url}&ID=restore-1: {}", got.text());
    let got = http_json("UNLOCK", &serve.state_url(path), &mine);
    assert_eq!(got.status, 200, "UNLOCK: {}", got.text());

    let restored = server_git(&gitd, &["rev-parse", "main"]);
    assert_eq!(server_git(&gitd, &["rev-parse", "main^"]), two, "the restore is one commit on the tip");
    assert_eq!(server_git(&gitd, &["log", "-1", "--format=%s", "main"]), format!("Restore {path} to {one}"));
    let state: Value = serde_json::from_slice(&server_blob(&gitd, &restored, path)).unwrap();
    let state_one: Value = serde_json::from_slice(&server_blob(&gitd, &one, path)).unwrap();
    let serial = state["serial"].as_u64().unwrap();
    assert!(serial > serial_two, "restored serial {serial} is not above the previous {serial_two}");
    assert_eq!(state["lineage"], state_two["lineage"]);
    assert_eq!(state["outputs"], state_one["outputs"], "the restored outputs are not those of {one}");
    assert_eq!(server_trailer(&gitd, &restored, "Serial"), Some(serial.to_string()));
    assert_eq!(server_trailer(&gitd, &restored, "Lock-ID").as_deref(), Some("restore-1"));
    let page = history(&serve, path, "limit=1");
    let v = &versions(&page)[0];
    assert_eq!(v["commit"], restored.as_str());
    assert_eq!(v["subject"], format!("Restore {path} to {one}"));
    assert_eq!(v["serial"], serial);
    assert_eq!(v["who"], "admin@laptop");

    // Terraform sees the restored version: `output`, and a plan of x=one has nothing to do.
    let out = tf.run(&["output", "-raw", "x"]);
    out.assert_success();
    assert_eq!(out.stdout.trim(), "one", "terraform output after the restore:\n{out}");
    let out = tf.plan();
    assert_eq!(out.code(), Some(0), "plan with x=one after the restore should have no changes:\n{out}");
    assert!(out.stdout.contains("No changes"), "{out}");
    // ... and accepts it as the base of its next write.
    tf.set_outputs(&[("x", "three")]);
    tf.apply().assert_success();
    let after: Value = serde_json::from_str(&server_git(&gitd, &["show", &format!("main:{path}")])).unwrap();
    assert_eq!(after["outputs"]["x"]["value"], "three");
    assert!(after["serial"].as_u64().unwrap() > serial, "{after}");
    assert_eq!(after["lineage"], state["lineage"]);

    // No lock left.
    assert_eq!(http("GET", &serve.lock_url(path), &[], None).status, 404);
    serve.assert_running();
}

// ---------------------------------------------------------------------------
// 4. Diff between two applies, sensitive values kept out
// ---------------------------------------------------------------------------

/// Outputs `(name, value, sensitive)` as HCL.
fn outputs_hcl(outputs: &[(&str, &str, bool)]) -> String {
    let mut s = String::new();
    for (name, value, sensitive) in outputs {
        s.push_str(&format!("output \"{name}\" {{\n  value = {}\n", hcl_string(value)));
        if *sensitive {
            s.push_str("  sensitive = true\n");
        }
        s.push_str("}\n");
    }
    s
}

fn find<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array().unwrap().iter().find(|o| o["name"] == name).unwrap_or_else(|| panic!("no {name} in {list}"))
}

#[test]
fn diff_between_applies_keeps_sensitive_values_out() {
    let (gitd, mut serve) = start();
    let path = "envs/diff/terraform.tfstate";
    let secrets = ["s3cr3t-alpha-value", "s3cr3t-beta-value", "t0ken-gamma-value"];
    let mut tf = TfWorkdir::new(HttpBackend::lock_unlock(serve.state_url(path)));
    tf.init().assert_success();
    tf.set_body(&outputs_hcl(&[
        ("x", "one", false),
        ("kept", "same", false),
        ("gone", "bye", false),
        ("password", secrets[0], true),
    ]));
    tf.apply().assert_success();
    let from = server_git(&gitd, &["rev-parse", "main"]);

    // A data source of Terraform's built-in provider gives the state a resource.
    let other_state = tf.path().join("other.tfstate");
    std::fs::write(&other_state, gitstate_testkit::fixtures::state_with_lineage("other", 1, "net-1")).unwrap();
    let data = "data \"terraform_remote_state\" \"net\" {\n  backend = \"local\"\n  config = {\n    path = \"${path.module}/other.tfstate\"\n  }\n}\n";
    tf.set_body(&format!(
        "{data}{}",
        outputs_hcl(&[
            ("x", "two", false),
            ("kept", "same", false),
            ("y", "new", false),
            ("password", secrets[1], true),
            ("token", secrets[2], true),
        ])
    ));
    tf.apply().assert_success();
    let to = server_git(&gitd, &["rev-parse", "main"]);

    let url = format!("{}/diff/{path}?from={from}&to={to}", serve.base_url());
    let start = Instant::now();
    let got = get_ok(&url);
    eprintln!("diff: {:?}", start.elapsed());
    let body = got.text();
    for secret in secrets {
        assert!(!body.contains(secret), "the diff shows the sensitive value {secret}:\n{body}");
    }
    let d = got.json();
    let state_from: Value = serde_json::from_slice(&server_blob(&gitd, &from, path)).unwrap();
    let state_to: Value = serde_json::from_slice(&server_blob(&gitd, &to, path)).unwrap();
    assert_eq!(d["from"]["serial"], state_from["serial"], "{d:#}");
    assert_eq!(d["to"]["serial"], state_to["serial"], "{d:#}");
    assert_eq!(d["to"]["lineage"], state_to["lineage"], "{d:#}");

    let outputs = &d["outputs"];
    let x = find(&outputs["changed"], "x");
    assert_eq!(
        (x["from"].as_str(), x["to"].as_str(), x["sensitive"].as_bool()),
        (Some("one"), Some("two"), Some(false)),
        "{d:#}"
    );
    let password = find(&outputs["changed"], "password");
    assert_eq!(password["sensitive"], true, "{d:#}");
    for key in ["from", "to", "value"] {
        assert!(password.get(key).is_none(), "the sensitive output has a {key}: {d:#}");
    }
    assert_eq!(outputs["changed"].as_array().unwrap().len(), 2, "only x and password changed: {d:#}");
    let y = find(&outputs["added"], "y");
    assert_eq!(y["value"], "new", "{d:#}");
    let token = find(&outputs["added"], "token");
    assert_eq!(token["sensitive"], true, "{d:#}");
    assert!(token.get("value").is_none(), "the sensitive output has a value: {d:#}");
    assert_eq!(outputs["added"].as_array().unwrap().len(), 2, "{d:#}");
    let gone = find(&outputs["removed"], "gone");
    assert!(gone.get("value").is_none(), "{d:#}");
    assert_eq!(outputs["removed"].as_array().unwrap().len(), 1, "{d:#}");
    assert_eq!(d["resources"]["added"], serde_json::json!(["data.terraform_remote_state.net"]), "{d:#}");
    assert_eq!(d["resources"]["removed"], serde_json::json!([]), "{d:#}");
    assert_eq!(d["resources"]["changed"], serde_json::json!([]), "{d:#}");

    // The other way round: the same facts reversed, still no secret.
    let got = get_ok(&format!("{}/diff/{path}?from={to}&to={from}", serve.base_url()));
    let body = got.text();
    for secret in secrets {
        assert!(!body.contains(secret), "the reverse diff shows {secret}:\n{body}");
    }
    let d = got.json();
    assert_eq!(find(&d["outputs"]["removed"], "token")["sensitive"], true, "{d:#}");
    assert_eq!(d["resources"]["removed"], serde_json::json!(["data.terraform_remote_state.net"]), "{d:#}");

    // A changed data source is a changed resource.
    std::fs::write(&other_state, gitstate_testkit::fixtures::state_with_lineage("other", 2, "net-2")).unwrap();
    tf.apply().assert_success();
    let third = server_git(&gitd, &["rev-parse", "main"]);
    assert_ne!(third, to, "the apply after the data source changed wrote nothing");
    let d = get_ok(&format!("{}/diff/{path}?from={to}&to={third}", serve.base_url())).json();
    assert_eq!(d["resources"]["changed"], serde_json::json!(["data.terraform_remote_state.net"]), "{d:#}");
    assert_eq!(d["outputs"]["changed"], serde_json::json!([]), "{d:#}");

    // Missing or malformed ids → 400; a random id → 404.
    let random = "0123456789abcdef0123456789abcdef01234567";
    for (query, status) in
        [(format!("from={from}"), 400), (format!("from={from}&to=abc"), 400), (format!("from={random}&to={to}"), 404)]
    {
        let got = http("GET", &format!("{}/diff/{path}?{query}", serve.base_url()), &[], None);
        assert_eq!(got.status, status, "GET /diff/{path}?{query}: {}", got.text());
    }
    serve.assert_running();
}
