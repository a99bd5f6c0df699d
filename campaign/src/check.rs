//! The checker: the broker's invariants (contract §8.1) decided over the upstream's log, every
//! caller's answer and every fault window, from outside the replicas.
//!
//! How much of each is observable:
//! - I1 fully for the credentials that reach the upstream (codes, OTPs, PINs, callers' and kept
//!   refresh tokens); "while Redis answers" is taken as: no Redis outage, no Redis slowdown past
//!   `cache.redis.timeout`, no replica paused longer than its lease and no replica killed
//!   overlapping the two sends. A send that tokengate saw time out (a replica paused while its
//!   answer was on the way) may be followed by one more, as I1 allows.
//! - I2 fully: the credential's POSTs and the answer to the rejecting call.
//! - I3 for what a caller sees (a CANCELLED/UNKNOWN/INTERNAL answer, a reset stream reads as
//!   one of those), a panic line in a replica's output, a replica that died on its own. "No
//!   stored entry holds a time that can overflow" is seen only through the calls that serve it.
//! - I4 partly: who sent a POST is not visible (every replica speaks through the same client),
//!   so a POST is only known to have *arrived* after an answer left; a grace of
//!   [`CAUSAL_GRACE`] stands for "already sent", and Redis faults or pauses excuse it. The
//!   penalty's key is tokengate's: the user when the request names one, else the client.
//! - I5: the caller's own deadline against the time of its DEADLINE_EXCEEDED; a hang past the
//!   deadline counts too. That the flight went on is I1's business.
//! - I6 is not observable from outside (a lease's TTL and the holder's clock); its effect, a
//!   second send, is I1's.
//! - I7 for RevokeToken and for `rejected_access_token` on a cached grant; "the notice reaches
//!   it" is taken as [`NOTICE_BOUND`] while Redis answers.
//! - I8 is not checked (it would need the replicas' view of Redis).
//! - I9 partly: only renewals with a kept refresh token can be told apart from callers'
//!   requests; more than [`RENEWAL_BURST`] sends of one kept refresh token within a second means
//!   no backoff.
//! - I10 for every token answered: the upstream records each access token's death (its expiry,
//!   or the use of its refresh token). Deaths a caller caused (refreshing with a refresh token
//!   it was given, RevokeToken, a token it had said was rejected) are not tokengate's. A
//!   renewal made during a Redis outage is fleet-wide news only once Redis is back.

use std::collections::{HashMap, HashSet};

use crate::fleet::{LEASE, REDIS_TIMEOUT, REPLAY_WINDOW, REQUEST_TIMEOUT};
use crate::record::{
    CallKind, CallRec, Cred, EndCause, Fault, FaultKind, Outcome, PostRec, TokenRec, UpAnswer,
    digest, replica_name,
};

/// A POST that arrives this long after an answer left may still have been sent before it.
pub const CAUSAL_GRACE: f64 = 0.1;
/// How long a revocation may take to reach the other replicas while Redis answers.
pub const NOTICE_BOUND: f64 = 0.5;
/// Sends of one kept refresh token within one second that mean renewal does not back off.
pub const RENEWAL_BURST: usize = 4;
/// How long after Redis is back the replicas may still be rejoining.
const REJOIN: f64 = 3.0;

pub struct Violation {
    pub invariant: &'static str,
    pub schedule: usize,
    pub text: String,
}

/// The data of one schedule.
pub struct Input<'a> {
    pub schedule: usize,
    pub calls: &'a [CallRec],
    /// This schedule's POSTs (its clients'), in arrival order.
    pub posts: Vec<&'a PostRec>,
    pub tokens: &'a HashMap<String, TokenRec>,
    /// Every fault of the run: background work of a schedule runs into the next one's.
    pub faults: &'a [Fault],
    /// Replicas that died on their own, and panic lines, seen after this schedule.
    pub crashes: &'a [(usize, String)],
    pub panics: &'a [(usize, String)],
}

