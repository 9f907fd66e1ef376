//! Looks over smart HTTP without the advertisement round trip: the server answers each POST
//! as a fresh stateless process, so a look is one protocol-v2 `POST /git-upload-pack` with
//! `ls-refs`. Anything unexpected turns this off for the repository: gix's fetch (with its
//! handshake) takes over. Pushes never go blind: a push's guards are only as good as the
//! capabilities and ref values the host showed in the same push (see `push.rs`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;

use super::fetch::{self, pkt};
use super::push;
use crate::storage::url::Scheme;
use crate::storage::{ObjectId, RepoUrl, RequestContext, StorageError, Tips};

/// How long blind looks rest after the host answered one with an error.
const BLIND_PAUSE: Duration = Duration::from_secs(600);

/// How long a connection to the host is kept for reuse while idle.
const IDLE_CONNECTION: Duration = Duration::from_secs(4);

pub(crate) struct SmartHttp {
    url: RepoUrl,
    base: String,
    /// Credentials go over `http://` only to a loopback host (as in `transport::connect_http`).
    clear_text_ok: bool,
    client: reqwest::blocking::Client,
    /// Set when the host answered something unexpected: the full handshake from then on.
    disabled: AtomicBool,
    /// Until when blind looks rest after the host answered one with an error.
    paused_until: Mutex<Option<Instant>>,
    /// Whether the host takes `want-ref` (`uploadpack.allowRefInWant`): unknown until a
    /// fetch by name is answered or refused for refs that exist.
    ref_in_want: Mutex<Option<bool>>,
}

/// What a blind request came to.
pub(crate) enum Blind<T> {
    Done(T),
    /// Not possible or not trusted here: do it with the full handshake.
    Fallback,
}

