//! A small fault proxy between the gateway and a real sink: it forwards HTTP requests, or
//! answers them with an injected fault, as the test says.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy does with the next request.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Forward to the sink and relay its answer.
    Pass,
    /// Answer with this status (and a Retry-After in seconds, when given).
    Status(u16, Option<u32>),
    /// Read the request and never answer.
    Hang,
    /// Forward, but let through at most this many lines a second (all requests together).
    Throttle(u32),
}

pub struct FaultProxy {
    pub url: String,
    fault: Arc<Mutex<Fault>>,
    faults_served: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let fault = Arc::new(Mutex::new(Fault::Pass));
        let faults_served = Arc::new(AtomicU64::new(0));
        let next_free = Arc::new(tokio::sync::Mutex::new(tokio::time::Instant::now()));
        let upstream = upstream.trim_end_matches('/').to_owned();
        let (f, n, t) = (fault.clone(), faults_served.clone(), next_free.clone());
        let task = tokio::spawn(async move {
            let client = reqwest::Client::new();
            while let Ok((stream, _)) = listener.accept().await {
                let (f, n, t) = (f.clone(), n.clone(), t.clone());
                let (client, upstream) = (client.clone(), upstream.clone());
                tokio::spawn(async move {
                    let _ = serve(stream, f, n, t, client, upstream).await;
                });
            }
        });
        Self {
            url,
            fault,
            faults_served,
            task,
        }
    }

    pub fn set(&self, fault: Fault) {
        *self.fault.lock().expect("fault lock") = fault;
    }

    /// Requests answered with a fault so far.
    pub fn faults_served(&self) -> u64 {
        self.faults_served.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    mut stream: TcpStream,
    fault: Arc<Mutex<Fault>>,
    served: Arc<AtomicU64>,
    next_free: Arc<tokio::sync::Mutex<tokio::time::Instant>>,
    client: reqwest::Client,
    upstream: String,
) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    loop {
        // Read one request: headers, then Content-Length bytes of body.
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 8192];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or_default().to_owned();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + len {
            let mut chunk = [0u8; 65536];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = buf[head_end..head_end + len].to_vec();
        buf.drain(..head_end + len);

        let current = fault.lock().map(|f| f.clone()).unwrap_or(Fault::Pass);
        let (status, extra, reply) = match current {
            Fault::Hang => {
                served.fetch_add(1, Ordering::Relaxed);
                // Hold the connection until the client gives up on it.
                let mut sink = [0u8; 1024];
                while stream.read(&mut sink).await? > 0 {}
                return Ok(());
            }
            Fault::Status(code, retry_after) => {
                served.fetch_add(1, Ordering::Relaxed);
                let extra = retry_after
                    .map(|s| format!("Retry-After: {s}\r\n"))
                    .unwrap_or_default();
                (
                    code,
                    extra,
                    b"{\"error\":\"fault injected by the test proxy\"}".to_vec(),
                )
            }
            Fault::Throttle(per_sec) => {
                // Reserve this request's share of the rate, then forward it.
                let lines = body.iter().filter(|b| **b == b'\n').count() as f64;
                let wait_until = {
                    let mut next = next_free.lock().await;
                    let start = (*next).max(tokio::time::Instant::now());
                    *next = start
                        + std::time::Duration::from_secs_f64(lines / f64::from(per_sec.max(1)));
                    *next
                };
                tokio::time::sleep_until(wait_until).await;
                forward(&client, &upstream, &request_line, &headers, body).await?
            }
            Fault::Pass => forward(&client, &upstream, &request_line, &headers, body).await?,
        };
        let head = format!(
            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nContent-Type: application/json\r\n{extra}\r\n",
            reply.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&reply).await?;
    }
}

async fn forward(
    client: &reqwest::Client,
    upstream: &str,
    request_line: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
) -> anyhow::Result<(u16, String, Vec<u8>)> {
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or("POST");
    let target = parts.next().unwrap_or("/");
    let mut req = client.request(
        reqwest::Method::from_bytes(method.as_bytes())?,
        format!("{upstream}{target}"),
    );
    for (k, v) in headers {
        if matches!(
            k.as_str(),
            "content-encoding" | "content-type" | "authorization"
        ) {
            req = req.header(k.as_str(), v.as_str());
        }
    }
    let resp = req.body(body).send().await?;
    let status = resp.status().as_u16();
    Ok((status, String::new(), resp.bytes().await?.to_vec()))
}
