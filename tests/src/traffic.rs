//! Verified bulk transfers: each side sends a deterministic pseudo-random stream
//! and hashes what it receives, so a test proves every byte crossed the path intact
//! in both directions, over any number of parallel connections.
//!
//! Who sends what:
//! - [`consume`] sends the stream of the seed it is given (use distinct seeds for
//!   parallel connections, so the producer's records tell them apart);
//! - [`Producer::start`] answers every connection with the stream of
//!   [`PRODUCER_SEED`], whatever its accept order;
//! - [`Producer::start_echo`] sends back exactly what it receives, for [`Stream`].
//!
//! Blocking std sockets on their own threads, each with [`IO_TIMEOUT`]: a broken
//! data path ends as an error after that long, never as a hung test.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::netns::in_netns;

/// The generator works in blocks of this size; the stream of bytes does not depend
/// on how a reader or writer slices it.
pub const BLOCK: usize = 64 * 1024;
/// Seed of everything [`Producer::start`] sends.
pub const PRODUCER_SEED: u64 = 0x5c15_7ea3_0000_0001;
/// Read and write timeout on every socket of this module.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a connect may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const READ_BUF: usize = 256 * 1024;

/// The deterministic byte stream of one seed (splitmix64, little-endian words).
/// Generation runs at several GB/s, faster than SHA-256, so it never limits a transfer.
pub struct PatternStream {
    state: u64,
    block: Box<[u8]>,
    pos: usize,
}

impl PatternStream {
    pub fn new(seed: u64) -> PatternStream {
        PatternStream {
            state: seed,
            block: vec![0; BLOCK].into_boxed_slice(),
            pos: BLOCK,
        }
    }

    fn refill(&mut self) {
        for word in self.block.chunks_exact_mut(8) {
            self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            word.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
        self.pos = 0;
    }

    /// The next `1..=max` bytes of the stream (fewer than `max` at a block boundary).
    pub fn next_bytes(&mut self, max: usize) -> &[u8] {
        if self.pos == BLOCK {
            self.refill();
        }
        let n = max.min(BLOCK - self.pos);
        let start = self.pos;
        self.pos += n;
        &self.block[start..start + n]
    }

    /// Consumes `data.len()` bytes of the stream; true when they equal `data`.
    pub fn matches(&mut self, mut data: &[u8]) -> bool {
        let mut same = true;
        while !data.is_empty() {
            let expected = self.next_bytes(data.len());
            let n = expected.len();
            same &= expected == &data[..n];
            data = &data[n..];
        }
        same
    }
}

/// SHA-256 (lowercase hex) of the first `bytes` bytes of `seed`'s stream: what the
/// receiving side of such a transfer must report.
pub fn expected_sha256(seed: u64, bytes: u64) -> String {
    let mut pattern = PatternStream::new(seed);
    let mut hasher = Sha256::new();
    let mut left = bytes;
    while left > 0 {
        let chunk = pattern.next_bytes(usize::try_from(left).unwrap_or(usize::MAX));
        hasher.update(chunk);
        left -= chunk.len() as u64;
    }
    hex(&hasher.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn set_timeouts(stream: &TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))
}

/// Writes `bytes` bytes of `seed`'s stream; returns their SHA-256. Does not shut down.
fn write_pattern(mut stream: &TcpStream, seed: u64, bytes: u64) -> std::io::Result<String> {
    let mut pattern = PatternStream::new(seed);
    let mut hasher = Sha256::new();
    let mut left = bytes;
    while left > 0 {
        let chunk = pattern.next_bytes(usize::try_from(left).unwrap_or(usize::MAX));
        stream.write_all(chunk)?;
        hasher.update(chunk);
        left -= chunk.len() as u64;
    }
    Ok(hex(&hasher.finalize()))
}

/// What one direction of a connection delivered before EOF or an error.
struct Received {
    bytes: u64,
    sha256: String,
    error: Option<std::io::Error>,
}

fn read_to_eof(mut stream: &TcpStream) -> Received {
    let mut buf = vec![0u8; READ_BUF];
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let error = loop {
        match stream.read(&mut buf) {
            Ok(0) => break None,
            Ok(n) => {
                hasher.update(&buf[..n]);
                bytes += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => break Some(e),
        }
    };
    Received {
        bytes,
        sha256: hex(&hasher.finalize()),
        error,
    }
}

fn describe(e: &std::io::Error) -> String {
    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
        format!("no progress for {IO_TIMEOUT:?} ({e})")
    } else {
        e.to_string()
    }
}

/// The consumer's view of one finished connection.
#[derive(Clone, Debug)]
pub struct Transfer {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// Seed of what this side sent.
    pub seed: u64,
    pub sent_bytes: u64,
    pub sent_sha256: String,
    pub received_bytes: u64,
    pub received_sha256: String,
    /// From connected to both directions done.
    pub elapsed: Duration,
}

impl Transfer {
    /// Both directions together, in Gbit/s.
    pub fn gbit_per_s(&self) -> f64 {
        gbit_per_s(self.sent_bytes + self.received_bytes, self.elapsed)
    }

