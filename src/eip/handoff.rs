//! Handing an Elastic IP from the instance that holds it to a newer one, so that no connection
//! through the address breaks and the address is never without a holder. The protocol, its
//! timings and its stuck states are in docs/handoff.md; in short:
//!
//! 1. The requester (a newer instance of the same address, e.g. the next fleet) writes
//!    [`HANDOFF_TO`] on the address instead of taking it, and waits with `/health` failing.
//! 2. The holder sees the request at its next check. When its turn comes (at most
//!    `eip.handoffs_at_once` addresses of the address set at once, in a fixed order), it writes
//!    [`HANDOFF`] `draining`, fails `/health` so Route 53 stops announcing the address, keeps
//!    serving for `lifecycle.drain_delay`, waits for its connections up to
//!    `lifecycle.grace_period`, resets those still open, and moves the address to the requester
//!    itself. Then it stops accepting.
//! 3. The requester takes the address itself when the holder does not answer, stops refreshing
//!    its progress, misses the move time it announced, or is not running.
//!
//! Tags have no compare-and-set and are eventually consistent: every decision is either a
//! single writer's (one holder per address, one requester in line), or ordered by values all
//! instances read alike (drain start time, then slot, then allocation id), and each write is
//! read back after [`SETTLE`] before it is acted on.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use super::aws::{AddressView, InstanceView};
use super::claim::{Instance, Report};
use super::error::ClaimError;
use super::{Eip, State};
use crate::config::EipConfig;

/// Written by the requester: `<instance id> <asked at> <refreshed at>` (unix seconds). The
/// requester refreshes it while it still wants the address and its backend is healthy: a
/// holder moves the address only on a fresh request.
pub const HANDOFF_TO: &str = "static-ingress:handoff-to";
/// Written by the holder: `<queued|draining> <holder id> <started> <updated> <move by>`, times in
/// unix seconds.
pub const HANDOFF: &str = "static-ingress:handoff";
/// On every address of a fleet's set (the addresses stack sets it): which addresses take turns.
pub const ADDRESS_SET: &str = "static-ingress:address-set";
/// The address's place in the set (1, 2, ...): the order of turns started in the same second.
pub const SLOT: &str = "static-ingress:slot";

/// How often a holder refreshes its progress tag while queued or draining.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// A progress tag not refreshed for this long belongs to a holder that is gone.
pub const STALE: Duration = Duration::from_secs(30);
/// How long past the move time a draining holder announced the requester still waits.
pub const MOVE_MARGIN: Duration = Duration::from_secs(30);
/// How long after its own write a holder reads the address set again before acting on it:
/// EC2's reads usually catch up within a second, and tag times are whole seconds.
pub const SETTLE: Duration = Duration::from_secs(3);
/// How often a requester reads the address (a holder with a request waiting for its turn
/// reads it every 2 x POLL).
pub const POLL: Duration = Duration::from_secs(1);
/// How long a requester reuses what DescribeInstances said.
const INSTANCES_FRESH: Duration = Duration::from_secs(5);
/// A time this far in another instance's future is from a clock that is wrong: not trusted.
const FUTURE_SLACK: u64 = 5;
/// Slack added to a holder's announced move time for the move itself.
const MOVE_SLACK: Duration = Duration::from_secs(10);

/// Seconds since the epoch, the unit of every time in the tags.
pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A requester's ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub to: String,
    pub at: u64,
    pub updated: u64,
}

