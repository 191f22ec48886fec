//! Circuit breakers, one per dependency, so an outage fails calls fast instead of
//! making every event wait for a timeout, and the dependency is probed back gently.
//!
//! Closed: calls pass; `failure_threshold` consecutive failures open it.
//! Open: calls fail fast with [`BreakerOpen`] until `open_for` has passed.
//! Half-open: at most `half_open_max_calls` probes at a time; `success_threshold`
//! successful probes close it, any failure opens it again for another `open_for`.
//!
//! Why our own: the maintained crates we looked at (`failsafe`, `circuitbreaker-rs`)
//! close on the first successful probe or have no bound on concurrent probes; we need N
//! successes to close (one lucky probe must not let the full load back onto a server
//! still recovering) and a limited number of probes. The state machine is
//! small and fully tested below on tokio's paused clock.
//!
//! Time comes from `tokio::time::Instant`, so tests drive it with `tokio::time::advance`.

use std::fmt;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::BreakerConfig;
use crate::metrics::metrics;

/// Where a breaker stands (the `circuit_breaker_state` gauge: 0 closed, 1 half-open,
/// 2 open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls pass; consecutive failures are counted.
    Closed,
    /// Probes only, at most `half_open_max_calls` at a time.
    HalfOpen,
    /// Calls fail fast with [`BreakerOpen`] until `open_for` has passed.
    Open,
}

impl BreakerState {
    fn gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }

    /// `closed`, `half_open` or `open`: the `to` label of breaker transitions, and what logs
    /// show.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Open => "open",
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A call refused because the breaker is open (or half-open with every probe slot taken).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{dependency} circuit breaker is open; next probe in {} ms", retry_in.as_millis())]
pub struct BreakerOpen {
    /// The dependency behind the breaker: `redis`, `clickhouse` or `kafka`.
    pub dependency: &'static str,
    /// Time until a probe may pass; zero when a probe is already under way.
    pub retry_in: Duration,
}

/// The result of [`CircuitBreaker::call`].
#[derive(Debug, thiserror::Error)]
pub enum BreakerError<E> {
    /// The breaker refused the call; `f` was not run.
    #[error(transparent)]
    Open(#[from] BreakerOpen),
    /// The call ran and failed with this error (and counted as a failure).
    #[error(transparent)]
    Inner(E),
}

struct Inner {
    state: BreakerState,
    consecutive_failures: u32,
    probes_in_flight: u32,
    probe_successes: u32,
    opened_at: Instant,
}

/// A circuit breaker in front of one dependency; shared by every call to it.
pub struct CircuitBreaker {
    dependency: &'static str,
    config: BreakerConfig,
    inner: Mutex<Inner>,
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker").field("dependency", &self.dependency).field("state", &self.state()).finish()
    }
}

/// Leave to make one call. Report how it went with [`Permit::success`] or
/// [`Permit::failure`]; dropping it unreported frees a probe slot and changes nothing
/// else (a cancelled call says nothing about the dependency).
#[must_use = "report the call's result with success() or failure()"]
pub struct Permit<'a> {
    breaker: &'a CircuitBreaker,
    probe: bool,
    reported: bool,
}

impl Permit<'_> {
    /// The call succeeded.
    pub fn success(mut self) {
        self.reported = true;
        self.breaker.on_success(self.probe);
    }

    /// The call failed: it counts towards opening the breaker.
    pub fn failure(mut self) {
        self.reported = true;
        self.breaker.on_failure(self.probe);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.reported && self.probe {
            let mut inner = self.breaker.lock();
            inner.probes_in_flight = inner.probes_in_flight.saturating_sub(1);
        }
    }
}

