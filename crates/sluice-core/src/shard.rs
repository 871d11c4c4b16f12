//! Which connection runtime the calling thread belongs to.
//!
//! `sluice serve` runs its client connections on a few single-threaded runtimes, one thread
//! each, so that a request is handled start to finish on one thread. What a request opens on
//! the way (an upstream connection, say) must stay on that thread too, or every response would
//! be handed from one thread to another: the providers' HTTP clients keep one connection pool
//! per runtime, chosen by [`current`].

use std::cell::Cell;

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// The connection runtime the calling thread runs, counted from 1; 0 on any other thread.
pub fn current() -> usize {
    SHARD.with(Cell::get)
}

/// Marks the calling thread as the one running connection runtime `n` (counted from 1).
pub fn enter(n: usize) {
    SHARD.with(|s| s.set(n));
}
