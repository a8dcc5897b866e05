//! The admin listener while the node starts: recovering a large store takes time, and a load
//! balancer or an admin polling `/ready` and `/health` should hear "starting" rather than find
//! nothing listening. Every request gets a 503 with the reason until the node is open; the
//! listener is then handed to the full admin service.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::api::admin::not_ready_response;
use crate::api::readiness::NotReady;
use crate::serve::ResponseBody;

/// How long a connection accepted during start-up may stay open.
const STARTING_CONNECTION_LIMIT: Duration = Duration::from_secs(5);

/// Connections served at once during start-up; more wait in the listen backlog.
const STARTING_CONNECTIONS: usize = 64;

/// Runs `opening` to completion, answering 503 "starting" on `listener` meanwhile, and returns
/// its output. The connections accepted meanwhile are closed when it returns.
pub(crate) async fn answer_while_starting<F: Future>(
    listener: &TcpListener,
    opening: F,
) -> F::Output {
    tokio::pin!(opening);
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            output = &mut opening => return output,
            accepted = listener.accept(), if connections.len() < STARTING_CONNECTIONS => {
                let Ok((stream, _peer)) = accepted else {
                    tokio::time::sleep(super::ACCEPT_RETRY_DELAY).await;
                    continue;
                };
                let service = service_fn(|_request: Request<Incoming>| async {
                    let mut response: Response<ResponseBody> =
                        not_ready_response(&NotReady::Recovering);
                    response.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                    Ok::<_, Infallible>(response)
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), service);
                connections.spawn(async move {
                    let _ = tokio::time::timeout(STARTING_CONNECTION_LIMIT, connection).await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(address: std::net::SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn answers_starting_until_the_node_is_open_then_returns_its_output() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (open, opened) = tokio::sync::oneshot::channel::<u32>();
        let starting = tokio::spawn(async move {
            let output = answer_while_starting(&listener, async { opened.await.unwrap() }).await;
            (output, listener)
        });
        for path in ["/ready", "/health", "/stats"] {
            let answer = get(address, path).await;
            assert!(answer.starts_with("HTTP/1.1 503"), "{path}: {answer}");
            assert!(
                answer.contains("starting: recovering the store"),
                "{answer}"
            );
            assert!(
                answer.to_ascii_lowercase().contains("retry-after: 1"),
                "{answer}"
            );
        }
        open.send(7).unwrap();
        let (output, listener) = starting.await.unwrap();
        assert_eq!(output, 7);
        // The listener is still bound and usable by whoever serves next.
        assert_eq!(listener.local_addr().unwrap(), address);
    }
}
