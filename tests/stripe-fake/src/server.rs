//! The HTTP/1.1 server: accepts connections, reads each request whole and hands it to the control
//! endpoints or the API pipeline. A service error closes the connection without an answer, which
//! is how injected faults drop answers and reset connections.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming as Body;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::control;
use crate::error::ApiError;
use crate::ids;
use crate::pipeline::{self, Abort, HttpResponse, Incoming, Reply};
use crate::shared::Shared;

/// Stripe refuses larger bodies too; this keeps a hostile client from filling memory.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// How long requests under way may finish after shutdown is asked for.
const DRAIN: Duration = Duration::from_secs(2);

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let graceful = GracefulShutdown::new();
    let builder = http1::Builder::new();
    loop {
        let stream = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of file descriptors and the like: pause instead of spinning.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        // Small JSON answers on keep-alive connections would otherwise wait for Nagle (40 ms).
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let service = service_fn(move |request| respond(shared.clone(), request));
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            // Errors here are clients hanging up and injected aborts; nothing to report.
            let _ = connection.await;
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(DRAIN, graceful.shutdown()).await;
}

async fn respond(shared: Arc<Shared>, request: Request<Body>) -> Result<HttpResponse, Abort> {
    let request_id = ids::request_id();
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            let error = ApiError::invalid_request(
                "The request body could not be read or is larger than 1 MiB.",
            );
            return Ok(Reply::error(&error).into_response(&request_id));
        }
    };
    let incoming = Incoming {
        method: parts.method,
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts.headers,
        body,
        request_id,
    };
    if incoming.path == "/_fake" || incoming.path.starts_with("/_fake/") {
        return Ok(control::handle(&shared, &incoming));
    }
    // Detached from the connection: when a client gives up (a timeout) hyper drops this future,
    // but Stripe would still finish the request and store its answer, so a retry with the same
    // key sees 409 and then the replay. That is the case exactly-once code must survive.
    let request_id = incoming.request_id.clone();
    match tokio::spawn(async move { pipeline::handle(&shared, incoming).await }).await {
        Ok(answer) => answer,
        Err(_) => Ok(Reply::error(&ApiError::internal_retryable()).into_response(&request_id)),
    }
}
