//! The fleet's pub/sub channel: the listener that (re)subscribes for as long as the store
//! lives, and the notice codec (`i:<id hex>:<version>`, `p:<key hex>:<sealed end hex>`).

use std::sync::Weak;
use std::time::Duration;

use redis::{RedisError, Value};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::watch;
use tokio_stream::StreamExt as _;

use super::connection::Inner;
use super::store::Down;
use crate::keys::{Digest, Keys, Purpose};

/// Something another replica told the fleet, received over pub/sub.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// This identity's entries with a version below `version` are dead (renewed, rejected
    /// or revoked): drop such a local copy, and never put one back.
    Invalidate { id: Digest, version: u64 },
    /// A 429 penalty: `key` is the digest naming the client (and user); `until_unix_ms` is
    /// when it ends.
    Penalty { key: Digest, until_unix_ms: u64 },
    /// The pub/sub connection was lost and is back: invalidations may have been missed, so
    /// clear the whole local layer. Sent before the penalties found on that rejoin.
    Resync,
}

/// Pub/sub reconnection backoff, and how often a quiet subscription is pinged.
pub(super) const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub(super) const BACKOFF_MAX: Duration = Duration::from_secs(2);
const PUBSUB_PING_EVERY: Duration = Duration::from_secs(5);

/// The pub/sub side: subscribes, forwards notices, and on any loss reconnects with backoff,
/// for as long as the store lives.
pub(super) async fn listen(
    inner: Weak<Inner>,
    mut shutdown: watch::Receiver<()>,
    notices: UnboundedSender<Notice>,
) {
    let mut backoff = BACKOFF_MIN;
    let mut joined_before = false;
    loop {
        let (client, channel, probe, keys) = {
            let Some(inner) = inner.upgrade() else { return };
            (
                inner.factory.pubsub_client().clone(),
                inner.names.channel.clone(),
                inner.probe,
                inner.keys.clone(),
            )
        };
        let subscribe = async {
            let (mut sink, stream) = client.get_async_pubsub().await?.split();
            sink.subscribe(&channel).await?;
            Ok::<_, RedisError>((sink, stream))
        };
        let subscribed = tokio::select! {
            _ = shutdown.changed() => return,
            r = tokio::time::timeout(probe, subscribe) => r,
        };
        let (mut sink, mut stream) = match subscribed {
            Ok(Ok(pair)) => pair,
            Ok(Err(error)) => {
                tracing::debug!(kind = ?error.kind(), "redis pub/sub: cannot subscribe");
                if !sleep_or_stop(&mut shutdown, &mut backoff).await {
                    return;
                }
                continue;
            }
            Err(_) => {
                tracing::debug!("redis pub/sub: subscribing timed out");
                if !sleep_or_stop(&mut shutdown, &mut backoff).await {
                    return;
                }
                continue;
            }
        };
        if std::mem::replace(&mut joined_before, true) {
            let _ = notices.send(Notice::Resync);
        }
        // Penalties set before this subscription: the scan runs after subscribing, so one
        // set meanwhile arrives by one way or the other.
        let penalties = {
            let Some(inner) = inner.upgrade() else { return };
            inner.penalties().await
        };
        match penalties {
            Ok(found) => {
                for (key, until_unix_ms) in found {
                    let _ = notices.send(Notice::Penalty { key, until_unix_ms });
                }
            }
            Err(Down) => {
                // Start over: the next subscription scans again.
                if !sleep_or_stop(&mut shutdown, &mut backoff).await {
                    return;
                }
                continue;
            }
        }
        backoff = BACKOFF_MIN;
        let mut ping = tokio::time::interval(PUBSUB_PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                message = stream.next() => {
                    let Some(message) = message else { break };
                    if let Some(notice) = decode(&keys, message.get_payload_bytes()) {
                        let _ = notices.send(notice);
                    } else {
                        tracing::debug!("redis pub/sub: ignored a malformed notice");
                    }
                }
                _ = ping.tick() => {
                    let alive = tokio::time::timeout(probe, sink.ping::<Value>()).await;
                    if !matches!(alive, Ok(Ok(_))) {
                        break;
                    }
                }
            }
        }
        tracing::debug!("redis pub/sub: connection lost; reconnecting");
        if !sleep_or_stop(&mut shutdown, &mut backoff).await {
            return;
        }
    }
}

