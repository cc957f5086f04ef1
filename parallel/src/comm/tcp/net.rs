//! Connections of the tcp backend. Every rank listens on TCP (reachable from other hosts)
//! and on an abstract Unix-domain socket (reachable from its own host and network
//! namespace), and publishes both with a host identity. A sender on the same host (same
//! boot id and network namespace) connects over the Unix socket — roughly twice the
//! throughput of TCP loopback for the same kernel copies — and falls back to TCP if that
//! fails; other hosts use TCP. `WEAVER_COMM_TRANSPORT=tcp` forces TCP everywhere (to
//! measure or debug the TCP path on one host; it also turns shared memory off).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

/// A connected byte stream, TCP or Unix.
#[derive(Debug)]
pub(super) enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl AsRawFd for Sock {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Sock::Tcp(s) => s.as_raw_fd(),
            Sock::Unix(s) => s.as_raw_fd(),
        }
    }
}

/// Socket send buffer to ask for, in bytes: `WEAVER_COMM_SOCKET_BUFFER` if set (0 keeps the
/// kernel's default), else 1 MiB for Unix sockets — measured here as the best compromise
/// between running ahead of a peer that is not scheduled and keeping forwarded chunks in
/// cache — and the kernel's autotuning for TCP (explicit sizes would disable it, and
/// autotuning grows buffers to what a link between hosts needs).
fn buffer_bytes(unix: bool) -> usize {
    static B: OnceLock<Option<usize>> = OnceLock::new();
    let explicit = *B.get_or_init(|| {
        std::env::var("WEAVER_COMM_SOCKET_BUFFER")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    explicit.unwrap_or(if unix { 1 << 20 } else { 0 })
}

fn set_int(fd: RawFd, level: libc::c_int, opt: libc::c_int, value: libc::c_int) {
    // SAFETY: setting an int option on a socket we own; failures only leave the default.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

impl Sock {
    pub(super) fn shutdown(&self) {
        let _ = match self {
            Sock::Tcp(s) => s.shutdown(Shutdown::Both),
            Sock::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Options for bulk transfer, then non-blocking (the engine polls).
    pub(super) fn prepare(&self) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => {
                s.set_nodelay(true)?;
                let b = buffer_bytes(false) as libc::c_int;
                if b > 0 {
                    set_int(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF, b);
                    set_int(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, b);
                }
                s.set_read_timeout(None)?;
                s.set_nonblocking(true)
            }
            Sock::Unix(s) => {
                let b = buffer_bytes(true) as libc::c_int;
                if b > 0 {
                    set_int(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF, b);
                }
                s.set_read_timeout(None)?;
                s.set_nonblocking(true)
            }
        }
    }

    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
            Sock::Unix(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
        }
    }

    fn write_all(&self, b: &[u8]) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => (&*s).write_all(b),
            Sock::Unix(s) => (&*s).write_all(b),
        }
    }

    fn read_exact(&self, b: &mut [u8]) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => (&*s).read_exact(b),
            Sock::Unix(s) => (&*s).read_exact(b),
        }
    }
}

/// Identifies "this host and network namespace": the kernel's boot id and the namespace's
/// inode. Equal ids mean an abstract Unix socket of one is reachable from the other.
pub(super) fn host_id() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let netns = std::fs::read_link("/proc/self/ns/net")
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    format!("{}/{}", boot.trim(), netns)
}

fn use_unix() -> bool {
    static U: OnceLock<bool> = OnceLock::new();
    *U.get_or_init(|| {
        std::env::var("WEAVER_COMM_TRANSPORT")
            .map(|v| v != "tcp")
            .unwrap_or(true)
    })
}

/// What a rank publishes in the store: `tcp=IP:PORT;unix=NAME;host=ID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Address {
    pub(super) tcp: SocketAddr,
    pub(super) unix: Option<String>,
    pub(super) host: String,
}

impl Address {
    pub(super) fn encode(&self) -> String {
        format!(
            "tcp={};unix={};host={}",
            self.tcp,
            self.unix.as_deref().unwrap_or(""),
            self.host
        )
    }

    pub(super) fn parse(s: &str) -> Option<Address> {
        let mut tcp = None;
        let mut unix = None;
        let mut host = String::new();
        for field in s.split(';') {
            let (k, v) = field.split_once('=')?;
            match k {
                "tcp" => tcp = v.parse().ok(),
                "unix" if !v.is_empty() => unix = Some(v.to_string()),
                "host" => host = v.to_string(),
                _ => {}
            }
        }
        Some(Address {
            tcp: tcp?,
            unix,
            host,
        })
    }
}

/// Connects to `to`: over its Unix socket when it is on this host, else (or if that
/// fails) over TCP.
pub(super) fn connect(to: &Address, my_host: &str, timeout: Duration) -> io::Result<Sock> {
    if let (true, Some(name), true) = (use_unix(), &to.unix, to.host == my_host) {
        if let Ok(s) =
            UnixAddr::from_abstract_name(name.as_bytes()).and_then(|a| UnixStream::connect_addr(&a))
        {
            return Ok(Sock::Unix(s));
        }
    }
    TcpStream::connect_timeout(&to.tcp, timeout).map(Sock::Tcp)
}

