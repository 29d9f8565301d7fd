//! Telling the Auto Scaling group that this instance cannot serve, so that it replaces it
//! (`SetInstanceHealth`), as the 2016 design planned to with the group's health check, without
//! a load balancer.
//!
//! **The rule.** Only for reasons of the instance's own, which a new instance would not share,
//! lasting `eip.report_unhealthy_after` (5 min):
//! - the proxy keeps failing to start or to stay up: no run has served for [`CLEAN_RUN`]
//!   since the first of the failed starts (a listener that cannot be bound, a crash loop, a
//!   watchdog kill), remembered across restarts in systemd's state directory ([`Starts`]);
//! - the admin server does not answer the proxy's own `GET /live` (the watchdog restarts a
//!   process that hangs altogether; this is the admin server alone);
//! - the Elastic IP claim keeps failing, and the address was never held since the start (an
//!   instance that never got its address serves nobody).
//!
//! Never for a backend outage (every instance sees the same one: the fleet would be replaced
//! at once), a configuration error (the replacement would have the same launch template), an
//! address a newer instance holds or was handed to (that is a release), or while draining.
//!
//! **The guard**, against many instances doing it at once: an instance reports only if every
//! other instance of its fleet (the groups with the same `static-ingress:fleet` tag) is
//! `InService` and `Healthy`, and none has reported in the last [`COOLDOWN`]. A report is
//! first marked on the instance's group (tag [`REPLACING`] = `<instance id> <unix time>`); the
//! marks are read again after [`SETTLE`], and only the earliest (then the smallest instance
//! id) goes on to `SetInstanceHealth`: two instances of one group overwrite each other's mark,
//! and of two groups' marks both read the same earliest one. So a fault shared by the whole
//! fleet replaces at most one instance per 15 minutes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::aws::{AutoScaling, Calls, GroupView, Metadata, provider_config};
use super::handoff::now_secs;
use super::{Eip, State};
use crate::config::EipConfig;

/// The group tag that marks a report: `<instance id>@<unix time>` (no space: moto's signature
/// check of Auto Scaling writes fails on one).
pub const REPLACING: &str = "static-ingress:replacing";
/// The tag shared by the groups of one fleet (the fleet stack's name).
pub const FLEET: &str = "static-ingress:fleet";
/// At most one report per fleet in this long: a replacement launches, boots and proves its
/// backend well within it.
pub const COOLDOWN: Duration = Duration::from_secs(15 * 60);
/// How long the marks are left to settle before they are read again.
pub const SETTLE: Duration = Duration::from_secs(3);
/// A run that serves this long is a clean run: it clears the record of failed starts.
pub const CLEAN_RUN: Duration = Duration::from_secs(60);
/// One report, every call and retry included.
const DEADLINE: Duration = Duration::from_secs(60);
/// The self-probe of the admin server waits this long for an answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How a report ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The instance is marked unhealthy in `group`.
    Reported { group: String },
    /// The instance is in no Auto Scaling group: nobody would replace it.
    NotInGroup,
    /// The guard held the report back.
    Held(String),
}

/// A report's mark on a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    pub instance: String,
    pub at: u64,
}

impl Mark {
    pub fn parse(value: &str) -> Option<Mark> {
        let (instance, at) = value.trim().split_once('@')?;
        let at = at.parse().ok()?;
        super::handoff::is_instance_id(instance).then(|| Mark { instance: instance.to_string(), at })
    }

    pub fn value(&self) -> String {
        format!("{}@{}", self.instance, self.at)
    }

    /// Made within the cooldown of `now` (either way: clocks differ).
    fn fresh(&self, now: u64) -> bool {
        now.abs_diff(self.at) < COOLDOWN.as_secs()
    }
}

/// The groups of the fleet `me` belongs to, and the name of its own; `None` when no group has it.
pub fn fleet_of<'a>(groups: &'a [GroupView], me: &str) -> Option<(Vec<&'a GroupView>, &'a str)> {
    let mine = groups.iter().find(|g| g.instances.iter().any(|i| i.id == me))?;
    let fleet = match mine.tag(FLEET) {
        Some(fleet) => groups.iter().filter(|g| g.tag(FLEET) == Some(fleet)).collect(),
        None => vec![mine],
    };
    Some((fleet, mine.name.as_str()))
}

