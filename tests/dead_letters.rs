//! Records the guard dead-letters before or instead of handling them: values over the
//! size limit, undecodable records, and events out of attempts (per function).
use std::sync::atomic::Ordering;
use std::sync::Arc;

use exactly_once::config::GuardConfig;
use exactly_once::runtime::Functions;
use exactly_once::{DeadLetterReason, Event, Outcome, Record};
use integration_tests::TestEnv;

use crate::effects::{effects_table, ev, guard, Effects};

#[tokio::test]
async fn an_oversized_value_is_dead_lettered_with_its_reason() {
    let env = TestEnv::new().await;
    effects_table(&env).await;
    let h = Effects::new("features");
    let g = guard(&env, "features", GuardConfig { max_value_bytes: 64, ..GuardConfig::default() });
    let big = Event::new("features", 0, 1).with_header("idempotency_key", "big").with_value(vec![b'x'; 65]);
    let report = g.run_batch(&h, &[big, ev("small", 2)], None).await;
    assert_eq!(report.outcomes[0].outcome, Outcome::DeadLettered { reason: DeadLetterReason::ValueTooLarge });
    assert_eq!(report.outcomes[1].outcome, Outcome::Processed);
    assert_eq!(h.calls.load(Ordering::SeqCst), 1, "the handler never sees the oversized record");
    assert_eq!(
        env.count("SELECT count(*) FROM dead_letters WHERE reason = 'value_too_large' AND length(record_value) = 65")
            .await,
        1
    );
}

#[tokio::test]
async fn a_function_sets_its_own_max_attempts() {
    let env = TestEnv::new().await;
    let strict = Effects { fail: true, max_attempts: Some(1), ..Effects::new("strict") };
    let lenient = Effects { fail: true, ..Effects::new("lenient") };
    let functions = Functions::new(&env.clients, vec![Arc::new(strict), Arc::new(lenient)], &env.kafka).await.unwrap();
    let f = functions.by_name("strict").unwrap();
    let r = f.guard.run_batch(f.handler.as_ref(), &[ev("once", 0)], None).await;
    assert_eq!(
        r.outcomes[0].outcome,
        Outcome::DeadLettered { reason: DeadLetterReason::MaxAttempts },
        "one attempt is all it gets"
    );
    let f = functions.by_name("lenient").unwrap();
    let r = f.guard.run_batch(f.handler.as_ref(), &[ev("once", 0)], None).await;
    assert!(
        matches!(r.outcomes[0].outcome, Outcome::Failed { attempts: Some(1), .. }),
        "GUARD_MAX_ATTEMPTS (5) applies"
    );
}

#[tokio::test]
async fn undecodable_records_go_to_the_dead_letters_through_the_guard() {
    let env = TestEnv::new().await;
    effects_table(&env).await;
    let h = Effects::new("features");
    let g = guard(&env, "features", GuardConfig::default());
    let bad = Record::Invalid {
        event: Event::new("features", 3, 9).with_value("%%%"),
        reason: "record_value_base64",
        error: "value is not base64".into(),
    };
    let r = g.run_records(&h, &[bad, Record::Ok(ev("ok", 10))], None).await;
    assert_eq!(
        r.outcomes[0].outcome,
        Outcome::DeadLettered { reason: DeadLetterReason::Undecodable("record_value_base64") }
    );
    assert_eq!(r.outcomes[1].outcome, Outcome::Processed);
}
