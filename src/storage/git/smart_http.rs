//! Smart HTTP without the advertisement round trip. The server answers each POST as a
//! fresh stateless process, so once receive-pack's capabilities are known a push is one
//! `POST /git-receive-pack` whose commands carry the expected old ids (a wrong guess is
//! rejected, never applied), and a look is one protocol-v2 `POST /git-upload-pack` with
//! `ls-refs`. Anything unexpected turns this off for the repository: the full handshake
//! (gix's transport, `push.rs`) takes over.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;

use super::push::{self, ReceiveCaps};
use crate::storage::url::Scheme;
use crate::storage::{ObjectId, RefUpdate, RepoUrl, RequestContext, StorageError, Tips, UpdateOutcome};

/// A blind delete only trusts an old id this process saw on the host this recently: git's
/// receive-pack deletes a ref unchecked when the old id is an object it no longer has (a
/// pruned lock commit), so an old id must be fresh, well inside any prune window.
const BLIND_DELETE_WINDOW: Duration = Duration::from_secs(300);

/// Receive-pack's answer to a push whose parent the host does not have: our guess of its tips
/// was stale in a way only the advertisement can settle.
const MISSING_OBJECTS: &str = "missing necessary objects";

pub(crate) struct SmartHttp {
    base: String,
    /// Credentials go over `http://` only to a loopback host (as in `transport::connect_http`).
    clear_text_ok: bool,
    client: reqwest::blocking::Client,
    /// Set when the host answered something unexpected: the full handshake from then on.
    disabled: AtomicBool,
    caps: Mutex<Option<ReceiveCaps>>,
    /// What each ref was last seen to be on the host (`None`: absent), and when.
    seen: Mutex<HashMap<String, (Option<ObjectId>, Instant)>>,
}

/// What a blind request came to.
pub(crate) enum Blind<T> {
    Done(T),
    /// Not possible or not trusted here: do it with the full handshake.
    Fallback,
}

