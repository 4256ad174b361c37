//! One exponential backoff for every retry loop of the driver and the agent:
//! the delay doubles from `first` up to `max`, and a success resets it.

use std::time::Duration;

/// Delays between retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Starts at `first`, doubling up to `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Backoff { first, max, next: first.min(max) }
    }

    /// The delay before the next attempt; the one after is twice as long, up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        d
    }

    /// After a success: the next failure waits `first` again.
    pub fn reset(&mut self) {
        self.next = self.first.min(self.max);
    }

    /// The delay after `failures` failures in a row (1 → `first`), without state.
    pub fn after(first: Duration, max: Duration, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        first.saturating_mul(1u32 << doublings).min(max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(1));
        let seen: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(seen, [200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(200));
        assert_eq!(Backoff::after(Duration::from_secs(30), Duration::from_secs(3600), 1), Duration::from_secs(30));
        assert_eq!(Backoff::after(Duration::from_secs(30), Duration::from_secs(3600), 3), Duration::from_secs(120));
        assert_eq!(Backoff::after(Duration::from_secs(30), Duration::from_secs(3600), 99), Duration::from_secs(3600));
    }
}
