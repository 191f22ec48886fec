//! A private local Redis Cluster (by default three primaries and three replicas), started
//! with the project's own `scripts/redis-cluster.sh` on free ports and a temporary
//! directory, and stopped when dropped. For tests (which kill nodes and move slots, so
//! each has its own) and the cluster benchmark. Feature `isolation`.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use redis::aio::MultiplexedConnection;

/// One node, as `CLUSTER NODES` describes it.
#[derive(Debug, Clone)]
pub struct Node {
    /// The node id.
    pub id: String,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Serves slots.
    pub primary: bool,
    /// Slot ranges this node serves (primaries only; a primary is a master with slots).
    pub slots: Vec<(u16, u16)>,
}

/// A running local cluster; stopped and removed when dropped.
pub struct LocalCluster {
    dir: PathBuf,
    /// The first port; the nodes use the ports from here on.
    pub base: u16,
    /// AUTH password of every node.
    pub password: Option<String>,
    /// The nodes serve TLS only.
    pub tls: bool,
    primaries: u16,
    replicas: u16,
}

static NEXT_BASE: AtomicU32 = AtomicU32::new(0);

/// The script, found from where this crate was built (a development tool, not shipped).
fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/redis-cluster.sh")
}

/// `n` (at most 8) consecutive ports, and their cluster bus ports (10000 above), that
/// nothing listens on now. Ports 21000-22759, so the bus ports stay below Linux's
/// ephemeral range (32768 and up), where an outgoing socket could take one meanwhile.
fn free_base(n: u16) -> u16 {
    let offset = std::process::id() % 220;
    loop {
        let k = NEXT_BASE.fetch_add(1, Ordering::SeqCst);
        let base = (21000 + ((offset + k) % 220) * 8) as u16;
        let free = (base..base + n).all(|p| {
            TcpListener::bind(("127.0.0.1", p)).is_ok() && TcpListener::bind(("127.0.0.1", p + 10000)).is_ok()
        });
        if free {
            return base;
        }
    }
}

impl LocalCluster {
    /// Starts three primaries with a replica each; `password` makes every node require
    /// AUTH, `tls` serves TLS only. Panics when the cluster does not come up.
    pub fn start(password: Option<&str>, tls: bool) -> Self {
        Self::start_with(3, 1, password, tls)
    }

