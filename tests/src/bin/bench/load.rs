//! The servers (a bulk sink and a tiny HTTP/1.1 keep-alive responder, tokio tasks in this process) and the load
//! the suite puts through each contender: bulk transfer, an open-loop fixed-rate HTTP generator, connection churn
//! and idle connections.

use std::io::{Read, Write};
use std::net::IpAddr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::contenders::{Ports, Route, SERVER_IP, Target};
use super::procfs;

static ZEROS: [u8; 256 * 1024] = [0; 256 * 1024];
const BODY: usize = 1024;

/// The request every HTTP load sends: a POST with a 1 KiB body.
pub fn request() -> Vec<u8> {
    let mut r = format!("POST /bench HTTP/1.1\r\nHost: bench\r\nContent-Length: {BODY}\r\n\r\n").into_bytes();
    r.extend_from_slice(&[b'q'; BODY]);
    r
}

/// The responder's answer to every request: 200 with a 1 KiB body.
pub fn response() -> Vec<u8> {
    let mut r = format!("HTTP/1.1 200 OK\r\nContent-Length: {BODY}\r\nContent-Type: application/octet-stream\r\n\r\n")
        .into_bytes();
    r.extend_from_slice(&[b'r'; BODY]);
    r
}

/// The servers run in their own process (`trellis-bench servers`), so that their descriptors and CPU are not the
/// benchmark's: with 10,000 idle connections the client ends alone fill much of an open-files limit.
pub struct Servers {
    pub ports: Ports,
    child: std::process::Child,
}

impl Servers {
    pub fn start() -> anyhow::Result<Self> {
        Self::start_in(None, IpAddr::from(SERVER_IP))
    }

