//! The one table from error to HTTP status. Rejections are 4xx; trouble with the git
//! host that may pass is 503 with `Retry-After`; a host that refuses for good or answers
//! nonsense is 4xx/502 without it; our own failures 500. Internal detail is logged, never
//! put in a response body.

use bytes::Bytes;
use http::{header, Response, StatusCode};

use crate::backend::sealing::SealError;
use crate::backend::BackendError;
use crate::protocol::ProtocolError;
use crate::storage::StorageError;

/// Any failure of a request, from any layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The caller did not authenticate to the backend.
    #[error(transparent)]
    Unauthorized(#[from] crate::auth::AuthError),
    /// The `repository` parameter names a repository this server does not serve.
    #[error("the repository is not allowed on this server")]
    RepositoryNotAllowed,
    /// The answer would exceed what the entry point can return (Lambda: 6 MB).
    #[error("the state is {size} bytes, above this deployment's response limit of {limit} bytes; serve it with `gitstate serve` (no limit) or split the state")]
    ResponseTooLarge { size: usize, limit: usize },
    /// The request's deadline passed before the work finished.
    #[error("the request ran out of time; retry later")]
    DeadlineExceeded,
    /// Too much work on other repositories is in flight (`GITSTATE_MAX_BLOCKING`): refused at once.
    #[error("too many requests on other repositories are in flight; retry later")]
    Overloaded,
    /// `serve`: the memory for request bodies stayed taken by other requests.
    #[error("the server is busy reading other bodies; retry later")]
    BodyMemoryBusy,
    /// `serve`: the request body did not arrive in time.
    #[error("the request body did not arrive within {seconds} seconds")]
    BodyTooSlow { seconds: f64 },
    /// A bug or an unexpected local failure (e.g. a panicked worker).
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StorageError> for Error {
    fn from(e: StorageError) -> Self {
        Error::Backend(BackendError::Storage(e))
    }
}

/// How a caller should treat an answer besides its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hint {
    /// A plain rejection or failure: the body says why.
    Plain,
    /// Transient: `Retry-After`.
    Retry,
    /// Asks for (other) basic auth: `WWW-Authenticate`.
    Challenge,
    /// Carries the holder's LockInfo JSON, as Terraform expects.
    Holder,
    /// Lists the allowed methods.
    Allow,
}

impl Error {
    /// The status of this error: the only place where one is chosen.
    pub fn status(&self) -> StatusCode {
        self.classify().0
    }

