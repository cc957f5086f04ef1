//! A small TCP implementation of the rendezvous [`Store`]: a server ([`TcpStoreServer`]) that
//! keeps keys in memory, and a client ([`TcpStore`]). Tests, benches and the standalone
//! launcher use it; real jobs use the coordinator's gRPC store.
//!
//! Wire format (all integers little endian): a request is `op: u8, key_len: u32, key`, then
//! `value_len: u32, value` for SET, `timeout_ms: u64` for GET, `delta: i64` for ADD. The answer
//! is `status: u8` (0 ok, 1 timed out, 2 refused) then, when ok, `value_len: u32, value` for
//! GET and `value: i64` for ADD; when refused, `len: u32, message`.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::store::{Store, StoreError};

const OP_SET: u8 = 1;
const OP_GET: u8 = 2;
const OP_ADD: u8 = 3;
const OK: u8 = 0;
const TIMED_OUT: u8 = 1;
const REFUSED: u8 = 2;
const MAX_KEY: usize = 64 << 10;
const MAX_VALUE: usize = 64 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Default)]
struct Shared {
    data: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
    stop: AtomicBool,
    /// Clones of the open client connections (to close them on shutdown), by id.
    conns: Mutex<HashMap<u64, TcpStream>>,
}

/// The store's server. Dropping it (or [`TcpStoreServer::shutdown`]) stops it and closes
/// every client connection.
#[derive(Debug)]
pub struct TcpStoreServer {
    addr: SocketAddr,
    listener: Arc<TcpListener>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl TcpStoreServer {
    /// Binds `addr` (e.g. `"127.0.0.1:0"`) and serves.
    pub fn bind(addr: impl ToSocketAddrs) -> io::Result<TcpStoreServer> {
        TcpStoreServer::serve(TcpListener::bind(addr)?)
    }

    /// Serves on a listener the caller bound (so tests know the port before anything runs).
    pub fn serve(listener: TcpListener) -> io::Result<TcpStoreServer> {
        let addr = listener.local_addr()?;
        let listener = Arc::new(listener);
        let shared = Arc::new(Shared::default());
        let (l, s) = (listener.clone(), shared.clone());
        let thread = std::thread::Builder::new()
            .name("tcp-store".into())
            .spawn(move || accept_loop(&l, &s))?;
        Ok(TcpStoreServer {
            addr,
            listener,
            shared,
            thread: Some(thread),
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving (also done on drop).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // SAFETY: shutting down a socket we own; it wakes the blocked accept().
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        for (_, c) in lock(&self.shared.conns).drain() {
            let _ = c.shutdown(Shutdown::Both);
        }
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for TcpStoreServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for id in 0u64.. {
        let conn = listener.accept();
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok((stream, _)) = conn else { continue };
        let _ = stream.set_nodelay(true);
        if let Ok(c) = stream.try_clone() {
            lock(&shared.conns).insert(id, c);
        }
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("tcp-store-conn".into())
            .spawn(move || {
                let _ = serve_conn(stream, &s);
                lock(&s.conns).remove(&id);
            });
        if spawned.is_err() {
            tracing::warn!("tcp store: could not start a connection thread");
        }
    }
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn read_bytes(r: &mut impl Read, max: usize) -> io::Result<Vec<u8>> {
    let n = read_u32(r)? as usize;
    if n > max {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "field too long"));
    }
    let mut v = vec![0u8; n];
    r.read_exact(&mut v)?;
    Ok(v)
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn serve_conn(mut stream: TcpStream, shared: &Shared) -> io::Result<()> {
    loop {
        let mut op = [0u8; 1];
        if stream.read(&mut op)? == 0 {
            return Ok(());
        }
        let key = String::from_utf8(read_bytes(&mut stream, MAX_KEY)?)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "key is not UTF-8"))?;
        let mut out = Vec::new();
        match op[0] {
            OP_SET => {
                let value = read_bytes(&mut stream, MAX_VALUE)?;
                lock(&shared.data).insert(key, value);
                shared.changed.notify_all();
                out.push(OK);
            }
            OP_GET => {
                let timeout = Duration::from_millis(read_u64(&mut stream)?);
                let deadline = Instant::now() + timeout;
                let mut data = lock(&shared.data);
                loop {
                    if let Some(v) = data.get(&key) {
                        out.push(OK);
                        put_bytes(&mut out, v);
                        break;
                    }
                    let now = Instant::now();
                    if now >= deadline || shared.stop.load(Ordering::SeqCst) {
                        out.push(TIMED_OUT);
                        break;
                    }
                    data = shared
                        .changed
                        .wait_timeout(data, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
            OP_ADD => {
                let delta = read_u64(&mut stream)? as i64;
                let mut data = lock(&shared.data);
                let old = match data.get(&key) {
                    None => Some(0),
                    Some(v) => std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.parse::<i64>().ok()),
                };
                match old {
                    Some(old) => {
                        let new = old.wrapping_add(delta);
                        data.insert(key, new.to_string().into_bytes());
                        shared.changed.notify_all();
                        out.push(OK);
                        out.extend_from_slice(&new.to_le_bytes());
                    }
                    None => {
                        out.push(REFUSED);
                        put_bytes(
                            &mut out,
                            format!("key {key:?} does not hold an integer").as_bytes(),
                        );
                    }
                }
            }
            other => {
                out.push(REFUSED);
                put_bytes(
                    &mut out,
                    format!("unknown store operation {other}").as_bytes(),
                );
                stream.write_all(&out)?;
                return Ok(());
            }
        }
        stream.write_all(&out)?;
    }
}

/// A client of [`TcpStoreServer`]. Cheap to share (`Arc<TcpStore>` as `Arc<dyn Store>`):
/// concurrent calls each use their own pooled connection, so a blocked `get` never delays
/// another thread's `set`.
#[derive(Debug)]
pub struct TcpStore {
    addr: SocketAddr,
    connect_timeout: Duration,
    idle: Mutex<Vec<TcpStream>>,
}

impl TcpStore {
    /// A client of the server at `addr`. Connections are made on first use; a server that
    /// is not up yet is retried for `connect_timeout`.
    pub fn new(addr: SocketAddr, connect_timeout: Duration) -> TcpStore {
        TcpStore {
            addr,
            connect_timeout,
            idle: Mutex::new(Vec::new()),
        }
    }

    fn connect(&self) -> Result<TcpStream, StoreError> {
        let deadline = Instant::now() + self.connect_timeout;
        let mut backoff = Duration::from_millis(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match TcpStream::connect_timeout(&self.addr, left.max(Duration::from_millis(1))) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                // Only a server that is not listening yet is worth retrying (a launcher may
                // start workers and the store at the same time); this is no readiness sleep
                // in tests, which bind the server first.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused && left > backoff => {
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(200));
                }
                Err(e) => {
                    return Err(StoreError::Unreachable(format!("{}: {e}", self.addr)));
                }
            }
        }
    }

    /// Sends one request and reads the status byte; the caller reads the rest.
    fn request(
        &self,
        req: &[u8],
        io_timeout: Duration,
        read_answer: impl FnOnce(u8, &mut TcpStream) -> io::Result<Result<Vec<u8>, StoreError>>,
    ) -> Result<Vec<u8>, StoreError> {
        let pooled = lock(&self.idle).pop();
        let mut stream = match pooled {
            Some(s) => s,
            None => self.connect()?,
        };
        let unreachable = |e: io::Error| StoreError::Unreachable(format!("{}: {e}", self.addr));
        stream
            .set_read_timeout(Some(io_timeout))
            .map_err(unreachable)?;
        stream
            .set_write_timeout(Some(io_timeout))
            .map_err(unreachable)?;
        stream.write_all(req).map_err(unreachable)?;
        let mut status = [0u8; 1];
        stream.read_exact(&mut status).map_err(unreachable)?;
        let answer = read_answer(status[0], &mut stream).map_err(unreachable)?;
        lock(&self.idle).push(stream);
        answer
    }
}

fn header(op: u8, key: &str) -> Vec<u8> {
    let mut req = vec![op];
    put_bytes(&mut req, key.as_bytes());
    req
}

fn refused(status: u8, stream: &mut TcpStream) -> io::Result<StoreError> {
    if status == REFUSED {
        let msg = read_bytes(stream, MAX_KEY)?;
        Ok(StoreError::Refused(
            String::from_utf8_lossy(&msg).into_owned(),
        ))
    } else {
        Ok(StoreError::Refused(format!("unexpected status {status}")))
    }
}

/// How long a plain request may take on the wire.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

impl Store for TcpStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        if value.len() > MAX_VALUE || key.len() > MAX_KEY {
            return Err(StoreError::Refused(format!(
                "key or value of {key:?} too long"
            )));
        }
        let mut req = header(OP_SET, key);
        put_bytes(&mut req, value);
        self.request(&req, IO_TIMEOUT, |status, s| {
            Ok(if status == OK {
                Ok(Vec::new())
            } else {
                Err(refused(status, s)?)
            })
        })
        .map(|_| ())
    }

    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, StoreError> {
        let mut req = header(OP_GET, key);
        req.extend_from_slice(&(timeout.as_millis().min(u64::MAX as u128) as u64).to_le_bytes());
        self.request(&req, timeout + IO_TIMEOUT, |status, s| match status {
            OK => Ok(Ok(read_bytes(s, MAX_VALUE)?)),
            TIMED_OUT => Ok(Err(StoreError::Timeout {
                key: key.to_string(),
                after: timeout,
            })),
            _ => Ok(Err(refused(status, s)?)),
        })
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        let mut req = header(OP_ADD, key);
        req.extend_from_slice(&delta.to_le_bytes());
        let v = self.request(&req, IO_TIMEOUT, |status, s| {
            if status == OK {
                let mut b = [0u8; 8];
                s.read_exact(&mut b)?;
                Ok(Ok(b.to_vec()))
            } else {
                Ok(Err(refused(status, s)?))
            }
        })?;
        let mut b = [0u8; 8];
        b.copy_from_slice(&v);
        Ok(i64::from_le_bytes(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_add_and_timeouts() {
        let server = TcpStoreServer::bind("127.0.0.1:0").unwrap();
        let store = Arc::new(TcpStore::new(server.addr(), Duration::from_secs(5)));
        store.set("a", b"hello").unwrap();
        assert_eq!(store.get("a", Duration::from_secs(1)).unwrap(), b"hello");
        assert_eq!(store.add("n", 2).unwrap(), 2);
        assert_eq!(store.add("n", -5).unwrap(), -3);
        assert!(matches!(store.add("a", 1), Err(StoreError::Refused(_))));
        let t0 = Instant::now();
        let e = store
            .get("missing", Duration::from_millis(100))
            .unwrap_err();
        assert!(matches!(e, StoreError::Timeout { .. }), "{e}");
        assert!(t0.elapsed() >= Duration::from_millis(100));

        // A get blocks until another thread sets the key; a concurrent set is not delayed.
        let s2 = store.clone();
        let waiter = std::thread::spawn(move || s2.get("later", Duration::from_secs(10)));
        store.set("other", b"x").unwrap();
        store.set("later", b"v").unwrap();
        assert_eq!(waiter.join().unwrap().unwrap(), b"v");

        let addr = server.addr();
        server.shutdown();
        let gone = TcpStore::new(addr, Duration::from_millis(50));
        assert!(matches!(
            gone.set("k", b"v"),
            Err(StoreError::Unreachable(_))
        ));
    }
}
