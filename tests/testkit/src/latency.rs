//! A TCP proxy that adds latency each way: a git host "far away" for the contention tests and
//! the benchmark's latency tables.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A TCP proxy on 127.0.0.1 in front of `127.0.0.1:target` that delivers every chunk `delay`
/// after it arrived, in each direction (so a round trip costs `2 × delay` more), and holds a
/// new connection back one round trip (the TCP handshake; no TLS), without limiting
/// throughput; TCP_NODELAY on both sides. Its threads end with their connections;
/// the accepting thread lives as long as the process (nothing to kill: no child process).
/// It counts the connections it accepted ([`LatencyProxy::connections`]): over TLS, each one
/// is a handshake.
pub struct LatencyProxy {
    pub port: u16,
    accepted: Arc<AtomicUsize>,
}

impl LatencyProxy {
    pub fn start(target: u16, delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the latency proxy");
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                counter.fetch_add(1, Ordering::SeqCst);
                // A TCP handshake costs one round trip before the first byte can go out: the
                // client's first bytes wait in the socket buffer meanwhile.
                std::thread::spawn(move || {
                    std::thread::sleep(2 * delay);
                    let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else { return };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else { return };
                    delayed_pipe(client, s2, delay);
                    delayed_pipe(server, c2, delay);
                });
            }
        });
        LatencyProxy { port, accepted }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Copy `from` to `to`, each chunk `delay` late: a reader stamps chunks, a writer waits for
/// each stamp; end of input is passed on as a half close once everything before it is written.
fn delayed_pipe(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n @ 1..) = from.read(&mut buf) {
            if tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        for (due, bytes) in rx {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if to.write_all(&bytes).is_err() {
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