/// An EC2 instance id: `i-` and 8 or 17 hexadecimal digits.
pub fn is_instance_id(id: &str) -> bool {
    id.strip_prefix("i-").is_some_and(|hex| matches!(hex.len(), 8 | 17) && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl Request {
    pub fn parse(value: &str) -> Option<Request> {
        let mut parts = value.split_whitespace();
        let to = parts.next().filter(|id| is_instance_id(id))?.to_string();
        let at = parts.next()?.parse().ok()?;
        let updated = parts.next()?.parse().ok()?;
        parts.next().is_none().then_some(Request { to, at, updated })
    }

    pub fn value(&self) -> String {
        format!("{} {} {}", self.to, self.at, self.updated)
    }

    /// Refreshed recently enough: its requester still wants the address.
    pub fn fresh(&self, now: u64) -> bool {
        now <= self.updated.saturating_add(STALE.as_secs())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Seen the request; waiting for its turn, still serving and healthy.
    Queued,
    /// Failing `/health`, draining, and moving the address by `move_by`.
    Draining,
    /// Written by the new holder once it has the address: the turn stays taken until
    /// `move_by`, so that Route 53 counts the address healthy again before the next one drains.
    Settling,
}

/// A holder's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub phase: Phase,
    pub holder: String,
    pub started: u64,
    pub updated: u64,
    pub move_by: u64,
}

impl Progress {
    pub fn parse(value: &str) -> Option<Progress> {
        let parts: Vec<&str> = value.split_whitespace().collect();
        let [phase, holder, started, updated, move_by] = parts.as_slice() else {
            return None;
        };
        let phase = match *phase {
            "queued" => Phase::Queued,
            "draining" => Phase::Draining,
            "settling" => Phase::Settling,
            _ => return None,
        };
        Some(Progress {
            phase,
            holder: holder.to_string(),
            started: started.parse().ok()?,
            updated: updated.parse().ok()?,
            move_by: move_by.parse().ok()?,
        })
    }

    pub fn value(&self) -> String {
        let phase = match self.phase {
            Phase::Queued => "queued",
            Phase::Draining => "draining",
            Phase::Settling => "settling",
        };
        format!("{phase} {} {} {} {}", self.holder, self.started, self.updated, self.move_by)
    }

    /// Refreshed recently enough to be a live holder's.
    pub fn fresh(&self, now: u64) -> bool {
        now <= self.updated.saturating_add(STALE.as_secs())
    }
}

/// The serving side a holder drains. The server implements it; tests can too.
pub trait Serving: Send + Sync {
    /// While `Some`, `/health` fails with this reason (and the proxy counts as draining).
    fn set_handoff(&self, why: Option<String>);
    /// `/health` fails with this reason, not draining: the address went to `to`.
    fn handed_off(&self, to: &str);
    /// Whether this instance could serve the address now (its backend checks pass): a
    /// requester asks, and keeps asking, only then.
    fn ready(&self) -> bool;
    fn open_connections(&self) -> usize;
    /// Resets the connections open now; later ones are served.
    fn cut_open(&self);
}

/// The holder's part of the drain: the same settings as a SIGTERM drain.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub drain_delay: Duration,
    pub grace_period: Duration,
}

/// One address of the set draining now, for the turn order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub allocation: String,
    pub slot: Option<u64>,
    pub started: u64,
}

impl Turn {
    fn key(&self) -> (u64, u64, &str) {
        (self.started, self.slot.unwrap_or(u64::MAX), &self.allocation)
    }
}

/// The other addresses of the set whose holder is draining them now: a fresh `draining` tag,
/// written by the instance that still holds the address, not past its move time.
pub fn draining(set: &[(String, AddressView)], mine: &str, now: u64) -> Vec<Turn> {
    set.iter()
        .filter(|(allocation, _)| allocation != mine)
        .filter_map(|(allocation, view)| {
            let p = view.tag(HANDOFF).and_then(Progress::parse)?;
            let holds = view.instance_id.as_deref() == Some(p.holder.as_str()) && p.updated <= now + FUTURE_SLACK;
            let live = match p.phase {
                Phase::Draining => holds && p.fresh(now) && now <= p.move_by.saturating_add(MOVE_MARGIN.as_secs()),
                // Written by the old holder just before the move, for the new one, and by the
                // new one after it: live until `move_by` whoever holds the address then.
                Phase::Settling => now <= p.move_by,
                Phase::Queued => false,
            };
            live.then(|| Turn { allocation: allocation.clone(), slot: slot(view), started: p.started })
        })
        .collect()
}

