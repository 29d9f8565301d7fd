//! Holding this instance's Elastic IP.
//!
//! Each instance of a fleet is told which allocation to hold by a tag its Auto Scaling group
//! propagates. At start it claims it (in the background: the proxy serves at once, whatever
//! the claim does), then checks every `eip.check_interval` that it still holds it. Claim and
//! check follow one rule ([`newer`]): the newer fleet holds the address. A newer fleet taking
//! it is the normal end of a deployment: it is logged once, with the reason, and shown in
//! `/status` and `static_ingress_eip_associated`, never fought over; an older instance taking
//! it, or nobody holding it, makes this instance claim it again.

pub mod aws;
pub mod claim;
pub mod error;
pub mod handoff;
pub mod newer;
pub mod retire;
pub mod unhealthy;

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use prometheus::{IntGauge, IntGaugeVec};
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::EipConfig;
use claim::{Instance, Outcome, Report};
use error::ClaimError;
use newer::Newer;

/// Where the claim stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// `eip.enabled = false`.
    Disabled,
    /// The first claim is running.
    Claiming,
    /// Confirmed associated with this instance at the last check.
    Associated,
    /// A newer instance holds it now (a newer fleet took it, or won a race for it).
    Lost,
    /// The claim failed; it is tried again every check interval.
    Failed,
    /// An older instance holds it and was asked to hand it over; waiting for it (`owner`).
    Requesting,
    /// Draining to hand it over to a newer instance (`owner`), which asked for it.
    HandingOff,
    /// Handed over to `owner`: this instance no longer accepts connections.
    HandedOff,
}

/// The claim's state as `/status` shows it.
#[derive(Debug, Clone)]
pub struct Status {
    pub state: State,
    pub allocation_id: Option<String>,
    pub public_ip: Option<String>,
    pub instance_id: Option<String>,
    /// The instance holding the address when it is not this one.
    pub owner: Option<String>,
    pub since: SystemTime,
    pub last_check: Option<SystemTime>,
    /// Why the last claim or check failed.
    pub error: Option<String>,
}

/// The shared view of the claim: written by the keeper, read by `/status` and `/metrics`.
pub struct Eip {
    status: Mutex<Status>,
    associated: IntGauge,
    /// `static_ingress_eip_state`, one child per state.
    states: [IntGauge; State::ALL.len()],
}

impl State {
    pub const ALL: [State; 8] = [
        State::Disabled,
        State::Claiming,
        State::Associated,
        State::Lost,
        State::Failed,
        State::Requesting,
        State::HandingOff,
        State::HandedOff,
    ];

    /// As `/status` and the metric's label write it.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Disabled => "disabled",
            State::Claiming => "claiming",
            State::Associated => "associated",
            State::Lost => "lost",
            State::Failed => "failed",
            State::Requesting => "requesting",
            State::HandingOff => "handing_off",
            State::HandedOff => "handed_off",
        }
    }
}

impl Eip {
    pub fn new(enabled: bool, associated: IntGauge, states: &IntGaugeVec) -> Eip {
        let state = if enabled { State::Claiming } else { State::Disabled };
        let status = Status {
            state,
            allocation_id: None,
            public_ip: None,
            instance_id: None,
            owner: None,
            since: SystemTime::now(),
            last_check: None,
            error: None,
        };
        associated.set(0);
        let states = State::ALL.map(|s| states.with_label_values(&[s.as_str()]));
        let eip = Eip { status: Mutex::new(status), associated, states };
        eip.show(state);
        eip
    }

    /// Sets the gauges to `state`.
    fn show(&self, state: State) {
        self.associated.set(i64::from(matches!(state, State::Associated | State::HandingOff)));
        for (s, g) in State::ALL.iter().zip(&self.states) {
            g.set(i64::from(*s == state));
        }
    }

