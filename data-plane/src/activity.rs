//! Whether the proxy carries traffic: a counter every burst bumps (a connection opening, a copy direction waking
//! from idle, an HTTP request, pooled connections closing), read by whoever acts once traffic goes quiet (`heap`).
//! A leaf: it names no other module, so the data path reports activity without knowing who listens.

use std::sync::atomic::{AtomicU64, Ordering};

static ACTIVITY: AtomicU64 = AtomicU64::new(0);

/// Marks traffic. Called per burst, not per byte.
pub fn note() {
    ACTIVITY.fetch_add(1, Ordering::Relaxed);
}

/// A reading that changes whenever [`note`] was called since the previous one.
pub fn reading() -> u64 {
    ACTIVITY.load(Ordering::Relaxed)
}