/// An `expires_in` no clock can add (the upstream's I3 probes).
fn absurd(expires_in: &str) -> bool {
    expires_in.parse::<f64>().is_ok_and(|v| v > 1e9)
}

/// The call reached tokengate and tokengate answered it (not a replica that was down, not
/// a transport failure, not the caller giving up first).
fn reached(c: &CallRec) -> bool {
    match &c.outcome {
        Outcome::Ok { .. } => true,
        Outcome::Err { code, reason, .. } => {
            (!reason.is_empty() && reason != "REPLICA_DOWN")
                || *code == tonic::Code::DeadlineExceeded
        }
        Outcome::ClientDeadline | Outcome::NoAnswer => false,
    }
}

/// A fault that excuses a fleet-wide guarantee ("while Redis answers") between `a` and `b`.
fn fleet_fault(faults: &[Fault], a: f64, b: f64) -> Option<&Fault> {
    faults.iter().find(|f| {
        let end = match f.kind {
            FaultKind::RedisDown => f.end + REJOIN,
            // A replica that counted Redis as down during the slowdown rejoins as after an outage.
            FaultKind::RedisSlow(d) if 2.0 * d > REDIS_TIMEOUT => f.end + REJOIN,
            // The holder extends its lease every third of its TTL, so a pause longer than two
            // thirds of it may outlive what is left of the lease.
            FaultKind::Pause(_) if f.end - f.start > LEASE * 2.0 / 3.0 => f.end + 0.5,
            FaultKind::Kill(_) => f.end + 0.5,
            _ => return false,
        };
        f.start <= b && a <= end
    })
}

/// A pause or kill of `replica` between `a` and `b`: its callers' answers are excused.
fn replica_fault(faults: &[Fault], replica: usize, a: f64, b: f64) -> Option<&Fault> {
    faults.iter().find(|f| {
        matches!(f.kind, FaultKind::Pause(r) | FaultKind::Kill(r) if r == replica)
            && f.start <= b + 0.05
            && a <= f.end + 0.05
    })
}

/// The first send of a pair ended, for tokengate, in a timeout with no answer, which §8.1 I1
/// lets it follow with one more send: a replica paused while the answer was on its way reads
/// its request timeout before the answer. Evidence: a pause overlapping the send, and either a
/// caller told UPSTREAM_TIMEOUT before the second send or no caller at all (a renewal).
fn paused_into_timeout(
    faults: &[Fault],
    calls: &[&CallRec],
    prev: &PostRec,
    cur: &PostRec,
) -> bool {
    let answered = prev.written.unwrap_or(prev.arrived + prev.delay);
    let paused = faults.iter().any(|f| {
        matches!(f.kind, FaultKind::Pause(_))
            && f.start <= answered + 0.05
            && prev.arrived <= f.end
            && f.end <= cur.arrived + 0.05
    });
    paused
        && (calls.is_empty()
            || calls.iter().any(|c| {
                matches!(&c.outcome, Outcome::Err { reason, .. } if reason == "UPSTREAM_TIMEOUT")
                    && c.received >= prev.arrived
                    && c.received <= cur.arrived + 0.05
            }))
}

fn post_line(p: &PostRec) -> String {
    let credential = p
        .credential
        .as_ref()
        .map(|(k, v)| {
            format!(
                " {}{} #{}",
                if p.kept { "kept " } else { "" },
                k.name(),
                digest(v)
            )
        })
        .unwrap_or_default();
    let user = p
        .user
        .as_deref()
        .map(|u| format!(" user {u}"))
        .unwrap_or_default();
    format!(
        "POST {} arrived {:.3}: {} client {}{user}{credential} -> {}",
        p.id,
        p.arrived,
        p.grant_type,
        p.client,
        p.outcome()
    )
}