    fn classify(&self) -> (StatusCode, Hint) {
        use BackendError as B;
        use Hint::*;
        use ProtocolError as P;
        use StatusCode as S;
        use StorageError as St;
        match self {
            Error::Protocol(P::BadRequest(_)) => (S::BAD_REQUEST, Plain),
            Error::Protocol(P::NotFound(_)) => (S::NOT_FOUND, Plain),
            Error::Protocol(P::MethodNotAllowed { .. }) => (S::METHOD_NOT_ALLOWED, Allow),
            Error::Protocol(P::PayloadTooLarge { .. }) => (S::PAYLOAD_TOO_LARGE, Plain),
            Error::Protocol(P::Forbidden(_)) => (S::FORBIDDEN, Plain),
            Error::RepositoryNotAllowed => (S::FORBIDDEN, Plain),
            Error::Unauthorized(_) => (S::UNAUTHORIZED, Challenge),
            Error::ResponseTooLarge { .. } => (S::PAYLOAD_TOO_LARGE, Plain),
            Error::DeadlineExceeded | Error::Overloaded | Error::BodyMemoryBusy => (S::SERVICE_UNAVAILABLE, Retry),
            Error::BodyTooSlow { .. } => (S::REQUEST_TIMEOUT, Plain),
            Error::Internal(_) => (S::INTERNAL_SERVER_ERROR, Plain),
            Error::Backend(b) => match b {
                B::Locked { .. } => (S::LOCKED, Holder),
                B::WrongLockId { .. } => (S::CONFLICT, Holder),
                B::NotLocked(_) | B::StaleState(_) | B::NestedLock(_) => (S::CONFLICT, Plain),
                B::NoLock | B::NoSuchVersion | B::UnknownCursor(_) => (S::NOT_FOUND, Plain),
                B::StoredNotAState { .. } => (S::INTERNAL_SERVER_ERROR, Plain),
                B::NotRestorable(_) | B::Diff(_) => (S::UNPROCESSABLE_ENTITY, Plain),
                B::Contended { .. } | B::DeadlineExceeded { .. } => (S::SERVICE_UNAVAILABLE, Retry),
                B::Sealing(SealError::KeyServiceUnavailable(_)) => (S::SERVICE_UNAVAILABLE, Retry),
                B::Sealing(SealError::CannotOpen { .. } | SealError::Damaged(_) | SealError::KeyServiceRefused(_)) => {
                    (S::INTERNAL_SERVER_ERROR, Plain)
                }
                // The one rule for "try again": the storage layer's own predicate.
                B::Storage(st) if st.is_spurious() => (S::SERVICE_UNAVAILABLE, Retry),
                B::Storage(st) => match st {
                    St::PathConflict { .. } => (S::CONFLICT, Plain),
                    // Transient, so answered by the arm above; named here only to be exhaustive.
                    St::HostUnavailable(_)
                    | St::ConnectionDropped(_)
                    | St::DeadlineExceeded(_)
                    | St::OutcomeUnknown(_) => (S::SERVICE_UNAVAILABLE, Retry),
                    St::CredentialsRefused => (S::UNAUTHORIZED, Challenge),
                    // The host refused this change by its own rules: trying again changes nothing.
                    St::PushRefused { .. } => (S::CONFLICT, Plain),
                    St::RepositoryNotFound(_)
                    | St::Protocol(_)
                    | St::CertificateRefused(_)
                    | St::HostKeyRefused { .. }
                    | St::SshKeyRefused { .. } => (S::BAD_GATEWAY, Plain),
                    St::CacheCorrupt(_) | St::Local(_) => (S::INTERNAL_SERVER_ERROR, Plain),
                },
            },
        }
    }

    /// The response for this error.
    pub fn into_response(self) -> Response<Bytes> {
        let (status, kind) = self.classify();
        let mut b = Response::builder().status(status);
        match kind {
            Hint::Plain => {}
            Hint::Retry => b = b.header(header::RETRY_AFTER, "1"),
            Hint::Challenge => b = b.header(header::WWW_AUTHENTICATE, "Basic realm=\"gitstate\", charset=\"UTF-8\""),
            Hint::Allow => {
                if let Error::Protocol(ProtocolError::MethodNotAllowed { allow, .. }) = &self {
                    b = b.header(header::ALLOW, *allow);
                }
            }
            Hint::Holder => {
                if let Error::Backend(BackendError::Locked { holder } | BackendError::WrongLockId { holder }) = self {
                    return b
                        .header(header::CONTENT_TYPE, "application/json")
                        .body(holder)
                        .expect("static response parts are valid");
                }
            }
        }
        b.header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(Bytes::from(format!("{}\n", public_text(&self))))
            .expect("static response parts are valid")
    }
}

