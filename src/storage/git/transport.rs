//! Connections to a git host, bounded by the request's deadline, and the one place
//! where a failure of the host is sorted into a typed [`StorageError`].

use std::error::Error as StdError;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gix::protocol::transport::client::blocking_io::Transport;
use gix::protocol::transport::client::git::{blocking_io::Connection, ConnectMode};
use gix::protocol::transport::Protocol;

use crate::storage::url::Scheme;
use crate::storage::{Credentials, RepoUrl, RequestContext, StorageError};

/// The longest wait for a TCP connection, and for any single read or write on it; the
/// request's deadline usually cuts it shorter.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// git daemon's answers (`ERR` lines) for a repository it does not have or export: the
/// first without `--informative-errors`, the others with it.
const DAEMON_NOT_FOUND: &[&[u8]] =
    &[b"access denied or repository not exported", b"no such repository", b"repository not exported"];

/// Sort any error met while talking to `url` into ours. Looks at the whole chain of
/// causes, by type: HTTP statuses, `ERR` lines, io error kinds, gix's classification.
pub(crate) fn classify(url: &RepoUrl, ctx: &RequestContext, err: &(dyn StdError + 'static)) -> StorageError {
    let text = format!("{url}: {}", chain(err));
    let all = causes(err);
    let causes = || all.iter().copied();
    if ctx.out_of_time() {
        return StorageError::DeadlineExceeded("while talking to the git host");
    }
    // A certificate that fails verification does not heal by retrying: told by its type.
    for cause in causes() {
        if let Some(rustls::Error::InvalidCertificate(why)) = cause.downcast_ref::<rustls::Error>() {
            return StorageError::CertificateRefused(format!("{}: {why:?}", url.host()));
        }
    }
    for cause in causes() {
        if let Some(e) = cause.downcast_ref::<super::ssh::SshError>() {
            return super::ssh::sort(e, text);
        }
        if let Some(e) = cause.downcast_ref::<reqwest::Error>() {
            if let Some(status) = e.status() {
                return http_status(status.as_u16(), text).unwrap_or_else(StorageError::Protocol);
            }
            if e.is_timeout() || e.is_connect() {
                return StorageError::HostUnavailable(text);
            }
        }
        if let Some(e) = cause.downcast_ref::<gix::protocol::transport::packetline::read::Error>() {
            return if DAEMON_NOT_FOUND.iter().any(|answer| e.message.as_slice().starts_with(answer)) {
                StorageError::RepositoryNotFound(text)
            } else {
                StorageError::Protocol(text)
            };
        }
        if let Some(gix::protocol::transport::client::Error::AuthenticationRefused(_)) = cause.downcast_ref() {
            return StorageError::CredentialsRefused;
        }
    }
    // gix's own classification sees into its nested errors and io payloads: a 401 arrives
    // as an io error of kind PermissionDenied inside them.
    if gix::error::classify(err).is_unauthenticated() || gix::error::classify(err).is_permission_denied() {
        return StorageError::CredentialsRefused;
    }
    let io_kinds: Vec<std::io::ErrorKind> =
        causes().filter_map(|e| e.downcast_ref::<std::io::Error>()).map(std::io::Error::kind).collect();
    // gix's HTTP transport reports a 401 as PermissionDenied.
    if io_kinds.contains(&std::io::ErrorKind::PermissionDenied) {
        return StorageError::CredentialsRefused;
    }
    match io_kinds.first() {
        Some(kind) if is_broken_connection(*kind) => StorageError::ConnectionDropped(text),
        Some(_) => StorageError::HostUnavailable(text),
        None => StorageError::Protocol(text),
    }
}

/// What an HTTP status of the git host means, the one table for every HTTP request:
/// `Ok(None)` for a status that is no failure, `Err(text)` for one that is not the host's to
/// explain (a redirect, a 4xx other than auth and not found: the caller decides).
pub(crate) fn http_status(status: u16, text: String) -> Result<StorageError, String> {
    match status {
        401 | 403 => Ok(StorageError::CredentialsRefused),
        404 => Ok(StorageError::RepositoryNotFound(text)),
        s if (500..600).contains(&s) && s != 501 => Ok(StorageError::HostUnavailable(text)),
        _ => Err(text),
    }
}

/// `err` and all its causes; an io error may carry its cause inside (`io::Error::get_ref`)
/// rather than as `source`, so those are followed too.
fn causes<'a>(err: &'a (dyn StdError + 'static)) -> Vec<&'a (dyn StdError + 'static)> {
    let mut out = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        out.push(e);
        next = match e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn StdError + 'static)),
            None => e.source(),
        };
    }
    out
}

/// Errors of a connection that was established and then dropped by the other side.
fn is_broken_connection(kind: std::io::ErrorKind) -> bool {
    use std::io::ErrorKind::*;
    matches!(kind, ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof)
}

