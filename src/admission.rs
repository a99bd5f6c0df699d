//! Overload protection: at most `max_concurrent_calls` calls work at once, at most
//! `max_queued_calls` wait for a turn, and the rest are refused at once, so a burst is shed
//! fast instead of piling up memory and latency.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

/// Why a call was not admitted.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Every slot and every queue place is taken.
    Overloaded,
    /// The caller's deadline passed while the call waited in the queue.
    DeadlineExceeded,
}

/// The admission gate shared by every call.
#[derive(Debug)]
pub struct Admission {
    slots: Semaphore,
    max_concurrent: usize,
    queued: AtomicUsize,
    max_queued: usize,
}

/// Keeps the queue count right however the wait ends (admitted, refused or cancelled).
struct Queued<'a>(&'a AtomicUsize);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    pub fn new(max_concurrent: usize, max_queued: usize) -> Self {
        Self {
            slots: Semaphore::new(max_concurrent),
            max_concurrent,
            queued: AtomicUsize::new(0),
            max_queued,
        }
    }

    /// Calls working now (`tokengate_calls_in_flight`).
    pub fn in_flight(&self) -> usize {
        self.max_concurrent
            .saturating_sub(self.slots.available_permits())
    }

    /// Calls waiting for a turn now (`tokengate_calls_queued`).
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Waits for a slot (in arrival order) unless the queue is full or the deadline passes.
    pub async fn admit(&self, deadline: Option<Instant>) -> Result<SemaphorePermit<'_>, Refusal> {
        if let Ok(permit) = self.slots.try_acquire() {
            return Ok(permit);
        }
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.max_queued {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::Overloaded);
        }
        let _queued = Queued(&self.queued);
        let acquire = self.slots.acquire();
        let permit = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, acquire)
                .await
                .map_err(|_| Refusal::DeadlineExceeded)?,
            None => acquire.await,
        };
        // The semaphore is never closed.
        permit.map_err(|_| Refusal::Overloaded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn calls_beyond_the_slots_queue_and_beyond_the_queue_are_refused() {
        let gate = Admission::new(2, 1);
        let a = gate.admit(None).await.unwrap();
        let _b = gate.admit(None).await.unwrap();
        let queued = gate.admit(None);
        tokio::pin!(queued);
        assert!(
            futures_poll(&mut queued).await.is_none(),
            "the third call waits"
        );
        assert_eq!((gate.in_flight(), gate.queued()), (2, 1));
        assert_eq!(
            gate.admit(None).await.unwrap_err(),
            Refusal::Overloaded,
            "the fourth is shed"
        );
        drop(a);
        assert!(queued.await.is_ok(), "a freed slot admits the queued call");
        assert_eq!(gate.queued.load(Ordering::Acquire), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_call_gives_up_at_its_deadline_and_leaves_the_queue() {
        let gate = Admission::new(1, 4);
        let _held = gate.admit(None).await.unwrap();
        let deadline = Instant::now() + Duration::from_millis(100);
        assert_eq!(
            gate.admit(Some(deadline)).await.unwrap_err(),
            Refusal::DeadlineExceeded
        );
        assert_eq!(gate.queued.load(Ordering::Acquire), 0);
    }

    /// Polls a future once.
    async fn futures_poll<F: std::future::Future + Unpin>(future: &mut F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut *future).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
