//! The web view's pages: HTML rendered on the server from the backend's outcomes (maud
//! templates, every value escaped), one stylesheet from the binary, no script. Links are
//! relative, so the pages work under any stage prefix; every answer carries the same headers.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use maud::{html, Markup, DOCTYPE};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::backend::browse::{Lock, StateList, StateView};
use crate::backend::diff::{Change, Comparison};
use crate::backend::Outcome;
use crate::protocol::ui::{csrf_set_cookie, new_csrf_token, Page, UiRequest};

/// The stylesheet, served at `/ui/style.css`.
pub const STYLESHEET: &str = include_str!("style.css");

/// No script at all, styles only from us, forms only to us, never in a frame.
pub const CONTENT_SECURITY_POLICY: &str =
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// What is escaped in a path segment or a query value of a link.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// The answer to a page of the web view, from the outcome of its backend operation.
pub fn render(req: &UiRequest, outcome: Option<Outcome>) -> Response<Bytes> {
    let links = Links::new(req);
    let path = req.request.as_ref().map(|r| r.target.path.as_str()).unwrap_or_default();
    match (&req.page, outcome) {
        (Page::Stylesheet, _) => {
            respond(StatusCode::OK, "text/css; charset=utf-8", Bytes::from_static(STYLESHEET.as_bytes()))
        }
        (Page::ToRoot, _) => redirect(StatusCode::PERMANENT_REDIRECT, &format!("ui/{}", links.query(&[]))),
        (Page::States, Some(Outcome::States(list))) => html_page(states_page(&links, &list)),
        (Page::State, Some(Outcome::StateView(view))) => {
            let (token, fresh) = match &req.csrf {
                Some(token) => (token.clone(), false),
                None => (new_csrf_token(), true),
            };
            let mut response = html_page(state_page(&links, &view, &token));
            if fresh {
                if let Ok(cookie) = HeaderValue::from_str(&csrf_set_cookie(&token, req.https)) {
                    response.headers_mut().insert(header::SET_COOKIE, cookie);
                }
            }
            response
        }
        (Page::Diff { from, to }, Some(Outcome::Comparison(c))) => {
            html_page(diff_page(&links, path, &from.to_string(), &to.to_string(), &c))
        }
        (Page::Download, Some(Outcome::State(body))) => {
            let name = path.rsplit('/').next().unwrap_or("terraform.tfstate");
            let name: String =
                name.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
            let mut response = respond(StatusCode::OK, "application/json", body);
            if let Ok(value) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
                response.headers_mut().insert(header::CONTENT_DISPOSITION, value);
            }
            response
        }
        (Page::Download, Some(_)) => html_page(layout(
            &links,
            "No state",
            html! { h1 { "No state" } p { "No state is stored at " code { (path) } "." } },
        )),
        // Back to the state's page, which shows the lock gone (or who took it since).
        (Page::Unlock, Some(_)) => redirect(StatusCode::SEE_OTHER, &links.state(path, &[])),
        (_, _) => html_page(layout(&links, "Error", html! { h1 { "Nothing to show" } })),
    }
}

/// The web view's answer for a failed request: `failed` (the status, headers and text the
/// error table chose) as a page.
pub fn error_page(root: &str, failed: Response<Bytes>) -> Response<Bytes> {
    let (parts, body) = failed.into_parts();
    let links = Links { root: root.to_owned(), params: Vec::new() };
    let text = String::from_utf8_lossy(&body);
    let reason = parts.status.canonical_reason().unwrap_or("Error");
    let markup = layout(
        &links,
        reason,
        html! {
            h1 { (parts.status.as_u16()) " " (reason) }
            pre { (text.trim_end()) }
            p { a href=(links.states(&[])) { "Back to the states" } }
        },
    );
    let mut response = html_page(markup);
    *response.status_mut() = parts.status;
    for name in [header::WWW_AUTHENTICATE, header::RETRY_AFTER, header::ALLOW] {
        if let Some(value) = parts.headers.get(&name) {
            response.headers_mut().insert(name, value.clone());
        }
    }
    response
}

