//! The HTTP face of the backend: decodes a request (method, path, query,
//! headers, body) into a [`BackendRequest`] and encodes outcomes into responses.
//! It checks the form of what arrives; the rules about states and locks live in `backend`.

pub(crate) mod path;
pub mod ui;

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use md5::{Digest, Md5};
use percent_encoding::percent_decode_str;

use crate::backend::{LockInfo, LockInfoError, Operation, Outcome, StateBody, MAX_LOCK_INFO_BYTES};
use crate::storage::RepoUrl;

/// Which state (or lock) a request is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `repository` query parameter, if given, parsed into its canonical form.
    pub repository: Option<RepoUrl>,
    /// `ref` query parameter, if given (already validated as a branch name).
    pub branch: Option<String>,
    /// The validated state path.
    pub path: String,
}

/// A decoded backend request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendRequest {
    pub target: Target,
    pub op: Operation,
}

/// Parse a caller's LockInfo body ([`LockInfo::parse`] holds the rules).
pub fn parse_lock_info(raw: Bytes) -> Result<LockInfo, ProtocolError> {
    LockInfo::parse(raw).map_err(ProtocolError::from)
}

impl From<LockInfoError> for ProtocolError {
    fn from(e: LockInfoError) -> Self {
        match e {
            LockInfoError::TooLarge => ProtocolError::PayloadTooLarge { limit: MAX_LOCK_INFO_BYTES },
            other => ProtocolError::BadRequest(other.to_string()),
        }
    }
}

/// Requests whose form is wrong. Statuses are assigned in `crate::error`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("{0}")]
    BadRequest(String),
    #[error("no such address: {0}")]
    NotFound(String),
    #[error("method {method} is not allowed here")]
    MethodNotAllowed { method: String, allow: &'static str },
    #[error("the body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// A form that did not come from the web view's own page (its CSRF check failed).
    #[error("{0}")]
    Forbidden(String),
}

/// States a `/states` page lists unless `limit` says otherwise, and at most.
pub(crate) const DEFAULT_STATES_PAGE: usize = 100;
pub(crate) const MAX_STATES_PAGE: usize = 1000;

/// Versions a history page lists unless `limit` says otherwise, and at most.
const DEFAULT_HISTORY_PAGE: usize = 50;
const MAX_HISTORY_PAGE: usize = 500;

/// A commit id as a query parameter: 40 lowercase or uppercase hex digits (SHA-1 repositories).
pub(crate) fn parse_commit(name: &str, value: &str) -> Result<gix::ObjectId, ProtocolError> {
    if value.len() != 40 || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ProtocolError::BadRequest(format!("`{name}` must be a commit id of 40 hex digits")));
    }
    gix::ObjectId::from_hex(value.to_ascii_lowercase().as_bytes())
        .map_err(|_| ProtocolError::BadRequest(format!("`{name}` must be a commit id of 40 hex digits")))
}

/// The methods both kinds of address answer.
const METHODS: &str = "GET, POST, DELETE, LOCK, UNLOCK";

/// What an address names.
enum Address {
    /// `/states`: the listing of a branch (no path).
    States,
    State,
    Lock,
    History,
    Diff,
    Restore,
}