    /// Checks that this side received exactly what [`Producer::start`] sends:
    /// `producer_bytes` bytes of [`PRODUCER_SEED`].
    pub fn check_received_from_producer(&self, producer_bytes: u64) -> Result<()> {
        if self.received_bytes != producer_bytes {
            bail!(
                "{}: received {} bytes, the producer sends {producer_bytes}",
                self.local,
                self.received_bytes
            );
        }
        if self.received_sha256 != expected_sha256(PRODUCER_SEED, producer_bytes) {
            bail!("{}: received {producer_bytes} bytes but their SHA-256 differs from what the producer sends", self.local);
        }
        Ok(())
    }

    /// End-to-end check against the producer's records ([`Producer::wait_for`]): some
    /// producer connection received exactly what this side sent and sent exactly
    /// what this side received, which was `producer_bytes` of [`PRODUCER_SEED`].
    pub fn verify_with(&self, producer_side: &[ConnResult], producer_bytes: u64) -> Result<()> {
        self.check_received_from_producer(producer_bytes)?;
        let twin = producer_side
            .iter()
            .find(|c| c.received_sha256 == self.sent_sha256 && c.received_bytes == self.sent_bytes)
            .ok_or_else(|| {
                anyhow!(
                    "{}: no producer connection received the {} bytes (sha256 {}) this side sent; producer saw {:?}",
                    self.local,
                    self.sent_bytes,
                    self.sent_sha256,
                    producer_side.iter().map(|c| (c.received_bytes, c.error.as_deref())).collect::<Vec<_>>()
                )
            })?;
        if twin.sent_sha256 != self.received_sha256 || twin.sent_bytes != self.received_bytes {
            bail!(
                "{}: the producer connection from {} sent {} bytes, this side received {}",
                self.local,
                twin.peer,
                twin.sent_bytes,
                self.received_bytes
            );
        }
        Ok(())
    }
}

/// Bytes over time in Gbit/s (0 for a zero duration).
pub fn gbit_per_s(bytes: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs == 0.0 {
        0.0
    } else {
        bytes as f64 * 8.0 / secs / 1e9
    }
}

fn connect_in(ns: &str, addr: SocketAddr) -> Result<TcpStream> {
    let stream = in_netns(ns, || TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT))
        .with_context(|| format!("connecting to {addr} from namespace {ns}"))?;
    set_timeouts(&stream)?;
    Ok(stream)
}

/// Connects from namespace `ns` to `addr`, sends `bytes_to_send` bytes of `seed`'s
/// stream then half-closes, while reading until the other side half-closes too.
/// Fails on a connect error, an I/O error or [`IO_TIMEOUT`] without progress.
pub fn consume(ns: &str, addr: SocketAddr, bytes_to_send: u64, seed: u64) -> Result<Transfer> {
    let stream = connect_in(ns, addr)?;
    let local = stream.local_addr()?;
    let start = Instant::now();
    let writer_end = stream.try_clone()?;
    let writer = std::thread::spawn(move || {
        let result = write_pattern(&writer_end, seed, bytes_to_send);
        match &result {
            Ok(_) => {
                let _ = writer_end.shutdown(Shutdown::Write);
            }
            // Unblocks the reader: nothing good can come back on this connection.
            Err(_) => {
                let _ = writer_end.shutdown(Shutdown::Both);
            }
        }
        result
    });
    let received = read_to_eof(&stream);
    if received.error.is_some() {
        // Unblocks the writer, which may wait on a peer that stopped reading.
        let _ = stream.shutdown(Shutdown::Both);
    }
    let sent = writer
        .join()
        .map_err(|_| anyhow!("writer thread panicked"))?;
    let elapsed = start.elapsed();
    let sent_sha256 = sent.map_err(|e| {
        anyhow!(
            "{local} -> {addr}: sending failed ({}), {} bytes received by then",
            describe(&e),
            received.bytes
        )
    })?;
    if let Some(e) = received.error {
        bail!(
            "{local} -> {addr}: receiving failed after {} bytes: {}",
            received.bytes,
            describe(&e)
        );
    }
    Ok(Transfer {
        local,
        peer: addr,
        seed,
        sent_bytes: bytes_to_send,
        sent_sha256,
        received_bytes: received.bytes,
        received_sha256: received.sha256,
        elapsed,
    })
}

