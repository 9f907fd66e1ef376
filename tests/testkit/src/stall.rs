//! [`StallProxy`]: a TCP proxy on 127.0.0.1 in front of a git host (a [`super::gitd::GitDaemon`]
//! or a [`super::httpd::GitHttpServer`] port) that can be switched at run time between
//! forwarding and stalling: a stalled connection is accepted, whatever arrives is read and
//! discarded, nothing is ever answered, and the socket stays open until the proxy is dropped
//! (a git host that hangs, as opposed to one that is down). Threads and `std::net` only.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the proxy waits for the target to accept a forwarded connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the proxy does with connections from now on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Pipe bytes both ways between the client and the target.
    Forward,
    /// Read and discard whatever the client sends, never answer, keep the socket open.
    Stall,
}

/// A TCP proxy on `127.0.0.1:<free port>` in front of `target`; see the module docs.
/// Stalling applies to new connections and to open ones (a kept-alive HTTP connection stops
/// carrying bytes); forwarding again applies to new connections. Dropping the proxy closes
/// every connection and joins every thread.
pub struct StallProxy {
    port: u16,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

struct Shared {
    target: SocketAddr,
    mode: AtomicU8,
    shutting_down: AtomicBool,
    accepted: AtomicUsize,
    next_id: AtomicU64,
    /// A handle on every socket a connection thread reads from, to unblock it on drop.
    sockets: Mutex<HashMap<u64, TcpStream>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

const FORWARD: u8 = 0;
const STALL: u8 = 1;

impl StallProxy {
    /// Listen on a free loopback port, forwarding to `target`.
    pub fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the stall proxy to 127.0.0.1:0");
        let port = listener.local_addr().expect("the stall proxy's address").port();
        let shared = Arc::new(Shared {
            target,
            mode: AtomicU8::new(FORWARD),
            shutting_down: AtomicBool::new(false),
            accepted: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            sockets: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("stall-proxy-{port}"))
                .spawn(move || accept_loop(listener, &shared))
                .expect("spawn the stall proxy's accept thread")
        };
        StallProxy { port, shared, acceptor: Some(acceptor) }
    }

    /// The port the proxy listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Where forwarded connections go.
    pub fn target(&self) -> SocketAddr {
        self.shared.target
    }

    /// Stall the connections accepted from now on.
    pub fn stall(&self) {
        self.shared.mode.store(STALL, Ordering::SeqCst);
    }

    /// Forward the connections accepted from now on (the initial mode).
    pub fn forward(&self) {
        self.shared.mode.store(FORWARD, Ordering::SeqCst);
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        match self.shared.mode.load(Ordering::SeqCst) {
            STALL => Mode::Stall,
            _ => Mode::Forward,
        }
    }

    /// How many connections the proxy accepted so far (forwarded and stalled alike).
    pub fn connections(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        // Wake the accept thread; it sees the flag and returns.
        let woke = TcpStream::connect_timeout(&self.addr(), Duration::from_secs(2)).is_ok();
        if let Some(acceptor) = self.acceptor.take() {
            if woke {
                let _ = acceptor.join();
            }
        }
        // No new connection threads from here on: unblock and join the ones there are.
        for socket in lock(&self.shared.sockets).values() {
            let _ = socket.shutdown(Shutdown::Both);
        }
        let threads = std::mem::take(&mut *lock(&self.shared.threads));
        for t in threads {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn accept_loop(listener: TcpListener, shared: &Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = conn else { continue };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        lock(&shared.threads).retain(|t| !t.is_finished());
        if shared.mode.load(Ordering::SeqCst) == STALL {
            spawn_reader(shared, client, None);
            continue;
        }
        match TcpStream::connect_timeout(&shared.target, CONNECT_TIMEOUT) {
            Ok(upstream) => {
                let (Ok(client_w), Ok(upstream_w)) = (client.try_clone(), upstream.try_clone()) else { continue };
                spawn_reader(shared, client, Some(upstream_w));
                spawn_reader(shared, upstream, Some(client_w));
            }
            // As a host that is down would: the client sees the connection closed.
            Err(_) => drop(client),
        }
    }
}

/// A thread reading `from` until it ends: into `to` (then `to` is half-closed), or, with no
/// `to`, into nothing (a stalled connection). `from` is registered so that drop can end it.
fn spawn_reader(shared: &Arc<Shared>, from: TcpStream, to: Option<TcpStream>) {
    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
    let Ok(handle) = from.try_clone() else { return };
    lock(&shared.sockets).insert(id, handle);
    let thread_shared = Arc::clone(shared);
    let spawned = std::thread::Builder::new().name(format!("stall-proxy-conn-{id}")).spawn(move || {
        pump(&thread_shared, from, to);
        lock(&thread_shared.sockets).remove(&id);
    });
    match spawned {
        Ok(t) => lock(&shared.threads).push(t),
        Err(_) => {
            lock(&shared.sockets).remove(&id);
        }
    }
}

fn pump(shared: &Shared, mut from: TcpStream, to: Option<TcpStream>) {
    let mut buf = [0u8; 16 * 1024];
    match to {
        Some(mut to) => {
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    // A kept-alive connection stalls too once the proxy does: what arrives is dropped.
                    Ok(_) if shared.mode.load(Ordering::SeqCst) == STALL => {}
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        }
        // Stalled: read and discard until the client leaves or the proxy is dropped.
        None => while let Ok(1..) = from.read(&mut buf) {},
    }
}
