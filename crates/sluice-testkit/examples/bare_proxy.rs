//! A byte-for-byte HTTP/1.1 reverse proxy with nothing else in it (no parsing, no logging, no
//! limits), built on the same HTTP stack as Sluice (hyper's server, hyper-util's pooled client,
//! tokio's multi-threaded runtime): the overhead benchmark runs it beside Sluice, so that
//! Sluice's cost is measured against the least any proxy on this machine can cost, in the same
//! run.
//!
//! ```sh
//! cargo run --release -p sluice-testkit --example bare_proxy -- 127.0.0.1:18081 http://127.0.0.1:18080
//! ```

use std::convert::Infallible;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

type Upstream = Client<HttpConnector, Incoming>;

/// Sends `req` on to `base` (scheme and authority) with its path, method, headers and body, and
/// answers with the upstream's response as it comes; 502 when the upstream cannot be reached.
async fn forward(
    client: Upstream,
    base: Uri,
    mut req: Request<Incoming>,
) -> Result<Response<http_body_util::Either<Incoming, String>>, Infallible> {
    let mut parts = base.into_parts();
    parts.path_and_query = req.uri().path_and_query().cloned();
    *req.uri_mut() = match Uri::from_parts(parts) {
        Ok(uri) => uri,
        Err(e) => return Ok(bad_gateway(e.to_string())),
    };
    Ok(match client.request(req).await {
        Ok(resp) => resp.map(http_body_util::Either::Left),
        Err(e) => bad_gateway(e.to_string()),
    })
}

fn bad_gateway(why: String) -> Response<http_body_util::Either<Incoming, String>> {
    let mut resp = Response::new(http_body_util::Either::Right(why));
    *resp.status_mut() = hyper::StatusCode::BAD_GATEWAY;
    resp
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:18081".into());
    let base: Uri = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:18080".into())
        .parse()
        .expect("an upstream URL such as http://127.0.0.1:18080");
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Upstream = Client::builder(TokioExecutor::new()).build(connector);
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .unwrap_or_else(|e| panic!("cannot listen on {listen}: {e}"));
    println!("bare proxy on http://{listen} -> {base}");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (client, base) = (client.clone(), base.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| forward(client.clone(), base.clone(), req));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
