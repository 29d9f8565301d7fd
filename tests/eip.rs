//! The Elastic IP claim against a real EC2 emulator (moto in server mode) and an IMDSv2
//! stand-in: `claim-eip` as an operator runs it, and `run` claiming in the background and
//! noticing when a newer fleet takes the address.

#[path = "common/aws.rs"]
mod aws;
mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use aws::{Imds, Moto, TAG_KEY};
use common::*;

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
    let started = Instant::now();
    let mut c = command("claim-eip", &imds.endpoint(), &moto.endpoint);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_free_address_is_claimed_and_confirmed() {
    let moto = Moto::start().await;
    let (alloc, ip) = moto.allocate().await;
    let me = moto.launch(&[(TAG_KEY, &alloc)]).await;
    let imds = Imds::start(&me, Some(&[(TAG_KEY, &alloc)])).await;

    let c = claim_eip(&imds, &moto, &[]).await;
    assert_eq!(c.code, Some(0), "{}", c.stderr);
    assert_eq!(moto.holder(&alloc).await.0.as_deref(), Some(me.as_str()));
    for line in [
        format!("instance:   {me} in us-east-1 (from instance metadata, IMDSv2)"),
        format!("allocation: {alloc} (from instance tag {TAG_KEY}, read from instance metadata)"),
        format!("address:    {ip}, was not associated"),
        "result:     associated (eipassoc-".to_string(),
        // 3 metadata reads (instance id, region, tag); DescribeAddresses, AssociateAddress,
        // and at least one DescribeAddresses to confirm.
        "calls:      3 instance metadata, 2 EC2 reads, 1 EC2 write".to_string(),
    ] {
        assert!(c.stdout.contains(&line), "missing {line:?} in:\n{}", c.stdout);
    }
    // IMDSv2 only: every metadata read carried a token.
    let s = imds.state.lock().unwrap();
    assert_eq!(s.unauthorized, 0, "a metadata request came without a token (IMDSv1)");
    assert!(s.token_puts >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_held_by_another_instance_is_taken() {
    let moto = Moto::start().await;
    let (alloc, ip) = moto.allocate().await;
    let old = moto.launch(&[(TAG_KEY, &alloc)]).await;
    let old_association = moto.associate(&alloc, &old).await;
    let new = moto.launch(&[(TAG_KEY, &alloc)]).await;
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
async fn an_old_instance_does_not_take_its_address_back_from_a_newer_one() {
    let moto = Moto::start().await;
    let (alloc, _) = moto.allocate().await;
    let old = moto.launch(&[(TAG_KEY, &alloc)]).await;
    // Launch times have a resolution of a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let newer = moto.launch(&[(TAG_KEY, &alloc)]).await;
    let association = moto.associate(&alloc, &newer).await;
    // The old fleet's proxy restarts (a crash, a reboot) and claims again.
    let imds = Imds::start(&old, Some(&[(TAG_KEY, &alloc)])).await;

    let c = claim_eip(&imds, &moto, &[]).await;
    assert_eq!(c.code, Some(15), "{}", c.stderr);
    assert!(
        error_line(&c).starts_with(&format!(
            "error: {alloc} is held by {newer}, launched after {old}: a newer fleet has it, so this instance does \
             not take it back"
        )),
        "{}",
        c.stderr
    );
    assert_eq!(moto.holder(&alloc).await, (Some(newer), Some(association)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_changes_nothing() {
    let moto = Moto::start().await;
    let (alloc, _) = moto.allocate().await;
    let old = moto.launch(&[]).await;
    let association = moto.associate(&alloc, &old).await;
    let me = moto.launch(&[(TAG_KEY, &alloc)]).await;
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
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
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
    let me = moto.launch(&[(TAG_KEY, &alloc)]).await;
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
    // DescribeTags, DescribeAddresses, DescribeInstances, DescribeAddresses to confirm.
    assert!(stdout.contains("4 EC2 reads, 1 EC2 write"), "{stdout}");
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

/// A running proxy with the claim on; its admin address for /status and /metrics.
struct Running {
    _child: tokio::process::Child,
    _backend: Backend,
    admin: SocketAddr,
}

async fn run_with_eip(imds: &str, moto: &str, extra: &[&str]) -> Running {
    let backend = Backend::echo().await;
    let port = |()| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (proxy, admin) = (port(()), port(()));
    let mut cmd = command("run", imds, moto);
    cmd.args(["--backend-address", &backend.addr.to_string()])
        .args(["--proxy-listen", &proxy.to_string(), "--admin-listen", &admin.to_string()])
        .args(["--eip-enabled", "true", "--lifecycle-drain-delay", "0s"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = cmd.spawn().expect("the proxy starts");
    // Serving at once, whatever the claim is doing.
    eventually("the proxy to serve", async || match tokio::net::TcpStream::connect(proxy).await {
        Ok(mut s) => round_trip(&mut s, b"ping").await == b"ping",
        Err(_) => false,
    })
    .await;
    Running { _child: child, _backend: backend, admin }
}

async fn eip_status(admin: SocketAddr) -> serde_json::Value {
    let body = get(admin, "/status").await.body;
    let status: serde_json::Value = serde_json::from_str(&body).expect("/status is JSON");
    status["eip"].clone()
}

async fn eip_metric(admin: SocketAddr) -> Option<f64> {
    let body = get(admin, "/metrics").await.body;
    body.lines().find_map(|l| l.strip_prefix("static_ingress_eip_associated ")).and_then(|v| v.parse().ok())
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
async fn run_claims_in_the_background_and_notices_when_a_newer_fleet_takes_it() {
    let moto = Moto::start().await;
    let (alloc, ip) = moto.allocate().await;
    let me = moto.launch(&[(TAG_KEY, &alloc)]).await;
    let imds = Imds::start(&me, Some(&[(TAG_KEY, &alloc)])).await;
    let p = run_with_eip(&imds.endpoint(), &moto.endpoint, &["--eip-check-interval", "200ms"]).await;

    let eip = wait_for_state(p.admin, "associated").await;
    assert_eq!(eip["allocation_id"], alloc.as_str());
    assert_eq!(eip["public_ip"], ip.as_str());
    assert_eq!(eip["instance_id"], me.as_str());
    assert_eq!(eip_metric(p.admin).await, Some(1.0));
    assert_eq!(moto.holder(&alloc).await.0.as_deref(), Some(me.as_str()));

    // A newer fleet's instance takes the address.
    let newer = moto.launch(&[(TAG_KEY, &alloc)]).await;
    moto.associate(&alloc, &newer).await;
    let eip = wait_for_state(p.admin, "lost").await;
    assert_eq!(eip["owner"], newer.as_str());
    assert_eq!(eip_metric(p.admin).await, Some(0.0));
    // Not fought over: the newer instance keeps it through several checks.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(moto.holder(&alloc).await.0.as_deref(), Some(newer.as_str()));
    assert_eq!(eip_status(p.admin).await["state"], "lost");
    // The proxy still serves and stays healthy: losing the address is not an error.
    assert_eq!(get(p.admin, "/health").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_at_once_while_the_claim_is_stuck() {
    let moto = Moto::start().await;
    // Instance metadata that accepts connections and never answers.
    let stuck = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stuck_addr = stuck.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = stuck.accept().await {
            open.push(s);
        }
    });
    let p = run_with_eip(&format!("http://{stuck_addr}"), &moto.endpoint, &[]).await;

    // `run_with_eip` returned once a connection went through the proxy; the claim is still on.
    assert_eq!(eip_status(p.admin).await["state"], "claiming");
    assert_eq!(eip_metric(p.admin).await, Some(0.0));
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
    assert_eq!(eip_metric(p.admin).await, Some(0.0));
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
