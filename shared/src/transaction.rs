//! The batch transaction, begun only when a handler first touches Postgres.
//!
//! Handlers with Postgres effects need them to commit together with the confirm, so
//! the first `ctx.postgres()` sends `BEGIN`; handlers without them (most ClickHouse
//! functions) need no transaction at all, and their confirm is one autocommitted
//! statement: two round trips fewer per batch.
//!
//! Invariant: a pooled connection never goes back to the pool inside a transaction.
//! Every path ends in `commit` or `rollback`; if one fails, or the value is dropped
//! while a transaction is open, the connection is closed instead of reused.

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, Postgres};

pub(crate) struct LazyTx {
    conn: PoolConnection<Postgres>,
    open: bool,
    /// Statements this value sent (BEGIN, COMMIT, ROLLBACK), for the round-trip count.
    pub(crate) round_trips: u64,
}

impl LazyTx {
    pub(crate) fn new(conn: PoolConnection<Postgres>) -> Self {
        Self { conn, open: false, round_trips: 0 }
    }

    pub(crate) fn is_open(&self) -> bool {
        self.open
    }

    /// Begins the transaction unless it already is.
    pub(crate) async fn begin(&mut self) -> Result<(), sqlx::Error> {
        if !self.open {
            self.round_trips += 1;
            // Open before the answer: if this future is dropped after BEGIN went out,
            // `Drop` must still see a transaction and close the connection.
            self.open = true;
            if let Err(e) = sqlx::query("BEGIN").execute(&mut *self.conn).await {
                // Whether the server began one is unknown: never reuse the connection.
                self.conn.close_on_drop();
                self.open = false;
                return Err(e);
            }
        }
        Ok(())
    }

    pub(crate) fn conn(&mut self) -> &mut PgConnection {
        &mut self.conn
    }

    pub(crate) async fn commit(&mut self) -> Result<(), sqlx::Error> {
        if self.open {
            self.round_trips += 1;
            let result = sqlx::query("COMMIT").execute(&mut *self.conn).await;
            if result.is_err() {
                self.conn.close_on_drop();
            }
            self.open = false;
            result?;
        }
        Ok(())
    }

    pub(crate) async fn rollback(&mut self) {
        if self.open {
            self.round_trips += 1;
            if sqlx::query("ROLLBACK").execute(&mut *self.conn).await.is_err() {
                self.conn.close_on_drop();
            }
            self.open = false;
        }
    }
}

impl Drop for LazyTx {
    fn drop(&mut self) {
        if self.open {
            // Unfinished (an error path, a cancelled future): never reuse it.
            self.conn.close_on_drop();
        }
    }
}
