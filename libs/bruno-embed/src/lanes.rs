//! Queries first: when the retriever embeds a question in the same process
//! as background work (documents being indexed, a finished turn being
//! remembered), the background pass steps aside between its weight
//! products until no query is being embedded.
//!
//! In `bruno dev` and any process that runs the retriever beside the
//! embedder they share the cores and rayon's pool: in the chat bench's
//! closed loop a question's embedding took 14.8 ms p50 against 9.5 ms on
//! an idle fleet, the previous answer's memory write splitting the cores
//! with it. A background pass pauses on its own blocking thread, never on
//! a rayon worker, so the query gets the whole pool. A background pass waits at most [`MAX_PAUSE`] at each
//! step, so a steady stream of queries slows indexing but cannot stop it.
//! Separate processes (the fleet's pods) have no shared lanes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Duration;

/// Which kind of embedding a forward pass is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lane {
    /// Someone is waiting on it (a question).
    Query,
    /// Nobody is waiting on it (documents, memory).
    Background,
}

/// The longest a background pass waits at one step.
pub(crate) const MAX_PAUSE: Duration = Duration::from_millis(50);

struct Lanes {
    /// Queries being embedded in this process.
    queries: Mutex<usize>,
    none_left: Condvar,
}

static LANES: Lanes = Lanes {
    queries: Mutex::new(0),
    none_left: Condvar::new(),
};

/// A query being embedded, from [`query`] until dropped.
pub(crate) struct QueryGuard(());

/// Count a query as being embedded until the guard is dropped.
pub(crate) fn query() -> QueryGuard {
    *LANES.queries.lock().unwrap_or_else(PoisonError::into_inner) += 1;
    QueryGuard(())
}

impl Drop for QueryGuard {
    fn drop(&mut self) {
        let mut n = LANES.queries.lock().unwrap_or_else(PoisonError::into_inner);
        *n = n.saturating_sub(1);
        if *n == 0 {
            LANES.none_left.notify_all();
        }
    }
}

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Let queries go first in this process (the default), or not: the chat
/// bench measures a fleet both ways.
pub fn set_query_priority(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Called by a background pass between its steps: returns once no query
/// is being embedded, or after [`MAX_PAUSE`].
pub(crate) fn yield_to_queries() {
    if ENABLED.load(Ordering::Relaxed) {
        wait_for_queries(MAX_PAUSE);
    }
}

fn wait_for_queries(at_most: Duration) {
    let n = LANES.queries.lock().unwrap_or_else(PoisonError::into_inner);
    if *n == 0 {
        return;
    }
    drop(
        LANES
            .none_left
            .wait_timeout_while(n, at_most, |n| *n > 0)
            .unwrap_or_else(PoisonError::into_inner),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    // One test for both cases: the counter is process-wide.
    #[test]
    fn background_waits_while_a_query_runs_and_not_otherwise() {
        // No query: no wait, even with a long limit.
        wait_for_queries(Duration::from_secs(3600));

        let guard = query();
        let done = Arc::new(AtomicBool::new(false));
        let waiter = {
            let done = done.clone();
            std::thread::spawn(move || {
                wait_for_queries(Duration::from_secs(3600));
                done.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !done.load(Ordering::SeqCst),
            "background went on while a query was being embedded"
        );
        drop(guard);
        waiter.join().unwrap();
        assert!(done.load(Ordering::SeqCst));

        // A query that never ends delays background work by the limit only.
        let _stuck = query();
        wait_for_queries(Duration::from_millis(10));
    }
}
