//! The scripted upstream: a token endpoint on 127.0.0.1 that behaves like RingCentral (or
//! oidc-provider with rotation) where the invariants care, misbehaves as the schedule's
//! [`Script`] says, and logs every POST ([`PostRec`]) and every access token's life
//! ([`TokenRec`]).
//!
//! - Authorization codes, OTPs and IVR PINs are issued by the campaign ([`Upstream::issue`])
//!   and are good once; a second use is `400 invalid_grant`.
//! - Refresh tokens rotate: each use spends it (a reused one is `invalid_grant`) and ends the
//!   access token it was issued with, at that moment ("calls with it then get 401").
//! - client_credentials, jwt_bearer, password and device_code are answered normally.
//! - Revoke POSTs end an access token or spend a refresh token.
//!
//! Plain HTTP/1.1 over `tokio::net` rather than a hyper server: the script must be able to
//! reset a connection (SO_LINGER 0, an RST) and to see a sender hang up while it waits, which
//! hyper hides. The requests are reqwest's (Content-Length bodies, keep-alive).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::record::{Clock, Cred, EndCause, PostRec, TokenRec, UpAnswer};

pub const REVOKE_PATH: &str = "/restapi/oauth/revoke";
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
pub const DEVICE_CODE: &str = "urn:ietf:params:oauth:grant-type:device_code";
const MAX_REQUEST: usize = 256 * 1024;

/// The `expires_in` values that probe I3: larger than any clock can add.
pub const ABSURD: [&str; 3] = ["9.3e18", "18446744073709551615", "1e300"];

/// How the upstream behaves during one schedule.
#[derive(Clone, Debug)]
pub struct Script {
    /// `expires_in` of every access token (s).
    pub lifetime: u64,
    /// Answer delay, uniform in this range (s).
    pub delay: (f64, f64),
    pub p429: f64,
    pub p5xx: f64,
    /// Answer after `slow` (past the replicas' request timeout).
    pub p_slow: f64,
    pub slow: f64,
    pub p_reset: f64,
    /// An absurd `expires_in` on a token answer.
    pub p_absurd: f64,
    /// Retry-After of a 429, uniform in this range (whole s).
    pub retry_after: (u64, u64),
}

impl Script {
    pub fn quiet(lifetime: u64) -> Self {
        Self {
            lifetime,
            delay: (0.01, 0.05),
            p429: 0.0,
            p5xx: 0.0,
            p_slow: 0.0,
            slow: 2.5,
            p_reset: 0.0,
            p_absurd: 0.0,
            retry_after: (1, 2),
        }
    }
}

struct RefreshRec {
    access: String,
    spent: bool,
    user: Option<String>,
    kept: bool,
}

struct State {
    script: Script,
    rng: fastrand::Rng,
    counter: u64,
    posts: Vec<PostRec>,
    tokens: HashMap<String, TokenRec>,
    refresh: HashMap<String, RefreshRec>,
    /// Codes, OTPs and PINs issued, and whether spent.
    one_time: HashMap<String, (Cred, bool)>,
}

/// The running upstream; cheap to clone.
#[derive(Clone)]
pub struct Upstream {
    state: Arc<Mutex<State>>,
    clock: Clock,
    addr: SocketAddr,
    /// Grants cached by tokengate: their refresh tokens are kept, never given to callers.
    cached_grants: Arc<Vec<String>>,
}

/// What one POST will get, decided on arrival.
enum Plan {
    Answer {
        status: u16,
        body: String,
        extra: String,
    },
    Reset,
}

