//! `gitstate serve`: the backend as a plain local HTTP server over the same
//! [`App::handle`] the Lambda entry uses. HTTP/1.1 through hyper; bodies are
//! collected (bounded by the configured limit) and handed over whole.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::app::App;
use crate::error::Error;
use crate::protocol::ProtocolError;

/// Bind `listen`, print the backend block to paste, and serve until the process ends.
pub async fn run(app: Arc<App>, listen: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    let local = listener.local_addr()?;
    println!("{}", banner(&app, local));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let app = Arc::clone(&app);
                async move { Ok::<_, Infallible>(respond(&app, req).await) }
            });
            if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
}

async fn respond(app: &Arc<App>, req: http::Request<hyper::body::Incoming>) -> http::Response<Full<Bytes>> {
    let limit = app.config().max_body_bytes;
    let (parts, body) = req.into_parts();
    let response = match Limited::new(body, limit).collect().await {
        Ok(collected) => app.handle(http::Request::from_parts(parts, collected.to_bytes())).await,
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            Error::from(ProtocolError::PayloadTooLarge { limit }).into_response()
        }
        Err(e) => {
            Error::from(ProtocolError::BadRequest(format!("could not read the request body: {e}"))).into_response()
        }
    };
    response.map(Full::new)
}

/// The start-up text: where states go and the block a Terraform user pastes.
pub fn banner(app: &App, local: SocketAddr) -> String {
    let base = format!("http://{local}");
    format!(
        "gitstate listening on {base}, storing states in {storage} (branch {branch})\n\
         Paste this into your Terraform configuration:\n\n\
         terraform {{\n  backend \"http\" {{\n    \
         address        = \"{base}/state/terraform.tfstate\"\n    \
         lock_address   = \"{base}/state/terraform.tfstate\"\n    \
         unlock_address = \"{base}/state/terraform.tfstate\"\n  }}\n}}\n",
        storage = app.describe_storage(),
        branch = app.config().branch,
    )
}
