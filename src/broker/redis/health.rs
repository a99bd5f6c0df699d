//! Whether Redis counts as up (invariant I8): a failed health check marks it down at once,
//! calls only after [`DOWN_AFTER`] failures in a row, and any success marks it up. Also the
//! log lines an operator sees, and the background check that keeps all this current.

use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::connection::{Asker, Inner};

/// Failed calls in a row after which Redis counts as down (I8): one slow reply (a fork for a
/// snapshot, a busy moment) must not send a replica off alone. A failed health check counts
/// as down at once.
pub const DOWN_AFTER: u32 = 3;
/// How often the health check runs.
const HEALTH_EVERY: Duration = Duration::from_millis(500);
/// Failed health checks in a row after which the connection is rebuilt from scratch, and how
/// often at most: the crate reconnects on I/O errors only, and a connection that keeps failing
/// otherwise (say `LOADING` after a restart) must not stay broken.
const REBUILD_AFTER: u32 = 4;
const REBUILD_EVERY: Duration = Duration::from_secs(5);
/// At most one "still unreachable" line per this while down.
const REMIND_EVERY: Duration = Duration::from_secs(60);

/// Up/down as callers see it, and the log lines an operator sees: one warning when Redis is
/// lost, at most one reminder a minute while it stays lost, one line when it is back.
#[derive(Default)]
pub(super) struct Health {
    /// [`UNKNOWN`], [`UP`] or [`DOWN`]; read on every call without taking the lock.
    state: AtomicU8,
    /// Calls failed in a row since the last success; written under `log`'s lock.
    failures: AtomicU32,
    log: Mutex<HealthLog>,
}

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

#[derive(Default)]
struct HealthLog {
    /// When the last warning (or reminder) was logged.
    warned_at: Option<Instant>,
    /// Whether this outage was announced, so its end is too. A blip within a minute of the
    /// last warning is neither.
    announced: bool,
}

/// What a health transition logs.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    Joined,
    Lost,
    StillLost,
    Rejoined,
}

impl Health {
    pub(super) fn is_up(&self) -> bool {
        self.state.load(Ordering::Relaxed) == UP
    }

    /// Records one answer (or its absence) to a call or a health check.
    pub(super) fn record(&self, asker: Asker, ok: bool) {
        // The common case, without the lock: up, and it answered.
        if ok
            && self.state.load(Ordering::Relaxed) == UP
            && self.failures.load(Ordering::Relaxed) == 0
        {
            return;
        }
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let previous = self.state.load(Ordering::Relaxed);
        let (state, failures) = step(previous, self.failures.load(Ordering::Relaxed), asker, ok);
        self.failures.store(failures, Ordering::Relaxed);
        self.state.store(state, Ordering::Relaxed);
        if let Some(line) = log.transition(previous, state, Instant::now()) {
            line.emit();
        }
    }

    /// Called by the health check while Redis stays down.
    pub(super) fn remind(&self) {
        if self.state.load(Ordering::Relaxed) != DOWN {
            return;
        }
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(line) = log.remind(Instant::now()) {
            line.emit();
        }
    }
}

/// The state and the failed calls in a row after one answer: any success is up, a failed
/// health check is down, a failed call is down only as the [`DOWN_AFTER`]th in a row.
fn step(state: u8, failures: u32, asker: Asker, ok: bool) -> (u8, u32) {
    if ok {
        return (UP, 0);
    }
    let failures = failures.saturating_add(1);
    match asker {
        Asker::HealthCheck => (DOWN, failures),
        Asker::Call if failures >= DOWN_AFTER => (DOWN, failures),
        Asker::Call => (state, failures),
    }
}

impl HealthLog {
    fn transition(&mut self, from: u8, to: u8, now: Instant) -> Option<Line> {
        match (from, to) {
            (UNKNOWN, UP) => Some(Line::Joined),
            (DOWN, UP) => std::mem::take(&mut self.announced).then_some(Line::Rejoined),
            (UNKNOWN | UP, DOWN) => {
                let quiet = self
                    .warned_at
                    .is_some_and(|at| now.duration_since(at) < REMIND_EVERY);
                self.announced = !quiet;
                if quiet {
                    return None;
                }
                self.warned_at = Some(now);
                Some(Line::Lost)
            }
            _ => None,
        }
    }

    fn remind(&mut self, now: Instant) -> Option<Line> {
        if self
            .warned_at
            .is_some_and(|at| now.duration_since(at) < REMIND_EVERY)
        {
            return None;
        }
        self.warned_at = Some(now);
        self.announced = true;
        Some(Line::StillLost)
    }
}

impl Line {
    fn emit(&self) {
        match self {
            Self::Joined => {
                tracing::info!("connected to redis; this replica shares the fleet's state")
            }
            Self::Lost => tracing::warn!("redis is unreachable; this replica goes on alone"),
            Self::StillLost => {
                tracing::warn!("redis is still unreachable; this replica goes on alone")
            }
            Self::Rejoined => {
                tracing::info!("redis answers again; this replica rejoined the fleet")
            }
        }
    }
}