/// What a caller may read. Storage and internal detail stays in the log.
fn public_text(e: &Error) -> String {
    use StorageError as St;
    if let Error::Backend(BackendError::Sealing(seal)) = e {
        return match seal {
            // Names the key it needs, never key material.
            SealError::CannotOpen { .. } => seal.to_string(),
            SealError::Damaged(_) => "the stored state is damaged and cannot be decrypted; see the server log".into(),
            SealError::KeyServiceUnavailable(_) => "the key service (AWS KMS) is unavailable; try again".into(),
            SealError::KeyServiceRefused(_) => "the key service (AWS KMS) refused; see the server log".into(),
        };
    }
    let Error::Backend(BackendError::Storage(st)) = e else {
        return match e {
            Error::Internal(_) => "internal error; see the server log".into(),
            Error::Protocol(ProtocolError::MethodNotAllowed { allow, .. }) => {
                format!("method not allowed on this address; allowed: {allow}")
            }
            other => other.to_string(),
        };
    };
    match st {
        St::PathConflict { .. } => st.to_string(),
        St::HostUnavailable(_) | St::ConnectionDropped(_) => "the git host is unavailable; try again".into(),
        St::DeadlineExceeded(_) => "the git host did not answer in time; try again".into(),
        St::OutcomeUnknown(_) => "the git host's answer was lost; try again".into(),
        St::CredentialsRefused => "the git host refused these credentials".into(),
        St::CertificateRefused(_) => {
            "the git host's TLS certificate was refused (untrusted issuer, expired, or issued for another name); see the server log".into()
        }
        // Host names and key fingerprints are public: whoever runs gitstate needs them to act.
        St::HostKeyRefused { host, fingerprint } => format!(
            "the SSH host key of {host} ({fingerprint}) is not the one pinned in GITSTATE_SSH_KNOWN_HOSTS; not trusted"
        ),
        St::SshKeyRefused { host } => {
            format!("{host} refused this deployment's SSH key (GITSTATE_SSH_KEY); the backend's operator must fix it")
        }
        St::RepositoryNotFound(_) => "the repository does not exist on the git host (or these credentials cannot see it); check the repository URL".into(),
        St::PushRefused { reference, .. } => format!(
            "the git host refused to update {reference} (a hook, a protected branch or a deletion rule); see the server log"
        ),
        St::Protocol(_) => "the git host gave an unexpected answer; see the server log".into(),
        St::CacheCorrupt(_) | St::Local(_) => "internal error; see the server log".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Stale;

    /// One row per variant. Adding a variant without a row fails to compile in `row`'s match
    /// (every variant must be named there), and the table checks status, headers and leaks.
    fn row(e: &Error) -> &'static str {
        use BackendError as B;
        use ProtocolError as P;
        use StorageError as St;
        match e {
            Error::Protocol(P::BadRequest(_)) => "bad request",
            Error::Protocol(P::NotFound(_)) => "no such address",
            Error::Protocol(P::MethodNotAllowed { .. }) => "method",
            Error::Protocol(P::PayloadTooLarge { .. }) => "body too large",
            Error::Protocol(P::Forbidden(_)) => "forbidden form",
            Error::RepositoryNotAllowed => "not allowed",
            Error::Unauthorized(_) => "unauthorized",
            Error::ResponseTooLarge { .. } => "response too large",
            Error::DeadlineExceeded => "deadline",
            Error::Overloaded => "overloaded",
            Error::BodyMemoryBusy => "body memory busy",
            Error::BodyTooSlow { .. } => "body too slow",
            Error::Internal(_) => "internal",
            Error::Backend(B::Locked { .. }) => "locked",
            Error::Backend(B::WrongLockId { .. }) => "wrong id",
            Error::Backend(B::NotLocked(_)) => "not locked",
            Error::Backend(B::StaleState(_)) => "stale",
            Error::Backend(B::NoLock) => "no lock",
            Error::Backend(B::NestedLock(_)) => "nested lock",
            Error::Backend(B::NoSuchVersion) => "no such version",
            Error::Backend(B::UnknownCursor(_)) => "unknown cursor",
            Error::Backend(B::StoredNotAState { .. }) => "stored not a state",
            Error::Backend(B::NotRestorable(_)) => "not restorable",
            Error::Backend(B::Diff(_)) => "diff",
            Error::Backend(B::Contended { .. }) => "contended",
            Error::Backend(B::DeadlineExceeded { .. }) => "backend deadline",
            Error::Backend(B::Sealing(SealError::CannotOpen { .. })) => "cannot open",
            Error::Backend(B::Sealing(SealError::Damaged(_))) => "damaged",
            Error::Backend(B::Sealing(SealError::KeyServiceUnavailable(_))) => "kms unavailable",
            Error::Backend(B::Sealing(SealError::KeyServiceRefused(_))) => "kms refused",
            Error::Backend(B::Storage(St::PathConflict { .. })) => "path conflict",
            Error::Backend(B::Storage(St::CacheCorrupt(_))) => "cache corrupt",
            Error::Backend(B::Storage(St::HostUnavailable(_))) => "host unavailable",
            Error::Backend(B::Storage(St::ConnectionDropped(_))) => "connection dropped",
            Error::Backend(B::Storage(St::CredentialsRefused)) => "credentials refused",
            Error::Backend(B::Storage(St::CertificateRefused(_))) => "certificate refused",
            Error::Backend(B::Storage(St::RepositoryNotFound(_))) => "repository not found",
            Error::Backend(B::Storage(St::HostKeyRefused { .. })) => "host key refused",
            Error::Backend(B::Storage(St::SshKeyRefused { .. })) => "ssh key refused",
            Error::Backend(B::Storage(St::PushRefused { .. })) => "push refused",
            Error::Backend(B::Storage(St::Protocol(_))) => "protocol",
            Error::Backend(B::Storage(St::DeadlineExceeded(_))) => "storage deadline",
            Error::Backend(B::Storage(St::OutcomeUnknown(_))) => "outcome unknown",
            Error::Backend(B::Storage(St::Local(_))) => "local",
        }
    }

    #[test]
    fn every_error_has_its_status_and_no_internal_text_leaks() {
        let holder = Bytes::from_static(br#"{"ID":"x"}"#);
        let secret = "secret-host detail";
        // (error, status, Retry-After, WWW-Authenticate)
        let cases: Vec<(Error, u16, bool, bool)> = vec![
            (ProtocolError::BadRequest("bad".into()).into(), 400, false, false),
            (ProtocolError::NotFound("x".into()).into(), 404, false, false),
            (ProtocolError::MethodNotAllowed { method: "PATCH".into(), allow: "GET" }.into(), 405, false, false),
            (ProtocolError::PayloadTooLarge { limit: 1 }.into(), 413, false, false),
            (ProtocolError::Forbidden("csrf".into()).into(), 403, false, false),
            (Error::RepositoryNotAllowed, 403, false, false),
            (crate::auth::AuthError::Missing.into(), 401, false, true),
            (Error::ResponseTooLarge { size: 9, limit: 1 }, 413, false, false),
            (Error::DeadlineExceeded, 503, true, false),
            (Error::Overloaded, 503, true, false),
            (Error::BodyMemoryBusy, 503, true, false),
            (Error::BodyTooSlow { seconds: 10.0 }, 408, false, false),
            (Error::Internal(secret.into()), 500, false, false),
            (BackendError::Locked { holder: holder.clone() }.into(), 423, false, false),
            (BackendError::WrongLockId { holder: holder.clone() }.into(), 409, false, false),
            (BackendError::NotLocked("x".into()).into(), 409, false, false),
            (BackendError::StaleState(Stale::SameSerial { serial: 1 }).into(), 409, false, false),
            (BackendError::NoLock.into(), 404, false, false),
            (BackendError::NestedLock("a/b".into()).into(), 409, false, false),
            (BackendError::NoSuchVersion.into(), 404, false, false),
            (BackendError::UnknownCursor(gix::ObjectId::null(gix::hash::Kind::Sha1)).into(), 404, false, false),
            (
                BackendError::StoredNotAState { path: "a".into(), why: crate::backend::decide::NotAState::NotUtf8(3) }
                    .into(),
                500,
                false,
                false,
            ),
            (BackendError::NotRestorable("not JSON").into(), 422, false, false),
            (
                BackendError::Diff(crate::backend::diff::DiffError::Empty { side: crate::backend::diff::Side::From })
                    .into(),
                422,
                false,
                false,
            ),
            (BackendError::Contended { attempts: 3 }.into(), 503, true, false),
            (BackendError::DeadlineExceeded { pushes: 1 }.into(), 503, true, false),
            (
                BackendError::Sealing(SealError::CannotOpen { needs: "AWS KMS key alias/k".into() }).into(),
                500,
                false,
                false,
            ),
            (BackendError::Sealing(SealError::Damaged(secret.into())).into(), 500, false, false),
            (BackendError::Sealing(SealError::KeyServiceUnavailable(secret.into())).into(), 503, true, false),
            (BackendError::Sealing(SealError::KeyServiceRefused(secret.into())).into(), 500, false, false),
            (
                StorageError::PathConflict { path: "a/b".into(), blocker: "a".into(), blocker_is_state: true }.into(),
                409,
                false,
                false,
            ),
            (StorageError::CacheCorrupt(secret.into()).into(), 500, false, false),
            (StorageError::HostUnavailable(secret.into()).into(), 503, true, false),
            (StorageError::ConnectionDropped(secret.into()).into(), 503, true, false),
            (StorageError::CredentialsRefused.into(), 401, false, true),
            (StorageError::RepositoryNotFound(secret.into()).into(), 502, false, false),
            (
                StorageError::PushRefused { reference: "refs/heads/main".into(), reason: secret.into() }.into(),
                409,
                false,
                false,
            ),
            (StorageError::Protocol(secret.into()).into(), 502, false, false),
            (StorageError::DeadlineExceeded("while reading").into(), 503, true, false),
            (StorageError::OutcomeUnknown(secret.into()).into(), 503, true, false),
            (StorageError::CertificateRefused(secret.into()).into(), 502, false, false),
            (
                StorageError::HostKeyRefused { host: "git.example.com".into(), fingerprint: "SHA256:abc".into() }
                    .into(),
                502,
                false,
                false,
            ),
            (StorageError::SshKeyRefused { host: "git.example.com".into() }.into(), 502, false, false),
            (StorageError::Local(secret.into()).into(), 500, false, false),
        ];
        let mut rows: Vec<&str> = cases.iter().map(|(e, ..)| row(e)).collect();
        rows.sort_unstable();
        rows.dedup();
        assert_eq!(rows.len(), cases.len(), "every variant has exactly one row");
        for (e, code, retry, challenge) in cases {
            let name = row(&e);
            let r = e.into_response();
            assert_eq!(r.status().as_u16(), code, "{name}");
            assert_eq!(r.headers().contains_key("retry-after"), retry, "{name}: Retry-After");
            assert_eq!(r.headers().contains_key("www-authenticate"), challenge, "{name}: WWW-Authenticate");
            assert!(!String::from_utf8_lossy(r.body()).contains("secret-host"), "{name} leaks");
            assert!(!r.body().is_empty(), "{name} says why");
        }
        // The SSH refusals name the host (and the key's fingerprint) for the operator.
        let body = |e: StorageError| String::from_utf8_lossy(Error::from(e).into_response().body()).into_owned();
        let text = body(StorageError::HostKeyRefused { host: "h.example".into(), fingerprint: "SHA256:xyz".into() });
        assert!(text.contains("h.example") && text.contains("SHA256:xyz"), "{text}");
        assert!(body(StorageError::SshKeyRefused { host: "h.example".into() }).contains("h.example"));
        let r = Error::from(BackendError::Locked { holder: holder.clone() }).into_response();
        assert_eq!(r.body(), &holder);
        assert_eq!(r.headers()["content-type"], "application/json");
        let r =
            Error::from(ProtocolError::MethodNotAllowed { method: "PATCH".into(), allow: "GET, POST" }).into_response();
        assert_eq!(r.headers()["allow"], "GET, POST");
    }
}
