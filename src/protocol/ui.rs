//! The web view's requests: `/ui/...` (after an optional stage segment) decoded into the page
//! to render and the backend operation it needs; the force-unlock form and its CSRF check
//! (a double-submit cookie, see [`check_form_origin`]).

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, Method};
use subtle::ConstantTimeEq;

use super::Target;
use super::{after_param, limit_param, query_params, scope, state_path, BackendRequest, Params, ProtocolError};
use crate::backend::LockInfo;
use crate::backend::Operation;
use crate::storage::RepoUrl;

/// The cookie that holds the CSRF token of the force-unlock form.
pub const CSRF_COOKIE: &str = "gitstate_csrf";
/// The largest form body accepted (a lock ID and a token).
pub const MAX_FORM_BYTES: usize = 16 << 10;
/// States listed per page unless `limit` says otherwise, and at most.
const DEFAULT_STATES_PAGE: usize = 100;
const MAX_STATES_PAGE: usize = 500;
/// Versions of history per page unless `limit` says otherwise, and at most.
const DEFAULT_HISTORY_PAGE: usize = 20;
const MAX_HISTORY_PAGE: usize = 200;
/// The API's first path segments: before `ui`, any other segment is a stage.
const API_SEGMENTS: [&str; 6] = ["state", "lock", "history", "diff", "restore", "states"];

/// Which page a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Page {
    /// `/ui/`: the states of the branch.
    States,
    /// `/ui/state/<path>`: one state, its lock and its history.
    State,
    /// `/ui/diff/<path>?from=&to=`.
    Diff { from: gix::ObjectId, to: gix::ObjectId },
    /// `/ui/download/<path>`: the state's bytes as a file.
    Download,
    /// `POST /ui/unlock/<path>`: the force-unlock form.
    Unlock,
    /// `/ui/style.css`.
    Stylesheet,
    /// `/ui` without its slash: sent on to `ui/`.
    ToRoot,
}

/// A decoded request of the web view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UiRequest {
    pub page: Page,
    /// What the page needs from the backend (`None` for the stylesheet and the redirect).
    pub request: Option<BackendRequest>,
    /// The `ref` and `repository` of the request, carried into every link.
    pub repository: Option<RepoUrl>,
    pub branch: Option<String>,
    /// The way from this page's URL to the web view's root, relative (`../../`): links work
    /// under any stage prefix, whether the entry point kept it in the path or not.
    pub root: String,
    /// The CSRF token the browser already holds in its cookie, when well-formed.
    pub csrf: Option<String>,
    /// Whether the browser reached us over HTTPS (API Gateway says so in `X-Forwarded-Proto`):
    /// the cookie is then `Secure`.
    pub https: bool,
}

/// The part of `path` after the web view's `ui` segment (`""`, `"/"`, `"/state/x"`) when the
/// request is for the web view: `ui` is the first segment, or the second after a stage. A first
/// segment of the API (`/state/ui`) keeps the request in the API.
pub fn ui_rest(path: &str) -> Option<&str> {
    let trimmed = path.strip_prefix('/').unwrap_or(path);
    let (first, rest) = trimmed.split_once('/').unwrap_or((trimmed, ""));
    if first == "ui" {
        return Some(&trimmed[2..]);
    }
    if API_SEGMENTS.contains(&first) {
        return None;
    }
    let (second, _) = rest.split_once('/').unwrap_or((rest, ""));
    (second == "ui").then(|| &rest[2..])
}

/// The relative way from the page at `rest` (see [`ui_rest`]) to the web view's root.
pub fn root_of(rest: &str) -> String {
    match rest.strip_prefix('/') {
        Some(inner) => "../".repeat(inner.matches('/').count()),
        // `/ui` itself: its directory is the stage's.
        None => "ui/".into(),
    }
}

/// Decode a request of the web view. `rest` is [`ui_rest`] of its path.
pub fn decode(
    method: &Method,
    rest: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<UiRequest, ProtocolError> {
    let params = Params::parse(query)?;
    let (repository, branch) = scope(&params)?;
    let mut ui = UiRequest {
        page: Page::ToRoot,
        request: None,
        repository,
        branch,
        root: root_of(rest),
        csrf: csrf_cookie(headers),
        https: headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("https")),
    };
    let Some(inner) = rest.strip_prefix('/') else {
        only(method, "GET")?;
        return Ok(ui);
    };
    let (head, raw_path) = inner.split_once('/').unwrap_or((inner, ""));
    let (page, wanted) = page_of(head, raw_path, method, &params, headers, &body, ui.csrf.as_deref())?;
    ui.page = page;
    if let Some((raw, op)) = wanted {
        let path = raw.map(state_path).transpose()?.unwrap_or_default();
        let target = Target { repository: ui.repository.clone(), branch: ui.branch.clone(), path };
        ui.request = Some(BackendRequest { target, op });
    }
    Ok(ui)
}

