//! The backend rules through the public `App::handle`, over the testkit's in-memory store
//! (`gitstate_testkit::memory::MemoryStore`: compare-and-swap ref updates, files in trees):
//! arbitrary sequences of GET, POST (with or without a lock ID, `force`), DELETE, LOCK,
//! UNLOCK (force-unlock too) and raw requests, checked step by step against a model of
//! the rules of DESIGN.md and issue 5:
//! - at most one lock holder; LOCK answers 200 or 423 naming the holder; UNLOCK with a
//!   foreign ID answers 409 naming the holder;
//! - a write lands only under the lock that is held (or with no lock at all);
//! - the lineage/serial guard: another lineage, a lower serial, or the same serial with
//!   other content is refused with 409 unless `force=true`; the same state again is a
//!   200 that stores nothing;
//! - what the store holds is exactly what the model says; no answer is a 5xx; every
//!   ref name and commit message the backend produces is well formed.
#![no_main]

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use bytes::Bytes;
use gitstate::app::App;
use gitstate::auth::Auth;
use gitstate::config::Config;
use gitstate::protocol::content_md5;
use gitstate_testkit::memory::MemoryStore;
use libfuzzer_sys::fuzz_target;

// ---------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------

const PATHS: [&str; 3] = ["a.tfstate", "dir/b.tfstate", "dir"];
const IDS: [&str; 3] = ["id-0", "id-1", "id-2"];
const LINEAGES: [&str; 2] = ["lin-0", "lin-1"];

#[derive(Arbitrary, Debug)]
enum Body<'a> {
    /// A Terraform state.
    State {
        lineage: u8,
        serial: u8,
        value: u8,
        pretty: bool,
    },
    /// A JSON object without serial/lineage (e.g. an encrypted envelope).
    Envelope {
        value: u8,
    },
    Raw(&'a [u8]),
}

#[derive(Arbitrary, Debug)]
enum Op<'a> {
    Get { p: u8 },
    Post { p: u8, lock: Option<u8>, force: bool, body: Body<'a> },
    Delete { p: u8, lock: Option<u8> },
    Lock { p: u8, id: u8, who: &'a str, operation: &'a str },
    Unlock { p: u8, id: Option<u8> },
    GetLock { p: u8 },
    Raw { method: &'a str, uri: &'a str, body: &'a [u8] },
}

fn body_bytes(b: &Body<'_>) -> Vec<u8> {
    match b {
        Body::State { lineage, serial, value, pretty } => {
            let v = serde_json::json!({
                "version": 4,
                "serial": serial % 4,
                "lineage": LINEAGES[*lineage as usize % 2],
                "outputs": {"x": {"value": value % 3, "type": "number"}},
            });
            let mut out =
                if *pretty { serde_json::to_vec_pretty(&v).unwrap() } else { serde_json::to_vec(&v).unwrap() };
            out.push(b'\n');
            out
        }
        Body::Envelope { value } => format!("{{\"encrypted_data\":\"{}\"}}", value % 3).into_bytes(),
        Body::Raw(r) => r.to_vec(),
    }
}

/// The model: what is stored and who holds which lock.
#[derive(Default)]
struct Model {
    files: HashMap<&'static str, Vec<u8>>,
    locks: HashMap<&'static str, &'static str>,
}

/// The guard, from the rules of issue 5 (not from the code under test).
enum Expect {
    Write,
    NoChange,
    Conflict,
}

fn guard(stored: &[u8], incoming: &[u8]) -> Expect {
    if stored == incoming {
        return Expect::NoChange;
    }
    let (Ok(old), Ok(new)) =
        (serde_json::from_slice::<serde_json::Value>(stored), serde_json::from_slice::<serde_json::Value>(incoming))
    else {
        return Expect::Write;
    };
    let lineage = |v: &serde_json::Value| v.get("lineage").and_then(|l| l.as_str()).map(str::to_string);
    let serial = |v: &serde_json::Value| v.get("serial").and_then(|s| s.as_u64());
    if let (Some(a), Some(b)) = (lineage(&old), lineage(&new)) {
        if a != b {
            return Expect::Conflict;
        }
    }
    match (serial(&old), serial(&new)) {
        (Some(a), Some(b)) if b < a => Expect::Conflict,
        (Some(a), Some(b)) if a == b && old != new => Expect::Conflict,
        (Some(a), Some(b)) if a == b => Expect::NoChange,
        _ => Expect::Write,
    }
}

fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().unwrap())
}

fn send(app: &Arc<App>, method: &str, uri: &str, body: Vec<u8>) -> Option<(u16, String)> {
    let mut b = http::Request::builder().method(method).uri(uri);
    if method == "POST" {
        b = b.header("Content-MD5", content_md5(&body));
    }
    let req = b.body(Bytes::from(body)).ok()?;
    let r = rt().block_on(app.handle(req));
    let status = r.status().as_u16();
    assert!(status < 500, "{method} {uri}: {status} {:?}", String::from_utf8_lossy(r.body()));
    Some((status, String::from_utf8_lossy(r.body()).into_owned()))
}

