//! Overload protection: at most `max_concurrent_calls` calls work at once, at most
//! `max_queued_calls` wait for a turn, and the rest are refused at once, so a burst is shed
//! fast instead of piling up memory and latency. No call waits longer than `max_wait`
//! (`upstream.request_timeout`), even one that carries no deadline of its own.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

/// Why a call was not admitted.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Every slot and every queue place is taken.
    Overloaded,
    /// The caller's deadline passed while the call waited in the queue.
    DeadlineExceeded,
    /// The call waited `max_wait` without getting a slot: as good as shed.
    WaitedTooLong,
}

/// The admission gate shared by every call.
#[derive(Debug)]
pub struct Admission {
    slots: Semaphore,
    max_concurrent: usize,
    queued: AtomicUsize,
    max_queued: usize,
    max_wait: Duration,
}

/// Keeps the queue count right however the wait ends (admitted, refused or cancelled).
struct Queued<'a>(&'a AtomicUsize);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    /// `max_concurrent` must not exceed tokio's `Semaphore::MAX_PERMITS` (config bounds it).
    pub fn new(max_concurrent: usize, max_queued: usize, max_wait: Duration) -> Self {
        Self {
            slots: Semaphore::new(max_concurrent),
            max_concurrent,
            queued: AtomicUsize::new(0),
            max_queued,
            max_wait,
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

    /// Waits for a slot (in arrival order) unless the queue is full, or the caller's deadline
    /// or `max_wait` passes first.
    pub async fn admit(&self, deadline: Option<Instant>) -> Result<SemaphorePermit<'_>, Refusal> {
        if let Ok(permit) = self.slots.try_acquire() {
            return Ok(permit);
        }
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.max_queued {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::Overloaded);
        }
        let _queued = Queued(&self.queued);
        let own_deadline = Instant::now() + self.max_wait;
        let (until, refusal) = match deadline {
            Some(deadline) if deadline <= own_deadline => (deadline, Refusal::DeadlineExceeded),
            _ => (own_deadline, Refusal::WaitedTooLong),
        };
        tokio::time::timeout_at(until, self.slots.acquire())
            .await
            .map_err(|_| refusal)?
            // The semaphore is never closed.
            .map_err(|_| Refusal::Overloaded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn calls_beyond_the_slots_queue_and_beyond_the_queue_are_refused() {
        let gate = Admission::new(2, 1, LONG);
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
        let gate = Admission::new(1, 4, LONG);
        let _held = gate.admit(None).await.unwrap();
        let deadline = Instant::now() + Duration::from_millis(100);
        assert_eq!(
            gate.admit(Some(deadline)).await.unwrap_err(),
            Refusal::DeadlineExceeded
        );
        assert_eq!(gate.queued.load(Ordering::Acquire), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_call_without_a_deadline_waits_at_most_max_wait() {
        let gate = Admission::new(1, 4, Duration::from_millis(250));
        let _held = gate.admit(None).await.unwrap();
        let started = Instant::now();
        assert_eq!(gate.admit(None).await.unwrap_err(), Refusal::WaitedTooLong);
        assert_eq!(started.elapsed(), Duration::from_millis(250));
        assert_eq!(gate.queued(), 0, "it left the queue");
        // A caller's deadline past max_wait is cut to max_wait too.
        let far = Instant::now() + Duration::from_secs(3600);
        assert_eq!(
            gate.admit(Some(far)).await.unwrap_err(),
            Refusal::WaitedTooLong
        );
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
