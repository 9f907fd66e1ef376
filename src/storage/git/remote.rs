//! Talking to a remote git host: choosing the transport from the URL, listing
//! refs and fetching tips (depth 1) into the bare cache repository. Everything
//! goes through gix; no `git` program is ever spawned.

use std::collections::HashMap;
use std::net::{TcpStream, ToSocketAddrs};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use gix::protocol::transport::client::blocking_io::Transport;
use gix::protocol::transport::client::git::{blocking_io::Connection, ConnectMode};
use gix::protocol::transport::Protocol;
use gix::remote::fetch::{Shallow, Tags};
use gix::remote::Direction;

use crate::storage::{Credentials, StorageError, Tips};

/// How long we wait for a TCP connection, and for any single read or write on it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// Open a transport to `url` that will ask for protocol `version` in its handshake.
///
/// No handshake happens here: the caller (or gix's remote API) performs it for the
/// service it needs. `file://` and local paths are refused since gix would spawn
/// `git` programs for them; ssh is refused for the same reason.
pub fn connect(
    url: &gix::Url,
    version: Protocol,
    creds: Option<&Credentials>,
) -> Result<Box<dyn Transport + Send>, StorageError> {
    use gix::url::Scheme;
    match &url.scheme {
        Scheme::Git => Ok(Box::new(connect_daemon(url, version)?)),
        Scheme::Http | Scheme::Https => {
            // Goes through gix's own connector so that the http backends (and, later,
            // credentials) plug in without changes here.
            let options =
                gix::protocol::transport::client::blocking_io::connect::Options { version, ..Default::default() };
            let mut transport = gix::protocol::transport::client::blocking_io::connect::connect(url.clone(), options)
                .map_err(|e| StorageError::Unavailable(format!("{}: {}", redacted(url), chain(&e))))?;
            // Sent with the first request: no 401 round trip, and never git's credential helpers.
            if let Some(c) = creds {
                if url.scheme == Scheme::Http && !is_loopback(url) {
                    return Err(StorageError::Protocol(format!(
                        "refusing to send credentials in clear text to {}; use https://",
                        redacted(url)
                    )));
                }
                transport
                    .set_identity(account(c))
                    .map_err(|e| StorageError::Protocol(format!("{}: {}", redacted(url), chain(&e))))?;
            }
            Ok(transport)
        }
        other => Err(StorageError::Protocol(format!(
            "unsupported repository URL scheme `{other}` in {} (use git://, http:// or https://)",
            redacted(url)
        ))),
    }
}

fn is_loopback(url: &gix::Url) -> bool {
    match url.host() {
        Some("localhost") => true,
        Some(h) => {
            h.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
        }
        None => false,
    }
}

fn account(c: &Credentials) -> gix::sec::identity::Account {
    gix::sec::identity::Account {
        username: c.username.clone(),
        password: c.password.clone(),
        oauth_refresh_token: None,
    }
}

/// A git:// connection on our own socket: gix's connector doesn't set TCP_NODELAY,
/// which costs a delayed-ACK round (~40 ms) on every request/response exchange.
fn connect_daemon(url: &gix::Url, version: Protocol) -> Result<Connection<TcpStream, TcpStream>, StorageError> {
    let unavailable =
        |what: &str, e: std::io::Error| StorageError::Unavailable(format!("{what} {}: {e}", redacted(url)));
    let host = url.host().ok_or_else(|| StorageError::Protocol(format!("no host in {}", redacted(url))))?;
    let port = url.port.unwrap_or(9418);
    let addrs = (host, port).to_socket_addrs().map_err(|e| unavailable("cannot resolve", e))?;
    let mut last_err = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last_err = e,
        }
    }
    let read = stream.ok_or_else(|| unavailable("cannot connect to", last_err))?;
    read.set_nodelay(true).map_err(|e| unavailable("cannot configure socket for", e))?;
    read.set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| read.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| unavailable("cannot configure socket for", e))?;
    let write = read.try_clone().map_err(|e| unavailable("cannot configure socket for", e))?;
    Ok(Connection::new(
        read,
        write,
        version,
        url.path.clone(),
        Some((host.to_owned(), url.port)),
        ConnectMode::Daemon,
        false,
    )
    .custom_url(Some(url.to_bstring())))
}

/// Current tips of `refs` (full names) on the remote at `url`; fetches, at depth 1,
/// every tip whose commit is not yet in `repo`. Writes no refs in `repo` (only the
/// `shallow` file and a pack). One connection; a call that needs no objects sends
/// nothing but the handshake and `ls-refs`.
pub fn fetch_tips(
    repo: &gix::Repository,
    url: &gix::Url,
    refs: &[String],
    creds: Option<&Credentials>,
) -> Result<Tips, StorageError> {
    if refs.is_empty() {
        return Ok(Tips::new());
    }
    // Fetching changes no ref and writes packs whole: a broken attempt can simply be repeated.
    retrying(|| fetch_tips_once(repo, url, refs, creds))
}