/// Decode one HTTP request. `path` is the request path as received (a stage prefix is ignored).
pub fn decode(
    method: &Method,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<BackendRequest, ProtocolError> {
    let params = Params::parse(query)?;
    let (address, raw_path) = route(path, &|name| params.get(name))?;
    let target = target(&address, &raw_path, &params)?;
    // Read on every request, whether its operation uses them or not: nothing sent goes unchecked.
    let (lock_id, force) = (params.lock_id()?, params.force()?);
    let op = operation(address, method, &params, headers, body, Extra { lock_id, force })?;
    Ok(BackendRequest { target, op })
}

/// The query parameters of one request, decoded once (for the API and the web view alike).
pub(crate) struct Params(Vec<(String, String)>);

impl Params {
    pub(crate) fn parse(query: Option<&str>) -> Result<Self, ProtocolError> {
        Ok(Params(query_params(query.unwrap_or(""))?))
    }

    pub(crate) fn get(&self, name: &str) -> Option<String> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    /// A parameter given with a value (an empty one counts as absent).
    fn given(&self, name: &str) -> Option<String> {
        self.get(name).filter(|v| !v.is_empty())
    }

    pub(crate) fn commit(&self, name: &str) -> Result<Option<gix::ObjectId>, ProtocolError> {
        self.given(name).map(|v| parse_commit(name, &v)).transpose()
    }

    pub(crate) fn required_commit(&self, name: &str) -> Result<gix::ObjectId, ProtocolError> {
        self.commit(name)?.ok_or_else(|| ProtocolError::BadRequest(format!("`{name}` (a commit id) is required")))
    }

    fn force(&self) -> Result<bool, ProtocolError> {
        match self.get("force").as_deref() {
            None | Some("false") | Some("0") => Ok(false),
            Some("true") | Some("1") => Ok(true),
            Some(_) => Err(ProtocolError::BadRequest("`force` must be true or false".into())),
        }
    }

    fn lock_id(&self) -> Result<Option<String>, ProtocolError> {
        let id = self.given("ID");
        if let Some(id) = &id {
            LockInfo::check_id(id)?;
        }
        Ok(id)
    }
}

/// Which state, on which branch of which repository.
fn target(address: &Address, raw_path: &str, params: &Params) -> Result<Target, ProtocolError> {
    let path = match address {
        Address::States => String::new(),
        _ => state_path(raw_path)?,
    };
    let (repository, branch) = scope(params)?;
    Ok(Target { repository, branch, path })
}

/// The state path of an address, decoded and checked.
pub(crate) fn state_path(raw: &str) -> Result<String, ProtocolError> {
    let path = decode_path(raw)?;
    path::check_state_path(&path).map_err(ProtocolError::BadRequest)?;
    Ok(path)
}

/// The `repository` and `ref` parameters, checked: which repository, which branch.
pub(crate) fn scope(params: &Params) -> Result<(Option<RepoUrl>, Option<String>), ProtocolError> {
    let branch = params.given("ref");
    if let Some(b) = &branch {
        path::check_branch(b).map_err(|why| ProtocolError::BadRequest(format!("the `ref` parameter: {why}")))?;
    }
    let repository = match params.given("repository") {
        Some(raw) => Some(RepoUrl::parse(&raw).map_err(|e| ProtocolError::BadRequest(e.to_string()))?),
        None => None,
    };
    Ok((repository, branch))
}

/// `?ID=` and `?force=`, read once.
struct Extra {
    lock_id: Option<String>,
    force: bool,
}

/// The operation `method` asks of `address`.
fn operation(
    address: Address,
    method: &Method,
    params: &Params,
    headers: &HeaderMap,
    body: Bytes,
    Extra { lock_id, force }: Extra,
) -> Result<Operation, ProtocolError> {
    let not_allowed =
        |allow| ProtocolError::MethodNotAllowed { method: method.as_str().chars().take(32).collect(), allow };
    Ok(match (address, method.as_str()) {
        (Address::States, "GET") => Operation::ListStates {
            limit: limit_param(params.get("limit"), DEFAULT_STATES_PAGE, MAX_STATES_PAGE)?,
            after: after_param(params.get("after"))?,
        },
        (Address::State, "GET") => match params.commit("version")? {
            Some(commit) => Operation::GetVersion { commit },
            None => Operation::GetState,
        },
        (Address::History, "GET") => {
            let limit = match params.get("limit") {
                None => DEFAULT_HISTORY_PAGE,
                Some(l) => l.parse::<usize>().ok().filter(|n| (1..=MAX_HISTORY_PAGE).contains(n)).ok_or_else(|| {
                    ProtocolError::BadRequest(format!("`limit` must be from 1 to {MAX_HISTORY_PAGE}"))
                })?,
            };
            Operation::History { limit, before: params.commit("before")? }
        }
        (Address::Diff, "GET") => {
            Operation::Diff { from: params.required_commit("from")?, to: params.required_commit("to")? }
        }
        (Address::Restore, "POST") => Operation::Restore { commit: params.required_commit("version")?, lock_id, force },
        (Address::States | Address::History | Address::Diff, _) => return Err(not_allowed("GET")),
        (Address::Restore, _) => return Err(not_allowed("POST")),
        (Address::State, "POST" | "PUT") => {
            check_md5(headers, &body)?;
            let body = StateBody::check(body).map_err(|e| ProtocolError::BadRequest(e.to_string()))?;
            Operation::PutState { lock_id, body, force }
        }
        (Address::State, "DELETE") => Operation::DeleteState { lock_id },
        (Address::Lock, "GET") => Operation::GetLock,
        (_, "LOCK") | (Address::Lock, "POST" | "PUT") => Operation::Lock(parse_lock_info(body)?),
        (_, "UNLOCK") | (Address::Lock, "DELETE") => {
            if body.iter().all(u8::is_ascii_whitespace) {
                Operation::Unlock { id: None }
            } else {
                Operation::Unlock { id: Some(parse_lock_info(body)?.id) }
            }
        }
        (_, _) => return Err(not_allowed(METHODS)),
    })
}

/// Find `/state/` or `/lock/` (after an optional stage segment), or the terraform-backend-git query form.
fn route(path: &str, param: &dyn Fn(&str) -> Option<String>) -> Result<(Address, String), ProtocolError> {
    let trimmed = path.strip_prefix('/').unwrap_or(path);
    let segments: Vec<&str> = trimmed.splitn(3, '/').collect();
    for skip in 0..2 {
        let Some(head) = segments.get(skip) else { break };
        let kind = match *head {
            // The web view's prefix is never a stage: `/ui/state/x` is a page, not the state.
            "ui" => return Err(ProtocolError::NotFound("the web view lives under /ui/".into())),
            "states" if segments.len() == skip + 1 => Address::States,
            "state" => Address::State,
            "lock" => Address::Lock,
            "history" => Address::History,
            "diff" => Address::Diff,
            "restore" => Address::Restore,
            _ => continue,
        };
        let rest = segments[skip + 1..].join("/");
        return Ok((kind, rest));
    }
    // terraform-backend-git: `/?type=git&repository=..&ref=..&state=<path>`, perhaps under a stage.
    let only_stage = segments.iter().filter(|s| !s.is_empty()).count() <= 1;
    if only_stage && param("type").as_deref() == Some("git") {
        if let Some(state) = param("state") {
            return Ok((Address::State, state));
        }
        return Err(ProtocolError::BadRequest("`type=git` needs a `state` parameter".into()));
    }
    Err(ProtocolError::NotFound(
        "use /state/<path>, /lock/<path>, /history/<path>, /diff/<path> or /restore/<path>".into(),
    ))
}

/// The query's parameters, decoded as `application/x-www-form-urlencoded`. A name or value
/// that is not UTF-8 once decoded is refused, never read with U+FFFD in its place (the `ID`
/// compared with a lock's would then be another string than the one sent).
pub(crate) fn query_params(query: &str) -> Result<Vec<(String, String)>, ProtocolError> {
    let decode = |raw: &str| {
        percent_decode_str(&raw.replace('+', " ")).decode_utf8().map(std::borrow::Cow::into_owned).map_err(|_| {
            let name: String = raw.chars().take(32).collect();
            ProtocolError::BadRequest(format!("the query parameter {:?} is not valid UTF-8", name.escape_debug()))
        })
    };
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let name = decode(name)?;
            let value = decode(value).map_err(|_| {
                ProtocolError::BadRequest(format!(
                    "the query parameter `{}` is not valid UTF-8",
                    name.chars().take(32).collect::<String>().escape_debug()
                ))
            })?;
            Ok((name, value))
        })
        .collect()
}

