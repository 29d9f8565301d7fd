//! Telling the Auto Scaling group that this instance cannot serve, so that it replaces it
//! (`SetInstanceHealth`), as the 2016 design planned to with the group's health check, without
//! a load balancer.
//!
//! **The rule.** Only for faults of the instance's own, which a new instance would likely not
//! share, lasting `eip.report_unhealthy_after` (5 min):
//! - the proxy cannot bind its listeners because another process holds the port
//!   (`EADDRINUSE`): at least [`MIN_FAILED_STARTS`] failed starts in a row, restarted by
//!   systemd no more than [`RESTART_GAP`] apart, the first of them the bound ago. The count
//!   is kept across restarts in systemd's state directory ([`Starts`]); the failing start
//!   reports before it exits;
//! - the admin server, which answered the proxy's own `GET /live` earlier in this run, has
//!   not answered it since (the watchdog already restarts a process that hangs altogether).
//!
//! Never for a backend outage (every instance sees the same one: the fleet would be replaced
//! at once), a configuration error (`check-config` fails the start before `run`, and a
//! replacement would have the same launch template), a failing Elastic IP claim (a missing
//! tag or permission, an EC2 outage: the fleet shares those), an address a newer instance
//! holds or was handed (that is a release), or while draining.
//!
//! **The guard**, against many instances doing it at once and against churn. An instance
//! reports only if its fleet (the groups whose `static-ingress:fleet` tag is the instance's
//! own) is whole: every other instance `InService` and `Healthy`, every group at its desired
//! capacity; and if no instance of the fleet reported in the last [`COOLDOWN`], nor, in its
//! own group, the instance it replaced in the last [`REPEAT`] (a replacement failing the same
//! way shows a fault it shares, such as the AMI: replacing again would not help). A report is
//! first marked on the instance's group (tag [`REPLACING`] = `<instance id>@<unix time>`); the
//! marks are read again after [`SETTLE`], and only the earliest (then the smallest instance
//! id) goes on to `SetInstanceHealth`: two instances of one group overwrite each other's mark,
//! and of two groups' marks both read the same earliest one. An instance without a fleet tag
//! does not report: nothing would guard it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::aws::{AutoScaling, Calls, GroupView, Metadata, TagLookup, provider_config};
use super::handoff::now_secs;
use crate::config::EipConfig;

/// The group tag that marks a report: `<instance id>@<unix time>` (no space: moto's signature
/// check of Auto Scaling writes fails on one).
pub const REPLACING: &str = "static-ingress:replacing";
/// The tag shared by the groups of one fleet (the fleet stack's name).
pub const FLEET: &str = "static-ingress:fleet";
/// At most one report per fleet in this long: a replacement launches, boots and proves its
/// backend well within it.
pub const COOLDOWN: Duration = Duration::from_secs(15 * 60);
/// A group whose previous instance reported itself this recently does not report again.
pub const REPEAT: Duration = Duration::from_secs(2 * 60 * 60);
/// Failed starts in a row before a report.
pub const MIN_FAILED_STARTS: u64 = 3;
/// Starts further apart than this are not one restart loop (systemd restarts every 5 s, and a
/// failing start spends at most [`EXIT_DEADLINE`] reporting): the count starts again.
pub const RESTART_GAP: Duration = Duration::from_secs(120);
/// How long a failing start may spend on its report before it exits.
pub const EXIT_DEADLINE: Duration = Duration::from_secs(30);
/// How long the marks are left to settle before they are read again.
pub const SETTLE: Duration = Duration::from_secs(3);
/// One report from the running proxy, every call and retry included.
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

    /// Made within `window` of `now` (either way: clocks differ).
    fn within(&self, now: u64, window: Duration) -> bool {
        now.abs_diff(self.at) < window.as_secs()
    }

    fn fresh(&self, now: u64) -> bool {
        self.within(now, COOLDOWN)
    }
}