    pub fn status(&self) -> Status {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies `f` to the status; returns the state before, for logging transitions once.
    fn update(&self, f: impl FnOnce(&mut Status)) -> State {
        let mut s = self.lock();
        let before = s.state;
        f(&mut s);
        if s.state != before {
            s.since = SystemTime::now();
        }
        self.show(s.state);
        before
    }
}

/// Claims the address, then watches it until `stop`, or until it has been handed over to a
/// newer instance (see [`handoff`]; `serving` is what a handoff drains).
pub async fn keep(
    config: EipConfig,
    timing: handoff::Timing,
    serving: Arc<dyn handoff::Serving>,
    eip: Arc<Eip>,
    stop: CancellationToken,
) {
    let run = async {
        let instance = claim_until_done(&config, &eip, &serving).await;
        watch(&config, timing, &serving, &eip, &instance).await;
    };
    tokio::select! {
        () = run => {}
        () = stop.cancelled() => {}
    }
}

/// One claim, discovery included, bounded by `eip.deadline` even if a call hangs. The outer
/// error is from discovery; the inner one from the claim, with the instance found.
pub async fn claim_once(
    config: &EipConfig,
    dry_run: bool,
) -> Result<(Instance, Result<Report, ClaimError>), ClaimError> {
    let deadline = Instant::now() + config.deadline;
    let attempt = async {
        let instance = Instance::discover(config, deadline).await?;
        let result = instance.claim(dry_run, deadline).await;
        Ok((instance, result))
    };
    match tokio::time::timeout_at(deadline, attempt).await {
        Ok(result) => result,
        Err(_) => Err(ClaimError::Deadline {
            action: "the claim",
            attempts: 1,
            waited: config.deadline,
            last: "instance metadata or EC2 did not answer".into(),
        }),
    }
}

/// Claims until the address is ours, or a newer instance is found to hold it (then there is
/// nothing to claim: the caller watches). A failed claim (a missing tag, a missing
/// permission...) is tried again every check interval, so fixing it needs no restart; each
/// kind of failure is logged once.
async fn claim_until_done(config: &EipConfig, eip: &Eip, serving: &Arc<dyn handoff::Serving>) -> Instance {
    let mut last_logged: Option<(u8, std::mem::Discriminant<ClaimError>)> = None;
    loop {
        let error = match first_claim(config, eip, serving).await {
            Ok((instance, result)) => match record(eip, &instance, result) {
                Ok(()) => return instance,
                Err(e) => e,
            },
            Err(e) => e,
        };
        log_failure(&error, &mut last_logged, config);
        record_failure(eip, &error);
        tokio::time::sleep(config.check_interval).await;
    }
}

/// The claim `run` makes at start: with `eip.handoff`, an address held by a running older
/// instance is asked for rather than taken.
async fn first_claim(
    config: &EipConfig,
    eip: &Eip,
    serving: &Arc<dyn handoff::Serving>,
) -> Result<(Instance, Result<Report, ClaimError>), ClaimError> {
    if !config.handoff {
        return claim_once(config, false).await;
    }
    let deadline = Instant::now() + config.deadline;
    let instance = match tokio::time::timeout_at(deadline, Instance::discover(config, deadline)).await {
        Ok(found) => found?,
        Err(_) => {
            return Err(ClaimError::Deadline {
                action: "the claim",
                attempts: 1,
                waited: config.deadline,
                last: "instance metadata or EC2 did not answer".into(),
            });
        }
    };
    let result = acquire(config, eip, serving, &instance).await;
    Ok((instance, result))
}

/// Asks for the address when a running older instance holds it, else claims it.
async fn acquire(
    config: &EipConfig,
    eip: &Eip,
    serving: &Arc<dyn handoff::Serving>,
    instance: &Instance,
) -> Result<Report, ClaimError> {
    let deadline = Instant::now() + config.deadline;
    let ask = async {
        if !config.handoff {
            return Ok(false);
        }
        let view = instance.describe(deadline).await?;
        match view.instance_id.as_deref() {
            Some(owner) if owner != instance.instance_id => handoff::should_ask(instance, owner, deadline).await,
            _ => Ok(false),
        }
    };
    let ask = match tokio::time::timeout_at(deadline, ask).await {
        Ok(ask) => ask?,
        Err(_) => false,
    };
    if ask {
        // Waits as long as the holder keeps answering; each call inside has its own deadline.
        return handoff::request(instance, config, eip, serving).await;
    }
    let deadline = Instant::now() + config.deadline;
    match tokio::time::timeout_at(deadline, instance.claim(false, deadline)).await {
        Ok(result) => result,
        Err(_) => Err(ClaimError::Deadline {
            action: "the claim",
            attempts: 1,
            waited: config.deadline,
            last: "EC2 did not answer".into(),
        }),
    }
}

/// Shows and logs a finished claim. Associated, or lost to a newer instance, is an end state;
/// any other error is handed back for the caller to retry.
fn record(eip: &Eip, instance: &Instance, result: Result<Report, ClaimError>) -> Result<(), ClaimError> {
    match result {
        Ok(report) => {
            let (imds, reads, writes) = report.calls;
            let what = match &report.outcome {
                Outcome::AlreadyOurs => "already associated with this instance",
                _ => "claimed",
            };
            tracing::info!(
                allocation = %report.allocation_id,
                public_ip = report.public_ip.as_deref().unwrap_or(""),
                instance = %report.instance_id,
                previous = report.previous.as_deref().unwrap_or(""),
                source = %report.source,
                calls.imds = imds, calls.ec2_reads = reads, calls.ec2_writes = writes,
                seconds = report.elapsed.as_secs_f64(),
                "Elastic IP {what}"
            );
            eip.update(|s| {
                s.state = State::Associated;
                s.allocation_id = Some(report.allocation_id.clone());
                s.public_ip = report.public_ip.clone();
                s.instance_id = Some(report.instance_id.clone());
                s.owner = None;
                s.last_check = Some(SystemTime::now());
                s.error = None;
            });
            Ok(())
        }
        Err(
            ref e @ (ClaimError::Lost { ref owner, ref why, .. } | ClaimError::HeldByNewer { ref owner, ref why, .. }),
        ) => {
            tracing::warn!(allocation = %instance.allocation_id, %owner, reason = %why, error = %e,
                "a newer instance holds the Elastic IP ({why}); not taking it, still serving");
            let owner = owner.clone();
            eip.update(|s| {
                s.state = State::Lost;
                s.allocation_id = Some(instance.allocation_id.clone());
                s.instance_id = Some(instance.instance_id.clone());
                s.owner = Some(owner);
                s.last_check = Some(SystemTime::now());
                s.error = None;
            });
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn log_failure(
    error: &ClaimError,
    last_logged: &mut Option<(u8, std::mem::Discriminant<ClaimError>)>,
    config: &EipConfig,
) {
    let kind = (error.exit_code(), std::mem::discriminant(error));
    if *last_logged != Some(kind) {
        tracing::error!(error = %error, exit_code = error.exit_code(), retry_in = ?config.check_interval,
            "Elastic IP claim failed; the proxy keeps serving");
        *last_logged = Some(kind);
    }
}

fn record_failure(eip: &Eip, error: &ClaimError) {
    let message = error.to_string();
    eip.update(|s| {
        s.state = State::Failed;
        s.error = Some(message);
        s.last_check = Some(SystemTime::now());
    });
}

/// Checks every interval who holds the address, and applies the claim's rule to what it finds:
/// a newer instance keeps it (logged once, with the reason), an older one or none at all means
/// this instance claims it again, so an address is never left unassociated, nor with an older
/// fleet, while this instance wants it.
async fn watch(
    config: &EipConfig,
    timing: handoff::Timing,
    serving: &Arc<dyn handoff::Serving>,
    eip: &Eip,
    instance: &Instance,
) {
    let mut warned_error = false;
    let mut last_logged = None;
    // The last other owner ranked, with the verdict: ranks do not change, so an address held
    // by a newer instance costs one DescribeAddresses per check, not a DescribeInstances too.
    let mut ranked: Option<(String, Option<Newer>)> = None;
    // A handoff request waiting for its turn is checked on more often.
    let mut pending = false;
    loop {
        let interval = if pending { (handoff::POLL * 2).min(config.check_interval) } else { config.check_interval };
        tokio::time::sleep(interval).await;
        pending = false;
        // A check must not run into the next one.
        let deadline = Instant::now() + config.deadline.min(config.check_interval);
        let checked = async {
            let view = instance.describe(deadline).await?;
            let verdict = match view.instance_id.as_deref() {
                Some(owner) if owner != instance.instance_id => match &ranked {
                    Some((seen, verdict)) if seen == owner => Some(verdict.clone()),
                    _ => Some(instance.newer(owner, deadline).await?),
                },
                _ => None,
            };
            Ok((view, verdict))
        };
        let checked = match tokio::time::timeout_at(deadline, checked).await {
            Ok(result) => result,
            Err(_) => Err(ClaimError::Deadline {
                action: "the ownership check",
                attempts: 1,
                waited: config.check_interval,
                last: "EC2 did not answer before the next check".into(),
            }),
        };
        let (view, verdict) = match checked {
            Ok(checked) => checked,
            Err(e @ ClaimError::Deadline { .. }) => {
                // EC2 slow or unreachable: keep the last known state, say so once.
                if !warned_error {
                    tracing::warn!(error = %e, "Elastic IP ownership check failed; keeping the last known state");
                    warned_error = true;
                }
                eip.update(|s| s.error = Some(e.to_string()));
                continue;
            }
            Err(e) => {
                // The allocation is gone, or the role lost its permission: the last state can
                // no longer be vouched for.
                let message = e.to_string();
                let before = eip.update(|s| {
                    s.state = State::Failed;
                    s.error = Some(message.clone());
                    s.last_check = Some(SystemTime::now());
                });
                if before != State::Failed {
                    tracing::error!(error = %message, "Elastic IP ownership check failed");
                }
                continue;
            }
        };
        warned_error = false;
        let allocation = &instance.allocation_id;
        let ip = view.public_ip.as_deref().unwrap_or("");
        match (view.instance_id.as_deref(), verdict) {
            (Some(_), None) => {
                let before = eip.update(|s| {
                    s.state = State::Associated;
                    s.owner = None;
                    s.public_ip = view.public_ip.clone();
                    s.last_check = Some(SystemTime::now());
                    s.error = None;
                });
                if before != State::Associated {
                    tracing::info!(%allocation, public_ip = ip, "Elastic IP is associated with this instance again");
                }
                let request = view.tag(handoff::HANDOFF_TO).and_then(handoff::Request::parse);
                if let Some(request) = request.filter(|r| config.handoff && r.to != instance.instance_id) {
                    match handoff::offer(instance, config, timing, serving, eip, &view, &request).await {
                        Ok(handoff::Offer::HandedOff) => ranked = None,
                        Ok(handoff::Offer::Queued) => pending = true,
                        Ok(handoff::Offer::Declined | handoff::Offer::Abandoned) => {}
                        Err(e) => {
                            // Retried at the next check; the request stays on the address.
                            tracing::warn!(error = %e, "Elastic IP handoff request could not be handled; retrying");
                            pending = true;
                        }
                    }
                }
            }
            (Some(owner), Some(Some(why))) => {
                let owner = owner.to_string();
                let before_owner = eip.status().owner;
                let before = eip.update(|s| {
                    // Handed over to this very instance: say so, rather than just "lost".
                    let handed = s.state == State::HandedOff && s.owner.as_deref() == Some(owner.as_str());
                    s.state = if handed { State::HandedOff } else { State::Lost };
                    s.owner = Some(owner.clone());
                    s.public_ip = view.public_ip.clone();
                    s.last_check = Some(SystemTime::now());
                    s.error = None;
                });
                if !matches!(before, State::Lost | State::HandedOff) || before_owner.as_deref() != Some(owner.as_str())
                {
                    tracing::warn!(%allocation, public_ip = ip, %owner, reason = %why,
                        "Elastic IP is now associated with a newer instance ({why}); this instance leaves it \
                         and keeps serving connections that still reach it");
                }
                ranked = Some((owner, Some(why)));
            }
            (owner, _) => {
                match owner {
                    Some(owner) => {
                        if config.handoff {
                            tracing::warn!(%allocation, public_ip = ip, %owner,
                                "Elastic IP is associated with an older instance; asking for it back");
                        } else {
                            tracing::warn!(%allocation, public_ip = ip, %owner,
                                "Elastic IP is associated with an older instance; taking it back");
                        }
                        ranked = Some((owner.to_string(), None));
                    }
                    None => tracing::warn!(%allocation, public_ip = ip,
                        "Elastic IP is not associated with any instance; claiming it"),
                }
                let handed_off = eip.status().state == State::HandedOff;
                let result = acquire(config, eip, serving, instance).await;
                if let Err(e) = record(eip, instance, result) {
                    log_failure(&e, &mut last_logged, config);
                    record_failure(eip, &e);
                }
                if eip.status().state == State::Associated {
                    // Ours again (after a handoff: the instance it went to is gone, a rolled
                    // back release): whatever said otherwise on /health no longer holds.
                    serving.set_handoff(None);
                    if handed_off {
                        tracing::warn!(%allocation, "took the Elastic IP back after handing it over: its new holder went away");
                    }
                }
            }
        }
    }
}