fn html_page(markup: Markup) -> Response<Bytes> {
    respond(StatusCode::OK, "text/html; charset=utf-8", Bytes::from(markup.into_string()))
}

fn redirect(status: StatusCode, location: &str) -> Response<Bytes> {
    let mut response = respond(status, "text/plain; charset=utf-8", Bytes::new());
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// Every answer of the web view: kept out of shared caches, never sniffed, framed or scripted.
fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Bytes> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "private, no-store")
        .header(header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY)
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(header::X_FRAME_OPTIONS, "DENY")
        // `same-origin`: no URL leaves for another site, and our own forms carry their `Origin`
        // (under `no-referrer` a browser sends `Origin: null`, which the CSRF check refuses).
        .header(header::REFERRER_POLICY, "same-origin")
        .body(body)
        .expect("static response parts are valid")
}

/// Links of one page: relative to the web view's root, carrying `ref` and `repository`.
struct Links {
    root: String,
    params: Vec<(&'static str, String)>,
}

impl Links {
    fn new(req: &UiRequest) -> Self {
        let mut params = Vec::new();
        if let Some(b) = &req.branch {
            params.push(("ref", b.clone()));
        }
        if let Some(r) = &req.repository {
            params.push(("repository", r.to_string()));
        }
        Links { root: req.root.clone(), params }
    }

    fn base(&self) -> &str {
        if self.root.is_empty() {
            "./"
        } else {
            &self.root
        }
    }

    fn query(&self, extra: &[(&str, &str)]) -> String {
        let pairs: Vec<String> = extra
            .iter()
            .map(|(k, v)| (*k, *v))
            .chain(self.params.iter().map(|(k, v)| (*k, v.as_str())))
            .map(|(k, v)| format!("{k}={}", utf8_percent_encode(v, COMPONENT)))
            .collect();
        if pairs.is_empty() {
            String::new()
        } else {
            format!("?{}", pairs.join("&"))
        }
    }

    fn page(&self, page: &str, path: &str, extra: &[(&str, &str)]) -> String {
        let path: Vec<String> = path.split('/').map(|s| utf8_percent_encode(s, COMPONENT).to_string()).collect();
        format!("{}{page}/{}{}", self.base(), path.join("/"), self.query(extra))
    }

    fn states(&self, extra: &[(&str, &str)]) -> String {
        format!("{}{}", self.base(), self.query(extra))
    }

    fn state(&self, path: &str, extra: &[(&str, &str)]) -> String {
        self.page("state", path, extra)
    }
}

fn layout(links: &Links, title: &str, content: Markup) -> Markup {
    let branch = links.params.iter().find(|(k, _)| *k == "ref").map(|(_, v)| v.as_str());
    let repository = links.params.iter().find(|(k, _)| *k == "repository").map(|(_, v)| v.as_str());
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · gitstate" }
                link rel="stylesheet" href=(format!("{}style.css", links.base()));
            }
            body {
                header {
                    a href=(links.states(&[])) { "gitstate" }
                    span.where {
                        @if let Some(r) = repository { (r) " · " }
                        @if let Some(b) = branch { "branch " (b) } @else { "default branch" }
                    }
                }
                main { (content) }
            }
        }
    }
}

