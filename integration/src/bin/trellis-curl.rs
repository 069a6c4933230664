//! Test-only client for the network-namespace end-to-end tests, run inside a pod's namespace
//! (where a meshed pod's iptables send its connections to the sidecar). Prints one JSON line
//! per request (`trellis_integration::netns::Reply`); exits 0 whatever the answers were.
//!
//! ```text
//! trellis-curl [-n N] [-c WORKERS] [--duration-ms MS] [--interval-ms MS] [--h2]
//!              [-X METHOD] [-d BODY] [-H 'name: value']... [--timeout-ms MS] URL
//! trellis-curl --until STATUS --within-ms MS URL     # one request, repeated until STATUS
//! trellis-curl --tcp HOST:PORT --send TEXT            # greeting, then TEXT echoed back
//! trellis-curl --tcp HOST:PORT --send TEXT --send-first  # TEXT first, then the greeting
//! trellis-curl --ws ws://HOST[:PORT]/PATH --send TEXT  # WebSocket: greeting, TEXT echoed
//! ```
//!
//! `-n` requests (default 1) are shared by `-c` workers (default 1) on one pooled client
//! (HTTP/1.1 keep-alive, or HTTP/2 prior knowledge with `--h2`); with `--duration-ms` each
//! worker sends until that time is up instead. Every request is bounded by `--timeout-ms`
//! (default 5000), and no request of `-n` starts after `--max-ms` (default 30000). SIGTERM
//! ends a run early: no new request starts, the replies so far are printed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test client fails loudly by design

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use trellis_integration::netns::{Reply, TcpReply};

#[derive(Debug, Clone)]
struct Args {
    url: String,
    n: usize,
    workers: usize,
    duration: Option<Duration>,
    max: Duration,
    interval: Duration,
    h2: bool,
    method: String,
    body: String,
    headers: Vec<(String, String)>,
    timeout: Duration,
    until: Option<u16>,
    within: Duration,
    tcp: Option<String>,
    send: String,
    send_first: bool,
    ws: Option<String>,
}

