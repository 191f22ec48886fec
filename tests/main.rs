//! The integration tests, against real Postgres, Redis, ClickHouse and Kafka, in one
//! test binary: each binary links rdkafka and the whole library, so one binary instead
//! of one per topic saves most of the link time. Each module is one topic; run one with
//! `cargo test -p integration-tests --test integration <module>::`.
//!
//! Every test isolates itself (its own Postgres schema, ClickHouse database, Redis key
//! prefix, topics and consumer group: `tests/src/lib.rs`), so they run in parallel.

mod cluster;
mod dead_letters;
mod deploy;
mod docs;
mod duplicates;
mod effects;
mod functions;
mod glue;
mod guard;
mod http;
mod msk;
mod ops;
mod outages;
mod payloads;
mod producer;
mod retention;
mod spans;
mod user_events;
mod worker;

/// Process-wide metrics that a test reads as an absolute value (a gauge another test
/// may set meanwhile): tests that set or read them hold this lock.
pub static GLOBAL_GAUGES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Log capture for the tracing tests.
///
/// `tracing` caches, per call site and process-wide, whether any subscriber is
/// interested. A thread-local subscriber set by one test therefore races the threads of
/// the others (a call site first hit elsewhere is cached as "never"). So the binary has
/// one global subscriber, installed on first use, whose filter is asked on every call
/// (a dynamic filter is never cached) and records, as JSON at DEBUG, only while a
/// [`Capture`](capture::Capture) is open. Other tests log meanwhile: a capturing test
/// picks its own lines out by its unique ids.
pub mod capture {
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Mutex, Once};

    use tracing_subscriber::filter::filter_fn;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    static OPEN: AtomicUsize = AtomicUsize::new(0);
    static LINES: Mutex<Vec<u8>> = Mutex::new(Vec::new());
    static INSTALL: Once = Once::new();

    struct Buffer;

    impl Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            LINES.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Records every log line (JSON, DEBUG and up) while it is open.
    pub struct Capture {
        from: usize,
    }

    impl Capture {
        pub fn start() -> Self {
            INSTALL.call_once(|| {
                let layer = tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(true)
                    .with_writer(|| Buffer)
                    .with_filter(filter_fn(|m| OPEN.load(Ordering::SeqCst) > 0 && *m.level() <= tracing::Level::DEBUG));
                // `try_init`: a subscriber set elsewhere first must not fail every capture.
                let _ = tracing_subscriber::registry().with(layer).try_init();
            });
            OPEN.fetch_add(1, Ordering::SeqCst);
            Self { from: LINES.lock().unwrap_or_else(|p| p.into_inner()).len() }
        }

        /// Stops recording and returns what was logged since [`start`](Self::start).
        pub fn finish(self) -> String {
            let lines = LINES.lock().unwrap_or_else(|p| p.into_inner());
            String::from_utf8_lossy(&lines[self.from..]).into_owned()
        }
    }

    impl Drop for Capture {
        fn drop(&mut self) {
            OPEN.fetch_sub(1, Ordering::SeqCst);
        }
    }
}