/// The name of the fleet's group that holds `me`, if any.
pub fn group_of<'a>(fleet: &'a [GroupView], me: &str) -> Option<&'a str> {
    fleet.iter().find(|g| g.instances.iter().any(|i| i.id == me)).map(|g| g.name.as_str())
}

/// Why the guard holds a report back because of the fleet's instances: one that is not in
/// service and healthy (being launched, replaced or terminated).
pub fn others_not_serving(fleet: &[GroupView], me: &str) -> Option<String> {
    let instance = fleet.iter().flat_map(|g| g.instances.iter().map(move |i| (g, i))).find_map(|(g, i)| {
        let serving = i.lifecycle_state == "InService" && i.health.eq_ignore_ascii_case("Healthy");
        (i.id != me && !serving).then(|| {
            format!(
                "{} of group {} is {} and {}: one instance of a fleet is replaced at a time",
                i.id, g.name, i.lifecycle_state, i.health
            )
        })
    });
    // A group whose replacement could not launch shows no instance at all.
    instance.or_else(|| {
        fleet.iter().find(|g| g.instances.len() < g.desired).map(|g| {
            format!(
                "group {} has {} of its {} instances: one instance of a fleet is replaced at a time",
                g.name,
                g.instances.len(),
                g.desired
            )
        })
    })
}

/// The earliest fresh mark of the fleet (then the smallest instance id).
pub fn first_mark(fleet: &[GroupView], now: u64) -> Option<(Mark, String)> {
    fleet
        .iter()
        .filter_map(|g| Some((Mark::parse(g.tag(REPLACING)?)?, g.name.clone())))
        .filter(|(m, _)| m.fresh(now))
        .min_by(|(a, _), (b, _)| (a.at, &a.instance).cmp(&(b.at, &b.instance)))
}

