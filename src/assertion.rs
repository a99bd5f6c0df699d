//! Client assertions that tokengate signs itself (RFC 7523 §2.2): `private_key_jwt` with an
//! RS256, ES256 or PS256 key from a PEM file, and `client_secret_jwt` with HS256.
//!
//! Each request gets a fresh assertion: iss = sub = client_id, aud = the token endpoint (or
//! the configured audience), a short exp and a unique jti. Key files are re-read when they
//! change, so a rotated Kubernetes Secret takes effect without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};

use crate::metrics::{KeyReload, Metrics};

/// How long a signed assertion is valid. Short: it is used at once, and RFC 7523 asks the
/// server to reject expired ones.
pub const ASSERTION_LIFETIME: Duration = Duration::from_secs(60);

/// How often key files are checked for changes.
pub const KEY_RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// JWS algorithms tokengate signs client assertions with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SigningAlg {
    RS256,
    ES256,
    PS256,
    HS256,
}

impl SigningAlg {
    fn jws(self) -> Algorithm {
        match self {
            Self::RS256 => Algorithm::RS256,
            Self::ES256 => Algorithm::ES256,
            Self::PS256 => Algorithm::PS256,
            Self::HS256 => Algorithm::HS256,
        }
    }

    /// Whether the algorithm signs with a private key (as opposed to a shared secret).
    pub fn uses_private_key(self) -> bool {
        !matches!(self, Self::HS256)
    }
}

/// Why a PEM private key cannot sign for its algorithm.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("HS256 signs with the client secret, not a key file")]
    SharedSecret,
    #[error("not a {alg:?} private key in PEM form ({source})")]
    NotPem {
        alg: SigningAlg,
        source: jsonwebtoken::errors::Error,
    },
    /// It parsed, but cannot sign: e.g. a P-384 key for ES256.
    #[error("the key cannot sign {alg:?}: {source}")]
    CannotSign {
        alg: SigningAlg,
        source: jsonwebtoken::errors::Error,
    },
}

/// Why a `private_key_file` cannot be used; config validation prints it as its reason.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read private_key_file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("private_key_file {}: {source}", path.display())]
    Key { path: PathBuf, source: KeyError },
}

/// A client assertion that could not be signed. Cloned with the call failure that holds it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot sign the client assertion: {0}")]
pub struct SignError(#[source] jsonwebtoken::errors::Error);

/// Reads and parses a PEM private key for `alg`, refusing keys of the wrong type.
pub fn load_private_key(path: &Path, alg: SigningAlg) -> Result<EncodingKey, KeyFileError> {
    let pem = std::fs::read(path).map_err(|source| KeyFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_private_key(&pem, alg).map_err(|source| KeyFileError::Key {
        path: path.to_owned(),
        source,
    })
}

fn parse_private_key(pem: &[u8], alg: SigningAlg) -> Result<EncodingKey, KeyError> {
    let key = match alg {
        SigningAlg::RS256 | SigningAlg::PS256 => EncodingKey::from_rsa_pem(pem),
        SigningAlg::ES256 => EncodingKey::from_ec_pem(pem),
        SigningAlg::HS256 => return Err(KeyError::SharedSecret),
    }
    .map_err(|source| KeyError::NotPem { alg, source })?;
    // A P-384 key parses as EC but cannot sign ES256: prove the pair works now, not per call.
    jsonwebtoken::encode(&Header::new(alg.jws()), &serde_json::json!({}), &key)
        .map_err(|source| KeyError::CannotSign { alg, source })?;
    Ok(key)
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
    jti: String,
}

/// Where the signing key comes from.
enum Key {
    /// A PEM file, re-read when its modification time or size changes.
    File {
        path: PathBuf,
        current: RwLock<(Arc<EncodingKey>, FileStamp)>,
    },
    /// The client secret, for HS256.
    Secret(EncodingKey),
}

/// What identifies one version of a key file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
}

impl FileStamp {
    fn of(metadata: &std::fs::Metadata) -> Self {
        Self {
            modified: metadata.modified().ok(),
            len: metadata.len(),
        }
    }
}

/// Signs the client assertions of one registered client.
pub struct Signer {
    client_id: String,
    alg: SigningAlg,
    key_id: Option<String>,
    audience: String,
    key: Key,
    /// Assertions signed so far: unit tests prove that shed calls sign nothing.
    #[cfg(test)]
    pub(crate) signed: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let key = match &self.key {
            Key::File { path, .. } => format!("file {}", path.display()),
            Key::Secret(_) => "client secret".to_owned(),
        };
        f.debug_struct("Signer")
            .field("client_id", &self.client_id)
            .field("alg", &self.alg)
            .field("key_id", &self.key_id)
            .field("audience", &self.audience)
            .field("key", &key)
            .finish()
    }
}

