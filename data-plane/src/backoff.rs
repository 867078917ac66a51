//! Exponential backoff with jitter, shared by the control-plane connection and certificate renewal, so that
//! many proxies retrying after a control-plane restart do not arrive in lockstep.

use std::time::Duration;

/// How much of each step is randomised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Between half and all of the step: never much shorter than planned.
    Equal,
    /// Anywhere between zero and the step ("full jitter"): the widest spread, so a fleet reconnecting after an
    /// outage arrives spread over the whole step rather than bunched in its second half.
    Full,
}

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
    jitter: Jitter,
}

impl Backoff {
    /// Equal jitter (certificate renewal retries).
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self::with_jitter(initial, max, Jitter::Equal)
    }

    pub fn with_jitter(initial: Duration, max: Duration, jitter: Jitter) -> Self {
        Self { initial, max, next: initial, jitter }
    }

    /// The control channel's policy: steps of 200ms doubling up to `CONTROL_PLANE_MAX`, full jitter. The cap bounds
    /// how long a proxy waits after the control plane returns when its probe (`discovery.rs`) cannot tell (the
    /// control plane answered but refused); an unreachable control plane is probed meanwhile and redialled as
    /// soon as it accepts connections.
    pub fn control_plane() -> Self {
        Self::with_jitter(Duration::from_millis(200), CONTROL_PLANE_MAX, Jitter::Full)
    }

    /// The delay before the next attempt: the current step with jitter, then the step doubles up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        match self.jitter {
            Jitter::Equal => step / 2 + step.mul_f64(random_fraction() / 2.0),
            Jitter::Full => step.mul_f64(random_fraction()),
        }
    }

    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// The longest step between two attempts to reach the control plane.
pub const CONTROL_PLANE_MAX: Duration = Duration::from_secs(5);

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

    /// The control plane's schedule: steps 0.2, 0.4, 0.8, 1.6, 3.2 s, then 5 s for ever; each delay anywhere in
    /// [0, step]; over many draws the delays cover the whole step (full jitter), not only its upper half.
    #[test]
    fn control_plane_schedule_is_capped_at_five_seconds_with_full_jitter() {
        let steps_ms = [200, 400, 800, 1600, 3200, 5000, 5000, 5000];
        let mut low_half = [0usize; 8];
        let rounds = 2000;
        for _ in 0..rounds {
            let mut b = Backoff::control_plane();
            for (i, step) in steps_ms.iter().enumerate() {
                let d = b.next_delay();
                assert!(d <= Duration::from_millis(*step), "attempt {i}: {d:?} > {step} ms");
                if d < Duration::from_millis(*step) / 2 {
                    low_half[i] += 1;
                }
            }
            for _ in 0..50 {
                assert!(b.next_delay() <= CONTROL_PLANE_MAX);
            }
            b.reset();
            assert!(b.next_delay() <= Duration::from_millis(200));
        }
        // About half of the draws fall in the lower half of each step (equal jitter would give none).
        for (i, n) in low_half.iter().enumerate() {
            assert!((rounds * 4 / 10..=rounds * 6 / 10).contains(n), "attempt {i}: {n} of {rounds} in the lower half");
        }
    }

    #[test]
    fn fraction_in_range() {
        for _ in 0..1000 {
            let f = random_fraction();
            assert!((0.0..1.0).contains(&f));
        }
    }
}
