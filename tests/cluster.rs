//! Redis Cluster: a private local cluster per test (three primaries, three replicas,
//! `scripts/redis-cluster.sh`). A function's keys spread over slots and shards, every
//! script stays in one slot, and a killed primary or a slot moved mid-stream loses no
//! confirm and stops no batch. TLS and AUTH as ElastiCache uses them.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use exactly_once::config::{GuardConfig, RedisMode, Secret};
use exactly_once::{DuplicateTier, Guard, Outcome};
use integration_tests::cluster::{slot_of, LocalCluster};
use integration_tests::{wait_until, TestEnv};

use crate::effects::{effects_table, ev, guard, Effects};

/// A test's services with Redis on `cluster`. `faults`: the test breaks the cluster, so
/// calls give up fast and the breaker probes again soon; otherwise every Redis step must
/// succeed, so a busy machine gets generous time.
async fn env_on(cluster: &LocalCluster, buckets: u32, faults: bool) -> TestEnv {
    let url = cluster.url();
    TestEnv::with(|c| {
        c.redis.mode = RedisMode::Cluster;
        c.redis.url = Secret::new(url);
        c.redis.key_buckets = buckets;
        if faults {
            c.redis.timeout = Duration::from_millis(800);
            c.breakers.redis.failure_threshold = 1;
            c.breakers.redis.open_for = Duration::from_millis(500);
            c.breakers.redis.success_threshold = 1;
        } else {
            c.redis.timeout = Duration::from_secs(5);
        }
    })
    .await
}

fn no_cache() -> GuardConfig {
    GuardConfig { local_cache_ttl: Duration::ZERO, lease_ttl: Duration::from_secs(2), ..GuardConfig::default() }
}

/// The hash tag of bucket `b` of the `features` namespace, as a key Redis can slot.
fn bucket_key(env: &TestEnv, b: u32) -> String {
    format!("{}:{{features:{b}}}:event:x", env.key_prefix)
}

#[derive(Default)]
struct Progress {
    batches: u64,
    /// When a batch last found its redelivered ids by their Redis done markers.
    redis_answered: Option<Instant>,
}

/// Runs batches until `stop`: 20 new ids each, plus 5 ids of the batch before
/// (redeliveries) and whatever came back in flight. Returns every id sent, after running
/// the in-flight ones again until they settle. Any outcome but processed, duplicate or
/// in-flight fails the test.
async fn stream(g: Arc<Guard>, h: Arc<Effects>, stop: Arc<AtomicBool>, progress: Arc<Mutex<Progress>>) -> Vec<String> {
    let (mut all, mut prev, mut pending): (Vec<String>, Vec<String>, Vec<String>) = Default::default();
    let mut offset = 0i64;
    let mut n = 0;
    let mut run = |ids: Vec<String>| {
        let events: Vec<_> = ids
            .iter()
            .map(|id| {
                offset += 1;
                ev(id, offset)
            })
            .collect();
        let g = g.clone();
        let h = h.clone();
        async move {
            let report = g.run_batch(&*h, &events, None).await;
            ids.into_iter().zip(report.outcomes.into_iter().map(|o| o.outcome)).collect::<Vec<_>>()
        }
    };
    while !stop.load(Ordering::SeqCst) {
        let fresh: Vec<String> = (0..20).map(|i| format!("s{n}-{i}")).collect();
        n += 1;
        let repeats: Vec<String> = prev.iter().take(5).cloned().collect();
        let mut ids = fresh.clone();
        ids.extend(repeats.iter().cloned());
        ids.append(&mut pending);
        let answers = run(ids).await;
        // The redelivered ids sit at 20.. and were confirmed by the batch before: found
        // by their Redis done markers when Redis works.
        let redis_answered = !repeats.is_empty()
            && answers[20..20 + repeats.len()]
                .iter()
                .all(|(_, o)| matches!(o, Outcome::Duplicate { tier: DuplicateTier::Redis, .. }));
        for (id, outcome) in answers {
            match outcome {
                Outcome::Processed | Outcome::Duplicate { .. } => {}
                Outcome::InFlight => pending.push(id),
                other => panic!("{id}: {other:?}"),
            }
        }
        {
            let mut p = progress.lock().unwrap();
            p.batches += 1;
            if redis_answered {
                p.redis_answered = Some(Instant::now());
            }
        }
        all.extend(fresh.iter().cloned());
        prev = fresh;
    }
    for _ in 0..30 {
        if pending.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let ids = std::mem::take(&mut pending);
        for (id, outcome) in run(ids).await {
            match outcome {
                Outcome::Processed | Outcome::Duplicate { .. } => {}
                Outcome::InFlight => pending.push(id),
                other => panic!("{id}: {other:?}"),
            }
        }
    }
    assert!(pending.is_empty(), "still in flight after the drain: {pending:?}");
    all
}

