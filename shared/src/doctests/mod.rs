//! Code the docs show, compiled as doc tests (`cargo test -p exactly-once --doc`); only
//! built for doc tests. This file sits as deep as `functions/<name>/src/lib.rs`, so
//! relative paths in the examples (`include_str!("../../../migrations/...")`) resolve as
//! they do in a function crate.

/// The README's handler example ("Writing a function"). The code is in
/// `docs/snippets/handler.md`; `tests/docs.rs` checks that the README shows the same.
#[doc = include_str!("../../../docs/snippets/handler.md")]
pub struct ReadmeHandlerExample;

/// The README's example of a function over Avro ("A function over Avro"). The code is in
/// `docs/snippets/avro.md`; `tests/docs.rs` checks that the README shows the same.
#[doc = include_str!("../../../docs/snippets/avro.md")]
pub struct ReadmeAvroExample;
