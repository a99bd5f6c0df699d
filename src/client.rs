//! The client registry: which OAuth client a request speaks for, whether it may use its
//! grant, and how that client authenticates upstream (contract §3).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use secrecy::{ExposeSecret as _, SecretString};

use crate::assertion::{KeyFileError, SignError, Signer};

use crate::config::{AuthMethod, ClientsConfig};
use crate::grant::{CLIENT_ASSERTION_TYPE, FormField, GrantKind};

/// The registered clients, indexed once at start.
#[derive(Debug)]
pub struct Clients {
    allow_public: bool,
    by_id: HashMap<String, Registered>,
    default: Option<String>,
}

#[derive(Debug)]
struct Registered {
    method: Method,
    allowed_grants: Option<BTreeSet<GrantKind>>,
    allowed_callers: Option<BTreeSet<String>>,
    /// `false`: the broker passes this client's calls straight through.
    cache: bool,
}

/// The client a request speaks for, decided before anything is signed or sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resolved<'a> {
    /// The named or default client; `None` only with a caller's own assertion.
    pub client_id: Option<&'a str>,
    /// Whether the broker may cache, coalesce and replay this client's calls.
    pub caches: bool,
}

/// A registered client's method with exactly the credential it needs.
#[derive(Debug)]
enum Method {
    Basic(SecretString),
    Post(SecretString),
    None,
    /// `private_key_jwt` or `client_secret_jwt`: tokengate signs an assertion per request.
    Signed(Arc<Signer>),
}

/// How one request authenticates its client upstream.
#[derive(Debug)]
pub enum ClientAuth<'a> {
    /// `Authorization: Basic`, and `client_id` in the body.
    Basic {
        client_id: &'a str,
        secret: &'a SecretString,
    },
    /// `client_id` and `client_secret` in the body.
    Post {
        client_id: &'a str,
        secret: &'a SecretString,
    },
    /// The caller's own RFC 7523 assertion, plus `client_id` when known.
    Assertion {
        client_id: Option<&'a str>,
        assertion: &'a SecretString,
    },
    /// A public client: `client_id` in the body only.
    Public { client_id: &'a str },
    /// An assertion tokengate signed for a registered client, plus `client_id`.
    Signed {
        client_id: &'a str,
        assertion: SecretString,
    },
}

impl<'a> ClientAuth<'a> {
    /// The client id the request speaks for, if any.
    pub fn client_id(&self) -> Option<&'a str> {
        match *self {
            Self::Basic { client_id, .. }
            | Self::Post { client_id, .. }
            | Self::Public { client_id }
            | Self::Signed { client_id, .. } => Some(client_id),
            Self::Assertion { client_id, .. } => client_id,
        }
    }

    /// Whether the credentials came from the caller rather than from our config.
    pub fn from_caller(&self) -> bool {
        matches!(self, Self::Assertion { .. })
    }

    /// The Basic credentials, when this method uses the Authorization header.
    pub fn basic(&self) -> Option<(&'a str, &'a SecretString)> {
        match *self {
            Self::Basic { client_id, secret } => Some((client_id, secret)),
            _ => None,
        }
    }

    /// Appends the body fields of this authentication method.
    pub fn push_fields(&self, out: &mut Vec<FormField<'a>>) {
        match self {
            Self::Basic { client_id, .. } | Self::Public { client_id } => {
                out.push(FormField::plain("client_id", *client_id));
            }
            Self::Post { client_id, secret } => {
                out.push(FormField::plain("client_id", *client_id));
                out.push(FormField::secret("client_secret", secret));
            }
            Self::Assertion {
                client_id,
                assertion,
            } => {
                if let Some(client_id) = client_id {
                    out.push(FormField::plain("client_id", *client_id));
                }
                out.push(FormField::plain(
                    "client_assertion_type",
                    CLIENT_ASSERTION_TYPE,
                ));
                out.push(FormField::secret("client_assertion", assertion));
            }
            Self::Signed {
                client_id,
                assertion,
            } => {
                out.push(FormField::plain("client_id", *client_id));
                out.push(FormField::plain(
                    "client_assertion_type",
                    CLIENT_ASSERTION_TYPE,
                ));
                // Owned: the assertion was made for this request and lives no longer.
                out.push(FormField {
                    name: "client_assertion",
                    value: assertion.expose_secret().to_owned().into(),
                    secret: true,
                });
            }
        }
    }
}

/// Why a request's client cannot be used. Decided before anything goes upstream.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("client_id {0:?} is not registered and public clients are not allowed")]
    Unknown(String),
    #[error("no client_id was given and no default client is registered")]
    Missing,
    #[error("client {client_id:?} may not use the {grant} grant")]
    GrantNotAllowed { client_id: String, grant: GrantKind },
    #[error("caller {caller:?} may not use client {client_id:?}")]
    CallerNotAllowed { caller: String, client_id: String },
    /// The client's assertion could not be signed: a server-side fault, logged in full.
    #[error("the client assertion could not be signed")]
    Signing(SignError),
}

/// Why the registered clients cannot be indexed. Config validation refuses the same
/// settings first, with the same words.
#[derive(Debug, thiserror::Error)]
pub enum ClientsError {
    #[error("client {client_id:?}: {source}")]
    KeyFile {
        client_id: String,
        source: KeyFileError,
    },
    #[error("client {client_id:?}: auth_method {method} does not match its credentials")]
    Mismatch {
        client_id: String,
        method: &'static str,
    },
}

impl Clients {
    /// The signers whose key files should be watched for changes.
    pub fn signers(&self) -> Vec<Arc<Signer>> {
        self.by_id
            .values()
            .filter_map(|c| match &c.method {
                Method::Signed(signer) => Some(signer.clone()),
                _ => None,
            })
            .collect()
    }

