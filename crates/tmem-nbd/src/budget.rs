//! A server-wide budget for the large per-request buffers of the transmission phase.
//!
//! Every buffer sized by a request beyond the small inline threshold (a WRITE payload, a
//! READ reply, a large BLOCK_STATUS reply) is reserved here before it is allocated and
//! given back when it is dropped. When the budget is used up, the connection that needs a
//! buffer waits (it stops reading from its socket: back-pressure to the client); it does
//! not fail. Waiters are served in arrival order, so a large request is not starved by
//! smaller ones.
//!
//! A reservation is always taken whole, before the buffer exists, and a connection never
//! waits while holding another one, so clients cannot deadlock each other on the budget.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::proto::MAX_PAYLOAD;

/// The smallest limit [`BufferBudget::new`] accepts: one maximum-size request and its
/// header (a smaller limit could never let such a request through).
pub const MIN_BUFFER_LIMIT: u64 = MAX_PAYLOAD as u64 + 4096;

#[derive(Debug, Default)]
struct State {
    used: u64,
    /// Next ticket handed to a waiter; `serving` is the one whose turn it is.
    next_ticket: u64,
    serving: u64,
}

#[derive(Debug)]
struct Inner {
    limit: u64,
    state: Mutex<State>,
    cv: Condvar,
    /// `state.used`, readable without the lock (for statistics).
    in_use: AtomicU64,
}

/// A shared byte budget for request buffers (cheap to clone: clones share the budget).
#[derive(Debug, Clone)]
pub struct BufferBudget(Arc<Inner>, Option<HeldBytes>);

/// What one connection holds of a shared [`BufferBudget`] right now (see
/// [`BufferBudget::scoped`]): lets the server tell a client that stalls while holding budget
/// from one that is merely idle.
#[derive(Debug, Clone, Default)]
pub struct HeldBytes(Arc<AtomicU64>);

impl HeldBytes {
    /// Bytes currently reserved through the scoped budget.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Default for BufferBudget {
    /// An unlimited budget (it still counts the bytes in use).
    fn default() -> Self {
        Self::unlimited()
    }
}

impl BufferBudget {
    /// A budget of `limit` bytes (raised to [`MIN_BUFFER_LIMIT`] if smaller).
    pub fn new(limit: u64) -> Self {
        Self(
            Arc::new(Inner {
                limit: limit.max(MIN_BUFFER_LIMIT),
                state: Mutex::new(State::default()),
                cv: Condvar::new(),
                in_use: AtomicU64::new(0),
            }),
            None,
        )
    }

    /// The same budget, for one connection: what is reserved through the returned handle is
    /// also counted in the returned [`HeldBytes`].
    pub fn scoped(&self) -> (BufferBudget, HeldBytes) {
        let held = HeldBytes::default();
        (BufferBudget(Arc::clone(&self.0), Some(held.clone())), held)
    }

    fn permit(&self, n: u64) -> BufferPermit {
        if let Some(h) = &self.1 {
            h.0.fetch_add(n, Ordering::Relaxed);
        }
        BufferPermit {
            budget: Arc::clone(&self.0),
            held: self.1.clone(),
            n,
        }
    }

    /// A budget that never makes anyone wait.
    pub fn unlimited() -> Self {
        Self::new(u64::MAX)
    }

    /// The limit, bytes.
    pub fn limit(&self) -> u64 {
        self.0.limit
    }

    /// Bytes reserved now.
    pub fn in_use(&self) -> u64 {
        self.0.in_use.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserve `n` bytes (at most the limit), waiting in line until they are free.
    pub fn acquire(&self, n: u64) -> BufferPermit {
        let n = n.min(self.0.limit);
        let mut st = self.lock();
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        while st.serving != ticket || st.used + n > self.0.limit {
            st = self.0.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.serving += 1;
        st.used += n;
        self.0.in_use.store(st.used, Ordering::Relaxed);
        drop(st);
        // The next in line may fit too.
        self.0.cv.notify_all();
        self.permit(n)
    }

    /// Reserve `n` bytes only if they are free now and nobody is waiting.
    pub fn try_acquire(&self, n: u64) -> Option<BufferPermit> {
        let mut st = self.lock();
        if st.serving != st.next_ticket || st.used.saturating_add(n) > self.0.limit {
            return None;
        }
        st.used += n;
        self.0.in_use.store(st.used, Ordering::Relaxed);
        drop(st);
        Some(self.permit(n))
    }
}

/// Bytes reserved from a [`BufferBudget`]; given back when dropped.
#[derive(Debug)]
pub struct BufferPermit {
    budget: Arc<Inner>,
    held: Option<HeldBytes>,
    n: u64,
}

impl BufferPermit {
    /// Bytes this permit holds.
    pub fn bytes(&self) -> u64 {
        self.n
    }
}

impl Drop for BufferPermit {
    fn drop(&mut self) {
        if let Some(h) = &self.held {
            h.0.fetch_sub(self.n, Ordering::Relaxed);
        }
        let mut st = self.budget.state.lock().unwrap_or_else(|e| e.into_inner());
        st.used -= self.n;
        self.budget.in_use.store(st.used, Ordering::Relaxed);
        drop(st);
        self.budget.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn waits_until_released_and_keeps_order() {
        let b = BufferBudget::new(0);
        assert_eq!(b.limit(), MIN_BUFFER_LIMIT);
        let p = b.acquire(MIN_BUFFER_LIMIT - 10);
        assert_eq!(b.in_use(), MIN_BUFFER_LIMIT - 10);
        assert!(b.try_acquire(11).is_none());
        let small = b.try_acquire(10).expect("fits");
        drop(small);
        let b2 = b.clone();
        let t = std::thread::spawn(move || b2.acquire(u64::MAX).bytes());
        while b.lock().next_ticket < 2 {
            std::thread::sleep(Duration::from_millis(1));
        }
        // A waiter is in line: even a small reservation must queue behind it.
        assert!(b.try_acquire(1).is_none());
        drop(p);
        assert_eq!(t.join().unwrap(), MIN_BUFFER_LIMIT);
        assert_eq!(b.in_use(), 0);
    }

    #[test]
    fn scoped_budgets_count_what_their_connection_holds() {
        let b = BufferBudget::new(0);
        let (c1, h1) = b.scoped();
        let (_c2, h2) = b.scoped();
        let p = c1.acquire(1000);
        let q = c1.try_acquire(24).expect("fits");
        assert_eq!((h1.get(), h2.get(), b.in_use()), (1024, 0, 1024));
        drop(p);
        assert_eq!(h1.get(), 24);
        drop(q);
        assert_eq!((h1.get(), b.in_use()), (0, 0));
    }
}