/// Waits out the backoff (then doubles it); `false` when the store was dropped meanwhile.
async fn sleep_or_stop(shutdown: &mut watch::Receiver<()>, backoff: &mut Duration) -> bool {
    let wait = *backoff;
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    tokio::select! {
        _ = shutdown.changed() => false,
        () = tokio::time::sleep(wait) => true,
    }
}

/// `i:<id hex>:<version>`.
pub(super) fn encode_invalidate(id: &Digest, version: u64) -> String {
    format!("i:{}:{version}", id.hex())
}

/// `p:<key hex>:<sealed end, hex>`: sealed like the stored value, so a forged notice is
/// ignored like a forged value.
pub(super) fn encode_penalty(key: &Digest, sealed: &[u8]) -> String {
    let mut out = format!("p:{}:", key.hex());
    for b in sealed {
        use std::fmt::Write as _;
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// A notice from the channel; `None` for anything malformed or that does not open.
fn decode(keys: &Keys, payload: &[u8]) -> Option<Notice> {
    let text = std::str::from_utf8(payload).ok()?;
    if let Some(rest) = text.strip_prefix("i:") {
        let (hex, version) = rest.split_once(':')?;
        // Digits only: `u64::from_str` would also take a sign.
        if version.is_empty() || !version.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        return Some(Notice::Invalidate {
            id: Digest::from_hex(hex)?,
            version: version.parse().ok()?,
        });
    }
    let (key, sealed) = text.strip_prefix("p:")?.split_once(':')?;
    let key = Digest::from_hex(key)?;
    let sealed = from_hex(sealed)?;
    let until_unix_ms = open_penalty(keys, &key, &sealed)?;
    Some(Notice::Penalty { key, until_unix_ms })
}

pub(super) fn open_penalty(keys: &Keys, key: &Digest, sealed: &[u8]) -> Option<u64> {
    let plain = keys.open(Purpose::Penalty, key, sealed).ok()?;
    Some(u64::from_be_bytes(plain.try_into().ok()?))
}

fn from_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CacheKey;

    fn keys(byte: u8) -> Keys {
        Keys::new(Some(&CacheKey::new(vec![byte; 32])))
    }

    #[test]
    fn notices_round_trip_and_forgeries_are_ignored() {
        let keys = keys(1);
        let id = keys.digest([b"id".as_slice()]);
        assert_eq!(
            decode(&keys, encode_invalidate(&id, 7).as_bytes()),
            Some(Notice::Invalidate { id, version: 7 })
        );
        assert_eq!(
            decode(&keys, encode_invalidate(&id, u64::MAX).as_bytes()),
            Some(Notice::Invalidate {
                id,
                version: u64::MAX
            })
        );
        assert_eq!(encode_invalidate(&id, 3), format!("i:{}:3", id.hex()));
        let sealed = keys.seal(Purpose::Penalty, &id, &42u64.to_be_bytes());
        assert_eq!(
            decode(&keys, encode_penalty(&id, &sealed).as_bytes()),
            Some(Notice::Penalty {
                key: id,
                until_unix_ms: 42
            })
        );
        let other = self::keys(2).seal(Purpose::Penalty, &id, &42u64.to_be_bytes());
        let entry = keys.seal(Purpose::Entry, &id, &42u64.to_be_bytes());
        for forged in [
            encode_penalty(&id, &other),
            encode_penalty(&id, &entry),
            format!("p:{}:42", id.hex()),
            format!("p:{}", id.hex()),
            "i:zz".to_owned(),
            "i:zz:1".to_owned(),
            format!("i:{}x", id.hex()),
            format!("i:{}x:1", id.hex()),
            // The old form, with no version: it could not say which entries are dead.
            format!("i:{}", id.hex()),
            format!("i:{}:", id.hex()),
            format!("i:{}:+1", id.hex()),
            format!("i:{}:-1", id.hex()),
            format!("i:{}:1x", id.hex()),
            format!("i:{}:1:2", id.hex()),
            format!("i:{}:18446744073709551616", id.hex()),
            "x:1".to_owned(),
            String::new(),
        ] {
            assert_eq!(decode(&keys, forged.as_bytes()), None, "{forged}");
        }
        assert_eq!(decode(&keys, b"\xff\xfe"), None);
    }
}