/// Run `attempt` up to three times while it fails before the server could act
/// ([`StorageError::may_resend_at_once`]), with a short jittered pause.
pub(crate) fn retrying<T>(
    ctx: &RequestContext,
    mut attempt: impl FnMut() -> Result<T, StorageError>,
) -> Result<T, StorageError> {
    const ATTEMPTS: u32 = 3;
    let mut tries = 1;
    loop {
        match attempt() {
            Ok(value) => return Ok(value),
            Err(error) if error.may_resend_at_once() && tries < ATTEMPTS => {
                tracing::debug!(%error, attempt = tries, "git connection broke; trying again");
                if !ctx.pause(Duration::from_millis(fastrand::u64(20..120) * u64::from(tries))) {
                    return Err(StorageError::DeadlineExceeded("while retrying a broken connection"));
                }
                tries += 1;
            }
            Err(failed) => return Err(failed),
        }
    }
}

/// The messages of an error and its causes, joined, for logs: URLs in them lose their query.
pub(crate) fn chain(err: &dyn StdError) -> String {
    without_url_queries(&messages(err))
}

/// Every URL-looking word of `text` cut at its `?` (DESIGN §9: URLs are logged without their query).
fn without_url_queries(text: &str) -> String {
    text.split(' ')
        .map(|word| match (word.contains("://"), word.find('?')) {
            (true, Some(q)) => {
                let tail: String = word[q..].chars().skip_while(|c| !matches!(c, '"' | '\'' | ')' | ',')).collect();
                format!("{}{tail}", &word[..q])
            }
            _ => word.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn messages(err: &dyn StdError) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let next = e.to_string();
        if !out.ends_with(&next) {
            out.push_str(": ");
            out.push_str(&next);
        }
        source = e.source();
    }
    out
}

/// Open a transport to `url` that will ask for protocol `version` in its handshake.
/// No handshake happens here. Every socket wait is bounded by the context's deadline.
pub(crate) fn connect(
    url: &RepoUrl,
    version: Protocol,
    ctx: &RequestContext,
) -> Result<Box<dyn Transport + Send>, StorageError> {
    if ctx.out_of_time() {
        return Err(StorageError::DeadlineExceeded("before connecting"));
    }
    match url.scheme() {
        Scheme::Git => Ok(Box::new(connect_daemon(url, version, ctx)?)),
        Scheme::Http | Scheme::Https => connect_http(url, version, ctx),
        Scheme::Ssh => Ok(Box::new(super::ssh::connect(url, version, ctx)?)),
    }
}

fn connect_http(
    url: &RepoUrl,
    version: Protocol,
    ctx: &RequestContext,
) -> Result<Box<dyn Transport + Send>, StorageError> {
    use gix::protocol::transport::client::blocking_io::connect;
    let creds = ctx.credentials();
    if creds.is_some() && url.scheme() == Scheme::Http && !url.is_loopback() {
        // A policy of ours, not the host's answer: permanent.
        return Err(StorageError::Protocol(format!(
            "refusing to send credentials in clear text to {url}; use https://"
        )));
    }
    let options = connect::Options { version, ..Default::default() };
    let mut transport = connect::connect(url.to_gix(), options).map_err(|e| classify(url, ctx, &e))?;
    transport.configure(&http_options(ctx)).map_err(|e| StorageError::Local(format!("cannot configure HTTP: {e}")))?;
    // Sent with the first request: no 401 round trip, and never git's credential helpers.
    if let Some(c) = creds {
        transport.set_identity(account(c)).map_err(|e| classify(url, ctx, &e))?;
    }
    Ok(transport)
}

/// HTTP options whose client times out at the request's deadline. gix's fetch configures the
/// transport again from the repository's settings, so a fetch must hand these over too.
pub(crate) fn http_options(ctx: &RequestContext) -> gix::protocol::transport::client::blocking_io::http::Options {
    use gix::protocol::transport::client::blocking_io::http;
    let timeout = ctx.deadline.io_timeout(IO_TIMEOUT);
    let reqwest_options = http::reqwest::Options {
        configure_client: Some(Box::new(move |builder| {
            Ok(builder.timeout(timeout).connect_timeout(timeout.min(CONNECT_TIMEOUT)).tcp_nodelay(true))
        })),
        configure_request: None,
    };
    let backend: Arc<Mutex<dyn std::any::Any + Send + Sync + 'static>> = Arc::new(Mutex::new(reqwest_options));
    http::Options { backend: Some(backend), ..Default::default() }
}

fn account(c: &Credentials) -> gix::sec::identity::Account {
    gix::sec::identity::Account {
        username: c.username.clone(),
        password: c.password.clone(),
        oauth_refresh_token: None,
    }
}

/// A transport whose v0/v1 handshake comes without `symref=` capabilities. gix-protocol's v1
/// ref parser panics (`unreachable!`) when a symref names a ref the advertisement does not
/// list, as dulwich advertises an unborn `HEAD`; gitstate fetches refs by their full names
/// and needs no symref. Everything else passes through.
pub(crate) struct WithoutSymrefs(pub Box<dyn Transport + Send>);

impl gix::protocol::transport::client::TransportWithoutIO for WithoutSymrefs {
    fn set_identity(
        &mut self,
        identity: gix::sec::identity::Account,
    ) -> Result<(), gix::protocol::transport::client::Error> {
        self.0.set_identity(identity)
    }

    fn to_url(&self) -> std::borrow::Cow<'_, gix::bstr::BStr> {
        self.0.to_url()
    }

    fn supported_protocol_versions(&self) -> &[Protocol] {
        self.0.supported_protocol_versions()
    }

    fn connection_persists_across_multiple_requests(&self) -> bool {
        self.0.connection_persists_across_multiple_requests()
    }

    fn configure(&mut self, config: &dyn std::any::Any) -> Result<(), gix::Error> {
        self.0.configure(config)
    }
}

