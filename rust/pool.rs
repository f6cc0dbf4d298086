//! Threads: one lazily built rayon pool, reset after `fork`, plus progress and cancel atomics.
//!
//! The pool is sized from the `num_threads` argument, then `FASTCKPT_NUM_THREADS`, then the
//! available parallelism, and rebuilt when a call asks for a different size. A `pthread_atfork`
//! child hook bumps a generation counter (as tokenizers does): a forked child sees a stale
//! generation and builds a fresh pool instead of touching the parent's dead threads (the stale
//! pool is leaked, never dropped, since its threads do not exist in the child).
//!
//! Workers only bump [`Progress::done`] and poll [`Progress::cancel`]; the caller turns them into
//! callbacks (see `py.rs`).

use crate::error::{Error, Result};
use rayon::{ThreadPool, ThreadPoolBuilder};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};

static GENERATION: AtomicU64 = AtomicU64::new(0);
static ATFORK: Once = Once::new();
static POOL: Mutex<Option<(usize, u64, Arc<ThreadPool>)>> = Mutex::new(None);

extern "C" fn after_fork_child() {
    GENERATION.fetch_add(1, Ordering::SeqCst);
}

/// Number of threads a call uses: `requested`, else `FASTCKPT_NUM_THREADS`, else the CPU count.
pub fn resolve_threads(requested: Option<usize>) -> usize {
    if let Some(n) = requested.filter(|&n| n > 0) {
        return n;
    }
    if let Some(n) = std::env::var("FASTCKPT_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
    {
        return n;
    }
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The shared pool with `resolve_threads(requested)` threads, built on first use.
pub fn pool(requested: Option<usize>) -> Result<Arc<ThreadPool>> {
    ATFORK.call_once(|| {
        // SAFETY: registering a plain `extern "C"` function with no captured state; the hook
        // only performs an atomic increment, which is async-signal-safe in a forked child.
        unsafe {
            libc::pthread_atfork(None, None, Some(after_fork_child));
        }
    });
    let n = resolve_threads(requested);
    let generation = GENERATION.load(Ordering::SeqCst);
    let mut slot = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((size, g, p)) = slot.as_ref() {
        if *size == n && *g == generation {
            return Ok(p.clone());
        }
    }
    let old = slot.take();
    if let Some((_, g, p)) = old {
        if g != generation {
            // Built by the parent before a fork: its threads do not exist here.
            std::mem::forget(p);
        }
    }
    let p = Arc::new(
        ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("fastckpt-{i}"))
            .build()
            .map_err(|e| Error::Plan(format!("cannot start {n} threads: {e}")))?,
    );
    *slot = Some((n, generation, p.clone()));
    Ok(p)
}

/// Progress of one call: bytes done (of `total`), and a cancel flag.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes finished so far.
    pub done: AtomicU64,
    /// Total bytes of the call.
    pub total: AtomicU64,
    /// Set to stop workers between work items.
    pub cancel: AtomicBool,
}

impl Progress {
    /// A fresh counter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds finished bytes.
    pub fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    /// `(done, total)`.
    pub fn get(&self) -> (u64, u64) {
        (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }

    /// Asks workers to stop.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// `Err(Cancelled)` once [`Progress::cancel`] was called.
    pub fn check(&self) -> Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }
}