impl Upstream {
    pub async fn start(clock: Clock, cached_grants: Vec<String>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        let upstream = Self {
            state: Arc::new(Mutex::new(State {
                script: Script::quiet(10),
                rng: fastrand::Rng::with_seed(0),
                counter: 0,
                posts: Vec::new(),
                tokens: HashMap::new(),
                refresh: HashMap::new(),
                one_time: HashMap::new(),
            })),
            clock,
            addr,
            cached_grants: Arc::new(cached_grants),
        };
        let server = upstream.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let server = server.clone();
                tokio::spawn(async move { server.connection(stream).await });
            }
        });
        upstream
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The script for the next schedule, with the seed of its random choices.
    pub fn set_script(&self, script: Script, seed: u64) {
        let mut state = self.lock();
        state.script = script;
        state.rng = fastrand::Rng::with_seed(seed);
    }

    /// Issues a one-time credential (good once).
    pub fn issue(&self, kind: Cred, value: &str) {
        self.lock().one_time.insert(value.to_owned(), (kind, false));
    }

    /// Every POST so far and every token's life.
    pub fn snapshot(&self) -> (Vec<PostRec>, HashMap<String, TokenRec>) {
        let state = self.lock();
        (state.posts.clone(), state.tokens.clone())
    }

    async fn connection(self, mut stream: TcpStream) {
        let mut buf = Vec::new();
        loop {
            let Some((path, form)) = read_request(&mut stream, &mut buf).await else {
                return;
            };
            let arrived = self.clock.now();
            let (plan, delay, index) = self.decide(arrived, &path, form);
            let Plan::Answer {
                status,
                body,
                extra,
            } = plan
            else {
                let _ = stream.set_zero_linger();
                return;
            };
            // Wait, watching for the sender to hang up (its timeout or its caller's deadline).
            let wait = tokio::time::sleep(Duration::from_secs_f64(delay));
            tokio::pin!(wait);
            let mut abandoned = false;
            let mut chunk = [0u8; 4096];
            loop {
                tokio::select! {
                    _ = &mut wait => break,
                    read = stream.read(&mut chunk) => match read {
                        Ok(0) | Err(_) => { abandoned = true; break; }
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    },
                }
            }
            if abandoned {
                self.lock().posts[index].abandoned = true;
                return;
            }
            let text = match status {
                200 => "OK",
                400 => "Bad Request",
                429 => "Too Many Requests",
                503 => "Service Unavailable",
                _ => "Internal Server Error",
            };
            let response = format!(
                "HTTP/1.1 {status} {text}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n{body}",
                body.len()
            );
            if stream.write_all(response.as_bytes()).await.is_err() {
                self.lock().posts[index].abandoned = true;
                return;
            }
            let written = self.clock.now();
            let mut state = self.lock();
            let state = &mut *state;
            let post = &mut state.posts[index];
            post.written = Some(written);
            // A token's life counts from when its answer left: the sender cannot know better.
            if let UpAnswer::Token { access, .. } = &post.answer
                && let Some(token) = state.tokens.get_mut(access)
            {
                token.expiry += written - token.birth;
                token.birth = written;
            }
        }
    }

    /// Decides the answer, applies it to the state (spends, rotates, ends tokens) and logs
    /// the POST; returns the plan, the delay before answering, and the log index.
    fn decide(&self, arrived: f64, path: &str, form: Vec<(String, String)>) -> (Plan, f64, usize) {
        let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let mut state = self.lock();
        let state = &mut *state;
        let script = state.script.clone();
        let grant_type = field("grant_type").unwrap_or_default();
        let client = field("client_id").unwrap_or_default();
        let revoke = path == REVOKE_PATH;
        let mut record = PostRec {
            id: state.posts.len(),
            arrived,
            written: None,
            abandoned: false,
            delay: 0.0,
            revoke,
            grant_type: if revoke {
                "revoke".into()
            } else {
                grant_type.clone()
            },
            client: client.clone(),
            user: None,
            credential: None,
            kept: false,
            answer: UpAnswer::Reset,
        };
        let rng = &mut state.rng;
        let mut delay = script.delay.0 + rng.f64() * (script.delay.1 - script.delay.0).max(0.0);

        if revoke {
            let token = field("token").unwrap_or_default();
            if let Some(t) = state.tokens.get_mut(&token) {
                if t.ended.is_none() {
                    t.ended = Some((arrived, EndCause::Revoke));
                }
            } else if let Some(r) = state.refresh.get_mut(&token) {
                r.spent = true;
            }
            record.answer = UpAnswer::Revoked;
            record.delay = delay;
            let index = record.id;
            state.posts.push(record);
            return (
                Plan::Answer {
                    status: 200,
                    body: "{}".into(),
                    extra: String::new(),
                },
                delay,
                index,
            );
        }

        // The credential and the user, as tokengate would key its penalty.
        let credential = match grant_type.as_str() {
            "authorization_code" => field("code").map(|c| (Cred::Code, c)),
            "otp" => field("code").map(|c| (Cred::Otp, c)),
            "ivr_pin" => field("ivr_pin").map(|c| (Cred::Pin, c)),
            "refresh_token" => field("refresh_token").map(|c| (Cred::Refresh, c)),
            _ => None,
        };
        record.user = match grant_type.as_str() {
            "password" => field("username"),
            JWT_BEARER => field("assertion").and_then(|a| jwt_subject(&a)),
            // A kept refresh token acts for the user of the grant that got it; any other
            // refresh (or a kept one of a grant without a user) for its own session.
            "refresh_token" => credential.as_ref().map(|(_, rt)| {
                state
                    .refresh
                    .get(rt)
                    .filter(|r| r.kept)
                    .and_then(|r| r.user.clone())
                    .unwrap_or_else(|| crate::record::session_user(rt))
            }),
            _ => None,
        };
        if let Some((Cred::Refresh, rt)) = &credential {
            record.kept = state.refresh.get(rt).is_some_and(|r| r.kept);
        }
        record.credential = credential.clone();

        // The script's misbehaviour, decided before anything is spent.
        let roll = rng.f64();
        let reset_below = script.p_reset;
        let limited_below = reset_below + script.p429;
        let failed_below = limited_below + script.p5xx;
        let slow_below = failed_below + script.p_slow;
        let plan_fault = if roll < reset_below {
            Some(Plan::Reset)
        } else if roll < limited_below {
            let secs = rng.u64(script.retry_after.0..=script.retry_after.1);
            record.answer = UpAnswer::RateLimited(secs);
            Some(Plan::Answer {
                status: 429,
                body: r#"{"errorCode":"CMN-301","message":"Request rate exceeded","errors":[{"errorCode":"CMN-301","message":"Request rate exceeded"}]}"#.into(),
                extra: format!("Retry-After: {secs}\r\n"),
            })
        } else if roll < failed_below {
            let status = if rng.bool() { 503 } else { 500 };
            record.answer = UpAnswer::ServerError(status);
            Some(Plan::Answer {
                status,
                body: r#"{"errors":[{"errorCode":"CMN-211","message":"Service temporarily unavailable"}]}"#.into(),
                extra: String::new(),
            })
        } else {
            if roll < slow_below {
                // Processed now (the credential is spent), answered too late to be seen.
                delay = script.slow;
            }
            None
        };
        let absurd = rng.f64() < script.p_absurd;
        let absurd_value = ABSURD[rng.usize(..ABSURD.len())];

        let plan = match plan_fault {
            Some(plan) => plan,
            None => {
                // Is the grant good?
                let refusal = match &credential {
                    Some((Cred::Refresh, rt)) => match state.refresh.get_mut(rt) {
                        Some(r) if !r.spent => {
                            r.spent = true;
                            let access = r.access.clone();
                            if let Some(t) = state.tokens.get_mut(&access)
                                && t.ended.is_none()
                            {
                                t.ended = Some((arrived, EndCause::Refresh(rt.clone())));
                            }
                            None
                        }
                        _ => Some("invalid_grant"),
                    },
                    Some((_, value)) => match state.one_time.get_mut(value) {
                        Some((_, spent)) if !*spent => {
                            *spent = true;
                            None
                        }
                        _ => Some("invalid_grant"),
                    },
                    None if grant_type == "password"
                        && field("password").as_deref() != Some("pw-ok") =>
                    {
                        Some("invalid_grant")
                    }
                    None => None,
                };
                match refusal {
                    Some(error) => {
                        record.answer = UpAnswer::OAuth(error.into());
                        Plan::Answer {
                            status: 400,
                            body: format!(
                                r#"{{"error":"{error}","error_description":"scripted","errors":[{{"errorCode":"OAU-140","message":"scripted"}}]}}"#
                            ),
                            extra: String::new(),
                        }
                    }
                    None => {
                        state.counter += 1;
                        let n = state.counter;
                        let salt = state.rng.u64(..);
                        let access = format!("at-{n}-{salt:016x}");
                        let refresh = format!("rt-{n}-{salt:016x}");
                        let (expires_in, expiry) = if absurd {
                            (absurd_value.to_owned(), f64::INFINITY)
                        } else {
                            (
                                script.lifetime.to_string(),
                                arrived + script.lifetime as f64,
                            )
                        };
                        let kept = if grant_type == "refresh_token" {
                            record.kept
                        } else {
                            self.cached_grants.contains(&grant_type)
                        };
                        state.tokens.insert(
                            access.clone(),
                            TokenRec {
                                birth: arrived,
                                expiry,
                                ended: None,
                                client: client.clone(),
                            },
                        );
                        state.refresh.insert(
                            refresh.clone(),
                            RefreshRec {
                                access: access.clone(),
                                spent: false,
                                user: record.user.clone(),
                                kept,
                            },
                        );
                        record.answer = UpAnswer::Token {
                            access: access.clone(),
                            refresh: refresh.clone(),
                            expires_in: expires_in.clone(),
                        };
                        Plan::Answer {
                            status: 200,
                            body: format!(
                                r#"{{"access_token":"{access}","token_type":"bearer","expires_in":{expires_in},"refresh_token":"{refresh}","refresh_token_expires_in":604800,"scope":"ReadAccounts","owner_id":"1"}}"#
                            ),
                            extra: String::new(),
                        }
                    }
                }
            }
        };
        record.delay = delay;
        let index = record.id;
        state.posts.push(record);
        (plan, delay, index)
    }
}

/// The `sub` of an unsigned JWT (the campaign's assertions are not signed).
fn jwt_subject(assertion: &str) -> Option<String> {
    let payload = assertion.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    value["sub"].as_str().map(str::to_owned)
}

/// An unsigned JWT for `sub`.
pub fn jwt_for(sub: &str) -> String {
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.sig",
        engine.encode(br#"{"alg":"none"}"#),
        engine.encode(format!(r#"{{"sub":"{sub}"}}"#))
    )
}

/// Reads one request (head and Content-Length body) from `stream`, keeping what follows in
/// `buf`; none at the end of the connection or on anything malformed.
async fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Option<(String, Vec<(String, String)>)> {
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_REQUEST {
            return None;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let path = head.split_whitespace().nth(1)?.to_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    if length > MAX_REQUEST {
        return None;
    }
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[head_end..head_end + length].to_vec();
    buf.drain(..head_end + length);
    let form = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    Some((path, form))
}