/// Whether `me` may drain: fewer than `at_once` of the draining addresses come before it.
pub fn my_turn(me: &Turn, others: &[Turn], at_once: usize) -> bool {
    others.iter().filter(|o| o.key() < me.key()).count() < at_once
}

fn slot(view: &AddressView) -> Option<u64> {
    view.tag(SLOT).and_then(|s| s.trim().parse().ok())
}

fn running(v: &InstanceView) -> bool {
    v.state == "running"
}

/// Whether this instance should ask `owner` rather than take the address from it: it is
/// older than us and running. `None` when EC2 does not list it (then it is taken).
pub async fn should_ask(instance: &Instance, owner: &str, deadline: Instant) -> Result<bool, ClaimError> {
    let seen = instance.instances(&[instance.instance_id.as_str(), owner], deadline).await?;
    let find = |id: &str| seen.iter().find(|v| v.rank.instance_id == id);
    Ok(match (find(&instance.instance_id), find(owner)) {
        (Some(mine), Some(theirs)) => running(theirs) && theirs.rank.newer_than(&mine.rank).is_none(),
        _ => false,
    })
}

/// Asks the holder for the address and waits until it is ours, handed over or taken (see the
/// module's rules). Returns the claim's result; a newer instance holding the address ends the
/// wait with [`ClaimError::HeldByNewer`].
pub async fn request(
    instance: &Instance,
    config: &EipConfig,
    eip: &Eip,
    serving: &Arc<dyn Serving>,
) -> Result<Report, ClaimError> {
    let me = instance.instance_id.as_str();
    let ack_bound = config.check_interval.saturating_mul(3) + STALE;
    // When the holder last showed it is alive (our ask, or a fresh progress tag from it): a
    // silent holder is taken from `ack_bound` after that.
    let mut heard: Option<u64> = None;
    // When the holder began draining for us, which keeps our place in the turn order.
    let mut drain_started: Option<u64> = None;
    let mut cached: Option<(Instant, Vec<String>, Vec<InstanceView>)> = None;
    let mut logged: Option<String> = None;
    let mut say = |what: String, owner: &str| {
        if logged.as_deref() != Some(what.as_str()) {
            tracing::info!(allocation = %instance.allocation_id, holder = owner, "Elastic IP handoff: {what}");
            logged = Some(what);
        }
    };
    loop {
        let deadline = Instant::now() + config.deadline;
        let view = instance.describe(deadline).await?;
        let Some(owner) = view.instance_id.clone() else {
            return take(instance, config, "the address is free", deadline).await;
        };
        if owner == me {
            // Handed over: the holder confirmed the move; the claim confirms it again. The turn
            // stays taken while Route 53 comes to count the address healthy again.
            let report = instance.claim(false, deadline).await?;
            settle(instance, config, drain_started.unwrap_or_else(now_secs), deadline).await;
            return Ok(report);
        }
        let request = view.tag(HANDOFF_TO).and_then(Request::parse);
        let ids = [me, owner.as_str()];
        // Ranks never change and a state change can wait a few seconds: one DescribeInstances
        // per INSTANCES_FRESH, not per poll.
        let seen = match &cached {
            Some((at, for_ids, seen)) if at.elapsed() < INSTANCES_FRESH && *for_ids == ids => seen.clone(),
            _ => {
                let seen = instance.instances(&ids, deadline).await?;
                cached = Some((Instant::now(), ids.iter().map(|s| s.to_string()).collect(), seen.clone()));
                seen
            }
        };
        let find = |id: &str| seen.iter().find(|v| v.rank.instance_id == id);
        let Some(mine) = find(me) else {
            // EC2 does not list us yet: the claim's own rules (and errors) apply.
            return take(instance, config, "this instance is not listed by EC2 yet", deadline).await;
        };
        let holder = match find(&owner) {
            None => {
                return take(instance, config, &format!("the holder {owner} is not listed by EC2"), deadline).await;
            }
            Some(h) if !running(h) => {
                return take(instance, config, &format!("the holder {owner} is {}", h.state), deadline).await;
            }
            Some(h) => h,
        };
        if let Some(why) = holder.rank.newer_than(&mine.rank) {
            return Err(held_by_newer(instance, &owner, why));
        }
        if let Some(r) = request.as_ref().filter(|r| r.to != me && r.fresh(now_secs()))
            && let Some(other) = instance.instance(&r.to, deadline).await?.filter(running)
            && other.rank.newer_than(&mine.rank).is_some()
        {
            // A newer instance is in line for this address: it is not ours to ask for. Wait,
            // quietly, until it has the address (then the claim's rule leaves it there) or is
            // gone (then we ask).
            say(format!("{} is in line for the address; yielding to it", r.to), &owner);
            eip.update(|s| {
                s.state = State::Lost;
                s.owner = Some(r.to.clone());
                s.error = Some(format!("a newer instance, {}, is in line for the address", r.to));
                s.last_check = Some(SystemTime::now());
            });
            tokio::time::sleep(config.check_interval).await;
            continue;
        }
        let now = now_secs();
        if !serving.ready() {
            // Asking would make the holder drain for an instance that cannot serve: wait. A
            // request we wrote earlier goes stale and the holder keeps the address.
            say("waiting for a healthy backend before asking for the address".to_string(), &owner);
            eip.update(|s| {
                s.state = State::Requesting;
                s.owner = Some(owner.clone());
                s.error = Some("waiting for a healthy backend before asking for the address".into());
                s.last_check = Some(SystemTime::now());
            });
            heard = None;
            tokio::time::sleep(POLL.min(config.check_interval)).await;
            continue;
        }
        match &request {
            Some(r) if r.to == me && now < r.updated + HEARTBEAT.as_secs() => {
                heard.get_or_insert(r.updated.min(now));
            }
            Some(r) if r.to == me => {
                // Still wanted: refresh, keeping the time of the first ask.
                let ask = Request { to: me.to_string(), at: r.at, updated: now };
                instance.tag_address(&[(HANDOFF_TO, ask.value())], deadline).await?;
                heard.get_or_insert(now);
            }
            _ => {
                let ask = Request { to: me.to_string(), at: now, updated: now };
                instance.tag_address(&[(HANDOFF_TO, ask.value())], deadline).await?;
                heard = Some(now);
                say(format!("asked {owner} to hand the address over"), &owner);
            }
        }
        let progress = view.tag(HANDOFF).and_then(Progress::parse).filter(|p| p.holder == owner && p.fresh(now));
        if progress.is_some() {
            heard = Some(now);
        }
        let heard_at = heard.unwrap_or(now);
        let mut soon = false;
        let waiting = match progress {
            Some(p) if p.phase == Phase::Draining && now > p.move_by.saturating_add(MOVE_MARGIN.as_secs()) => {
                let why = format!("the holder {owner} did not move it by the time it announced");
                return take(instance, config, &why, deadline).await;
            }
            Some(p) if p.phase == Phase::Draining => {
                drain_started = Some(p.started);
                soon = now + 10 >= p.move_by;
                say(format!("{owner} is draining and will move it by {}", when(p.move_by)), &owner);
                format!("{owner} is draining; it moves the address by {}", when(p.move_by))
            }
            Some(_) => {
                say(format!("{owner} is waiting for its turn"), &owner);
                format!("{owner} is waiting for its turn (at most {} addresses at once)", config.handoffs_at_once)
            }
            None if now >= heard_at.saturating_add(ack_bound.as_secs()) => {
                let why =
                    format!("the holder {owner} did not answer the handoff request within {}s", ack_bound.as_secs());
                return take(instance, config, &why, deadline).await;
            }
            None => format!("asked {owner}; waiting for its answer"),
        };
        eip.update(|s| {
            s.state = State::Requesting;
            s.owner = Some(owner.clone());
            s.error = Some(waiting);
            s.last_check = Some(SystemTime::now());
        });
        // Every second when the move is near; the rest of the wait, every HEARTBEAT.
        let pause = if soon { POLL } else { HEARTBEAT };
        tokio::time::sleep(pause.min(config.check_interval)).await;
    }
}

