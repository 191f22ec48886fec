//! What the outside world reaches first: the record model, event ids and the MSK event
//! (Lambda's payload, and the body of `POST /invoke`). Pure code without I/O, kept in its
//! own crate so that the fuzz targets (`fuzz/`) build it alone.
//!
//! Invariant for everything here: hostile input gets a classified error or an
//! [`event::Record::Invalid`], never a panic, and nothing is dropped.

#![warn(missing_docs)]

pub mod event;
pub mod event_id;
pub mod msk;
pub mod payload;
pub mod protobuf;
mod protobuf_builtin;