impl SmartHttp {
    /// For `http://` and `https://` repositories; `caps` as remembered from an earlier process.
    pub fn new(url: &RepoUrl, caps: Option<ReceiveCaps>) -> Option<Self> {
        if url.scheme() == Scheme::Git {
            return None;
        }
        let client = reqwest::blocking::Client::builder()
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(60))
            .build()
            .ok()?;
        Some(SmartHttp {
            base: url.to_string(),
            clear_text_ok: url.scheme() == Scheme::Https || url.is_loopback(),
            client,
            disabled: AtomicBool::new(false),
            caps: Mutex::new(caps),
            seen: Mutex::new(HashMap::new()),
        })
    }

    pub fn learn_caps(&self, caps: ReceiveCaps) {
        *self.caps.lock().expect("caps poisoned") = Some(caps);
    }

    /// Remember what `refs` were seen to be on the host just now.
    pub fn saw(&self, refs: &[String], tips: &Tips) {
        let now = Instant::now();
        let mut seen = self.seen.lock().expect("seen poisoned");
        if seen.len() > 4096 {
            seen.clear();
        }
        for r in refs {
            seen.insert(r.clone(), (tips.get(r).copied(), now));
        }
    }

    pub fn forget(&self, refs: impl Iterator<Item = String>) {
        let mut seen = self.seen.lock().expect("seen poisoned");
        for r in refs {
            seen.remove(&r);
        }
    }

    fn disable(&self, why: &str) {
        if !self.disabled.swap(true, Ordering::Relaxed) {
            tracing::warn!(remote = %self.base, reason = why, "the git host needs the full handshake; using it from now on");
        }
    }

    fn post(
        &self,
        ctx: &RequestContext,
        service: &str,
        v2: bool,
        body: Vec<u8>,
    ) -> Result<reqwest::blocking::Response, StorageError> {
        let mut request = self
            .client
            .post(format!("{}/git-{service}", self.base))
            .timeout(ctx.deadline.io_timeout(Duration::from_secs(60)))
            .header("Content-Type", format!("application/x-git-{service}-request"))
            .header("Accept", format!("application/x-git-{service}-result"))
            .header("User-Agent", concat!("git/gitstate-", env!("CARGO_PKG_VERSION")))
            .body(body);
        if v2 {
            request = request.header("Git-Protocol", "version=2");
        }
        if let Some(c) = ctx.credentials() {
            if !self.clear_text_ok {
                return Err(StorageError::Protocol(format!(
                    "refusing to send credentials in clear text to {}; use https://",
                    self.base
                )));
            }
            let pair = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.username, c.password));
            request = request.header("Authorization", format!("Basic {pair}"));
        }
        request.send().map_err(|e| {
            if ctx.out_of_time() || e.is_timeout() {
                StorageError::DeadlineExceeded("while talking to the git host")
            } else {
                StorageError::HostUnavailable(format!("{}: {}", self.base, super::transport::chain(&e)))
            }
        })
    }

    /// A response that is no answer of the service: an auth refusal or a missing repository
    /// is final; anything else (a redirect, a proxy's page) means "use the full handshake".
    fn check(&self, response: &reqwest::blocking::Response, service: &str) -> Result<bool, StorageError> {
        let status = response.status().as_u16();
        match status {
            401 | 403 => return Err(StorageError::CredentialsRefused),
            404 => return Err(StorageError::RepositoryNotFound(format!("{}: HTTP 404", self.base))),
            500..=599 if status != 501 => {
                return Err(StorageError::HostUnavailable(format!("{}: HTTP {status}", self.base)))
            }
            _ => {}
        }
        let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
        if status != 200 || content_type != format!("application/x-git-{service}-result") {
            self.disable(&format!("HTTP {status} {content_type}"));
            return Ok(false);
        }
        Ok(true)
    }

    /// The tips of `refs` from one `ls-refs`, with no advertisement before it.
    pub fn ls_refs(&self, ctx: &RequestContext, refs: &[String]) -> Result<Blind<Tips>, StorageError> {
        if self.disabled.load(Ordering::Relaxed) || refs.is_empty() {
            return Ok(Blind::Fallback);
        }
        let mut body = Vec::new();
        pkt(&mut body, "command=ls-refs\n");
        pkt(&mut body, concat!("agent=gitstate/", env!("CARGO_PKG_VERSION"), "\n"));
        body.extend_from_slice(b"0001");
        for r in refs {
            pkt(&mut body, &format!("ref-prefix {r}\n"));
        }
        body.extend_from_slice(b"0000");
        let response = self.post(ctx, "upload-pack", true, body)?;
        if !self.check(&response, "upload-pack")? {
            return Ok(Blind::Fallback);
        }
        let bytes = response.bytes().map_err(|e| StorageError::HostUnavailable(format!("{}: {e}", self.base)))?;
        let Some(frames) = push::pkt_frames(&bytes) else {
            self.disable("ls-refs answer is not packet lines");
            return Ok(Blind::Fallback);
        };
        let mut tips = Tips::new();
        for frame in frames {
            let line = String::from_utf8_lossy(frame);
            let mut words = line.trim_end().split(' ');
            let (Some(id), Some(name)) = (words.next(), words.next()) else {
                self.disable("unexpected ls-refs line");
                return Ok(Blind::Fallback);
            };
            let Ok(id) = ObjectId::from_hex(id.as_bytes()) else {
                // An `ERR` line or a v0 answer: not a v2 ls-refs.
                self.disable("unexpected ls-refs line");
                return Ok(Blind::Fallback);
            };
            if refs.iter().any(|r| r == name) {
                tips.insert(name.to_owned(), id);
            }
        }
        self.saw(refs, &tips);
        Ok(Blind::Done(tips))
    }

    /// Push `updates` in one POST, when that is safe: receive-pack's capabilities are known
    /// and include `atomic` (guards travel as commands), no update is a mere absence check
    /// (only an advertisement can settle those), and every delete names an old id seen on
    /// the host within [`BLIND_DELETE_WINDOW`].
    pub fn push(
        &self,
        repo: &gix::Repository,
        url: &RepoUrl,
        ctx: &RequestContext,
        updates: &[RefUpdate],
    ) -> Result<Blind<UpdateOutcome>, StorageError> {
        // Before any advertisement was seen, a lone create (taking a lock) needs no capability
        // but report-status, which every receive-pack has; everything else waits for one.
        let lone_create = matches!(updates, [u] if u.old.is_none() && u.new.is_some());
        let known = *self.caps.lock().expect("caps poisoned");
        let caps = match known {
            Some(caps) => caps,
            None if lone_create => ReceiveCaps { report_status: true, ..ReceiveCaps::default() },
            None => return Ok(Blind::Fallback),
        };
        if self.disabled.load(Ordering::Relaxed)
            || !(caps.atomic || lone_create)
            || !caps.report_status
            || updates.iter().any(RefUpdate::is_absence_check)
            || !updates.iter().filter(|u| u.new.is_none()).all(|u| self.fresh(&u.name, u.old))
        {
            return Ok(Blind::Fallback);
        }
        let commands: Vec<&RefUpdate> = updates.iter().collect();
        // The old ids are tips the host had: their commits are there, and so are their parents.
        let olds: Vec<ObjectId> = updates.iter().filter_map(|u| u.old).collect();
        let pack = push::pack_for(repo, &commands, |id| olds.contains(id))?;
        let mut body = Vec::new();
        for line in push::command_lines(&commands, caps, repo.object_hash().null()) {
            pkt(&mut body, &line);
        }
        body.extend_from_slice(b"0000");
        if let Some(pack) = pack {
            body.extend_from_slice(&pack);
        }
        let response = self.post(ctx, "receive-pack", false, body).map_err(after_send)?;
        if !self.check(&response, "receive-pack")? {
            return Ok(Blind::Fallback);
        }
        let bytes =
            response.bytes().map_err(|e| after_send(StorageError::HostUnavailable(format!("{}: {e}", self.base))))?;
        let report = push::report_from_bytes(&bytes, caps.side_band_64k, url)?;
        if report.iter().any(|l| l.contains(MISSING_OBJECTS)) || report.first().is_some_and(|l| l != "unpack ok") {
            // The host lacks what our guess assumed: nothing was applied; settle it by advertisement.
            return Ok(Blind::Fallback);
        }
        Ok(Blind::Done(push::outcome(&report, &commands, url)?))
    }

    /// Whether `old` is what `name` was seen to be on the host, recently.
    fn fresh(&self, name: &str, old: Option<ObjectId>) -> bool {
        let seen = self.seen.lock().expect("seen poisoned");
        matches!(seen.get(name), Some((id, at)) if *id == old && old.is_some() && at.elapsed() < BLIND_DELETE_WINDOW)
    }
}

