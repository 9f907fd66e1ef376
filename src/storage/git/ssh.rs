//! git over SSH in process (no `ssh` binary: Lambda has none): a russh session to the host,
//! authenticated with the deployment's key, the host's key checked against the pinned
//! known_hosts lines (no trust on first use), then one session channel that `exec`s
//! `git-upload-pack '<path>'` or `git-receive-pack '<path>'`. gix-transport speaks git over
//! that channel as over a spawned process (`ConnectMode::Process`), so fetch and our own push
//! (push.rs) run over it unchanged. A remote store keeps its session between operations
//! ([`KeptSessions`]: a channel per operation); tools use a session per operation. Every
//! wait is bounded by the request's deadline. Failures are sorted by
//! [`super::transport::classify`].

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gix::protocol::transport::client::blocking_io::{RequestWriter, SetServiceResponse, Transport};
use gix::protocol::transport::client::git::{blocking_io::Connection, ConnectMode};
use gix::protocol::transport::client::{MessageKind, TransportWithoutIO, WriteMode};
use gix::protocol::transport::{Protocol, Service};
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey};
use russh::ChannelMsg;

use super::transport::classify;
use crate::context::SshIdentity;
use crate::storage::{RepoUrl, RequestContext, StorageError};

/// The longest wait for the TCP connection and for any single exchange.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// What is kept of the remote command's stderr, for the log.
const STDERR_KEPT: usize = 2048;

/// Why talking to an SSH host failed, by what the caller can do about it. Sorted into
/// [`StorageError`] by `transport::classify` (never by its text).
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// No TCP connection, or it broke before the SSH session was up.
    #[error("cannot reach {host}: {source}")]
    Unreachable { host: String, source: std::io::Error },
    /// The host's key is not among the keys pinned for it.
    #[error("the host key of {host} ({fingerprint}) is not pinned in the known hosts")]
    HostKeyRefused { host: String, fingerprint: String },
    /// The host did not accept the deployment's key.
    #[error("{host} refused the deployment's SSH key")]
    KeyRefused { host: String },
    /// The SSH conversation failed (not an SSH server, a broken session).
    #[error("SSH session with {host} failed: {detail}")]
    Session { host: String, detail: String },
    /// The remote command ended with `status` before it said anything (git exits 128 for a
    /// repository it cannot open).
    #[error("the git command on {host} exited with status {status}: {stderr}")]
    RemoteCommand { host: String, status: u32, stderr: String },
    /// Something of ours: the key or known hosts cannot be read, no pinned key.
    #[error("SSH set-up: {0}")]
    Setup(String),
}

/// One known_hosts line: the hosts it names and their key.
#[derive(Debug, Clone)]
pub struct KnownHost {
    /// `(host, port)`: `github.com` is port 22, `[127.0.0.1]:2222` port 2222.
    hosts: Vec<(String, u16)>,
    key: PublicKey,
}

/// Parse known_hosts text (`host[,host…] keytype base64 [comment]`). Hashed names, wildcards,
/// negations and markers (`@cert-authority`, `@revoked`) are refused: a pin names its host.
/// Errors name the line number only.
pub fn parse_known_hosts(text: &str) -> Result<Vec<KnownHost>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let n = n + 1;
        if line.starts_with('@') {
            return Err(format!("known hosts line {n}: markers (@cert-authority, @revoked) are not supported"));
        }
        let (names, key) = line.split_once(char::is_whitespace).ok_or(format!("known hosts line {n}: no key"))?;
        let key = PublicKey::from_openssh(key.trim())
            .map_err(|_| format!("known hosts line {n}: not `host keytype base64-key`"))?;
        let mut hosts = Vec::new();
        for name in names.split(',') {
            if name.starts_with('|') {
                return Err(format!("known hosts line {n}: hashed host names are not supported; write them in clear (ssh-keyscan without -H)"));
            }
            if name.contains(['*', '?', '!']) {
                return Err(format!("known hosts line {n}: wildcards and negations are not supported"));
            }
            let host = match name.strip_prefix('[') {
                Some(rest) => {
                    let (host, port) =
                        rest.split_once("]:").ok_or(format!("known hosts line {n}: expected [host]:port"))?;
                    let port: u16 = port.parse().map_err(|_| format!("known hosts line {n}: bad port"))?;
                    (host.to_ascii_lowercase(), port)
                }
                None => (name.to_ascii_lowercase(), 22),
            };
            hosts.push(host);
        }
        out.push(KnownHost { hosts, key });
    }
    Ok(out)
}

