//! Where handlers' analytical rows go. Rows are staged per event while its handler runs
//! and written per batch, one insert per table, after every handler of the batch has
//! run and before the batch's Postgres transaction commits.

pub mod clickhouse;

pub use self::clickhouse::{ClickHouseSink, ServerVersion, SinkError};

use std::any::Any;

use ::clickhouse::{Client, RowOwned, RowWrite};
use futures::future::BoxFuture;
use serde::Serialize;

/// A row type a handler can stage: any `#[derive(clickhouse::Row, Serialize)]` struct
/// that owns its data.
pub trait SinkRow: RowOwned + RowWrite + Serialize + Send + Sync + 'static {}
impl<T: RowOwned + RowWrite + Serialize + Send + Sync + 'static> SinkRow for T {}

/// Staged rows of one table, type-erased so a batch can hold several tables.
trait TableRows: Send + Sync {
    fn len(&self) -> usize;
    fn as_any_mut(&mut self) -> &mut dyn Any;
    fn into_any(self: Box<Self>) -> Box<dyn Any>;
    fn append(&mut self, other: Box<dyn TableRows>) -> Result<(), &'static str>;
    fn write<'a>(
        &'a self,
        client: &'a Client,
        table: &'a str,
        dedup_token: Option<String>,
    ) -> BoxFuture<'a, Result<(), ::clickhouse::error::Error>>;
}

struct Rows<T>(Vec<T>);

impl<T: SinkRow> TableRows for Rows<T> {
    fn len(&self) -> usize {
        self.0.len()
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }

    fn append(&mut self, other: Box<dyn TableRows>) -> Result<(), &'static str> {
        let other = other.into_any().downcast::<Rows<T>>().map_err(|_| std::any::type_name::<T>())?;
        self.0.extend(other.0);
        Ok(())
    }

    fn write<'a>(
        &'a self,
        client: &'a Client,
        table: &'a str,
        dedup_token: Option<String>,
    ) -> BoxFuture<'a, Result<(), ::clickhouse::error::Error>> {
        Box::pin(async move {
            let mut insert = client.insert::<T>(table).await?;
            if let Some(token) = dedup_token {
                insert = insert.with_setting("insert_deduplication_token", token);
            }
            for row in &self.0 {
                insert.write(row).await?;
            }
            insert.end().await
        })
    }
}

/// Rows staged for ClickHouse, grouped by table.
#[derive(Default)]
pub struct SinkBatch {
    tables: Vec<(&'static str, Box<dyn TableRows>)>,
}

/// Two handlers staged different row types for one table: a programming error.
#[derive(Debug, thiserror::Error)]
#[error("table `{table}` already holds rows of another type than {row_type}")]
pub struct RowTypeMismatch {
    pub table: &'static str,
    pub row_type: &'static str,
}

impl SinkBatch {
    pub fn push<T: SinkRow>(&mut self, table: &'static str, row: T) -> Result<(), RowTypeMismatch> {
        match self.tables.iter_mut().find(|(t, _)| *t == table) {
            Some((_, rows)) => match rows.as_any_mut().downcast_mut::<Rows<T>>() {
                Some(rows) => rows.0.push(row),
                None => return Err(RowTypeMismatch { table, row_type: std::any::type_name::<T>() }),
            },
            None => self.tables.push((table, Box::new(Rows(vec![row])))),
        }
        Ok(())
    }

    /// Moves every row of `other` into this batch.
    pub fn extend(&mut self, other: SinkBatch) -> Result<(), RowTypeMismatch> {
        for (table, rows) in other.tables {
            match self.tables.iter_mut().find(|(t, _)| *t == table) {
                Some((_, mine)) => mine.append(rows).map_err(|row_type| RowTypeMismatch { table, row_type })?,
                None => self.tables.push((table, rows)),
            }
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.tables.iter().all(|(_, r)| r.len() == 0)
    }

    /// Rows staged in all tables.
    pub fn len(&self) -> usize {
        self.tables.iter().map(|(_, r)| r.len()).sum()
    }
}
