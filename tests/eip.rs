//! The Elastic IP claim against a real EC2 emulator (moto in server mode) and an IMDSv2
//! stand-in: `claim-eip` as an operator runs it, and `run` claiming in the background and
//! noticing when a newer fleet takes the address.

#[path = "common/aws.rs"]
mod aws;
mod common;
#[path = "common/ec2_proxy.rs"]
mod ec2_proxy;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use aws::{Imds, Moto, TAG_KEY};
use common::*;
use ec2_proxy::{Ec2Proxy, Lag, Seen};

/// The fleet generation tag (`static_ingress::eip::newer::GENERATION_TAG`), spelled out as the
/// fleet template spells it.
const GENERATION: &str = "static-ingress:fleet-generation";
/// How long a claim keeps confirming (`static_ingress::eip::claim::CONFIRM_SETTLE`).
const SETTLE: Duration = static_ingress::eip::claim::CONFIRM_SETTLE;

const BIN: &str = env!("CARGO_BIN_EXE_static-ingress");

/// Everything a claim can take here, with moto slow on a busy machine.
const CLAIM_BOUND: Duration = Duration::from_secs(60);

fn empty_config() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/empty.toml").display().to_string()
}

/// `static-ingress <sub>` with a clean environment, pointed at the stand-ins. Credentials come
/// from the environment, first in the SDK's default chain, as a profile or the instance role
/// would.
fn command(sub: &str, imds: &str, moto: &str) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(BIN);
    c.arg(sub)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c.args(["--config", &empty_config(), "--eip-imds-endpoint", imds, "--eip-ec2-endpoint", moto]);
    c
}