/// The host of `url` as known_hosts names it (an IPv6 address without brackets).
fn bare_host(url: &RepoUrl) -> &str {
    url.host().trim_start_matches('[').trim_end_matches(']')
}

/// The keys pinned for `url`'s host and port.
pub fn pinned_keys(known: &[KnownHost], url: &RepoUrl) -> Vec<PublicKey> {
    pinned_for(known, url.host(), url.port())
}

/// The keys pinned for `host` (an IPv6 address with or without brackets) and `port`.
pub fn pinned_for(known: &[KnownHost], host: &str, port: u16) -> Vec<PublicKey> {
    let wanted = (host.trim_start_matches('[').trim_end_matches(']').to_owned(), port);
    known.iter().filter(|k| k.hosts.contains(&wanted)).map(|k| k.key.clone()).collect()
}

/// The host key algorithms to ask for: those of the pinned keys, in russh's order of
/// preference, so that a host with several keys presents one that is pinned (as OpenSSH does
/// with its known hosts).
fn host_key_algorithms(pinned: &[PublicKey]) -> Vec<russh::keys::Algorithm> {
    let family =
        |a: &russh::keys::Algorithm, b: &russh::keys::Algorithm| (a.clone().is_rsa() && b.clone().is_rsa()) || a == b;
    russh::Preferred::DEFAULT
        .key
        .iter()
        .filter(|offered| pinned.iter().any(|p| family(&p.algorithm(), offered)))
        .cloned()
        .collect()
}

/// Check an identity at start-up: the key reads (unencrypted OpenSSH or PEM), the known
/// hosts read. Errors never carry key material.
pub fn check_identity(identity: &SshIdentity) -> Result<Vec<KnownHost>, String> {
    private_key(identity)?;
    parse_known_hosts(&identity.known_hosts)
}

fn private_key(identity: &SshIdentity) -> Result<PrivateKey, String> {
    russh::keys::decode_secret_key(identity.private_key.trim(), None).map_err(|e| match e {
        russh::keys::Error::KeyIsEncrypted => {
            "the SSH private key is encrypted; give gitstate a key without a passphrase".into()
        }
        _ => "the SSH private key cannot be read (expected an OpenSSH private key)".into(),
    })
}

/// The host's key is compared with the pinned ones; what was seen is kept for the error.
struct Verifier {
    pinned: Vec<PublicKey>,
    seen: Arc<Mutex<Option<String>>>,
}

impl russh::client::Handler for Verifier {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_public_key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } = server_public_key else {
            *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some("a certificate".into());
            return Ok(false);
        };
        let known = self.pinned.iter().any(|p| p.key_data() == key.key_data());
        if !known {
            *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(key.fingerprint(HashAlg::Sha256).to_string());
        }
        Ok(known)
    }
}

/// An authenticated SSH session and the runtime driving it (a current-thread runtime: it
/// runs while a request waits on it; several requests may wait on it at once). Kept between
/// operations by [`KeptSessions`], or used once.
struct Session {
    runtime: Option<tokio::runtime::Runtime>,
    handle: Mutex<Option<Arc<russh::client::Handle<Verifier>>>>,
    host: String,
}

impl Session {
    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("the runtime lives as long as the session")
    }

    fn is_closed(&self) -> bool {
        self.handle.lock().unwrap_or_else(|p| p.into_inner()).as_ref().is_none_or(|h| h.is_closed())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // The session's task goes with its runtime, and the connection with it. Never blocks,
        // wherever the last reference goes (an async worker included).
        self.handle.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// One request's use of a session: its waits end at the request's deadline.
#[derive(Clone)]
struct Waiter {
    session: Arc<Session>,
    deadline: crate::context::Deadline,
    interrupt: Arc<std::sync::atomic::AtomicBool>,
}

impl Waiter {
    /// Run `fut` to its end, or fail at the deadline (at most `cap` from now).
    fn wait<T>(&self, cap: Duration, fut: impl std::future::Future<Output = T>) -> std::io::Result<T> {
        if self.interrupt.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the request was interrupted"));
        }
        let timeout = self.deadline.io_timeout(cap);
        self.session.runtime().block_on(async { tokio::time::timeout(timeout, fut).await }).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{} did not answer in time", self.session.host))
        })
    }
}