/// Why the guard holds a report back because of the fleet's instances: one that is not in
/// service and healthy (being launched, replaced or terminated).
pub fn others_not_serving(fleet: &[&GroupView], me: &str) -> Option<String> {
    fleet.iter().flat_map(|g| g.instances.iter().map(move |i| (g, i))).find_map(|(g, i)| {
        let serving = i.lifecycle_state == "InService" && i.health.eq_ignore_ascii_case("Healthy");
        (i.id != me && !serving).then(|| {
            format!(
                "{} of group {} is {} and {}: one instance of a fleet is replaced at a time",
                i.id, g.name, i.lifecycle_state, i.health
            )
        })
    })
}

/// The earliest fresh mark of the fleet (then the smallest instance id).
pub fn first_mark(fleet: &[&GroupView], now: u64) -> Option<(Mark, String)> {
    fleet
        .iter()
        .filter_map(|g| Some((Mark::parse(g.tag(REPLACING)?)?, g.name.clone())))
        .filter(|(m, _)| m.fresh(now))
        .min_by(|(a, _), (b, _)| (a.at, &a.instance).cmp(&(b.at, &b.instance)))
}

/// Why the guard holds a report back because of another instance's recent report.
pub fn recent_report(fleet: &[&GroupView], me: &str, now: u64) -> Option<String> {
    let (mark, group) = first_mark(fleet, now)?;
    (mark.instance != me).then(|| {
        format!(
            "{} (group {group}) reported itself unhealthy {}s ago: one report per fleet in {}",
            mark.instance,
            now.saturating_sub(mark.at),
            humantime::format_duration(COOLDOWN)
        )
    })
}

/// Reports this instance unhealthy to its Auto Scaling group, if the guard lets it. `reason`
/// goes into the log lines.
pub async fn report(config: &EipConfig, reason: &str) -> Result<Outcome, String> {
    let result = tokio::time::timeout(DEADLINE, report_within(config, Instant::now() + DEADLINE)).await;
    let outcome = match result {
        Ok(r) => r,
        Err(_) => Err(format!("Auto Scaling or instance metadata did not answer within {DEADLINE:?}")),
    };
    match &outcome {
        Ok(Outcome::Reported { group }) => tracing::error!(%group, reason,
            "reported this instance unhealthy to its Auto Scaling group, which replaces it"),
        Ok(Outcome::NotInGroup) => tracing::warn!(
            reason,
            "this instance cannot serve, but it is in no Auto Scaling group: nothing replaces it"
        ),
        Ok(Outcome::Held(why)) => tracing::warn!(reason, held_back = %why,
            "this instance cannot serve, but the guard holds back its unhealthy report"),
        Err(e) => tracing::warn!(reason, error = %e, "cannot report this instance unhealthy to Auto Scaling"),
    }
    outcome
}

async fn report_within(config: &EipConfig, deadline: Instant) -> Result<Outcome, String> {
    let provider = provider_config();
    let calls = Calls::default();
    let metadata = Metadata::new(config, &provider).map_err(|e| e.to_string())?;
    let me = metadata.instance_id(&calls).await.map_err(|e| e.to_string())?;
    let region = metadata.region(&calls).await.map_err(|e| e.to_string())?;
    let asg = AutoScaling::new(config, &region, &metadata, &provider).await;

    let groups = asg.groups(&calls, deadline).await.map_err(|e| e.to_string())?;
    let Some((fleet, mine)) = fleet_of(&groups, &me) else {
        return Ok(Outcome::NotInGroup);
    };
    let now = now_secs();
    if let Some(why) = others_not_serving(&fleet, &me).or_else(|| recent_report(&fleet, &me, now)) {
        return Ok(Outcome::Held(why));
    }
    let mark = Mark { instance: me.clone(), at: now };
    asg.tag_group(mine, REPLACING, &mark.value(), &calls, deadline).await.map_err(|e| e.to_string())?;

    tokio::time::sleep(SETTLE).await;
    let groups = asg.groups(&calls, deadline).await.map_err(|e| e.to_string())?;
    let Some((fleet, mine)) = fleet_of(&groups, &me) else {
        return Ok(Outcome::NotInGroup);
    };
    match first_mark(&fleet, now_secs()) {
        Some((first, _)) if first.instance == me => {}
        Some((first, group)) => {
            return Ok(Outcome::Held(format!("{} (group {group}) marked its report first", first.instance)));
        }
        None => return Ok(Outcome::Held(format!("the mark on group {mine} did not show within {SETTLE:?}"))),
    }
    if let Some(why) = others_not_serving(&fleet, &me) {
        return Ok(Outcome::Held(why));
    }
    asg.set_unhealthy(&me, &calls, deadline).await.map_err(|e| e.to_string())?;
    Ok(Outcome::Reported { group: mine.to_string() })
}