pub(crate) fn decode_path(raw: &str) -> Result<String, ProtocolError> {
    percent_decode_str(raw)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| ProtocolError::BadRequest("the state path is not valid UTF-8".into()))
}

fn check_md5(headers: &HeaderMap, body: &[u8]) -> Result<(), ProtocolError> {
    let Some(value) = headers.get("content-md5") else { return Ok(()) };
    let sent = value
        .to_str()
        .ok()
        .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v.trim()).ok())
        .ok_or_else(|| ProtocolError::BadRequest("the Content-MD5 header is not base64".into()))?;
    if sent.as_slice() != Md5::digest(body).as_slice() {
        return Err(ProtocolError::BadRequest("the Content-MD5 header does not match the body".into()));
    }
    Ok(())
}

/// Base64 MD5 of `body`, as Terraform sends and checks it.
pub fn content_md5(body: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Md5::digest(body))
}

fn to_json(value: &impl serde::Serialize) -> Bytes {
    let mut body = serde_json::to_vec_pretty(value).expect("our own documents serialize");
    body.push(b'\n');
    Bytes::from(body)
}

/// A page size parameter: `default` when absent, else 1 to `max`.
pub(crate) fn limit_param(value: Option<String>, default: usize, max: usize) -> Result<usize, ProtocolError> {
    match value.filter(|v| !v.is_empty()) {
        None => Ok(default),
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| ProtocolError::BadRequest(format!("`limit` must be from 1 to {max}"))),
    }
}

/// A listing cursor: the path of the last state of the previous page.
pub(crate) fn after_param(value: Option<String>) -> Result<Option<String>, ProtocolError> {
    match value.filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(after) => {
            path::check_state_path(&after)
                .map_err(|why| ProtocolError::BadRequest(format!("`after` must be a state path: {why}")))?;
            Ok(Some(after))
        }
    }
}

