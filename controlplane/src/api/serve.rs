//! Serves the REST router over TLS (HTTP/1.1 and HTTP/2), with a bound on how long a client may
//! take to send its request headers, and the client's address in each request's extensions.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;

/// How long a client may take to send a request's headers (slowloris protection).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts TLS connections on `listener` and serves `app` on each until `stop` resolves.
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, app: Router, stop: impl Future<Output = ()>) {
    let mut incoming = steward_proto::tls::transport::incoming(listener, tls);
    tokio::pin!(stop);
    loop {
        let conn = tokio::select! {
            c = incoming.next() => c,
            _ = &mut stop => break,
        };
        let conn = match conn {
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "REST connection failed");
                continue;
            }
            None => break,
        };
        let addr = conn.peer().addr;
        let app = app.clone();
        tokio::spawn(async move {
            let svc = tower::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(addr));
                tower::ServiceExt::oneshot(app.clone(), req)
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
            if let Err(e) = builder.serve_connection(TokioIo::new(conn), TowerToHyperService::new(svc)).await {
                tracing::debug!(peer = %addr, error = %e, "REST connection ended with an error");
            }
        });
    }
}