/// [`consume`] on every address at once, connection `i` sending seed `first_seed + i`.
/// Fails if any connection failed, listing all failures.
pub fn consume_parallel(
    ns: &str,
    addrs: &[SocketAddr],
    bytes_to_send: u64,
    first_seed: u64,
) -> Result<Vec<Transfer>> {
    let results: Vec<Result<Transfer>> = std::thread::scope(|scope| {
        let handles: Vec<_> = addrs
            .iter()
            .enumerate()
            .map(|(i, addr)| {
                scope.spawn(move || consume(ns, *addr, bytes_to_send, first_seed + i as u64))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("transfer thread panicked")))
            })
            .collect()
    });
    let errors: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .map(|e| format!("{e:#}"))
        .collect();
    if !errors.is_empty() {
        bail!(
            "{} of {} transfers failed:\n{}",
            errors.len(),
            addrs.len(),
            errors.join("\n")
        );
    }
    Ok(results.into_iter().filter_map(Result::ok).collect())
}

/// The producer's record of one finished connection.
#[derive(Clone, Debug)]
pub struct ConnResult {
    /// Who connected (the inbound gateway for a proxied path, the consumer when routed).
    pub peer: SocketAddr,
    /// Position in accept order, from 0.
    pub index: usize,
    pub received_bytes: u64,
    pub received_sha256: String,
    pub sent_bytes: u64,
    pub sent_sha256: String,
    /// Set when either direction failed; the byte counts say how far it got.
    pub error: Option<String>,
    pub elapsed: Duration,
}

#[derive(Clone, Copy)]
enum Mode {
    Send(u64),
    Echo,
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    accepted: AtomicUsize,
    done: Mutex<Vec<ConnResult>>,
    done_changed: Condvar,
    // Clones of live sockets, shut down on drop so their threads end promptly.
    live: Mutex<HashMap<usize, TcpStream>>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A TCP server in a namespace standing in for the producer application. It accepts
/// any number of connections, each served on its own threads; see the module docs
/// for what it sends. Dropping it closes the listener and all its connections.
pub struct Producer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Producer {
    /// Listens on `bind` in `ns`; on each connection sends `bytes_to_send` bytes of
    /// [`PRODUCER_SEED`] then half-closes, while reading and hashing until EOF.
    /// Port 0 picks a free port: see [`Producer::addr`].
    pub fn start(ns: &str, bind: SocketAddr, bytes_to_send: u64) -> Result<Producer> {
        Producer::start_mode(ns, bind, Mode::Send(bytes_to_send))
    }

    /// Listens on `bind` in `ns` and echoes every byte back, half-closing after the
    /// peer's EOF; the server side of [`Stream`].
    pub fn start_echo(ns: &str, bind: SocketAddr) -> Result<Producer> {
        Producer::start_mode(ns, bind, Mode::Echo)
    }

