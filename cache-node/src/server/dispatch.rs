//! The client listener's dispatcher: every request on it is counted, a request that looped back
//! through this node is refused, and the rest go to the node's own API (`api::peering`) or to
//! the content handler (`serve`). The rule that tells them apart is the router's
//! ([`router::is_api_request`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use http::{header, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::http::sendfile::SpanQueue;
use crate::node::Node;
use crate::serve::{self, text_response, time_response, AccessRecord, ResponseBody};
use crate::upstream::router;

/// Handles one request on the client listener. Never fails: every problem becomes an HTTP
/// answer.
///
/// `spans` is the connection's zero-copy queue when its socket is a
/// [`crate::http::sendfile::ZeroCopyStream`].
pub async fn client_request(
    node: Arc<Node>,
    request: Request<Incoming>,
    spans: Option<SpanQueue>,
) -> Result<Response<ResponseBody>, Infallible> {
    let started = Instant::now();
    let stats = node.stats.clone();
    let Some(log) = &node.access_log else {
        let response = answer(node, request, spans).await?;
        return Ok(time_response(&stats, started, response));
    };
    let record = AccessRecord::start(log, &request, started);
    let response = answer(node, request, spans).await?;
    Ok(record.attach(time_response(&stats, started, response)))
}

/// The answer to a client request (see [`client_request`]).
async fn answer(
    node: Arc<Node>,
    request: Request<Incoming>,
    spans: Option<SpanQueue>,
) -> Result<Response<ResponseBody>, Infallible> {
    if node.client.is_own_loop(request.headers()) {
        node.stats.refused_requests.inc();
        return Ok(text_response(
            StatusCode::LOOP_DETECTED,
            "request loop: this request already passed through this cache node; an [[origin]] upstream or default_upstream points back at it",
        ));
    }
    let host_header = request
        .headers()
        .get(header::HOST)
        .and_then(|value| value.to_str().ok());
    // Every request on the client listener counts, the node's own API included: a manifest
    // request starts fills like a GET does.
    node.stats.requests.inc();
    if router::is_api_request(
        &node.allowlist.load(),
        request.version(),
        request.uri(),
        host_header,
    ) {
        return Ok(crate::api::peering::handle(node, request).await);
    }
    serve::handle(node, request, spans).await
}