impl CircuitBreaker {
    /// A closed breaker for `dependency` (its label in metrics and errors).
    pub fn new(dependency: &'static str, config: BreakerConfig) -> Self {
        metrics().breaker_state.with_label_values(&[dependency]).set(0);
        Self {
            dependency,
            config,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                consecutive_failures: 0,
                probes_in_flight: 0,
                probe_successes: 0,
                opened_at: Instant::now(),
            }),
        }
    }

    /// The dependency's name, as given to [`CircuitBreaker::new`].
    pub fn dependency(&self) -> &'static str {
        self.dependency
    }

    /// The thresholds it was built with.
    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the counters inconsistent in a
        // way that matters more than stopping the process would; keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state a caller would see now: an open breaker whose open time has passed
    /// reports half-open (the next call is a probe).
    pub fn state(&self) -> BreakerState {
        let inner = self.lock();
        match inner.state {
            BreakerState::Open if inner.opened_at.elapsed() >= self.config.open_for => BreakerState::HalfOpen,
            s => s,
        }
    }

    /// Time until a probe may pass, when the breaker is open; `None` otherwise.
    pub fn retry_in(&self) -> Option<Duration> {
        let inner = self.lock();
        match inner.state {
            BreakerState::Open => Some(self.config.open_for.saturating_sub(inner.opened_at.elapsed())),
            _ => None,
        }
    }

    /// Fails fast when open; otherwise hands out a permit for one call.
    pub fn try_acquire(&self) -> Result<Permit<'_>, BreakerOpen> {
        let mut inner = self.lock();
        if inner.state == BreakerState::Open {
            let elapsed = inner.opened_at.elapsed();
            if elapsed < self.config.open_for {
                return Err(BreakerOpen { dependency: self.dependency, retry_in: self.config.open_for - elapsed });
            }
            inner.probes_in_flight = 0;
            inner.probe_successes = 0;
            self.transition(&mut inner, BreakerState::HalfOpen);
        }
        match inner.state {
            BreakerState::Closed => Ok(Permit { breaker: self, probe: false, reported: false }),
            BreakerState::HalfOpen if inner.probes_in_flight < self.config.half_open_max_calls => {
                inner.probes_in_flight += 1;
                Ok(Permit { breaker: self, probe: true, reported: false })
            }
            _ => Err(BreakerOpen { dependency: self.dependency, retry_in: Duration::ZERO }),
        }
    }

    /// Runs `f` under the breaker: refused when open, its result recorded otherwise.
    pub async fn call<T, E, F, Fut>(&self, f: F) -> Result<T, BreakerError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let permit = self.try_acquire()?;
        match f().await {
            Ok(v) => {
                permit.success();
                Ok(v)
            }
            Err(e) => {
                permit.failure();
                Err(BreakerError::Inner(e))
            }
        }
    }

    /// Sleeps until the breaker would let a probe through (returns at once unless open).
    pub async fn wait_for_probe(&self) {
        if let Some(d) = self.retry_in() {
            tokio::time::sleep(d).await;
        }
    }

    fn on_success(&self, probe: bool) {
        let mut inner = self.lock();
        match inner.state {
            BreakerState::Closed => inner.consecutive_failures = 0,
            BreakerState::HalfOpen if probe => {
                inner.probes_in_flight = inner.probes_in_flight.saturating_sub(1);
                inner.probe_successes += 1;
                if inner.probe_successes >= self.config.success_threshold {
                    inner.consecutive_failures = 0;
                    self.transition(&mut inner, BreakerState::Closed);
                }
            }
            // A call admitted before the breaker opened: it says nothing about now.
            _ => {}
        }
    }

    fn on_failure(&self, probe: bool) {
        let mut inner = self.lock();
        match inner.state {
            BreakerState::Closed => {
                inner.consecutive_failures += 1;
                if inner.consecutive_failures >= self.config.failure_threshold {
                    inner.opened_at = Instant::now();
                    self.transition(&mut inner, BreakerState::Open);
                }
            }
            BreakerState::HalfOpen => {
                if probe {
                    inner.probes_in_flight = inner.probes_in_flight.saturating_sub(1);
                }
                inner.opened_at = Instant::now();
                self.transition(&mut inner, BreakerState::Open);
            }
            BreakerState::Open => {}
        }
    }

    fn transition(&self, inner: &mut Inner, to: BreakerState) {
        let from = inner.state;
        if from == to {
            return;
        }
        inner.state = to;
        let m = metrics();
        m.breaker_state.with_label_values(&[self.dependency]).set(to.gauge());
        m.breaker_transitions.with_label_values(&[self.dependency, to.as_str()]).inc();
        match to {
            BreakerState::Open => tracing::warn!(
                dependency = self.dependency,
                %from,
                open_for_ms = self.config.open_for.as_millis() as u64,
                "circuit breaker opened: calls to {} fail fast for {} s",
                self.dependency,
                self.config.open_for.as_secs()
            ),
            BreakerState::HalfOpen => {
                tracing::info!(dependency = self.dependency, %from, "circuit breaker half-open: probing")
            }
            BreakerState::Closed => {
                tracing::info!(dependency = self.dependency, %from, "circuit breaker closed: {} recovered", self.dependency)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(failures: u32, open_secs: u64, successes: u32, probes: u32) -> BreakerConfig {
        BreakerConfig {
            failure_threshold: failures,
            open_for: Duration::from_secs(open_secs),
            success_threshold: successes,
            half_open_max_calls: probes,
        }
    }

    async fn fail(b: &CircuitBreaker) -> Result<(), BreakerError<&'static str>> {
        b.call(|| async { Err::<(), _>("boom") }).await
    }

    async fn succeed(b: &CircuitBreaker) -> Result<(), BreakerError<&'static str>> {
        b.call(|| async { Ok::<(), &str>(()) }).await
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_fails_fast() {
        let b = CircuitBreaker::new("test-a", cfg(3, 30, 3, 1));
        for _ in 0..2 {
            assert!(matches!(fail(&b).await, Err(BreakerError::Inner("boom"))));
        }
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(matches!(fail(&b).await, Err(BreakerError::Inner(_))));
        assert_eq!(b.state(), BreakerState::Open);

        let called = std::sync::atomic::AtomicBool::new(false);
        let r = b
            .call(|| async {
                called.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok::<(), &str>(())
            })
            .await;
        match r {
            Err(BreakerError::Open(open)) => assert_eq!(open.retry_in, Duration::from_secs(30)),
            other => panic!("expected fail-fast, got {other:?}"),
        }
        assert!(!called.load(std::sync::atomic::Ordering::SeqCst), "an open breaker must not call through");
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_failure_count() {
        let b = CircuitBreaker::new("test-b", cfg(3, 30, 3, 1));
        fail(&b).await.unwrap_err();
        fail(&b).await.unwrap_err();
        succeed(&b).await.unwrap();
        fail(&b).await.unwrap_err();
        fail(&b).await.unwrap_err();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_after_timeout_and_closes_after_enough_successes() {
        let b = CircuitBreaker::new("test-c", cfg(3, 30, 3, 1));
        for _ in 0..3 {
            fail(&b).await.unwrap_err();
        }
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(matches!(succeed(&b).await, Err(BreakerError::Open(_))));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
        succeed(&b).await.unwrap();
        succeed(&b).await.unwrap();
        assert_eq!(b.state(), BreakerState::HalfOpen, "two successes are not enough");
        succeed(&b).await.unwrap();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn failure_while_half_open_reopens_for_a_full_period() {
        let b = CircuitBreaker::new("test-d", cfg(2, 60, 3, 1));
        fail(&b).await.unwrap_err();
        fail(&b).await.unwrap_err();
        tokio::time::advance(Duration::from_secs(60)).await;
        succeed(&b).await.unwrap();
        fail(&b).await.unwrap_err();
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.retry_in(), Some(Duration::from_secs(60)));
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(matches!(succeed(&b).await, Err(BreakerError::Open(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_limits_concurrent_probes() {
        let b = CircuitBreaker::new("test-e", cfg(1, 15, 2, 1));
        fail(&b).await.unwrap_err();
        tokio::time::advance(Duration::from_secs(15)).await;
        let probe = b.try_acquire().expect("first probe admitted");
        let second = b.try_acquire();
        assert!(matches!(second, Err(BreakerOpen { retry_in, .. }) if retry_in.is_zero()));
        drop(probe); // cancelled: frees the slot, records nothing
        let probe = b.try_acquire().expect("slot freed by the dropped permit");
        probe.success();
        assert_eq!(b.state(), BreakerState::HalfOpen);
        b.try_acquire().unwrap().success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn wait_for_probe_sleeps_exactly_the_open_time() {
        let b = CircuitBreaker::new("test-f", cfg(1, 15, 2, 1));
        fail(&b).await.unwrap_err();
        let start = Instant::now();
        b.wait_for_probe().await;
        assert_eq!(start.elapsed(), Duration::from_secs(15));
        assert!(b.try_acquire().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn state_is_exported_as_a_metric() {
        let b = CircuitBreaker::new("test-metric", cfg(1, 15, 1, 1));
        let gauge = || metrics().breaker_state.with_label_values(&["test-metric"]).get();
        assert_eq!(gauge(), 0);
        fail(&b).await.unwrap_err();
        assert_eq!(gauge(), 2);
        tokio::time::advance(Duration::from_secs(15)).await;
        succeed(&b).await.unwrap();
        assert_eq!(gauge(), 0);
    }
}
