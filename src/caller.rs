//! Who is calling: the `[[callers]]` that may use tokengate, known by their mTLS identity
//! (a SAN URI or DNS name of the client certificate) or by an API key sent as
//! `authorization: Bearer <key>`, whose SHA-256 is all the config holds.

use std::collections::HashMap;

use http::HeaderMap;
use sha2::{Digest as _, Sha256};
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

use crate::config::{CallerConfig, parse_sha256};

/// The registered callers. Empty: every caller that reaches the port may call.
#[derive(Debug, Default)]
pub struct Callers {
    by_san: HashMap<String, String>,
    by_key_sha256: HashMap<[u8; 32], String>,
}

/// A caller that could not be identified while callers are registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unauthenticated;

impl Callers {
    /// Indexes validated `[[callers]]`.
    pub fn new(callers: &[CallerConfig]) -> Self {
        let mut by_san = HashMap::new();
        let mut by_key_sha256 = HashMap::new();
        for caller in callers {
            if let Some(san) = &caller.mtls_san {
                by_san.insert(san.clone(), caller.name.clone());
            }
            if let Some(digest) = caller.api_key_sha256.as_deref().and_then(parse_sha256) {
                by_key_sha256.insert(digest, caller.name.clone());
            }
        }
        Self {
            by_san,
            by_key_sha256,
        }
    }

    fn enabled(&self) -> bool {
        !self.by_san.is_empty() || !self.by_key_sha256.is_empty()
    }

    /// The caller's name; `None` when no callers are registered. `headers` are the call's
    /// HTTP/2 headers, its gRPC metadata.
    pub fn identify(
        &self,
        peer_certs: Option<&[rustls_pki_types::CertificateDer<'static>]>,
        headers: &HeaderMap,
    ) -> Result<Option<&str>, Unauthenticated> {
        if !self.enabled() {
            return Ok(None);
        }
        if let Some(leaf) = peer_certs.and_then(<[_]>::first) {
            for san in subject_alt_names(leaf) {
                if let Some(name) = self.by_san.get(&san) {
                    return Ok(Some(name));
                }
            }
        }
        let bearer = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            });
        if let Some(key) = bearer {
            let digest: [u8; 32] = Sha256::digest(key.trim().as_bytes()).into();
            if let Some(name) = self.by_key_sha256.get(&digest) {
                return Ok(Some(name));
            }
        }
        Err(Unauthenticated)
    }
}

/// The URI and DNS subject alternative names of a certificate.
fn subject_alt_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some((*uri).to_owned()),
            GeneralName::DNSName(dns) => Some((*dns).to_owned()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(name: &str, san: Option<&str>, key: Option<&str>) -> CallerConfig {
        CallerConfig {
            name: name.into(),
            mtls_san: san.map(Into::into),
            api_key_sha256: key.map(|k| {
                Sha256::digest(k.as_bytes())
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect()
            }),
        }
    }

    fn bearer(key: &str) -> HeaderMap {
        let mut metadata = HeaderMap::new();
        metadata.insert("authorization", format!("Bearer {key}").parse().unwrap());
        metadata
    }

    #[test]
    fn with_no_callers_everyone_may_call() {
        assert_eq!(
            Callers::new(&[]).identify(None, &HeaderMap::new()),
            Ok(None)
        );
    }

    #[test]
    fn an_api_key_identifies_its_caller_by_hash() {
        let callers = Callers::new(&[
            caller("billing", None, Some("k-billing")),
            caller("crm", None, Some("k-crm")),
        ]);
        assert_eq!(callers.identify(None, &bearer("k-crm")), Ok(Some("crm")));
        assert_eq!(
            callers.identify(None, &bearer("k-unknown")),
            Err(Unauthenticated)
        );
        assert_eq!(
            callers.identify(None, &HeaderMap::new()),
            Err(Unauthenticated)
        );
    }

    #[test]
    fn a_certificate_san_identifies_its_caller() {
        let spiffe = "spiffe://cluster.local/ns/billing/sa/api";
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["billing.internal".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(rcgen::SanType::URI(spiffe.try_into().unwrap()));
        let cert = params.self_signed(&key).unwrap();
        let certs = [cert.der().clone()];

        let by_uri = Callers::new(&[caller("billing", Some(spiffe), None)]);
        assert_eq!(
            by_uri.identify(Some(&certs), &HeaderMap::new()),
            Ok(Some("billing"))
        );
        let by_dns = Callers::new(&[caller("billing", Some("billing.internal"), None)]);
        assert_eq!(
            by_dns.identify(Some(&certs), &HeaderMap::new()),
            Ok(Some("billing"))
        );
        let other = Callers::new(&[caller(
            "crm",
            Some("spiffe://cluster.local/ns/crm/sa/api"),
            None,
        )]);
        assert_eq!(
            other.identify(Some(&certs), &HeaderMap::new()),
            Err(Unauthenticated)
        );
    }

    #[test]
    fn sha256_hex_is_parsed_strictly() {
        assert!(parse_sha256(&"ab".repeat(32)).is_some());
        assert!(parse_sha256(&"AB".repeat(32)).is_some());
        assert!(parse_sha256(&"ab".repeat(31)).is_none());
        assert!(parse_sha256(&"zz".repeat(32)).is_none());
    }
}