/// Since when the proxy has started without a clean run, kept in a file of systemd's state
/// directory (`$STATE_DIRECTORY`, from the unit's `StateDirectory=`), which outlives restarts.
pub struct Starts {
    path: PathBuf,
}

impl Starts {
    /// `None` without a state directory (outside systemd): failed starts are not counted.
    pub fn open() -> Option<Starts> {
        let dir = std::env::var_os("STATE_DIRECTORY")?;
        let first = std::env::split_paths(&dir).next()?;
        Some(Starts { path: first.join("failing-since") })
    }

    /// Records a start; returns since when starts have been failing (this start, if the last
    /// run was clean).
    pub fn started(&self, now: u64) -> u64 {
        if let Some(since) = std::fs::read_to_string(&self.path).ok().and_then(|s| s.trim().parse().ok()) {
            return since;
        }
        let tmp = self.path.with_extension("tmp");
        let written = std::fs::write(&tmp, format!("{now}\n")).and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = written {
            tracing::warn!(file = %self.path.display(), error = %e, "cannot record this start; failed starts are not counted");
        }
        now
    }

    /// A clean run (or a clean stop): the next start counts afresh.
    pub fn clean(&self) {
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %self.path.display(), error = %e, "cannot clear the record of failed starts")
            }
        }
    }
}

/// What the start found about the starts before it.
pub fn failing_starts(config: &EipConfig) -> (Option<Starts>, Option<String>) {
    if !config.enabled || config.report_unhealthy_after.is_zero() {
        return (None, None);
    }
    let Some(starts) = Starts::open() else { return (None, None) };
    let now = now_secs();
    let since = starts.started(now);
    let failing = now.saturating_sub(since);
    let reason = (failing >= config.report_unhealthy_after.as_secs()).then(|| {
        format!(
            "the proxy has not served for {} at a time since it started failing {}s ago",
            humantime::format_duration(CLEAN_RUN),
            failing
        )
    });
    (Some(starts), reason)
}

/// What the running proxy watches for a failure of its own.
#[derive(Debug, Default)]
pub struct Watch {
    admin_failing_since: Option<Instant>,
    unclaimed_since: Option<Instant>,
    held: bool,
}

impl Watch {
    /// One observation at `now`: whether the admin server answered, and the claim's state.
    /// Returns the reason to report, once one has lasted `after`.
    pub fn observe(&mut self, now: Instant, admin_ok: bool, eip: State, after: Duration) -> Option<String> {
        self.admin_failing_since = if admin_ok { None } else { self.admin_failing_since.or(Some(now)) };
        self.held |= !matches!(eip, State::Claiming | State::Failed | State::Disabled);
        // From the first failure: a claim under way is bounded by eip.deadline, and then fails.
        self.unclaimed_since = match (self.held, eip) {
            (true, _) => None,
            (false, State::Failed) => self.unclaimed_since.or(Some(now)),
            (false, _) => self.unclaimed_since,
        };
        let lasted = |since: Option<Instant>| since.is_some_and(|s| now.duration_since(s) >= after);
        if lasted(self.admin_failing_since) {
            return Some(format!(
                "the admin server has not answered GET /live for {}",
                humantime::format_duration(after)
            ));
        }
        if lasted(self.unclaimed_since) {
            return Some(format!(
                "the Elastic IP claim has kept failing for {}, and never succeeded since the start",
                humantime::format_duration(after)
            ));
        }
        None
    }
}

/// Whether the admin server answers `GET /live` with 200.
pub async fn probe(admin: SocketAddr) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(admin).await?;
        s.write_all(b"GET /live HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await?;
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).await?;
        Ok::<bool, std::io::Error>(&buf == b"HTTP/1.1 200")
    };
    matches!(tokio::time::timeout(PROBE_TIMEOUT, attempt).await, Ok(Ok(true)))
}

/// Watches the running proxy: clears the record of failed starts after a clean run, and
/// reports the instance unhealthy when a failure of its own lasts `eip.report_unhealthy_after`
/// (then again each cooldown, if the guard held it back). Nothing while `draining()`. With
/// `initial` (the starts before this one kept failing), it reports that at once.
pub async fn watch(
    config: EipConfig,
    admin: SocketAddr,
    eip: Arc<Eip>,
    starts: Option<Starts>,
    initial: Option<String>,
    draining: impl Fn() -> bool + Send + 'static,
    stop: CancellationToken,
) {
    let after = config.report_unhealthy_after;
    let poll = (after / 4).clamp(Duration::from_millis(200), Duration::from_secs(10));
    let admin = loopback(admin);
    let started = Instant::now();
    let mut starts = starts;
    let mut watch = Watch::default();
    // `None` once reported (or when nobody would replace the instance): no more reports.
    let mut next_report = Some(started);
    if let Some(reason) = initial {
        next_report = after_report(report(&config, &reason).await, after);
    }
    loop {
        tokio::select! {
            () = tokio::time::sleep(poll) => {}
            () = stop.cancelled() => return,
        }
        let admin_ok = probe(admin).await;
        let now = Instant::now();
        if admin_ok
            && now.duration_since(started) >= CLEAN_RUN.min(after)
            && let Some(s) = starts.take()
        {
            s.clean();
        }
        if draining() {
            continue;
        }
        let Some(reason) = watch.observe(now, admin_ok, eip.status().state, after) else { continue };
        if next_report.is_some_and(|at| now >= at) {
            next_report = after_report(report(&config, &reason).await, after);
        }
    }
}

