//! Retention: old ledger rows deleted in bounded batches, recent ones kept.
use std::time::Duration;

use exactly_once::config::RetentionConfig;
use exactly_once::metrics::metrics;
use integration_tests::TestEnv;

#[tokio::test]
async fn retention_deletes_old_rows_in_bounded_batches_and_keeps_recent_ones() {
    let _gauges = crate::GLOBAL_GAUGES.lock().await;
    let env = TestEnv::new().await;
    sqlx::query(
        "INSERT INTO processed_events (namespace, event_id, status, processed_at)
         SELECT 'old', 'o-' || i, 'processed', now() - interval '10 days' FROM generate_series(1, 25) i
         UNION ALL
         SELECT 'new', 'n-' || i, 'processed', now() - interval '1 day' FROM generate_series(1, 5) i",
    )
    .execute(env.pg())
    .await
    .unwrap();
    let config = RetentionConfig {
        retention: Duration::from_secs(7 * 86_400),
        outbox_retention: Duration::from_secs(86_400),
        batch_size: 10,
        interval: Duration::ZERO,
    };
    let report = exactly_once::retention::cleanup(env.pg(), &config).await.unwrap();
    assert_eq!(report.processed_events_deleted, 25);
    assert!(report.batches >= 3, "25 rows at 10 per statement take at least 3 statements: {report:?}");
    assert_eq!(env.count("SELECT count(*) FROM processed_events WHERE namespace = 'new'").await, 5);
    assert_eq!(env.count("SELECT count(*) FROM processed_events").await, 5);
    assert_eq!(exactly_once::retention::table_size(env.pg()).await.unwrap(), 5);
    assert_eq!(metrics().table_size.get(), 5);
}
