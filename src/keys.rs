//! The broker's keys, all derived from the one cache key: an HMAC for request identities and
//! token digests, and AES-256-GCM for every stored value. Nothing the broker writes can be
//! read, or linked to a request, without the key.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::hmac;

use crate::config::CacheKey;

/// Names the key in the associated data of every sealed value.
const KEY_NAME: &[u8] = b"tokengate-cache";
/// Format of a sealed value: version byte, nonce, ciphertext and tag.
const SEAL_FORMAT: u8 = 1;

/// An HMAC-SHA256 output: a request identity, or the digest of a token or penalty key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Lower-case hex, as used in store keys.
    pub fn hex(&self) -> String {
        use std::fmt::Write as _;
        self.0.iter().fold(String::with_capacity(64), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
    }

    /// Parses [`Digest::hex`] output.
    pub fn from_hex(hex: &str) -> Option<Self> {
        crate::config::parse_sha256(hex).map(Self)
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Eight hex digits are enough to follow one identity through the logs.
        write!(f, "{}", &self.hex()[..8])
    }
}

/// What a sealed value is, bound into its associated data so that one kind can never be
/// opened as another.
#[derive(Clone, Copy, Debug)]
pub enum Purpose {
    Entry,
    Penalty,
}

impl Purpose {
    fn label(self) -> &'static [u8] {
        match self {
            Self::Entry => b"entry",
            Self::Penalty => b"penalty",
        }
    }
}

/// Why a sealed value was refused. Never says more: the value itself is not logged.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("the stored value does not open under this key")]
pub struct Unreadable;

pub struct Keys {
    identity: hmac::Key,
    seal: LessSafeKey,
    /// The key's version: a fingerprint, so values sealed under an old key are misses.
    version: [u8; 8],
}

/// Fills `bytes` from the operating system's random source. Not aws-lc's DRBG: its first
/// use seeds a CPU-jitter entropy collector, which cost 30-50 ms of start-up (measured with
/// perf), and the kernel's generator is what the keys and nonces need.
fn random(bytes: &mut [u8]) {
    getrandom::fill(bytes).expect("the operating system's random source works");
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys").finish_non_exhaustive()
    }
}