impl Signer {
    /// A `private_key_jwt` signer; reads the key file now.
    pub fn with_key_file(
        client_id: &str,
        alg: SigningAlg,
        key_id: Option<String>,
        audience: String,
        path: &Path,
    ) -> Result<Self, KeyFileError> {
        let metadata = std::fs::metadata(path).map_err(|source| KeyFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        let key = load_private_key(path, alg)?;
        let current = RwLock::new((Arc::new(key), FileStamp::of(&metadata)));
        Ok(Self {
            client_id: client_id.to_owned(),
            alg,
            key_id,
            audience,
            key: Key::File {
                path: path.to_owned(),
                current,
            },
            #[cfg(test)]
            signed: Default::default(),
        })
    }

    /// A `client_secret_jwt` signer (HS256 over the client secret).
    pub fn with_secret(
        client_id: &str,
        key_id: Option<String>,
        audience: String,
        secret: &SecretString,
    ) -> Self {
        Self {
            client_id: client_id.to_owned(),
            alg: SigningAlg::HS256,
            key_id,
            audience,
            key: Key::Secret(EncodingKey::from_secret(secret.expose_secret().as_bytes())),
            #[cfg(test)]
            signed: Default::default(),
        }
    }

    /// Signs a fresh assertion for one request.
    pub fn sign(&self) -> Result<SecretString, SignError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let claims = Claims {
            iss: &self.client_id,
            sub: &self.client_id,
            aud: &self.audience,
            iat: now,
            exp: now + ASSERTION_LIFETIME.as_secs(),
            jti: uuid::Uuid::new_v4().to_string(),
        };
        #[cfg(test)]
        self.signed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut header = Header::new(self.alg.jws());
        header.kid.clone_from(&self.key_id);
        let signed = match &self.key {
            Key::Secret(key) => jsonwebtoken::encode(&header, &claims, key),
            Key::File { current, .. } => {
                let key = current
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0
                    .clone();
                jsonwebtoken::encode(&header, &claims, &key)
            }
        };
        signed.map(SecretString::from).map_err(SignError)
    }

    /// Re-reads the key file if it changed since the last read, and says how that went
    /// (`None`: unchanged, or no key file). A file that fails to parse keeps the previous
    /// key in use, and is tried again on the next change.
    pub async fn reload_if_changed(&self) -> Option<KeyReload> {
        let Key::File { path, current } = &self.key else {
            return None;
        };
        let Ok(metadata) = tokio::fs::metadata(path).await else {
            return None;
        };
        let stamp = FileStamp::of(&metadata);
        let last = current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .1;
        if stamp == last {
            return None;
        }
        // Logged as it is: the bare reason, the path is a field of the line.
        let parsed: Result<_, Box<dyn std::error::Error + Send + Sync>> =
            match tokio::fs::read(path).await {
                Ok(pem) => parse_private_key(&pem, self.alg).map_err(Into::into),
                Err(e) => Err(e.into()),
            };
        let mut current = current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match parsed {
            Ok(key) => {
                *current = (Arc::new(key), stamp);
                tracing::info!(client_id = %self.client_id, path = %path.display(), "reloaded the signing key");
                Some(KeyReload::Ok)
            }
            Err(error) => {
                // Remember the stamp so a broken file is reported once, not every second.
                current.1 = stamp;
                tracing::warn!(client_id = %self.client_id, path = %path.display(), %error, "the changed signing key cannot be used; keeping the previous one");
                Some(KeyReload::Error)
            }
        }
    }
}

