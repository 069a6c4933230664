//! Test-only app for the network-namespace end-to-end tests: `trellis_integration::Echo` on
//! every `--http PORT` (answers HTTP/1.1 and HTTP/2 with what it saw, as JSON) and a TCP echo
//! on every `--tcp PORT` (first a line `hello from POD to LOCAL from PEER`, then every byte it
//! receives, back). Listens on all addresses of both families, but `--local-http PORT` on
//! loopback only (an app's private debug port); runs until killed.
//!
//! `trellis-echo --pod NAME [--http PORT]... [--tcp PORT]... [--local-http PORT]...`

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test app fails loudly by design

use std::net::SocketAddr;

use tokio::io::{AsyncWriteExt, copy};
use tokio::net::TcpListener;
use trellis_integration::Echo;

/// The address and its twin of the other family, as the sidecar binds its own.
fn bind(addr: SocketAddr) -> Vec<TcpListener> {
    trellis_proxy::listen::bind(addr).unwrap()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mut pod, mut http, mut tcp) = (String::from("echo"), Vec::new(), Vec::new());
    let mut local_http = Vec::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--pod" => pod = value.clone(),
            "--http" => http.push(value.parse::<u16>().unwrap()),
            "--tcp" => tcp.push(value.parse::<u16>().unwrap()),
            "--local-http" => local_http.push(value.parse::<u16>().unwrap()),
            other => panic!("unknown flag {other}"),
        }
    }
    let mut apps = Vec::new();
    let addrs = http
        .into_iter()
        .map(|port| SocketAddr::from(([0, 0, 0, 0], port)))
        .chain(
            local_http
                .into_iter()
                .map(|port| SocketAddr::from(([127, 0, 0, 1], port))),
        );
    for addr in addrs {
        for listener in bind(addr) {
            let app = Echo::serve(listener, &pod);
            eprintln!("http echo listening on {}", app.addr);
            apps.push(app);
        }
    }
    for listener in tcp
        .into_iter()
        .flat_map(|port| bind(SocketAddr::from(([0, 0, 0, 0], port))))
    {
        eprintln!("tcp echo listening on {}", listener.local_addr().unwrap());
        let pod = pod.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, peer)) = listener.accept().await else {
                    continue;
                };
                let pod = pod.clone();
                tokio::spawn(async move {
                    let local = stream
                        .local_addr()
                        .map(|a| a.to_string())
                        .unwrap_or_default();
                    let hello = format!("hello from {pod} to {local} from {peer}\n");
                    if stream.write_all(hello.as_bytes()).await.is_err() {
                        return;
                    }
                    let (mut read, mut write) = stream.split();
                    let _ = copy(&mut read, &mut write).await;
                    let _ = write.shutdown().await;
                });
            }
        });
    }
    eprintln!("echo ready");
    std::future::pending::<()>().await;
}