/// Encode a successful outcome.
pub fn encode(outcome: Outcome) -> http::Response<Bytes> {
    let mut b = http::Response::builder();
    let body = match outcome {
        Outcome::State(body) => {
            b = b
                .status(StatusCode::OK)
                .header(http::header::CONTENT_TYPE, "application/json")
                .header("content-md5", content_md5(&body));
            body
        }
        Outcome::NoState => {
            b = b.status(StatusCode::NO_CONTENT);
            Bytes::new()
        }
        Outcome::LockInfo(body) => {
            b = b.status(StatusCode::OK).header(http::header::CONTENT_TYPE, "application/json");
            body
        }
        Outcome::Json(body) => {
            b = b.status(StatusCode::OK).header(http::header::CONTENT_TYPE, "application/json");
            body
        }
        Outcome::Done => {
            b = b.status(StatusCode::OK);
            Bytes::new()
        }
        Outcome::States(list) => {
            b = b.status(StatusCode::OK).header(http::header::CONTENT_TYPE, "application/json");
            to_json(&list)
        }
        Outcome::StateView(view) => {
            b = b.status(StatusCode::OK).header(http::header::CONTENT_TYPE, "application/json");
            to_json(&view)
        }
        Outcome::Comparison(comparison) => {
            b = b.status(StatusCode::OK).header(http::header::CONTENT_TYPE, "application/json");
            to_json(&comparison)
        }
    };
    b.body(body).expect("static response parts are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, path: &str, query: Option<&str>, body: &str) -> Result<BackendRequest, ProtocolError> {
        decode(
            &Method::from_bytes(method.as_bytes()).unwrap(),
            path,
            query,
            &HeaderMap::new(),
            Bytes::from(body.to_string()),
        )
    }

    #[test]
    fn routes_state_lock_stage_and_compat_addresses() {
        let r = req("GET", "/state/envs/prod/terraform.tfstate", None, "").unwrap();
        assert_eq!(r.target.path, "envs/prod/terraform.tfstate");
        assert_eq!(r.op, Operation::GetState);
        let r = req("GET", "/prod/state/a.tfstate", Some("ref=states"), "").unwrap();
        assert_eq!(r.target.path, "a.tfstate");
        assert_eq!(r.target.branch.as_deref(), Some("states"));
        let r = req("GET", "/lock/a", None, "").unwrap();
        assert_eq!(r.op, Operation::GetLock);
        let r =
            req("GET", "/", Some("type=git&repository=git%3A%2F%2Fh%2Fr&ref=main&state=x%2Fy.tfstate"), "").unwrap();
        assert_eq!(r.target.path, "x/y.tfstate");
        assert_eq!(r.target.repository.map(|u| u.to_string()).as_deref(), Some("git://h/r"));
        assert!(matches!(req("GET", "/other/x", None, ""), Err(ProtocolError::NotFound(_))));
    }

    #[test]
    fn history_version_diff_and_restore_forms() {
        let c = "0123456789abcdef0123456789abcdef01234567";
        let id = gix::ObjectId::from_hex(c.as_bytes()).unwrap();
        assert_eq!(req("GET", "/history/a", None, "").unwrap().op, Operation::History { limit: 50, before: None });
        let q = format!("limit=500&before={}", c.to_uppercase());
        assert_eq!(
            req("GET", "/history/a", Some(&q), "").unwrap().op,
            Operation::History { limit: 500, before: Some(id) }
        );
        let q = format!("version={c}");
        assert_eq!(req("GET", "/state/a", Some(&q), "").unwrap().op, Operation::GetVersion { commit: id });
        let q = format!("from={c}&to={c}");
        assert_eq!(req("GET", "/diff/a", Some(&q), "").unwrap().op, Operation::Diff { from: id, to: id });
        let q = format!("version={c}&ID=l");
        assert_eq!(
            req("POST", "/restore/a", Some(&q), "").unwrap().op,
            Operation::Restore { commit: id, lock_id: Some("l".into()), force: false }
        );
        for (m, p, q) in [
            ("GET", "/history/a", "limit=0"),
            ("GET", "/history/a", "limit=501"),
            ("GET", "/history/a", "limit=x"),
            ("GET", "/history/a", "before=abc"),
            ("GET", "/state/a", "version=0123"),
            ("GET", "/state/a", "version=g123456789abcdef0123456789abcdef01234567"),
            ("GET", "/diff/a", "from=0123456789abcdef0123456789abcdef01234567"),
            ("POST", "/restore/a", ""),
        ] {
            assert!(matches!(req(m, p, Some(q), ""), Err(ProtocolError::BadRequest(_))), "{m} {p}?{q}");
        }
        assert!(matches!(req("POST", "/history/a", None, ""), Err(ProtocolError::MethodNotAllowed { .. })));
        assert!(matches!(req("GET", "/restore/a", None, ""), Err(ProtocolError::MethodNotAllowed { .. })));
    }

    #[test]
    fn lock_and_unlock_forms() {
        let info = r#"{"ID":"abc","Operation":"OperationTypeApply","Who":"me@host","Version":"1.0.3","Created":"","Path":"","Info":""}"#;
        for (m, p) in [("LOCK", "/state/a"), ("POST", "/lock/a"), ("LOCK", "/lock/a")] {
            match req(m, p, None, info).unwrap().op {
                Operation::Lock(l) => assert_eq!((l.id.as_str(), l.who.as_str()), ("abc", "me@host")),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(req("UNLOCK", "/state/a", None, info).unwrap().op, Operation::Unlock { id: Some("abc".into()) });
        assert_eq!(req("DELETE", "/lock/a", None, "").unwrap().op, Operation::Unlock { id: None });
        assert_eq!(
            req("UNLOCK", "/state/a", None, r#"{"ID":"only"}"#).unwrap().op,
            Operation::Unlock { id: Some("only".into()) }
        );
        assert!(matches!(req("LOCK", "/state/a", None, "not json"), Err(ProtocolError::BadRequest(_))));
        assert!(matches!(req("LOCK", "/state/a", None, r#"{"ID":""}"#), Err(ProtocolError::BadRequest(_))));
        // Found by the fuzzer: arrays must not pass as LockInfo.
        assert!(matches!(req("LOCK", "/state/a", None, r#"["G"]"#), Err(ProtocolError::BadRequest(_))));
        assert!(matches!(req("UNLOCK", "/state/a", None, r#"["A"]"#), Err(ProtocolError::BadRequest(_))));
    }

    #[test]
    fn writes_check_json_and_md5() {
        let body = "{\"version\":4,\"serial\":1}\n";
        let r = req("POST", "/state/a", Some("ID=lock-1"), body).unwrap();
        assert_eq!(
            r.op,
            Operation::PutState {
                lock_id: Some("lock-1".into()),
                body: StateBody::check(Bytes::from(body)).unwrap(),
                force: false
            }
        );
        let r = req("POST", "/state/a", Some("force=true"), body).unwrap();
        assert!(matches!(r.op, Operation::PutState { force: true, .. }));
        assert!(matches!(req("POST", "/state/a", Some("force=maybe"), body), Err(ProtocolError::BadRequest(_))));
        for id in ["x%0Aforged", "x%0D", "%1B%5B31m", "%C2%9B", "%E2%80%A8"] {
            let q = format!("ID={id}");
            assert!(matches!(req("POST", "/state/a", Some(&q), body), Err(ProtocolError::BadRequest(_))), "{id}");
            assert!(matches!(req("DELETE", "/state/a", Some(&q), ""), Err(ProtocolError::BadRequest(_))), "{id}");
        }
        assert!(matches!(req("POST", "/state/a", None, "nope"), Err(ProtocolError::BadRequest(_))));
        assert!(matches!(req("POST", "/state/a", None, "[1]"), Err(ProtocolError::BadRequest(_))));
        let mut h = HeaderMap::new();
        h.insert("Content-Md5", content_md5(body.as_bytes()).parse().unwrap());
        assert!(decode(&Method::POST, "/state/a", None, &h, Bytes::from(body)).is_ok());
        h.insert("Content-Md5", content_md5(b"other").parse().unwrap());
        let e = decode(&Method::POST, "/state/a", None, &h, Bytes::from(body)).unwrap_err();
        assert!(e.to_string().contains("Content-MD5"));
    }

    #[test]
    fn refuses_bad_paths_and_methods() {
        for p in [
            "/state/../x",
            "/state/%2e%2e/x",
            "/state/a/.git/config",
            "/state/x.lock",
            "/state/",
            "/state/a%00b",
            "/state/a%20b",
        ] {
            assert!(matches!(req("GET", p, None, ""), Err(ProtocolError::BadRequest(_))), "{p}");
        }
        match req("PATCH", "/state/a", None, "") {
            Err(ProtocolError::MethodNotAllowed { allow, .. }) => assert!(allow.contains("LOCK")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(req("GET", "/state/a", Some("ref=..bad"), ""), Err(ProtocolError::BadRequest(_))));
    }
}
