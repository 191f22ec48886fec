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

/// Staged rows of one table, type-erased so a batch can hold several tables. Each row
/// carries its owner (the index of the event that staged it in the batch), so the rows
/// of some events can be written without the others' (isolating a rejected row).
trait TableRows: Send + Sync {
    fn len(&self) -> usize;
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
    fn into_any(self: Box<Self>) -> Box<dyn Any>;
    fn append(&mut self, other: Box<dyn TableRows>, owner: usize) -> Result<(), &'static str>;
    fn owners(&self) -> &[usize];
    fn set_owner(&mut self, owner: usize);
    /// Writes the rows whose owner is in `only` (sorted), or all of them.
    fn write<'a>(
        &'a self,
        client: &'a Client,
        table: &'a str,
        dedup_token: Option<String>,
        only: Option<&'a [usize]>,
    ) -> BoxFuture<'a, Result<(), ::clickhouse::error::Error>>;
}

struct Rows<T> {
    rows: Vec<T>,
    owners: Vec<usize>,
}

impl<T: SinkRow> TableRows for Rows<T> {
    fn len(&self) -> usize {
        self.rows.len()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }

    fn append(&mut self, other: Box<dyn TableRows>, owner: usize) -> Result<(), &'static str> {
        let other = other.into_any().downcast::<Rows<T>>().map_err(|_| std::any::type_name::<T>())?;
        self.owners.extend(std::iter::repeat_n(owner, other.rows.len()));
        self.rows.extend(other.rows);
        Ok(())
    }

    fn owners(&self) -> &[usize] {
        &self.owners
    }

    fn set_owner(&mut self, owner: usize) {
        self.owners.iter_mut().for_each(|o| *o = owner);
    }

    fn write<'a>(
        &'a self,
        client: &'a Client,
        table: &'a str,
        dedup_token: Option<String>,
        only: Option<&'a [usize]>,
    ) -> BoxFuture<'a, Result<(), ::clickhouse::error::Error>> {
        Box::pin(async move {
            let mut insert = client.insert::<T>(table).await?;
            if let Some(token) = dedup_token {
                insert = insert.with_setting("insert_deduplication_token", token);
            }
            for (row, owner) in self.rows.iter().zip(&self.owners) {
                if only.is_none_or(|o| o.binary_search(owner).is_ok()) {
                    insert.write(row).await?;
                }
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
    /// The table.
    pub table: &'static str,
    /// The Rust type of the rows that did not fit.
    pub row_type: &'static str,
}

impl SinkBatch {
    /// Stages `row` for `table`; a table takes rows of one type only.
    pub fn push<T: SinkRow>(&mut self, table: &'static str, row: T) -> Result<(), RowTypeMismatch> {
        match self.tables.iter_mut().find(|(t, _)| *t == table) {
            Some((_, rows)) => match rows.as_any_mut().downcast_mut::<Rows<T>>() {
                Some(rows) => {
                    rows.rows.push(row);
                    rows.owners.push(0);
                }
                None => return Err(RowTypeMismatch { table, row_type: std::any::type_name::<T>() }),
            },
            None => self.tables.push((table, Box::new(Rows { rows: vec![row], owners: vec![0] }))),
        }
        Ok(())
    }

    /// Whether every row of `other` can join this batch (each table holds one row type).
    /// Checked before anything moves, so a mismatch leaves both batches as they were.
    pub fn accepts(&self, other: &SinkBatch) -> Result<(), RowTypeMismatch> {
        for (table, rows) in &other.tables {
            if let Some((_, mine)) = self.tables.iter().find(|(t, _)| t == table) {
                if mine.as_any().type_id() != rows.as_any().type_id() {
                    return Err(RowTypeMismatch { table, row_type: "the other event's row type" });
                }
            }
        }
        Ok(())
    }

    /// Moves every row of `other` into this batch, owned by event `owner`.
    pub fn extend(&mut self, other: SinkBatch, owner: usize) -> Result<(), RowTypeMismatch> {
        self.accepts(&other)?;
        for (table, mut rows) in other.tables {
            match self.tables.iter_mut().find(|(t, _)| *t == table) {
                Some((_, mine)) => mine.append(rows, owner).map_err(|row_type| RowTypeMismatch { table, row_type })?,
                None => {
                    rows.set_owner(owner);
                    self.tables.push((table, rows))
                }
            }
        }
        Ok(())
    }

    /// Whether no table holds a row.
    pub fn is_empty(&self) -> bool {
        self.tables.iter().all(|(_, r)| r.len() == 0)
    }

    /// Rows staged in all tables.
    pub fn len(&self) -> usize {
        self.tables.iter().map(|(_, r)| r.len()).sum()
    }

    /// The events (owners) that staged at least one row, sorted.
    pub fn owners(&self) -> Vec<usize> {
        let mut owners: Vec<usize> = self.tables.iter().flat_map(|(_, r)| r.owners().iter().copied()).collect();
        owners.sort_unstable();
        owners.dedup();
        owners
    }
}