/// Pings Redis so that `is_up` and the log follow it even with no traffic, reminds while it
/// is down, and rebuilds a connection that keeps failing.
pub(super) async fn check_health(inner: Weak<Inner>, mut shutdown: watch::Receiver<()>) {
    let mut failures = 0u32;
    let mut rebuilt = Instant::now();
    loop {
        {
            let Some(inner) = inner.upgrade() else { return };
            let ping = redis::cmd("PING");
            // Beyond the crate's own response timeout, so that a connection that stopped
            // answering fails inside the crate, which then reconnects.
            let ok = inner
                .run(
                    Asker::HealthCheck,
                    inner.probe * 3 / 2,
                    |mut conn| async move { ping.query_async::<()>(&mut conn).await },
                )
                .await
                .is_ok();
            if ok {
                failures = 0;
            } else {
                failures += 1;
                inner.health.remind();
                if failures >= REBUILD_AFTER && rebuilt.elapsed() >= REBUILD_EVERY {
                    tracing::debug!("rebuilding the redis connection");
                    let fresh = inner.factory.connect();
                    *inner.conn.write().unwrap_or_else(|e| e.into_inner()) = fresh;
                    rebuilt = Instant::now();
                }
            }
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            () = tokio::time::sleep(HEALTH_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_logged_once_then_once_a_minute() {
        let mut log = HealthLog::default();
        let t0 = Instant::now();
        assert_eq!(log.transition(UNKNOWN, UP, t0), Some(Line::Joined));
        assert_eq!(log.transition(UP, DOWN, t0), Some(Line::Lost));
        assert_eq!(log.remind(t0 + Duration::from_secs(30)), None);
        assert_eq!(
            log.transition(DOWN, UP, t0 + Duration::from_secs(31)),
            Some(Line::Rejoined)
        );
        // A blip soon after: neither a warning nor a "rejoined".
        assert_eq!(log.transition(UP, DOWN, t0 + Duration::from_secs(40)), None);
        assert_eq!(log.transition(DOWN, UP, t0 + Duration::from_secs(41)), None);
        assert_eq!(log.transition(UP, DOWN, t0 + Duration::from_secs(50)), None);
        // Still down a minute after the warning: one reminder, and its end is announced.
        assert_eq!(
            log.remind(t0 + Duration::from_secs(61)),
            Some(Line::StillLost)
        );
        assert_eq!(log.remind(t0 + Duration::from_secs(62)), None);
        assert_eq!(
            log.transition(DOWN, UP, t0 + Duration::from_secs(70)),
            Some(Line::Rejoined)
        );
        assert_eq!(
            log.transition(UP, DOWN, t0 + Duration::from_secs(200)),
            Some(Line::Lost)
        );
    }

    #[test]
    fn one_failed_call_is_not_an_outage_three_in_a_row_are() {
        let health = Health::default();
        assert!(!health.is_up(), "unknown until something answers");
        health.record(Asker::Call, true);
        assert!(health.is_up());
        for _ in 1..DOWN_AFTER {
            health.record(Asker::Call, false);
            assert!(
                health.is_up(),
                "a slow reply or two keep the replica in the fleet"
            );
        }
        // A success in between starts the count over.
        health.record(Asker::Call, true);
        for _ in 1..DOWN_AFTER {
            health.record(Asker::Call, false);
        }
        assert!(health.is_up());
        health.record(Asker::Call, false);
        assert!(
            !health.is_up(),
            "{DOWN_AFTER} failed calls in a row are down"
        );
        health.record(Asker::Call, false);
        assert!(!health.is_up());
        // Any answer brings it back, and the count starts over.
        health.record(Asker::Call, true);
        assert!(health.is_up());
        health.record(Asker::Call, false);
        assert!(health.is_up());
    }

    #[test]
    fn a_failed_health_check_is_down_at_once_and_a_good_one_is_up() {
        let health = Health::default();
        health.record(Asker::HealthCheck, true);
        assert!(health.is_up());
        health.record(Asker::HealthCheck, false);
        assert!(!health.is_up());
        health.record(Asker::HealthCheck, true);
        assert!(health.is_up());
        // A failed call before the check does not make the check's failure count less.
        health.record(Asker::Call, false);
        health.record(Asker::HealthCheck, false);
        assert!(!health.is_up());
    }

    #[test]
    fn the_step_rule() {
        for state in [UNKNOWN, UP, DOWN] {
            assert_eq!(step(state, 7, Asker::Call, true), (UP, 0));
            assert_eq!(step(state, 7, Asker::HealthCheck, true), (UP, 0));
            assert_eq!(step(state, 0, Asker::HealthCheck, false), (DOWN, 1));
            assert_eq!(step(state, 0, Asker::Call, false), (state, 1));
            assert_eq!(
                step(state, DOWN_AFTER - 1, Asker::Call, false),
                (DOWN, DOWN_AFTER)
            );
        }
        // Calls that fail before Redis ever answered: unknown, then down.
        assert_eq!(step(UNKNOWN, 1, Asker::Call, false), (UNKNOWN, 2));
        assert_eq!(step(DOWN, u32::MAX, Asker::Call, false), (DOWN, u32::MAX));
    }
}
