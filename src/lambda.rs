//! The Lambda entry: API Gateway (REST v1, HTTP API v2) and function-URL events
//! in, `App::handle` over them, responses out. The App is built once per
//! execution environment, so the `/tmp` cache and what is known in memory survive warm invocations.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use lambda_http::{Body, Request, RequestExt, Response};

use crate::app::App;
use crate::context::Deadline;
use crate::error::Error;

/// The largest response Lambda returns from a synchronous invocation, less room for headers and JSON framing.
pub const MAX_RESPONSE_BYTES: usize = 6 * 1024 * 1024 - 64 * 1024;

/// Serve Lambda invocations until the runtime stops the process.
pub async fn serve_invocations(app: Arc<App>) -> Result<(), lambda_http::Error> {
    lambda_http::run(lambda_http::service_fn(move |event: Request| {
        let app = Arc::clone(&app);
        async move { Ok::<_, std::convert::Infallible>(handle_event(&app, event).await) }
    }))
    .await
}

/// One invocation: never an `Err` (API Gateway would turn it into an opaque 502 and Terraform would retry).
pub async fn handle_event(app: &Arc<App>, event: Request) -> Response<Body> {
    let context = event.lambda_context_ref();
    let request_id = context.map(|c| c.request_id.clone()).unwrap_or_default();
    let fallback = app.config().request_timeout;
    let deadline = context.map_or_else(|| Deadline::after(fallback), |c| invocation_deadline(c.deadline, fallback));
    let span = tracing::info_span!("invocation", aws_request_id = %request_id);
    let _guard = span.enter();
    let request = into_app_request(event);
    drop(_guard);
    let response = tracing::Instrument::instrument(app.handle_until(request, deadline), span.clone()).await;
    let _guard = span.enter();
    into_lambda_response(response)
}

/// Time kept back from the invocation's deadline: the answer must reach the runtime before
/// Lambda stops the instance (the app's grace after its own deadline fits in here).
const DEADLINE_MARGIN: Duration = Duration::from_millis(1500);

/// The invocation's deadline (milliseconds since the epoch) as our own, less the margin. A
/// deadline already past on arrival is none that Lambda sends (a local emulator sends one in
/// 1970): then the configured request budget (`GITSTATE_REQUEST_TIMEOUT`) applies.
fn invocation_deadline(deadline_ms: u64, fallback: Duration) -> Deadline {
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    if deadline_ms <= now_ms {
        return Deadline::after(fallback);
    }
    let left = Duration::from_millis(deadline_ms.saturating_sub(now_ms)).saturating_sub(DEADLINE_MARGIN);
    // Never less than a moment: a request that arrives late still gets its 503 rather than nothing.
    Deadline::after(left.max(Duration::from_millis(100)))
}

/// Route on the path without a REST v1 stage (`raw_http_path`); read the body whatever its variant.
pub fn into_app_request(event: Request) -> http::Request<Bytes> {
    let raw_path = event.raw_http_path().to_string();
    let (mut parts, body) = event.into_parts();
    if !raw_path.is_empty() {
        let path_and_query = match parts.uri.query() {
            Some(q) => format!("{raw_path}?{q}"),
            None => raw_path,
        };
        if let Ok(uri) = http::Uri::builder().path_and_query(path_and_query).build() {
            parts.uri = uri;
        }
    }
    let bytes = match body {
        Body::Empty => Bytes::new(),
        Body::Text(t) => Bytes::from(t),
        Body::Binary(b) => Bytes::from(b),
        _ => Bytes::new(),
    };
    http::Request::from_parts(parts, bytes)
}

/// Lambda's limit applies to the response as JSON, where a text body is escaped (an indented
/// state grows by about a tenth) and a binary one is base64.
fn serialized_len(body: &[u8]) -> usize {
    if std::str::from_utf8(body).is_err() {
        return body.len().div_ceil(3) * 4;
    }
    body.iter()
        .map(|&b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum()
}

/// Text bodies stay text (REST v1 without binary media types would hand base64 to the client otherwise).
pub fn into_lambda_response(response: http::Response<Bytes>) -> Response<Body> {
    let size = serialized_len(response.body());
    let response = if size > MAX_RESPONSE_BYTES {
        Error::ResponseTooLarge { size, limit: MAX_RESPONSE_BYTES }.into_response()
    } else {
        response
    };
    let (parts, body) = response.into_parts();
    let body = if body.is_empty() {
        Body::Empty
    } else {
        match String::from_utf8(body.to_vec()) {
            Ok(text) => Body::Text(text),
            Err(e) => Body::Binary(e.into_bytes()),
        }
    };
    Response::from_parts(parts, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_size_counts_json_escaping() {
        assert_eq!(serialized_len(b"ab"), 2);
        assert_eq!(serialized_len(b"\"a\"\n"), 7);
        assert_eq!(serialized_len(&[0xff, 0xfe, 0xfd]), 4);
        // A state just under the raw limit but over it once escaped is refused with a clear 413.
        let line = "    \"key\": \"value\",\n";
        let body = line.repeat(MAX_RESPONSE_BYTES / line.len());
        assert!(body.len() <= MAX_RESPONSE_BYTES);
        let r = into_lambda_response(http::Response::new(Bytes::from(body)));
        assert_eq!(r.status(), 413);
    }
}