pub fn check(input: &Input<'_>) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut v = |invariant: &'static str, text: String| {
        out.push(Violation {
            invariant,
            schedule: input.schedule,
            text,
        })
    };
    let calls = input.calls;
    let faults = input.faults;

    // ---- I1 and I2 (the credential sent again) ------------------------------------------
    // Calls already reported for re-sending their credential: their answer is not reported
    // a second time.
    let mut resent_by: HashSet<usize> = HashSet::new();
    let mut by_credential: HashMap<&str, Vec<&PostRec>> = HashMap::new();
    for p in &input.posts {
        if let Some((_, value)) = &p.credential {
            by_credential.entry(value.as_str()).or_default().push(p);
        }
    }
    for (value, posts) in &by_credential {
        for pair in posts.windows(2) {
            let (prev, cur) = (pair[0], pair[1]);
            if prev.spends_nothing() || prev.transport_failure(REQUEST_TIMEOUT) {
                continue;
            }
            if cur.arrived - prev.arrived > REPLAY_WINDOW {
                continue;
            }
            if fleet_fault(faults, prev.arrived, cur.arrived).is_some() {
                continue;
            }
            let carrying: Vec<&CallRec> = calls
                .iter()
                .filter(|c| c.credential.as_ref().is_some_and(|(_, x)| x == value))
                .collect();
            if paused_into_timeout(faults, &carrying, prev, cur) {
                continue;
            }
            let rejecting = carrying.iter().find(|c| {
                c.rejected.is_some() && c.sent <= cur.arrived && c.received >= cur.arrived - 0.05
            });
            let mut text = format!(
                "{}{} #{} reached the upstream twice within replay_window, and the first send \
                 got a definitive answer:\n    {}\n    {}",
                if prev.kept { "kept " } else { "" },
                prev.credential
                    .as_ref()
                    .map_or("credential", |(k, _)| k.name()),
                digest(value),
                post_line(prev),
                post_line(cur)
            );
            let invariant = if let Some(call) = rejecting {
                resent_by.insert(call.id);
                text.push_str(&format!(
                    "\n  the second send came from a call carrying rejected_access_token:\n    {}",
                    call.describe()
                ));
                "I2"
            } else {
                "I1"
            };
            if matches!(prev.answer, UpAnswer::Token { ref expires_in, .. } if absurd(expires_in))
                && carrying.iter().any(|c| {
                    matches!(&c.outcome, Outcome::Err { reason, .. } if reason == "UPSTREAM_BAD_RESPONSE")
                })
            {
                text.push_str(
                    "\n  the first send was a 200 with an absurd expires_in that tokengate answered \
                     UPSTREAM_BAD_RESPONSE and did not replay, although the upstream had spent \
                     the credential",
                );
            }
            if prev.abandoned {
                text.push_str(
                    "\n  the first send was abandoned by tokengate before the upstream answered \
                     (a caller's deadline, not the request timeout)",
                );
            }
            if carrying.is_empty() {
                text.push_str("\n  no caller ever sent it: a credential tokengate keeps (renewal)");
            } else {
                text.push_str("\n  calls carrying it:");
                for c in carrying.iter().take(8) {
                    text.push_str(&format!("\n    {}", c.describe()));
                }
            }
            v(invariant, text);
        }
    }

    // ---- I2 (the answer) ------------------------------------------------------------------
    for call in calls.iter().filter(|c| {
        c.kind == CallKind::Get
            && !c.cached
            && c.credential.is_some()
            && c.rejected.is_some()
            && !resent_by.contains(&c.id)
    }) {
        let rejected = call.rejected.as_deref().unwrap_or_default();
        let first = calls
            .iter()
            .filter(|c| c.subject == call.subject)
            .filter(|c| matches!(&c.outcome, Outcome::Ok { access, .. } if access == rejected))
            .map(|c| c.received)
            .fold(f64::INFINITY, f64::min);
        if fleet_fault(faults, first, call.received).is_some()
            || replica_fault(faults, call.replica, call.sent, call.received).is_some()
        {
            continue;
        }
        let bad = match &call.outcome {
            Outcome::Ok { access, .. } if access == rejected => {
                Some("served the rejected token again")
            }
            Outcome::Ok { .. } => None, // a new token means a send: I2's first half says so
            Outcome::Err { code, reason, .. } => match (code, reason.as_str()) {
                (tonic::Code::FailedPrecondition, "CREDENTIAL_SPENT") => None,
                (_, "OVERLOADED" | "UPSTREAM_RATE_LIMITED") => None,
                (tonic::Code::DeadlineExceeded, _)
                    if call.received - call.sent >= call.deadline - 0.02 =>
                {
                    None
                }
                _ => Some("answered other than FAILED_PRECONDITION CREDENTIAL_SPENT"),
            },
            Outcome::ClientDeadline | Outcome::NoAnswer => None,
        };
        if let Some(what) = bad {
            v(
                "I2",
                format!(
                    "rejected_access_token on a replayed grant {what}:\n    {}",
                    call.describe()
                ),
            );
        }
    }

    // ---- I3 -------------------------------------------------------------------------------
    for call in calls {
        if let Outcome::Err { code, .. } = &call.outcome
            && matches!(
                code,
                tonic::Code::Cancelled | tonic::Code::Unknown | tonic::Code::Internal
            )
            && replica_fault(faults, call.replica, call.sent, call.received).is_none()
        {
            let absurd: Vec<String> = input
                .posts
                .iter()
                .filter(|p| p.client == call.client && p.arrived <= call.received)
                .filter_map(|p| match &p.answer {
                    UpAnswer::Token { expires_in, .. } if absurd(expires_in) => {
                        Some(format!("POST {} answered expires_in {expires_in}", p.id))
                    }
                    _ => None,
                })
                .take(3)
                .collect();
            let hint = if absurd.is_empty() {
                String::new()
            } else {
                format!("\n  the upstream had sent: {}", absurd.join("; "))
            };
            v(
                "I3",
                format!("a call answered {code:?}:\n    {}{hint}", call.describe()),
            );
        }
    }
    for (replica, tail) in input.crashes {
        v(
            "I3",
            format!(
                "{} exited on its own; its last output:\n{tail}",
                replica_name(*replica)
            ),
        );
    }
    for (replica, line) in input.panics {
        v("I3", format!("{} panicked: {line}", replica_name(*replica)));
    }

    // ---- I4 -------------------------------------------------------------------------------
    let covers = |client: &str, user: &Option<String>, p: &PostRec| {
        !p.revoke && p.client == client && (user.is_none() || p.user == *user)
    };
    let mut reported: HashSet<usize> = HashSet::new();
    // After an answer UPSTREAM_RATE_LIMITED left a replica.
    for call in calls {
        let Outcome::Err {
            reason,
            retry: Some(wait),
            ..
        } = &call.outcome
        else {
            continue;
        };
        if reason != "UPSTREAM_RATE_LIMITED" {
            continue;
        }
        let (from, until) = (call.received + CAUSAL_GRACE, call.received + wait - 0.25);
        for p in &input.posts {
            if p.arrived > from
                && p.arrived < until
                && covers(&call.client, &call.user, p)
                && fleet_fault(faults, call.received, p.arrived).is_none()
                && !faults.iter().any(|f| {
                    matches!(f.kind, FaultKind::Pause(_))
                        && f.start <= p.arrived
                        && call.received <= f.end
                })
                && reported.insert(p.id)
            {
                v(
                    "I4",
                    format!(
                        "a POST for a penalised {} arrived {:.3} s after the answer that \
                         reported the penalty ({:.1} s):\n    {}\n    {}",
                        call.user.as_deref().map_or(
                            format!("client {}", call.client),
                            |u| format!("user {u} of {}", call.client)
                        ),
                        p.arrived - call.received,
                        wait,
                        call.describe(),
                        post_line(p)
                    ),
                );
            }
        }
    }
    // After the upstream answered 429 (a renewal's included): every replica holds back once
    // the answer has had time to reach Redis.
    for q in input
        .posts
        .iter()
        .filter(|p| matches!(p.answer, UpAnswer::RateLimited(_)))
    {
        let (UpAnswer::RateLimited(secs), Some(written)) = (&q.answer, q.written) else {
            continue;
        };
        if q.abandoned {
            continue;
        }
        let (from, until) = (written + 3.0 * CAUSAL_GRACE, written + *secs as f64 - 0.25);
        for p in &input.posts {
            if p.arrived > from
                && p.arrived < until
                && covers(&q.client, &q.user, p)
                && fleet_fault(faults, written, p.arrived).is_none()
                && !faults.iter().any(|f| {
                    matches!(f.kind, FaultKind::Pause(_))
                        && f.start <= p.arrived
                        && written <= f.end
                })
                && reported.insert(p.id)
            {
                v(
                    "I4",
                    format!(
                        "a POST arrived {:.3} s after the upstream's 429 for the same {} was \
                         delivered (Retry-After {secs}):\n    {}\n    {}",
                        p.arrived - written,
                        q.user
                            .as_deref()
                            .map_or(format!("client {}", q.client), |u| format!(
                                "user {u} of {}",
                                q.client
                            )),
                        post_line(q),
                        post_line(p)
                    ),
                );
            }
        }
    }

    // ---- I5 -------------------------------------------------------------------------------
    for call in calls {
        let took = call.received - call.sent;
        match &call.outcome {
            Outcome::Err {
                code: tonic::Code::DeadlineExceeded,
                ..
            } if took < call.deadline - 0.02 => {
                let others: Vec<String> = calls
                    .iter()
                    .filter(|c| {
                        c.id != call.id
                            && c.subject == call.subject
                            && c.sent <= call.received
                            && c.received >= call.sent
                    })
                    .take(4)
                    .map(|c| format!("\n    in flight with it: {}", c.describe()))
                    .collect();
                v(
                    "I5",
                    format!(
                        "DEADLINE_EXCEEDED after {:.0} ms, before the caller's own deadline \
                         of {:.0} ms:\n    {}{}",
                        took * 1000.0,
                        call.deadline * 1000.0,
                        call.describe(),
                        others.concat()
                    ),
                );
            }
            Outcome::NoAnswer
                if replica_fault(faults, call.replica, call.sent, call.received).is_none() =>
            {
                v(
                    "I5",
                    format!(
                        "no answer within the caller's deadline plus 3 s:\n    {}",
                        call.describe()
                    ),
                );
            }
            _ => {}
        }
    }

    // ---- I7 -------------------------------------------------------------------------------
    let invalidations = calls.iter().filter_map(|c| match (c.kind, &c.outcome) {
        (CallKind::Revoke, Outcome::Ok { .. }) => {
            c.revoked.as_deref().map(|t| (c, t, "RevokeToken"))
        }
        (CallKind::Get, _) if c.cached && reached(c) => c
            .rejected
            .as_deref()
            .map(|t| (c, t, "rejected_access_token")),
        _ => None,
    });
    let mut seen_i7: HashSet<(usize, usize)> = HashSet::new();
    for (inv, token, how) in invalidations {
        for c in calls {
            let Outcome::Ok { access, .. } = &c.outcome else {
                continue;
            };
            if access != token || c.id == inv.id {
                continue;
            }
            let same = c.replica == inv.replica && c.sent > inv.received;
            // A replica paused or killed in between may not have had the notice yet.
            let other = c.replica != inv.replica
                && c.sent > inv.received + NOTICE_BOUND
                && fleet_fault(faults, inv.received, c.sent).is_none()
                && replica_fault(faults, c.replica, inv.received, c.received).is_none();
            if (same || other) && seen_i7.insert((inv.id, c.id)) {
                v(
                    "I7",
                    format!(
                        "at#{} was served {:.3} s after {how} on {} returned:\n    {}\n    {}",
                        digest(token),
                        c.sent - inv.received,
                        replica_name(inv.replica),
                        inv.describe(),
                        c.describe()
                    ),
                );
            }
        }
    }

    // ---- I9 -------------------------------------------------------------------------------
    for posts in by_credential.values() {
        if !posts.first().is_some_and(|p| p.kept) {
            continue;
        }
        for (i, first) in posts.iter().enumerate() {
            let within: Vec<&&PostRec> = posts[i..]
                .iter()
                .take_while(|p| p.arrived - first.arrived < 1.0)
                .collect();
            if within.len() > RENEWAL_BURST {
                v(
                    "I9",
                    format!(
                        "a kept refresh token was sent {} times within one second (renewal \
                         without backoff):\n{}",
                        within.len(),
                        within
                            .iter()
                            .map(|p| format!("    {}", post_line(p)))
                            .collect::<Vec<_>>()
                            .join("\n")
                    ),
                );
                break;
            }
        }
    }

    // ---- I10 ------------------------------------------------------------------------------
    let given_refresh: HashSet<&str> = calls
        .iter()
        .filter_map(|c| match &c.outcome {
            Outcome::Ok { refresh, .. } if !refresh.is_empty() => Some(refresh.as_str()),
            _ => None,
        })
        .collect();
    let mut by_token: HashMap<&str, Vec<&CallRec>> = HashMap::new();
    for c in calls {
        if let Outcome::Ok { access, .. } = &c.outcome
            && c.kind == CallKind::Get
        {
            by_token.entry(access.as_str()).or_default().push(c);
        }
    }
    for (token, answered) in &by_token {
        let Some(life) = input.tokens.get(*token) else {
            continue;
        };
        let first_rejected = calls
            .iter()
            .filter(|c| c.rejected.as_deref() == Some(*token))
            .map(|c| c.sent)
            .fold(f64::INFINITY, f64::min);
        let renewed = matches!(&life.ended, Some((_, EndCause::Refresh(_))));
        let (death, why) = match &life.ended {
            Some((at, EndCause::Refresh(rt)))
                if !given_refresh.contains(rt.as_str())
                    && *at < first_rejected
                    && *at < life.expiry =>
            {
                (
                    *at,
                    format!(
                        "ended at {at:.3} by tokengate's use of its kept refresh token #{}",
                        digest(rt)
                    ),
                )
            }
            _ => (life.expiry, format!("expired at {:.3}", life.expiry)),
        };
        let late: Vec<&&CallRec> = answered
            .iter()
            .filter(|c| match &c.outcome {
                Outcome::Ok { expires_in, .. } => c.received + expires_in > death + 1.0,
                _ => false,
            })
            // A renewal made while Redis was out reaches the other replicas only when it is
            // back: until then they serve the token they hold ("while Redis answers").
            .filter(|c| !(renewed && fleet_fault(faults, death, c.received).is_some()))
            .collect();
        if let Some(worst) = late.first() {
            let Outcome::Ok { expires_in, .. } = &worst.outcome else {
                continue;
            };
            v(
                "I10",
                format!(
                    "at#{} (client {}, born {:.3}) {why}, but {} answer(s) reported it alive \
                     longer; e.g. answered at {:.3} with expires_in {expires_in:.3} s, i.e. \
                     until {:.3}:\n    {}",
                    digest(token),
                    life.client,
                    life.birth,
                    late.len(),
                    worst.received,
                    worst.received + expires_in,
                    worst.describe()
                ),
            );
        }
    }
    out
}

/// Which credential kinds a schedule's POSTs carried, for the summary.
pub fn credential_posts(posts: &[&PostRec]) -> usize {
    posts
        .iter()
        .filter(|p| {
            matches!(
                p.credential,
                Some((Cred::Code | Cred::Otp | Cred::Pin | Cred::Refresh, _))
            )
        })
        .count()
}
