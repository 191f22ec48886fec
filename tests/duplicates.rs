//! How duplicates are recognised: a duplicate whose payload differs from the confirmed
//! one, and the in-memory tier switched off.
use std::time::Duration;

use exactly_once::config::GuardConfig;
use exactly_once::metrics::metrics;
use exactly_once::{DuplicateTier, Event, Outcome};
use integration_tests::TestEnv;

use crate::effects::{effects_table, ev, guard, Effects};

#[tokio::test]
async fn a_duplicate_with_another_payload_is_flagged_and_kept_when_configured() {
    let env = TestEnv::new().await;
    effects_table(&env).await;
    let h = Effects::new("features");
    let g = guard(&env, "features", GuardConfig { dead_letter_payload_mismatch: true, ..GuardConfig::default() });
    let before = metrics().payload_mismatch.with_label_values(&["features"]).get();

    assert_eq!(g.run_batch(&h, &[ev("same-id", 0)], None).await.outcomes[0].outcome, Outcome::Processed);
    let changed = Event::new("features", 0, 1)
        .with_header("idempotency_key", "same-id")
        .with_value(r#"{"user_id":"someone else"}"#);
    let same = ev("same-id", 2);
    let r = g.run_batch(&h, &[changed, same], None).await;
    assert!(matches!(r.outcomes[0].outcome, Outcome::Duplicate { payload_mismatch: true, .. }), "{r:?}");
    assert!(matches!(r.outcomes[1].outcome, Outcome::Duplicate { payload_mismatch: false, .. }), "{r:?}");
    assert_eq!(metrics().payload_mismatch.with_label_values(&["features"]).get(), before + 1);
    assert_eq!(
        env.count("SELECT count(*) FROM dead_letters WHERE reason = 'payload_mismatch' AND event_id = 'mismatch:features-0-1'").await,
        1
    );
    assert_eq!(env.count("SELECT count(*) FROM effects").await, 1, "still applied once");
}

#[tokio::test]
async fn kafka_dedup_ttl_zero_disables_the_local_cache() {
    let env = TestEnv::new().await;
    effects_table(&env).await;
    let h = Effects::new("features");
    let g = guard(&env, "features", GuardConfig { local_cache_ttl: Duration::ZERO, ..GuardConfig::default() });
    assert!(!g.local_cache().is_enabled());
    g.run_batch(&h, &[ev("e", 0)], None).await;
    let r = g.run_batch(&h, &[ev("e", 0)], None).await;
    assert!(matches!(r.outcomes[0].outcome, Outcome::Duplicate { tier: DuplicateTier::Redis, .. }), "{r:?}");

    let cached = guard(&env, "features", GuardConfig::default());
    cached.run_batch(&h, &[ev("f", 1)], None).await;
    let r = cached.run_batch(&h, &[ev("f", 1)], None).await;
    assert!(matches!(r.outcomes[0].outcome, Outcome::Duplicate { tier: DuplicateTier::Local, .. }), "{r:?}");
}