    fn start_mode(ns: &str, bind: SocketAddr, mode: Mode) -> Result<Producer> {
        let listener = in_netns(ns, || TcpListener::bind(bind))
            .with_context(|| format!("listening on {bind} in namespace {ns}"))?;
        let addr = listener.local_addr()?;
        // Non-blocking so the accept loop can notice `stop`.
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared::default());
        let acceptor = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("producer-{addr}"))
                .spawn(move || accept_loop(listener, mode, shared))?
        };
        Ok(Producer {
            addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far, finished or not.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// The connections finished so far, in order of finishing.
    pub fn results(&self) -> Vec<ConnResult> {
        locked(&self.shared.done).clone()
    }

    /// Waits until at least `n` connections have finished; returns all finished ones.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Result<Vec<ConnResult>> {
        let deadline = Instant::now() + timeout;
        let mut done = locked(&self.shared.done);
        while done.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "producer {}: {} of {n} connections finished within {timeout:?} ({} accepted)",
                    self.addr,
                    done.len(),
                    self.accepted()
                );
            }
            done = self
                .shared
                .done_changed
                .wait_timeout(done, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(done.clone())
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for stream in locked(&self.shared.live).values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn accept_loop(listener: TcpListener, mode: Mode, shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let index = shared.accepted.fetch_add(1, Ordering::SeqCst);
                let shared = Arc::clone(&shared);
                let spawned = std::thread::Builder::new()
                    .name(format!("producer-conn-{index}"))
                    .spawn(move || serve(stream, peer, index, mode, shared));
                if spawned.is_err() {
                    // Out of threads: the connection is dropped, which the test sees.
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn serve(stream: TcpStream, peer: SocketAddr, index: usize, mode: Mode, shared: Arc<Shared>) {
    let start = Instant::now();
    let mut result = ConnResult {
        peer,
        index,
        received_bytes: 0,
        received_sha256: String::new(),
        sent_bytes: 0,
        sent_sha256: String::new(),
        error: None,
        elapsed: Duration::ZERO,
    };
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| set_timeouts(&stream))
        .and_then(|()| stream.try_clone());
    match setup {
        Err(e) => result.error = Some(format!("socket set-up: {e}")),
        Ok(clone) => {
            locked(&shared.live).insert(index, clone);
            match mode {
                Mode::Send(bytes) => serve_send(&stream, bytes, &mut result),
                Mode::Echo => serve_echo(&stream, &mut result),
            }
            locked(&shared.live).remove(&index);
        }
    }
    result.elapsed = start.elapsed();
    locked(&shared.done).push(result);
    shared.done_changed.notify_all();
}

fn serve_send(stream: &TcpStream, bytes: u64, result: &mut ConnResult) {
    let reader_end = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => {
            result.error = Some(format!("socket set-up: {e}"));
            return;
        }
    };
    let reader = std::thread::spawn(move || {
        let received = read_to_eof(&reader_end);
        if received.error.is_some() {
            let _ = reader_end.shutdown(Shutdown::Both);
        }
        received
    });
    let mut errors = Vec::new();
    match write_pattern(stream, PRODUCER_SEED, bytes) {
        Ok(sha) => {
            result.sent_bytes = bytes;
            result.sent_sha256 = sha;
            if let Err(e) = stream.shutdown(Shutdown::Write) {
                errors.push(format!("half-close: {e}"));
            }
        }
        Err(e) => {
            errors.push(format!("sending: {}", describe(&e)));
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
    match reader.join() {
        Ok(received) => {
            result.received_bytes = received.bytes;
            result.received_sha256 = received.sha256;
            if let Some(e) = received.error {
                errors.push(format!("receiving: {}", describe(&e)));
            }
        }
        Err(_) => errors.push("reader thread panicked".into()),
    }
    if !errors.is_empty() {
        result.error = Some(errors.join("; "));
    }
}

fn serve_echo(mut stream: &TcpStream, result: &mut ConnResult) {
    let mut buf = vec![0u8; READ_BUF];
    let mut hasher = Sha256::new();
    let error = loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => {
                break stream
                    .shutdown(Shutdown::Write)
                    .err()
                    .map(|e| format!("half-close: {e}"))
            }
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => break Some(format!("receiving: {}", describe(&e))),
        };
        result.received_bytes += n as u64;
        hasher.update(&buf[..n]);
        if let Err(e) = stream.write_all(&buf[..n]) {
            break Some(format!("echoing: {}", describe(&e)));
        }
        result.sent_bytes += n as u64;
    };
    let sha = hex(&hasher.finalize());
    result.received_sha256 = sha.clone();
    // On an echo error the sent hash would be wrong; counts already tell the story.
    result.sent_sha256 = sha;
    if error.is_some() {
        let _ = stream.shutdown(Shutdown::Both);
    }
    result.error = error;
}

/// Default pace of [`Stream::start`]: enough to see progress, cheap enough that
/// a dozen streams leave the CPUs to the data plane under test.
pub const STREAM_RATE: u64 = 8 * 1024 * 1024;

#[derive(Default)]
struct StreamShared {
    stop: AtomicBool,
    sent: AtomicU64,
    echoed: AtomicU64,
    error: Mutex<Option<String>>,
}

impl StreamShared {
    fn fail(&self, what: String) {
        locked(&self.error).get_or_insert(what);
    }
}

/// A long-lived connection to a [`Producer::start_echo`] that keeps sending its
/// stream in the background and checks every echoed byte as it comes back, for
/// "other sessions keep streaming while ..." tests.
pub struct Stream {
    addr: SocketAddr,
    socket: TcpStream,
    shared: Arc<StreamShared>,
    writer: Option<JoinHandle<()>>,
    reader: Option<JoinHandle<()>>,
    started: Instant,
}

/// What [`Stream::finish`] verified.
#[derive(Clone, Debug)]
pub struct StreamSummary {
    pub sent_bytes: u64,
    /// Equal to `sent_bytes`, each byte compared with what was sent.
    pub echoed_bytes: u64,
    pub elapsed: Duration,
}

static STREAM_SEED: AtomicU64 = AtomicU64::new(0x5c15_7ea3_0001_0000);

impl Stream {
    /// Connects from `ns` to an echo server at `addr` and streams at [`STREAM_RATE`].
    pub fn start(ns: &str, addr: SocketAddr) -> Result<Stream> {
        Stream::start_with_rate(ns, addr, STREAM_RATE)
    }

    /// Like [`Stream::start`] at `bytes_per_sec` (0: as fast as the path goes).
    pub fn start_with_rate(ns: &str, addr: SocketAddr, bytes_per_sec: u64) -> Result<Stream> {
        let socket = connect_in(ns, addr)?;
        let seed = STREAM_SEED.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(StreamShared::default());
        let writer = {
            let socket = socket.try_clone()?;
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || stream_writer(&socket, seed, bytes_per_sec, &shared))
        };
        let reader = {
            let socket = socket.try_clone()?;
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || stream_reader(&socket, seed, &shared))
        };
        Ok(Stream {
            addr,
            socket,
            shared,
            writer: Some(writer),
            reader: Some(reader),
            started: Instant::now(),
        })
    }

    /// Bytes that came back and matched what was sent, so far.
    pub fn bytes_so_far(&self) -> u64 {
        self.shared.echoed.load(Ordering::SeqCst)
    }

    /// Bytes sent so far.
    pub fn bytes_sent(&self) -> u64 {
        self.shared.sent.load(Ordering::SeqCst)
    }

    /// The first failure seen (I/O error, timeout, corrupted byte), if any.
    pub fn error(&self) -> Option<String> {
        locked(&self.shared.error).clone()
    }

    /// Panics unless more verified bytes come back within `within`, or if the stream
    /// has failed.
    pub fn assert_progress(&self, within: Duration) {
        let before = self.bytes_so_far();
        let deadline = Instant::now() + within;
        loop {
            if let Some(e) = self.error() {
                panic!(
                    "stream to {} failed after {} verified bytes: {e}",
                    self.addr,
                    self.bytes_so_far()
                );
            }
            if self.bytes_so_far() > before {
                return;
            }
            if Instant::now() >= deadline {
                panic!("stream to {}: no bytes came back within {within:?} (stuck at {before} verified of {} sent)",
                    self.addr, self.bytes_sent());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops sending, half-closes, waits for the echo of everything sent and checks it
    /// all came back intact.
    pub fn finish(mut self) -> Result<StreamSummary> {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(writer) = self.writer.take() {
            writer
                .join()
                .map_err(|_| anyhow!("stream writer panicked"))?;
        }
        // Only after the writer ended: its half-close tells the echo server to finish.
        if let Some(reader) = self.reader.take() {
            reader
                .join()
                .map_err(|_| anyhow!("stream reader panicked"))?;
        }
        let (sent, echoed) = (self.bytes_sent(), self.bytes_so_far());
        if let Some(e) = self.error() {
            bail!(
                "stream to {}: {e} ({echoed} of {sent} bytes came back verified)",
                self.addr
            );
        }
        if echoed != sent {
            bail!(
                "stream to {}: sent {sent} bytes, {echoed} came back",
                self.addr
            );
        }
        Ok(StreamSummary {
            sent_bytes: sent,
            echoed_bytes: echoed,
            elapsed: self.started.elapsed(),
        })
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = self.socket.shutdown(Shutdown::Both);
        for handle in [self.writer.take(), self.reader.take()]
            .into_iter()
            .flatten()
        {
            let _ = handle.join();
        }
    }
}

fn stream_writer(mut socket: &TcpStream, seed: u64, bytes_per_sec: u64, shared: &StreamShared) {
    const CHUNK: usize = 16 * 1024;
    let mut pattern = PatternStream::new(seed);
    let start = Instant::now();
    while !shared.stop.load(Ordering::SeqCst) {
        if bytes_per_sec > 0 {
            // Sleep off any lead over the pace, in short naps so `stop` stays responsive.
            let allowed = (start.elapsed().as_secs_f64() * bytes_per_sec as f64) as u64;
            if shared.sent.load(Ordering::SeqCst) > allowed {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
        }
        let chunk = pattern.next_bytes(CHUNK);
        if let Err(e) = socket.write_all(chunk) {
            shared.fail(format!("sending: {}", describe(&e)));
            let _ = socket.shutdown(Shutdown::Both);
            return;
        }
        shared.sent.fetch_add(chunk.len() as u64, Ordering::SeqCst);
    }
    if let Err(e) = socket.shutdown(Shutdown::Write) {
        shared.fail(format!("half-close: {e}"));
    }
}

fn stream_reader(mut socket: &TcpStream, seed: u64, shared: &StreamShared) {
    let mut pattern = PatternStream::new(seed);
    let mut buf = vec![0u8; READ_BUF];
    loop {
        match socket.read(&mut buf) {
            Ok(0) => {
                // Before we asked the stream to stop, an EOF means the path
                // closed it under us (a released session, a dead gateway).
                if !shared.stop.load(Ordering::SeqCst) {
                    let at = shared.echoed.load(Ordering::SeqCst);
                    shared.fail(format!(
                        "the other end closed the stream after {at} verified bytes"
                    ));
                }
                return;
            }
            Ok(n) => {
                if !pattern.matches(&buf[..n]) {
                    let at = shared.echoed.load(Ordering::SeqCst);
                    shared.fail(format!("echoed bytes differ from the ones sent, within {n} bytes after offset {at}"));
                    let _ = socket.shutdown(Shutdown::Both);
                    return;
                }
                shared.echoed.fetch_add(n as u64, Ordering::SeqCst);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                shared.fail(format!("receiving: {}", describe(&e)));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(seed: u64, len: usize, slice: usize) -> Vec<u8> {
        let mut p = PatternStream::new(seed);
        let mut out = Vec::new();
        while out.len() < len {
            out.extend_from_slice(p.next_bytes(slice.min(len - out.len())));
        }
        out
    }

    #[test]
    fn pattern_does_not_depend_on_how_it_is_sliced() {
        let len = 3 * BLOCK + 123;
        let whole = collect(7, len, usize::MAX);
        assert_eq!(whole, collect(7, len, 1000));
        assert_eq!(whole, collect(7, len, 1));
    }

    #[test]
    fn pattern_differs_between_seeds_and_repeats_for_one() {
        assert_eq!(collect(1, 4096, 4096), collect(1, 4096, 4096));
        assert_ne!(collect(1, 4096, 4096), collect(2, 4096, 4096));
        // Not trivially periodic within a block pair.
        let two = collect(3, 2 * BLOCK, BLOCK);
        assert_ne!(two[..BLOCK], two[BLOCK..]);
    }

    #[test]
    fn matches_detects_a_flipped_byte() {
        let data = collect(9, BLOCK + 10, usize::MAX);
        assert!(PatternStream::new(9).matches(&data));
        let mut bad = data.clone();
        bad[BLOCK + 3] ^= 1;
        assert!(!PatternStream::new(9).matches(&bad));
    }

    #[test]
    fn expected_sha256_hashes_the_pattern_prefix() {
        let data = collect(42, 100_000, 777);
        assert_eq!(expected_sha256(42, 100_000), hex(&Sha256::digest(&data)));
        // The empty stream hashes like the empty string.
        assert_eq!(
            expected_sha256(42, 0),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn gbit_per_s_counts_bits() {
        assert_eq!(gbit_per_s(1_000_000_000, Duration::from_secs(8)), 1.0);
        assert_eq!(gbit_per_s(5, Duration::ZERO), 0.0);
    }
}