    /// Indexes the validated config and loads signing keys. `token_url` is the default
    /// audience of signed assertions. Fails only where config validation already refuses.
    pub fn new(config: &ClientsConfig, token_url: &str) -> Result<Self, ClientsError> {
        let mut by_id = HashMap::with_capacity(config.registered.len());
        for c in &config.registered {
            let audience = || {
                c.assertion_audience
                    .clone()
                    .unwrap_or_else(|| token_url.to_owned())
            };
            let method = match (c.auth_method, &c.secret, &c.private_key_file) {
                (AuthMethod::ClientSecretBasic, Some(secret), _) => Method::Basic(secret.clone()),
                (AuthMethod::ClientSecretPost, Some(secret), _) => Method::Post(secret.clone()),
                (AuthMethod::None, None, _) => Method::None,
                (AuthMethod::ClientSecretJwt, Some(secret), _) => Method::Signed(Arc::new(
                    Signer::with_secret(&c.client_id, c.key_id.clone(), audience(), secret),
                )),
                (AuthMethod::PrivateKeyJwt, None, Some(path)) => {
                    let signer = Signer::with_key_file(
                        &c.client_id,
                        c.signing_alg(),
                        c.key_id.clone(),
                        audience(),
                        path,
                    )
                    .map_err(|source| ClientsError::KeyFile {
                        client_id: c.client_id.clone(),
                        source,
                    })?;
                    Method::Signed(Arc::new(signer))
                }
                (method, _, _) => {
                    return Err(ClientsError::Mismatch {
                        client_id: c.client_id.clone(),
                        method: method.as_str(),
                    });
                }
            };
            by_id.insert(
                c.client_id.clone(),
                Registered {
                    method,
                    allowed_grants: c.allowed_grants.clone(),
                    allowed_callers: c.allowed_callers.clone(),
                    cache: c.cache,
                },
            );
        }
        let default = config
            .registered
            .iter()
            .find(|c| c.default)
            .map(|c| c.client_id.clone());
        Ok(Self {
            allow_public: config.allow_public,
            by_id,
            default,
        })
    }

    /// Refuses a caller that the named (or default) client does not list in
    /// `allowed_callers`. `caller` is `None` when no callers are registered.
    pub fn authorize(
        &self,
        caller: Option<&str>,
        client_id: Option<&str>,
    ) -> Result<(), ClientError> {
        let (Some(caller), Some(client_id)) = (caller, client_id.or(self.default.as_deref()))
        else {
            return Ok(());
        };
        match self
            .by_id
            .get(client_id)
            .and_then(|c| c.allowed_callers.as_ref())
        {
            Some(allowed) if !allowed.contains(caller) => Err(ClientError::CallerNotAllowed {
                caller: caller.to_owned(),
                client_id: client_id.to_owned(),
            }),
            _ => Ok(()),
        }
    }

    /// Which client a request speaks for, and whether it may use its grant: every check
    /// of [`Clients::resolve`], without signing anything.
    pub fn check<'a>(
        &'a self,
        client_id: Option<&'a str>,
        has_assertion: bool,
        grant: Option<GrantKind>,
    ) -> Result<Resolved<'a>, ClientError> {
        let client_id = client_id.or(self.default.as_deref());
        let registered = client_id.and_then(|id| self.by_id.get(id));
        if let (Some(client), Some(grant)) = (registered, grant)
            && client
                .allowed_grants
                .as_ref()
                .is_some_and(|allowed| !allowed.contains(&grant))
        {
            return Err(ClientError::GrantNotAllowed {
                client_id: client_id.unwrap_or_default().to_owned(),
                grant,
            });
        }
        if registered.is_none() && !self.allow_public {
            return Err(match client_id {
                Some(id) => ClientError::Unknown(id.to_owned()),
                None => ClientError::Missing,
            });
        }
        if client_id.is_none() && !has_assertion {
            return Err(ClientError::Missing);
        }
        Ok(Resolved {
            client_id,
            caches: registered.is_none_or(|c| c.cache),
        })
    }

    /// Decides how a request authenticates. `grant` is `None` for revocation, which any
    /// client may ask for.
    pub fn resolve<'a>(
        &'a self,
        client_id: Option<&'a str>,
        assertion: Option<&'a SecretString>,
        grant: Option<GrantKind>,
    ) -> Result<ClientAuth<'a>, ClientError> {
        let client_id = client_id.or(self.default.as_deref());
        let registered = client_id.and_then(|id| Some((id, self.by_id.get(id)?)));
        if let (Some((id, client)), Some(grant)) = (registered, grant)
            && client
                .allowed_grants
                .as_ref()
                .is_some_and(|allowed| !allowed.contains(&grant))
        {
            return Err(ClientError::GrantNotAllowed {
                client_id: id.to_owned(),
                grant,
            });
        }
        if registered.is_none() && !self.allow_public {
            return Err(match client_id {
                Some(id) => ClientError::Unknown(id.to_owned()),
                None => ClientError::Missing,
            });
        }
        if let Some(assertion) = assertion {
            return Ok(ClientAuth::Assertion {
                client_id,
                assertion,
            });
        }
        match registered {
            Some((client_id, client)) => Ok(match &client.method {
                Method::Signed(signer) => ClientAuth::Signed {
                    client_id,
                    assertion: signer.sign().map_err(ClientError::Signing)?,
                },
                Method::Basic(secret) => ClientAuth::Basic { client_id, secret },
                Method::Post(secret) => ClientAuth::Post { client_id, secret },
                Method::None => ClientAuth::Public { client_id },
            }),
            None => client_id
                .map(|client_id| ClientAuth::Public { client_id })
                .ok_or(ClientError::Missing),
        }
    }
}

#[cfg(test)]
mod tests;