    /// Starts `primaries` primaries with `replicas` replicas each (replicas need three
    /// primaries or more).
    /// Ports are checked free, then taken by the script; another process can take one
    /// in between, so a failed start is tried again on other ports (three times).
    pub fn start_with(primaries: u16, replicas: u16, password: Option<&str>, tls: bool) -> Self {
        let nodes = primaries * (replicas + 1);
        let mut failures = Vec::new();
        for _ in 0..3 {
            let base = free_base(nodes);
            let dir =
                std::env::temp_dir().join(format!("eo_cluster_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]));
            let cluster = Self { dir, base, password: password.map(str::to_owned), tls, primaries, replicas };
            let out = cluster.script("start").output().expect("run scripts/redis-cluster.sh");
            if out.status.success() {
                return cluster;
            }
            failures.push(format!(
                "ports {base}+: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
            // Dropping `cluster` stops whatever did start.
        }
        panic!("scripts/redis-cluster.sh start failed three times:\n{}", failures.join("\n"))
    }

    fn script(&self, command: &str) -> Command {
        let mut c = Command::new("bash");
        c.arg(script()).arg(command).arg("--dir").arg(&self.dir).arg("--port").arg(self.base.to_string());
        c.arg("--primaries").arg(self.primaries.to_string()).arg("--replicas").arg(self.replicas.to_string());
        if let Some(pw) = &self.password {
            c.arg("--password").arg(pw);
        }
        if self.tls {
            c.arg("--tls");
        }
        c
    }

    /// `REDIS_URL` for the library: three seed nodes, comma-separated.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let auth = self.password.as_ref().map(|pw| format!(":{pw}@")).unwrap_or_default();
        (self.base..self.base + self.primaries.min(3))
            .map(|p| format!("{scheme}://{auth}127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The CA that signed the nodes' certificate (with TLS).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("tls/ca.crt")
    }

    /// A plain connection to one node (for CLUSTER commands), not cluster-aware.
    pub async fn node(&self, port: u16) -> MultiplexedConnection {
        assert!(!self.tls, "node() speaks plain TCP");
        let auth = self.password.as_ref().map(|pw| format!(":{pw}@")).unwrap_or_default();
        let client = redis::Client::open(format!("redis://{auth}127.0.0.1:{port}")).expect("node url");
        client.get_multiplexed_async_connection().await.expect("connect to a cluster node")
    }

    /// The cluster as one node (any that answers) sees it.
    pub async fn nodes(&self) -> Vec<Node> {
        for port in self.base..self.base + self.primaries * (self.replicas + 1) {
            let Ok(Ok(client)) = tokio::time::timeout(Duration::from_secs(1), async {
                let auth = self.password.as_ref().map(|pw| format!(":{pw}@")).unwrap_or_default();
                redis::Client::open(format!("redis://{auth}127.0.0.1:{port}"))?.get_multiplexed_async_connection().await
            })
            .await
            else {
                continue;
            };
            let mut c = client;
            let Ok(text) = redis::cmd("CLUSTER").arg("NODES").query_async::<String>(&mut c).await else { continue };
            return parse_nodes(&text);
        }
        panic!("no node of the cluster answers");
    }

    /// The primary serving `slot`.
    pub async fn owner(&self, slot: u16) -> Node {
        self.nodes()
            .await
            .into_iter()
            .find(|n| n.primary && n.slots.iter().any(|&(a, b)| (a..=b).contains(&slot)))
            .unwrap_or_else(|| panic!("no primary serves slot {slot}"))
    }

    /// SIGKILLs the node on `port`.
    pub fn kill(&self, port: u16) {
        let pid = std::fs::read_to_string(self.dir.join(format!("{port}/redis.pid"))).expect("pid file");
        let status = Command::new("kill").arg("-9").arg(pid.trim()).status().expect("kill");
        assert!(status.success(), "kill -9 {pid}");
        // The pid is free for reuse now: `stop` must not kill whatever takes it.
        let _ = std::fs::remove_file(self.dir.join(format!("{port}/redis.pid")));
    }

    /// Moves `slot`, with its keys, from its primary to `to`, in small steps (`pause`
    /// between them) so traffic meets the slot half-migrated: the MIGRATING / IMPORTING
    /// protocol `redis-cli --cluster reshard` follows, for one slot.
    pub async fn migrate_slot(&self, slot: u16, to: &Node, pause: Duration) {
        let from = self.owner(slot).await;
        assert_ne!(from.id, to.id, "slot {slot} is already on {}", to.port);
        let (mut src, mut dst) = (self.node(from.port).await, self.node(to.port).await);
        let setslot = |state: &str, id: &str| {
            let mut c = redis::cmd("CLUSTER");
            c.arg("SETSLOT").arg(slot).arg(state).arg(id);
            c
        };
        if let Err(e) = setslot("IMPORTING", &from.id).query_async::<()>(&mut dst).await {
            let view: String = redis::cmd("CLUSTER").arg("NODES").query_async(&mut dst).await.unwrap_or_default();
            panic!("IMPORTING on {} (from {}): {e}\n{view}", to.port, from.port);
        }
        let _: () = setslot("MIGRATING", &to.id).query_async(&mut src).await.expect("MIGRATING");
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(5)
                .query_async(&mut src)
                .await
                .expect("GETKEYSINSLOT");
            if keys.is_empty() {
                break;
            }
            let mut migrate = redis::cmd("MIGRATE");
            migrate.arg("127.0.0.1").arg(to.port).arg("").arg(0).arg(5000);
            if let Some(pw) = &self.password {
                migrate.arg("AUTH").arg(pw);
            }
            migrate.arg("KEYS").arg(&keys);
            let _: String = migrate.query_async(&mut src).await.expect("MIGRATE");
            tokio::time::sleep(pause).await;
        }
        // The new owner first, as Redis recommends: redirections then never bounce back.
        let mut owners: Vec<Node> = self.nodes().await.into_iter().filter(|n| n.primary).collect();
        owners.sort_by_key(|n| n.id != to.id);
        for node in &owners {
            let mut c = self.node(node.port).await;
            if let Err(e) = setslot("NODE", &to.id).query_async::<()>(&mut c).await {
                let view: String = redis::cmd("CLUSTER").arg("NODES").query_async(&mut c).await.unwrap_or_default();
                panic!("SETSLOT NODE on {}: {e}\n{view}", node.port);
            }
        }
    }

    /// How many keys under `pattern` each primary holds, by port.
    pub async fn keys_per_primary(&self, pattern: &str) -> HashMap<u16, usize> {
        let mut out = HashMap::new();
        for node in self.nodes().await.into_iter().filter(|n| n.primary) {
            let mut c = self.node(node.port).await;
            let keys: Vec<String> = redis::cmd("KEYS").arg(pattern).query_async(&mut c).await.expect("KEYS");
            out.insert(node.port, keys.len());
        }
        out
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let _ = self.script("stop").output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn parse_nodes(text: &str) -> Vec<Node> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 || f[2].contains("fail") {
                return None;
            }
            let port = f[1].split('@').next()?.rsplit(':').next()?.parse().ok()?;
            let slots: Vec<(u16, u16)> = f[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|a| (a, a)),
                })
                .collect();
            // A primary serves slots: right after creation, or after a failover, gossip
            // can still show a replica (or an emptied primary) as a master without any.
            let primary = f[2].contains("master") && !slots.is_empty();
            Some(Node { id: f[0].to_owned(), port, primary, slots })
        })
        .collect()
}

/// The hash slot of `key` (CRC16 of the hash tag, as Redis computes it).
pub fn slot_of(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = match key.find('{') {
        Some(open) => match key[open + 1..].find('}') {
            Some(len) if len > 0 => &bytes[open + 1..open + 1 + len],
            _ => bytes,
        },
        None => bytes,
    };
    let mut crc: u16 = 0;
    for &b in tagged {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc % 16384
}

#[cfg(test)]
mod tests {
    #[test]
    fn slot_of_matches_the_redis_cluster_specification() {
        // The examples of the Redis Cluster specification.
        assert_eq!(super::slot_of("123456789"), 0x31C3 & 0x3FFF);
        assert_eq!(super::slot_of("{user1000}.following"), super::slot_of("user1000"));
        // An empty tag does not count: the whole key is hashed.
        assert_ne!(super::slot_of("foo{}{bar}"), super::slot_of("bar"));
    }
}
