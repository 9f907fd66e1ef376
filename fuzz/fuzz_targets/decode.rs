//! Request decoding: any method, path, query, headers and body must give either a
//! request whose every part is safe to use (a state path that is a valid tree path and
//! makes a valid lock ref name, a write body that is a JSON object matching its
//! Content-MD5, a LockInfo with a usable ID) or a 4xx answer. Never a panic, never a 5xx.
#![no_main]

use arbitrary::Arbitrary;
use bytes::Bytes;
use gitstate::backend::Operation;
use gitstate::error::Error;
use gitstate::protocol::{self, content_md5};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum MethodChoice<'a> {
    Get,
    Post,
    Put,
    Delete,
    Lock,
    Unlock,
    Other(&'a [u8]),
}

#[derive(Arbitrary, Debug)]
enum HeaderChoice<'a> {
    ContentMd5,
    ContentType,
    Other(&'a str),
}

#[derive(Arbitrary, Debug)]
enum BodyChoice<'a> {
    Raw(&'a [u8]),
    LockInfo { id: &'a str, who: &'a str, operation: &'a str },
    State { serial: Option<i64>, lineage: Option<&'a str>, extra: &'a str },
}

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    method: MethodChoice<'a>,
    /// Prefixed with `/state/`, `/lock/`, a stage, or nothing.
    prefix: u8,
    path: &'a str,
    query: Option<&'a str>,
    headers: Vec<(HeaderChoice<'a>, &'a [u8])>,
    body: BodyChoice<'a>,
    /// Send the body's true Content-MD5 (so that decoding goes past the MD5 check).
    true_md5: bool,
}

fuzz_target!(|input: Input<'_>| {
    let method = match input.method {
        MethodChoice::Get => Method::GET,
        MethodChoice::Post => Method::POST,
        MethodChoice::Put => Method::PUT,
        MethodChoice::Delete => Method::DELETE,
        MethodChoice::Lock => Method::from_bytes(b"LOCK").unwrap(),
        MethodChoice::Unlock => Method::from_bytes(b"UNLOCK").unwrap(),
        MethodChoice::Other(m) => match Method::from_bytes(m) {
            Ok(m) => m,
            Err(_) => return,
        },
    };
    let path = match input.prefix % 5 {
        0 => format!("/state/{}", input.path),
        1 => format!("/lock/{}", input.path),
        2 => format!("/prod/state/{}", input.path),
        3 => format!("/{}", input.path),
        _ => input.path.to_string(),
    };
    let body: Bytes = match input.body {
        BodyChoice::Raw(b) => Bytes::copy_from_slice(b),
        BodyChoice::LockInfo { id, who, operation } => {
            serde_json::to_vec(&serde_json::json!({"ID": id, "Who": who, "Operation": operation, "Info": "", "Version": "1.0.3", "Created": "", "Path": ""}))
                .unwrap()
                .into()
        }
        BodyChoice::State { serial, lineage, extra } => {
            let mut v = serde_json::json!({"version": 4, "outputs": {"x": extra}});
            if let Some(s) = serial {
                v["serial"] = s.into();
            }
            if let Some(l) = lineage {
                v["lineage"] = l.into();
            }
            serde_json::to_vec_pretty(&v).unwrap().into()
        }
    };
    let mut headers = HeaderMap::new();
    for (name, value) in input.headers.iter().take(8) {
        let name = match name {
            HeaderChoice::ContentMd5 => HeaderName::from_static("content-md5"),
            HeaderChoice::ContentType => http::header::CONTENT_TYPE,
            HeaderChoice::Other(n) => match HeaderName::from_bytes(n.as_bytes()) {
                Ok(n) => n,
                Err(_) => continue,
            },
        };
        if let Ok(v) = HeaderValue::from_bytes(value) {
            headers.append(name, v);
        }
    }
    if input.true_md5 {
        headers.insert("content-md5", HeaderValue::from_str(&content_md5(&body)).unwrap());
    }

    match protocol::decode(&method, &path, input.query, &headers, body.clone()) {
        Err(e) => {
            let status = Error::from(e).into_response().status();
            assert!(status.is_client_error(), "a decoding error must be a 4xx, got {status}");
        }
        // `/states` lists a branch: it names no state.
        Ok(req) if matches!(req.op, Operation::ListStates { .. }) => {
            assert!(req.target.path.is_empty(), "a listing names no state: {:?}", req.target.path)
        }
        Ok(req) => {
            let p = &req.target.path;
            assert!(protocol::path::check_state_path(p).is_ok(), "accepted path {p:?} fails its own check");
            // The lock of the state is the branch `locks/<path>`: git must accept the name.
            let lock_ref = format!("refs/heads/locks/{p}");
            assert!(
                gix::validate::reference::name(lock_ref.as_str().into()).is_ok(),
                "accepted path {p:?} makes an invalid ref {lock_ref:?}"
            );
            // The state is the file `<path>` in a tree: no empty, `.`, `..` or `.git` component.
            for c in p.split('/') {
                assert!(
                    !c.is_empty() && c != "." && c != ".." && !c.eq_ignore_ascii_case(".git"),
                    "accepted path {p:?} has component {c:?}"
                );
            }
            assert!(!p.ends_with(".lock"), "accepted path {p:?} collides with the lock file name");
            if let Some(b) = &req.target.branch {
                let r = format!("refs/heads/{b}");
                assert!(gix::validate::reference::name(r.as_str().into()).is_ok(), "accepted branch {b:?}");
            }
            match &req.op {
                Operation::PutState { body: checked, .. } => {
                    let stored = checked.bytes();
                    assert_eq!(stored, &body);
                    let v: serde_json::Value = serde_json::from_slice(stored).expect("an accepted state is JSON");
                    assert!(v.is_object(), "an accepted state is a JSON object");
                    if let Some(md5) = headers.get("content-md5") {
                        assert_eq!(
                            md5.to_str().unwrap().trim(),
                            content_md5(stored),
                            "accepted with a wrong Content-MD5"
                        );
                    }
                }
                Operation::Lock(info) => {
                    assert!(
                        !info.id.trim().is_empty() && !info.id.chars().any(char::is_control),
                        "lock ID {:?}",
                        info.id
                    );
                    assert_eq!(info.raw, body);
                }
                Operation::Unlock { id: Some(id) } => assert!(!id.trim().is_empty(), "unlock ID {id:?}"),
                _ => {}
            }
            let _ = protocol::encode(gitstate::backend::Outcome::State(body));
        }
    }
});
