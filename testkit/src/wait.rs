//! Bounded polling, for conditions nothing announces: [`until`].

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How often [`until`] checks.
const POLL: Duration = Duration::from_millis(20);

/// Checks `condition` every 20 ms until it holds; panics naming `what` after `within`.
pub async fn until<F, Fut>(what: &str, within: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !condition().await {
        assert!(Instant::now() < deadline, "waited {within:?} for {what}");
        tokio::time::sleep(POLL).await;
    }
}
