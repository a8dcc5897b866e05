//! The admin listener: `/health`, `/stats` (JSON), `/metrics` (Prometheus text), and
//! `DELETE /objects` to purge one object. Reads are open to whoever can reach the listener;
//! anything that changes state needs `Authorization: Bearer <admin.token>`.

use std::convert::Infallible;
use std::sync::Arc;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::key::CacheKey;
use crate::node::Node;
use crate::origin::normalise_host;
use crate::serve::{text_response, ResponseBody};

/// Handles one admin request.
pub async fn handle(
    node: Arc<Node>,
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let path = request.uri().path();
    let response = match (request.method(), path) {
        (&Method::GET | &Method::HEAD, "/health") => text_response(StatusCode::OK, "ok"),
        (&Method::GET | &Method::HEAD, "/stats") => {
            let snapshot = node.stats_snapshot();
            let mut body = serde_json::to_vec_pretty(&snapshot).expect("stats serialise");
            body.push(b'\n');
            typed(body, "application/json")
        }
        (&Method::GET | &Method::HEAD, "/metrics") => {
            node.refresh_gauges();
            typed(
                node.stats.prometheus_text().into_bytes(),
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
        }
        (&Method::DELETE, "/objects") => {
            if !authorised(&node, &request) {
                let mut response =
                    text_response(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return Ok(response);
            }
            purge(&node, request.uri().query().unwrap_or(""))
        }
        (_, "/health" | "/stats" | "/metrics" | "/objects") => {
            text_response(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here")
        }
        _ => text_response(
            StatusCode::NOT_FOUND,
            "unknown admin path; try /health, /stats, /metrics or DELETE /objects",
        ),
    };
    Ok(response)
}

fn typed(body: Vec<u8>, content_type: &'static str) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::full(body));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Compares the bearer token in constant time, so its length-prefix cannot be probed by timing.
fn authorised(node: &Node, request: &Request<Incoming>) -> bool {
    let Some(presented) = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
    else {
        return false;
    };
    let expected = node.admin_token.as_bytes();
    let presented = presented.trim().as_bytes();
    presented.len() == expected.len()
        && presented
            .iter()
            .zip(expected)
            .fold(0u8, |difference, (a, b)| difference | (a ^ b))
            == 0
}

/// `DELETE /objects?origin=<host>&path=<path and query>` removes one object and its files.
fn purge(node: &Node, query: &str) -> Response<ResponseBody> {
    let mut origin = None;
    let mut path = None;
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        match name.as_ref() {
            "origin" => origin = normalise_host(&value),
            "path" => path = Some(value.into_owned()),
            _ => {}
        }
    }
    let (Some(origin), Some(path)) = (origin, path) else {
        return text_response(
            StatusCode::BAD_REQUEST,
            "use DELETE /objects?origin=<host>&path=<url-encoded path and query>",
        );
    };
    let key = CacheKey::new(&origin, &path);
    match node.index.get(&key) {
        Some(entry) => {
            node.index.remove(&entry);
            text_response(StatusCode::OK, format!("purged {}", key.as_str()))
        }
        None => text_response(
            StatusCode::NOT_FOUND,
            format!("not cached: {}", key.as_str()),
        ),
    }
}