/// Every id sent has exactly one effect row and one confirm.
async fn assert_exactly_once(env: &TestEnv, ids: &[String]) {
    let sent = ids.len() as i64;
    assert!(sent > 0);
    assert_eq!(env.count("SELECT count(*) FROM effects").await, sent, "one effect per id");
    assert_eq!(env.count("SELECT count(DISTINCT event_id) FROM effects").await, sent, "no id twice");
    assert_eq!(
        env.count("SELECT count(*) FROM processed_events WHERE namespace = 'features'").await,
        sent,
        "one confirm per id"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_spreads_a_functions_keys_and_counts_exactly_once() {
    let cluster = LocalCluster::start(None, false);
    let env = env_on(&cluster, 16, false).await;
    effects_table(&env).await;
    assert!(env.clients.redis.is_cluster());
    // A cluster redirects a pipeline as a whole: leases and markers go by script there.
    assert_eq!(env.clients.leases.calls(), exactly_once::guard::lease::Calls::Scripts);
    // Our slot arithmetic agrees with the server's.
    let mut node = cluster.node(cluster.base).await;
    let key = bucket_key(&env, 3);
    let server: u16 = redis::cmd("CLUSTER").arg("KEYSLOT").arg(&key).query_async(&mut node).await.unwrap();
    assert_eq!(slot_of(&key), server);

    let h = Arc::new(Effects::new("features"));
    let ids: Vec<String> = (0..300).map(|i| format!("c{i}")).collect();
    // Three batches, each redelivering part of the one before, and two consumers racing
    // over the last one.
    let g = Arc::new(guard(&env, "features", no_cache()));
    let mut settled = 0;
    for (b, chunk) in ids.chunks(100).enumerate() {
        let mut batch: Vec<_> = chunk.iter().enumerate().map(|(i, id)| ev(id, (b * 1000 + i) as i64)).collect();
        if b > 0 {
            batch.extend(ids[(b - 1) * 100..(b - 1) * 100 + 30].iter().map(|id| ev(id, 9999)));
        }
        let round_trips = g.round_trips().redis();
        let reports = if b == 2 {
            let other = guard(&env, "features", no_cache());
            let (r1, r2) = tokio::join!(g.run_batch(&*h, &batch, None), other.run_batch(&*h, &batch, None));
            vec![r1, r2]
        } else {
            vec![g.run_batch(&*h, &batch, None).await]
        };
        // The batch touches all 16 buckets, yet costs two Redis steps (lease, release).
        assert_eq!(g.round_trips().redis() - round_trips, 2, "batch {b}");
        for o in reports.iter().flat_map(|r| r.outcomes.iter()) {
            match &o.outcome {
                Outcome::Processed => settled += 1,
                Outcome::Duplicate { .. } | Outcome::InFlight => {}
                other => panic!("batch {b}: {other:?}"),
            }
        }
    }
    assert_eq!(settled, 300, "each id processed once, by one consumer");
    assert_exactly_once(&env, &ids).await;

    // Every done marker is found again in the cluster.
    let again: Vec<_> = ids.iter().enumerate().map(|(i, id)| ev(id, i as i64)).collect();
    let r = guard(&env, "features", no_cache()).run_batch(&*h, &again, None).await;
    let redis = r
        .outcomes
        .iter()
        .filter(|o| matches!(o.outcome, Outcome::Duplicate { tier: DuplicateTier::Redis, .. }))
        .count();
    assert_eq!(redis, 300, "{r:?}");

    // The keys sit on every primary, in 16 slots.
    let spread = cluster.keys_per_primary(&format!("{}:*", env.key_prefix)).await;
    assert_eq!(spread.len(), 3, "{spread:?}");
    assert!(spread.values().all(|&n| n > 0), "a function's keys on every shard: {spread:?}");
    assert_eq!(spread.values().sum::<usize>(), 300, "one done marker per id, no lease left: {spread:?}");
    let slots: std::collections::HashSet<u16> = (0..16).map(|b| slot_of(&bucket_key(&env, b))).collect();
    assert_eq!(slots.len(), 16, "16 buckets, 16 slots");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_primary_is_replaced_without_losing_a_confirm() {
    let cluster = LocalCluster::start(None, false);
    let env = env_on(&cluster, 16, true).await;
    effects_table(&env).await;
    let victim = cluster.owner(slot_of(&bucket_key(&env, 0))).await;

    let (stop, progress) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Progress::default())));
    let g = Arc::new(guard(&env, "features", no_cache()));
    let task = tokio::spawn(stream(g.clone(), Arc::new(Effects::new("features")), stop.clone(), progress.clone()));
    wait_until(Duration::from_secs(20), "the stream to run on Redis", || {
        let p = progress.clone();
        async move { p.lock().unwrap().redis_answered.is_some() }
    })
    .await;

    cluster.kill(victim.port);
    let killed = Instant::now();
    // The replica takes over (cluster-node-timeout is 5 s), the client finds the new
    // primary, and the stream goes back to Redis; meanwhile batches go on with Postgres.
    wait_until(Duration::from_secs(40), "Redis to answer again after the failover", || {
        let p = progress.clone();
        async move { p.lock().unwrap().redis_answered.is_some_and(|t| t > killed + Duration::from_secs(1)) }
    })
    .await;
    let during = progress.lock().unwrap().batches;
    wait_until(Duration::from_secs(30), "batches to go on after the failover", || {
        let p = progress.clone();
        async move { p.lock().unwrap().batches > during }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let ids = task.await.expect("the stream panicked");

    let nodes = cluster.nodes().await;
    let primaries: Vec<u16> = nodes.iter().filter(|n| n.primary).map(|n| n.port).collect();
    assert_eq!(primaries.len(), 3, "a replica was promoted: {primaries:?}");
    assert!(!primaries.contains(&victim.port));
    assert_exactly_once(&env, &ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_step_failing_in_one_bucket_frees_the_leases_it_took_in_the_others() {
    // Standalone Redis with 16 buckets: the step is split the same way as on a cluster.
    let env = TestEnv::with(|c| c.redis.key_buckets = 16).await;
    effects_table(&env).await;
    let ns = exactly_once::Namespace::new("features").unwrap();
    // One id's lease key holds a hash (a poisoned key): the call of its bucket fails
    // with WRONGTYPE, the other 15 buckets' calls take their leases.
    // (The id in either format, whichever the guard runs in.)
    let poison_keys: Vec<String> = ["h:f0", "f0"]
        .iter()
        .map(|id| env.clients.leases.key(&ns, &exactly_once::EventId::new(id.to_string()).unwrap()))
        .collect();
    let mut c = env.redis().await;
    for key in &poison_keys {
        let _: i64 = redis::cmd("HSET").arg(key).arg("x").arg("1").query_async(&mut c).await.unwrap();
    }

    // Leases of 30 s: if the batch left any behind, they would still be there.
    let config = GuardConfig { local_cache_ttl: Duration::ZERO, ..GuardConfig::default() };
    let g = guard(&env, "features", config);
    let h = Effects::new("features");
    let batch: Vec<_> = (0..100).map(|i| ev(&format!("f{i}"), i)).collect();
    let r = g.run_batch(&h, &batch, None).await;
    assert!(r.outcomes.iter().all(|o| o.outcome == Outcome::Processed), "Postgres alone carries the batch: {r:?}");
    // Every key left is a done marker or a poisoned one: no lease. (The confirmed
    // event's marker is written over its poisoned key, whatever that held.)
    // SCAN, not KEYS: the Redis is shared with every other test running now, and one
    // KEYS over all of it can outlast the client's timeout on a busy machine.
    let keys: Vec<String> =
        env.redis_keys(&env.key_prefix).await.into_iter().filter(|k| k.contains(":event:")).collect();
    let (mut markers, mut others) = (0, Vec::new());
    for key in keys {
        let kind: String = redis::cmd("TYPE").arg(&key).query_async(&mut c).await.unwrap();
        let value: Option<String> = match kind.as_str() {
            "string" => redis::cmd("GET").arg(&key).query_async(&mut c).await.unwrap(),
            _ => None,
        };
        match value {
            Some(v) if v.starts_with("done:") => markers += 1,
            _ => others.push(key),
        }
    }
    assert!(
        others.iter().all(|k| poison_keys.contains(k)),
        "only poisoned keys besides markers: every lease the batch took was freed: {others:?}"
    );
    assert_eq!(markers, 100, "each confirmed event has its marker");
    assert_exactly_once(&env, &(0..100).map(|i| format!("f{i}")).collect::<Vec<_>>()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slot_moved_mid_stream_loses_nothing() {
    let cluster = LocalCluster::start(None, false);
    // Four buckets: a quarter of the ids live in the slot that moves.
    let env = env_on(&cluster, 4, true).await;
    effects_table(&env).await;
    let slot = slot_of(&bucket_key(&env, 0));
    let from = cluster.owner(slot).await;
    let to = cluster.nodes().await.into_iter().find(|n| n.primary && n.id != from.id).expect("another primary");

    let (stop, progress) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Progress::default())));
    let g = Arc::new(guard(&env, "features", no_cache()));
    let h = Arc::new(Effects::new("features"));
    let task = tokio::spawn(stream(g.clone(), h.clone(), stop.clone(), progress.clone()));
    wait_until(Duration::from_secs(20), "some batches on Redis", || {
        let p = progress.clone();
        async move { p.lock().unwrap().batches >= 20 }
    })
    .await;
    let before = progress.lock().unwrap().batches;
    // Five keys at a time with a pause between: batches meet the slot half-moved
    // (ASK redirections, TRYAGAIN for a script whose keys are split).
    cluster.migrate_slot(slot, &to, Duration::from_millis(20)).await;
    let moved = Instant::now();
    wait_until(Duration::from_secs(30), "Redis to answer after the move", || {
        let p = progress.clone();
        async move { p.lock().unwrap().redis_answered.is_some_and(|t| t > moved) }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let ids = task.await.expect("the stream panicked");
    // (A batch answered by Redis after the move began is a batch that ran through it.)
    assert!(progress.lock().unwrap().batches > before, "batches flowed through the move");

    assert_eq!(cluster.owner(slot).await.id, to.id, "the slot moved");
    let moved_keys = cluster.node(to.port).await;
    let mut c = moved_keys;
    let on_target: Vec<String> =
        redis::cmd("KEYS").arg(format!("{}:{{features:0}}:event:*", env.key_prefix)).query_async(&mut c).await.unwrap();
    let mut markers = 0;
    for key in &on_target {
        let value: Option<String> = redis::cmd("GET").arg(key).query_async(&mut c).await.unwrap();
        markers += usize::from(value.is_some_and(|v| v.starts_with("done:")));
    }
    assert!(markers > 0, "the bucket's done markers live on the new owner");
    assert_exactly_once(&env, &ids).await;
    // Every id is still known: a full redelivery handles nothing again. Leases whose
    // release met the slot half-moved (a script over keys on two nodes is refused with
    // TRYAGAIN) were left to expire: those ids answer in-flight until they do.
    let mut left: Vec<String> = ids.clone();
    for round in 0..20 {
        let again: Vec<_> = left.iter().enumerate().map(|(i, id)| ev(id, i as i64)).collect();
        let r = guard(&env, "features", no_cache()).run_batch(&*h, &again, None).await;
        let mut in_flight = Vec::new();
        for (id, o) in left.iter().zip(&r.outcomes) {
            match &o.outcome {
                Outcome::Duplicate { .. } => {}
                Outcome::InFlight => in_flight.push(id.clone()),
                other => panic!("round {round}: {id} handled again: {other:?}"),
            }
        }
        left = in_flight;
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(left.is_empty(), "leases never expired: {left:?}");
    assert_exactly_once(&env, &ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_and_auth_as_elasticache_uses_them() {
    let cluster = LocalCluster::start(Some("s3cret-token"), true);
    assert!(cluster.url().starts_with("rediss://:s3cret-token@"));
    let ca = cluster.ca_file();
    let env = {
        let (url, ca) = (cluster.url(), ca.clone());
        TestEnv::with(move |c| {
            c.redis.mode = RedisMode::Cluster;
            c.redis.url = Secret::new(url);
            c.redis.tls_ca_file = Some(ca);
        })
        .await
    };
    effects_table(&env).await;
    let h = Effects::new("features");
    let g = guard(&env, "features", no_cache());
    assert_eq!(g.run_batch(&h, &[ev("tls-1", 0)], None).await.outcomes[0].outcome, Outcome::Processed);
    let r = guard(&env, "features", no_cache()).run_batch(&h, &[ev("tls-1", 1)], None).await;
    assert!(matches!(r.outcomes[0].outcome, Outcome::Duplicate { tier: DuplicateTier::Redis, .. }), "{r:?}");

    // A wrong token fails start-up, and the message does not show either token.
    let mut config = exactly_once::Config::load().unwrap().redis;
    config.mode = RedisMode::Cluster;
    config.tls_ca_file = Some(ca);
    config.timeout = Duration::from_secs(2);
    config.url = Secret::new(cluster.url().replace("s3cret-token", "wrong-token"));
    let err = exactly_once::redis_client::RedisClient::connect(&config).await.unwrap_err().to_string();
    assert!(!err.contains("wrong-token") && !err.contains("s3cret-token"), "{err}");
    assert!(err.contains("rediss://:***@127.0.0.1"), "{err}");
    // Without our CA the servers' certificate is not trusted: TLS is verified.
    config.url = Secret::new(cluster.url());
    config.tls_ca_file = None;
    let refused = exactly_once::redis_client::RedisClient::connect(&config).await.unwrap_err();
    let chain = format!("{refused} / {:?}", std::error::Error::source(&refused));
    assert!(chain.to_lowercase().contains("certificate"), "refused for its certificate: {chain}");
}