/// An operation a page needs, with the raw path of its state (`None`: the listing, which has no state).
type Wanted<'a> = (Option<&'a str>, Operation);

/// The page `head` names, and the operation it needs.
fn page_of<'a>(
    head: &str,
    raw_path: &'a str,
    method: &Method,
    params: &Params,
    headers: &HeaderMap,
    body: &Bytes,
    csrf: Option<&str>,
) -> Result<(Page, Option<Wanted<'a>>), ProtocolError> {
    Ok(match head {
        "" if raw_path.is_empty() => {
            only(method, "GET")?;
            let op = Operation::ListStates {
                limit: limit_param(params.get("limit"), DEFAULT_STATES_PAGE, MAX_STATES_PAGE)?,
                after: after_param(params.get("after"))?,
            };
            (Page::States, Some((None, op)))
        }
        "style.css" if raw_path.is_empty() => {
            only(method, "GET")?;
            (Page::Stylesheet, None)
        }
        "state" => {
            only(method, "GET")?;
            let before = params.commit("before")?;
            let history = limit_param(params.get("limit"), DEFAULT_HISTORY_PAGE, MAX_HISTORY_PAGE)?;
            (Page::State, Some((Some(raw_path), Operation::ViewState { history, before })))
        }
        "diff" => {
            only(method, "GET")?;
            let (from, to) = (params.required_commit("from")?, params.required_commit("to")?);
            (Page::Diff { from, to }, Some((Some(raw_path), Operation::Compare { from, to })))
        }
        "download" => {
            only(method, "GET")?;
            (Page::Download, Some((Some(raw_path), Operation::GetState)))
        }
        "unlock" => {
            only(method, "POST")?;
            state_path(raw_path)?;
            let id = check_form_origin(headers, body, csrf)?;
            (Page::Unlock, Some((Some(raw_path), Operation::ForceUnlock { id, by: None })))
        }
        _ => return Err(ProtocolError::NotFound("no such page of the web view".into())),
    })
}

fn only(method: &Method, allowed: &'static str) -> Result<(), ProtocolError> {
    if method.as_str() == allowed {
        return Ok(());
    }
    Err(ProtocolError::MethodNotAllowed { method: method.as_str().chars().take(32).collect(), allow: allowed })
}

/// The force-unlock form's lock ID, once the form is shown to come from our own page.
///
/// CSRF: a double-submit cookie. The page with the form sets a random token in a cookie
/// (`HttpOnly`, `SameSite=Strict`) and repeats it in a hidden field; a form posted from another
/// site cannot read the cookie to repeat it, and a strict same-site cookie is not even sent with
/// it. No server-side secret is needed, so every Lambda instance checks every form. Browsers
/// that say where a request comes from (`Sec-Fetch-Site`, `Origin`) must say it is this site.
/// The lock ID typed back is a second proof: another site does not know it.
pub fn check_form_origin(headers: &HeaderMap, body: &[u8], cookie: Option<&str>) -> Result<String, ProtocolError> {
    let refused =
        |why: &str| ProtocolError::Forbidden(format!("the form was refused: {why}; reload the page and try again"));
    if let Some(site) = headers.get("sec-fetch-site") {
        if site.as_bytes() != b"same-origin" {
            return Err(refused("it was not sent from this site"));
        }
    }
    if let (Some(origin), Some(host)) = (headers.get(http::header::ORIGIN), headers.get(http::header::HOST)) {
        let origin = origin.to_str().unwrap_or_default();
        let origin_host = origin.split_once("://").map_or("", |(_, h)| h);
        if !origin_host.as_bytes().eq_ignore_ascii_case(host.as_bytes()) {
            return Err(refused("it was not sent from this site"));
        }
    }
    let text = std::str::from_utf8(body).map_err(|_| ProtocolError::BadRequest("the form is not UTF-8".into()))?;
    let fields = query_params(text)?;
    let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let (Some(sent), Some(held)) = (field("csrf"), cookie) else {
        return Err(refused("its token is missing"));
    };
    if !bool::from(sent.as_bytes().ct_eq(held.as_bytes())) {
        return Err(refused("its token does not match"));
    }
    let id = field("lock_id").map(str::trim).unwrap_or_default();
    if id.is_empty() {
        return Err(ProtocolError::BadRequest("type the lock's ID to force-unlock it".into()));
    }
    LockInfo::check_id(id)?;
    Ok(id.to_owned())
}

/// The CSRF token of the request's cookie, when it has the form of one.
fn csrf_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == CSRF_COOKIE)
        .map(|(_, value)| value.to_owned())
        .filter(|token| is_token(token))
}

