//! The access log: one JSON line per request, written by one task so that writing never
//! blocks a request.
//!
//! Requests hand their [`Record`] to a bounded queue; the writer formats and writes what is
//! there, flushing when the queue is empty. A full queue (a slow disk, a stalled pipe) drops
//! the line and counts it in `trellis_access_log_dropped_total`: the data path never waits for
//! the log.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use trellis_api::time::rfc3339_millis;

use crate::observe::Record;

/// Lines waiting for the writer; more are dropped and counted.
pub const QUEUE: usize = 1024;
/// The most lines formatted into one write.
const BATCH: usize = 256;

/// `--access-log`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    #[default]
    Off,
    Json,
}

/// The request path's handle on the log.
#[derive(Debug)]
pub struct AccessLog {
    lines: mpsc::Sender<Record>,
    dropped: Counter,
}

impl AccessLog {
    /// Queues a line, or drops and counts it when the writer is behind.
    pub fn log(&self, record: Record) {
        if self.lines.try_send(record).is_err() {
            self.dropped.inc();
        }
    }
}

/// Starts the writer on `out` with its metrics in `registry`. The task ends, with everything
/// queued written, once every [`AccessLog`] is dropped.
pub fn start(
    out: impl AsyncWrite + Send + Unpin + 'static,
    queue: usize,
    registry: &mut Registry,
) -> (AccessLog, tokio::task::JoinHandle<()>) {
    let dropped = Counter::default();
    let written = Counter::default();
    registry.register(
        "trellis_access_log_dropped",
        "Access log lines dropped: the writer was behind (its queue full) or the write failed",
        dropped.clone(),
    );
    registry.register(
        "trellis_access_log_lines",
        "Access log lines written",
        written.clone(),
    );
    start_with(out, queue, dropped, written)
}

fn start_with(
    out: impl AsyncWrite + Send + Unpin + 'static,
    queue: usize,
    dropped: Counter,
    written: Counter,
) -> (AccessLog, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(queue.max(1));
    let task = tokio::spawn(write(rx, out, dropped.clone(), written));
    (AccessLog { lines: tx, dropped }, task)
}

async fn write(
    mut rx: mpsc::Receiver<Record>,
    mut out: impl AsyncWrite + Unpin,
    dropped: Counter,
    written: Counter,
) {
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut failing = false;
    while let Some(first) = rx.recv().await {
        buf.clear();
        line(&first, &mut buf);
        let mut n = 1u64;
        while n < BATCH as u64 {
            match rx.try_recv() {
                Ok(r) => {
                    line(&r, &mut buf);
                    n += 1;
                }
                Err(_) => break,
            }
        }
        let result = match out.write_all(&buf).await {
            Ok(()) => out.flush().await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                written.inc_by(n);
                failing = false;
            }
            Err(e) => {
                dropped.inc_by(n);
                // Once per run of failures: a full disk would otherwise log every line.
                if !failing {
                    tracing::warn!(error = %e, "cannot write the access log; lines are dropped");
                }
                failing = true;
            }
        }
    }
    let _ = out.flush().await;
}

/// One line's fields, in the order they are written.
#[derive(Serialize)]
struct Line<'a> {
    time: String,
    direction: &'a str,
    method: &'a str,
    authority: Option<&'a str>,
    path: &'a str,
    status: u16,
    duration_ms: f64,
    parent: Option<&'a str>,
    route: Option<&'a str>,
    rule: Option<&'a str>,
    backend: Option<&'a str>,
    endpoint: Option<String>,
    peer_identity: Option<&'a str>,
    retries: u32,
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<String>,
}

/// A label, or nothing when it is empty.
fn some(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

fn line(r: &Record, buf: &mut Vec<u8>) {
    let line = Line {
        time: rfc3339_millis(r.time),
        direction: r.direction,
        method: r.method.as_str(),
        authority: r.authority.as_deref(),
        path: &r.path,
        status: r.status,
        // Microsecond precision is plenty, and keeps the number short.
        duration_ms: (r.took.as_micros() as f64) / 1000.0,
        parent: some(&r.parent),
        route: some(&r.route),
        rule: some(&r.rule),
        backend: some(&r.backend),
        endpoint: r.endpoint.map(|e| e.to_string()),
        peer_identity: r.peer_identity.as_deref(),
        retries: r.retries,
        error: r.error.as_deref(),
        trace_id: r.trace_id.map(|t| crate::trace::hex(&t)),
    };
    if serde_json::to_writer(&mut *buf, &line).is_ok() {
        buf.push(b'\n');
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant, SystemTime};

    use tokio::io::AsyncReadExt;

    use super::*;

    fn record(path: &str) -> Record {
        Record {
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_538_601_234),
            direction: "outbound",
            method: http::Method::GET,
            authority: Some("web.shop:80".into()),
            path: path.into(),
            status: 200,
            took: Duration::from_micros(1500),
            parent: Arc::from("shop/web:80"),
            route: Arc::from("shop/web"),
            rule: Arc::from("0"),
            backend: Arc::from("shop/web:80"),
            endpoint: Some("10.1.0.5:4143".parse().unwrap()),
            peer_identity: Some("spiffe://cluster.local/ns/shop/sa/web".into()),
            retries: 1,
            error: None,
            trace_id: None,
        }
    }

    #[test]
    fn a_line_is_one_json_object() {
        let mut buf = Vec::new();
        let mut r = record("/a\"b");
        r.parent = Arc::from("");
        line(&r, &mut buf);
        assert_eq!(buf.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(v["path"], "/a\"b");
        assert_eq!(v["status"], 200);
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["parent"], serde_json::Value::Null);
        assert_eq!(v["route"], "shop/web");
        assert_eq!(v["endpoint"], "10.1.0.5:4143");
        assert_eq!(v["peer_identity"], "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(v["time"], "2026-12-06T06:30:01.234Z");
        assert!(v.get("trace_id").is_none());
    }

    /// A writer that never gets its bytes read fills the queue: further lines are dropped and
    /// counted at once, and the lines queued before are written once the reader catches up.
    #[tokio::test]
    async fn a_full_queue_drops_and_counts() {
        let (out, mut reader) = tokio::io::duplex(16);
        let (dropped, written) = (Counter::default(), Counter::default());
        let (log, task) = start_with(out, 4, dropped.clone(), written.clone());
        let begun = Instant::now();
        for i in 0..1000 {
            log.log(record(&format!("/{i}")));
        }
        assert!(begun.elapsed() < Duration::from_secs(1), "logging waited");
        // The writer holds one batch and the queue four lines; the rest are dropped.
        assert!(
            dropped.get() >= 1000 - 4 - BATCH as u64,
            "{}",
            dropped.get()
        );
        assert!(dropped.get() < 1000);
        drop(log);
        let mut text = String::new();
        reader.read_to_string(&mut text).await.unwrap();
        task.await.unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len() as u64 + dropped.get(), 1000);
        assert_eq!(written.get(), lines.len() as u64);
        assert_eq!(lines[0]["path"], "/0");
    }
}
