//! Retirement by Auto Scaling: when the instance's group decides to terminate it (a scale-in, a
//! replacement, an instance refresh), instance metadata's target lifecycle state turns
//! `Terminated` while the fleet template's termination lifecycle hook holds the instance in
//! `Terminating:Wait`. The proxy then runs the same drain as for SIGTERM (`/health` 503, keep
//! accepting for `lifecycle.drain_delay`, then up to `lifecycle.grace_period` for open
//! connections) and stays drained until the instance stops: exiting would let systemd start it
//! again, claim the address and turn healthy on an instance about to go. The hook's heartbeat
//! timeout (`RetireTimeoutSeconds`, above drain delay + grace) and its `CONTINUE` default let
//! the termination go on without a call back; once drained, the proxy lets it go on at once
//! (`CompleteLifecycleAction`, [`complete`]).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::aws::{AutoScaling, Calls, Metadata, provider_config};
use crate::config::EipConfig;

/// The fleet template's termination lifecycle hook.
pub const HOOK: &str = "static-ingress-drain";

/// One call back, retries included.
const DEADLINE: Duration = Duration::from_secs(60);

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

/// Tells Auto Scaling that the drain is done, so the termination goes on now rather than when
/// the hook times out. A failure is logged: the hook's timeout and `CONTINUE` default end the
/// wait anyway.
pub async fn complete(config: &EipConfig) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let attempt = async {
        let provider = provider_config();
        let calls = Calls::default();
        let metadata = Metadata::new(config, &provider).map_err(|e| e.to_string())?;
        let me = metadata.instance_id(&calls).await.map_err(|e| e.to_string())?;
        let region = metadata.region(&calls).await.map_err(|e| e.to_string())?;
        let asg = AutoScaling::new(config, &region, &metadata, &provider).await;
        let groups = asg.groups(&calls, deadline).await.map_err(|e| e.to_string())?;
        let group = groups
            .iter()
            .find(|g| g.instances.iter().any(|i| i.id == me))
            .ok_or_else(|| format!("{me} is in no Auto Scaling group"))?;
        asg.complete_lifecycle_action(&group.name, HOOK, &me, &calls, deadline).await.map_err(|e| e.to_string())?;
        Ok::<String, String>(group.name.clone())
    };
    match tokio::time::timeout_at(deadline, attempt).await {
        Ok(Ok(group)) => tracing::info!(%group, hook = HOOK,
            "told Auto Scaling the drain is done: the termination goes on now"),
        Ok(Err(e)) => tracing::warn!(hook = HOOK, error = %e,
            "cannot complete the lifecycle action; the termination goes on when the hook times out"),
        Err(_) => {
            tracing::warn!(hook = HOOK, "Auto Scaling did not answer; the termination goes on when the hook times out")
        }
    }
}
