//! The floor for an HTTP/1.1 proxy built on hyper: accept, one upstream connection per client
//! connection (its own task, as hyper's client runs it), hand each request to it unchanged.
//! No routing, metrics, timeouts, retries, header hygiene or framing guard: what Pillion's
//! per-request cost is compared against in `benches/compare/instructions.sh --rows floor`.
//!
//! usage: hyper-floor LISTEN UPSTREAM      e.g. hyper-floor 127.0.0.1:19320 127.0.0.1:19300

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use hyper::{body::Incoming, client::conn::http1 as client, server::conn::http1 as server};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<SocketAddr>());
    let (Some(Ok(listen)), Some(Ok(upstream))) = (args.next(), args.next()) else {
        eprintln!("usage: hyper-floor LISTEN_ADDR UPSTREAM_ADDR");
        std::process::exit(2);
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(listen).await?;
        loop {
            let (io, _) = listener.accept().await?;
            tokio::spawn(async move {
                if let Err(error) = serve(io, upstream).await {
                    eprintln!("hyper-floor: {error}");
                }
            });
        }
    })
}

async fn serve(io: TcpStream, upstream: SocketAddr) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    io.set_nodelay(true)?;
    let up = TcpStream::connect(upstream).await?;
    up.set_nodelay(true)?;
    // writev off on both sides, as in the proxy.
    let (tx, conn) = client::Builder::new()
        .writev(false)
        .handshake::<_, Incoming>(TokioIo::new(up))
        .await?;
    tokio::spawn(conn);
    let tx = Arc::new(Mutex::new(tx));
    let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
        tx.lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .send_request(req)
    });
    server::Builder::new()
        .writev(false)
        .serve_connection(TokioIo::new(io), service)
        .await?;
    Ok(())
}