/// A unix time as an operator reads it.
fn when(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// Marks the address ours and settling: the turn stays taken until Route 53 has had
/// `eip.handoff_announce_delay` to announce it again; the request is emptied.
async fn settle(instance: &Instance, config: &EipConfig, started: u64, deadline: Instant) {
    let now = now_secs();
    let settling = Progress {
        phase: Phase::Settling,
        holder: instance.instance_id.clone(),
        started,
        updated: now,
        move_by: now + config.handoff_announce_delay.as_secs(),
    };
    let tags = [(HANDOFF_TO, String::new()), (HANDOFF, settling.value())];
    if let Err(e) = instance.tag_address(&tags, deadline).await {
        tracing::warn!(error = %e, "could not mark the address as settling (the next handoff may start early)");
    }
}

fn held_by_newer(instance: &Instance, owner: &str, why: super::newer::Newer) -> ClaimError {
    ClaimError::HeldByNewer {
        allocation: instance.allocation_id.clone(),
        instance: instance.instance_id.clone(),
        owner: owner.to_string(),
        why,
    }
}

/// Takes the address as a claim does, saying why the handoff was skipped. It was out of
/// Route 53 (or dark) until now: the turn stays taken while it is announced again.
async fn take(instance: &Instance, config: &EipConfig, why: &str, deadline: Instant) -> Result<Report, ClaimError> {
    tracing::warn!(allocation = %instance.allocation_id, reason = why, "Elastic IP handoff skipped: taking the address");
    let report = instance.claim(false, deadline).await?;
    settle(instance, config, now_secs(), deadline).await;
    Ok(report)
}

/// What the holder did with a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer {
    /// Not a request to act on (from an older instance, or one not running).
    Declined,
    /// Waiting for its turn: check again soon.
    Queued,
    /// Drained but could not move the address: serving again as before.
    Abandoned,
    /// The address is the requester's now.
    HandedOff,
}

