//! Encryption at rest (issue 11): a real Terraform v1.0.3 applies a configuration with a
//! sensitive output through `gitstate serve`, and the tests look at what reached git with
//! the git CLI and open it with standard tools only:
//!
//! - age: the stored file is an ASCII-armored age file that the Debian `age` CLI opens
//!   (`age -d -i key.txt`) into exactly what `terraform state pull` shows; rotation (old +
//!   new identities, new recipient); a clear-text state stored before encryption was turned
//!   on is served and the next write encrypts it; a state no configured identity opens is
//!   a 500 naming what it needs, never the ciphertext served as state.
//! - AWS KMS against moto: the stored file is the JSON envelope, opened here with KMS
//!   `Decrypt` + AES-256-GCM; a write after a restart; another key → 500 naming the key it
//!   needs; KMS unreachable → 503 with `Retry-After` and the repository unchanged.
//! - leaks: the server's whole directory (data, cache, logs at trace level), every object
//!   and every commit message of the repositories hold no secret value (nor, with KMS, a
//!   plaintext data key).
//! - settings that cannot work are refused at start; an identical write over a stale stored
//!   form stores it again encrypted; `gitstate decrypt` opens both forms.
//!
//! The repository is on a `git daemon` so that a server can be stopped and another started
//! over the same states with other keys. Keys are made with `age-keygen` (Debian `age`,
//! installed by `bash scripts/test.sh`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use gitstate_testkit::fixtures::{fsck_clean, lock_info_value};
use gitstate_testkit::gitd::{git, git_out, git_try, rev_parse, GitDaemon};
use gitstate_testkit::moto::Moto;
use gitstate_testkit::serve::{http, http_json, HttpResponse, Serve, ServeOpts};
use gitstate_testkit::terraform::{hcl_string, HttpBackend, TfWorkdir};
use md5::{Digest, Md5};
use serde_json::Value;
use tempfile::TempDir;

const PATH: &str = "envs/secret/terraform.tfstate";
const REPO: &str = "states.git";
const AGE_ARMOR_BEGIN: &str = "-----BEGIN AGE ENCRYPTED FILE-----";
const AGE_ARMOR_END: &str = "-----END AGE ENCRYPTED FILE-----";
const NO_AGE: &str = "the age CLI (`age` and `age-keygen`, Debian package `age`) is missing: the encryption tests \
                      make keys with it and decrypt what gitstate stored with it; install the test tools with \
                      `bash scripts/test.sh`";

// ---------------------------------------------------------------------------
// age keys and the age CLI
// ---------------------------------------------------------------------------

/// Panics (no silent skip) unless the `age` and `age-keygen` programs run.
fn require_age() {
    for prog in ["age", "age-keygen"] {
        let ok = Command::new(prog)
            .arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "`{prog} --version` does not run. {NO_AGE}");
    }
}

/// An age X25519 key pair made by `age-keygen -o <dir>/key.txt`.
struct AgeKey {
    _dir: TempDir,
    /// The identity file as `age-keygen` wrote it (comments, then `AGE-SECRET-KEY-1...`).
    file: PathBuf,
    /// `age1...`
    public: String,
    /// `AGE-SECRET-KEY-1...`
    secret: String,
}

