//! The Redis side of the broker (contract §8): what a fleet shares and how it stays honest.
//! [`store`]: entries with monotonic versions, the token index, penalties; [`lease`]: leases.
//! [`connection`]: building connections (one node or a cluster, TLS), the cluster-wide scan.
//! [`notices`]: the pub/sub listener and the notice codec. [`health`]: up/down (I8) and its log.

mod connection;
mod health;
mod lease;
mod notices;
mod store;

pub use self::health::DOWN_AFTER;
pub use self::lease::Lease;
pub use self::notices::Notice;
pub use self::store::{Down, RedisStore, Stored, VERSION_TTL};