/// The SSH session of one remote kept open between operations while the process is warm:
/// each operation opens a channel on it (no TCP, key exchange or authentication again). A
/// session found closed, or that does not open a channel within a short wait (a connection
/// that died while a Lambda instance was frozen), is replaced by a fresh one; nothing was
/// asked of the host yet, so that is always safe.
#[derive(Default)]
pub(crate) struct KeptSessions {
    kept: Mutex<Option<Arc<Session>>>,
}

/// How long a kept session may take to open a channel before a fresh session is tried.
const KEPT_CHANNEL_WAIT: Duration = Duration::from_secs(3);

/// The channel's data as a blocking reader; stderr and the exit status are kept aside.
struct ChannelReader {
    waiter: Waiter,
    half: russh::ChannelReadHalf,
    buf: bytes::Bytes,
    stderr: Vec<u8>,
    exit: Option<u32>,
    got_data: bool,
    eof: bool,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if !self.buf.is_empty() {
                let n = out.len().min(self.buf.len());
                out[..n].copy_from_slice(&self.buf.split_to(n));
                return Ok(n);
            }
            if self.eof {
                return Ok(0);
            }
            let waiter = self.waiter.clone();
            let msg = waiter.wait(IO_TIMEOUT, self.half.wait())?;
            match msg {
                Some(ChannelMsg::Data { data }) => {
                    self.got_data = true;
                    self.buf = data;
                }
                Some(ChannelMsg::ExtendedData { data, ext: 1 }) => {
                    let room = STDERR_KEPT.saturating_sub(self.stderr.len());
                    self.stderr.extend_from_slice(&data[..data.len().min(room)]);
                }
                Some(ChannelMsg::ExitStatus { exit_status }) => self.exit = Some(exit_status),
                // The exit status may follow the end of the data: wait for it when it matters.
                Some(ChannelMsg::Eof) if self.got_data => self.eof = true,
                Some(ChannelMsg::Close) | None => {
                    self.eof = true;
                    match self.exit {
                        Some(status) if status != 0 && !self.got_data => {
                            return Err(std::io::Error::other(SshError::RemoteCommand {
                                host: self.waiter.session.host.clone(),
                                status,
                                stderr: String::from_utf8_lossy(&self.stderr).trim().escape_debug().to_string(),
                            }))
                        }
                        _ => return Ok(0),
                    }
                }
                Some(_) => {}
            }
        }
    }
}

/// The channel's input as a blocking writer.
struct ChannelWriter {
    waiter: Waiter,
    half: russh::ChannelWriteHalf<russh::client::Msg>,
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.waiter
            .wait(IO_TIMEOUT, self.half.data(data))?
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::BrokenPipe, e.to_string()))?;
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for ChannelWriter {
    fn drop(&mut self) {
        // End of our input: the remote command finishes. Best effort.
        let _ = self.waiter.wait(Duration::from_millis(200), self.half.eof());
    }
}

/// A transport that opens its SSH connection at the handshake, when it knows which
/// service (`git-upload-pack`, `git-receive-pack`) to run.
pub(crate) struct SshTransport {
    url: RepoUrl,
    version: Protocol,
    ctx: RequestContext,
    kept: Option<Arc<KeptSessions>>,
    connection: Option<Connection<ChannelReader, ChannelWriter>>,
}

/// A transport for `url` on a session of its own; nothing is sent before the handshake.
pub(crate) fn connect(url: &RepoUrl, version: Protocol, ctx: &RequestContext) -> Result<SshTransport, StorageError> {
    connect_kept(url, version, ctx, None)
}

/// A transport for `url` on the session `kept` holds (or a new one it then keeps).
pub(crate) fn connect_kept(
    url: &RepoUrl,
    version: Protocol,
    ctx: &RequestContext,
    kept: Option<Arc<KeptSessions>>,
) -> Result<SshTransport, StorageError> {
    if ctx.ssh.is_none() {
        // Passthrough mode, or a tool without the deployment's key: refused at start already.
        return Err(classify(url, ctx, &SshError::Setup("no SSH key configured (GITSTATE_SSH_KEY)".into())));
    }
    Ok(SshTransport { url: url.clone(), version, ctx: ctx.clone(), kept, connection: None })
}

/// The command the host runs: the service with the path single-quoted. The canonical path
/// holds no quote, but it is checked here as well: nothing reaches a shell unquoted.
fn command(service: Service, url: &RepoUrl) -> Result<String, SshError> {
    let path = url.remote_path();
    if path.contains(['\'', '\\', '\0', '\n']) || path.starts_with('-') {
        return Err(SshError::Setup("the repository path cannot be quoted safely".into()));
    }
    Ok(format!("{} '{path}'", service.as_str()))
}

