//! Single-flight per identity on one replica: the first call for an identity starts its
//! flight, later ones join it, and each waits for the result within its own deadline only
//! (contract §8.1 I5). A flight is bounded by its first caller's deadline (none for a
//! one-time credential); a caller that outlives that bound and finds the flight cut short by
//! it starts over instead of failing. Whether a new flight is needed is decided under the map's lock, after
//! a last look at what the previous flight kept, so a call that missed just before a flight
//! landed never starts a second one.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::Failure;
use crate::keys::Digest;
use crate::upstream::Token;

use super::Source;

/// What a flight delivers to the calls that share it.
pub type Landed = Result<(Token, Source), Failure>;

/// How one call's wait for a flight ended.
pub enum FlightResult {
    /// The flight's result; `led` when this call started it.
    Landed { result: Box<Landed>, led: bool },
    /// The call's own deadline passed first.
    TimedOut,
    /// The flight ended with no result (its task was cancelled).
    Vanished,
}

/// What joining found.
pub enum Joined {
    /// A flight was running, bounded by this deadline; wait on it.
    Running(watch::Receiver<Option<Landed>>, Option<Instant>),
    /// No flight, but the last one kept an answer (checked under the lock).
    Answered(Box<Landed>),
    /// This call starts the flight: run it and [`Flights::land`] its result.
    Started(watch::Sender<Option<Landed>>),
}

/// The flights in progress on this replica.
#[derive(Default)]
pub struct Flights {
    running: Mutex<HashMap<Digest, Running>>,
}

/// A flight in progress: where its result arrives, and the deadline that bounds it.
struct Running {
    landed: watch::Receiver<Option<Landed>>,
    deadline: Option<Instant>,
}

impl Flights {
    /// Joins the flight for `id`, or, when none runs, asks `kept` for an answer that
    /// landed meanwhile, or starts one. All three under one lock: a flight lands (keeps its
    /// result) before it leaves the map.
    pub fn join_or_start(
        &self,
        id: Digest,
        deadline: Option<Instant>,
        kept: impl FnOnce() -> Option<Landed>,
    ) -> Joined {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        // A flight that has landed but not yet left the map is over: joining it would hand
        // a caller that starts over the very result it starts over from, round after round.
        if let Some(flight) = running.get(&id)
            && flight.landed.has_changed().is_ok()
            && flight.landed.borrow().is_none()
        {
            return Joined::Running(flight.landed.clone(), flight.deadline);
        }
        if let Some(answer) = kept() {
            return Joined::Answered(Box::new(answer));
        }
        let (sender, landed) = watch::channel(None);
        running.insert(id, Running { landed, deadline });
        Joined::Started(sender)
    }

    /// Delivers a flight's result to its callers and takes it off the map.
    pub fn land(&self, id: &Digest, sender: &watch::Sender<Option<Landed>>, result: Landed) {
        sender.send_replace(Some(result));
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if running
            .get(id)
            .is_some_and(|r| r.landed.same_channel(&sender.subscribe()))
        {
            running.remove(id);
        }
    }
}

/// Whether a caller with deadline `own` outlives a flight bounded by `flight`.
pub fn outlives(own: Option<Instant>, flight: Option<Instant>) -> bool {
    match (own, flight) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(own), Some(flight)) => own > flight,
    }
}

/// Whether a failure may be the flight's deadline cutting it short: a deadline, or an
/// upstream wait (`Retry-After`) that the flight did not wait out because it would not fit.
pub fn cut_short(failure: &Failure) -> bool {
    match failure {
        Failure::DeadlineExceeded => true,
        Failure::Upstream { error, .. } => {
            error.kind == crate::upstream::UpstreamErrorKind::DeadlineExceeded
                || (error.retry_after.is_some()
                    && error.kind != crate::upstream::UpstreamErrorKind::OAuth)
        }
        _ => false,
    }
}

/// Waits for a flight's result within `deadline` (the caller's own).
pub async fn wait(
    mut receiver: watch::Receiver<Option<Landed>>,
    led: bool,
    deadline: Option<Instant>,
) -> FlightResult {
    let wait = receiver.wait_for(Option::is_some);
    let landed = match deadline {
        Some(deadline) => match tokio::time::timeout_at(deadline, wait).await {
            Ok(landed) => landed,
            Err(_) => return FlightResult::TimedOut,
        },
        None => wait.await,
    };
    match landed.ok().and_then(|landed| landed.clone()) {
        Some(result) => FlightResult::Landed {
            result: Box::new(result),
            led,
        },
        None => FlightResult::Vanished,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Digest {
        crate::keys::Keys::new(None).digest([b"flight".as_slice()])
    }

    /// Between a flight's result being sent and the flight leaving the map, a caller that
    /// starts over (its flight was cut short) must not join it again: it would get the same
    /// result at once, and run out of rounds in a millisecond (found by the campaign, I5).
    #[test]
    fn a_landed_flight_that_has_not_left_the_map_is_not_joined() {
        let flights = Flights::default();
        let id = id();
        let Joined::Started(sender) = flights.join_or_start(id, None, || None) else {
            panic!("the first call starts the flight");
        };
        assert!(matches!(
            flights.join_or_start(id, None, || None),
            Joined::Running(..)
        ));
        // `land`'s first half: the result is out, the map not yet cleaned.
        sender.send_replace(Some(Err(Failure::DeadlineExceeded)));
        let Joined::Started(_next) = flights.join_or_start(id, None, || None) else {
            panic!("a call after the landing starts a new flight");
        };
        // The old flight's cleanup leaves the new one in place.
        flights.land(&id, &sender, Err(Failure::DeadlineExceeded));
        assert!(matches!(
            flights.join_or_start(id, None, || None),
            Joined::Running(..)
        ));
    }
}