/// The first bytes on every connection: who speaks, for which communicator.
pub(super) const HELLO_MAGIC: u64 = u64::from_le_bytes(*b"WVRTCP02");
const HELLO: usize = 40;
/// How long a connecting peer may take to introduce itself.
const HELLO_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Hello {
    pub(super) prefix_hash: u64,
    pub(super) group: u64,
    pub(super) from: usize,
    pub(super) to: usize,
}

impl Hello {
    /// Sends the hello (blocking, within `timeout`), then readies the socket for the engine.
    pub(super) fn send(&self, s: &Sock, timeout: Duration) -> io::Result<()> {
        let mut b = Vec::with_capacity(HELLO);
        for w in [
            HELLO_MAGIC,
            self.prefix_hash,
            self.group,
            self.from as u64,
            self.to as u64,
        ] {
            b.extend_from_slice(&w.to_le_bytes());
        }
        s.set_timeouts(timeout)?;
        s.write_all(&b)?;
        s.prepare()
    }

    fn read(s: &Sock) -> Option<Hello> {
        let mut b = [0u8; HELLO];
        s.set_timeouts(HELLO_TIMEOUT).ok()?;
        s.read_exact(&mut b).ok()?;
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i * 8..i * 8 + 8]);
            u64::from_le_bytes(w)
        };
        (word(0) == HELLO_MAGIC).then(|| Hello {
            prefix_hash: word(1),
            group: word(2),
            from: word(3) as usize,
            to: word(4) as usize,
        })
    }
}

/// The two listeners of a rank and their acceptor threads; dropping it stops them.
#[derive(Debug)]
pub(super) struct Listeners {
    pub(super) address: Address,
    stop: Arc<AtomicBool>,
    tcp: Arc<TcpListener>,
    unix: Option<Arc<UnixListener>>,
    threads: Vec<JoinHandle<()>>,
}

impl Listeners {
    /// Binds `host:0` (TCP) and an abstract Unix name, and hands every connection whose
    /// hello passes `accept` to `deliver`.
    pub(super) fn start(
        host: &str,
        unix_name: String,
        accept: impl Fn(&Hello) -> bool + Send + Sync + 'static,
        deliver: impl Fn(Hello, Sock) + Send + Sync + 'static,
    ) -> io::Result<Listeners> {
        let tcp = Arc::new(TcpListener::bind((host, 0))?);
        let tcp_addr = tcp.local_addr()?;
        let unix = match UnixAddr::from_abstract_name(unix_name.as_bytes())
            .and_then(|a| UnixListener::bind_addr(&a))
        {
            Ok(l) => Some(Arc::new(l)),
            Err(e) => {
                tracing::debug!("no Unix-socket listener ({e}); peers on this host use TCP");
                None
            }
        };
        let address = Address {
            tcp: tcp_addr,
            unix: unix.as_ref().map(|_| unix_name),
            host: host_id(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let handler = Arc::new(move |s: Sock| {
            if let Some(h) = Hello::read(&s) {
                if accept(&h) {
                    deliver(h, s);
                    return;
                }
                tracing::warn!("comm: dropped a connection from another job, generation or rank");
            }
        });
        let mut threads = Vec::new();
        {
            let (l, stop, handler) = (tcp.clone(), stop.clone(), handler.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("weaver-comm-accept".into())
                    .spawn(move || loop {
                        let r = l.accept();
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        if let Ok((s, _)) = r {
                            handler(Sock::Tcp(s));
                        }
                    })?,
            );
        }
        if let Some(u) = &unix {
            let (l, stop, handler) = (u.clone(), stop.clone(), handler.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("weaver-comm-accept".into())
                    .spawn(move || loop {
                        let r = l.accept();
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        if let Ok((s, _)) = r {
                            handler(Sock::Unix(s));
                        }
                    })?,
            );
        }
        Ok(Listeners {
            address,
            stop,
            tcp,
            unix,
            threads,
        })
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocked accept() calls: shut the listeners down, and connect once in
        // case this kernel does not wake accept on shutdown.
        // SAFETY: shutting down listening sockets we own.
        unsafe { libc::shutdown(self.tcp.as_raw_fd(), libc::SHUT_RDWR) };
        let _ = TcpStream::connect_timeout(&self.address.tcp, Duration::from_millis(100));
        if let (Some(u), Some(name)) = (&self.unix, &self.address.unix) {
            unsafe { libc::shutdown(u.as_raw_fd(), libc::SHUT_RDWR) };
            let _ = UnixAddr::from_abstract_name(name.as_bytes())
                .and_then(|a| UnixStream::connect_addr(&a));
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_roundtrip() {
        let a = Address {
            tcp: "127.0.0.1:5".parse().unwrap(),
            unix: Some("weaver-1".into()),
            host: host_id(),
        };
        assert_eq!(Address::parse(&a.encode()), Some(a.clone()));
        let b = Address { unix: None, ..a };
        assert_eq!(Address::parse(&b.encode()), Some(b));
        assert_eq!(Address::parse("garbage"), None);
    }
}