    /// The servers on `ip`, in network namespace `netns` (else this one).
    pub fn start_in(netns: Option<&str>, ip: IpAddr) -> anyhow::Result<Self> {
        use std::io::BufRead;
        let exe = std::env::current_exe()?;
        let mut child = trellis_tests::netns::command(netns, exe)
            .arg("servers")
            .arg(ip.to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting `trellis-bench servers`")?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        let mut words = line.split_whitespace();
        let (Some("sink"), Some(sink), Some("http"), Some(http)) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(anyhow!("`trellis-bench servers` did not say where it listens: {line:?}"));
        };
        Ok(Self { ports: Ports { sink: sink.parse()?, http: http.parse()? }, child })
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `trellis-bench servers [IP]`: serves on IP (default the suite's 127.0.20.2) until its standard input closes (the
/// benchmark ended, however it ended).
pub fn servers_main(argv: &[String]) -> std::process::ExitCode {
    let result = (|| -> anyhow::Result<()> {
        let ip = match argv.first() {
            None => IpAddr::from(SERVER_IP),
            Some(text) => text.parse().with_context(|| format!("servers: IP address expected, got {text:?}"))?,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        let ports = runtime.block_on(start_servers(ip))?;
        println!("sink {} http {}", ports.sink, ports.http);
        std::io::stdout().flush()?;
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        Ok(())
    })();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellis-bench servers: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn start_servers(ip: IpAddr) -> anyhow::Result<Ports> {
    let sink = TcpListener::bind((ip, 0)).await.with_context(|| format!("binding the sink on {ip}"))?;
    let http = TcpListener::bind((ip, 0)).await.with_context(|| format!("binding the HTTP responder on {ip}"))?;
    let ports = Ports { sink: sink.local_addr()?, http: http.local_addr()? };
    tokio::spawn(serve(sink, sink_connection));
    tokio::spawn(serve(http, http_connection));
    Ok(ports)
}

/// Accepts for as long as the process runs, each connection on its own task with `handle`.
pub async fn serve<F: Future<Output = std::io::Result<()>> + Send + 'static>(
    listener: TcpListener,
    handle: fn(TcpStream) -> F,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(handle(stream));
            }
            // Out of descriptors, for instance: keep serving the connections there are.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// The top bit of the sink's length header: send that many bytes back instead of reading them.
const REVERSE: u64 = 1 << 63;

/// Reads a u64 length, then exactly that many bytes, then answers one byte; with [`REVERSE`] set in the length,
/// sends that many bytes instead (the server→client direction).
pub async fn sink_connection(mut stream: TcpStream) -> std::io::Result<()> {
    let header = stream.read_u64().await?;
    if header & REVERSE != 0 {
        let mut left = header & !REVERSE;
        while left > 0 {
            let n = ZEROS.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            stream.write_all(&ZEROS[..n]).await?;
            left -= n as u64;
        }
        return stream.flush().await;
    }
    let mut left = header;
    let mut buf = vec![0; 256 * 1024];
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = stream.read(&mut buf[..want]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        left -= n as u64;
    }
    stream.write_u8(1).await
}

/// HTTP/1.1 keep-alive: answers every complete request in what it has read (pipelined ones too) with `response()`.
async fn http_connection(mut stream: TcpStream) -> std::io::Result<()> {
    let answer = response();
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut chunk = vec![0; 16 * 1024];
    let mut out = Vec::new();
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut used = 0;
        while let Some(len) = complete_request(&buf[used..])? {
            used += len;
            out.extend_from_slice(&answer);
        }
        buf.drain(..used);
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
    }
}

/// The length of the first complete request in `buf` (headers and Content-Length body), if it is all there.
fn complete_request(buf: &[u8]) -> std::io::Result<Option<usize>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > 64 * 1024 {
            return Err(std::io::Error::other("request headers over 64 KiB"));
        }
        return Ok(None);
    };
    let headers = std::str::from_utf8(&buf[..end]).map_err(std::io::Error::other)?;
    let mut body = 0usize;
    for line in headers.split("\r\n").skip(1) {
        if let Some((name, value)) = line.split_once(':')
            && name.trim().eq_ignore_ascii_case("content-length")
        {
            body = value.trim().parse().map_err(|_| std::io::Error::other("bad Content-Length"))?;
        }
    }
    let total = end + 4 + body;
    Ok((buf.len() >= total).then_some(total))
}

/// Sends `total` bytes to the sink over `streams` connections (opened first); MB/s from the first byte until
/// every sink has acknowledged reading its exact share.
pub async fn bulk(route: Route, total: u64, streams: usize) -> std::io::Result<f64> {
    let share = total / streams as u64;
    let mut connections = Vec::with_capacity(streams);
    for _ in 0..streams {
        connections.push(route.dial(Target::Sink).await?);
    }
    send_bulk(connections, share).await
}

/// Sends `share` bytes on each connection (to a sink that answers one byte once it has them all); MB/s from the
/// first byte until every sink has answered.
pub async fn send_bulk(connections: Vec<TcpStream>, share: u64) -> std::io::Result<f64> {
    let streams = connections.len();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for mut stream in connections {
        tasks.spawn(async move {
            stream.write_u64(share).await?;
            let mut left = share;
            while left > 0 {
                let n = ZEROS.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                stream.write_all(&ZEROS[..n]).await?;
                left -= n as u64;
            }
            stream.read_u8().await.map(drop)
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(std::io::Error::other)??;
    }
    Ok((share * streams as u64) as f64 / 1e6 / started.elapsed().as_secs_f64())
}

/// The other direction: asks the sink for `total` bytes over `streams` connections (opened first); MB/s from the
/// request until every byte has arrived.
pub async fn bulk_reverse(route: Route, total: u64, streams: usize) -> std::io::Result<f64> {
    let share = total / streams as u64;
    let mut connections = Vec::with_capacity(streams);
    for _ in 0..streams {
        connections.push(route.dial(Target::Sink).await?);
    }
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for mut stream in connections {
        tasks.spawn(async move {
            stream.write_u64(share | REVERSE).await?;
            let mut buf = vec![0; 256 * 1024];
            let mut left = share;
            while left > 0 {
                let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                let n = stream.read(&mut buf[..want]).await?;
                if n == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
                }
                left -= n as u64;
            }
            Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(std::io::Error::other)??;
    }
    Ok((share * streams as u64) as f64 / 1e6 / started.elapsed().as_secs_f64())
}

/// Closed loop: `connections` keep-alive connections, each sending its next request as soon as the previous answer
/// is in, for `period`; requests/s.
pub async fn closed_loop(route: Route, connections: usize, period: Duration) -> std::io::Result<f64> {
    let mut streams = Vec::with_capacity(connections);
    for _ in 0..connections {
        streams.push(route.dial(Target::Http).await?);
    }
    let started = Instant::now();
    let deadline = started + period;
    let mut tasks = tokio::task::JoinSet::new();
    for mut stream in streams {
        tasks.spawn(async move {
            let (message, mut answer) = (request(), vec![0; response().len()]);
            let mut done = 0u64;
            while Instant::now() < deadline {
                stream.write_all(&message).await?;
                stream.read_exact(&mut answer).await?;
                done += 1;
            }
            std::io::Result::Ok(done)
        });
    }
    let mut total = 0;
    while let Some(done) = tasks.join_next().await {
        total += done.map_err(std::io::Error::other)??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// Latencies in nanoseconds, 1 ns to 60 s at 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

/// What one fixed-rate run measured.
pub struct RateRun {
    pub latencies: Histogram<u64>,
    /// Requests sent, the unrecorded warm-up included (the CPU measurement covers them all).
    pub sent: u64,
}

/// Open-loop load: `rate` requests/s spread evenly over `connections` keep-alive connections for `warmup` (not
/// recorded) then `period`. One thread sends each request at its scheduled time, whatever the answers do; a reader
/// thread per connection times each response from its request's *scheduled* send time, so a stall is charged to
/// every request it delayed (no coordinated omission), and requests pipeline when answers lag.
pub fn fixed_rate(
    route: Route,
    rate: u32,
    connections: usize,
    warmup: Duration,
    period: Duration,
) -> anyhow::Result<RateRun> {
    let answer_len = response().len();
    let message = request();
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    for _ in 0..connections {
        let stream = route.dial_blocking(Target::Http).context("opening a load connection")?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut reading = stream.try_clone()?;
        let (tx, rx) = mpsc::channel::<(Instant, bool)>();
        readers.push(std::thread::spawn(move || -> anyhow::Result<Histogram<u64>> {
            let mut latencies = histogram();
            let mut buf = vec![0; answer_len];
            while let Ok((scheduled, record)) = rx.recv() {
                reading.read_exact(&mut buf).context("reading a response")?;
                if !buf.starts_with(b"HTTP/1.1 200 ") {
                    return Err(anyhow!("unexpected response: {:?}", String::from_utf8_lossy(&buf[..32])));
                }
                if record {
                    latencies.saturating_record(scheduled.elapsed().as_nanos() as u64);
                }
            }
            Ok(latencies)
        }));
        writers.push((stream, tx));
    }
    procfs::precise_sleeps();
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let total = ((warmup + period).as_secs_f64() * f64::from(rate)) as u64;
    let recorded_from = (warmup.as_secs_f64() * f64::from(rate)) as u64;
    let start = Instant::now() + Duration::from_millis(5);
    let mut sent = 0;
    for i in 0..total {
        let scheduled = start + interval.mul_f64(i as f64);
        let now = Instant::now();
        if scheduled > now {
            std::thread::sleep(scheduled - now);
        }
        let (stream, tx) = &mut writers[i as usize % connections];
        if tx.send((scheduled, i >= recorded_from)).is_err() {
            break; // its reader failed: the join below says why
        }
        if stream.write_all(&message).is_err() {
            break;
        }
        sent += 1;
    }
    drop(writers.drain(..).map(|(stream, _)| stream).collect::<Vec<_>>());
    let mut latencies = histogram();
    for reader in readers {
        let part = reader.join().map_err(|_| anyhow!("a reader thread panicked"))??;
        latencies.add(part).map_err(|e| anyhow!("merging histograms: {e:?}"))?;
    }
    if sent < total {
        return Err(anyhow!("sent only {sent} of {total} requests"));
    }
    Ok(RateRun { latencies, sent })
}

/// A new connection, one request and its response; the connection is closed when this returns.
async fn one_request(route: Route, message: &[u8], answer: &mut [u8]) -> std::io::Result<Duration> {
    let started = Instant::now();
    let mut stream = route.dial(Target::Http).await?;
    stream.write_all(message).await?;
    stream.read_exact(answer).await?;
    Ok(started.elapsed())
}

/// Connections/s and each connection's time (connect, one request, its response), `concurrency` at a time for
/// `period`.
pub async fn churn(route: Route, concurrency: usize, period: Duration) -> std::io::Result<(f64, Vec<Duration>)> {
    let started = Instant::now();
    let deadline = started + period;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        tasks.spawn(async move {
            let (message, mut answer) = (request(), vec![0; response().len()]);
            let mut times = Vec::new();
            while Instant::now() < deadline {
                times.push(one_request(route, &message, &mut answer).await?);
            }
            std::io::Result::Ok(times)
        });
    }
    let mut all = Vec::new();
    while let Some(done) = tasks.join_next().await {
        all.extend(done.map_err(std::io::Error::other)??);
    }
    Ok((all.len() as f64 / started.elapsed().as_secs_f64(), all))
}

/// Opens up to `n` connections (`concurrency` at a time), each after one request and response, and keeps them
/// open; stops at the first error and returns it with the connections it has.
pub async fn idle_connections(route: Route, n: usize, concurrency: usize) -> (Vec<TcpStream>, Option<String>) {
    let mut open = Vec::with_capacity(n);
    let mut tasks = tokio::task::JoinSet::new();
    let mut started = 0;
    let mut error = None;
    let open_one = move || async move {
        let (message, mut answer) = (request(), vec![0; response().len()]);
        let mut stream = route.dial(Target::Http).await?;
        stream.write_all(&message).await?;
        stream.read_exact(&mut answer).await?;
        std::io::Result::Ok(stream)
    };
    while started < n.min(concurrency) {
        tasks.spawn(open_one());
        started += 1;
    }
    while let Some(done) = tasks.join_next().await {
        match done.map_err(std::io::Error::other).and_then(|r| r) {
            Ok(stream) => open.push(stream),
            Err(e) => {
                error.get_or_insert_with(|| format!("after {} connections: {e}", open.len()));
            }
        }
        if error.is_none() && started < n {
            tasks.spawn(open_one());
            started += 1;
        }
    }
    (open, error)
}

/// Where `route` dials, for messages.
pub fn describe(route: Route) -> String {
    match route {
        Route::Direct(p) | Route::Forward(p) => format!("{} / {}", p.sink, p.http),
        Route::Socks5 { proxy, servers } => format!("SOCKS5 {proxy} → {} / {}", servers.sink, servers.http),
        Route::Netns { from, servers } => format!("from {} to {} / {}", from.namespace(), servers.sink, servers.http),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers() -> (tokio::runtime::Runtime, Ports) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let ports = runtime.block_on(start_servers(IpAddr::from([127, 0, 0, 1]))).expect("servers");
        (runtime, ports)
    }

    #[test]
    fn the_sink_sends_back_exactly_what_is_asked_and_reads_the_other_way_as_before() {
        let (runtime, ports) = servers();
        runtime.block_on(async {
            // Server→client: exactly 3 MiB + 5 bytes, then the end of the stream.
            let mut stream = TcpStream::connect(ports.sink).await.unwrap();
            let want = (3 << 20) + 5;
            stream.write_u64(want | REVERSE).await.unwrap();
            let mut got = Vec::new();
            stream.read_to_end(&mut got).await.unwrap();
            assert_eq!(got.len() as u64, want);
            // Client→server, unchanged: the one-byte answer once every byte is in.
            assert!(bulk(Route::Direct(ports), 1 << 20, 2).await.unwrap() > 0.0);
            assert!(bulk_reverse(Route::Direct(ports), 1 << 20, 2).await.unwrap() > 0.0);
        });
    }

    #[test]
    fn the_closed_loop_counts_answered_requests() {
        let (runtime, ports) = servers();
        let rate = runtime.block_on(closed_loop(Route::Direct(ports), 4, Duration::from_millis(200))).unwrap();
        assert!(rate > 0.0, "{rate}");
    }
}