impl Keys {
    /// Derives the keys from the configured key, or from fresh random bytes (memory backend
    /// with no `key_file`: nothing outlives the process, so nothing needs a shared key).
    pub fn new(key: Option<&CacheKey>) -> Self {
        let generated;
        let material: &[u8] = match key {
            Some(key) => key.expose(),
            None => {
                let mut bytes = [0u8; 32];
                random(&mut bytes);
                generated = bytes;
                &generated
            }
        };
        let master = hmac::Key::new(hmac::HMAC_SHA256, material);
        let derive = |label: &[u8]| hmac::sign(&master, label);
        let identity = hmac::Key::new(hmac::HMAC_SHA256, derive(b"tokengate/identity/v1").as_ref());
        let seal_key = derive(b"tokengate/seal/v1");
        let seal = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, seal_key.as_ref()).expect("32 bytes is an AES-256 key"),
        );
        let mut version = [0u8; 8];
        version.copy_from_slice(&derive(b"tokengate/key-version/v1").as_ref()[..8]);
        Self {
            identity,
            seal,
            version,
        }
    }

    /// HMAC over length-prefixed parts, so no two different lists encode alike.
    pub fn digest<'a>(&self, parts: impl IntoIterator<Item = &'a [u8]>) -> Digest {
        let mut context = hmac::Context::with_key(&self.identity);
        for part in parts {
            context.update(&(part.len() as u64).to_be_bytes());
            context.update(part);
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(context.sign().as_ref());
        Digest(out)
    }

    /// The digest of a token, to find the entries that hold it without storing it.
    pub fn token_digest(&self, token: &str) -> Digest {
        self.digest([b"token".as_slice(), token.as_bytes()])
    }

    fn aad(&self, purpose: Purpose, id: &Digest) -> Vec<u8> {
        let mut aad = Vec::with_capacity(KEY_NAME.len() + 8 + 8 + 32);
        aad.extend_from_slice(KEY_NAME);
        aad.extend_from_slice(&self.version);
        aad.extend_from_slice(purpose.label());
        aad.extend_from_slice(&id.0);
        aad
    }

    /// Encrypts `plain` for the store under `id`; the result opens only under the same key,
    /// purpose and id.
    pub fn seal(&self, purpose: Purpose, id: &Digest, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        random(&mut nonce);
        let mut out = Vec::with_capacity(1 + NONCE_LEN + plain.len() + AES_256_GCM.tag_len());
        out.push(SEAL_FORMAT);
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        self.seal
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(self.aad(purpose, id)),
                &mut body,
            )
            .expect("a value under 64 GiB always seals");
        out.extend_from_slice(&body);
        out
    }

    /// Decrypts what [`Keys::seal`] made; anything else (altered, truncated, another key or
    /// another id) is [`Unreadable`].
    pub fn open(
        &self,
        purpose: Purpose,
        id: &Digest,
        sealed: &[u8],
    ) -> Result<Vec<u8>, Unreadable> {
        let [format, rest @ ..] = sealed else {
            return Err(Unreadable);
        };
        if *format != SEAL_FORMAT || rest.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(Unreadable);
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| Unreadable)?;
        let mut body = body.to_vec();
        let plain = self
            .seal
            .open_in_place(nonce, Aad::from(self.aad(purpose, id)), &mut body)
            .map_err(|_| Unreadable)?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(byte: u8) -> Keys {
        Keys::new(Some(&CacheKey::new(vec![byte; 32])))
    }

    #[test]
    fn a_sealed_value_opens_only_under_its_key_purpose_and_id() {
        let keys = keys(7);
        let id = keys.digest([b"a".as_slice()]);
        let other = keys.digest([b"b".as_slice()]);
        let sealed = keys.seal(Purpose::Entry, &id, b"the token");
        assert!(
            !sealed.windows(9).any(|w| w == b"the token"),
            "plaintext at rest"
        );
        assert_eq!(
            keys.open(Purpose::Entry, &id, &sealed).unwrap(),
            b"the token"
        );
        assert_eq!(keys.open(Purpose::Entry, &other, &sealed), Err(Unreadable));
        assert_eq!(keys.open(Purpose::Penalty, &id, &sealed), Err(Unreadable));
        assert_eq!(
            self::keys(8).open(Purpose::Entry, &id, &sealed),
            Err(Unreadable)
        );
        let mut altered = sealed.clone();
        let last = altered.len() - 1;
        altered[last] ^= 1;
        assert_eq!(keys.open(Purpose::Entry, &id, &altered), Err(Unreadable));
        for garbage in [&b""[..], b"\x01", &[1u8; 20], &sealed[..sealed.len() - 1]] {
            assert_eq!(keys.open(Purpose::Entry, &id, garbage), Err(Unreadable));
        }
    }

    #[test]
    fn digests_are_keyed_and_unambiguous() {
        let keys = keys(1);
        let ab_c = keys.digest([b"ab".as_slice(), b"c"]);
        let a_bc = keys.digest([b"a".as_slice(), b"bc"]);
        assert_ne!(ab_c, a_bc, "length prefixes keep parts apart");
        assert_eq!(ab_c, keys.digest([b"ab".as_slice(), b"c"]));
        assert_ne!(ab_c, self::keys(2).digest([b"ab".as_slice(), b"c"]));
        assert_eq!(Digest::from_hex(&ab_c.hex()), Some(ab_c));
    }

    #[test]
    fn without_a_key_file_each_process_gets_its_own_key() {
        let (a, b) = (Keys::new(None), Keys::new(None));
        assert_ne!(a.digest([b"x".as_slice()]), b.digest([b"x".as_slice()]));
    }
}