impl SmartHttp {
    /// For `http://` and `https://` repositories.
    pub fn new(url: &RepoUrl) -> Option<Self> {
        if !matches!(url.scheme(), Scheme::Http | Scheme::Https) {
            return None;
        }
        let client = reqwest::blocking::Client::builder()
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none())
            // Retire idle connections before hosts commonly close them (lighttpd and Apache
            // after 5 s idle), so that few requests meet a connection closed under them.
            .pool_idle_timeout(IDLE_CONNECTION)
            .timeout(Duration::from_secs(60))
            .build()
            .ok()?;
        Some(SmartHttp {
            url: url.clone(),
            base: url.to_string(),
            clear_text_ok: url.scheme() == Scheme::Https || url.is_loopback(),
            client,
            disabled: AtomicBool::new(false),
            paused_until: Mutex::new(None),
            ref_in_want: Mutex::new(None),
        })
    }

    /// Off every blind path for good: the host answered something unexpected.
    pub fn disable(&self, why: &str) {
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
        self.request(ctx, reqwest::Method::POST, &format!("git-{service}"), service, v2, body)
    }

    /// One request to `<base>/<path>` for `service` (`upload-pack`, `receive-pack`), with the
    /// caller's credentials and the deadline's timeout.
    fn request(
        &self,
        ctx: &RequestContext,
        method: reqwest::Method,
        path: &str,
        service: &str,
        v2: bool,
        body: Vec<u8>,
    ) -> Result<reqwest::blocking::Response, StorageError> {
        let post = method == reqwest::Method::POST;
        let mut request = self
            .client
            .request(method, format!("{}/{path}", self.base))
            .timeout(ctx.deadline.io_timeout(Duration::from_secs(60)))
            .header("User-Agent", concat!("git/gitstate-", env!("CARGO_PKG_VERSION")));
        if post {
            request = request
                .header("Content-Type", format!("application/x-git-{service}-request"))
                .header("Accept", format!("application/x-git-{service}-result"))
                .body(body);
        }
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
                return StorageError::DeadlineExceeded("while talking to the git host");
            }
            match super::transport::classify(&self.url, ctx, &e) {
                // Sorted by type (a refused certificate, say); anything else here is a
                // connection that did not carry the request.
                StorageError::Protocol(_) => {
                    StorageError::HostUnavailable(format!("{}: {}", self.base, super::transport::chain(&e)))
                }
                sorted => sorted,
            }
        })
    }

    /// Start a push on the pooled client: receive-pack's advertisement from
    /// `GET info/refs?service=git-receive-pack`. `None`: the answer is no smart-HTTP
    /// advertisement (use gix's transport instead).
    pub fn start_push<'a>(&'a self, ctx: &'a RequestContext) -> Result<Option<push::Started<'a>>, StorageError> {
        if self.disabled.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let advertise = || {
            self.request(
                ctx,
                reqwest::Method::GET,
                "info/refs?service=git-receive-pack",
                "receive-pack",
                false,
                Vec::new(),
            )
        };
        let response = match advertise() {
            // As for a look: nothing was asked of the host yet, so a connection it closed while
            // idle costs one more try on a fresh one.
            Err(e) if e.is_spurious() && !ctx.out_of_time() => advertise()?,
            other => other?,
        };
        let status = response.status().as_u16();
        if let Ok(failure) = super::transport::http_status(status, format!("{}: HTTP {status}", self.base)) {
            return Err(failure);
        }
        let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
        if status != 200 || content_type != "application/x-git-receive-pack-advertisement" {
            return Ok(None);
        }
        let bytes = response.bytes().map_err(|e| StorageError::HostUnavailable(format!("{}: {e}", self.base)))?;
        let Some(adv) = parse_advertisement(&bytes) else {
            self.disable("an advertisement we could not read");
            return Ok(None);
        };
        Ok(Some((Box::new(PooledPush { http: self, ctx }), adv)))
    }

    /// A response that is no answer of the service: an auth refusal or a missing repository
    /// is final; anything else (a redirect, a proxy's page) means "use the full handshake".
    fn check(&self, response: &reqwest::blocking::Response, service: &str) -> bool {
        let status = response.status().as_u16();
        let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
        if status == 200 && content_type == format!("application/x-git-{service}-result") {
            return true;
        }
        // A host without protocol v2 over HTTP answers a blind v2 request with an error; so does
        // a missing repository, a refused credential or an outage. The full handshake tells
        // them apart, for this request; blind looks rest a while, then are tried again.
        self.pause(&format!("HTTP {status} {}", content_type.escape_debug()));
        false
    }

    /// Rest blind requests a while: the host did not answer one as asked.
    fn pause(&self, why: &str) {
        let mut paused = self.paused_until.lock().expect("paused_until poisoned");
        if paused.is_none() {
            tracing::info!(remote = %self.base, answer = %why, "a blind request was not answered; the full handshake takes over for a while");
        }
        *paused = Some(Instant::now() + BLIND_PAUSE);
    }

    /// Whether blind looks may be tried now.
    fn blind_allowed(&self) -> bool {
        if self.disabled.load(Ordering::Relaxed) {
            return false;
        }
        let mut paused = self.paused_until.lock().expect("paused_until poisoned");
        match *paused {
            Some(until) if Instant::now() < until => false,
            Some(_) => {
                *paused = None;
                true
            }
            None => true,
        }
    }

    /// The tips of `refs` from one `ls-refs`, with no advertisement before it.
    pub fn ls_refs(&self, ctx: &RequestContext, refs: &[String]) -> Result<Blind<Tips>, StorageError> {
        if refs.is_empty() {
            return Ok(Blind::Fallback);
        }
        self.ls(ctx, refs, |name| refs.iter().any(|r| r == name))
    }

    /// Every ref whose name starts with `prefix`, from one `ls-refs`.
    pub fn ls_prefix(&self, ctx: &RequestContext, prefix: &str) -> Result<Blind<Tips>, StorageError> {
        self.ls(ctx, &[prefix.to_owned()], |name| name.starts_with(prefix))
    }

    /// One `ls-refs` with a `ref-prefix` per entry of `prefixes`; the refs `keep` accepts.
    fn ls(
        &self,
        ctx: &RequestContext,
        prefixes: &[String],
        keep: impl Fn(&str) -> bool,
    ) -> Result<Blind<Tips>, StorageError> {
        if !self.blind_allowed() {
            return Ok(Blind::Fallback);
        }
        let refs = prefixes;
        let mut body = Vec::new();
        pkt(&mut body, "command=ls-refs\n");
        pkt(&mut body, concat!("agent=gitstate/", env!("CARGO_PKG_VERSION"), "\n"));
        body.extend_from_slice(b"0001");
        for r in refs {
            pkt(&mut body, &format!("ref-prefix {r}\n"));
        }
        body.extend_from_slice(b"0000");
        let response = match self.post(ctx, "upload-pack", true, body.clone()) {
            // A kept-alive connection that the host closed while idle fails the request sent on
            // it; a look changes nothing on the host, so it goes once more on a fresh connection.
            Err(why) if why.is_spurious() && !ctx.out_of_time() => {
                tracing::debug!(remote = %self.base, reason = %why, "a look failed; sending it again on a fresh connection");
                self.post(ctx, "upload-pack", true, body)?
            }
            other => other?,
        };
        if !self.check(&response, "upload-pack") {
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
            if keep(name) {
                tips.insert(name.to_owned(), id);
            }
        }
        Ok(Blind::Done(tips))
    }
}

impl SmartHttp {
    /// One protocol-v2 `fetch` at depth 1 without an advertisement first, its pack written into
    /// `pack_dir`; `Fallback` when the host does not answer it as a fetch (nothing written).
    pub fn fetch(
        &self,
        ctx: &RequestContext,
        want: &fetch::Want<'_>,
        haves: &[ObjectId],
        pack_dir: &std::path::Path,
    ) -> Result<Blind<fetch::Answer>, StorageError> {
        if !self.blind_allowed() {
            return Ok(Blind::Fallback);
        }
        let body = fetch::request_body(want, haves);
        let response = match self.post(ctx, "upload-pack", true, body.clone()) {
            // As for a look: a fetch changes nothing on the host.
            Err(why) if why.is_spurious() && !ctx.out_of_time() => self.post(ctx, "upload-pack", true, body)?,
            other => other?,
        };
        if !self.check(&response, "upload-pack") {
            return Ok(Blind::Fallback);
        }
        let by_name = matches!(want, fetch::Want::Refs(_));
        Ok(match fetch::read_answer(response, pack_dir, &ctx.interrupt)? {
            fetch::Reply::Answer(answer) => {
                if by_name {
                    self.learn_ref_in_want(true);
                }
                Blind::Done(answer)
            }
            // A ref that does not exist yet: says nothing of the host. The caller looks.
            fetch::Reply::Refused if by_name => Blind::Fallback,
            fetch::Reply::NotUnderstood if by_name => {
                self.learn_ref_in_want(false);
                Blind::Fallback
            }
            fetch::Reply::Refused | fetch::Reply::NotUnderstood => {
                self.pause("a fetch by id was not answered");
                Blind::Fallback
            }
        })
    }