/// Why the guard holds a report back because of another instance's report: one in the fleet
/// within the cooldown, or the one before this instance in its own group within [`REPEAT`].
pub fn recent_report(fleet: &[GroupView], mine: &str, me: &str, now: u64) -> Option<String> {
    let predecessor = fleet
        .iter()
        .filter(|g| g.name == mine)
        .filter_map(|g| Mark::parse(g.tag(REPLACING)?))
        .find(|m| m.instance != me && m.within(now, REPEAT));
    if let Some(m) = predecessor {
        return Some(format!(
            "{} before this instance in group {mine} reported itself unhealthy {}s ago: a replacement failing \
             the same way shows a fault it shares (the AMI, the launch template), so it is not replaced again \
             within {}",
            m.instance,
            now.saturating_sub(m.at),
            humantime::format_duration(REPEAT)
        ));
    }
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

/// Reports this instance unhealthy to its Auto Scaling group, if the guard lets it, within
/// `deadline`. `reason` goes into the log lines.
pub async fn report(config: &EipConfig, reason: &str, deadline: Duration) -> Result<Outcome, String> {
    let result = tokio::time::timeout(deadline, report_within(config, Instant::now() + deadline)).await;
    let outcome = match result {
        Ok(r) => r,
        Err(_) => Err(format!("Auto Scaling or instance metadata did not answer within {deadline:?}")),
    };
    match &outcome {
        Ok(Outcome::Reported { group }) => tracing::error!(%group, reason,
            "reported this instance unhealthy to its Auto Scaling group, which replaces it"),
        Ok(Outcome::NotInGroup) => tracing::warn!(
            reason,
            "this instance cannot serve, but it is in no Auto Scaling group of its fleet: nothing replaces it"
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
    let fleet = match metadata.tag(FLEET, &calls).await.map_err(|e| e.to_string())? {
        TagLookup::Found(f) if !f.is_empty() => f,
        TagLookup::Found(_) | TagLookup::Absent => {
            return Ok(Outcome::Held(format!("this instance has no {FLEET} tag: nothing to guard a report with")));
        }
        TagLookup::NotEnabled => {
            let ec2 = super::aws::Ec2::new(config, &region, &metadata, &provider).await;
            match ec2.instance_tag(&me, FLEET, &calls, deadline).await.map_err(|e| e.to_string())? {
                Some(f) if !f.is_empty() => f,
                _ => {
                    return Ok(Outcome::Held(format!(
                        "this instance has no {FLEET} tag: nothing to guard a report with"
                    )));
                }
            }
        }
    };
    let asg = AutoScaling::new(config, &region, &metadata, &provider).await;

    let groups = asg.fleet(FLEET, &fleet, &calls, deadline).await.map_err(|e| e.to_string())?;
    let Some(mine) = group_of(&groups, &me).map(str::to_string) else {
        return Ok(Outcome::NotInGroup);
    };
    let now = now_secs();
    if let Some(why) = others_not_serving(&groups, &me).or_else(|| recent_report(&groups, &mine, &me, now)) {
        return Ok(Outcome::Held(why));
    }
    // A report tried again keeps its first mark's time, so it cannot keep itself first.
    let own = groups
        .iter()
        .filter(|g| g.name == mine)
        .filter_map(|g| Mark::parse(g.tag(REPLACING)?))
        .find(|m| m.instance == me && m.fresh(now));
    let mark = own.unwrap_or(Mark { instance: me.clone(), at: now });
    asg.tag_group(&mine, REPLACING, &mark.value(), &calls, deadline).await.map_err(|e| e.to_string())?;

    tokio::time::sleep(SETTLE).await;
    let groups = asg.fleet(FLEET, &fleet, &calls, deadline).await.map_err(|e| e.to_string())?;
    match first_mark(&groups, now_secs()) {
        Some((first, _)) if first.instance == me => {}
        Some((first, group)) => {
            return Ok(Outcome::Held(format!("{} (group {group}) marked its report first", first.instance)));
        }
        None => return Ok(Outcome::Held(format!("the mark on group {mine} did not show within {SETTLE:?}"))),
    }
    if let Some(why) = others_not_serving(&groups, &me) {
        return Ok(Outcome::Held(why));
    }
    if let Err(e) = asg.set_unhealthy(&me, &calls, deadline).await {
        // Withdraw the mark, so that it holds nobody back for a report that did not happen.
        let stale = Mark { instance: me.clone(), at: 0 };
        let _ = asg.tag_group(&mine, REPLACING, &stale.value(), &calls, deadline).await;
        return Err(e.to_string());
    }
    Ok(Outcome::Reported { group: mine })
}

/// The failed starts so far, kept in a file of systemd's state directory
/// (`$STATE_DIRECTORY`, from the unit's `StateDirectory=`), which outlives restarts: one line,
/// `<first failed start> <failed starts> <last failed start> <next report allowed>`, unix
/// seconds.
pub struct Starts {
    path: PathBuf,
}

/// What [`Starts`] remembers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub since: u64,
    pub count: u64,
    pub last: u64,
    pub next_report: u64,
}

impl Starts {
    /// `None` without a state directory (outside systemd): failed starts are not counted.
    pub fn open() -> Option<Starts> {
        let dir = std::env::var_os("STATE_DIRECTORY")?;
        let first = std::env::split_paths(&dir).next()?;
        Some(Starts { path: first.join("failed-starts") })
    }

    fn read(&self) -> Option<Record> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        let n: Vec<u64> = text.split_whitespace().map(str::parse).collect::<Result<_, _>>().ok()?;
        match n.as_slice() {
            &[since, count, last, next_report] => Some(Record { since, count, last, next_report }),
            _ => None,
        }
    }

    fn write(&self, r: Record) {
        let tmp = self.path.with_extension("tmp");
        let line = format!("{} {} {} {}\n", r.since, r.count, r.last, r.next_report);
        if let Err(e) = std::fs::write(&tmp, line).and_then(|()| std::fs::rename(&tmp, &self.path)) {
            tracing::warn!(file = %self.path.display(), error = %e, "cannot record this failed start");
        }
    }

    /// Records a failed start at `now`: one more in the loop, or the first of a new one when
    /// the last was more than [`RESTART_GAP`] ago.
    pub fn failed(&self, now: u64) -> Record {
        let record = match self.read() {
            Some(r) if now.saturating_sub(r.last) <= RESTART_GAP.as_secs() => {
                Record { count: r.count + 1, last: now, ..r }
            }
            _ => Record { since: now, count: 1, last: now, next_report: 0 },
        };
        self.write(record);
        record
    }

    /// After a report attempt: none before `at`.
    pub fn report_again_at(&self, record: Record, at: u64) {
        self.write(Record { next_report: at, ..record });
    }

    /// A start that bound its listeners: the next failure counts afresh.
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

/// A start failed binding its listeners with `error`: counts it and, when the rule says so,
/// reports the instance (within [`EXIT_DEADLINE`]). Only `EADDRINUSE` counts: another process
/// on this instance holds the port. Other bind errors (an address the instance does not have,
/// a missing capability) come from the configuration or the image, which a replacement shares.
pub async fn failed_start(config: &EipConfig, error: &std::io::Error, what: &str) {
    if !config.enabled || config.report_unhealthy_after.is_zero() || error.raw_os_error() != Some(libc::EADDRINUSE) {
        return;
    }
    let Some(starts) = Starts::open() else { return };
    let now = now_secs();
    let record = starts.failed(now);
    let failing = now.saturating_sub(record.since);
    if record.count < MIN_FAILED_STARTS || failing < config.report_unhealthy_after.as_secs() || now < record.next_report
    {
        return;
    }
    let reason = format!("{what}, in {} starts over {failing}s", record.count);
    let again = match report(config, &reason, EXIT_DEADLINE).await {
        Ok(Outcome::Reported { .. } | Outcome::NotInGroup) => now + REPEAT.as_secs(),
        Ok(Outcome::Held(_)) => now + COOLDOWN.as_secs(),
        Err(_) => now + config.report_unhealthy_after.as_secs(),
    };
    starts.report_again_at(record, again);
}

/// A start that bound its listeners clears the record of failed starts.
pub fn started(config: &EipConfig) {
    if config.enabled
        && let Some(starts) = Starts::open()
    {
        starts.clean();
    }
}

/// What the running proxy watches for a failure of its own: its admin server.
#[derive(Debug, Default)]
pub struct Watch {
    /// The admin server answered once in this run: from then on, silence is a fault of its
    /// own (a probe that never works, say over an IPv6 loopback the image turned off, is
    /// shared by every instance and proves nothing).
    answered: bool,
    failing_since: Option<Instant>,
}

impl Watch {
    /// One probe at `now`. Returns the reason to report, once a failure has lasted `after`.
    pub fn observe(&mut self, now: Instant, admin_ok: bool, after: Duration) -> Option<String> {
        self.answered |= admin_ok;
        self.failing_since = if admin_ok || !self.answered { None } else { self.failing_since.or(Some(now)) };
        self.failing_since
            .filter(|s| now.duration_since(*s) >= after)
            .map(|_| format!("the admin server has not answered GET /live for {}", humantime::format_duration(after)))
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

/// Watches the running proxy's admin server and reports the instance unhealthy when it stops
/// answering for `eip.report_unhealthy_after` (then again each cooldown, if the guard held it
/// back). Nothing while `draining()`.
pub async fn watch(
    config: EipConfig,
    admin: SocketAddr,
    draining: impl Fn() -> bool + Send + 'static,
    stop: CancellationToken,
) {
    let after = config.report_unhealthy_after;
    let poll = (after / 4).clamp(Duration::from_millis(200), Duration::from_secs(10));
    let admin = loopback(admin);
    let mut watch = Watch::default();
    // `None` once reported (or when nobody would replace the instance): no more reports.
    let mut next_report = Some(Instant::now());
    loop {
        tokio::select! {
            () = tokio::time::sleep(poll) => {}
            () = stop.cancelled() => return,
        }
        let admin_ok = probe(admin).await;
        if draining() {
            continue;
        }
        let now = Instant::now();
        let Some(reason) = watch.observe(now, admin_ok, after) else { continue };
        if next_report.is_some_and(|at| now >= at) {
            next_report = after_report(report(&config, &reason, DEADLINE).await, after);
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

    fn group(name: &str, mark: Option<&str>, instances: &[(&str, &str, &str)]) -> GroupView {
        let mut tags = vec![(FLEET.to_string(), "f".to_string())];
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
            desired: instances.len().max(1),
        }
    }

    const ME: &str = "i-0000000000000000a";
    const OTHER: &str = "i-0000000000000000b";
    const BEFORE: &str = "i-0000000000000000c";

    #[test]
    fn an_instance_of_the_fleet_being_replaced_holds_the_report_back() {
        for (state, health) in [("Pending", "Healthy"), ("InService", "Unhealthy"), ("Terminating:Wait", "Healthy")] {
            let fleet =
                vec![group("a", None, &[(ME, "InService", "Healthy")]), group("b", None, &[(OTHER, state, health)])];
            let why = others_not_serving(&fleet, ME).expect("held back");
            assert!(why.contains(OTHER) && why.contains(state), "{why}");
        }
        // Its own state does not count: it may well be unhealthy already (a second report).
        let fleet = vec![group("a", None, &[(ME, "InService", "Unhealthy")])];
        assert_eq!(others_not_serving(&fleet, ME), None);
        // A group whose replacement has not launched shows fewer instances than it wants.
        let mut short = group("b", None, &[]);
        short.desired = 1;
        let fleet = vec![group("a", None, &[(ME, "InService", "Healthy")]), short];
        assert!(others_not_serving(&fleet, ME).unwrap().contains("group b has 0 of its 1 instances"));
        assert_eq!(group_of(&fleet, ME), Some("a"));
        assert_eq!(group_of(&fleet, "i-00000000000000999"), None);
    }

    #[test]
    fn one_report_per_fleet_in_the_cooldown_and_the_earliest_mark_wins() {
        let now = 1_000_000;
        let mark = |id: &str, ago: u64| Mark { instance: id.into(), at: now - ago }.value();
        let fleet = vec![
            group("a", None, &[(ME, "InService", "Healthy")]),
            group("b", Some(&mark(OTHER, 60)), &[(OTHER, "InService", "Healthy")]),
        ];
        let why = recent_report(&fleet, "a", ME, now).expect("held back");
        assert!(why.contains(OTHER) && why.contains("60s ago"), "{why}");
        // An old mark no longer counts.
        let old = vec![fleet[0].clone(), group("b", Some(&mark(OTHER, COOLDOWN.as_secs())), &[])];
        assert_eq!(recent_report(&old, "a", ME, now), None);
        // Two marks at once: the earlier wins, then the smaller instance id; garbage is ignored.
        let both = vec![
            group("a", Some(&mark(ME, 2)), &[(ME, "InService", "Healthy")]),
            group("b", Some(&mark(OTHER, 2)), &[]),
            group("c", Some("not a mark"), &[]),
        ];
        assert_eq!(first_mark(&both, now).unwrap().0.instance, ME);
        assert_eq!(recent_report(&both, "a", ME, now), None);
        assert!(recent_report(&both, "b", OTHER, now).is_some());
        let earlier = vec![both[0].clone(), group("b", Some(&mark(OTHER, 3)), &[])];
        assert_eq!(first_mark(&earlier, now).unwrap().0.instance, OTHER);
    }

    #[test]
    fn a_group_whose_last_instance_reported_does_not_report_again_for_two_hours() {
        let now = 1_000_000;
        let mark = |id: &str, ago: u64| Mark { instance: id.into(), at: now - ago }.value();
        // The instance this one replaced reported an hour ago: the fault is shared.
        let fleet = vec![group("a", Some(&mark(BEFORE, 3600)), &[(ME, "InService", "Healthy")])];
        let why = recent_report(&fleet, "a", ME, now).expect("held back");
        assert!(why.contains(BEFORE) && why.contains("not replaced again"), "{why}");
        // Its own earlier mark does not hold it back, nor a predecessor's older than 2 hours.
        let own = vec![group("a", Some(&mark(ME, 3600)), &[(ME, "InService", "Healthy")])];
        assert_eq!(recent_report(&own, "a", ME, now), None);
        let long_ago = vec![group("a", Some(&mark(BEFORE, REPEAT.as_secs())), &[(ME, "InService", "Healthy")])];
        assert_eq!(recent_report(&long_ago, "a", ME, now), None);
    }

    #[test]
    fn marks_parse_strictly() {
        assert_eq!(Mark::parse(&format!("{ME}@12")), Some(Mark { instance: ME.into(), at: 12 }));
        for bad in ["", ME, "x@12", &format!("{ME}@twelve"), &format!("{ME}@12@13"), &format!("{ME} 12")] {
            assert_eq!(Mark::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_silent_admin_server_is_reported_once_it_lasts_if_it_ever_answered() {
        let after = Duration::from_secs(300);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut w = Watch::default();
        assert_eq!(w.observe(at(0), true, after), None);
        assert_eq!(w.observe(at(10), false, after), None);
        assert_eq!(w.observe(at(309), false, after), None);
        assert_eq!(w.observe(at(310), true, after), None, "an answer resets it");
        assert_eq!(w.observe(at(320), false, after), None);
        assert_eq!(w.observe(at(619), false, after), None);
        assert!(w.observe(at(620), false, after).unwrap().contains("GET /live"));
        // A probe that never worked in this run proves nothing about this instance.
        let mut never = Watch::default();
        assert_eq!(never.observe(at(0), false, after), None);
        assert_eq!(never.observe(at(10_000), false, after), None);
    }

    #[test]
    fn failed_starts_are_counted_while_systemd_restarts_the_proxy() {
        let dir = std::env::temp_dir().join(format!("static-ingress-starts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let starts = Starts { path: dir.join("failed-starts") };
        starts.clean();
        assert_eq!(starts.failed(100), Record { since: 100, count: 1, last: 100, next_report: 0 });
        assert_eq!(starts.failed(105).count, 2);
        let r = starts.failed(110);
        assert_eq!((r.since, r.count), (100, 3));
        starts.report_again_at(r, 1000);
        assert_eq!(starts.failed(115).next_report, 1000, "kept across starts");
        // A start long after the last one (the unit was stopped, the instance rebooted) is the
        // first of a new loop, not the next of the old one.
        assert_eq!(
            starts.failed(115 + RESTART_GAP.as_secs() + 1),
            Record { since: 236, count: 1, last: 236, next_report: 0 }
        );
        // A start that binds clears it; a damaged file counts as none.
        starts.clean();
        assert_eq!(starts.failed(500).count, 1);
        std::fs::write(dir.join("failed-starts"), "garbage").unwrap();
        assert_eq!(starts.failed(501).count, 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_wildcard_admin_address_is_probed_on_loopback() {
        assert_eq!(loopback("0.0.0.0:8080".parse().unwrap()), "127.0.0.1:8080".parse().unwrap());
        assert_eq!(loopback("[::]:8080".parse().unwrap()), "[::1]:8080".parse().unwrap());
        assert_eq!(loopback("10.0.0.1:8080".parse().unwrap()), "10.0.0.1:8080".parse().unwrap());
    }
}