/// Reloads every signer's key file as it changes, counting each reload, until the task is
/// dropped.
pub async fn watch_keys(signers: Vec<Arc<Signer>>, metrics: Arc<Metrics>) {
    if !signers.iter().any(|s| matches!(s.key, Key::File { .. })) {
        return;
    }
    let mut tick = tokio::time::interval(KEY_RELOAD_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for signer in &signers {
            if let Some(reload) = signer.reload_if_changed().await {
                metrics.signing_key_reload(reload);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation, decode, decode_header};

    const AUD: &str = "https://platform.example/restapi/oauth/token";

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/keys")
            .join(name)
    }

    fn public(name: &str, alg: SigningAlg) -> DecodingKey {
        let pem = std::fs::read(fixture(name)).unwrap();
        match alg {
            SigningAlg::ES256 => DecodingKey::from_ec_pem(&pem).unwrap(),
            _ => DecodingKey::from_rsa_pem(&pem).unwrap(),
        }
    }

    /// Verifies signature, aud and exp, and returns the claims.
    fn verify(token: &SecretString, key: &DecodingKey, alg: SigningAlg) -> serde_json::Value {
        let mut validation = Validation::new(alg.jws());
        validation.set_audience(&[AUD]);
        validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        decode::<serde_json::Value>(token.expose_secret(), key, &validation)
            .unwrap()
            .claims
    }

    #[test]
    fn private_key_assertions_verify_and_carry_the_rfc_7523_claims() {
        for (file, public_file, alg) in [
            ("rsa-a.pem", "rsa-a.pub.pem", SigningAlg::RS256),
            ("rsa-a.pem", "rsa-a.pub.pem", SigningAlg::PS256),
            ("ec-p256.pem", "ec-p256.pub.pem", SigningAlg::ES256),
        ] {
            let signer =
                Signer::with_key_file("pk-app", alg, Some("k1".into()), AUD.into(), &fixture(file))
                    .unwrap();
            let token = signer.sign().unwrap();
            let header = decode_header(token.expose_secret()).unwrap();
            assert_eq!(header.alg, alg.jws());
            assert_eq!(header.kid.as_deref(), Some("k1"));
            let claims = verify(&token, &public(public_file, alg), alg);
            assert_eq!(claims["iss"], "pk-app");
            assert_eq!(claims["sub"], "pk-app");
            assert_eq!(claims["aud"], AUD);
            let lifetime = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
            assert_eq!(lifetime, ASSERTION_LIFETIME.as_secs());
            let again = verify(&signer.sign().unwrap(), &public(public_file, alg), alg);
            assert_ne!(
                claims["jti"], again["jti"],
                "every assertion has its own jti"
            );
        }
    }

    #[test]
    fn client_secret_assertions_are_hs256_over_the_secret() {
        let secret = SecretString::from("a-client-secret-that-is-at-least-32-bytes-long");
        let signer = Signer::with_secret("hs-app", None, AUD.into(), &secret);
        let token = signer.sign().unwrap();
        assert_eq!(
            decode_header(token.expose_secret()).unwrap().kid,
            None,
            "no kid unless configured"
        );
        let key = DecodingKey::from_secret(secret.expose_secret().as_bytes());
        let claims = verify(&token, &key, SigningAlg::HS256);
        assert_eq!(
            (claims["iss"].as_str(), claims["sub"].as_str()),
            (Some("hs-app"), Some("hs-app"))
        );
        assert!(!format!("{signer:?}").contains(secret.expose_secret()));
    }

    #[test]
    fn keys_of_the_wrong_type_are_refused_at_load() {
        let refused = |file: &str, alg| {
            load_private_key(&fixture(file), alg)
                .unwrap_err()
                .to_string()
        };
        assert!(refused("ec-p256.pem", SigningAlg::RS256).contains("RS256"));
        assert!(refused("rsa-a.pem", SigningAlg::ES256).contains("ES256"));
        assert!(
            refused("ec-p384.pem", SigningAlg::ES256).contains("ES256"),
            "P-384 cannot sign ES256"
        );
        assert!(refused("missing.pem", SigningAlg::RS256).contains("cannot read"));
        assert!(refused("README.md", SigningAlg::RS256).contains("PEM"));
    }

    #[tokio::test]
    async fn a_changed_key_file_is_used_for_the_next_assertion_and_a_broken_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        std::fs::copy(fixture("rsa-a.pem"), &path).unwrap();
        let signer =
            Signer::with_key_file("pk-app", SigningAlg::RS256, None, AUD.into(), &path).unwrap();
        let (old, new) = (
            public("rsa-a.pub.pem", SigningAlg::RS256),
            public("rsa-b.pub.pem", SigningAlg::RS256),
        );
        verify(&signer.sign().unwrap(), &old, SigningAlg::RS256);

        assert_eq!(signer.reload_if_changed().await, None, "unchanged");
        verify(&signer.sign().unwrap(), &old, SigningAlg::RS256);

        // A rotated Secret: the new key has a different size, so the stamp changes even
        // when the modification time has a coarse resolution.
        let rotated = std::fs::read_to_string(fixture("rsa-b.pem")).unwrap() + "\n";
        std::fs::write(&path, rotated).unwrap();
        assert_eq!(signer.reload_if_changed().await, Some(KeyReload::Ok));
        verify(&signer.sign().unwrap(), &new, SigningAlg::RS256);

        std::fs::write(&path, "not a key").unwrap();
        assert_eq!(signer.reload_if_changed().await, Some(KeyReload::Error));
        verify(&signer.sign().unwrap(), &new, SigningAlg::RS256);
    }
}
