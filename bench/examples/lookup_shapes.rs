//! Profiling aid: the cost of statement shapes on one connection, same schema.

use std::time::Instant;

use exactly_once::{Clients, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut config = Config::load()?;
    let name = format!("shapes_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    config.postgres.schema = Some(name.clone());
    config.clickhouse.database = name.clone();
    config.redis.key_prefix = name.clone();
    let clients = Clients::connect(config).await?;
    let mut conn = clients.pg.acquire().await?;
    let n = 3000;
    let ids = vec!["abc".to_owned()];
    let shapes: [(&str, &str); 5] = [
        ("select 1", "SELECT 1"),
        ("array echo", "SELECT cardinality($2::text[]) + length($1)"),
        ("any", "SELECT event_id, status FROM processed_events WHERE namespace = $1 AND event_id = ANY($2)"),
        ("unnest join 1", "SELECT i.event_id, p.status FROM UNNEST($2::text[]) AS i(event_id) LEFT JOIN processed_events p ON p.namespace = $1 AND p.event_id = i.event_id"),
        ("unnest join 2", "SELECT i.event_id, p.status, p.payload_hash, COALESCE(a.attempts, 0) FROM UNNEST($2::text[]) AS i(event_id) LEFT JOIN processed_events p ON p.namespace = $1 AND p.event_id = i.event_id LEFT JOIN event_attempts a ON a.namespace = $1 AND a.event_id = i.event_id"),
    ];
    for (label, sql) in shapes {
        let binds = sql.contains("$2");
        let s = Instant::now();
        for _ in 0..n {
            let q = sqlx::query(sql);
            let q = if binds { q.bind("ns").bind(&ids) } else { q };
            q.fetch_all(&mut *conn).await?;
        }
        println!("{label:<14} {:>7.1} us", s.elapsed().as_secs_f64() * 1e6 / n as f64);
    }
    drop(conn);
    let _ = sqlx::query(&format!("DROP SCHEMA \"{name}\" CASCADE")).execute(&clients.pg).await;
    let _ = clients.sink.client().query(&format!("DROP DATABASE {name}")).execute().await;
    Ok(())
}