impl SshTransport {
    /// Run `service` on a channel of the kept session, or of a new one.
    fn open(&self, service: Service) -> Result<Connection<ChannelReader, ChannelWriter>, SshError> {
        let command = command(service, &self.url)?;
        let Some(kept) = &self.kept else {
            let session = Arc::new(self.new_session()?);
            return self.channel(session, &command, IO_TIMEOUT);
        };
        let reused = kept.kept.lock().unwrap_or_else(|p| p.into_inner()).clone().filter(|s| !s.is_closed());
        if let Some(session) = reused {
            match self.channel(Arc::clone(&session), &command, KEPT_CHANNEL_WAIT) {
                Ok(connection) => return Ok(connection),
                Err(e) if self.ctx.out_of_time() => return Err(e),
                Err(e) => {
                    tracing::debug!(remote = %self.url, error = %e, "the kept SSH session failed; opening a new one");
                    let mut slot = kept.kept.lock().unwrap_or_else(|p| p.into_inner());
                    if slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, &session)) {
                        *slot = None;
                    }
                }
            }
        }
        let session = Arc::new(self.new_session()?);
        *kept.kept.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&session));
        self.channel(session, &command, IO_TIMEOUT)
    }

    /// Connect, check the host key, authenticate.
    fn new_session(&self) -> Result<Session, SshError> {
        let url = &self.url;
        let host = url.host().to_owned();
        let identity = self.ctx.ssh.as_deref().ok_or(SshError::Setup("no SSH key configured".into()))?;
        let key = Arc::new(private_key(identity).map_err(SshError::Setup)?);
        let known = parse_known_hosts(&identity.known_hosts).map_err(SshError::Setup)?;
        let pinned = pinned_keys(&known, url);
        if pinned.is_empty() {
            return Err(SshError::Setup(format!("no host key pinned for {host} port {}", url.port())));
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| SshError::Setup(format!("cannot start the SSH runtime: {e}")))?;
        let session = Arc::new(Session { runtime: Some(runtime), handle: Mutex::new(None), host: host.clone() });
        let waiter = Waiter {
            session: Arc::clone(&session),
            deadline: self.ctx.deadline,
            interrupt: Arc::clone(&self.ctx.interrupt),
        };
        let unreachable = |source: std::io::Error| SshError::Unreachable { host: host.clone(), source };
        let session_failed = |e: russh::Error| SshError::Session { host: host.clone(), detail: e.to_string() };

        // TCP, bounded by the connect timeout and the deadline.
        let addr = (bare_host(url).to_owned(), url.port());
        let tcp = waiter
            .wait(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .map_err(unreachable)?
            .map_err(unreachable)?;
        tcp.set_nodelay(true).map_err(unreachable)?;

        // The SSH session; the handler refuses a host key that is not pinned.
        let seen = Arc::new(Mutex::new(None));
        let config = Arc::new(russh::client::Config {
            inactivity_timeout: Some(IO_TIMEOUT),
            nodelay: true,
            preferred: russh::Preferred { key: host_key_algorithms(&pinned).into(), ..Default::default() },
            ..Default::default()
        });
        let verifier = Verifier { pinned, seen: Arc::clone(&seen) };
        // `connect_stream` spawns the session's task on the runtime it runs in.
        let mut handle = match waiter.wait(IO_TIMEOUT, russh::client::connect_stream(config, tcp, verifier)) {
            Err(timeout) => return Err(unreachable(timeout)),
            Ok(Ok(handle)) => handle,
            Ok(Err(e)) => {
                if let Some(fingerprint) = seen.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    return Err(SshError::HostKeyRefused { host, fingerprint });
                }
                return Err(match e {
                    // The host has no key of a pinned type: no pinned key can match.
                    russh::Error::NoCommonAlgo { kind: russh::AlgorithmKind::Key, theirs, .. } => {
                        let offered: String = theirs.join(", ").chars().take(200).collect();
                        SshError::HostKeyRefused {
                            host,
                            fingerprint: format!("no key of a pinned type; it offers {}", offered.escape_debug()),
                        }
                    }
                    russh::Error::IO(io) => unreachable(io),
                    russh::Error::Disconnect | russh::Error::HUP | russh::Error::ConnectionTimeout => {
                        unreachable(std::io::Error::new(std::io::ErrorKind::ConnectionReset, e.to_string()))
                    }
                    other => session_failed(other),
                });
            }
        };

        // Public key authentication (RSA with the best hash the host offers).
        let hash = if key.algorithm().is_rsa() {
            waiter
                .wait(IO_TIMEOUT, handle.best_supported_rsa_hash())
                .map_err(unreachable)?
                .map_err(session_failed)?
                .flatten()
        } else {
            None
        };
        let user = url.user().unwrap_or("git").to_owned();
        let auth = waiter
            .wait(IO_TIMEOUT, handle.authenticate_publickey(user, PrivateKeyWithHashAlg::new(key, hash)))
            .map_err(unreachable)?
            .map_err(session_failed)?;
        if !auth.success() {
            return Err(SshError::KeyRefused { host });
        }
        *session.handle.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(handle));
        drop(waiter);
        Arc::try_unwrap(session).map_err(|_| SshError::Setup("the new session is shared".into()))
    }

    /// One session channel running `command`, opened within `cap`.
    fn channel(
        &self,
        session: Arc<Session>,
        command: &str,
        cap: Duration,
    ) -> Result<Connection<ChannelReader, ChannelWriter>, SshError> {
        let host = session.host.clone();
        let waiter = Waiter { session, deadline: self.ctx.deadline, interrupt: Arc::clone(&self.ctx.interrupt) };
        let unreachable = |source: std::io::Error| SshError::Unreachable { host: host.clone(), source };
        let session_failed = |e: russh::Error| SshError::Session { host: host.clone(), detail: e.to_string() };
        let handle = waiter.session.handle.lock().unwrap_or_else(|p| p.into_inner()).clone().ok_or_else(|| {
            unreachable(std::io::Error::new(std::io::ErrorKind::NotConnected, "the SSH session is closed"))
        })?;
        let channel = waiter.wait(cap, handle.channel_open_session()).map_err(unreachable)?.map_err(session_failed)?;
        drop(handle);
        if self.version == Protocol::V2 {
            // Hosts that do not accept the variable answer in v0, which gix understands too.
            waiter
                .wait(IO_TIMEOUT, channel.set_env(false, "GIT_PROTOCOL", "version=2"))
                .map_err(unreachable)?
                .map_err(session_failed)?;
        }
        waiter
            .wait(IO_TIMEOUT, channel.exec(false, command.to_owned()))
            .map_err(unreachable)?
            .map_err(session_failed)?;
        let (read_half, write_half) = channel.split();
        let reader = ChannelReader {
            waiter: waiter.clone(),
            half: read_half,
            buf: bytes::Bytes::new(),
            stderr: Vec::new(),
            exit: None,
            got_data: false,
            eof: false,
        };
        let writer = ChannelWriter { waiter, half: write_half };
        let gix_url = self.url.to_gix();
        Ok(Connection::new(
            reader,
            writer,
            self.version,
            gix_url.path.clone(),
            None::<(String, Option<u16>)>,
            ConnectMode::Process,
            false,
        )
        .custom_url(Some(gix_url.to_bstring())))
    }
}

