//! A TCP proxy that adds a fixed delay in each direction: the network between a
//! consumer and its stores, on a machine where everything is on loopback. It keeps
//! pipelining intact (bytes are timestamped on arrival and written out once their delay
//! has passed, in order), so a batch of pipelined commands still costs one round trip.
//! Blocking threads, not tokio timers: tokio's timer wheel rounds up to 1 ms, thread
//! sleeps are good to tens of microseconds.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Listens on a loopback port and forwards every connection to `target`.
pub struct DelayProxy {
    pub addr: SocketAddr,
}

impl DelayProxy {
    pub fn start(target: &str, one_way: Duration) -> std::io::Result<Self> {
        let target: SocketAddr = target
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| std::io::Error::other(format!("cannot resolve {target}")))?;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(target) else { continue };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                if let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) {
                    pipe(client, s2, one_way);
                    pipe(server, c2, one_way);
                }
            }
        });
        Ok(Self { addr })
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    });
    thread::spawn(move || {
        for (due, data) in rx {
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
            if to.write_all(&data).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Both);
    });
}

/// `scheme://[userinfo@]host:port[/rest]` with `host:port` replaced.
pub fn swap_host(url: &str, addr: SocketAddr) -> Option<(String, String)> {
    let (scheme, rest) = url.split_once("://")?;
    let (userinfo, hostpart) = match rest.rsplit_once('@') {
        Some((u, h)) => (format!("{u}@"), h),
        None => (String::new(), rest),
    };
    let (host, tail) = match hostpart.find(['/', '?']) {
        Some(i) => hostpart.split_at(i),
        None => (hostpart, ""),
    };
    Some((format!("{scheme}://{userinfo}{addr}{tail}"), host.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swaps_only_the_host() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(
            swap_host("postgres://u:p@db:5432/x?sslmode=disable", a),
            Some(("postgres://u:p@127.0.0.1:1/x?sslmode=disable".into(), "db:5432".into()))
        );
        assert_eq!(
            swap_host("redis://127.0.0.1:6379", a),
            Some(("redis://127.0.0.1:1".into(), "127.0.0.1:6379".into()))
        );
    }

    #[test]
    fn adds_the_delay_each_way() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = echo.local_addr().unwrap().to_string();
        thread::spawn(move || {
            for mut s in echo.incoming().flatten() {
                let mut buf = [0u8; 16];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        });
        let proxy = DelayProxy::start(&target, Duration::from_millis(5)).unwrap();
        let mut s = TcpStream::connect(proxy.addr).unwrap();
        let t = Instant::now();
        s.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        assert!(t.elapsed() >= Duration::from_millis(10), "{:?}", t.elapsed());
    }
}
