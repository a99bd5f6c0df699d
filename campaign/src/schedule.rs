//! One schedule: a few seconds of callers and faults, all drawn from one seed
//! ([`Plan::generate`]), then run against the fleet ([`run`]).
//!
//! What a schedule holds (each part drawn or not, with its sizes and times, from the seed):
//! - the upstream's script: token lifetime 6–12 s, answer delay (short, or 0.4–1.4 s under
//!   admission pressure), and chances of 429, 5xx, an answer past the request timeout, a
//!   reset, an absurd `expires_in`;
//! - one-time grants (authorization codes, OTPs, IVR PINs the upstream issued): bursts of
//!   identical calls on random replicas with short (100–400 ms) and long deadlines, often a
//!   short-deadline caller followed by a long one on the same replica (joining its flight),
//!   then a call with `rejected_access_token` set to the token it got (I2);
//! - the refresh tokens those answers carried, refreshed the same way, one or two rotations;
//! - cached grants (client_credentials, jwt_bearer): pollers over the whole schedule, so
//!   tokens are renewed ahead within it (I10), some calls rejecting the token they hold;
//! - password (replayed) and device_code calls; under admission pressure a burst of distinct
//!   password calls to one replica, so calls queue past a lease;
//! - RevokeToken of a cached token on a random replica (I7);
//! - up to two fleet faults: a replica SIGSTOPped then SIGCONTed, a replica SIGKILLed then
//!   started again, Redis killed then restarted (empty), Redis slowed through the proxy.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokengate::proto::client_credentials_grant::Subject as CcSubject;
use tokengate::proto::get_token_request::Grant;
use tokengate::proto::{
    AuthorizationCodeGrant, ClientCredentialsGrant, DeviceCodeGrant, GetTokenRequest, IvrPinGrant,
    JwtBearerGrant, OtpGrant, PasswordGrant, RefreshTokenGrant, RevokeTokenRequest,
};
use tonic_types::StatusExt as _;

use crate::fleet::Fleet;
use crate::record::{CallKind, CallRec, Cred, Fault, FaultKind, Outcome};
use crate::upstream::{DEVICE_CODE, JWT_BEARER, Script, jwt_for};

/// How long past its deadline a call may take before the campaign stops waiting.
const GRACE: f64 = 3.0;

#[derive(Clone, Debug)]
pub enum Subject {
    /// An authorization code, OTP or IVR PIN the upstream issued.
    OneTime {
        kind: Cred,
        value: String,
        client: String,
    },
    /// The refresh token of `parent`'s first token answer (resolved when first needed).
    RefreshOf {
        parent: usize,
        client: String,
    },
    Cc {
        client: String,
        account: String,
    },
    Jwt {
        client: String,
        sub: String,
    },
    Password {
        client: String,
        user: String,
    },
    Device {
        client: String,
        code: String,
    },
}

impl Subject {
    fn client(&self) -> &str {
        match self {
            Self::OneTime { client, .. }
            | Self::RefreshOf { client, .. }
            | Self::Cc { client, .. }
            | Self::Jwt { client, .. }
            | Self::Password { client, .. }
            | Self::Device { client, .. } => client,
        }
    }