/// When to report again after `outcome`: never once reported; after the cooldown when held
/// back; after `after` when the report failed.
fn after_report(outcome: Result<Outcome, String>, after: Duration) -> Option<Instant> {
    match outcome {
        Ok(Outcome::Reported { .. } | Outcome::NotInGroup) => None,
        Ok(Outcome::Held(_)) => Some(Instant::now() + COOLDOWN),
        Err(_) => Some(Instant::now() + after),
    }
}

/// Where to reach a listener bound to every address: the loopback address of its family.
fn loopback(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::from(([127, 0, 0, 1], addr.port())),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eip::aws::GroupInstance;

    fn group(name: &str, fleet: Option<&str>, mark: Option<&str>, instances: &[(&str, &str, &str)]) -> GroupView {
        let mut tags = Vec::new();
        if let Some(f) = fleet {
            tags.push((FLEET.to_string(), f.to_string()));
        }
        if let Some(m) = mark {
            tags.push((REPLACING.to_string(), m.to_string()));
        }
        GroupView {
            name: name.into(),
            tags,
            instances: instances
                .iter()
                .map(|(id, state, health)| GroupInstance {
                    id: (*id).into(),
                    lifecycle_state: (*state).into(),
                    health: (*health).into(),
                })
                .collect(),
        }
    }

    const ME: &str = "i-0000000000000000a";
    const OTHER: &str = "i-0000000000000000b";
    const THIRD: &str = "i-0000000000000000c";

    #[test]
    fn the_fleet_is_the_groups_with_the_same_fleet_tag() {
        let groups = vec![
            group("a", Some("blue"), None, &[(ME, "InService", "Healthy")]),
            group("b", Some("blue"), None, &[(OTHER, "InService", "Healthy")]),
            group("c", Some("green"), None, &[(THIRD, "Pending", "Healthy")]),
        ];
        let (fleet, mine) = fleet_of(&groups, ME).unwrap();
        assert_eq!(mine, "a");
        assert_eq!(fleet.iter().map(|g| g.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        // Another fleet's launch does not hold this one back.
        assert_eq!(others_not_serving(&fleet, ME), None);
        assert_eq!(fleet_of(&groups, "i-00000000000000999"), None);
        // Without a fleet tag, the fleet is the instance's own group.
        let alone = vec![group("a", None, None, &[(ME, "InService", "Healthy")]), groups[1].clone()];
        assert_eq!(fleet_of(&alone, ME).unwrap().0.len(), 1);
    }

    #[test]
    fn an_instance_of_the_fleet_being_replaced_holds_the_report_back() {
        for (state, health) in [("Pending", "Healthy"), ("InService", "Unhealthy"), ("Terminating:Wait", "Healthy")] {
            let groups = vec![
                group("a", Some("f"), None, &[(ME, "InService", "Healthy")]),
                group("b", Some("f"), None, &[(OTHER, state, health)]),
            ];
            let (fleet, _) = fleet_of(&groups, ME).unwrap();
            let why = others_not_serving(&fleet, ME).expect("held back");
            assert!(why.contains(OTHER) && why.contains(state), "{why}");
        }
        // Its own state does not count: it may well be unhealthy already (a second report).
        let groups = vec![group("a", Some("f"), None, &[(ME, "InService", "Unhealthy")])];
        assert_eq!(others_not_serving(&fleet_of(&groups, ME).unwrap().0, ME), None);
    }

    #[test]
    fn one_report_per_fleet_in_the_cooldown_and_the_earliest_mark_wins() {
        let now = 1_000_000;
        let mark = |id: &str, ago: u64| Mark { instance: id.into(), at: now - ago }.value();
        let groups = vec![
            group("a", Some("f"), None, &[(ME, "InService", "Healthy")]),
            group("b", Some("f"), Some(&mark(OTHER, 60)), &[(OTHER, "InService", "Healthy")]),
        ];
        let (fleet, _) = fleet_of(&groups, ME).unwrap();
        let why = recent_report(&fleet, ME, now).expect("held back");
        assert!(why.contains(OTHER) && why.contains("60s ago"), "{why}");
        // An old mark no longer counts.
        let old = vec![groups[0].clone(), group("b", Some("f"), Some(&mark(OTHER, COOLDOWN.as_secs())), &[])];
        assert_eq!(recent_report(&fleet_of(&old, ME).unwrap().0, ME, now), None);
        // Two marks at once: the earlier wins, then the smaller instance id; garbage is ignored.
        let both = vec![
            group("a", Some("f"), Some(&mark(ME, 2)), &[(ME, "InService", "Healthy")]),
            group("b", Some("f"), Some(&mark(OTHER, 2)), &[]),
            group("c", Some("f"), Some("not a mark"), &[]),
        ];
        let (fleet, _) = fleet_of(&both, ME).unwrap();
        assert_eq!(first_mark(&fleet, now).unwrap().0.instance, ME);
        assert_eq!(recent_report(&fleet, ME, now), None);
        assert!(recent_report(&fleet, OTHER, now).is_some());
        let earlier = vec![both[0].clone(), group("b", Some("f"), Some(&mark(OTHER, 3)), &[])];
        assert_eq!(first_mark(&fleet_of(&earlier, ME).unwrap().0, now).unwrap().0.instance, OTHER);
    }

    #[test]
    fn marks_parse_strictly() {
        assert_eq!(Mark::parse(&format!("{ME}@12")), Some(Mark { instance: ME.into(), at: 12 }));
        for bad in ["", ME, "x@12", &format!("{ME}@twelve"), &format!("{ME}@12@13"), &format!("{ME} 12")] {
            assert_eq!(Mark::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_failure_of_its_own_is_reported_once_it_lasts() {
        let after = Duration::from_secs(300);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // The admin server silent: reported after 5 minutes, not before; an answer resets it.
        let mut w = Watch::default();
        assert_eq!(w.observe(at(0), false, State::Associated, after), None);
        assert_eq!(w.observe(at(299), false, State::Associated, after), None);
        assert_eq!(w.observe(at(300), true, State::Associated, after), None);
        assert_eq!(w.observe(at(301), false, State::Associated, after), None);
        assert_eq!(w.observe(at(600), false, State::Associated, after), None);
        assert!(w.observe(at(601), false, State::Associated, after).unwrap().contains("GET /live"));
        // A claim that never succeeds.
        let mut w = Watch::default();
        assert_eq!(w.observe(at(0), true, State::Claiming, after), None);
        assert_eq!(w.observe(at(400), true, State::Claiming, after), None, "not failed yet");
        assert_eq!(w.observe(at(500), true, State::Failed, after), None);
        assert_eq!(w.observe(at(600), true, State::Claiming, after), None, "claiming again");
        assert_eq!(w.observe(at(799), true, State::Failed, after), None);
        assert!(w.observe(at(800), true, State::Failed, after).unwrap().contains("Elastic IP"));
        // Once held, a failing check is not an own failure (EC2 may be what fails), nor are the
        // states of a release.
        let mut w = Watch::default();
        w.observe(at(0), true, State::Associated, after);
        assert_eq!(w.observe(at(1000), true, State::Failed, after), None);
        for state in [State::Lost, State::Requesting, State::HandingOff, State::HandedOff] {
            let mut w = Watch::default();
            w.observe(at(0), true, state, after);
            assert_eq!(w.observe(at(1000), true, state, after), None, "{state:?}");
        }
    }

    #[test]
    fn failed_starts_are_counted_across_restarts_until_a_clean_run() {
        let dir = std::env::temp_dir().join(format!("static-ingress-starts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let starts = Starts { path: dir.join("failing-since") };
        starts.clean();
        assert_eq!(starts.started(100), 100);
        assert_eq!(starts.started(105), 100, "a second start without a clean run");
        starts.clean();
        assert_eq!(starts.started(200), 200);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_wildcard_admin_address_is_probed_on_loopback() {
        assert_eq!(loopback("0.0.0.0:8080".parse().unwrap()), "127.0.0.1:8080".parse().unwrap());
        assert_eq!(loopback("[::]:8080".parse().unwrap()), "[::1]:8080".parse().unwrap());
        assert_eq!(loopback("10.0.0.1:8080".parse().unwrap()), "10.0.0.1:8080".parse().unwrap());
    }
}