fn pkt(out: &mut Vec<u8>, line: &str) {
    out.extend_from_slice(format!("{:04x}", line.len() + 4).as_bytes());
    out.extend_from_slice(line.as_bytes());
}

fn after_send(e: StorageError) -> StorageError {
    match e {
        StorageError::DeadlineExceeded(_) => {
            StorageError::DeadlineExceeded("after the push was sent; it may or may not have been applied")
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_lines_and_capabilities_round_trip() {
        let mut out = Vec::new();
        pkt(&mut out, "command=ls-refs\n");
        assert_eq!(out, b"0014command=ls-refs\n");
        let caps = ReceiveCaps { atomic: true, side_band_64k: false, report_status: true, quiet: true };
        assert_eq!(ReceiveCaps::from_line(&caps.to_line()), caps);
        assert_eq!(ReceiveCaps::from_line(""), ReceiveCaps::default());
    }

    #[test]
    fn credentials_never_go_over_plain_http_to_another_host() {
        let ctx = RequestContext::new(
            Some(crate::context::Credentials { username: "u".into(), password: "p".into() }),
            crate::context::Deadline::after(Duration::from_secs(5)),
        );
        let remote = SmartHttp::new(&RepoUrl::parse("http://192.0.2.1/x.git").unwrap(), None).unwrap();
        // Refused before any connection is made (192.0.2.1 is TEST-NET: nothing would answer).
        assert!(matches!(remote.ls_refs(&ctx, &["refs/heads/main".into()]), Err(StorageError::Protocol(_))));
        assert!(SmartHttp::new(&RepoUrl::parse("https://192.0.2.1/x.git").unwrap(), None).unwrap().clear_text_ok);
        assert!(SmartHttp::new(&RepoUrl::parse("http://127.0.0.1/x.git").unwrap(), None).unwrap().clear_text_ok);
    }

    #[test]
    fn blind_deletes_need_a_fresh_sighting() {
        let url = RepoUrl::parse("http://127.0.0.1/x.git").unwrap();
        let http = SmartHttp::new(&url, None).unwrap();
        let id = ObjectId::empty_tree(gix::hash::Kind::Sha1);
        let name = "refs/heads/locks/a".to_string();
        assert!(!http.fresh(&name, Some(id)), "never seen");
        http.saw(std::slice::from_ref(&name), &Tips::from([(name.clone(), id)]));
        assert!(http.fresh(&name, Some(id)));
        assert!(!http.fresh(&name, None));
        http.seen.lock().unwrap().insert(name.clone(), (Some(id), Instant::now() - BLIND_DELETE_WINDOW));
        assert!(!http.fresh(&name, Some(id)), "seen too long ago");
    }
}