fn fetch_tips_once(
    repo: &gix::Repository,
    url: &gix::Url,
    refs: &[String],
    creds: Option<&Credentials>,
) -> Result<Tips, Failed> {
    let transport = connect(url, Protocol::V2, creds)?;
    // Refspecs without a destination: the objects are fetched, no local ref is written.
    let remote = repo
        .remote_at_without_url_rewrite(url.clone())
        .and_then(|r| r.with_refspecs(refs.iter().map(String::as_str), Direction::Fetch))
        .map_err(|e| StorageError::Local(format!("cannot set up fetch from {}: {}", redacted(url), chain(&e))))?
        .with_fetch_tags(Tags::None);
    let prepare = remote
        .to_connection_with_transport(transport)
        // The credentials went with the first request already; a refusal is final. Without this,
        // gix would ask git's credential helpers, which spawn `git`.
        .with_credentials(|_action| Ok(None))
        .prepare_fetch(gix::progress::Discard, Default::default())
        .map_err(|e| Failed::from_gix(url, &e))?;

    let tips: Tips = prepare
        .ref_map()
        .mappings
        .iter()
        .filter_map(|m| {
            let name = m.remote.as_name()?.to_string();
            let id = m.remote.as_id()?.to_owned();
            refs.contains(&name).then_some((name, id))
        })
        .collect();
    if !missing(repo, &tips) {
        // Dropping the connection sends the flush that ends a v2 session politely.
        return Ok(tips);
    }

    // gix takes the `shallow` file lock without waiting; serialise our own threads on it
    // and look again once we hold it, since another thread may have fetched the tip.
    let lock = shallow_lock(repo);
    let _guard = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if !missing(repo, &tips) {
        return Ok(tips);
    }
    let depth = NonZeroU32::new(1).expect("1 is not zero");
    let outcome = prepare
        .with_shallow(Shallow::DepthAtRemote(depth))
        .receive(gix::progress::Discard, &AtomicBool::new(false))
        .map_err(|e| Failed::from_gix(url, &e))?;
    // The .keep file protects a new pack until refs point into it; our refs live in
    // memory, and a cache nobody runs gc on needs no protection.
    if let gix::remote::fetch::Status::Change { write_pack_bundle, .. } = &outcome.status {
        if let Some(keep) = &write_pack_bundle.keep_path {
            let _ = std::fs::remove_file(keep);
        }
    }
    if missing(repo, &tips) {
        // Usually our cache, not the host: unreadable packs look like missing objects.
        return Err(StorageError::Local(format!(
            "{} did not send all requested tips, or the cache cannot read them",
            redacted(url)
        ))
        .into());
    }
    Ok(tips)
}

/// Whether some tip's commit is not in `repo` (a miss makes gix re-read the packs on disk).
fn missing(repo: &gix::Repository, tips: &Tips) -> bool {
    tips.values().any(|id| !repo.has_object(id))
}

/// One mutex per repository directory, shared by all threads of this process.
fn shallow_lock(repo: &gix::Repository) -> Arc<Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>> = OnceLock::new();
    let key = repo.common_dir().canonicalize().unwrap_or_else(|_| repo.common_dir().to_owned());
    let mut locks = LOCKS.get_or_init(Default::default).lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    locks.entry(key).or_default().clone()
}

/// A failed attempt at talking to the host, and whether it may be repeated.
pub(crate) struct Failed {
    pub error: StorageError,
    /// The connection broke (reset, closed early); e.g. a busy `git daemon` resets
    /// connections it has no room for. Never set once the server may have acted.
    pub retry: bool,
}

impl From<StorageError> for Failed {
    fn from(error: StorageError) -> Self {
        Failed { error, retry: false }
    }
}

impl Failed {
    fn from_gix(url: &gix::Url, err: &gix::Error) -> Self {
        let retry = err
            .iter_errors()
            .filter_map(|e| e.downcast_ref::<std::io::Error>())
            .any(|e| is_broken_connection(e.kind()));
        Failed { error: network_error(url, err), retry }
    }
}

/// Errors of a connection that was established and then dropped by the other side.
pub(crate) fn is_broken_connection(kind: std::io::ErrorKind) -> bool {
    use std::io::ErrorKind::*;
    matches!(kind, ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof)
}

/// Run `attempt` up to three times while it fails with a retryable error, with a short jittered pause.
pub(crate) fn retrying<T>(mut attempt: impl FnMut() -> Result<T, Failed>) -> Result<T, StorageError> {
    const ATTEMPTS: u32 = 3;
    let mut tries = 1;
    loop {
        match attempt() {
            Ok(value) => return Ok(value),
            Err(Failed { error, retry: true }) if tries < ATTEMPTS => {
                tracing::debug!(%error, attempt = tries, "git connection broke; trying again");
                std::thread::sleep(Duration::from_millis(fastrand::u64(20..120) * u64::from(tries)));
                tries += 1;
            }
            Err(failed) => return Err(failed.error),
        }
    }
}

/// Sort a gix error into ours: a broken or refused connection is the host being
/// unavailable, refused credentials are `AuthRejected`, anything else the host said is `Protocol`.
pub(crate) fn network_error(url: &gix::Url, err: &gix::Error) -> StorageError {
    let text = format!("{}: {}", redacted(url), chain(err));
    if err.iter_errors().any(is_err_line) {
        StorageError::Protocol(text)
    } else if err.classify().is_unauthenticated()
        || err.classify().is_permission_denied()
        || err
            .iter_errors()
            .filter_map(|e| e.downcast_ref::<std::io::Error>())
            .any(|e| e.kind() == std::io::ErrorKind::PermissionDenied)
    {
        StorageError::AuthRejected
    } else if err.iter_errors().any(|e| e.is::<std::io::Error>()) {
        StorageError::Unavailable(text)
    } else {
        StorageError::Protocol(text)
    }
}

/// Whether `err` carries an `ERR` packet line sent by the server.
pub(crate) fn is_err_line(err: &(dyn std::error::Error + 'static)) -> bool {
    err.is::<gix::protocol::transport::packetline::read::Error>()
        || err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .is_some_and(|inner| inner.is::<gix::protocol::transport::packetline::read::Error>())
}

/// The messages of an error and its causes, joined, for logs.
pub(crate) fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let msg = e.to_string();
        if !out.ends_with(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        source = e.source();
    }
    out
}

/// The URL without user or password, for messages.
pub(crate) fn redacted(url: &gix::Url) -> String {
    let mut url = url.clone();
    url.set_user(None);
    url.set_password(None);
    url.to_bstring().to_string()
}