impl Transport for WithoutSymrefs {
    fn handshake<'a>(
        &mut self,
        service: gix::protocol::transport::Service,
        extra_parameters: &'a [(&'a str, Option<&'a str>)],
    ) -> Result<
        gix::protocol::transport::client::blocking_io::SetServiceResponse<'_>,
        gix::protocol::transport::client::Error,
    > {
        use gix::bstr::ByteSlice as _;
        let mut response = self.0.handshake(service, extra_parameters)?;
        if response.actual_protocol != Protocol::V2 {
            let kept: Vec<String> = response
                .capabilities
                .iter()
                .filter(|c| c.name() != b"symref".as_bstr())
                .map(|c| match c.value() {
                    Some(v) => format!("{}={}", c.name(), v),
                    None => c.name().to_string(),
                })
                .collect();
            if let Ok((caps, _)) =
                gix::protocol::transport::client::Capabilities::from_bytes(format!("\0{}", kept.join(" ")).as_bytes())
            {
                response.capabilities = caps;
            }
        }
        Ok(response)
    }

    fn request(
        &mut self,
        write_mode: gix::protocol::transport::client::WriteMode,
        on_into_read: gix::protocol::transport::client::MessageKind,
        trace: bool,
    ) -> Result<gix::protocol::transport::client::blocking_io::RequestWriter<'_>, gix::protocol::transport::client::Error>
    {
        self.0.request(write_mode, on_into_read, trace)
    }
}

/// A git:// connection on our own socket: gix's connector sets neither TCP_NODELAY (a
/// delayed-ACK round, ~40 ms, per exchange) nor timeouts from our deadline.
fn connect_daemon(
    url: &RepoUrl,
    version: Protocol,
    ctx: &RequestContext,
) -> Result<Connection<TcpStream, TcpStream>, StorageError> {
    let unavailable = |what: &str, e: std::io::Error| -> StorageError {
        if ctx.out_of_time() {
            StorageError::DeadlineExceeded("while connecting")
        } else {
            StorageError::HostUnavailable(format!("{what} {url}: {e}"))
        }
    };
    let host = url.host().trim_start_matches('[').trim_end_matches(']');
    let addrs = (host, url.port()).to_socket_addrs().map_err(|e| unavailable("cannot resolve", e))?;
    let mut last_err = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, ctx.deadline.io_timeout(CONNECT_TIMEOUT)) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last_err = e,
        }
    }
    let read = stream.ok_or_else(|| unavailable("cannot connect to", last_err))?;
    let timeout = ctx.deadline.io_timeout(IO_TIMEOUT);
    read.set_nodelay(true)
        .and_then(|()| read.set_read_timeout(Some(timeout)))
        .and_then(|()| read.set_write_timeout(Some(timeout)))
        .map_err(|e| unavailable("cannot configure socket for", e))?;
    let write = read.try_clone().map_err(|e| unavailable("cannot configure socket for", e))?;
    let gix_url = url.to_gix();
    Ok(Connection::new(
        read,
        write,
        version,
        gix_url.path.clone(),
        Some((url.host().to_owned(), gix_url.port)),
        ConnectMode::Daemon,
        false,
    )
    .custom_url(Some(gix_url.to_bstring())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logged_urls_lose_their_query() {
        assert_eq!(
            without_url_queries("GET http://h/r.git/info/refs?service=git-upload-pack: 404"),
            "GET http://h/r.git/info/refs 404"
        );
        assert_eq!(without_url_queries("url \"http://h/x?token=abc\" failed"), "url \"http://h/x\" failed");
        assert_eq!(without_url_queries("is this? fine"), "is this? fine");
    }
}