/// The holder's side, called at a check that found a request for an address we hold.
pub async fn offer(
    instance: &Instance,
    config: &EipConfig,
    timing: Timing,
    serving: &Arc<dyn Serving>,
    eip: &Eip,
    view: &AddressView,
    request: &Request,
) -> Result<Offer, ClaimError> {
    let me = instance.instance_id.as_str();
    let deadline = Instant::now() + config.deadline.min(config.check_interval.max(SETTLE * 4));
    if !request.fresh(now_secs()) {
        // Its requester stopped asking (gone, or its backend is unhealthy).
        return Ok(Offer::Declined);
    }
    // Looked up on its own: an id EC2 has forgotten must not fail the lookup of ours.
    let (Some(mine), Some(requester)) =
        (instance.instance(me, deadline).await?, instance.instance(&request.to, deadline).await?)
    else {
        return Ok(Offer::Declined);
    };
    if !running(&requester) || requester.rank.newer_than(&mine.rank).is_none() {
        return Ok(Offer::Declined);
    }
    let now = now_secs();
    let me_turn = |started| Turn { allocation: instance.allocation_id.clone(), slot: slot(view), started };
    let set = view.tag(ADDRESS_SET).map(str::to_string);
    let others = match &set {
        Some(set) => draining(&instance.describe_set(set, deadline).await?, &instance.allocation_id, now),
        None => Vec::new(),
    };
    let queued = |started: u64| Progress {
        phase: Phase::Queued,
        holder: me.to_string(),
        started,
        updated: now_secs(),
        move_by: 0,
    };
    if !my_turn(&me_turn(now), &others, config.handoffs_at_once) {
        let ours = view.tag(HANDOFF).and_then(Progress::parse).filter(|p| p.holder == me && p.phase == Phase::Queued);
        if ours.as_ref().is_none_or(|p| now >= p.updated + HEARTBEAT.as_secs()) {
            let started = ours.map_or(now, |p| p.started);
            instance.tag_address(&[(HANDOFF, queued(started).value())], deadline).await?;
        }
        let ahead: Vec<&str> = others.iter().map(|t| t.allocation.as_str()).collect();
        eip.update(|s| {
            s.error =
                Some(format!("{} asked for the address; waiting for its turn behind {}", request.to, ahead.join(", ")))
        });
        return Ok(Offer::Queued);
    }
    // Claim the turn, then read the set again: another address that claimed it at the same
    // moment is ordered against ours by values both of us read alike.
    let budget = timing.drain_delay + timing.grace_period + MOVE_SLACK;
    let mut progress = Progress {
        phase: Phase::Draining,
        holder: me.to_string(),
        started: now,
        updated: now,
        move_by: now + budget.as_secs(),
    };
    instance.tag_address(&[(HANDOFF, progress.value())], deadline).await?;
    if let Some(set) = &set {
        tokio::time::sleep(SETTLE).await;
        let deadline = Instant::now() + config.deadline.min(config.check_interval.max(SETTLE * 4));
        let others = draining(&instance.describe_set(set, deadline).await?, &instance.allocation_id, now_secs());
        if !my_turn(&me_turn(now), &others, config.handoffs_at_once) {
            instance.tag_address(&[(HANDOFF, queued(now).value())], deadline).await?;
            return Ok(Offer::Queued);
        }
    }
    hand_off(instance, config, timing, serving, eip, &request.to, &mut progress).await
}

