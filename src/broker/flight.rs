//! Single-flight per identity on one replica: the first call for an identity starts its
//! flight, later ones join it, and each waits for the result within its own deadline only
//! (contract §8.1 I5). Whether a new flight is needed is decided under the map's lock, after
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
    /// A flight was running; wait on it.
    Running(watch::Receiver<Option<Landed>>),
    /// No flight, but the last one kept an answer (checked under the lock).
    Answered(Box<Landed>),
    /// This call starts the flight: run it and [`Flights::land`] its result.
    Started(watch::Sender<Option<Landed>>),
}

/// The flights in progress on this replica.
#[derive(Default)]
pub struct Flights {
    running: Mutex<HashMap<Digest, watch::Receiver<Option<Landed>>>>,
}

impl Flights {
    /// Joins the flight for `id`, or, when none runs, asks `kept` for an answer that
    /// landed meanwhile, or starts one. All three under one lock: a flight lands (keeps its
    /// result) before it leaves the map.
    pub fn join_or_start(&self, id: Digest, kept: impl FnOnce() -> Option<Landed>) -> Joined {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(receiver) = running.get(&id)
            && receiver.has_changed().is_ok()
        {
            return Joined::Running(receiver.clone());
        }
        if let Some(answer) = kept() {
            return Joined::Answered(Box::new(answer));
        }
        let (sender, receiver) = watch::channel(None);
        running.insert(id, receiver);
        Joined::Started(sender)
    }

    /// Delivers a flight's result to its callers and takes it off the map.
    pub fn land(&self, id: &Digest, sender: &watch::Sender<Option<Landed>>, result: Landed) {
        sender.send_replace(Some(result));
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if running
            .get(id)
            .is_some_and(|r| r.same_channel(&sender.subscribe()))
        {
            running.remove(id);
        }
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