struct Claimed {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

async fn claim_eip(imds: &Imds, moto: &Moto, extra: &[&str]) -> Claimed {
    claim_eip_via(imds, &moto.endpoint, extra).await
}

/// `claim-eip` with EC2 at `ec2` (moto, or a proxy in front of it).
async fn claim_eip_via(imds: &Imds, ec2: &str, extra: &[&str]) -> Claimed {
    let started = Instant::now();
    let mut c = command("claim-eip", &imds.endpoint(), ec2);
    c.args(extra);
    let out = within(CLAIM_BOUND, "claim-eip to finish", c.output()).await.expect("claim-eip runs");
    let claimed = Claimed {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: started.elapsed(),
    };
    println!(
        "claim-eip {extra:?} exited {:?} in {:?}\n{}{}",
        claimed.code, claimed.took, claimed.stdout, claimed.stderr
    );
    claimed
}

/// The one error line (logs at warn and above also go to stderr; the error is the last line).
fn error_line(c: &Claimed) -> &str {
    c.stderr.lines().last().unwrap_or("")
}

/// The report's `calls:` line as (metadata reads, EC2 reads, EC2 writes).
fn calls(stdout: &str) -> (u32, u32, u32) {
    let line = stdout.lines().find_map(|l| l.strip_prefix("calls:      ")).expect("a calls line");
    let n: Vec<u32> = line.split([' ', ',']).filter_map(|w| w.parse().ok()).collect();
    (n[0], n[1], n[2])
}

/// The report's confirmation: (DescribeAddresses reads, seconds), from
/// `confirmed by N DescribeAddresses reads over S.SSs`.
fn confirmation(stdout: &str) -> (u32, f64) {
    let rest = stdout.split("confirmed by ").nth(1).expect("a confirmation");
    let reads = rest.split(' ').next().and_then(|n| n.parse().ok()).expect("a read count");
    let secs = rest.split("reads over ").nth(1).and_then(|r| r.split('s').next()).and_then(|s| s.parse().ok());
    (reads, secs.expect("a duration"))
}

/// The launch time of `instance`, to the second, as EC2 reports it.
async fn launched(moto: &Moto, instance: &str) -> i64 {
    let out = moto.ec2.describe_instances().instance_ids(instance).send().await.expect("DescribeInstances");
    out.reservations()[0].instances()[0].launch_time().expect("a launch time").secs()
}

/// Launches an instance in a later second than `after` (EC2's launch times are to the second):
/// waits for the clock to pass that second, not for a guessed time.
async fn launch_later_than(moto: &Moto, after: &str, tags: &[(&str, &str)]) -> String {
    let then = launched(moto, after).await;
    within(BOUND, "the clock to pass the first launch's second", async {
        while SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64 <= then {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let later = moto.launch(tags).await;
    assert!(launched(moto, &later).await > then, "the second instance was not launched later");
    later
}

/// Two instances from one RunInstances call: the same launch time. Sorted by id.
async fn launch_two(moto: &Moto, tags: &[(&str, &str)]) -> (String, String) {
    let mut spec =
        aws_sdk_ec2::types::TagSpecification::builder().resource_type(aws_sdk_ec2::types::ResourceType::Instance);
    for (k, v) in tags {
        spec = spec.tags(aws_sdk_ec2::types::Tag::builder().key(*k).value(*v).build());
    }
    let spec = spec.build();
    // One RunInstances call launches both, but moto stamps each instance's launch time (to the
    // second) as it makes it: now and then the two straddle a second, and the later one is
    // then newer by launch time, not by id. Such a pair is no use here; launch another.
    for _ in 0..5 {
        let out = moto
            .ec2
            .run_instances()
            .image_id("ami-12c6146b")
            .min_count(2)
            .max_count(2)
            .tag_specifications(spec.clone())
            .send()
            .await
            .expect("RunInstances");
        let times: Vec<_> = out.instances().iter().map(|i| i.launch_time().cloned()).collect();
        if times.len() == 2 && times[0] == times[1] {
            let mut ids: Vec<String> =
                out.instances().iter().filter_map(|i| i.instance_id().map(str::to_string)).collect();
            ids.sort();
            return (ids[0].clone(), ids[1].clone());
        }
    }
    panic!("moto gave no two instances the same launch time in 5 tries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_free_address_is_claimed_and_confirmed() {
    let moto = Moto::start().await;
    let (alloc, ip) = moto.allocate().await;
    let me = moto.launch(&[(TAG_KEY, &alloc)]).await;
    let imds = Imds::start(&me, Some(&[(TAG_KEY, &alloc)])).await;
    // Through a proxy that only counts, to check the report's counts against what EC2 got.
    let ec2 = Ec2Proxy::start(&moto.endpoint, Lag::default(), Arc::default()).await;

    let c = claim_eip_via(&imds, &ec2.endpoint(), &[]).await;
    assert_eq!(c.code, Some(0), "{}", c.stderr);
    assert_eq!(moto.holder(&alloc).await.0.as_deref(), Some(me.as_str()));
    for line in [
        format!("instance:   {me} in us-east-1 (from instance metadata, IMDSv2)"),
        format!("allocation: {alloc} (from instance tag {TAG_KEY}, read from instance metadata)"),
        format!("address:    {ip}, was not associated"),
        "result:     associated (eipassoc-".to_string(),
    ] {
        assert!(c.stdout.contains(&line), "missing {line:?} in:\n{}", c.stdout);
    }
    // One read before, one write, then reads for as long as the claim confirms: never a
    // single lucky read.
    let (reads, secs) = confirmation(&c.stdout);
    assert!(reads >= 3, "confirmed after {reads} reads:\n{}", c.stdout);
    assert!(secs >= SETTLE.as_secs_f64(), "confirmed after {secs}s, less than {SETTLE:?}");
    // 3 metadata reads (instance id, region, tag); the EC2 counts are what EC2 got.
    let (imds_reads, ec2_reads, ec2_writes) = calls(&c.stdout);
    assert_eq!(imds_reads, 3, "{}", c.stdout);
    assert_eq!((ec2_reads, ec2_writes), ec2.reads_and_writes(), "{}", c.stdout);
    assert_eq!(ec2.count("DescribeAddresses"), 1 + reads);
    assert_eq!(ec2.count("AssociateAddress"), 1);
    // IMDSv2 only: every metadata read carried a token.
    let s = imds.state.lock().unwrap();
    assert_eq!(s.unauthorized, 0, "a metadata request came without a token (IMDSv1)");
    assert!(s.token_puts >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_waits_out_reads_that_lag_its_write() {
    let moto = Moto::start().await;
    let (alloc, _) = moto.allocate().await;
    let me = moto.launch(&[(TAG_KEY, &alloc)]).await;
    let imds = Imds::start(&me, Some(&[(TAG_KEY, &alloc)])).await;
    // EC2's reads may show the state from before a write for a while.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let lag = Lag { stale_reads: Duration::from_millis(600), ..Lag::default() };
    let ec2 = Ec2Proxy::start(&moto.endpoint, lag, Arc::clone(&seen)).await;

    let c = claim_eip_via(&imds, &ec2.endpoint(), &[]).await;
    assert_eq!(c.code, Some(0), "{}", c.stderr);
    assert!(seen.lock().unwrap().stale_answers >= 1, "no read lagged: the test proves nothing");
    assert_eq!(ec2.count("AssociateAddress"), 1, "a lagging read made the claim write again");
    let (reads, secs) = confirmation(&c.stdout);
    assert!(reads >= 4 && secs >= SETTLE.as_secs_f64(), "{}", c.stdout);
    assert_eq!(moto.holder(&alloc).await.0.as_deref(), Some(me.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_held_by_another_instance_is_taken() {
    let moto = Moto::start().await;
    let (alloc, ip) = moto.allocate().await;
    let old = moto.launch(&[(TAG_KEY, &alloc), (GENERATION, "1")]).await;
    let old_association = moto.associate(&alloc, &old).await;
    let new = moto.launch(&[(TAG_KEY, &alloc), (GENERATION, "2")]).await;
    let imds = Imds::start(&new, Some(&[(TAG_KEY, &alloc)])).await;

    let c = claim_eip(&imds, &moto, &[]).await;
    assert_eq!(c.code, Some(0), "{}", c.stderr);
    let (holder, association) = moto.holder(&alloc).await;
    assert_eq!(holder.as_deref(), Some(new.as_str()));
    assert_ne!(association.as_deref(), Some(old_association.as_str()));
    assert!(c.stdout.contains(&format!("address:    {ip}, was associated with {old}")), "{}", c.stdout);
    assert!(c.stdout.contains(&format!("result:     associated, taking it from {old} (eipassoc-")), "{}", c.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_already_ours_is_left_alone() {
    let moto = Moto::start().await;
    let (alloc, _) = moto.allocate().await;
    let me = moto.launch(&[(TAG_KEY, &alloc)]).await;
    let association = moto.associate(&alloc, &me).await;
    let imds = Imds::start(&me, Some(&[(TAG_KEY, &alloc)])).await;

    let c = claim_eip(&imds, &moto, &[]).await;
    assert_eq!(c.code, Some(0), "{}", c.stderr);
    assert!(c.stdout.contains("result:     already ours; nothing to do"), "{}", c.stdout);
    assert!(c.stdout.contains("1 EC2 read, 0 EC2 writes"), "{}", c.stdout);
    // The same association as before: nothing was written.
    assert_eq!(moto.holder(&alloc).await, (Some(me), Some(association)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_fleets_replacement_does_not_take_the_address_from_the_new_fleet() {
    let moto = Moto::start().await;
    let (alloc, _) = moto.allocate().await;
    let new_fleet = moto.launch(&[(TAG_KEY, &alloc), (GENERATION, "20261205")]).await;
    let association = moto.associate(&alloc, &new_fleet).await;
    // The old fleet's group replaces a broken instance: launched after the new fleet's.
    let replacement = launch_later_than(&moto, &new_fleet, &[(TAG_KEY, &alloc), (GENERATION, "20261121")]).await;
    let imds = Imds::start(&replacement, Some(&[(TAG_KEY, &alloc)])).await;

    let c = claim_eip(&imds, &moto, &[]).await;
    assert_eq!(c.code, Some(15), "{}", c.stderr);
    assert_eq!(
        error_line(&c),
        format!(
            "error: {alloc} is held by {new_fleet}, which is newer than {replacement} (a newer fleet: \
             {GENERATION} 20261205 against 20261121), so this instance does not take it; to move the address \
             here, deploy a fleet with a larger FleetGeneration"
        ),
    );
    assert_eq!(moto.holder(&alloc).await, (Some(new_fleet), Some(association)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_one_generation_an_earlier_instance_does_not_take_it_from_a_later_one() {
    let moto = Moto::start().await;
    let (alloc, _) = moto.allocate().await;
    let earlier = moto.launch(&[(TAG_KEY, &alloc), (GENERATION, "3")]).await;
    let later = launch_later_than(&moto, &earlier, &[(TAG_KEY, &alloc), (GENERATION, "3")]).await;
    let association = moto.associate(&alloc, &later).await;
    // The earlier instance's proxy restarts (a crash, a reboot) and claims again.
    let imds = Imds::start(&earlier, Some(&[(TAG_KEY, &alloc)])).await;

    let c = claim_eip(&imds, &moto, &[]).await;
    assert_eq!(c.code, Some(15), "{}", c.stderr);
    assert!(
        error_line(&c).starts_with(&format!(
            "error: {alloc} is held by {later}, which is newer than {earlier} (the same fleet generation, \
             launched later)"
        )),
        "{}",
        c.stderr
    );
    assert_eq!(moto.holder(&alloc).await, (Some(later), Some(association)));
}

/// Who a race is between, and how the newer one is newer.
#[derive(Debug, Clone, Copy)]
enum Newer {
    /// A larger generation tag.
    Generation,
    /// The same generation and launch time: the larger instance id.
    InstanceId,
}

/// One race: two instances claim the same allocation at once, one of them with a slow
/// AssociateAddress, behind proxies whose reads lag writes. Asserts who wins and what each says.
async fn race(moto: &Moto, slow_newer: bool, held_by_old_fleet: bool, by: Newer) {
    let (alloc, _) = moto.allocate().await;
    let (older, newer, why) = match by {
        Newer::Generation => {
            let a = moto.launch(&[(TAG_KEY, &alloc), (GENERATION, "1")]).await;
            let b = moto.launch(&[(TAG_KEY, &alloc), (GENERATION, "2")]).await;
            (a, b, format!("a newer fleet: {GENERATION} 2 against 1"))
        }
        Newer::InstanceId => {
            let (a, b) = launch_two(moto, &[(TAG_KEY, &alloc), (GENERATION, "2")]).await;
            (a, b, "the same fleet generation and launch time, and a larger instance id".to_string())
        }
    };
    if held_by_old_fleet {
        let old_fleet = moto.launch(&[(TAG_KEY, &alloc)]).await;
        moto.associate(&alloc, &old_fleet).await;
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stale_reads = Duration::from_millis(300);
    let slow = Lag { associate: Duration::from_millis(150), stale_reads };
    let fast = Lag { stale_reads, ..Lag::default() };
    let (older_lag, newer_lag) = if slow_newer { (fast, slow) } else { (slow, fast) };
    let older_ec2 = Ec2Proxy::start(&moto.endpoint, older_lag, Arc::clone(&seen)).await;
    let newer_ec2 = Ec2Proxy::start(&moto.endpoint, newer_lag, Arc::clone(&seen)).await;
    let older_imds = Imds::start(&older, Some(&[(TAG_KEY, &alloc)])).await;
    let newer_imds = Imds::start(&newer, Some(&[(TAG_KEY, &alloc)])).await;

    let (older_url, newer_url) = (older_ec2.endpoint(), newer_ec2.endpoint());
    let (o, n) = tokio::join!(claim_eip_via(&older_imds, &older_url, &[]), claim_eip_via(&newer_imds, &newer_url, &[]));
    let case = format!("slow newer: {slow_newer}, held by an old fleet: {held_by_old_fleet}, newer by {by:?}");
    assert_eq!(n.code, Some(0), "{case}: the newer instance did not win: {}", n.stderr);
    assert!(n.stdout.contains("result:     associated"), "{case}: {}", n.stdout);
    assert_eq!(o.code, Some(15), "{case}: the older instance did not report the loss: {}{}", o.stdout, o.stderr);
    let line = error_line(&o);
    let held = format!("error: {alloc} is held by {newer}, which is newer than {older} ({why}), ");
    let taken =
        format!("error: {alloc} was taken by {newer} while {older} was claiming it; {newer} is newer ({why}), ");
    assert!(line.starts_with(&held) || line.starts_with(&taken), "{case}: {line}");
    assert_eq!(moto.holder(&alloc).await.0.as_deref(), Some(newer.as_str()), "{case}");
    // Once associated, never left without an instance while both wanted it.
    let holders = seen.lock().unwrap().holders.clone();
    let first = holders.iter().position(Option::is_some).expect("the address was associated");
    assert!(holders[first..].iter().all(Option::is_some), "{case}: unassociated in between: {holders:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_racing_claims_leave_the_address_with_the_newer_instance_only() {
    let moto = Arc::new(Moto::start().await);
    // Every combination twice: which side is slow, a free or a held address, how it is newer.
    // Four races at a time, each with its own allocation and instances.
    let cases: Vec<(bool, bool, Newer)> = (0..16)
        .map(|i| (i % 2 == 0, (i / 2) % 2 == 0, if (i / 4) % 2 == 0 { Newer::Generation } else { Newer::InstanceId }))
        .collect();
    let started = Instant::now();
    for batch in cases.chunks(4) {
        let mut races = tokio::task::JoinSet::new();
        for &(slow_newer, held, by) in batch {
            let moto = Arc::clone(&moto);
            races.spawn(async move { race(&moto, slow_newer, held, by).await });
        }
        while let Some(done) = races.join_next().await {
            if let Err(e) = done {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }
    println!("16 races in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_changes_nothing() {
    let moto = Moto::start().await;
    let (alloc, _) = moto.allocate().await;
    let old = moto.launch(&[]).await;
    let association = moto.associate(&alloc, &old).await;
    let me = moto.launch(&[(TAG_KEY, &alloc), (GENERATION, "1")]).await;
    let imds = Imds::start(&me, Some(&[(TAG_KEY, &alloc)])).await;

    let c = claim_eip(&imds, &moto, &["--dry-run"]).await;
    assert_eq!(c.code, Some(0), "{}", c.stderr);
    assert!(
        c.stdout.contains(&format!("result:     dry run: EC2 would allow the association, taking it from {old}")),
        "{}",
        c.stdout
    );
    assert!(c.stdout.contains("0 EC2 writes"), "{}", c.stdout);
    assert_eq!(moto.holder(&alloc).await, (Some(old), Some(association)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_metadata_tags_the_allocation_is_read_with_describe_tags() {
    let moto = Moto::start().await;
    let (alloc, _) = moto.allocate().await;
    let me = moto.launch(&[(TAG_KEY, &alloc)]).await;
    // The launch template did not enable instance metadata tags.
    let imds = Imds::start(&me, None).await;

    let c = claim_eip(&imds, &moto, &[]).await;
    assert_eq!(c.code, Some(0), "{}", c.stderr);
    assert!(c.stdout.contains(&format!("(from instance tag {TAG_KEY}, read with ec2:DescribeTags)")), "{}", c.stdout);
    assert_eq!(moto.holder(&alloc).await.0.as_deref(), Some(me.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_tag_says_where_it_looked_and_what_to_set() {
    let moto = Moto::start().await;
    let me = moto.launch(&[("Name", "proxy")]).await;
    let imds = Imds::start(&me, Some(&[("Name", "proxy")])).await;

    let c = claim_eip(&imds, &moto, &[]).await;
    assert_eq!(c.code, Some(11), "{}", c.stderr);
    assert_eq!(
        error_line(&c),
        format!(
            "error: instance {me} has no tag {TAG_KEY} (looked in instance metadata tags and with \
             ec2:DescribeTags); tag its Auto Scaling group with {TAG_KEY} = <eipalloc-...> and \
             PropagateAtLaunch, or set eip.allocation_id"
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_allocation_is_named_with_its_source() {
    let moto = Moto::start().await;
    let bogus = "eipalloc-0123456789abcdef0";
    let me = moto.launch(&[(TAG_KEY, bogus)]).await;
    let imds = Imds::start(&me, Some(&[(TAG_KEY, bogus)])).await;

    let c = claim_eip(&imds, &moto, &[]).await;
    assert_eq!(c.code, Some(12), "{}", c.stderr);
    let line = error_line(&c);
    assert!(
        line.starts_with(&format!(
            "error: Elastic IP allocation {bogus} (from instance tag {TAG_KEY}, read from instance metadata) \
             does not exist in us-east-1 (InvalidAllocationID.NotFound"
        )),
        "{line}"
    );
    assert!(line.ends_with("use an allocation id from the addresses stack's outputs, in the instance's region"));

    // Set in the config instead, the message names the config key.
    let c = claim_eip(&imds, &moto, &["--eip-allocation-id", bogus]).await;
    assert_eq!(c.code, Some(12), "{}", c.stderr);
    assert!(error_line(&c).contains(&format!("allocation {bogus} (from eip.allocation_id)")), "{}", c.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_ec2_does_not_know_is_refused_clearly() {
    let moto = Moto::start().await;
    let (alloc, _) = moto.allocate().await;
    let ghost = "i-0123456789abcdef0";
    let imds = Imds::start(ghost, Some(&[(TAG_KEY, &alloc)])).await;

    // EC2 may not know a just-launched instance yet, so this is retried until the deadline.
    let c = claim_eip(&imds, &moto, &["--eip-deadline", "2s"]).await;
    assert_eq!(c.code, Some(14), "{}", c.stderr);
    let line = error_line(&c);
    assert!(
        line.starts_with(&format!(
            "error: EC2 refused instance {ghost} until the deadline (InvalidInstanceID.NotFound"
        )),
        "{line}"
    );
    assert!(c.took >= Duration::from_millis(500), "not retried: gave up after {:?}", c.took);
    assert_eq!(moto.holder(&alloc).await.0, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_instance_metadata_it_says_so_and_exits_10() {
    let moto = Moto::start().await;
    // A port held by a socket that is bound but not listening: connections to it are refused,
    // and no other test can take the port meanwhile.
    let held = tokio::net::TcpSocket::new_v4().unwrap();
    held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let dead = held.local_addr().unwrap();
    let mut c = command("claim-eip", &format!("http://{dead}"), &moto.endpoint);
    let out = within(CLAIM_BOUND, "claim-eip to give up", c.output()).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(10), "{stderr}");
    let line = stderr.lines().last().unwrap_or("");
    assert!(
        line.starts_with(&format!(
            "error: cannot read the instance id from the instance metadata service at http://{dead} ("
        )),
        "{line}"
    );
}

/// The documented policy with every statement widened to resource `*` and its conditions
/// dropped: moto evaluates policies only against `*`, so this checks the actions alone.
fn documented_actions_policy() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/iam-policy.json");
    let mut policy: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for statement in policy["Statement"].as_array_mut().unwrap() {
        statement["Resource"] = "*".into();
        statement.as_object_mut().unwrap().remove("Condition");
    }
    policy.to_string()
}

/// Requests the IAM tests make before moto starts enforcing: AllocateAddress, RunInstances,
/// and the 3 of `Moto::iam_user`.
const SETUP_REQUESTS: u32 = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_policy_allows_every_call_a_claim_makes() {
    // Two more setup requests: the address starts on another instance, so the claim also
    // compares launch times (ec2:DescribeInstances).
    let moto = Moto::start_with_iam_after(Some(SETUP_REQUESTS + 2)).await;
    let (alloc, _) = moto.allocate().await;
    let old = moto.launch(&[]).await;
    moto.associate(&alloc, &old).await;
    let me = moto.launch(&[(TAG_KEY, &alloc), (GENERATION, "1")]).await;
    let (key, secret) = moto.iam_user(&documented_actions_policy()).await;
    // No metadata tags, so the claim also needs ec2:DescribeTags.
    let imds = Imds::start(&me, None).await;

    let mut c = command("claim-eip", &imds.endpoint(), &moto.endpoint);
    c.env("AWS_ACCESS_KEY_ID", &key).env("AWS_SECRET_ACCESS_KEY", &secret);
    let out = within(CLAIM_BOUND, "claim-eip", c.output()).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("read with ec2:DescribeTags"), "{stdout}");
    assert!(stdout.contains(&format!("taking it from {old}")), "{stdout}");
    // DescribeTags, DescribeAddresses, DescribeInstances, and the confirming DescribeAddresses.
    let (confirm_reads, _) = confirmation(&stdout);
    assert!(confirm_reads >= 3, "{stdout}");
    assert_eq!(calls(&stdout).1, 3 + confirm_reads, "{stdout}");
    assert_eq!(calls(&stdout).2, 1, "{stdout}");
    // Credentials moto's IAM does not know are refused: moto really enforces, so the claim
    // above passed the policy check.
    let mut c = command("claim-eip", &imds.endpoint(), &moto.endpoint);
    c.env("AWS_ACCESS_KEY_ID", "unknown-key");
    let out = within(CLAIM_BOUND, "claim-eip", c.output()).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(13), "moto does not enforce IAM, so this test proves nothing: {stderr}");
    assert!(stderr.contains("AuthFailure"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_permission_names_the_call_and_the_policy() {
    let moto = Moto::start_with_iam_after(Some(SETUP_REQUESTS)).await;
    let (alloc, _) = moto.allocate().await;
    let me = moto.launch(&[(TAG_KEY, &alloc)]).await;
    let read_only = r#"{"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
        "Action": ["ec2:DescribeAddresses", "ec2:DescribeTags"], "Resource": "*"}]}"#;
    let (key, secret) = moto.iam_user(read_only).await;
    let imds = Imds::start(&me, Some(&[(TAG_KEY, &alloc)])).await;

    let mut c = command("claim-eip", &imds.endpoint(), &moto.endpoint);
    c.env("AWS_ACCESS_KEY_ID", &key).env("AWS_SECRET_ACCESS_KEY", &secret);
    let out = within(CLAIM_BOUND, "claim-eip", c.output()).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(13), "{stderr}");
    let line = stderr.lines().last().unwrap_or("");
    assert!(line.starts_with("error: ec2:AssociateAddress was denied (AccessDenied: "), "{line}");
    assert!(
        line.ends_with(
            "attach the policy in docs/iam-policy.json to the instance role, and tag the Elastic IP \
             static-ingress:managed = true"
        ),
        "{line}"
    );
    // Denied before anything changed.
    assert_eq!(moto.holder_as(&key, &secret, &alloc).await.0, None);
}

/// A running proxy with the claim on: its admin address for /status and /metrics, and its log
/// lines (JSON, fields flattened), collected as they come.
struct Running {
    child: tokio::process::Child,
    _backend: Backend,
    proxy: SocketAddr,
    admin: SocketAddr,
    logs: Arc<Mutex<Vec<serde_json::Value>>>,
}

async fn run_with_eip(imds: &str, ec2: &str, extra: &[&str]) -> Running {
    use tokio::io::AsyncBufReadExt;
    let backend = Backend::echo().await;
    let mut cmd = command("run", imds, ec2);
    if !extra.contains(&"--backend-address") {
        cmd.args(["--backend-address", &backend.addr.to_string()]);
    }
    if !extra.contains(&"--lifecycle-drain-delay") {
        cmd.args(["--lifecycle-drain-delay", "0s"]);
    }
    cmd.args(["--proxy-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--eip-enabled", "true", "--log-format", "json"])
        .args(extra)
        .stderr(Stdio::null());
    let mut child = cmd.spawn().expect("the proxy starts");
    let logs = Arc::new(Mutex::new(Vec::new()));
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
    let collected = Arc::clone(&logs);
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                collected.lock().unwrap().push(v);
            }
        }
    });
    // The addresses it bound, as it reports them once it serves.
    let serving = wait_for_log(&logs, "serving", |_| true).await;
    let field = |name: &str| serving[name].as_str().unwrap_or_default().trim_matches(['[', ']']).to_string();
    let proxy: SocketAddr = field("proxy").parse().expect("the proxy address in the log");
    let admin: SocketAddr = field("admin").parse().expect("the admin address in the log");
    // Serving at once, whatever the claim is doing (through the echo backend, unless the test
    // chose its own).
    if !extra.contains(&"--backend-address") {
        let mut s = within(BOUND, "a connection to the proxy", tokio::net::TcpStream::connect(proxy)).await.unwrap();
        assert_eq!(round_trip(&mut s, b"ping").await, b"ping");
    }
    Running { child, _backend: backend, proxy, admin, logs }
}

/// The first log line whose message starts with `message` and that `matches`.
async fn wait_for_log(
    logs: &Mutex<Vec<serde_json::Value>>,
    message: &str,
    matches: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let find = || {
        logs.lock()
            .unwrap()
            .iter()
            .find(|l| l["message"].as_str().is_some_and(|m| m.starts_with(message)) && matches(l))
            .cloned()
    };
    within(CLAIM_BOUND, &format!("a log line {message:?}"), async {
        loop {
            if let Some(line) = find() {
                return line;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

async fn eip_status(admin: SocketAddr) -> serde_json::Value {
    let body = get(admin, "/status").await.body;
    let status: serde_json::Value = serde_json::from_str(&body).expect("/status is JSON");
    status["eip"].clone()
}

/// `static_ingress_eip_associated`, and the states `static_ingress_eip_state` sets to 1.
async fn eip_metric(admin: SocketAddr) -> (Option<f64>, Vec<String>) {
    let body = get(admin, "/metrics").await.body;
    let associated =
        body.lines().find_map(|l| l.strip_prefix("static_ingress_eip_associated ")).and_then(|v| v.parse().ok());
    let states = body
        .lines()
        .filter_map(|l| l.strip_prefix("static_ingress_eip_state{state=\"")?.strip_suffix("\"} 1"))
        .map(str::to_string)
        .collect();
    (associated, states)
}

async fn wait_for_state(admin: SocketAddr, want: &str) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let found = tokio::time::timeout(CLAIM_BOUND, async {
        loop {
            last = eip_status(admin).await;
            if last["state"] == want {
                return last.clone();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("eip state never became {want}; last: {last}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_keeps_the_address_from_older_instances_and_leaves_it_to_newer_ones() {
    let moto = Moto::start().await;
    let (alloc, ip) = moto.allocate().await;
    let me = moto.launch(&[(TAG_KEY, &alloc), (GENERATION, "2")]).await;
    let imds = Imds::start(&me, Some(&[(TAG_KEY, &alloc)])).await;
    let ec2 = Ec2Proxy::start(&moto.endpoint, Lag::default(), Arc::default()).await;
    // Without handoffs, to see the rank rule alone (tests/handoff.rs has them).
    let p =
        run_with_eip(&imds.endpoint(), &ec2.endpoint(), &["--eip-check-interval", "200ms", "--eip-handoff", "false"])
            .await;

    let eip = wait_for_state(p.admin, "associated").await;
    assert_eq!(eip["allocation_id"], alloc.as_str());
    assert_eq!(eip["public_ip"], ip.as_str());
    assert_eq!(eip["instance_id"], me.as_str());
    assert_eq!(eip_metric(p.admin).await, (Some(1.0), vec!["associated".to_string()]));
    assert_eq!(moto.holder(&alloc).await.0.as_deref(), Some(me.as_str()));

    // An old fleet's replacement takes it: this instance takes it back, and says why.
    let old = moto.launch(&[(TAG_KEY, &alloc), (GENERATION, "1")]).await;
    moto.associate(&alloc, &old).await;
    let line = wait_for_log(&p.logs, "Elastic IP is associated with an older instance; taking it back", |l| {
        l["owner"] == old.as_str()
    })
    .await;
    assert_eq!(line["level"], "WARN");
    wait_for_log(&p.logs, "Elastic IP claimed", |l| l["previous"] == old.as_str()).await;
    assert_eq!(moto.holder(&alloc).await.0.as_deref(), Some(me.as_str()));
    assert_eq!(wait_for_state(p.admin, "associated").await["owner"], serde_json::Value::Null);

    // A newer fleet's instance takes it: lost, with the right reason, and not fought over.
    let newer = moto.launch(&[(TAG_KEY, &alloc), (GENERATION, "3")]).await;
    moto.associate(&alloc, &newer).await;
    let eip = wait_for_state(p.admin, "lost").await;
    assert_eq!(eip["owner"], newer.as_str());
    assert_eq!(eip_metric(p.admin).await, (Some(0.0), vec!["lost".to_string()]));
    let line = wait_for_log(&p.logs, "Elastic IP is now associated with a newer instance", |_| true).await;
    assert_eq!(line["owner"], newer.as_str());
    assert_eq!(line["reason"], format!("a newer fleet: {GENERATION} 3 against 2").as_str());
    let (checks, writes) = (ec2.count("DescribeAddresses"), ec2.count("AssociateAddress"));
    eventually("three more ownership checks", async || ec2.count("DescribeAddresses") >= checks + 3).await;
    assert_eq!(ec2.count("AssociateAddress"), writes, "the address was fought over");
    assert_eq!(moto.holder(&alloc).await.0.as_deref(), Some(newer.as_str()));
    assert_eq!(eip_status(p.admin).await["state"], "lost");
    // The proxy still serves and stays healthy: losing the address is not an error.
    assert_eq!(get(p.admin, "/health").await.status, 200);

    // The newer instance goes away and the address falls free: it is not left unassociated.
    let association = moto.holder(&alloc).await.1.expect("an association");
    moto.ec2.disassociate_address().association_id(association).send().await.expect("DisassociateAddress");
    wait_for_log(&p.logs, "Elastic IP is not associated with any instance; claiming it", |_| true).await;
    wait_for_state(p.admin, "associated").await;
    assert_eq!(moto.holder(&alloc).await.0.as_deref(), Some(me.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_at_once_while_the_claim_is_stuck() {
    let moto = Moto::start().await;
    // Instance metadata that accepts connections, reads the request, and never answers.
    let stuck = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stuck_addr = stuck.local_addr().unwrap();
    let asked = Arc::new(tokio::sync::Notify::new());
    let notify = Arc::clone(&asked);
    let held = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut open = Vec::new();
        while let Ok((mut s, _)) = stuck.accept().await {
            let mut buf = vec![0; 4096];
            if let Ok(n) = s.read(&mut buf).await
                && buf[..n].starts_with(b"PUT /latest/api/token")
            {
                notify.notify_one();
            }
            open.push(s);
        }
    });
    let p = run_with_eip(&format!("http://{stuck_addr}"), &moto.endpoint, &[]).await;

    // The claim has started (it asked instance metadata for a token) and is still on.
    within(BOUND, "the claim to ask instance metadata", asked.notified()).await;
    assert_eq!(eip_status(p.admin).await["state"], "claiming");
    assert_eq!(eip_metric(p.admin).await, (Some(0.0), vec!["claiming".to_string()]));
    assert_eq!(get(p.admin, "/health").await.status, 200);
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_while_the_claim_fails_and_shows_why() {
    let moto = Moto::start().await;
    let me = moto.launch(&[]).await;
    let imds = Imds::start(&me, Some(&[])).await;
    let p = run_with_eip(&imds.endpoint(), &moto.endpoint, &["--eip-check-interval", "200ms"]).await;

    let eip = wait_for_state(p.admin, "failed").await;
    let error = eip["error"].as_str().unwrap_or_default();
    assert!(error.starts_with(&format!("instance {me} has no tag {TAG_KEY}")), "{eip}");
    assert_eq!(eip_metric(p.admin).await, (Some(0.0), vec!["failed".to_string()]));
    assert_eq!(get(p.admin, "/health").await.status, 200);

    // The operator fixes the tag: the next try claims, without a restart.
    let (alloc, _) = moto.allocate().await;
    moto.ec2
        .create_tags()
        .resources(&me)
        .tags(aws_sdk_ec2::types::Tag::builder().key(TAG_KEY).value(&alloc).build())
        .send()
        .await
        .unwrap();
    imds.state.lock().unwrap().tags.as_mut().unwrap().insert(TAG_KEY.to_string(), alloc.clone());
    let eip = wait_for_state(p.admin, "associated").await;
    assert_eq!(eip["allocation_id"], alloc.as_str());
    assert_eq!(moto.holder(&alloc).await.0.as_deref(), Some(me.as_str()));
}

// ---- Handoffs (src/eip/handoff.rs, docs/handoff.md) ----

/// A proxy of one fleet generation for `alloc`: its instance in moto, its instance metadata
/// stand-in, and the running binary (a short drain, so that a handoff takes seconds).
struct Member {
    id: String,
    imds: Imds,
    p: Running,
}

async fn member(moto: &Moto, alloc: &str, generation: &str, extra: &[&str]) -> Member {
    let id = moto.launch(&[(TAG_KEY, alloc), (GENERATION, generation)]).await;
    let imds = Imds::start(&id, Some(&[(TAG_KEY, alloc)])).await;
    let mut args = extra.to_vec();
    for (flag, value) in [
        ("--eip-check-interval", "200ms"),
        ("--lifecycle-drain-delay", "2s"),
        ("--lifecycle-grace-period", "2s"),
        ("--eip-handoff-announce-delay", "1s"),
    ] {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    let p = run_with_eip(&imds.endpoint(), &moto.endpoint, &args).await;
    Member { id, imds, p }
}

/// The value of tag `key` on the allocation, as EC2 shows it (empty when cleared).
async fn address_tag(moto: &Moto, alloc: &str, key: &str) -> String {
    let out = moto.ec2.describe_addresses().allocation_ids(alloc).send().await.expect("DescribeAddresses");
    let tags = out.addresses()[0].tags();
    tags.iter().find(|t| t.key() == Some(key)).and_then(|t| t.value()).unwrap_or_default().to_string()
}

async fn health(admin: SocketAddr) -> (u16, String) {
    let r = get(admin, "/health").await;
    (r.status, r.body)
}

async fn wait_for_health(admin: SocketAddr, status: u16, containing: &str) -> String {
    let mut last = (0, String::new());
    let found = tokio::time::timeout(CLAIM_BOUND, async {
        loop {
            last = health(admin).await;
            if last.0 == status && last.1.contains(containing) {
                return last.1.clone();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("/health never answered {status} with {containing:?}; last: {last:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_hands_the_address_over_without_breaking_a_connection_that_finishes_in_time() {
    let moto = Moto::start().await;
    let (alloc, _) = moto.allocate().await;
    let old = member(&moto, &alloc, "1", &[]).await;
    wait_for_state(old.p.admin, "associated").await;
    // A connection open before the release, and still open when the grace ends.
    let mut long = within(BOUND, "connect", tokio::net::TcpStream::connect(old.p.proxy)).await.unwrap();
    assert_eq!(round_trip(&mut long, b"before").await, b"before");

    let new = member(&moto, &alloc, "2", &[]).await;
    // The newer instance asks instead of taking, and says it is waiting.
    let eip = wait_for_state(new.p.admin, "requesting").await;
    assert_eq!(eip["owner"], old.id.as_str());
    assert_eq!(health(new.p.admin).await.0, 503, "healthy before it holds the address");
    // The holder drains: /health fails so Route 53 stops announcing the address, the address
    // stays where it is, and connections still arriving (cached answers) are served.
    let body = wait_for_health(old.p.admin, 503, &format!("handing the Elastic IP over to {}", new.id)).await;
    assert_eq!(moto.holder(&alloc).await.0.as_deref(), Some(old.id.as_str()), "{body}");
    assert!(address_tag(&moto, &alloc, "static-ingress:handoff").await.starts_with("draining "));
    let mut late = within(BOUND, "connect", tokio::net::TcpStream::connect(old.p.proxy)).await.unwrap();
    assert_eq!(round_trip(&mut late, b"cached answer").await, b"cached answer");
    drop(late);

    // The connection still open when the grace ends is reset, not left to break silently.
    let cut = read_until_closed(&mut long).await;
    assert_eq!(cut.map_err(|e| e.kind()), Err(std::io::ErrorKind::ConnectionReset));
    let moved = wait_for_log(&old.p.logs, "Elastic IP handed over", |_| true).await;
    assert_eq!(moved["to"], new.id.as_str());
    assert_eq!(moved["cut"], 1);
    // The drain delay and then the grace for the open connection, both served in full.
    assert!(moved["seconds"].as_f64().unwrap() >= 4.0, "{moved}");

    // The new instance holds it, healthy; the old one says where it went and stops accepting.
    wait_for_state(new.p.admin, "associated").await;
    wait_for_health(new.p.admin, 200, "").await;
    assert_eq!(moto.holder(&alloc).await.0.as_deref(), Some(new.id.as_str()));
    let old_eip = wait_for_state(old.p.admin, "handed_off").await;
    assert_eq!(old_eip["owner"], new.id.as_str());
    assert_eq!(health(old.p.admin).await, (503, format!("the Elastic IP was handed over to {}\n", new.id)));
    // The request is cleared; the new holder keeps the turn while Route 53 counts it healthy.
    let settling = format!("settling {} ", new.id);
    eventually("the request to be cleared and the address marked settling", async || {
        address_tag(&moto, &alloc, "static-ingress:handoff-to").await.is_empty()
            && address_tag(&moto, &alloc, "static-ingress:handoff").await.starts_with(&settling)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handed_over_address_is_taken_back_when_the_release_is_rolled_back() {
    let moto = Moto::start().await;
    let (alloc, _) = moto.allocate().await;
    let old = member(&moto, &alloc, "1", &[]).await;
    wait_for_state(old.p.admin, "associated").await;
    let mut new = member(&moto, &alloc, "2", &[]).await;
    wait_for_state(old.p.admin, "handed_off").await;
    wait_for_state(new.p.admin, "associated").await;
    // The handed-off instance stays quiet while the new one holds the address.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(eip_status(old.p.admin).await["state"], "handed_off");

    // The new release is bad: its stack is deleted, and EC2 frees the address.
    new.p.child.kill().await.expect("kill the new proxy");
    moto.ec2.terminate_instances().instance_ids(&new.id).send().await.expect("TerminateInstances");
    let association = moto.holder(&alloc).await.1.expect("an association");
    moto.ec2.disassociate_address().association_id(association).send().await.expect("DisassociateAddress");

    // The old instance takes it back and serves, healthy, as before the release.
    wait_for_log(&old.p.logs, "took the Elastic IP back after handing it over", |_| true).await;
    wait_for_state(old.p.admin, "associated").await;
    wait_for_health(old.p.admin, 200, "").await;
    assert_eq!(moto.holder(&alloc).await.0.as_deref(), Some(old.id.as_str()));
    let mut c = within(BOUND, "connect", tokio::net::TcpStream::connect(old.p.proxy)).await.unwrap();
    assert_eq!(round_trip(&mut c, b"rolled back").await, b"rolled back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_never_answers_is_taken_from_once_the_bound_passes() {
    let moto = Moto::start().await;
    let (alloc, _) = moto.allocate().await;
    // Running, holding the address, and no proxy on it to answer (or one too old to know).
    let silent = moto.launch(&[(TAG_KEY, &alloc), (GENERATION, "1")]).await;
    moto.associate(&alloc, &silent).await;

    let started = Instant::now();
    let new = member(&moto, &alloc, "2", &[]).await;
    assert_eq!(wait_for_state(new.p.admin, "requesting").await["owner"], silent.as_str());
    let line = wait_for_log(&new.p.logs, "Elastic IP handoff skipped: taking the address", |_| true).await;
    assert!(line["reason"].as_str().unwrap().contains("did not answer the handoff request within 30s"), "{line}");
    // It waited for an answer (3 checks of 200 ms, plus 30 s, counted in the tags' whole
    // seconds) before taking it.
    assert!(started.elapsed() >= Duration::from_secs(29), "took it after {:?}", started.elapsed());
    wait_for_state(new.p.admin, "associated").await;
    assert_eq!(moto.holder(&alloc).await.0.as_deref(), Some(new.id.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_terminated_half_way_through_its_drain_is_taken_from_at_once() {
    let moto = Moto::start().await;
    let (alloc, _) = moto.allocate().await;
    let mut old = member(&moto, &alloc, "1", &["--lifecycle-drain-delay", "60s"]).await;
    wait_for_state(old.p.admin, "associated").await;
    let new = member(&moto, &alloc, "2", &[]).await;
    wait_for_health(old.p.admin, 503, "handing the Elastic IP over").await;

    // The old stack is deleted half-way: its instance goes, without moving the address.
    old.p.child.kill().await.expect("kill the old proxy");
    let deleted = Instant::now();
    moto.ec2.terminate_instances().instance_ids(&old.id).send().await.expect("TerminateInstances");
    let line = wait_for_log(&new.p.logs, "Elastic IP handoff skipped: taking the address", |_| true).await;
    let reason = line["reason"].as_str().unwrap();
    assert!(reason.starts_with(&format!("the holder {} is ", old.id)), "{line}");
    wait_for_state(new.p.admin, "associated").await;
    // Not after the 60 s drain it had announced: at once.
    assert!(deleted.elapsed() < Duration::from_secs(15), "{:?}", deleted.elapsed());
    assert_eq!(moto.holder(&alloc).await.0.as_deref(), Some(new.id.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requester_gone_before_the_move_does_not_get_the_address() {
    let moto = Moto::start().await;
    let (alloc, _) = moto.allocate().await;
    let old = member(&moto, &alloc, "1", &["--lifecycle-drain-delay", "3s"]).await;
    wait_for_state(old.p.admin, "associated").await;
    let mut new = member(&moto, &alloc, "2", &[]).await;
    wait_for_health(old.p.admin, 503, "handing the Elastic IP over").await;
    new.p.child.kill().await.expect("kill the new proxy");
    moto.ec2.terminate_instances().instance_ids(&new.id).send().await.expect("TerminateInstances");

    // The address is not moved to a dead instance: the holder keeps it and serves as before.
    let line = wait_for_log(&old.p.logs, "Elastic IP handoff abandoned", |_| true).await;
    assert_eq!(line["reason"], "the requester is no longer running");
    wait_for_health(old.p.admin, 200, "").await;
    assert_eq!(moto.holder(&alloc).await.0.as_deref(), Some(old.id.as_str()));
    assert_eq!(eip_status(old.p.admin).await["state"], "associated");
    let mut c = within(BOUND, "connect", tokio::net::TcpStream::connect(old.p.proxy)).await.unwrap();
    assert_eq!(round_trip(&mut c, b"still here").await, b"still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_requesters_for_one_address_the_newer_ends_up_with_it() {
    let moto = Moto::start().await;
    let (alloc, _) = moto.allocate().await;
    let old = member(&moto, &alloc, "1", &[]).await;
    wait_for_state(old.p.admin, "associated").await;
    let second = member(&moto, &alloc, "2", &[]).await;
    wait_for_state(second.p.admin, "requesting").await;
    let third = member(&moto, &alloc, "3", &[]).await;

    // Two drains may run before it gets there (the first for the middle one, abandoned when
    // the newest replaced its request): a bound of its own.
    within(CLAIM_BOUND, "the newest instance to hold the address", async {
        while !(moto.holder(&alloc).await.0.as_deref() == Some(third.id.as_str())
            && eip_status(third.p.admin).await["state"] == "associated")
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    wait_for_health(third.p.admin, 200, "").await;
    // The one in between yields (directly, or after holding it for a moment), and nobody
    // takes it back.
    eventually("the middle one to yield", async || {
        let s = eip_status(second.p.admin).await;
        (s["state"] == "lost" || s["state"] == "handed_off") && s["owner"] == third.id.as_str()
    })
    .await;
    let writes = |logs: &Mutex<Vec<serde_json::Value>>| {
        logs.lock()
            .unwrap()
            .iter()
            .filter(|l| l["message"].as_str().is_some_and(|m| m.starts_with("Elastic IP claimed")))
            .count()
    };
    let before = (writes(&old.p.logs), writes(&second.p.logs));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!((writes(&old.p.logs), writes(&second.p.logs)), before, "an older instance took it back");
    assert_eq!(moto.holder(&alloc).await.0.as_deref(), Some(third.id.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_of_one_set_hand_off_one_at_a_time() {
    let moto = Moto::start().await;
    let mut allocs = Vec::new();
    for slot in 1..=3 {
        let (alloc, _) = moto.allocate().await;
        let tag = |k: &str, v: &str| aws_sdk_ec2::types::Tag::builder().key(k).value(v).build();
        moto.ec2
            .create_tags()
            .resources(&alloc)
            .tags(tag("static-ingress:address-set", "addresses-test"))
            .tags(tag("static-ingress:slot", &slot.to_string()))
            .send()
            .await
            .expect("CreateTags");
        allocs.push(alloc);
    }
    let mut olds = Vec::new();
    for alloc in &allocs {
        olds.push(member(&moto, alloc, "1", &[]).await);
    }
    for old in &olds {
        wait_for_state(old.p.admin, "associated").await;
    }
    // The whole new fleet at once, as a release starts it.
    let (a, b, c) = tokio::join!(
        member(&moto, &allocs[0], "2", &[]),
        member(&moto, &allocs[1], "2", &[]),
        member(&moto, &allocs[2], "2", &[])
    );
    let news = [a, b, c];

    // Until every address has moved, never more than one old instance fails /health for a
    // handoff (so two of the three stay announced), and each moves only in its turn.
    let mut most_at_once = 0;
    let mut seen_draining = std::collections::HashSet::new();
    within(Duration::from_secs(120), "every address to be handed over", async {
        loop {
            let mut draining = 0;
            let mut moved = 0;
            for (i, old) in olds.iter().enumerate() {
                let (status, body) = health(old.p.admin).await;
                if status == 503 && body.contains("handing the Elastic IP over") {
                    draining += 1;
                    seen_draining.insert(i);
                }
                if body.contains("was handed over") {
                    moved += 1;
                }
            }
            most_at_once = most_at_once.max(draining);
            if moved == olds.len() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    })
    .await;
    assert_eq!(most_at_once, 1, "more than one address was handing off at once");
    assert_eq!(seen_draining.len(), 3, "some handoff went unseen: {seen_draining:?}");
    for (alloc, new) in allocs.iter().zip(&news) {
        wait_for_state(new.p.admin, "associated").await;
        assert_eq!(moto.holder(alloc).await.0.as_deref(), Some(new.id.as_str()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_scaling_terminating_the_instance_drains_it_and_it_stays_drained_until_it_stops() {
    let moto = Moto::start().await;
    let (alloc, _) = moto.allocate().await;
    let mut m = member(&moto, &alloc, "1", &[]).await;
    m.imds.state.lock().unwrap().lifecycle_state = Some("InService".into());
    wait_for_state(m.p.admin, "associated").await;
    wait_for_log(&m.p.logs, "Auto Scaling lifecycle state", |l| l["lifecycle_state"] == "InService").await;
    let mut long = within(BOUND, "connect", tokio::net::TcpStream::connect(m.p.proxy)).await.unwrap();
    assert_eq!(round_trip(&mut long, b"before").await, b"before");

    // The group decides to terminate it; the lifecycle hook holds it in Terminating:Wait.
    m.imds.state.lock().unwrap().lifecycle_state = Some("Terminated".into());
    wait_for_log(&m.p.logs, "Auto Scaling is terminating this instance", |_| true).await;
    wait_for_health(m.p.admin, 503, "draining").await;
    // Still serving while Route 53 stops announcing the address.
    let mut late = within(BOUND, "connect", tokio::net::TcpStream::connect(m.p.proxy)).await.unwrap();
    assert_eq!(round_trip(&mut late, b"cached answer").await, b"cached answer");
    drop(late);
    // A connection still open at the end of the grace is reset.
    let cut = read_until_closed(&mut long).await;
    assert_eq!(cut.map_err(|e| e.kind()), Err(std::io::ErrorKind::ConnectionReset));
    wait_for_log(&m.p.logs, "drained for Auto Scaling's termination", |_| true).await;

    // It does not exit (systemd would start it again, and it would turn healthy on an instance
    // about to go): drained, refusing connections, /health 503, until the instance stops.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(m.p.child.try_wait().unwrap().is_none(), "the proxy exited after the retirement drain");
    assert_eq!(health(m.p.admin).await.0, 503);
    assert!(tokio::net::TcpStream::connect(m.p.proxy).await.is_err(), "still accepting after the drain");
    let pid = m.p.child.id().expect("running") as i32;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = within(BOUND, "the proxy to exit on SIGTERM", m.p.child.wait()).await.unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requester_whose_backend_is_down_does_not_ask_for_the_address() {
    let moto = Moto::start().await;
    let (alloc, _) = moto.allocate().await;
    let old = member(&moto, &alloc, "1", &[]).await;
    wait_for_state(old.p.admin, "associated").await;
    // A bad release: its backend does not answer.
    let new = member(&moto, &alloc, "2", &["--backend-address", "127.0.0.1:1"]).await;
    let eip = wait_for_state(new.p.admin, "requesting").await;
    assert_eq!(eip["owner"], old.id.as_str());
    eventually("the requester to say why it waits", async || {
        eip_status(new.p.admin).await["error"] == "waiting for a healthy backend before asking for the address"
    })
    .await;
    // The old instance keeps the address, healthy, and was never asked.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(address_tag(&moto, &alloc, "static-ingress:handoff-to").await, "");
    assert_eq!(health(old.p.admin).await.0, 200);
    assert_eq!(eip_status(old.p.admin).await["state"], "associated");
    assert_eq!(moto.holder(&alloc).await.0.as_deref(), Some(old.id.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_during_a_handoff_still_moves_the_address_before_the_proxy_exits() {
    let moto = Moto::start().await;
    let (alloc, _) = moto.allocate().await;
    let mut old = member(&moto, &alloc, "1", &["--lifecycle-drain-delay", "4s"]).await;
    wait_for_state(old.p.admin, "associated").await;
    let new = member(&moto, &alloc, "2", &[]).await;
    wait_for_health(old.p.admin, 503, "handing the Elastic IP over").await;
    // The instance is shut down mid-handoff (its stack deleted, or Auto Scaling).
    let pid = old.p.child.id().expect("running") as i32;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    wait_for_log(&old.p.logs, "a handoff of the Elastic IP is under way", |_| true).await;
    let status = within(CLAIM_BOUND, "the old proxy to exit", old.p.child.wait()).await.unwrap();
    assert_eq!(status.code(), Some(0));
    // It moved the address before it went: the requester did not have to take it.
    let moved = wait_for_log(&old.p.logs, "Elastic IP handed over", |_| true).await;
    assert_eq!(moved["to"], new.id.as_str());
    assert_eq!(moto.holder(&alloc).await.0.as_deref(), Some(new.id.as_str()));
    wait_for_state(new.p.admin, "associated").await;
    let skipped =
        new.p.logs.lock().unwrap().iter().any(|l| l["message"] == "Elastic IP handoff skipped: taking the address");
    assert!(!skipped, "the requester took the address instead of being handed it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_left_by_an_instance_ec2_has_forgotten_does_not_block_the_next_release() {
    let moto = Moto::start().await;
    let (alloc, _) = moto.allocate().await;
    let old = member(&moto, &alloc, "1", &[]).await;
    wait_for_state(old.p.admin, "associated").await;
    // A fresh-looking request from an instance id EC2 does not know (purged long ago).
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let tag = aws_sdk_ec2::types::Tag::builder()
        .key("static-ingress:handoff-to")
        .value(format!("i-0123456789abcdef0 {now} {now}"))
        .build();
    moto.ec2.create_tags().resources(&alloc).tags(tag).send().await.expect("CreateTags");

    let new = member(&moto, &alloc, "2", &[]).await;
    let moved = wait_for_log(&old.p.logs, "Elastic IP handed over", |_| true).await;
    assert_eq!(moved["to"], new.id.as_str());
    wait_for_state(new.p.admin, "associated").await;
}

// Reporting unhealthy to Auto Scaling (static_ingress::eip::unhealthy). moto keeps each
// instance's health as SetInstanceHealth leaves it, but does not replace an unhealthy one.

/// The group tag that marks a report (`static_ingress::eip::unhealthy::REPLACING`).
const REPLACING: &str = "static-ingress:replacing";

fn now_secs() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs()
}

/// A state directory of the test's own, as systemd's `StateDirectory=` gives the unit.
fn state_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("static-ingress-state-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// One start of `run` on an instance whose proxy port is taken: it exits at once. Its exit
/// code and log.
async fn start_on_a_taken_port(
    imds: &Imds,
    moto: &Moto,
    state: &std::path::Path,
    taken: SocketAddr,
) -> (Option<i32>, String) {
    start_on_a_taken_port_as(imds, moto, state, taken, ("testing", "testing")).await
}

async fn start_on_a_taken_port_as(
    imds: &Imds,
    moto: &Moto,
    state: &std::path::Path,
    taken: SocketAddr,
    (key, secret): (&str, &str),
) -> (Option<i32>, String) {
    let mut c = command("run", &imds.endpoint(), &moto.endpoint);
    c.env("AWS_ACCESS_KEY_ID", key).env("AWS_SECRET_ACCESS_KEY", secret);
    c.env("STATE_DIRECTORY", state)
        .args(["--proxy-listen", &taken.to_string(), "--admin-listen", "127.0.0.1:0"])
        .args(["--backend-address", "127.0.0.1:9", "--eip-enabled", "true", "--log-format", "json"])
        .args(["--eip-autoscaling-endpoint", &moto.endpoint, "--eip-report-unhealthy-after", "2s"]);
    let out = within(CLAIM_BOUND, "run to exit", c.output()).await.expect("run runs");
    let log = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("run exited {:?}\n{log}", out.status.code());
    (out.status.code(), log)
}

/// The fleet tag (`static_ingress::eip::unhealthy::FLEET`), as the group propagates it.
const FLEET: &str = "static-ingress:fleet";

/// The record of failed starts in `state` as a restart loop that began `ago` seconds back
/// (`static_ingress::eip::unhealthy::Starts`: since, count, last, next report allowed).
fn failing_for(state: &std::path::Path, ago: u64) {
    let now = now_secs();
    std::fs::write(state.join("failed-starts"), format!("{} 5 {now} 0\n", now - ago)).unwrap();
}

/// Whether a log holds any line of the unhealthy report (reported, held back, failed).
fn mentions_a_report(log: &str) -> bool {
    ["reported this instance unhealthy", "holds back its unhealthy report", "cannot report this instance"]
        .iter()
        .any(|m| log.contains(m))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_whose_port_another_process_holds_reports_its_instance_unhealthy_after_repeated_starts() {
    let moto = Moto::start().await;
    let me = moto.group("blue-1", "blue", 1).await.remove(0);
    let other = moto.group("blue-2", "blue", 1).await.remove(0);
    let imds = Imds::start(&me, Some(&[(FLEET, "blue")])).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let state = state_dir("failing-start");
    let start = || start_on_a_taken_port(&imds, &moto, &state, taken.local_addr().unwrap());

    // The first failed starts are only counted.
    for _ in 0..2 {
        let (code, log) = start().await;
        assert_eq!(code, Some(1));
        assert!(log.contains("startup failed") && log.contains("already listening"), "{log}");
        assert!(!mentions_a_report(&log), "{log}");
    }
    assert_eq!(moto.health("blue-1", &me).await, "Healthy");

    // The third, once eip.report_unhealthy_after (2s) has passed since the first: reported.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (code, log) = start().await;
    assert_eq!(code, Some(1));
    assert!(log.contains("reported this instance unhealthy to its Auto Scaling group"), "{log}");
    assert!(log.contains("in 3 starts over"), "the reason names the failure: {log}");
    assert_eq!(moto.health("blue-1", &me).await, "Unhealthy");
    assert_eq!(moto.health("blue-2", &other).await, "Healthy");
    let mark = moto.group_tag("blue-1", REPLACING).await;
    assert!(mark.starts_with(&format!("{me}@")), "the report is marked on its group: {mark:?}");
    assert_eq!(moto.group_tag("blue-2", REPLACING).await, "");
    // The starts after it do not ask Auto Scaling again.
    let (_, log) = start().await;
    assert!(!mentions_a_report(&log), "{log}");
    let _ = std::fs::remove_dir_all(&state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_binds_clears_the_count_and_other_bind_errors_are_not_counted() {
    let moto = Moto::start().await;
    let me = moto.group("blue-1", "blue", 1).await.remove(0);
    let imds = Imds::start(&me, Some(&[(FLEET, "blue")])).await;
    let state = state_dir("clean-start");
    failing_for(&state, 60);
    // An address this machine does not have: the configuration's fault, not counted.
    let mut c = command("run", &imds.endpoint(), &moto.endpoint);
    c.env("STATE_DIRECTORY", &state)
        .args(["--proxy-listen", "192.0.2.1:4443", "--admin-listen", "127.0.0.1:0", "--backend-address", "127.0.0.1:9"])
        .args(["--eip-enabled", "true", "--log-format", "json", "--eip-autoscaling-endpoint", &moto.endpoint])
        .args(["--eip-report-unhealthy-after", "2s"]);
    let out = within(CLAIM_BOUND, "run to exit", c.output()).await.expect("run runs");
    let log = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(!mentions_a_report(&log), "{log}");
    assert_eq!(moto.health("blue-1", &me).await, "Healthy");
    assert!(state.join("failed-starts").exists());
    // A start that binds its listeners clears the record.
    let mut c = command("run", &imds.endpoint(), &moto.endpoint);
    c.env("STATE_DIRECTORY", &state)
        .args(["--proxy-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--backend-address", "127.0.0.1:9"])
        .args(["--eip-enabled", "true", "--eip-autoscaling-endpoint", &moto.endpoint]);
    let _running = c.spawn().expect("the proxy starts");
    within(BOUND, "the record of failed starts to go", async {
        while state.join("failed-starts").exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let _ = std::fs::remove_dir_all(&state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_policy_allows_every_call_an_unhealthy_report_makes() {
    // Setup: the group (CreateLaunchTemplate, CreateAutoScalingGroup, DescribeAutoScalingGroups)
    // and the IAM user (3 requests).
    let moto = Moto::start_with_iam_after(Some(6)).await;
    let me = moto.group("blue-1", "blue", 1).await.remove(0);
    let (key, secret) = moto.iam_user(&documented_actions_policy()).await;
    let imds = Imds::start(&me, Some(&[(FLEET, "blue")])).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let state = state_dir("policy");

    // Credentials moto does not know: refused, so moto enforces and the next report passed
    // its policy check.
    failing_for(&state, 60);
    let (_, log) = start_on_a_taken_port_as(&imds, &moto, &state, taken.local_addr().unwrap(), ("unknown", "x")).await;
    assert!(log.contains("cannot report this instance unhealthy"), "{log}");
    failing_for(&state, 60);
    let (_, log) = start_on_a_taken_port_as(&imds, &moto, &state, taken.local_addr().unwrap(), (&key, &secret)).await;
    assert!(log.contains("reported this instance unhealthy to its Auto Scaling group"), "{log}");
    assert_eq!(moto.health_as((&key, &secret), "blue-1", &me).await, "Unhealthy");
    let _ = std::fs::remove_dir_all(&state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guard_lets_one_instance_of_a_fleet_report_at_a_time_and_never_churns_a_group() {
    let moto = Moto::start().await;
    let me = moto.group("blue-1", "blue", 1).await.remove(0);
    let other = moto.group("blue-2", "blue", 1).await.remove(0);
    // Another fleet's instance, unhealthy: it does not hold this fleet back.
    let stranger = moto.group("green-1", "green", 1).await.remove(0);
    moto.set_health(&stranger, "Unhealthy").await;
    let imds = Imds::start(&me, Some(&[(FLEET, "blue")])).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let state = state_dir("guard");
    let start = || async {
        failing_for(&state, 60);
        start_on_a_taken_port(&imds, &moto, &state, taken.local_addr().unwrap()).await.1
    };

    // Another instance of the fleet is unhealthy (its group is replacing it): held back.
    moto.set_health(&other, "Unhealthy").await;
    let log = start().await;
    assert!(log.contains("the guard holds back its unhealthy report"), "{log}");
    assert!(log.contains(&format!("{other} of group blue-2 is InService and Unhealthy")), "{log}");
    assert_eq!(moto.health("blue-1", &me).await, "Healthy");
    assert_eq!(moto.group_tag("blue-1", REPLACING).await, "", "nothing marked");

    // It is healthy again, but reported itself a minute ago: still held back.
    moto.set_health(&other, "Healthy").await;
    moto.tag_group("blue-2", REPLACING, &format!("{other}@{}", now_secs() - 60)).await;
    let log = start().await;
    assert!(log.contains(&format!("{other} (group blue-2) reported itself unhealthy")), "{log}");
    assert_eq!(moto.health("blue-1", &me).await, "Healthy");

    // The instance this one replaced in its own group reported an hour ago: the replacement
    // fails the same way, so the fault is shared: held back.
    moto.tag_group("blue-2", REPLACING, &format!("{other}@{}", now_secs() - 16 * 60)).await;
    moto.tag_group("blue-1", REPLACING, &format!("i-0000000000000dead@{}", now_secs() - 3600)).await;
    let log = start().await;
    assert!(log.contains("not replaced again"), "{log}");
    assert_eq!(moto.health("blue-1", &me).await, "Healthy");

    // Without a fleet tag on the instance nothing guards a report: held back.
    moto.tag_group("blue-1", REPLACING, "").await;
    let untagged = Imds::start(&me, Some(&[])).await;
    failing_for(&state, 60);
    let (_, log) = start_on_a_taken_port(&untagged, &moto, &state, taken.local_addr().unwrap()).await;
    assert!(log.contains("has no static-ingress:fleet tag"), "{log}");

    // Every earlier report older than its window: this one goes ahead.
    let log = start().await;
    assert!(log.contains("reported this instance unhealthy to its Auto Scaling group"), "{log}");
    assert_eq!(moto.health("blue-1", &me).await, "Unhealthy");
    assert_eq!(moto.health("blue-2", &other).await, "Healthy");
    let _ = std::fs::remove_dir_all(&state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neither_a_failing_claim_nor_a_backend_outage_is_reported() {
    let moto = Moto::start().await;
    let me = moto.group("down-1", "down", 1).await.remove(0);
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    // Its address does not exist (the claim fails for good) and its backend is down: both
    // shared by the fleet, not this instance's own.
    let imds = Imds::start(&me, Some(&[(TAG_KEY, "eipalloc-00000000000dead00"), (FLEET, "down")])).await;
    let args = [
        "--eip-autoscaling-endpoint",
        &moto.endpoint,
        "--eip-report-unhealthy-after",
        "1s",
        "--backend-address",
        &closed,
        "--health-interval",
        "200ms",
    ];
    let p = run_with_eip(&imds.endpoint(), &moto.endpoint, &args).await;
    wait_for_state(p.admin, "failed").await;
    wait_for_health(p.admin, 503, "").await;
    // Many times the 1s bound later: nothing reported, marked or even tried.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(health(p.admin).await.0, 503, "the backend is still down");
    assert_eq!(moto.health("down-1", &me).await, "Healthy");
    assert_eq!(moto.group_tag("down-1", REPLACING).await, "");
    let messages: Vec<String> =
        p.logs.lock().unwrap().iter().filter_map(|l| l["message"].as_str().map(str::to_string)).collect();
    assert!(!mentions_a_report(&messages.join("\n")), "{messages:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_instance_lets_auto_scaling_terminate_it_at_once() {
    let moto = Moto::start().await;
    let (alloc, _) = moto.allocate().await;
    let id = moto.group("retiring-1", "retiring", 1).await.remove(0);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let proxy = Ec2Proxy::start(&moto.endpoint, Lag::default(), Arc::clone(&seen)).await;
    let imds = Imds::start(&id, Some(&[(TAG_KEY, &alloc)])).await;
    imds.state.lock().unwrap().lifecycle_state = Some("InService".into());
    let args = [
        "--eip-autoscaling-endpoint",
        &proxy.endpoint(),
        "--lifecycle-drain-delay",
        "1s",
        "--lifecycle-grace-period",
        "1s",
    ];
    let mut p = run_with_eip(&imds.endpoint(), &proxy.endpoint(), &args).await;
    wait_for_state(p.admin, "associated").await;
    assert!(seen.lock().unwrap().lifecycle_actions.is_empty());

    imds.state.lock().unwrap().lifecycle_state = Some("Terminated".into());
    let told = wait_for_log(&p.logs, "told Auto Scaling the drain is done", |_| true).await;
    assert_eq!(told["group"], "retiring-1");
    // After the drain, not before.
    let lines: Vec<String> =
        p.logs.lock().unwrap().iter().filter_map(|l| l["message"].as_str().map(str::to_string)).collect();
    let at = |m: &str| lines.iter().position(|l| l.starts_with(m)).unwrap_or_else(|| panic!("no {m:?} in {lines:?}"));
    assert!(at("drained for Auto Scaling's termination") < at("told Auto Scaling the drain is done"));
    let actions = seen.lock().unwrap().lifecycle_actions.clone();
    assert_eq!(actions.len(), 1, "{actions:?}");
    let form = &actions[0].1;
    for field in [
        "LifecycleHookName=static-ingress-drain".to_string(),
        "AutoScalingGroupName=retiring-1".to_string(),
        format!("InstanceId={id}"),
        "LifecycleActionResult=CONTINUE".to_string(),
    ] {
        assert!(form.split('&').any(|f| f == field), "{field} not in {form}");
    }
    // Still drained until the instance stops.
    assert_eq!(health(p.admin).await.0, 503);
    let pid = p.child.id().expect("running") as i32;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = within(BOUND, "the proxy to exit on SIGTERM", p.child.wait()).await.unwrap();
    assert_eq!(status.code(), Some(0));
}