impl TransportWithoutIO for SshTransport {
    /// The deployment's key is the only SSH credential: a caller's basic auth is never an
    /// SSH password.
    fn set_identity(
        &mut self,
        _identity: gix::sec::identity::Account,
    ) -> Result<(), gix::protocol::transport::client::Error> {
        Ok(())
    }

    fn to_url(&self) -> std::borrow::Cow<'_, gix::bstr::BStr> {
        std::borrow::Cow::Owned(self.url.to_string().into())
    }

    fn supported_protocol_versions(&self) -> &[Protocol] {
        &[]
    }

    fn connection_persists_across_multiple_requests(&self) -> bool {
        true
    }

    fn configure(&mut self, _config: &dyn std::any::Any) -> Result<(), gix::Error> {
        Ok(())
    }
}

impl Transport for SshTransport {
    fn handshake<'a>(
        &mut self,
        service: Service,
        extra_parameters: &'a [(&'a str, Option<&'a str>)],
    ) -> Result<SetServiceResponse<'_>, gix::protocol::transport::client::Error> {
        if self.connection.is_none() {
            let connection = self
                .open(service)
                .map_err(|e| gix::protocol::transport::client::Error::Io(std::io::Error::other(e)))?;
            self.connection = Some(connection);
        }
        self.connection.as_mut().expect("connected above").handshake(service, extra_parameters)
    }

    fn request(
        &mut self,
        write_mode: WriteMode,
        on_into_read: MessageKind,
        trace: bool,
    ) -> Result<RequestWriter<'_>, gix::protocol::transport::client::Error> {
        match self.connection.as_mut() {
            Some(connection) => connection.request(write_mode, on_into_read, trace),
            None => Err(gix::protocol::transport::client::Error::Io(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "request before handshake",
            ))),
        }
    }
}

