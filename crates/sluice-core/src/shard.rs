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

/// The most connection threads there may be.
pub const MAX: usize = 256;

/// The connection runtime the calling thread runs, counted from 1; 0 on any other thread.
pub fn current() -> usize {
    SHARD.with(Cell::get)
}

/// Marks the calling thread as the one running connection runtime `n` (counted from 1).
pub fn enter(n: usize) {
    SHARD.with(|s| s.set(n));
}

static MAIN: std::sync::OnceLock<tokio::runtime::Handle> = std::sync::OnceLock::new();

/// Names the runtime for work that outlives a request (health checks, shared connections):
/// `sluice serve`'s main runtime. Only the first call counts.
pub fn set_main(main: tokio::runtime::Handle) {
    let _ = MAIN.set(main);
}

/// The runtime for long-lived background work: the main runtime once [`set_main`] named it,
/// else the caller's; `None` outside any runtime.
pub fn background() -> Option<tokio::runtime::Handle> {
    MAIN.get()
        .cloned()
        .or_else(|| tokio::runtime::Handle::try_current().ok())
}

/// Runs `work` on the main runtime when called from a connection thread, so that connections it
/// opens or re-opens (to Redis, say), shared by every thread, are driven by the main runtime
/// rather than by one connection thread, whose other requests would hold them up; elsewhere,
/// in place. `None` if the main runtime dropped the work (it shuts down).
pub async fn on_main<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> Option<T> {
    match MAIN.get() {
        Some(main) if away_from_main() => match main.spawn(work).await {
            Ok(v) => Some(v),
            Err(e) => match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(_) => None,
            },
        },
        _ => Some(work.await),
    }
}

/// Whether [`on_main`] would move work: on a connection thread, once the main runtime is named.
pub fn away_from_main() -> bool {
    current() != 0 && MAIN.get().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// From a connection thread, `on_main` runs its work on the main runtime (where a thread
    /// is no connection thread); elsewhere, in place. `background` names the main runtime.
    #[test]
    fn work_moves_to_the_main_runtime_from_connection_threads_only() {
        let main = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("test-main")
            .enable_all()
            .build()
            .unwrap();
        set_main(main.handle().clone());
        let name = || std::thread::current().name().unwrap_or("").to_string();
        let on_conn = std::thread::Builder::new()
            .name("test-conn".into())
            .spawn(move || {
                enter(3);
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    assert!(away_from_main());
                    let there = on_main(async move { (current(), name()) }).await.unwrap();
                    let bg = background()
                        .unwrap()
                        .spawn(async move { name() })
                        .await
                        .unwrap();
                    (there, bg)
                })
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(on_conn.0, (0, "test-main".to_string()));
        assert_eq!(on_conn.1, "test-main");
        // Not a connection thread: in place.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let here = rt.block_on(on_main(async move { name() })).unwrap();
        assert_eq!(here, name());
        assert!(!away_from_main());
    }
}