fn parse() -> Args {
    let mut a = Args {
        url: String::new(),
        n: 1,
        workers: 1,
        duration: None,
        max: Duration::from_secs(30),
        interval: Duration::ZERO,
        h2: false,
        method: "GET".into(),
        body: String::new(),
        headers: Vec::new(),
        timeout: Duration::from_secs(5),
        until: None,
        within: Duration::from_secs(10),
        tcp: None,
        send: String::new(),
        send_first: false,
        ws: None,
    };
    let ms = |v: String| Duration::from_millis(v.parse().unwrap());
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "-n" => a.n = value().parse().unwrap(),
            "-c" => a.workers = value().parse().unwrap(),
            "--duration-ms" => a.duration = Some(ms(value())),
            "--max-ms" => a.max = ms(value()),
            "--interval-ms" => a.interval = ms(value()),
            "--h2" => a.h2 = true,
            "-X" => a.method = value(),
            "-d" => a.body = value(),
            "-H" => {
                let h = value();
                let (k, v) = h
                    .split_once(':')
                    .unwrap_or_else(|| panic!("bad header {h}"));
                a.headers.push((k.trim().into(), v.trim().into()));
            }
            "--timeout-ms" => a.timeout = ms(value()),
            "--until" => a.until = Some(value().parse().unwrap()),
            "--within-ms" => a.within = ms(value()),
            "--tcp" => a.tcp = Some(value()),
            "--send-first" => a.send_first = true,
            "--ws" => a.ws = Some(value()),
            "--send" => a.send = value(),
            url if !url.starts_with('-') => a.url = url.into(),
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn one(client: &HttpClient, a: &Args) -> Reply {
    let mut reply = Reply {
        at_ms: now_ms(),
        ..Reply::default()
    };
    let mut req = Request::builder().method(a.method.as_str()).uri(&a.url);
    for (k, v) in &a.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = req.body(Full::new(Bytes::from(a.body.clone()))).unwrap();
    let exchange = async {
        let res = client.request(req).await.map_err(|e| format!("{e:?}"))?;
        let (parts, body) = res.into_parts();
        let bytes = body
            .collect()
            .await
            .map_err(|e| format!("body: {e:?}"))?
            .to_bytes();
        Ok::<_, String>((parts, bytes))
    };
    match tokio::time::timeout(a.timeout, exchange).await {
        Ok(Ok((parts, bytes))) => {
            reply.status = Some(parts.status.as_u16());
            let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (k, v) in &parts.headers {
                headers
                    .entry(k.as_str().into())
                    .or_default()
                    .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
            }
            reply.headers = headers.into_iter().map(|(k, v)| (k, v.join(","))).collect();
            reply.body = String::from_utf8_lossy(&bytes).into_owned();
        }
        Ok(Err(e)) => reply.error = Some(e),
        Err(_) => reply.error = Some(format!("no answer within {:?}", a.timeout)),
    }
    reply
}

fn print(replies: &[Reply]) {
    let mut out = std::io::stdout().lock();
    for r in replies {
        writeln!(out, "{}", serde_json::to_string(r).unwrap()).unwrap();
    }
}

fn tcp(addr: &str, text: &str, first: bool, timeout: Duration) -> TcpReply {
    let mut reply = TcpReply::default();
    let exchange = |reply: &mut TcpReply| -> Result<(), String> {
        let addr = addr
            .to_socket_addrs()
            .map_err(|e| format!("resolve {addr}: {e}"))?
            .next()
            .ok_or_else(|| format!("{addr} has no address"))?;
        let stream =
            TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
        stream.set_read_timeout(Some(timeout)).unwrap();
        let connected = std::time::Instant::now();
        if first {
            (&stream)
                .write_all(text.as_bytes())
                .map_err(|e| format!("send: {e}"))?;
        }
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        reader
            .read_line(&mut reply.greeting)
            .map_err(|e| format!("greeting: {e}"))?;
        reply.greeting_ms = u64::try_from(connected.elapsed().as_millis()).unwrap_or(u64::MAX);
        if reply.greeting.is_empty() {
            return Err("closed before the greeting".into());
        }
        if !first {
            (&stream)
                .write_all(text.as_bytes())
                .map_err(|e| format!("send: {e}"))?;
        }
        let mut back = vec![0u8; text.len()];
        reader
            .read_exact(&mut back)
            .map_err(|e| format!("echo: {e}"))?;
        reply.echo = String::from_utf8_lossy(&back).into_owned();
        Ok(())
    };
    if let Err(e) = exchange(&mut reply) {
        reply.error = Some(e);
    }
    reply
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = parse();
    if let Some(addr) = &a.tcp {
        let reply = tcp(addr, &a.send, a.send_first, a.timeout);
        println!("{}", serde_json::to_string(&reply).unwrap());
        return;
    }
    if let Some(url) = &a.ws {
        let uri: http::Uri = url.parse().unwrap();
        let host = uri.host().unwrap();
        let addr = format!("{host}:{}", uri.port_u16().unwrap_or(80));
        let reply = match tokio::net::TcpStream::connect(&addr).await {
            Ok(stream) => trellis_integration::websocket_exchange(stream, url, &a.send).await,
            Err(e) => trellis_integration::WsReply {
                error: Some(format!("connect {addr}: {e}")),
                ..Default::default()
            },
        };
        println!("{}", serde_json::to_string(&reply).unwrap());
        return;
    }
    assert!(!a.url.is_empty(), "no URL");
    let mut builder = Client::builder(TokioExecutor::new());
    builder.pool_idle_timeout(Duration::from_secs(30));
    if a.h2 {
        builder.http2_only(true);
    }
    let client: HttpClient = builder.build_http();

    if let Some(want) = a.until {
        let deadline = Instant::now() + a.within;
        loop {
            let reply = one(&client, &a).await;
            if reply.status == Some(want) || Instant::now() >= deadline {
                print(&[reply]);
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    let stop = Arc::new(AtomicBool::new(false));
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
    let on_term = stop.clone();
    tokio::spawn(async move {
        term.recv().await;
        on_term.store(true, Ordering::SeqCst);
    });
    let next = Arc::new(AtomicUsize::new(0));
    let replies = Arc::new(Mutex::new(Vec::new()));
    let (end, limited) = match a.duration {
        Some(d) => (Instant::now() + d, false),
        None => (Instant::now() + a.max, true),
    };
    let mut tasks = Vec::new();
    for _ in 0..a.workers.max(1) {
        let (client, a, next, replies, stop) = (
            client.clone(),
            a.clone(),
            next.clone(),
            replies.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if Instant::now() >= end || (limited && i >= a.n) || stop.load(Ordering::SeqCst) {
                    break;
                }
                let reply = one(&client, &a).await;
                replies.lock().unwrap().push((i, reply));
                if !a.interval.is_zero() {
                    tokio::time::sleep(a.interval).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut replies = std::mem::take(&mut *replies.lock().unwrap());
    replies.sort_by_key(|(i, _)| *i);
    let replies: Vec<Reply> = replies.into_iter().map(|(_, r)| r).collect();
    print(&replies);
}