/// Sort an SSH failure (found among an error's causes) into ours.
pub(crate) fn sort(e: &SshError, text: String) -> StorageError {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
    match e {
        SshError::Unreachable { source, .. }
            if matches!(source.kind(), ConnectionReset | BrokenPipe | UnexpectedEof) =>
        {
            StorageError::ConnectionDropped(text)
        }
        SshError::Unreachable { .. } => StorageError::HostUnavailable(text),
        SshError::HostKeyRefused { host, fingerprint } => {
            StorageError::HostKeyRefused { host: host.clone(), fingerprint: fingerprint.clone() }
        }
        SshError::KeyRefused { host } => StorageError::SshKeyRefused { host: host.clone() },
        // git's `fatal:` exit: the repository cannot be opened (missing, or not this key's).
        SshError::RemoteCommand { status: 128, .. } => StorageError::RepositoryNotFound(text),
        SshError::RemoteCommand { .. } | SshError::Session { .. } => StorageError::Protocol(text),
        SshError::Setup(_) => StorageError::Local(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED25519: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";

    #[test]
    fn known_hosts_pin_by_host_and_port() {
        let text = format!(
            "# comment\n\ngithub.com ssh-ed25519 {ED25519}\n[127.0.0.1]:2222,[::1]:2222 ssh-ed25519 {ED25519} test\n"
        );
        let known = parse_known_hosts(&text).unwrap();
        let url = |s: &str| RepoUrl::parse(s).unwrap();
        assert_eq!(pinned_keys(&known, &url("git@github.com:o/r.git")).len(), 1);
        assert_eq!(pinned_keys(&known, &url("ssh://git@github.com:2222/o/r.git")).len(), 0, "another port");
        assert_eq!(pinned_keys(&known, &url("ssh://git@127.0.0.1:2222/r.git")).len(), 1);
        assert_eq!(pinned_keys(&known, &url("ssh://git@[::1]:2222/r.git")).len(), 1);
        assert_eq!(pinned_keys(&known, &url("ssh://git@127.0.0.1/r.git")).len(), 0);
        assert_eq!(pinned_keys(&known, &url("git@gitlab.com:o/r.git")).len(), 0);
        for bad in [
            format!("|1|abc=|def= ssh-ed25519 {ED25519}"),
            format!("*.example.com ssh-ed25519 {ED25519}"),
            format!("!evil.com ssh-ed25519 {ED25519}"),
            format!("@cert-authority * ssh-ed25519 {ED25519}"),
            "github.com ssh-ed25519 not-base64".into(),
            "github.com".into(),
            format!("[h]:x ssh-ed25519 {ED25519}"),
        ] {
            assert!(parse_known_hosts(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_the_pinned_key_types_are_asked_for() {
        let known = parse_known_hosts(&format!("h ssh-ed25519 {ED25519}")).unwrap();
        let keys: Vec<PublicKey> = known.into_iter().map(|k| k.key).collect();
        assert_eq!(host_key_algorithms(&keys), vec![russh::keys::Algorithm::Ed25519]);
        assert!(host_key_algorithms(&[]).is_empty());
    }

    #[test]
    fn the_command_quotes_the_path() {
        let url = RepoUrl::parse("git@github.com:team/states.git").unwrap();
        assert_eq!(command(Service::UploadPack, &url).unwrap(), "git-upload-pack '/team/states.git'");
        let home = RepoUrl::parse("deploy@h:~/x.git").unwrap();
        assert_eq!(command(Service::ReceivePack, &home).unwrap(), "git-receive-pack '~/x.git'");
    }

    #[test]
    fn unreadable_keys_are_refused_without_echoing_them() {
        let identity = SshIdentity { private_key: "secret-material".to_string().into(), known_hosts: String::new() };
        let e = check_identity(&identity).unwrap_err();
        assert!(!e.contains("secret-material"), "{e}");
    }
}