fn holder_id(body: &str) -> Option<String> {
    serde_json::from_str::<serde_json::Value>(body).ok()?.get("ID")?.as_str().map(str::to_string)
}

/// Every line of a commit message is one line of text; trailers are `Key: value`.
fn check_message(message: &str) {
    let mut parts = message.splitn(2, "\n\n");
    let subject = parts.next().unwrap();
    assert!(!subject.contains('\r') && subject.lines().count() == 1, "subject {subject:?}");
    for line in parts.next().unwrap_or("").lines() {
        assert!(!line.chars().any(char::is_control), "control character in {line:?}");
        let (key, _) = line.split_once(": ").unwrap_or_else(|| panic!("not a trailer: {line:?}"));
        assert!(["Lock-ID", "Who", "Operation", "Serial", "Lineage"].contains(&key), "unknown trailer {line:?}");
    }
}

fuzz_target!(|ops: Vec<Op<'_>>| {
    let mem = Arc::new(MemoryStore::new());
    let mut config = Config::default();
    config.max_body_bytes = 4096;
    let auth = Auth::from_config(&config).expect("passthrough needs nothing");
    let app = Arc::new(App::new(config, auth, mem.clone(), gitstate::backend::sealing::Sealing::clear()));
    let mut model = Model::default();

    for op in ops.iter().take(24) {
        match op {
            Op::Get { p } => {
                let path = PATHS[*p as usize % 3];
                let (status, body) = send(&app, "GET", &format!("/state/{path}"), Vec::new()).unwrap();
                match model.files.get(path) {
                    Some(stored) if !stored.is_empty() => {
                        assert_eq!(status, 200);
                        assert_eq!(body.as_bytes(), stored.as_slice());
                    }
                    _ => assert_eq!(status, 204, "{body}"),
                }
            }
            Op::Post { p, lock, force, body } => {
                let path = PATHS[*p as usize % 3];
                let bytes = body_bytes(body);
                let mut uri = format!("/state/{path}");
                let mut query = Vec::new();
                if let Some(l) = lock {
                    query.push(format!("ID={}", IDS[*l as usize % 3]));
                }
                if *force {
                    query.push("force=true".to_string());
                }
                if !query.is_empty() {
                    uri = format!("{uri}?{}", query.join("&"));
                }
                let (status, answer) = send(&app, "POST", &uri, bytes.clone()).unwrap();
                let is_object =
                    serde_json::from_slice::<serde_json::Value>(&bytes).map(|v| v.is_object()).unwrap_or(false);
                if bytes.len() > 4096 {
                    assert_eq!(status, 413);
                    continue;
                }
                if !is_object {
                    assert_eq!(status, 400, "a body that is not a JSON object: {answer}");
                    continue;
                }
                let lock_id = lock.map(|l| IDS[l as usize % 3]);
                match (model.locks.get(path), lock_id) {
                    (Some(h), Some(id)) if *h == id => {}
                    (Some(h), _) => {
                        assert_eq!(status, 423, "write to a state locked by {h}: {answer}");
                        assert_eq!(holder_id(&answer).as_deref(), Some(*h));
                        continue;
                    }
                    (None, Some(_)) => {
                        assert_eq!(status, 409, "write under a lock nobody holds: {answer}");
                        continue;
                    }
                    (None, None) => {}
                }
                // Other states in the way (raw requests may have written paths outside the model).
                let conflict = mem
                    .files("refs/heads/main")
                    .iter()
                    .any(|f| f.starts_with(&format!("{path}/")) || path.starts_with(&format!("{f}/")));
                let expect = match model.files.get(path) {
                    Some(stored) => match guard(stored, &bytes) {
                        Expect::Conflict if *force => Expect::Write,
                        e => e,
                    },
                    None => Expect::Write,
                };
                match expect {
                    Expect::NoChange => assert_eq!(status, 200, "{answer}"),
                    Expect::Conflict => assert_eq!(status, 409, "the guard must refuse: {answer}"),
                    Expect::Write if conflict => assert_eq!(status, 409, "path conflict: {answer}"),
                    Expect::Write => {
                        assert_eq!(status, 200, "{answer}");
                        model.files.insert(path, bytes);
                    }
                }
            }
            Op::Delete { p, lock } => {
                let path = PATHS[*p as usize % 3];
                let lock_id = lock.map(|l| IDS[l as usize % 3]);
                let uri = match lock_id {
                    Some(id) => format!("/state/{path}?ID={id}"),
                    None => format!("/state/{path}"),
                };
                let (status, answer) = send(&app, "DELETE", &uri, Vec::new()).unwrap();
                match (model.locks.get(path), lock_id) {
                    (Some(h), Some(id)) if *h == id => {}
                    (Some(_), _) => {
                        assert_eq!(status, 423, "{answer}");
                        continue;
                    }
                    (None, Some(_)) => {
                        assert_eq!(status, 409, "{answer}");
                        continue;
                    }
                    (None, None) => {}
                }
                assert_eq!(status, 200, "{answer}");
                model.files.remove(path);
            }
            Op::Lock { p, id, who, operation } => {
                let path = PATHS[*p as usize % 3];
                let id = IDS[*id as usize % 3];
                let info = serde_json::json!({"ID": id, "Who": who, "Operation": operation, "Info": "", "Version": "1.0.3", "Created": "", "Path": ""});
                let info = serde_json::to_vec(&info).unwrap();
                let (status, answer) = send(&app, "LOCK", &format!("/state/{path}"), info.clone()).unwrap();
                if info.len() > 4096 {
                    assert_eq!(status, 413);
                    continue;
                }
                match model.locks.get(path) {
                    Some(h) if *h != id => {
                        assert_eq!(status, 423, "{answer}");
                        assert_eq!(holder_id(&answer).as_deref(), Some(*h));
                    }
                    Some(_) => assert_eq!(status, 200, "re-lock by the holder: {answer}"),
                    None => {
                        assert_eq!(status, 200, "{answer}");
                        model.locks.insert(path, id);
                        let tip = mem.tip(&format!("refs/heads/locks/{path}")).expect("a lock branch");
                        check_message(&mem.message(tip).expect("the tip's commit is stored"));
                        let stored = mem.file(&format!("refs/heads/locks/{path}"), &format!("{path}.lock"));
                        assert_eq!(stored.as_deref(), Some(info.as_slice()), "the lock file is the LockInfo as sent");
                    }
                }
            }
            Op::Unlock { p, id } => {
                let path = PATHS[*p as usize % 3];
                let id = id.map(|i| IDS[i as usize % 3]);
                let body = id.map(|i| format!("{{\"ID\":\"{i}\"}}").into_bytes()).unwrap_or_default();
                let (status, answer) = send(&app, "UNLOCK", &format!("/state/{path}"), body).unwrap();
                match (model.locks.get(path), id) {
                    (Some(h), Some(i)) if *h != i => {
                        assert_eq!(status, 409, "{answer}");
                        assert_eq!(holder_id(&answer).as_deref(), Some(*h));
                    }
                    _ => {
                        assert_eq!(status, 200, "{answer}");
                        model.locks.remove(path);
                    }
                }
            }
            Op::GetLock { p } => {
                let path = PATHS[*p as usize % 3];
                let (status, answer) = send(&app, "GET", &format!("/lock/{path}"), Vec::new()).unwrap();
                match model.locks.get(path) {
                    Some(h) => {
                        assert_eq!(status, 200);
                        assert_eq!(holder_id(&answer).as_deref(), Some(*h));
                    }
                    None => assert_eq!(status, 404),
                }
            }
            Op::Raw { method, uri, body } => {
                // Anything at all, as long as it is not a 5xx and stores nothing the model
                // cannot see: compare the store before and after.
                let before = mem.refs();
                if let Some((status, _)) = send(&app, method, uri, body.to_vec()) {
                    let after = mem.refs();
                    if status >= 300 {
                        assert_eq!(before, after, "a refused request {method} {uri:?} ({status}) changed refs");
                    } else if before != after {
                        // An accepted raw request may do anything a client may; resynchronise the model.
                        model = Model::default();
                        for path in PATHS {
                            if let Some(f) = mem.file("refs/heads/main", path) {
                                model.files.insert(path, f);
                            }
                            if mem.tip(&format!("refs/heads/locks/{path}")).is_some() {
                                let info = mem
                                    .file(&format!("refs/heads/locks/{path}"), &format!("{path}.lock"))
                                    .unwrap_or_default();
                                let id = holder_id(&String::from_utf8_lossy(&info)).unwrap_or_default();
                                match IDS.iter().find(|i| **i == id) {
                                    Some(i) => {
                                        model.locks.insert(path, i);
                                    }
                                    // A lock under an ID outside the model: stop checking this run.
                                    None => return,
                                }
                            }
                        }
                        // Raw requests may have written states at other paths too; those are not modelled.
                    }
                }
            }
        }
        // The store holds exactly what the model says.
        for path in PATHS {
            assert_eq!(
                mem.file("refs/heads/main", path).as_ref(),
                model.files.get(path),
                "stored {path} differs from the model"
            );
            let locked = mem.tip(&format!("refs/heads/locks/{path}")).is_some();
            assert_eq!(locked, model.locks.contains_key(path), "lock of {path}");
        }
        if let Some(tip) = mem.tip("refs/heads/main") {
            check_message(&mem.message(tip).expect("the tip's commit is stored"));
        }
    }
});