impl AgeKey {
    fn generate() -> AgeKey {
        require_age();
        let dir = tempfile::Builder::new().prefix("gitstate-age-").tempdir().unwrap();
        let file = dir.path().join("key.txt");
        let out = Command::new("age-keygen")
            .arg("-o")
            .arg(&file)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run age-keygen: {e}. {NO_AGE}"));
        assert!(out.status.success(), "age-keygen failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
        let text = std::fs::read_to_string(&file).unwrap();
        let public = text
            .lines()
            .find_map(|l| l.strip_prefix("# public key: "))
            .unwrap_or_else(|| panic!("no `# public key:` line in what age-keygen wrote:\n{text}"))
            .trim()
            .to_string();
        let secret = text
            .lines()
            .find(|l| l.starts_with("AGE-SECRET-KEY-1"))
            .unwrap_or_else(|| panic!("no AGE-SECRET-KEY-1 line in what age-keygen wrote"))
            .trim()
            .to_string();
        assert!(public.starts_with("age1"), "public key {public:?}");
        AgeKey { _dir: dir, file, public, secret }
    }
}

/// `age -d -i <key file>` of `blob`: the plaintext, or age's complaint.
fn age_decrypt(blob: &[u8], key: &AgeKey) -> Result<Vec<u8>, String> {
    let mut child = Command::new("age")
        .arg("-d")
        .arg("-i")
        .arg(&key.file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run age: {e}. {NO_AGE}"));
    let mut stdin = child.stdin.take().unwrap();
    let input = blob.to_vec();
    let writer = std::thread::spawn(move || {
        use std::io::Write as _;
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(format!(
            "age -d -i {} failed ({}): {}",
            key.file.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Serve settings: encrypt to `recipients`, open with identities given as text.
fn age_env(recipients: &[&AgeKey], identities_text: &str) -> Vec<(String, String)> {
    vec![
        ("GITSTATE_AGE_RECIPIENTS".into(), recipients.iter().map(|k| k.public.as_str()).collect::<Vec<_>>().join(",")),
        ("GITSTATE_AGE_IDENTITIES".into(), identities_text.to_string()),
    ]
}

/// `blob` is one standard ASCII-armored age file.
#[track_caller]
fn assert_armored_age(blob: &[u8], what: &str) {
    let text = String::from_utf8(blob.to_vec()).unwrap_or_else(|_| panic!("{what}: an armored age file is ASCII"));
    assert!(
        text.starts_with(AGE_ARMOR_BEGIN),
        "{what} does not start with `{AGE_ARMOR_BEGIN}`:\n{}",
        text.chars().take(400).collect::<String>()
    );
    assert!(text.trim_end().ends_with(AGE_ARMOR_END), "{what} does not end with `{AGE_ARMOR_END}`:\n{text}");
    assert!(text.is_ascii(), "{what} is not ASCII");
}

// ---------------------------------------------------------------------------
// The state, the repository, the server
// ---------------------------------------------------------------------------

/// A value nobody else has, to look for: `hunter2-<random hex>`.
fn random_secret() -> String {
    use std::hash::BuildHasher as _;
    let h = std::collections::hash_map::RandomState::new().hash_one((std::process::id(), std::time::SystemTime::now()));
    format!("hunter2-{h:016x}")
}

/// The configuration: a sensitive `db_password` and a plain `x`.
fn set_config(tf: &mut TfWorkdir, password: &str, x: &str) {
    tf.set_body(&format!(
        "output \"db_password\" {{\n  value     = {}\n  sensitive = true\n}}\n\noutput \"x\" {{\n  value = {}\n}}\n",
        hcl_string(password),
        hcl_string(x)
    ));
}

/// Strings that, found in a stored file, show the state in clear.
fn clear_markers(password: &str) -> Vec<String> {
    vec![password.to_string(), "\"lineage\"".into(), "lineage".into(), "db_password".into(), "terraform_version".into()]
}

#[track_caller]
fn assert_nothing_in_clear(blob: &[u8], password: &str, what: &str) {
    let text = String::from_utf8_lossy(blob);
    for m in clear_markers(password) {
        assert!(!text.contains(&m), "{what} holds {m:?} in clear:\n{text}");
    }
}

/// A bare repository on a git daemon: servers come and go over it.
struct Remote {
    daemon: GitDaemon,
    url: String,
}

impl Remote {
    fn new() -> Remote {
        let daemon = GitDaemon::start();
        let url = daemon.create_repo(REPO);
        Remote { daemon, url }
    }

    fn dir(&self) -> PathBuf {
        self.daemon.repo_dir(REPO)
    }

    /// `git show main:<path>`, byte for byte.
    fn stored(&self, path: &str) -> Vec<u8> {
        git(&self.dir(), &["show", &format!("main:{path}")]).stdout
    }

    fn stored_at(&self, rev: &str, path: &str) -> Vec<u8> {
        git(&self.dir(), &["show", &format!("{rev}:{path}")]).stdout
    }

    fn tip(&self) -> Option<String> {
        rev_parse(&self.dir(), "refs/heads/main")
    }

    /// Every ref and what it points at: equal before and after means nothing was stored.
    fn refs(&self) -> String {
        git_out(&self.dir(), &["for-each-ref", "--format=%(refname) %(objectname)"])
    }

    /// Commits on main touching `path`, newest first.
    fn commits(&self, path: &str) -> Vec<String> {
        git_out(&self.dir(), &["log", "--format=%H", "main", "--", path]).lines().map(str::to_string).collect()
    }

    /// The trailers of `commit` as (key, value) pairs.
    fn trailers(&self, commit: &str) -> Vec<(String, String)> {
        git_out(&self.dir(), &["log", "-1", "--format=%(trailers:only,unfold)", commit])
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect()
    }
}

/// `gitstate serve` on `remote` with `env` (and nothing else of encryption).
fn serve_on(remote: &Remote, env: &[(String, String)]) -> Serve {
    let mut opts = ServeOpts::new().repository(&remote.url);
    for (k, v) in env {
        opts = opts.env(k, v);
    }
    Serve::start(opts)
}

/// Point `tf` at `serve` (a new server has a new port) and `init -reconfigure`.
fn point_at(tf: &mut TfWorkdir, serve: &Serve) {
    tf.set_backend(HttpBackend::lock_unlock(serve.state_url(PATH)));
    tf.run(&["init", "-reconfigure", "-input=false", "-no-color"]).assert_success();
}

fn parse_json(bytes: &[u8], what: &str) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("{what} is not JSON ({e}):\n{}", String::from_utf8_lossy(bytes)))
}

/// `terraform state pull`, parsed.
#[track_caller]
fn pulled(tf: &TfWorkdir) -> Value {
    let out = tf.state_pull();
    out.assert_success();
    parse_json(out.stdout.as_bytes(), "terraform state pull")
}

/// GET the state: 200, JSON, with the Content-MD5 of the body served.
#[track_caller]
fn get_state(serve: &Serve) -> HttpResponse {
    let got = http("GET", &serve.state_url(PATH), &[], None);
    assert_eq!(got.status, 200, "GET /state/{PATH}: {}", got.text());
    let md5 = base64::engine::general_purpose::STANDARD.encode(Md5::digest(&got.body));
    assert_eq!(got.header("Content-MD5"), Some(md5.as_str()), "GET /state/{PATH}: Content-MD5 of the body served");
    got
}

/// The state's output values as Terraform stores them.
#[track_caller]
fn assert_outputs(state: &Value, password: &str, x: &str, what: &str) {
    assert_eq!(state["outputs"]["db_password"]["value"], password, "{what}: db_password:\n{state:#}");
    assert_eq!(state["outputs"]["db_password"]["sensitive"], true, "{what}: db_password is sensitive:\n{state:#}");
    assert_eq!(state["outputs"]["x"]["value"], x, "{what}: x:\n{state:#}");
}

/// The newest commit on the state is `Update <path>` of a Terraform apply with its trailers,
/// and its message holds no state content.
#[track_caller]
fn assert_apply_commit(remote: &Remote, state: &Value, password: &str) {
    let commit = remote.commits(PATH).into_iter().next().expect("a commit touching the state");
    let msg = git_out(&remote.dir(), &["log", "-1", "--format=%B", &commit]);
    assert!(msg.starts_with(&format!("Update {PATH}")), "commit message:\n{msg}");
    let t = remote.trailers(&commit);
    let get = |k: &str| t.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    let lock_id = get("Lock-ID").unwrap_or_else(|| panic!("no Lock-ID trailer in:\n{msg}"));
    assert!(lock_id.len() == 36 && lock_id.matches('-').count() == 4, "Lock-ID {lock_id:?} is not a UUID:\n{msg}");
    assert!(get("Who").is_some_and(|w| w.contains('@')), "Who trailer in:\n{msg}");
    assert_eq!(get("Operation").as_deref(), Some("OperationTypeApply"), "Operation trailer in:\n{msg}");
    assert_eq!(get("Serial"), Some(state["serial"].to_string()), "Serial trailer in:\n{msg}");
    assert_eq!(get("Lineage").as_deref(), state["lineage"].as_str(), "Lineage trailer in:\n{msg}");
    assert!(!msg.contains(password), "the commit message holds the password:\n{msg}");
}

/// `state` with serial + 1 and output `x` = `x` (what a next apply would send).
fn next_state(state: &Value, x: &str) -> Vec<u8> {
    let mut s = state.clone();
    s["serial"] = Value::from(state["serial"].as_u64().unwrap() + 1);
    s["outputs"]["x"]["value"] = Value::from(x);
    serde_json::to_vec_pretty(&s).unwrap()
}

/// An error body answered instead of a state: not the stored file, no key material.
#[track_caller]
fn assert_error_body(got: &HttpResponse, stored: &[u8], secrets: &[&str], what: &str) {
    let body = got.text();
    assert!(!body.contains(AGE_ARMOR_BEGIN), "{what}: the body is (or holds) the armored file:\n{body}");
    assert!(
        !body.contains("gitstate_envelope") && !body.contains("wrapped_key"),
        "{what}: the body holds the envelope:\n{body}"
    );
    assert_ne!(got.body.as_slice(), stored, "{what}: the stored file was served");
    assert!(
        serde_json::from_slice::<Value>(&got.body).map(|v| v.get("lineage").is_none()).unwrap_or(true),
        "{what}: a state was served:\n{body}"
    );
    assert!(!body.contains("AGE-SECRET-KEY"), "{what}: the body names an identity:\n{body}");
    for s in secrets {
        assert!(!body.contains(s), "{what}: the body holds a secret value:\n{body}");
    }
}

// ---------------------------------------------------------------------------
// Looking for a secret everywhere
// ---------------------------------------------------------------------------

/// Every regular file under `root`.
fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                todo.push(e.path());
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// Git directories under `root` (a directory with `HEAD` and `objects/`).
fn git_dirs_under(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        if d.join("HEAD").is_file() && d.join("objects").is_dir() {
            out.push(d.clone());
        }
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(e.path());
            }
        }
    }
    out.sort();
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Where `needle` is found: files under `root` (raw bytes), and, for every git directory
/// under it, its objects (inflated: `cat-file --batch-all-objects`) and its commit messages.
/// Objects are zlib-compressed on disk, so a raw grep alone would miss a blob in clear.
fn find_everywhere(root: &Path, needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for f in files_under(root) {
        if std::fs::read(&f).is_ok_and(|b| contains(&b, needle.as_bytes())) {
            found.push(format!("file {}", f.display()));
        }
    }
    for g in git_dirs_under(root) {
        let out = git_try(&g, &["cat-file", "--batch-all-objects", "--batch", "--unordered"]);
        if contains(&out.stdout, needle.as_bytes()) {
            found.push(format!("an object of {}", g.display()));
        }
        let log = git_try(&g, &["log", "--all", "--format=%B"]);
        if contains(&log.stdout, needle.as_bytes()) {
            found.push(format!("a commit message of {}", g.display()));
        }
    }
    found
}

// ---------------------------------------------------------------------------
// age
// ---------------------------------------------------------------------------

/// Apply with age on: the stored file is armored age with nothing in clear, the `age` CLI
/// opens it into exactly what Terraform pulls, GET serves that with its Content-MD5, a
/// second apply goes through the guard, identical writes and stale writes are told apart on
/// the decrypted state, the commit trailers are as before and the lock file stays clear.
#[test]
fn age_apply_stores_an_armored_age_file_the_age_cli_opens() {
    require_age();
    let key = AgeKey::generate();
    let password = random_secret();
    let remote = Remote::new();
    let env = vec![
        ("GITSTATE_AGE_RECIPIENTS".to_string(), key.public.clone()),
        ("GITSTATE_AGE_IDENTITY_FILE".to_string(), key.file.display().to_string()),
    ];
    let mut serve = serve_on(&remote, &env);

    let mut tf = TfWorkdir::new(HttpBackend::lock_unlock(serve.state_url(PATH)));
    set_config(&mut tf, &password, "one");
    tf.init().assert_success();
    let out = tf.apply();
    out.assert_success();
    assert!(!out.stdout.contains(&password), "Terraform printed the sensitive value:\n{out}");

    // What reached git.
    let blob = remote.stored(PATH);
    assert_armored_age(&blob, &format!("main:{PATH}"));
    assert_nothing_in_clear(&blob, &password, &format!("main:{PATH}"));
    let plain = age_decrypt(&blob, &key).unwrap_or_else(|e| panic!("{e}"));
    let first = parse_json(&plain, "the age-decrypted state");
    assert_outputs(&first, &password, "one", "the age-decrypted state");
    assert_eq!(first, pulled(&tf), "`age -d` of main:{PATH} and `terraform state pull` differ");

    // What GET serves: the decrypted bytes.
    let got = get_state(&serve);
    assert_eq!(got.body, plain, "GET does not serve the decrypted stored state byte for byte");
    assert_apply_commit(&remote, &first, &password);

    // A second apply: the guard reads the decrypted state.
    set_config(&mut tf, &password, "two");
    let out = tf.apply();
    out.assert_success();
    assert!(!tf.has_errored_state(), "Terraform wrote errored.tfstate:\n{out}");
    let blob2 = remote.stored(PATH);
    assert_armored_age(&blob2, "the second write");
    assert_nothing_in_clear(&blob2, &password, "the second write");
    let second = parse_json(&age_decrypt(&blob2, &key).unwrap_or_else(|e| panic!("{e}")), "the second write");
    assert_outputs(&second, &password, "two", "the second write");
    assert_eq!(second, pulled(&tf), "`age -d` of the second write and `terraform state pull` differ");
    assert_eq!(second["lineage"], first["lineage"], "lineage changed");
    assert!(second["serial"].as_u64() > first["serial"].as_u64(), "serial did not grow");
    assert_eq!(remote.commits(PATH).len(), 2, "commits touching {PATH}");
    assert_apply_commit(&remote, &second, &password);
    // The first version is still in history, still encrypted, still readable.
    let old = remote.stored_at("main~1", PATH);
    assert_armored_age(&old, "main~1");
    assert_eq!(parse_json(&age_decrypt(&old, &key).unwrap(), "main~1"), first);

    // plan reads the decrypted state: no changes, nothing written.
    let tip = remote.tip();
    let out = tf.plan();
    assert_eq!(out.code(), Some(0), "plan should report no changes:\n{out}");
    assert_eq!(remote.tip(), tip, "plan moved main");

    // The identical write again (a retry): 200 and no commit, though age output is never
    // the same twice: the comparison is on the decrypted state.
    let got = get_state(&serve);
    let again = http("POST", &serve.state_url(PATH), &[("Content-Type", "application/json")], Some(&got.body));
    assert_eq!(again.status, 200, "re-POST of the stored state: {}", again.text());
    assert_eq!(remote.tip(), tip, "an identical write made a commit");
    // A write of another lineage is refused by the guard; so is an older serial.
    let current = got.json();
    let mut foreign = current.clone();
    foreign["lineage"] = Value::from("another-lineage");
    foreign["serial"] = Value::from(current["serial"].as_u64().unwrap() + 1);
    let r = http_json("POST", &serve.state_url(PATH), &foreign);
    assert_eq!(r.status, 409, "a write of another lineage: {}", r.text());
    let mut older = current.clone();
    older["serial"] = Value::from(current["serial"].as_u64().unwrap() - 1);
    older["outputs"]["x"]["value"] = Value::from("older");
    let r = http_json("POST", &serve.state_url(PATH), &older);
    assert_eq!(r.status, 409, "a write of an older serial: {}", r.text());
    assert_eq!(remote.tip(), tip, "a refused write made a commit");

    // The lock file stays clear: who and when, no state.
    let info = lock_info_value("eeeeeeee-0000-0000-0000-000000000011", "enc@test", "OperationTypeApply");
    let r = http_json("LOCK", &serve.state_url(PATH), &info);
    assert_eq!(r.status, 200, "LOCK: {}", r.text());
    let lock = git_out(&remote.dir(), &["show", &format!("refs/heads/locks/{PATH}:{PATH}.lock")]);
    let lock = parse_json(lock.as_bytes(), "the lock file");
    assert_eq!(lock["ID"], info["ID"], "the lock file: {lock}");
    assert_eq!(lock["Who"], "enc@test", "the lock file: {lock}");
    assert!(!lock.to_string().contains(&password), "the lock file holds the password");
    let r = http_json("UNLOCK", &serve.state_url(PATH), &info);
    assert_eq!(r.status, 200, "UNLOCK: {}", r.text());

    serve.assert_running();
    fsck_clean(&remote.dir());
}

/// Rotation: identities old + new, recipient new only. The old file is still served; the
/// next write is one only the new identity opens.
#[test]
fn age_rotation_reads_with_the_old_identity_and_writes_to_the_new_recipient() {
    require_age();
    let old = AgeKey::generate();
    let new = AgeKey::generate();
    let password = random_secret();
    let remote = Remote::new();

    let serve = serve_on(&remote, &age_env(&[&old], &old.secret));
    let mut tf = TfWorkdir::new(HttpBackend::lock_unlock(serve.state_url(PATH)));
    set_config(&mut tf, &password, "one");
    tf.init().assert_success();
    tf.apply().assert_success();
    let blob1 = remote.stored(PATH);
    assert_armored_age(&blob1, "the write under the old key");
    let plain1 = age_decrypt(&blob1, &old).unwrap_or_else(|e| panic!("{e}"));
    assert!(age_decrypt(&blob1, &new).is_err(), "the new identity opens a file written to the old recipient only");
    drop(serve);

    // Identities comma-separated: old first, then new.
    let serve = serve_on(&remote, &age_env(&[&new], &format!("{},{}", old.secret, new.secret)));
    let got = get_state(&serve);
    assert_eq!(got.body, plain1, "after rotation GET does not serve the old file's state");
    point_at(&mut tf, &serve);
    let out = tf.plan();
    assert_eq!(out.code(), Some(0), "plan after rotation should report no changes:\n{out}");

    set_config(&mut tf, &password, "two");
    tf.apply().assert_success();
    let blob2 = remote.stored(PATH);
    assert_armored_age(&blob2, "the write after rotation");
    assert_nothing_in_clear(&blob2, &password, "the write after rotation");
    let err = age_decrypt(&blob2, &old).expect_err("the old identity opens the write after rotation");
    assert!(!err.is_empty());
    let state2 = parse_json(&age_decrypt(&blob2, &new).unwrap_or_else(|e| panic!("{e}")), "the write after rotation");
    assert_outputs(&state2, &password, "two", "the write after rotation");
    assert_eq!(state2, pulled(&tf), "`age -d -i new` and `terraform state pull` differ");
    assert_eq!(state2["lineage"], parse_json(&plain1, "the first state")["lineage"]);
    assert_eq!(get_state(&serve).json(), state2);
    assert_apply_commit(&remote, &state2, &password);
}

/// A clear-text state stored before encryption was turned on is served as it is; the next
/// write stores it encrypted.
#[test]
fn clear_state_is_served_after_age_is_turned_on_and_the_next_write_encrypts_it() {
    require_age();
    let key = AgeKey::generate();
    let password = random_secret();
    let remote = Remote::new();

    let serve = serve_on(&remote, &[]);
    let mut tf = TfWorkdir::new(HttpBackend::lock_unlock(serve.state_url(PATH)));
    set_config(&mut tf, &password, "one");
    tf.init().assert_success();
    tf.apply().assert_success();
    let clear = remote.stored(PATH);
    let clear_state = parse_json(&clear, "the clear-text state");
    assert_outputs(&clear_state, &password, "one", "the clear-text state");
    // The scanner of the leak test finds a secret stored in clear (objects are compressed).
    let found = find_everywhere(&remote.dir(), &password);
    assert!(found.iter().any(|f| f.starts_with("an object")), "the scan misses a clear-text blob: {found:?}");
    drop(serve);

    let serve = serve_on(&remote, &age_env(&[&key], &key.secret));
    let got = get_state(&serve);
    assert_eq!(got.body, clear, "the clear-text state is not served as it is stored");
    point_at(&mut tf, &serve);
    let out = tf.plan();
    assert_eq!(out.code(), Some(0), "plan over the clear-text state should report no changes:\n{out}");
    // Still clear: reading does not rewrite.
    assert_eq!(remote.stored(PATH), clear, "a read rewrote the state");

    set_config(&mut tf, &password, "two");
    tf.apply().assert_success();
    let blob = remote.stored(PATH);
    assert_armored_age(&blob, "the first write with age on");
    assert_nothing_in_clear(&blob, &password, "the first write with age on");
    let state = parse_json(&age_decrypt(&blob, &key).unwrap_or_else(|e| panic!("{e}")), "the first write with age on");
    assert_outputs(&state, &password, "two", "the first write with age on");
    assert_eq!(state["lineage"], clear_state["lineage"], "lineage changed across the migration");
    assert!(state["serial"].as_u64() > clear_state["serial"].as_u64(), "serial did not grow");
    assert_eq!(state, pulled(&tf));
    assert_eq!(get_state(&serve).json(), state);
    assert_apply_commit(&remote, &state, &password);
}

/// A state no configured identity opens: 500 naming what it needs, never the file served as
/// state; the same without any encryption configured; a write is refused too.
#[test]
fn age_state_the_configured_identities_cannot_open_is_a_500_naming_what_it_needs() {
    require_age();
    let key = AgeKey::generate();
    let other = AgeKey::generate();
    let password = random_secret();
    let remote = Remote::new();

    let serve = serve_on(&remote, &age_env(&[&key], &key.secret));
    let mut tf = TfWorkdir::new(HttpBackend::lock_unlock(serve.state_url(PATH)));
    set_config(&mut tf, &password, "one");
    tf.init().assert_success();
    tf.apply().assert_success();
    let blob = remote.stored(PATH);
    assert_armored_age(&blob, "the stored state");
    let state = parse_json(&age_decrypt(&blob, &key).unwrap(), "the stored state");
    drop(serve);
    let refs = remote.refs();

    let secrets = [password.as_str(), key.secret.as_str(), other.secret.as_str()];
    let serve = serve_on(&remote, &age_env(&[&other], &other.secret));
    let got = http("GET", &serve.state_url(PATH), &[], None);
    assert_eq!(got.status, 500, "GET with an unrelated identity: {}", got.text());
    let body = got.text();
    assert!(body.to_lowercase().contains("decrypt"), "the 500 does not say it cannot decrypt: {body}");
    assert!(body.contains("none of the configured identities"), "the 500 does not say no identity opens it: {body}");
    assert_error_body(&got, &blob, &secrets, "GET with an unrelated identity");
    println!("age, unrelated identity: GET {} {}", got.status, body.trim());

    // A write cannot be guarded against a state it cannot read: refused, nothing stored.
    let r =
        http("POST", &serve.state_url(PATH), &[("Content-Type", "application/json")], Some(&next_state(&state, "x")));
    assert_eq!(r.status, 500, "POST over a state no identity opens: {}", r.text());
    assert_error_body(&r, &blob, &secrets, "POST with an unrelated identity");
    assert_eq!(remote.refs(), refs, "the repository changed");
    // Terraform fails and says why; main stays.
    let tip = remote.tip();
    point_at_expect_failure(&mut tf, &serve);
    assert_eq!(remote.tip(), tip, "main moved");
    let log = serve.stderr_log();
    for s in secrets {
        assert!(!log.contains(s), "the server log holds a secret value");
    }
    drop(serve);

    // No encryption configured at all: the armored file is never served as a state.
    let serve = serve_on(&remote, &[]);
    let got = http("GET", &serve.state_url(PATH), &[], None);
    assert_eq!(got.status, 500, "GET of an age file with no identity configured: {}", got.text());
    assert!(got.text().to_lowercase().contains("decrypt"), "the 500 does not say it cannot decrypt: {}", got.text());
    assert_error_body(&got, &blob, &secrets, "GET with no encryption configured");
    println!("age file, no encryption configured: GET {} {}", got.status, got.text().trim());
    let r =
        http("POST", &serve.state_url(PATH), &[("Content-Type", "application/json")], Some(&next_state(&state, "x")));
    assert_eq!(r.status, 500, "POST over an age file with no identity configured: {}", r.text());
    assert_eq!(remote.refs(), refs, "the repository changed");
}

/// Terraform pointed at a server that cannot open the state fails (and says 500).
fn point_at_expect_failure(tf: &mut TfWorkdir, serve: &Serve) {
    tf.set_backend(HttpBackend::lock_unlock(serve.state_url(PATH)));
    let init = tf.run(&["init", "-reconfigure", "-input=false", "-no-color"]);
    let out = if init.success() { tf.plan() } else { init };
    assert!(!out.success(), "Terraform read a state the server cannot decrypt:\n{out}");
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(text.contains("500"), "Terraform's error does not show the 500:\n{out}");
}

// ---------------------------------------------------------------------------
// AWS KMS
// ---------------------------------------------------------------------------

fn kms_env(moto: &Moto, key_id: &str) -> Vec<(String, String)> {
    let mut env = moto.aws_env();
    env.push(("GITSTATE_KMS_KEY_ID".into(), key_id.into()));
    env
}

/// The envelope stored at `blob`: checked field by field, opened with KMS `Decrypt` and
/// AES-256-GCM (no associated data) with no gitstate involved. Returns (envelope, plaintext).
#[track_caller]
fn open_envelope(moto: &Moto, blob: &[u8], key_arn: &str, password: &str) -> (Value, Vec<u8>) {
    let (env, plain) = open_envelope_any_key(moto, blob, password);
    assert_eq!(env["key_id"], key_arn, "key_id:\n{env:#}");
    (env, plain)
}

/// [`open_envelope`] whatever key id the envelope records.
#[track_caller]
fn open_envelope_any_key(moto: &Moto, blob: &[u8], password: &str) -> (Value, Vec<u8>) {
    use aes_gcm::aead::{Aead, KeyInit};
    let b64 = base64::engine::general_purpose::STANDARD;
    assert_nothing_in_clear(blob, password, "the envelope");
    let env = parse_json(blob, "the stored envelope");
    let fields: BTreeSet<&str> =
        env.as_object().expect("the envelope is a JSON object").keys().map(String::as_str).collect();
    let expected: BTreeSet<&str> =
        ["gitstate_envelope", "algorithm", "key_id", "wrapped_key", "nonce", "ciphertext"].into_iter().collect();
    assert_eq!(fields, expected, "the envelope's fields:\n{env:#}");
    assert_eq!(env["gitstate_envelope"], 1, "format version:\n{env:#}");
    assert_eq!(env["algorithm"], "AES-256-GCM", "algorithm:\n{env:#}");
    assert!(env["key_id"].as_str().is_some_and(|k| !k.is_empty()), "key_id:\n{env:#}");
    let field = |k: &str| {
        let s = env[k].as_str().unwrap_or_else(|| panic!("{k} is not a string:\n{env:#}"));
        b64.decode(s).unwrap_or_else(|e| panic!("{k} is not base64 ({e}):\n{env:#}"))
    };
    let nonce = field("nonce");
    assert_eq!(nonce.len(), 12, "the nonce is not 12 bytes:\n{env:#}");
    let ciphertext = field("ciphertext");
    let _ = field("wrapped_key");
    let data_key = b64
        .decode(moto.kms_decrypt_base64(env["wrapped_key"].as_str().unwrap()))
        .expect("KMS Decrypt's Plaintext is base64");
    assert_eq!(data_key.len(), 32, "the data key is not 256 bits");
    let cipher = aes_gcm::Aes256Gcm::new_from_slice(&data_key).unwrap();
    let plain = cipher
        .decrypt(aes_gcm::Nonce::from_slice(&nonce), ciphertext.as_slice())
        .expect("AES-256-GCM open of the envelope's ciphertext (no associated data) fails");
    (env, plain)
}

/// KMS envelopes against moto: apply, the envelope opened by hand equals what Terraform
/// pulls and GET serves, a write after a restart, another key → 500 naming the key needed,
/// KMS unreachable → 503 with Retry-After and nothing stored.
#[test]
fn kms_envelope_apply_restart_wrong_key_and_kms_down() {
    let mut moto = Some(Moto::start());
    let m = moto.as_ref().unwrap();
    let key_a = m.create_kms_key("gitstate states");
    let key_b = m.create_kms_key("another key");
    assert_ne!(key_a, key_b);
    let password = random_secret();
    let remote = Remote::new();

    let serve = serve_on(&remote, &kms_env(m, &key_a));
    let mut tf = TfWorkdir::new(HttpBackend::lock_unlock(serve.state_url(PATH)));
    set_config(&mut tf, &password, "one");
    tf.init().assert_success();
    tf.apply().assert_success();
    let blob1 = remote.stored(PATH);
    let (env1, plain1) = open_envelope(m, &blob1, &key_a, &password);
    let state1 = parse_json(&plain1, "the opened envelope");
    assert_outputs(&state1, &password, "one", "the opened envelope");
    assert_eq!(state1, pulled(&tf), "the opened envelope and `terraform state pull` differ");
    assert_eq!(get_state(&serve).body, plain1, "GET does not serve the opened envelope byte for byte");
    assert_apply_commit(&remote, &state1, &password);
    drop(serve);

    // A restart (no data key in memory): read and write again.
    let serve = serve_on(&remote, &kms_env(m, &key_a));
    assert_eq!(get_state(&serve).body, plain1, "GET after a restart");
    point_at(&mut tf, &serve);
    set_config(&mut tf, &password, "two");
    tf.apply().assert_success();
    let blob2 = remote.stored(PATH);
    let (env2, plain2) = open_envelope(m, &blob2, &key_a, &password);
    let state2 = parse_json(&plain2, "the second envelope");
    assert_outputs(&state2, &password, "two", "the second envelope");
    assert_eq!(state2, pulled(&tf));
    assert_eq!(state2["lineage"], state1["lineage"], "lineage changed");
    assert!(state2["serial"].as_u64() > state1["serial"].as_u64(), "serial did not grow");
    assert_ne!(env2["wrapped_key"], env1["wrapped_key"], "the same data key for two writes");
    assert_ne!(env2["nonce"], env1["nonce"], "the same nonce for two writes");
    assert_apply_commit(&remote, &state2, &password);
    // Identical write on the decrypted state: 200, no commit.
    let tip = remote.tip();
    let again = http("POST", &serve.state_url(PATH), &[("Content-Type", "application/json")], Some(&plain2));
    assert_eq!(again.status, 200, "re-POST of the stored state: {}", again.text());
    assert_eq!(remote.tip(), tip, "an identical write made a commit");
    drop(serve);

    // Another key: 500 naming the key the state needs; writes refused too.
    let refs = remote.refs();
    let serve = serve_on(&remote, &kms_env(m, &key_b));
    let got = http("GET", &serve.state_url(PATH), &[], None);
    assert_eq!(got.status, 500, "GET configured with another KMS key: {}", got.text());
    assert!(got.text().contains(&key_a), "the 500 does not name the key the state needs ({key_a}): {}", got.text());
    assert_error_body(&got, &blob2, &[&password], "GET configured with another KMS key");
    println!("KMS, another key: GET {} {}", got.status, got.text().trim());
    let r =
        http("POST", &serve.state_url(PATH), &[("Content-Type", "application/json")], Some(&next_state(&state2, "b")));
    assert_eq!(r.status, 500, "POST configured with another KMS key: {}", r.text());
    assert_eq!(remote.refs(), refs, "the repository changed");
    drop(serve);

    // KMS unreachable: a warm server (it wrote and read under key A) and a cold one.
    let warm = serve_on(&remote, &kms_env(m, &key_a));
    assert_eq!(get_state(&warm).body, plain2);
    let warm_env = kms_env(m, &key_a);
    drop(moto.take()); // moto stopped: its port now refuses connections
    let refs = remote.refs();

    let r = http(
        "POST",
        &warm.state_url(PATH),
        &[("Content-Type", "application/json")],
        Some(&next_state(&state2, "down")),
    );
    assert_eq!(r.status, 503, "POST with KMS unreachable (warm server): {}", r.text());
    assert!(r.header("Retry-After").is_some(), "503 without Retry-After: {:?}", r.headers);
    assert_eq!(remote.refs(), refs, "a write with KMS unreachable changed the repository");
    // A warm server may still hold the data key of what it read (bounded in time): then it
    // serves the state; otherwise 503. Never anything else.
    let got = http("GET", &warm.state_url(PATH), &[], None);
    println!("KMS down, warm server: POST {} {}; GET {}", r.status, r.text().trim(), got.status);
    match got.status {
        200 => assert_eq!(got.body, plain2, "GET from the warm server with KMS down"),
        503 => assert!(got.header("Retry-After").is_some(), "503 without Retry-After: {:?}", got.headers),
        s => panic!("GET from the warm server with KMS down: {s} {}", got.text()),
    }
    drop(warm);

    let cold = serve_on(&remote, &warm_env);
    let got = http("GET", &cold.state_url(PATH), &[], None);
    assert_eq!(got.status, 503, "GET with KMS unreachable: {}", got.text());
    assert!(got.header("Retry-After").is_some(), "503 without Retry-After: {:?}", got.headers);
    assert_error_body(&got, &blob2, &[&password], "GET with KMS unreachable");
    println!(
        "KMS down, cold server: GET {} (Retry-After {:?}) {}",
        got.status,
        got.header("Retry-After"),
        got.text().trim()
    );
    let r = http(
        "POST",
        &cold.state_url(PATH),
        &[("Content-Type", "application/json")],
        Some(&next_state(&state2, "down")),
    );
    assert_eq!(r.status, 503, "POST with KMS unreachable: {}", r.text());
    assert!(r.header("Retry-After").is_some(), "503 without Retry-After: {:?}", r.headers);
    assert_eq!(remote.refs(), refs, "the repository changed with KMS unreachable");
    assert_eq!(remote.stored(PATH), blob2, "the stored state changed with KMS unreachable");
    fsck_clean(&remote.dir());
}

// ---------------------------------------------------------------------------
// Leaks
// ---------------------------------------------------------------------------

/// After encrypted applies, reads and a plan at trace level, the secret value is nowhere:
/// not in any file of the server's directory (data, cache, logs), not in any object or
/// commit message of the cache or the repository, and no identity is in the log.
#[test]
fn nothing_decrypted_reaches_disk_cache_log_or_commit_messages() {
    require_age();
    let key = AgeKey::generate();
    let unrelated = AgeKey::generate();
    let password = random_secret();
    let remote = Remote::new();
    // Identities newline-separated, an unrelated one first.
    let mut env = age_env(&[&key], &format!("{}\n{}\n", unrelated.secret, key.secret));
    env.push(("GITSTATE_LOG".into(), "trace".into()));
    // GITSTATE_LOG wins over RUST_LOG: DEBUG lines in the log show it took effect.
    env.push(("RUST_LOG".into(), "info".into()));
    let serve = serve_on(&remote, &env);

    let mut tf = TfWorkdir::new(HttpBackend::lock_unlock(serve.state_url(PATH)));
    set_config(&mut tf, &password, "one");
    tf.init().assert_success();
    tf.apply().assert_success();
    set_config(&mut tf, &password, "two");
    tf.apply().assert_success();
    assert_eq!(tf.plan().code(), Some(0), "plan after the applies");
    let state = pulled(&tf);
    assert_outputs(&state, &password, "two", "terraform state pull");
    let got = get_state(&serve);
    assert!(got.text().contains(&password), "GET does not serve the decrypted state");
    let again = http("POST", &serve.state_url(PATH), &[("Content-Type", "application/json")], Some(&got.body));
    assert_eq!(again.status, 200, "re-POST: {}", again.text());
    assert_armored_age(&remote.stored(PATH), "the stored state");

    // The log is at trace level (so this looks at everything gitstate says).
    let log = serve.stderr_log();
    // (gitstate itself has no trace events: at trace its log is what debug shows, plus
    // whatever its dependencies say at trace.)
    assert!(log.contains(" DEBUG "), "GITSTATE_LOG=trace did not take effect (no DEBUG line):\n{log}");
    println!(
        "leak check: {} log lines ({} at TRACE), {} files under the server's directory, {} git directories",
        log.lines().count(),
        log.lines().filter(|l| l.contains(" TRACE ")).count(),
        files_under(serve.dir()).len(),
        git_dirs_under(serve.dir()).len()
    );
    // The server wrote a cache of the remote.
    assert!(!git_dirs_under(&serve.cache_dir()).is_empty(), "no git cache under {}", serve.cache_dir().display());

    let mut found = find_everywhere(serve.dir(), &password);
    found.extend(find_everywhere(&remote.dir(), &password));
    assert!(found.is_empty(), "the password {password:?} is in clear in: {found:#?}");
    let commit_messages = git_out(&remote.dir(), &["log", "--all", "--format=%B"]);
    assert!(!commit_messages.contains(&password), "commit messages hold the password:\n{commit_messages}");
    assert!(commit_messages.contains("Serial:"), "commit messages lost their trailers:\n{commit_messages}");
    // Nor any identity, nor the state's other content, in the log.
    for s in [key.secret.as_str(), unrelated.secret.as_str(), "AGE-SECRET-KEY"] {
        assert!(!log.contains(s), "the server log holds {s:?}");
        assert!(find_everywhere(serve.dir(), s).is_empty(), "{s:?} is in the server's directory");
    }
    let log_lines_with_state: Vec<&str> =
        log.lines().filter(|l| l.contains("\"outputs\"") || l.contains("db_password")).collect();
    assert!(log_lines_with_state.is_empty(), "the log holds state content:\n{}", log_lines_with_state.join("\n"));
    // (The lineage may be logged: it is in the Lineage trailer by design and is no secret.)
}

/// The same with KMS, where the AWS SDK logs at trace too: neither the secret value nor a
/// plaintext data key is in the log, the server's directory or the repository.
#[test]
fn kms_nothing_decrypted_nor_data_keys_reach_disk_cache_log_or_commit_messages() {
    let moto = Moto::start();
    let key = moto.create_kms_key("gitstate states");
    let password = random_secret();
    let remote = Remote::new();
    let mut env = kms_env(&moto, &key);
    env.push(("GITSTATE_LOG".into(), "trace".into()));
    env.push(("RUST_LOG".into(), "info".into()));
    let serve = serve_on(&remote, &env);

    let mut tf = TfWorkdir::new(HttpBackend::lock_unlock(serve.state_url(PATH)));
    set_config(&mut tf, &password, "one");
    tf.init().assert_success();
    tf.apply().assert_success();
    let first = remote.stored(PATH);
    set_config(&mut tf, &password, "two");
    tf.apply().assert_success();
    assert_eq!(tf.plan().code(), Some(0), "plan after the applies");
    let got = get_state(&serve);
    assert!(got.text().contains(&password), "GET does not serve the decrypted state");
    let second = remote.stored(PATH);
    let (env2, _) = open_envelope(&moto, &second, &key, &password);
    let (env1, _) = open_envelope(&moto, &first, &key, &password);

    let log = serve.stderr_log();
    assert!(log.contains(" DEBUG "), "GITSTATE_LOG=trace did not take effect (no DEBUG line):\n{log}");
    println!(
        "KMS leak check: {} log lines ({} at TRACE)",
        log.lines().count(),
        log.lines().filter(|l| l.contains(" TRACE ")).count()
    );
    let mut found = find_everywhere(serve.dir(), &password);
    found.extend(find_everywhere(&remote.dir(), &password));
    assert!(found.is_empty(), "the password {password:?} is in clear in: {found:#?}");
    // The plaintext data keys (as KMS answers them, base64) are nowhere either.
    for e in [&env1, &env2] {
        let data_key = moto.kms_decrypt_base64(e["wrapped_key"].as_str().unwrap());
        let found = find_everywhere(serve.dir(), &data_key);
        assert!(found.is_empty(), "a plaintext data key is in: {found:#?}");
    }
    let commit_messages = git_out(&remote.dir(), &["log", "--all", "--format=%B"]);
    assert!(!commit_messages.contains(&password), "commit messages hold the password:\n{commit_messages}");
}

/// `GITSTATE_KMS_KEY_ID` may be an alias: the envelope records the key's ARN (what KMS
/// answers), so the state stays readable when the alias is moved to a new key (rotation).
#[test]
fn kms_configured_by_alias_records_the_key_arn_and_survives_moving_the_alias() {
    let moto = Moto::start();
    let key_a = moto.create_kms_key("gitstate states");
    let key_b = moto.create_kms_key("gitstate states, rotated");
    moto.kms("CreateAlias", &serde_json::json!({ "AliasName": "alias/gitstate", "TargetKeyId": key_a }));
    let password = random_secret();
    let remote = Remote::new();

    let serve = serve_on(&remote, &kms_env(&moto, "alias/gitstate"));
    let mut tf = TfWorkdir::new(HttpBackend::lock_unlock(serve.state_url(PATH)));
    set_config(&mut tf, &password, "one");
    tf.init().assert_success();
    tf.apply().assert_success();
    let blob = remote.stored(PATH);
    let (env1, plain) = open_envelope_any_key(&moto, &blob, &password);
    println!("KMS by alias: envelope key_id = {}", env1["key_id"]);
    drop(serve);

    // The alias moves to key B (rotation): old states are still read, the next write is under B.
    moto.kms("UpdateAlias", &serde_json::json!({ "AliasName": "alias/gitstate", "TargetKeyId": key_b }));
    let mut env = kms_env(&moto, "alias/gitstate");
    env.push(("GITSTATE_KMS_DECRYPT_KEY_IDS".into(), key_a.clone()));
    let serve = serve_on(&remote, &env);
    let got = http("GET", &serve.state_url(PATH), &[], None);
    println!(
        "KMS by alias, after moving it: GET {} {}",
        got.status,
        if got.status == 200 { String::new() } else { got.text() }
    );
    let read_after_move = got.status == 200 && got.body == plain;
    let mut write_after_move = None;
    if read_after_move {
        point_at(&mut tf, &serve);
        set_config(&mut tf, &password, "two");
        tf.apply().assert_success();
        let (env2, plain2) = open_envelope_any_key(&moto, &remote.stored(PATH), &password);
        assert_outputs(&parse_json(&plain2, "the write under B"), &password, "two", "the write under B");
        write_after_move = Some(env2["key_id"].clone());
    }
    println!("KMS by alias: the write after the move records key_id {write_after_move:?}");
    assert_eq!(env1["key_id"], key_a, "configured by alias, the envelope should record the key's ARN:\n{env1:#}");
    assert!(
        read_after_move,
        "after the alias moved to a new key (old key in GITSTATE_KMS_DECRYPT_KEY_IDS), GET: {} {}",
        got.status,
        got.text()
    );
    assert_eq!(write_after_move, Some(Value::from(key_b)), "the write after the move");
}

// ---------------------------------------------------------------------------
// Settings refused at start
// ---------------------------------------------------------------------------

/// `gitstate serve` with `env`: it must exit (not serve) with a failure; its stderr.
fn serve_refuses_to_start(env: &[(&str, &str)]) -> String {
    let dir = tempfile::Builder::new().prefix("gitstate-enc-start-").tempdir().unwrap();
    let port = gitstate_testkit::gitd::free_port();
    let mut cmd = Command::new(gitstate_testkit::serve::server_bin());
    cmd.arg("serve").arg("--listen").arg(format!("127.0.0.1:{port}")).arg("--data-dir").arg(dir.path().join("data"));
    for (k, _) in std::env::vars_os() {
        if let Some(k) = k.to_str() {
            if k.starts_with("GITSTATE_") || k.starts_with("GIT_") || k.starts_with("AWS_") {
                cmd.env_remove(k);
            }
        }
    }
    cmd.env("PATH", gitstate_testkit::serve::path_without_git())
        .env("HOME", dir.path())
        .env("NO_COLOR", "1")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap());
    let mut child = cmd.spawn().expect("spawn gitstate serve");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "gitstate serve started with {env:?}; it should refuse these settings\n{}",
                std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let stderr = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default();
    assert!(!status.success(), "gitstate serve exited 0 with {env:?}:\n{stderr}");
    stderr
}

/// Recipients without identities (writes it could not guard), identities without
/// recipients (writes in clear), age and KMS at once, an unreadable identity file and a
/// malformed identity are refused at start, and the refusal repeats no secret.
#[test]
fn settings_that_cannot_work_are_refused_at_start() {
    require_age();
    let key = AgeKey::generate();
    let file = key.file.display().to_string();
    let bogus = "AGE-SECRET-KEY-1QQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQ";
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("recipients without identities", vec![("GITSTATE_AGE_RECIPIENTS", &key.public)]),
        ("identities without recipients", vec![("GITSTATE_AGE_IDENTITIES", &key.secret)]),
        ("an identity file without recipients", vec![("GITSTATE_AGE_IDENTITY_FILE", &file)]),
        (
            "age and KMS at once",
            vec![
                ("GITSTATE_AGE_RECIPIENTS", &key.public),
                ("GITSTATE_AGE_IDENTITIES", &key.secret),
                ("GITSTATE_KMS_KEY_ID", "alias/gitstate"),
            ],
        ),
        (
            "a missing identity file",
            vec![("GITSTATE_AGE_RECIPIENTS", &key.public), ("GITSTATE_AGE_IDENTITY_FILE", "/nonexistent/key.txt")],
        ),
        ("a malformed identity", vec![("GITSTATE_AGE_RECIPIENTS", &key.public), ("GITSTATE_AGE_IDENTITIES", bogus)]),
        (
            "a malformed recipient",
            vec![("GITSTATE_AGE_RECIPIENTS", "age1nope"), ("GITSTATE_AGE_IDENTITIES", &key.secret)],
        ),
    ];
    for (what, env) in cases {
        let stderr = serve_refuses_to_start(&env);
        println!("refused at start, {what}: {}", stderr.trim());
        assert!(!stderr.trim().is_empty(), "{what}: refused without a word");
        assert!(
            !stderr.contains(&key.secret) && !stderr.contains(bogus),
            "{what}: the refusal repeats a secret:\n{stderr}"
        );
        // (`AGE-SECRET-KEY-1...` as a hint of the format is fine.)
        assert!(
            !stderr.replace("AGE-SECRET-KEY-1...", "").contains("AGE-SECRET-KEY-1"),
            "{what}: the refusal repeats an identity:\n{stderr}"
        );
    }
}

// ---------------------------------------------------------------------------
// Re-encrypting an existing repository: write each state back
// ---------------------------------------------------------------------------

/// The identical state written again over a stored form this deployment no longer writes
/// (clear text with age on; an envelope under another KMS key) is stored again in the new
/// form: that is how an existing repository gets (re-)encrypted. Once current, the same
/// write again makes no commit.
#[test]
fn identical_write_over_a_stale_stored_form_stores_it_again_encrypted() {
    require_age();
    let key = AgeKey::generate();
    let body = gitstate_testkit::fixtures::state(3, "reencrypt-me");
    let post = |serve: &Serve| {
        http("POST", &serve.state_url(PATH), &[("Content-Type", "application/json")], Some(body.as_bytes()))
    };

    // clear → age
    let remote = Remote::new();
    let serve = serve_on(&remote, &[]);
    assert_eq!(post(&serve).status, 200);
    assert_eq!(remote.stored(PATH), body.as_bytes(), "stored in clear with no encryption");
    drop(serve);
    let serve = serve_on(&remote, &age_env(&[&key], &key.secret));
    let tip = remote.tip();
    let r = post(&serve);
    assert_eq!(r.status, 200, "identical write with age on: {}", r.text());
    assert_ne!(remote.tip(), tip, "the identical write over a clear state made no commit");
    let blob = remote.stored(PATH);
    assert_armored_age(&blob, "the re-written state");
    assert_eq!(age_decrypt(&blob, &key).unwrap(), body.as_bytes(), "the re-written state");
    let tip = remote.tip();
    assert_eq!(post(&serve).status, 200);
    assert_eq!(remote.tip(), tip, "the identical write over a current age file made a commit");
    drop(serve);

    // KMS key A → key B (A still readable through GITSTATE_KMS_DECRYPT_KEY_IDS)
    let moto = Moto::start();
    let key_a = moto.create_kms_key("a");
    let key_b = moto.create_kms_key("b");
    let remote = Remote::new();
    let serve = serve_on(&remote, &kms_env(&moto, &key_a));
    assert_eq!(post(&serve).status, 200);
    let (_, plain) = open_envelope(&moto, &remote.stored(PATH), &key_a, "reencrypt-me");
    assert_eq!(plain, body.as_bytes());
    drop(serve);
    let mut env = kms_env(&moto, &key_b);
    env.push(("GITSTATE_KMS_DECRYPT_KEY_IDS".into(), key_a.clone()));
    let serve = serve_on(&remote, &env);
    assert_eq!(get_state(&serve).body, body.as_bytes(), "GET of a state under the old key listed for decrypting");
    let tip = remote.tip();
    let r = post(&serve);
    assert_eq!(r.status, 200, "identical write under key B: {}", r.text());
    assert_ne!(remote.tip(), tip, "the identical write over an envelope under another key made no commit");
    let (_, plain) = open_envelope(&moto, &remote.stored(PATH), &key_b, "reencrypt-me");
    assert_eq!(plain, body.as_bytes());
    let tip = remote.tip();
    assert_eq!(post(&serve).status, 200);
    assert_eq!(remote.tip(), tip, "the identical write over a current envelope made a commit");
}

/// `gitstate decrypt` (docs/encryption.md: reading a stored state outside the backend) opens an age file
/// and a KMS envelope with the keys of the environment, from standard input or a file.
#[test]
fn gitstate_decrypt_opens_what_was_stored() {
    require_age();
    let key = AgeKey::generate();
    let body = gitstate_testkit::fixtures::state(1, "decrypt-me");
    let decrypt = |env: &[(String, String)], stored: &[u8], from_file: bool| -> std::process::Output {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("stored");
        std::fs::write(&file, stored).unwrap();
        let mut cmd = Command::new(gitstate_testkit::serve::server_bin());
        cmd.arg("decrypt");
        if from_file {
            cmd.arg(&file).stdin(Stdio::null());
        } else {
            cmd.stdin(std::fs::File::open(&file).unwrap());
        }
        for (k, _) in std::env::vars_os() {
            if let Some(k) = k.to_str() {
                if k.starts_with("GITSTATE_") || k.starts_with("AWS_") {
                    cmd.env_remove(k);
                }
            }
        }
        cmd.env("HOME", dir.path()).envs(env.iter().map(|(k, v)| (k, v)));
        cmd.output().expect("run gitstate decrypt")
    };

    let remote = Remote::new();
    let serve = serve_on(&remote, &age_env(&[&key], &key.secret));
    let r = http("POST", &serve.state_url(PATH), &[("Content-Type", "application/json")], Some(body.as_bytes()));
    assert_eq!(r.status, 200, "{}", r.text());
    let blob = remote.stored(PATH);
    assert_armored_age(&blob, "the stored state");
    let env = vec![("GITSTATE_AGE_IDENTITY_FILE".to_string(), key.file.display().to_string())];
    for from_file in [false, true] {
        let out = decrypt(&env, &blob, from_file);
        assert!(
            out.status.success(),
            "gitstate decrypt (age, file {from_file}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, body.as_bytes(), "gitstate decrypt (age, file {from_file})");
    }
    let other = AgeKey::generate();
    let out = decrypt(&[("GITSTATE_AGE_IDENTITIES".into(), other.secret.clone())], &blob, true);
    assert!(!out.status.success(), "gitstate decrypt with an unrelated identity succeeded");
    assert!(out.stdout.is_empty(), "gitstate decrypt with an unrelated identity printed something");
    drop(serve);

    let moto = Moto::start();
    let kms_key = moto.create_kms_key("decrypt");
    let remote = Remote::new();
    let serve = serve_on(&remote, &kms_env(&moto, &kms_key));
    let r = http("POST", &serve.state_url(PATH), &[("Content-Type", "application/json")], Some(body.as_bytes()));
    assert_eq!(r.status, 200, "{}", r.text());
    let blob = remote.stored(PATH);
    let out = decrypt(&kms_env(&moto, &kms_key), &blob, true);
    assert!(out.status.success(), "gitstate decrypt (KMS): {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, body.as_bytes(), "gitstate decrypt (KMS)");
}