fn states_page(links: &Links, list: &StateList) -> Markup {
    let now = now();
    let content = html! {
        h1 { "States on " code { (list.branch) } }
        @if list.locks_truncated {
            p.muted { "This repository has more lock branches than one page reads: some lock badges may be missing." }
        }
        @if list.states.is_empty() {
            p { "No state is stored on this page of the branch." }
        } @else {
            div.scroll { table.states {
                thead { tr { th { "State" } th.num { "Size" } th { "Encrypted" } th { "Lock" } } }
                tbody {
                    @for s in &list.states {
                        tr {
                            td { a href=(links.state(&s.path, &[])) { (s.path) } }
                            td.num { (size(s.size)) }
                            td { @if s.encrypted { span.badge.sealed { "encrypted" } } @else { span.muted { "no" } } }
                            td { (lock_badge(s.lock.as_ref(), now)) }
                        }
                    }
                }
            } }
        }
        nav.pages {
            @if let Some(next) = &list.next {
                a href=(links.states(&[("after", next)])) { "Next page →" }
            }
        }
        @if !list.other_locks.is_empty() {
            h2 { "Locks on paths without a state" }
            div.scroll { table {
                thead { tr { th { "Path" } th { "Lock" } } }
                tbody { @for l in &list.other_locks {
                    tr { td { a href=(links.state(&l.path, &[])) { (l.path) } } td { (lock_badge(Some(&l.lock), now)) } }
                } }
            } }
        }
    };
    layout(links, "States", content)
}

fn lock_badge(lock: Option<&Lock>, now: i64) -> Markup {
    html! {
        @match lock {
            Some(l) => span.badge.locked title=(format!("lock ID {}", l.id)) {
                "locked by " (or_unknown(&l.who)) " · " (operation(&l.operation)) " · " (age(now - l.since))
            },
            None => span.badge.free { "unlocked" },
        }
    }
}

