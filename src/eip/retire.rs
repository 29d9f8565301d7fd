//! Retirement by Auto Scaling: when the instance's group decides to terminate it (a scale-in, a
//! replacement, an instance refresh), instance metadata's target lifecycle state turns
//! `Terminated` while the fleet template's termination lifecycle hook holds the instance in
//! `Terminating:Wait`. The proxy then runs the same drain as for SIGTERM (`/health` 503, keep
//! accepting for `lifecycle.drain_delay`, then up to `lifecycle.grace_period` for open
//! connections) and stays drained until the instance stops: exiting would let systemd start it
//! again, claim the address and turn healthy on an instance about to go. The hook's heartbeat
//! timeout (`RetireTimeoutSeconds`, above drain delay + grace) and its `CONTINUE` default let
//! the termination go on without a call back.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::aws::{Calls, Metadata, provider_config};
use crate::config::EipConfig;

/// The longest wait between two reads of the lifecycle state: a fraction of the drain delay,
/// and a local call.
const POLL: Duration = Duration::from_secs(5);

/// Reads the target lifecycle state every few seconds; cancels `retire` once it is
/// `Terminated`. Ends then, or at `stop`.
pub async fn watch(config: EipConfig, retire: CancellationToken, stop: CancellationToken) {
    let poll = POLL.min(config.check_interval);
    let metadata = match Metadata::new(&config, &provider_config()) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the Auto Scaling lifecycle state");
            return;
        }
    };
    let calls = Calls::default();
    let mut last: Option<Option<String>> = None;
    let mut warned = false;
    loop {
        match metadata.target_lifecycle_state(&calls).await {
            Ok(Some(state)) if state == "Terminated" => {
                tracing::warn!(lifecycle_state = %state,
                    "Auto Scaling is terminating this instance: draining before it goes (it stays drained until it stops)");
                retire.cancel();
                return;
            }
            Ok(state) => {
                if last.as_ref() != Some(&state) {
                    match &state {
                        Some(s) => tracing::info!(lifecycle_state = %s, "Auto Scaling lifecycle state"),
                        None => tracing::info!("no Auto Scaling lifecycle state in instance metadata (not in a group)"),
                    }
                    last = Some(state);
                }
                warned = false;
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %e, "cannot read the Auto Scaling lifecycle state; retrying");
                    warned = true;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(poll) => {}
            () = stop.cancelled() => return,
        }
    }
}
