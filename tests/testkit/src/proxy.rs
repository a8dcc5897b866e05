//! [`MockProxy`]: a forward HTTP proxy on loopback, as a corporate proxy in front of the WAN. It
//! relays absolute-form requests (`GET http://host/path`) and `CONNECT host:port` tunnels, can
//! demand `Proxy-Authorization`, and records what it was asked.

use outpost_shared::sync::lock;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Empty};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// One request as the proxy received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxiedRequest {
    /// `GET`, `HEAD`, `CONNECT`...
    pub method: String,
    /// The request target: `http://host:port/path` or, for `CONNECT`, `host:port`.
    pub target: String,
    /// Its `Proxy-Authorization`, if any.
    pub authorization: Option<String>,
}

#[derive(Default)]
struct ProxyShared {
    requests: Mutex<Vec<ProxiedRequest>>,
    required_authorization: Option<String>,
}

/// A running forward proxy; dropping it stops accepting.
pub struct MockProxy {
    address: SocketAddr,
    shared: Arc<ProxyShared>,
    accept_loop: JoinHandle<()>,
}

type ProxyBody = BoxBody<Bytes, hyper::Error>;

impl MockProxy {
    /// Starts a proxy on 127.0.0.1:0 that lets everyone through.
    pub async fn start() -> MockProxy {
        Self::start_with(None).await
    }

    /// Starts a proxy that answers 407 unless `Proxy-Authorization` is exactly `authorization`.
    pub async fn start_requiring(authorization: &str) -> MockProxy {
        Self::start_with(Some(authorization.to_owned())).await
    }

    async fn start_with(required_authorization: Option<String>) -> MockProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("mock proxy: binding a loopback port failed");
        let address = listener.local_addr().expect("mock proxy: local address");
        let shared = Arc::new(ProxyShared {
            requests: Mutex::new(Vec::new()),
            required_authorization,
        });
        let accept_shared = Arc::clone(&shared);
        let accept_loop = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let shared = Arc::clone(&accept_shared);
                tokio::spawn(async move {
                    let service = service_fn(move |request| relay(Arc::clone(&shared), request));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        MockProxy {
            address,
            shared,
            accept_loop,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<ProxiedRequest> {
        lock(&self.shared.requests).clone()
    }
}

impl Drop for MockProxy {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

fn empty_response(status: StatusCode) -> Response<ProxyBody> {
    let mut response = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    *response.status_mut() = status;
    response
}

async fn relay(
    shared: Arc<ProxyShared>,
    mut request: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let authorization = request
        .headers()
        .get(header::PROXY_AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let target = if request.method() == Method::CONNECT {
        request
            .uri()
            .authority()
            .map(|authority| authority.to_string())
            .unwrap_or_default()
    } else {
        request.uri().to_string()
    };
    lock(&shared.requests).push(ProxiedRequest {
        method: request.method().to_string(),
        target: target.clone(),
        authorization: authorization.clone(),
    });
    if let Some(required) = &shared.required_authorization {
        if authorization.as_ref() != Some(required) {
            let mut response = empty_response(StatusCode::PROXY_AUTHENTICATION_REQUIRED);
            response.headers_mut().insert(
                header::PROXY_AUTHENTICATE,
                http::HeaderValue::from_static("Basic realm=\"mock\""),
            );
            return Ok(response);
        }
    }
    if request.method() == Method::CONNECT {
        let Ok(mut upstream) = TcpStream::connect(&target).await else {
            return Ok(empty_response(StatusCode::BAD_GATEWAY));
        };
        tokio::spawn(async move {
            if let Ok(upgraded) = hyper::upgrade::on(request).await {
                let mut client = TokioIo::new(upgraded);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            }
        });
        return Ok(empty_response(StatusCode::OK));
    }
    // Absolute form: connect to the named origin and ask it in origin form.
    let Some(authority) = request.uri().authority().cloned() else {
        return Ok(empty_response(StatusCode::BAD_REQUEST));
    };
    let host_port = if authority.port().is_some() {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let Ok(stream) = TcpStream::connect(&host_port).await else {
        return Ok(empty_response(StatusCode::BAD_GATEWAY));
    };
    let Ok((mut sender, connection)) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    else {
        return Ok(empty_response(StatusCode::BAD_GATEWAY));
    };
    tokio::spawn(connection);
    let path = request
        .uri()
        .path_and_query()
        .map(|path| path.to_string())
        .unwrap_or_else(|| "/".to_owned());
    *request.uri_mut() = path.parse().expect("a path is a valid URI");
    request.headers_mut().remove(header::PROXY_AUTHORIZATION);
    match sender.send_request(request).await {
        Ok(response) => Ok(response.map(BodyExt::boxed)),
        Err(_) => Ok(empty_response(StatusCode::BAD_GATEWAY)),
    }
}
