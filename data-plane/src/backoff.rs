//! Exponential backoff with jitter, shared by the control-plane connection and certificate renewal, so that
//! many proxies retrying after a control-plane restart do not arrive in lockstep.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max, next: initial }
    }

    /// The control channel's policy: 200ms doubling up to 30s.
    pub fn control_plane() -> Self {
        Self::new(Duration::from_millis(200), Duration::from_secs(30))
    }

    /// The delay before the next attempt: the current step with "equal jitter" (between half and all of
    /// it), then the step doubles.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        step / 2 + step.mul_f64(random_fraction() / 2.0)
    }

    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// Uniform in [0, 1).
pub fn random_fraction() -> f64 {
    let mut bytes = [0u8; 8];
    // The system RNG does not fail in practice; a constant would only remove the jitter.
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_bounded_jitter() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        let mut step = Duration::from_millis(200);
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(d >= step / 2 && d <= step, "{d:?} not within [{:?}, {step:?}]", step / 2);
            step = (step * 2).min(Duration::from_secs(30));
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(200));
    }

    #[test]
    fn fraction_in_range() {
        for _ in 0..1000 {
            let f = random_fraction();
            assert!((0.0..1.0).contains(&f));
        }
    }
}