/// Drains and moves the address to `to`.
async fn hand_off(
    instance: &Instance,
    config: &EipConfig,
    timing: Timing,
    serving: &Arc<dyn Serving>,
    eip: &Eip,
    to: &str,
    progress: &mut Progress,
) -> Result<Offer, ClaimError> {
    let allocation = instance.allocation_id.as_str();
    let started = Instant::now();
    eip.update(|s| {
        s.state = State::HandingOff;
        s.owner = Some(to.to_string());
        s.error = None;
    });
    serving.set_handoff(Some(format!("handing the Elastic IP over to {to}")));
    tracing::info!(%allocation, to, drain_delay = ?timing.drain_delay, grace_period = ?timing.grace_period,
        move_by = %when(progress.move_by),
        "Elastic IP handoff: draining (/health answers 503, still serving), then moving the address to {to}");
    let drain = async {
        tokio::time::sleep(timing.drain_delay).await;
        let idle_by = Instant::now() + timing.grace_period;
        while serving.open_connections() > 0 && Instant::now() < idle_by {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let heartbeat = async {
        loop {
            tokio::time::sleep(HEARTBEAT).await;
            progress.updated = now_secs();
            let deadline = Instant::now() + HEARTBEAT;
            if let Err(e) = instance.tag_address(&[(HANDOFF, progress.value())], deadline).await {
                tracing::warn!(error = %e, "could not refresh the handoff progress tag; retrying");
            }
        }
    };
    tokio::select! {
        () = drain => {}
        () = heartbeat => {}
    }
    let deadline = Instant::now() + config.deadline;
    // Before moving: is the requester still there, and still the one asking? Any failure from
    // here on serves again as before (abandon) rather than leave /health failing.
    let checked = async {
        let view = instance.describe(deadline).await?;
        let asked = view.tag(HANDOFF_TO).and_then(Request::parse);
        let still_asked = asked.as_ref().is_some_and(|r| r.to == to && r.fresh(now_secs()));
        let still_ours = view.instance_id.as_deref() == Some(instance.instance_id.as_str());
        let alive = instance.instance(to, deadline).await?.is_some_and(|v| running(&v));
        Ok::<_, ClaimError>(if !still_ours {
            Some("the address is no longer ours")
        } else if !alive {
            Some("the requester is no longer running")
        } else if !still_asked {
            Some("the request was withdrawn, replaced, or not refreshed")
        } else {
            None
        })
    };
    match checked.await {
        Ok(None) => {}
        Ok(Some(why)) => return abandon(instance, serving, eip, why, deadline).await,
        Err(e) => {
            tracing::error!(error = %e, %allocation, to, "Elastic IP handoff: the check before the move failed");
            return abandon(instance, serving, eip, "the check before the move failed", deadline).await;
        }
    }
    // The turn passes to the new holder with the address: it counts until Route 53 has had
    // the announce delay after the move (the new holder writes it again once it sees the move).
    let settling = Progress {
        phase: Phase::Settling,
        holder: to.to_string(),
        started: progress.started,
        updated: now_secs(),
        move_by: now_secs() + (config.handoff_announce_delay + MOVE_SLACK).as_secs(),
    };
    if let Err(e) = instance.tag_address(&[(HANDOFF, settling.value())], deadline).await {
        tracing::warn!(error = %e, "could not mark the address as settling before the move");
    }
    let open = serving.open_connections();
    serving.cut_open();
    let moved = instance.give(to, deadline).await;
    if let Err(e) = moved {
        tracing::error!(error = %e, %allocation, to, "Elastic IP handoff: moving the address failed; keeping it and serving");
        return abandon(instance, serving, eip, "moving the address failed", deadline).await;
    }
    // Connections accepted between the cut and the move would break silently: cut them too.
    serving.cut_open();
    // Still accepting, though nothing reaches it now: if the new holder goes away (a release
    // rolled back by deleting the new stack), the watch takes the address back and serves.
    serving.handed_off(to);
    eip.update(|s| {
        s.state = State::HandedOff;
        s.owner = Some(to.to_string());
        s.last_check = Some(SystemTime::now());
        s.error = None;
    });
    tracing::info!(%allocation, to, cut = open, seconds = started.elapsed().as_secs_f64(),
        "Elastic IP handed over to {to}; this instance stays ready to take it back if {to} goes away");
    Ok(Offer::HandedOff)
}

async fn abandon(
    instance: &Instance,
    serving: &Arc<dyn Serving>,
    eip: &Eip,
    why: &str,
    deadline: Instant,
) -> Result<Offer, ClaimError> {
    tracing::warn!(allocation = %instance.allocation_id, reason = why, "Elastic IP handoff abandoned; serving as before");
    // The request too: a requester that still wants the address asks again.
    if let Err(e) = instance.tag_address(&[(HANDOFF, String::new()), (HANDOFF_TO, String::new())], deadline).await {
        tracing::warn!(error = %e, "could not clear the handoff tags");
    }
    serving.set_handoff(None);
    eip.update(|s| {
        s.state = State::Associated;
        s.owner = None;
        s.error = Some(format!("handoff abandoned: {why}"));
    });
    Ok(Offer::Abandoned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(owner: Option<&str>, tags: &[(&str, &str)]) -> AddressView {
        AddressView {
            public_ip: None,
            instance_id: owner.map(str::to_string),
            association_id: None,
            tags: tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    #[test]
    fn tag_values_read_back_what_was_written_and_refuse_anything_else() {
        let r = Request { to: "i-0123456789abcdef0".into(), at: 1_700_000_000, updated: 1_700_000_005 };
        assert_eq!(Request::parse(&r.value()), Some(r));
        assert!(Request::parse("i-0123abcd 1 2").is_some(), "the old 8-digit ids");
        for bad in
            ["", "i-0123abcd", "i-0123abcd 1", "x-0123abcd 1 2", "i-0123abcd soon 2", "i-0123abcd 1 2 3", "i-xyz 1 2"]
        {
            assert_eq!(Request::parse(bad), None, "{bad:?}");
        }
        let p = Progress { phase: Phase::Draining, holder: "i-1".into(), started: 10, updated: 12, move_by: 250 };
        assert_eq!(Progress::parse(&p.value()), Some(p));
        for bad in ["", "draining i-1 1 2", "resting i-1 1 2 3", "queued i-1 1 2 x"] {
            assert_eq!(Progress::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn only_live_drains_by_the_holder_count_and_turns_go_by_start_then_slot() {
        let now = 1000;
        let draining_by = |holder: &str, started: u64, updated: u64, move_by: u64| {
            Progress { phase: Phase::Draining, holder: holder.into(), started, updated, move_by }.value()
        };
        let live = draining_by("i-a", 990, 998, 1200);
        let stale = draining_by("i-b", 900, 960, 1200);
        let overdue = draining_by("i-c", 700, 999, 960);
        let moved = draining_by("i-d", 995, 999, 1200);
        let queued =
            Progress { phase: Phase::Queued, holder: "i-e".into(), started: 1, updated: 999, move_by: 0 }.value();
        // Handed over and waiting for Route 53 to announce it again: no heartbeat, ends at move_by.
        let settling =
            Progress { phase: Phase::Settling, holder: "i-f".into(), started: 980, updated: 960, move_by: 1010 }
                .value();
        let settled =
            Progress { phase: Phase::Settling, holder: "i-g".into(), started: 970, updated: 960, move_by: 999 }.value();
        let set = vec![
            ("eipalloc-a".to_string(), view(Some("i-a"), &[(HANDOFF, &live), (SLOT, "3")])),
            ("eipalloc-b".to_string(), view(Some("i-b"), &[(HANDOFF, &stale)])),
            ("eipalloc-c".to_string(), view(Some("i-c"), &[(HANDOFF, &overdue)])),
            // Already moved to the requester: the tag is left over, the drain is over.
            ("eipalloc-d".to_string(), view(Some("i-new"), &[(HANDOFF, &moved)])),
            ("eipalloc-e".to_string(), view(Some("i-e"), &[(HANDOFF, &queued)])),
            ("eipalloc-f".to_string(), view(Some("i-f"), &[(HANDOFF, &settling)])),
            ("eipalloc-g".to_string(), view(Some("i-g"), &[(HANDOFF, &settled)])),
            ("eipalloc-me".to_string(), view(Some("i-me"), &[(HANDOFF, &draining_by("i-me", 1000, 1000, 1200))])),
        ];
        let others = draining(&set, "eipalloc-me", now);
        assert_eq!(
            others,
            vec![
                Turn { allocation: "eipalloc-a".into(), slot: Some(3), started: 990 },
                Turn { allocation: "eipalloc-f".into(), slot: None, started: 980 },
            ]
        );
        let others = &others[..1];

        let me = |started, slot| Turn { allocation: "eipalloc-me".into(), slot, started };
        // Started later than the live drain: one at a time waits, two at a time goes.
        assert!(!my_turn(&me(1000, Some(1)), others, 1));
        assert!(my_turn(&me(1000, Some(1)), others, 2));
        // Started in the same second: the slot decides, and both sides agree.
        let a = Turn { allocation: "eipalloc-a".into(), slot: Some(3), started: 990 };
        let b = me(990, Some(1));
        assert!(my_turn(&b, std::slice::from_ref(&a), 1));
        assert!(!my_turn(&a, std::slice::from_ref(&b), 1));
        // No slot tags: the allocation id decides.
        let (x, y) = (
            Turn { allocation: "eipalloc-x".into(), slot: None, started: 5 },
            Turn { allocation: "eipalloc-y".into(), slot: None, started: 5 },
        );
        assert_ne!(my_turn(&x, std::slice::from_ref(&y), 1), my_turn(&y, std::slice::from_ref(&x), 1));
    }
}