fn is_token(token: &str) -> bool {
    token.len() == 43 && token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A fresh CSRF token: 32 random bytes from the operating system, base64url.
pub fn new_csrf_token() -> String {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).expect("the operating system's random numbers");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The `Set-Cookie` value that hands `token` to the browser.
pub fn csrf_set_cookie(token: &str, https: bool) -> String {
    let secure = if https { "; Secure" } else { "" };
    format!("{CSRF_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict{secure}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_web_view_is_told_from_a_stage() {
        assert_eq!(ui_rest("/ui"), Some(""));
        assert_eq!(ui_rest("/ui/"), Some("/"));
        assert_eq!(ui_rest("/ui/state/a/b"), Some("/state/a/b"));
        assert_eq!(ui_rest("/prod/ui/state/a"), Some("/state/a"));
        assert_eq!(ui_rest("/prod/ui"), Some(""));
        // The API keeps its addresses, a state path named `ui` included.
        for api in
            ["/state/ui", "/state/ui/x", "/prod/state/ui/x", "/lock/ui", "/states", "/prod/state/x", "/uix/state/a"]
        {
            assert_eq!(ui_rest(api), None, "{api}");
        }
        assert_eq!(root_of("/"), "");
        assert_eq!(root_of("/state/a"), "../");
        assert_eq!(root_of("/state/envs/prod.tfstate"), "../../");
        assert_eq!(root_of(""), "ui/");
    }

    fn form_headers(cookie: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::COOKIE, format!("other=1; {CSRF_COOKIE}={cookie}").parse().unwrap());
        h.insert(http::header::HOST, "127.0.0.1:6061".parse().unwrap());
        h
    }

    #[test]
    fn pages_decode_with_bounds() {
        let get = |rest: &str, q: &str| decode(&Method::GET, rest, Some(q), &HeaderMap::new(), Bytes::new());
        let r = get("/", "").unwrap();
        assert_eq!(r.page, Page::States);
        assert_eq!(r.request.unwrap().op, Operation::ListStates { limit: 100, after: None });
        let r = get("/state/envs/prod.tfstate", "ref=dev&limit=5").unwrap();
        assert_eq!((r.root.as_str(), r.branch.as_deref()), ("../../", Some("dev")));
        assert_eq!(r.request.unwrap().op, Operation::ViewState { history: 5, before: None });
        for (rest, q) in [
            ("/", "limit=0"),
            ("/", "limit=501"),
            ("/", "after=../x"),
            ("/state/a", "limit=201"),
            ("/state/a", "before=xyz"),
            ("/diff/a", "from=0123456789abcdef0123456789abcdef01234567"),
            ("/state/../x", ""),
            ("/state/a", "ref=locks/x"),
        ] {
            assert!(matches!(get(rest, q), Err(ProtocolError::BadRequest(_))), "{rest}?{q}");
        }
        assert!(matches!(get("/nope", ""), Err(ProtocolError::NotFound(_))));
        assert!(matches!(
            decode(&Method::POST, "/state/a", None, &HeaderMap::new(), Bytes::new()),
            Err(ProtocolError::MethodNotAllowed { .. })
        ));
        assert!(matches!(get("/unlock/a", ""), Err(ProtocolError::MethodNotAllowed { .. })));
    }

    #[test]
    fn force_unlock_needs_the_cookie_token_and_the_lock_id() {
        let token = new_csrf_token();
        assert!(is_token(&token));
        let post = |headers: &HeaderMap, body: &str| {
            decode(&Method::POST, "/unlock/a", None, headers, Bytes::from(body.to_owned()))
                .map(|r| r.request.unwrap().op)
        };
        let h = form_headers(&token);
        assert_eq!(
            post(&h, &format!("csrf={token}&lock_id=abc")).unwrap(),
            Operation::ForceUnlock { id: "abc".into(), by: None }
        );
        assert!(matches!(post(&h, "csrf=x&lock_id=abc"), Err(ProtocolError::Forbidden(_))));
        assert!(matches!(post(&h, "lock_id=abc"), Err(ProtocolError::Forbidden(_))));
        assert!(matches!(
            post(&HeaderMap::new(), &format!("csrf={token}&lock_id=abc")),
            Err(ProtocolError::Forbidden(_))
        ));
        assert!(matches!(post(&h, &format!("csrf={token}&lock_id=")), Err(ProtocolError::BadRequest(_))));
        let mut cross = h.clone();
        cross.insert("sec-fetch-site", "cross-site".parse().unwrap());
        assert!(matches!(post(&cross, &format!("csrf={token}&lock_id=abc")), Err(ProtocolError::Forbidden(_))));
        let mut other = h.clone();
        other.insert(http::header::ORIGIN, "http://evil.example".parse().unwrap());
        assert!(matches!(post(&other, &format!("csrf={token}&lock_id=abc")), Err(ProtocolError::Forbidden(_))));
        let mut same = h;
        same.insert(http::header::ORIGIN, "http://127.0.0.1:6061".parse().unwrap());
        same.insert("sec-fetch-site", "same-origin".parse().unwrap());
        assert!(post(&same, &format!("csrf={token}&lock_id=abc")).is_ok());
        assert!(csrf_set_cookie(&token, true).ends_with("SameSite=Strict; Secure"));
    }
}
