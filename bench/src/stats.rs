//! Latency samples and percentiles.

use std::time::Duration;

#[derive(Debug, Default, Clone)]
pub struct Samples(Vec<f64>);

impl Samples {
    pub fn push(&mut self, d: Duration) {
        self.0.push(d.as_secs_f64());
    }

    /// The `p`-th percentile in seconds (nearest rank); 0 when empty.
    pub fn percentile(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        let mut v = self.0.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut s = Samples::default();
        for ms in 1..=100 {
            s.push(Duration::from_millis(ms));
        }
        assert!((s.percentile(50.0) - 0.050).abs() < 1e-9);
        assert!((s.percentile(99.0) - 0.099).abs() < 1e-9);
        assert!((s.percentile(100.0) - 0.100).abs() < 1e-9);
        assert_eq!(Samples::default().percentile(50.0), 0.0);
    }
}
