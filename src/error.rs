//! The one table from error to HTTP status. Rejections are 4xx, trouble with
//! the git host is 502/503 (Terraform retries those), our own failures 500.
//! Internal detail is logged here, never put in a response body.

use bytes::Bytes;
use http::{header, Response, StatusCode};

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
    /// A bug or an unexpected local failure (e.g. a panicked worker).
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StorageError> for Error {
    fn from(e: StorageError) -> Self {
        Error::Backend(BackendError::Storage(e))
    }
}

impl Error {
    /// The status of this error: the only place where one is chosen.
    pub fn status(&self) -> StatusCode {
        use BackendError as B;
        use ProtocolError as P;
        match self {
            Error::Protocol(P::BadRequest(_)) => StatusCode::BAD_REQUEST,
            Error::Protocol(P::NotFound(_)) => StatusCode::NOT_FOUND,
            Error::Protocol(P::MethodNotAllowed { .. }) => StatusCode::METHOD_NOT_ALLOWED,
            Error::Protocol(P::PayloadTooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::RepositoryNotAllowed => StatusCode::FORBIDDEN,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::ResponseTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::Backend(B::Locked { .. }) => StatusCode::LOCKED,
            Error::Backend(B::WrongLockId { .. } | B::NotLocked(_) | B::PathConflict(_) | B::StaleState(_)) => {
                StatusCode::CONFLICT
            }
            Error::Backend(B::NoLock) => StatusCode::NOT_FOUND,
            Error::Backend(B::Contended { .. }) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Backend(B::Storage(StorageError::Unavailable(_))) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Backend(B::Storage(StorageError::Protocol(_))) => StatusCode::BAD_GATEWAY,
            Error::Backend(B::Storage(StorageError::AuthRejected)) => StatusCode::UNAUTHORIZED,
            Error::Backend(B::Storage(StorageError::Local(_))) | Error::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// The response for this error. Lock conflicts carry the holder's LockInfo, as Terraform expects.
    pub fn into_response(self) -> Response<Bytes> {
        let status = self.status();
        let mut b = Response::builder().status(status);
        let mut content_type = "text/plain; charset=utf-8";
        let body = match self {
            Error::Backend(BackendError::Locked { holder } | BackendError::WrongLockId { holder }) => {
                content_type = "application/json";
                holder
            }
            Error::Unauthorized(_) | Error::Backend(BackendError::Storage(StorageError::AuthRejected)) => {
                b = b.header(header::WWW_AUTHENTICATE, "Basic realm=\"gitstate\", charset=\"UTF-8\"");
                Bytes::from(format!("{}\n", public_text(&self)))
            }
            Error::Protocol(ProtocolError::MethodNotAllowed { allow, .. }) => {
                b = b.header(header::ALLOW, allow);
                Bytes::from(format!("method not allowed on this address; allowed: {allow}\n"))
            }
            Error::Backend(BackendError::Contended { .. })
            | Error::Backend(BackendError::Storage(StorageError::Unavailable(_))) => {
                b = b.header(header::RETRY_AFTER, "1");
                Bytes::from(format!("{}\n", public_text(&self)))
            }
            other => Bytes::from(format!("{}\n", public_text(&other))),
        };
        b.header(header::CONTENT_TYPE, content_type).body(body).expect("static response parts are valid")
    }
}

/// What a caller may read. Storage and internal detail stays in the log.
fn public_text(e: &Error) -> String {
    match e {
        Error::Backend(BackendError::Storage(StorageError::Unavailable(_))) => {
            "the git host is unavailable; try again".into()
        }
        Error::Backend(BackendError::Storage(StorageError::Protocol(_))) => {
            "the git host gave an unexpected answer; try again".into()
        }
        Error::Backend(BackendError::Storage(StorageError::AuthRejected)) => {
            "the git host refused these credentials".into()
        }
        Error::Backend(BackendError::Storage(StorageError::Local(_))) | Error::Internal(_) => {
            "internal error; see the server log".into()
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_its_status_and_no_internal_text_leaks() {
        let holder = Bytes::from_static(br#"{"ID":"x"}"#);
        let cases: Vec<(Error, u16)> = vec![
            (ProtocolError::BadRequest("bad".into()).into(), 400),
            (ProtocolError::NotFound("x".into()).into(), 404),
            (ProtocolError::MethodNotAllowed { method: "PATCH".into(), allow: "GET" }.into(), 405),
            (ProtocolError::PayloadTooLarge { limit: 1 }.into(), 413),
            (Error::RepositoryNotAllowed, 403),
            (Error::ResponseTooLarge { size: 9, limit: 1 }, 413),
            (BackendError::Locked { holder: holder.clone() }.into(), 423),
            (BackendError::WrongLockId { holder: holder.clone() }.into(), 409),
            (BackendError::NotLocked("x".into()).into(), 409),
            (BackendError::NoLock.into(), 404),
            (BackendError::StaleState("x".into()).into(), 409),
            (BackendError::Contended { attempts: 3 }.into(), 503),
            (StorageError::Unavailable("secret-host detail".into()).into(), 503),
            (StorageError::Protocol("secret-host detail".into()).into(), 502),
            (StorageError::AuthRejected.into(), 401),
            (crate::auth::AuthError::Missing.into(), 401),
            (StorageError::Local("secret-host detail".into()).into(), 500),
        ];
        for (e, code) in cases {
            let r = e.into_response();
            assert_eq!(r.status().as_u16(), code);
            assert!(!String::from_utf8_lossy(r.body()).contains("secret-host"));
        }
        let r = Error::from(BackendError::Locked { holder: holder.clone() }).into_response();
        assert_eq!(r.body(), &holder);
        let r =
            Error::from(ProtocolError::MethodNotAllowed { method: "PATCH".into(), allow: "GET, POST" }).into_response();
        assert_eq!(r.headers()["allow"], "GET, POST");
        let r = Error::from(BackendError::Contended { attempts: 3 }).into_response();
        assert!(r.headers().contains_key("retry-after"));
    }
}