    /// Whether a fetch by ref name may be tried (not known to be refused here).
    pub fn may_want_refs(&self) -> bool {
        *self.ref_in_want.lock().expect("ref_in_want poisoned") != Some(false)
    }

    /// Whether the host answered a fetch by name: remembered for this process.
    fn learn_ref_in_want(&self, taken: bool) {
        let mut known = self.ref_in_want.lock().expect("ref_in_want poisoned");
        if known.is_none() && !taken {
            tracing::info!(remote = %self.base, "the git host does not take want-ref: a cold read looks first, then fetches");
        }
        *known = Some(taken);
    }
}

/// A push conversation on the pooled client: the commands and pack go in one POST.
struct PooledPush<'a> {
    http: &'a SmartHttp,
    ctx: &'a RequestContext,
}

impl push::Conversation for PooledPush<'_> {
    fn end(&mut self) {
        // Stateless: an advertisement obliges the host to nothing.
    }

    fn send(&mut self, commands: &[String], pack: Option<&[u8]>, side_band: bool) -> Result<Vec<String>, StorageError> {
        let mut body = Vec::new();
        for line in commands {
            pkt(&mut body, &format!("{line}\n"));
        }
        body.extend_from_slice(b"0000");
        if let Some(pack) = pack {
            body.extend_from_slice(pack);
        }
        let response = self
            .http
            .request(self.ctx, reqwest::Method::POST, "git-receive-pack", "receive-pack", false, body)
            .map_err(push::after_send)?;
        let status = response.status().as_u16();
        match status {
            200 => {}
            401 | 403 => return Err(StorageError::CredentialsRefused),
            404 => return Err(StorageError::RepositoryNotFound(format!("{}: HTTP 404", self.http.base))),
            // The host may have acted before it failed: only a look can tell.
            500..=599 => return Err(StorageError::OutcomeUnknown(format!("{}: HTTP {status}", self.http.base))),
            _ => return Err(StorageError::Protocol(format!("{}: HTTP {status} to a push", self.http.base))),
        }
        let bytes = response.bytes().map_err(|e| StorageError::OutcomeUnknown(format!("{}: {e}", self.http.base)))?;
        push::report_from_bytes(&bytes, side_band, &self.http.url)
    }
}

/// A smart-HTTP receive-pack advertisement: `# service=git-receive-pack`, a flush, then the
/// refs (capabilities after a NUL on the first line) up to a flush.
fn parse_advertisement(body: &[u8]) -> Option<push::Advertisement> {
    let service = push::pkt_frames(body)?;
    if service.first().map(|l| l.trim_ascii_end()) != Some(&b"# service=git-receive-pack"[..]) {
        return None;
    }
    // Past the service line and its flush.
    let first_len = usize::from_str_radix(std::str::from_utf8(body.get(..4)?).ok()?, 16).ok()?;
    let rest = body.get(first_len..)?.strip_prefix(b"0000")?;
    let lines = push::pkt_frames(rest)?;
    let first = lines.first()?;
    let caps_text = first.splitn(2, |b| *b == 0).nth(1)?;
    let caps_text = std::str::from_utf8(caps_text).ok()?;
    let caps = push::ReceiveCaps::from_names(caps_text.split_whitespace());
    let refs = push::advertised_refs(lines.into_iter()).ok()?;
    Some(push::Advertisement { refs, caps })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_lines() {
        let mut out = Vec::new();
        pkt(&mut out, "command=ls-refs\n");
        assert_eq!(out, b"0014command=ls-refs\n");
    }

    #[test]
    fn credentials_never_go_over_plain_http_to_another_host() {
        let ctx = RequestContext::new(
            Some(crate::context::Credentials { username: "u".into(), password: "p".into() }),
            crate::context::Deadline::after(Duration::from_secs(5)),
        );
        let remote = SmartHttp::new(&RepoUrl::parse("http://192.0.2.1/x.git").unwrap()).unwrap();
        // Refused before any connection is made (192.0.2.1 is TEST-NET: nothing would answer).
        assert!(matches!(remote.ls_refs(&ctx, &["refs/heads/main".into()]), Err(StorageError::Protocol(_))));
        assert!(SmartHttp::new(&RepoUrl::parse("https://192.0.2.1/x.git").unwrap()).unwrap().clear_text_ok);
        assert!(SmartHttp::new(&RepoUrl::parse("http://127.0.0.1/x.git").unwrap()).unwrap().clear_text_ok);
    }
}