fn state_page(links: &Links, view: &StateView, token: &str) -> Markup {
    let now = now();
    let path = view.path.as_str();
    let content = html! {
        h1 { (path) }
        @match &view.lock {
            Some(l) => div.panel.locked {
                strong { "Locked" } " for " (age(now - l.since)) " by " (or_unknown(&l.who))
                dl {
                    dt { "ID" } dd.mono { (l.id) }
                    dt { "Operation" } dd { (l.operation) }
                    dt { "Who" } dd { (l.who) }
                    dt { "Version" } dd { (l.version) }
                    dt { "Created" } dd { (l.created) }
                    @if !l.info.is_empty() { dt { "Info" } dd { (l.info) } }
                    dt { "Lock branch" } dd.mono { (l.reference) }
                }
                form.unlock method="post" action=(links.page("unlock", path, &[])) {
                    input type="hidden" name="csrf" value=(token);
                    label for="lock_id" { "Type the lock ID to force-unlock:" }
                    input type="text" id="lock_id" name="lock_id" autocomplete="off" required;
                    button type="submit" { "Force-unlock" }
                }
            },
            None => div.panel { span.badge.free { "unlocked" } " Nobody holds this state's lock." },
        }
        @match &view.stored {
            None => p { "No state is stored at this path now." },
            Some(s) => {
                dl {
                    dt { "Serial" } dd { (opt(s.serial)) }
                    dt { "Lineage" } dd.mono { (s.lineage.as_deref().unwrap_or("—")) }
                    dt { "Terraform" } dd { (s.terraform_version.as_deref().unwrap_or("—")) }
                    dt { "Size" } dd { (size(s.size)) }
                    dt { "Encrypted" } dd { @if s.encrypted { "yes, at rest" } @else { "no" } }
                    @if let Some(v) = &view.newest {
                        dt { "Last written" } dd { (when(v.time)) " by " (v.who.as_deref().unwrap_or("—")) " (" (v.operation.as_deref().map(operation).unwrap_or("no lock")) ")" }
                    }
                    dt { "Download" } dd { a href=(links.page("download", path, &[])) { "the state as stored" } @if s.encrypted { " (decrypted)" } }
                }
                @if s.encrypted_by_client {
                    p.muted { "The client encrypted this state (OpenTofu state encryption): its outputs and resources cannot be shown." }
                }
                h2 { "Outputs" }
                @if s.outputs.is_empty() { p.muted { "No outputs." } } @else {
                    div.scroll { table.outputs {
                        thead { tr { th { "Name" } th.wide { "Type" } th { "Value" } } }
                        tbody { @for o in &s.outputs {
                            tr {
                                td.mono { (o.name) }
                                td.mono.wide { (o.kind) }
                                @match &o.value {
                                    Some(v) => td.value { (v) },
                                    None => td.sensitive { "sensitive" },
                                }
                            }
                        } }
                    } }
                    @if s.outputs_more > 0 { p.muted { "and " (s.outputs_more) " more outputs" } }
                }
                h2 { "Resources" }
                @if s.resources.is_empty() { p.muted { "No resources." } } @else {
                    @for (module, groups) in by_module(&s.resources) {
                        h3 { @if module.is_empty() { "Root module" } @else { code { (module) } } }
                        div.scroll { table {
                            thead { tr { th { "Resource" } th.num { "Instances" } th.wide { "Provider" } } }
                            tbody { @for g in groups {
                                tr {
                                    td.mono { @if g.data { "data." } (g.kind) "." (g.name)
                                        @if !g.keys.is_empty() { br; span.muted { (g.keys.join(" ")) } } }
                                    td.num { (g.instances) }
                                    td.mono.wide { (g.provider) }
                                }
                            } }
                        } }
                    }
                    @if s.resources_more > 0 { p.muted { "and " (s.resources_more) " more resources" } }
                }
            },
        }
        h2 { "History" }
        @if view.history.is_empty() { p.muted { "No versions on this page." } } @else {
            div.scroll { table.history {
                thead { tr { th { "Version" } th { "When" } th.num { "Serial" } th { "Who" } th.wide { "Operation" } th { "Change" } } }
                tbody { @for (i, v) in view.history.iter().enumerate() {
                    @let previous = view.history.get(i + 1).map(|p| p.commit.as_str()).or(view.older.as_deref());
                    @let previous_deleted = view.history.get(i + 1).is_some_and(|p| p.deleted);
                    tr {
                        td.mono { (short(&v.commit)) }
                        td { (when(v.time)) }
                        td.num { (opt(v.serial)) }
                        td { (v.who.as_deref().unwrap_or("—")) }
                        td.wide { (v.operation.as_deref().map(operation).unwrap_or("—")) }
                        td {
                            @if v.deleted { "deleted" }
                            @else if let (Some(p), false) = (previous, previous_deleted) {
                                a href=(links.page("diff", path, &[("from", p), ("to", &v.commit)])) { "diff" }
                            } @else { span.muted { "first version" } }
                        }
                    }
                } }
            } }
        }
        nav.pages {
            @if let Some(next) = &view.history_next {
                a href=(links.state(path, &[("before", next)])) { "Older versions →" }
            }
        }
    };
    layout(links, path, content)
}

fn diff_page(links: &Links, path: &str, from: &str, to: &str, c: &Comparison) -> Markup {
    let content = html! {
        h1 { "What changed in " (path) }
        p {
            "From " code { (short(from)) } " (serial " (opt(c.from.serial)) ") to "
            code { (short(to)) } " (serial " (opt(c.to.serial)) "). "
            a href=(links.state(path, &[])) { "Back to the state" }
        }
        @if c.from.lineage != c.to.lineage { p.muted { "The two versions have different lineages." } }
        @if c.encrypted_by_client {
            p { "The client encrypted this state (OpenTofu state encryption): gitstate cannot see what changed inside." }
        } @else {
            h2 { "Outputs" }
            @if c.outputs.is_empty() { p.muted { "No output changed." } } @else {
                div.scroll { table.outputs {
                    thead { tr { th { "Output" } th { "Change" } th { "Before" } th { "After" } } }
                    tbody { @for o in &c.outputs {
                        tr class=(change_class(o.change)) {
                            td.mono { (o.name) }
                            td { (change_word(o.change)) }
                            (value_cell(o.sensitive, o.from.as_deref(), o.change == Change::Added))
                            (value_cell(o.sensitive, o.to.as_deref(), o.change == Change::Removed))
                        }
                    } }
                } }
            }
            h2 { "Resources" }
            @if c.resources.is_empty() { p.muted { "No resource changed." } } @else {
                div.scroll { table.resources {
                    thead { tr { th { "Resource" } th { "Change" } } }
                    tbody { @for r in &c.resources {
                        tr class=(change_class(r.change)) { td.mono { (r.address) } td { (change_word(r.change)) } }
                    } }
                } }
                @if c.resources_more > 0 { p.muted { "and " (c.resources_more) " more" } }
                @for r in c.resources.iter().filter(|r| r.change == Change::Changed) {
                    h3 { code { (r.address) } }
                    div.scroll { table.attributes {
                        thead { tr { th { "Attribute" } th { "Before" } th { "After" } } }
                        tbody { @for a in &r.attributes {
                            tr { td.mono { (a.name) } (value_cell(a.sensitive, a.from.as_deref(), false)) (value_cell(a.sensitive, a.to.as_deref(), false)) }
                        } }
                    } }
                }
            }
        }
    };
    layout(links, "Diff", content)
}