    fn grant(&self) -> &'static str {
        match self {
            Self::OneTime {
                kind: Cred::Code, ..
            } => "authorization_code",
            Self::OneTime {
                kind: Cred::Otp, ..
            } => "otp",
            Self::OneTime {
                kind: Cred::Pin, ..
            } => "ivr_pin",
            Self::OneTime { .. } | Self::RefreshOf { .. } => "refresh_token",
            Self::Cc { .. } => "client_credentials",
            Self::Jwt { .. } => JWT_BEARER,
            Self::Password { .. } => "password",
            Self::Device { .. } => DEVICE_CODE,
        }
    }

    fn cached(&self) -> bool {
        matches!(self, Self::Cc { .. } | Self::Jwt { .. })
    }

    /// Whom tokengate's rate-limit guard keys the request by (none: the whole client).
    fn user(&self) -> Option<String> {
        match self {
            Self::Jwt { sub, .. } => Some(sub.clone()),
            Self::Password { user, .. } => Some(user.clone()),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub enum What {
    Call {
        replica: usize,
        deadline: f64,
        subject: usize,
        reject: bool,
    },
    Revoke {
        replica: usize,
        subject: usize,
    },
    Fault {
        kind: FaultKind,
        duration: f64,
    },
}

#[derive(Clone, Debug)]
pub struct Action {
    pub at: f64,
    pub what: What,
}

/// A schedule, drawn from its seed.
pub struct Plan {
    pub index: usize,
    pub seed: u64,
    pub script: Script,
    pub pressure: bool,
    pub subjects: Vec<Subject>,
    pub actions: Vec<Action>,
}

impl Plan {
    /// The client ids of schedule `index` all start with this.
    pub fn prefix(index: usize) -> String {
        format!("s{index}-")
    }

    pub fn generate(index: usize, seed: u64, replicas: usize) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let p = Self::prefix(index);
        let lifetime = rng.u64(6..=12);
        let pressure = rng.f64() < 0.35;
        let mut script = Script::quiet(lifetime);
        script.delay = if pressure { (0.4, 1.4) } else { (0.01, 0.3) };
        if rng.f64() < 0.6 {
            script.p429 = rng.f64() * 0.08;
            script.p5xx = rng.f64() * 0.12;
            script.p_slow = rng.f64() * 0.06;
            script.p_reset = rng.f64() * 0.06;
        }
        if rng.f64() < 0.2 {
            script.p_absurd = 0.3;
        }
        let horizon = 5.0 + rng.f64() * 2.0;
        let mut subjects = Vec::new();
        let mut actions = Vec::new();
        let salt = |rng: &mut fastrand::Rng| format!("{:012x}", rng.u64(..) & 0xffff_ffff_ffff);
        let mut one_time = Vec::new();
        let counts = [
            (Cred::Code, rng.usize(1..=3)),
            (Cred::Otp, rng.usize(0..=2)),
            (Cred::Pin, rng.usize(0..=2)),
        ];
        for (kind, count) in counts {
            for i in 0..count {
                let (tag, client) = match kind {
                    Cred::Code => ("code", format!("{p}code")),
                    Cred::Otp => ("otp", format!("{p}otp")),
                    _ => ("pin", format!("{p}pin")),
                };
                one_time.push(subjects.len());
                subjects.push(Subject::OneTime {
                    kind,
                    value: format!("{tag}-{index}-{i}-{}", salt(&mut rng)),
                    client,
                });
            }
        }
        let ncc = rng.usize(1..=2);
        for i in 0..ncc {
            subjects.push(Subject::Cc {
                client: format!("{p}cc"),
                account: format!("acct-{i}"),
            });
        }
        for i in 0..rng.usize(1..=2) {
            subjects.push(Subject::Jwt {
                client: format!("{p}jwt"),
                sub: format!("user-{i}"),
            });
        }
        for i in 0..rng.usize(1..=2) {
            subjects.push(Subject::Password {
                client: format!("{p}pw"),
                user: format!("pw-user-{i}"),
            });
        }
        if rng.bool() {
            subjects.push(Subject::Device {
                client: format!("{p}dev"),
                code: format!("dev-{index}"),
            });
        }

        // Under admission pressure one replica gets a burst of distinct calls early on, and
        // each one-time burst's first caller (a long deadline) may queue behind it: past a lease.
        let pressured = pressure.then(|| (rng.usize(..replicas), rng.f64() * horizon * 0.3));
        let deadline = |rng: &mut fastrand::Rng| {
            if rng.f64() < 0.4 {
                0.1 + rng.f64() * 0.3
            } else {
                2.5 + rng.f64() * 2.5
            }
        };
        // A burst of identical calls on `subject` from `t0`, maybe a short-deadline caller
        // joined by a long one on the same replica, maybe a rejection probe after it.
        let burst =
            |rng: &mut fastrand::Rng, actions: &mut Vec<Action>, subject: usize, t0: f64| {
                if let Some((replica, _)) = pressured
                    && rng.bool()
                {
                    actions.push(Action {
                        at: t0,
                        what: What::Call {
                            replica,
                            deadline: 6.0,
                            subject,
                            reject: false,
                        },
                    });
                }
                for _ in 0..rng.usize(2..=5) {
                    actions.push(Action {
                        at: t0 + rng.f64() * 0.6,
                        what: What::Call {
                            replica: rng.usize(..replicas),
                            deadline: deadline(rng),
                            subject,
                            reject: false,
                        },
                    });
                }
                if rng.f64() < 0.4 {
                    let replica = rng.usize(..replicas);
                    let at = t0 + rng.f64() * 0.3;
                    actions.push(Action {
                        at,
                        what: What::Call {
                            replica,
                            deadline: 0.1 + rng.f64() * 0.2,
                            subject,
                            reject: false,
                        },
                    });
                    actions.push(Action {
                        at: at + 0.02 + rng.f64() * 0.05,
                        what: What::Call {
                            replica,
                            deadline: 3.0 + rng.f64() * 2.0,
                            subject,
                            reject: false,
                        },
                    });
                }
                if rng.f64() < 0.6 {
                    actions.push(Action {
                        at: t0 + 1.5 + rng.f64() * 1.5,
                        what: What::Call {
                            replica: rng.usize(..replicas),
                            deadline: 3.0,
                            subject,
                            reject: true,
                        },
                    });
                }
            };
        for &subject in &one_time {
            let t0 = rng.f64() * horizon * 0.4;
            burst(&mut rng, &mut actions, subject, t0);
            let client = subjects[subject].client().to_owned();
            let mut parent = subject;
            let mut t = t0;
            for _ in 0..rng.usize(1..=2) {
                t += 1.2 + rng.f64() * 1.5;
                let child = subjects.len();
                subjects.push(Subject::RefreshOf {
                    parent,
                    client: client.clone(),
                });
                burst(&mut rng, &mut actions, child, t);
                parent = child;
            }
        }
        for (subject, s) in subjects.clone().iter().enumerate() {
            match s {
                Subject::Cc { .. } | Subject::Jwt { .. } => {
                    for _ in 0..rng.usize(1..=3) {
                        let period = 0.15 + rng.f64() * 0.45;
                        let mut t = rng.f64() * period;
                        while t < horizon {
                            actions.push(Action {
                                at: t,
                                what: What::Call {
                                    replica: rng.usize(..replicas),
                                    deadline: if rng.f64() < 0.3 {
                                        0.1 + rng.f64() * 0.3
                                    } else {
                                        2.5 + rng.f64() * 2.5
                                    },
                                    subject,
                                    reject: rng.f64() < 0.08,
                                },
                            });
                            t += period;
                        }
                    }
                }
                Subject::Password { .. } | Subject::Device { .. } => {
                    let t0 = rng.f64() * horizon * 0.6;
                    burst(&mut rng, &mut actions, subject, t0);
                }
                _ => {}
            }
        }
        if let Some((replica, t0)) = pressured {
            for i in 0..rng.usize(8..=16) {
                let subject = subjects.len();
                subjects.push(Subject::Password {
                    client: format!("{p}load"),
                    user: format!("load-{i}"),
                });
                actions.push(Action {
                    at: t0 + rng.f64() * 0.2,
                    what: What::Call {
                        replica,
                        deadline: 5.0,
                        subject,
                        reject: false,
                    },
                });
            }
        }
        if rng.bool() {
            let cached: Vec<usize> = (0..subjects.len())
                .filter(|&i| subjects[i].cached())
                .collect();
            actions.push(Action {
                at: 1.0 + rng.f64() * (horizon - 2.0),
                what: What::Revoke {
                    replica: rng.usize(..replicas),
                    subject: cached[rng.usize(..cached.len())],
                },
            });
        }
        let mut used = Vec::new();
        for _ in 0..rng.usize(0..=2) {
            let replica = rng.usize(..replicas);
            let kind = match rng.usize(0..4) {
                0 if !used.contains(&replica) => FaultKind::Pause(replica),
                1 if !used.contains(&replica) => FaultKind::Kill(replica),
                2 => FaultKind::RedisDown,
                _ => FaultKind::RedisSlow(if rng.f64() < 0.3 {
                    0.03
                } else {
                    0.1 + rng.f64() * 0.4
                }),
            };
            if let FaultKind::Pause(r) | FaultKind::Kill(r) = kind {
                used.push(r);
            }
            let duration = match kind {
                FaultKind::Pause(_) => 0.5 + rng.f64() * 4.0,
                FaultKind::Kill(_) => 0.5 + rng.f64() * 2.0,
                FaultKind::RedisDown => 0.5 + rng.f64() * 2.5,
                FaultKind::RedisSlow(_) => 1.0 + rng.f64() * 2.0,
            };
            actions.push(Action {
                at: 0.3 + rng.f64() * (horizon - 1.3),
                what: What::Fault { kind, duration },
            });
        }
        actions.sort_by(|a, b| a.at.total_cmp(&b.at));
        Self {
            index,
            seed,
            script,
            pressure,
            subjects,
            actions,
        }
    }

    pub fn issued(&self) -> impl Iterator<Item = (Cred, &str)> {
        self.subjects.iter().filter_map(|s| match s {
            Subject::OneTime { kind, value, .. } => Some((*kind, value.as_str())),
            _ => None,
        })
    }
}

/// What the callers got, per subject, as the schedule runs.
#[derive(Default)]
struct Seen {
    /// Every token answer per subject: (access, refresh), in order.
    tokens: HashMap<usize, Vec<(String, String)>>,
    /// The refresh token a RefreshOf subject sends, once resolved.
    resolved: HashMap<usize, String>,
}

struct Ctx {
    plan: Plan,
    seen: Mutex<Seen>,
    calls: Mutex<Vec<CallRec>>,
    faults: Mutex<Vec<Fault>>,
    next_id: std::sync::atomic::AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs `plan` on the fleet and returns its calls and faults; the fleet is whole again (every
/// replica running and joined, Redis up and fast) when it returns.
pub async fn run(
    fleet: Arc<Fleet>,
    plan: Plan,
    first_call_id: usize,
) -> (Vec<CallRec>, Vec<Fault>) {
    for (kind, value) in plan.issued() {
        fleet.upstream.issue(kind, value);
    }
    fleet.upstream.set_script(plan.script.clone(), plan.seed);
    let ctx = Arc::new(Ctx {
        plan,
        seen: Mutex::default(),
        calls: Mutex::default(),
        faults: Mutex::default(),
        next_id: first_call_id.into(),
    });
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for action in ctx.plan.actions.clone() {
        let ctx = ctx.clone();
        let fleet = fleet.clone();
        tasks.spawn(async move {
            tokio::time::sleep_until(start + Duration::from_secs_f64(action.at)).await;
            act(&fleet, &ctx, action.what).await;
        });
    }
    while tasks.join_next().await.is_some() {}
    fleet.proxy.set_delay(Duration::ZERO);
    fleet.redis_restart().await;
    for index in 0..fleet.replicas() {
        fleet.resume(index).await;
        fleet.restart(index).await;
    }
    fleet.wait_healthy().await;
    let calls = std::mem::take(&mut *lock(&ctx.calls));
    let faults = std::mem::take(&mut *lock(&ctx.faults));
    (calls, faults)
}

async fn act(fleet: &Fleet, ctx: &Ctx, what: What) {
    let clock = fleet.clock;
    match what {
        What::Fault { kind, duration } => {
            let start = clock.now();
            match kind {
                FaultKind::Pause(r) => fleet.pause(r).await,
                FaultKind::Kill(r) => fleet.kill(r).await,
                FaultKind::RedisDown => fleet.redis_kill().await,
                FaultKind::RedisSlow(d) => fleet.proxy.set_delay(Duration::from_secs_f64(d)),
            }
            tokio::time::sleep(Duration::from_secs_f64(duration)).await;
            match kind {
                FaultKind::Pause(r) => fleet.resume(r).await,
                FaultKind::Kill(r) => fleet.restart(r).await,
                FaultKind::RedisDown => fleet.redis_restart().await,
                FaultKind::RedisSlow(_) => fleet.proxy.set_delay(Duration::ZERO),
            }
            lock(&ctx.faults).push(Fault {
                kind,
                start,
                end: clock.now(),
            });
        }
        What::Revoke { replica, subject } => {
            let Some(token) = lock(&ctx.seen)
                .tokens
                .get(&subject)
                .and_then(|t| t.last())
                .map(|(a, _)| a.clone())
            else {
                return;
            };
            let s = &ctx.plan.subjects[subject];
            let request = RevokeTokenRequest {
                token: token.clone(),
                client_id: s.client().to_owned(),
                client_assertion: None,
            };
            let deadline = 3.0;
            let id = ctx
                .next_id
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let sent = clock.now();
            let outcome = match fleet.client(replica) {
                None => down(),
                Some(mut client) => {
                    let mut request = tonic::Request::new(request);
                    request.set_timeout(Duration::from_secs_f64(deadline));
                    let answer = tokio::time::timeout(
                        Duration::from_secs_f64(deadline + GRACE),
                        client.revoke_token(request),
                    )
                    .await;
                    match answer {
                        Err(_) => Outcome::NoAnswer,
                        Ok(Ok(_)) => Outcome::Ok {
                            access: String::new(),
                            refresh: String::new(),
                            expires_in: 0.0,
                            source: 0,
                        },
                        Ok(Err(status)) => classify(&status),
                    }
                }
            };
            lock(&ctx.calls).push(CallRec {
                id,
                replica,
                kind: CallKind::Revoke,
                subject: subject_name(ctx, subject),
                grant: s.grant(),
                client: s.client().to_owned(),
                user: s.user(),
                credential: None,
                cached: s.cached(),
                rejected: None,
                revoked: Some(token),
                deadline,
                sent,
                received: clock.now(),
                outcome,
            });
        }
        What::Call {
            replica,
            deadline,
            subject,
            reject,
        } => {
            let s = ctx.plan.subjects[subject].clone();
            let (grant, credential) = {
                let mut seen = lock(&ctx.seen);
                match &s {
                    Subject::OneTime { kind, value, .. } => {
                        let grant = match kind {
                            Cred::Code => Grant::AuthorizationCode(AuthorizationCodeGrant {
                                code: value.clone(),
                                redirect_uri: "https://app.example/cb".into(),
                                code_verifier: String::new(),
                            }),
                            Cred::Otp => Grant::Otp(OtpGrant {
                                code: value.clone(),
                            }),
                            _ => Grant::IvrPin(IvrPinGrant {
                                ivr_pin: value.clone(),
                            }),
                        };
                        (grant, Some((*kind, value.clone())))
                    }
                    Subject::RefreshOf { parent, .. } => {
                        let token = match seen.resolved.get(&subject) {
                            Some(t) => t.clone(),
                            None => {
                                let Some(t) = seen
                                    .tokens
                                    .get(parent)
                                    .and_then(|t| t.first())
                                    .map(|(_, r)| r.clone())
                                    .filter(|r| !r.is_empty())
                                else {
                                    return; // the parent never got a token: nothing to refresh
                                };
                                seen.resolved.insert(subject, t.clone());
                                t
                            }
                        };
                        (
                            Grant::RefreshToken(RefreshTokenGrant {
                                refresh_token: token.clone(),
                            }),
                            Some((Cred::Refresh, token)),
                        )
                    }
                    Subject::Cc { account, .. } => (
                        Grant::ClientCredentials(ClientCredentialsGrant {
                            subject: Some(CcSubject::AccountId(account.clone())),
                        }),
                        None,
                    ),
                    Subject::Jwt { sub, .. } => (
                        Grant::JwtBearer(JwtBearerGrant {
                            assertion: jwt_for(sub),
                        }),
                        None,
                    ),
                    Subject::Password { user, .. } => (
                        Grant::Password(PasswordGrant {
                            username: user.clone(),
                            password: "pw-ok".into(),
                            ..Default::default()
                        }),
                        None,
                    ),
                    Subject::Device { code, .. } => (
                        Grant::DeviceCode(DeviceCodeGrant {
                            device_code: code.clone(),
                        }),
                        None,
                    ),
                }
            };
            let rejected = if reject {
                let last = lock(&ctx.seen)
                    .tokens
                    .get(&subject)
                    .and_then(|t| t.last())
                    .map(|(a, _)| a.clone());
                match last {
                    Some(t) => Some(t),
                    None => return, // nothing to reject yet
                }
            } else {
                None
            };
            let request = GetTokenRequest {
                grant: Some(grant),
                client_id: s.client().to_owned(),
                scopes: vec!["ReadAccounts".into()],
                rejected_access_token: rejected.clone().unwrap_or_default(),
                ..Default::default()
            };
            let id = ctx
                .next_id
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let sent = clock.now();
            let outcome = match fleet.client(replica) {
                None => down(),
                Some(mut client) => {
                    let mut request = tonic::Request::new(request);
                    request.set_timeout(Duration::from_secs_f64(deadline));
                    let answer = tokio::time::timeout(
                        Duration::from_secs_f64(deadline + GRACE),
                        client.get_token(request),
                    )
                    .await;
                    match answer {
                        Err(_) => Outcome::NoAnswer,
                        Ok(Ok(response)) => {
                            let r = response.into_inner();
                            let expires_in = r
                                .expires_in
                                .map(|d| d.seconds as f64 + f64::from(d.nanos) / 1e9)
                                .unwrap_or(0.0);
                            Outcome::Ok {
                                access: r.access_token,
                                refresh: r.refresh_token,
                                expires_in,
                                source: r.source,
                            }
                        }
                        Ok(Err(status)) => classify(&status),
                    }
                }
            };
            let received = clock.now();
            if let Outcome::Ok {
                access, refresh, ..
            } = &outcome
            {
                lock(&ctx.seen)
                    .tokens
                    .entry(subject)
                    .or_default()
                    .push((access.clone(), refresh.clone()));
            }
            lock(&ctx.calls).push(CallRec {
                id,
                replica,
                kind: CallKind::Get,
                subject: subject_name(ctx, subject),
                grant: s.grant(),
                client: s.client().to_owned(),
                user: match &credential {
                    Some((Cred::Refresh, rt)) => Some(crate::record::session_user(rt)),
                    _ => s.user(),
                },
                credential,
                cached: s.cached(),
                rejected,
                revoked: None,
                deadline,
                sent,
                received,
                outcome,
            });
        }
    }
}

fn subject_name(ctx: &Ctx, subject: usize) -> String {
    let kind = match &ctx.plan.subjects[subject] {
        Subject::OneTime {
            kind: Cred::Code, ..
        } => "code",
        Subject::OneTime {
            kind: Cred::Otp, ..
        } => "otp",
        Subject::OneTime { .. } => "pin",
        Subject::RefreshOf { .. } => "refresh",
        Subject::Cc { .. } => "cc",
        Subject::Jwt { .. } => "jwt",
        Subject::Password { .. } => "password",
        Subject::Device { .. } => "device",
    };
    format!("s{}/{kind}-{subject}", ctx.plan.index)
}

/// A call to a replica that is down (killed, not yet started again).
fn down() -> Outcome {
    Outcome::Err {
        code: tonic::Code::Unavailable,
        reason: "REPLICA_DOWN".into(),
        retry: None,
        message: "the replica is down (killed by the campaign)".into(),
    }
}

fn classify(status: &tonic::Status) -> Outcome {
    // tonic's client enforces the grpc-timeout it sends: its own timer reads as CANCELLED
    // "Timeout expired". That is the caller's deadline passing, not the server's answer.
    if status.code() == tonic::Code::Cancelled && status.message().contains("Timeout expired") {
        return Outcome::ClientDeadline;
    }
    let details = status.get_error_details();
    Outcome::Err {
        code: status.code(),
        reason: details
            .error_info()
            .map(|i| i.reason.clone())
            .unwrap_or_default(),
        retry: details
            .retry_info()
            .and_then(|r| r.retry_delay)
            .map(|d| d.as_secs_f64()),
        message: status.message().to_owned(),
    }
}