fn value_cell(sensitive: bool, value: Option<&str>, absent: bool) -> Markup {
    html! {
        @if sensitive { td.sensitive { "(sensitive)" } }
        @else if absent { td.muted { "—" } }
        @else { td.value { (value.unwrap_or("(none)")) } }
    }
}

fn change_class(change: Change) -> &'static str {
    match change {
        Change::Added => "added",
        Change::Removed => "removed",
        Change::Changed => "changed",
    }
}

fn change_word(change: Change) -> &'static str {
    match change {
        Change::Added => "added",
        Change::Removed => "removed",
        Change::Changed => "changed",
    }
}

/// Resource groups by module, in their (sorted) order.
fn by_module(
    groups: &[crate::backend::browse::ResourceGroup],
) -> Vec<(&str, Vec<&crate::backend::browse::ResourceGroup>)> {
    let mut out: Vec<(&str, Vec<_>)> = Vec::new();
    for g in groups {
        match out.last_mut() {
            Some((module, list)) if *module == g.module => list.push(g),
            _ => out.push((g.module.as_str(), vec![g])),
        }
    }
    out
}

fn or_unknown(s: &str) -> &str {
    if s.is_empty() {
        "(unknown)"
    } else {
        s
    }
}

/// `OperationTypeApply` as `apply`.
fn operation(op: &str) -> &str {
    let short = op.strip_prefix("OperationType").unwrap_or(op);
    if short.is_empty() {
        "(no operation)"
    } else {
        short
    }
}

fn opt(n: Option<u64>) -> String {
    n.map_or_else(|| "—".into(), |n| n.to_string())
}

fn short(commit: &str) -> &str {
    commit.get(..10).unwrap_or(commit)
}

fn size(bytes: u64) -> String {
    match bytes {
        0..=1023 => format!("{bytes} B"),
        1024..=1_048_575 => format!("{:.1} KiB", bytes as f64 / 1024.0),
        _ => format!("{:.1} MiB", bytes as f64 / 1_048_576.0),
    }
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// A duration in seconds as a person reads it.
fn age(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min", s / 60),
        3600..=86_399 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

/// Seconds since the epoch as `2026-12-03 06:10 UTC` (civil date from days, proleptic Gregorian).
fn when(time: i64) -> String {
    let days = time.div_euclid(86_400);
    let secs = time.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02} UTC", secs / 3600, secs % 3600 / 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_ages_and_sizes_read_well() {
        assert_eq!(when(0), "1970-01-01 00:00 UTC");
        assert_eq!(when(1_767_225_600), "2026-01-01 00:00 UTC");
        assert_eq!(when(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(age(59), "59 s");
        assert_eq!(age(3_700), "1 h 1 min");
        assert_eq!(age(-5), "0 s");
        assert_eq!(size(2048), "2.0 KiB");
        assert_eq!(operation("OperationTypeApply"), "Apply");
    }
}
