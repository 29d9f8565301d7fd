//! AWS for the Elastic IP tests: a real EC2 emulator (moto, in server mode, installed by
//! `scripts/python-tools.sh`) on loopback, and a small IMDSv2 stand-in, because moto has no
//! instance metadata service.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use aws_config::{BehaviorVersion, Region};
use aws_sdk_ec2::config::Credentials;
use aws_sdk_ec2::types::{Filter, ResourceType, Tag, TagSpecification};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;

pub const REGION: &str = "us-east-1";
pub const TAG_KEY: &str = "static-ingress:eip-allocation-id";
const MOTO_START: Duration = Duration::from_secs(60);

/// The directory of the test virtualenv's programs, installing it on first use. The tests of
/// this binary all ask at once; the install runs once and the others wait for its answer. A
/// failure is kept too: every test then reports it, and none starts the install again.
fn python_tools() -> String {
    static BIN: OnceLock<Result<String, String>> = OnceLock::new();
    BIN.get_or_init(install_python_tools).clone().unwrap_or_else(|e| panic!("{e}"))
}

/// How many times this test binary ran `scripts/python-tools.sh`.
static INSTALLS: AtomicUsize = AtomicUsize::new(0);

fn install_python_tools() -> Result<String, String> {
    INSTALLS.fetch_add(1, Ordering::SeqCst);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/python-tools.sh");
    let out = std::process::Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("{} does not run: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!("{} failed ({})", script.display(), out.status));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let bin = stdout.lines().last().ok_or_else(|| format!("{} printed no bin directory", script.display()))?;
    Ok(bin.to_string())
}

#[test]
fn python_tools_are_installed_once_per_test_binary() {
    let bins: Vec<String> = std::thread::scope(|s| {
        let askers: Vec<_> = (0..4).map(|_| s.spawn(python_tools)).collect();
        askers.into_iter().map(|a| a.join().expect("python_tools does not panic")).collect()
    });
    assert!(bins.iter().all(|b| *b == bins[0]), "different answers: {bins:?}");
    assert!(Path::new(&bins[0]).join("moto_server").is_file(), "no moto_server in {}", bins[0]);
    assert_eq!(INSTALLS.load(Ordering::SeqCst), 1, "python-tools.sh ran more than once");
}

/// A `moto_server` process of this test's own, killed (by its PID) when dropped.
pub struct Moto {
    _child: tokio::process::Child,
    bin: String,
    pub endpoint: String,
    pub ec2: aws_sdk_ec2::Client,
    pub asg: aws_sdk_autoscaling::Client,
}

impl Moto {
    pub async fn start() -> Moto {
        Moto::start_with_iam_after(None).await
    }

    /// With `Some(n)`, moto serves `n` requests without checking credentials (the test's
    /// setup), then enforces IAM policies on every request.
    pub async fn start_with_iam_after(free_requests: Option<u32>) -> Moto {
        let bin = tokio::task::spawn_blocking(python_tools).await.expect("python_tools does not panic");
        let mut command = tokio::process::Command::new(format!("{bin}/moto_server"));
        if let Some(n) = free_requests {
            command.env("INITIAL_NO_AUTH_ACTION_COUNT", n.to_string());
        }
        // Port 0: moto's server binds a free port itself and logs the address it listens on,
        // before it serves, so the address is known without guessing a port or polling one.
        let mut child = command
            .args(["-H", "127.0.0.1", "-p", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("moto_server starts");
        let mut log = BufReader::new(child.stderr.take().expect("stderr is piped")).lines();
        // moto imports a lot of Python at start: allow it more than the usual bound.
        let addr = crate::common::within(MOTO_START, "moto_server to log its address", async {
            let mut seen = Vec::new();
            while let Some(line) = log.next_line().await.expect("read moto_server's log") {
                if let Some(addr) = listening_on(&line) {
                    return addr;
                }
                seen.push(line);
            }
            panic!("moto_server exited without saying where it listens:\n{}", seen.join("\n"));
        })
        .await;
        // It logs every request there too: keep reading, so a full pipe never stalls it.
        tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });
        let endpoint = format!("http://{addr}");
        let ec2 = client(&endpoint, "testing", "testing").await;
        let asg = aws_sdk_autoscaling::Client::new(&sdk_config(&endpoint, "testing", "testing").await);
        Moto { _child: child, bin, endpoint, ec2, asg }
    }

    /// Creates an IAM user whose only permissions are `policy` (3 requests); returns its
    /// access key id and secret.
    pub async fn iam_user(&self, policy: &str) -> (String, String) {
        // One moto per test, so its port makes the name unique.
        let port = self.endpoint.rsplit(':').next().unwrap_or("0");
        let file = std::env::temp_dir().join(format!("static-ingress-policy-{port}.json"));
        std::fs::write(&file, policy).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/iam_user.py");
        let out = tokio::process::Command::new(format!("{}/python", self.bin))
            .arg(&script)
            .arg(&self.endpoint)
            .arg(&file)
            .output()
            .await
            .expect("iam_user.py runs");
        let _ = std::fs::remove_file(&file);
        assert!(out.status.success(), "iam_user.py: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        let (id, secret) = text.trim().split_once(' ').expect("KEY SECRET");
        (id.to_string(), secret.to_string())
    }

    /// An Auto Scaling group of `size` instances (moto launches them at once), tagged
    /// `static-ingress:fleet = fleet`; returns the instances' ids.
    pub async fn group(&self, name: &str, fleet: &str, size: i32) -> Vec<String> {
        use aws_sdk_autoscaling::types::{LaunchTemplateSpecification, Tag as GroupTag};
        let template = format!("{name}-template");
        let data = aws_sdk_ec2::types::RequestLaunchTemplateData::builder().image_id("ami-12c6146b").build();
        self.ec2
            .create_launch_template()
            .launch_template_name(&template)
            .launch_template_data(data)
            .send()
            .await
            .expect("CreateLaunchTemplate");
        let tag = GroupTag::builder()
            .key("static-ingress:fleet")
            .value(fleet)
            .propagate_at_launch(true)
            .resource_id(name)
            .resource_type("auto-scaling-group")
            .build();
        self.asg
            .create_auto_scaling_group()
            .auto_scaling_group_name(name)
            .launch_template(LaunchTemplateSpecification::builder().launch_template_name(&template).build())
            .min_size(size)
            .max_size(size)
            .desired_capacity(size)
            .availability_zones(format!("{REGION}a"))
            .tags(tag)
            .send()
            .await
            .expect("CreateAutoScalingGroup");
        let mut ids: Vec<String> = self
            .instances_of(name)
            .await
            .into_iter()
            .map(|i| i.instance_id().unwrap_or_default().to_string())
            .collect();
        ids.sort();
        assert_eq!(ids.len(), size as usize, "moto launched the group's instances");
        ids
    }

    async fn instances_of(&self, group: &str) -> Vec<aws_sdk_autoscaling::types::Instance> {
        let out = self
            .asg
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(group)
            .send()
            .await
            .expect("DescribeAutoScalingGroups");
        out.auto_scaling_groups()[0].instances().to_vec()
    }

    /// `Healthy` or `Unhealthy`, as the group sees `instance`.
    pub async fn health(&self, group: &str, instance: &str) -> String {
        self.health_as(("testing", "testing"), group, instance).await
    }

    /// [`Moto::health`], asked with other credentials (once moto enforces IAM).
    pub async fn health_as(&self, (key, secret): (&str, &str), group: &str, instance: &str) -> String {
        let asg = aws_sdk_autoscaling::Client::new(&sdk_config(&self.endpoint, key, secret).await);
        let out = asg
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(group)
            .send()
            .await
            .expect("DescribeAutoScalingGroups");
        let instances = out.auto_scaling_groups()[0].instances().to_vec();
        let found = instances.iter().find(|i| i.instance_id() == Some(instance)).expect("the instance is in the group");
        found.health_status().unwrap_or_default().to_string()
    }

    /// Marks `instance` as its group would see it after a failed health check.
    pub async fn set_health(&self, instance: &str, health: &str) {
        self.asg
            .set_instance_health()
            .instance_id(instance)
            .health_status(health)
            .send()
            .await
            .expect("SetInstanceHealth");
    }

    /// The value of tag `key` on the group (empty when it has none).
    pub async fn group_tag(&self, group: &str, key: &str) -> String {
        let out = self
            .asg
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(group)
            .send()
            .await
            .expect("DescribeAutoScalingGroups");
        let tags = out.auto_scaling_groups()[0].tags();
        tags.iter().find(|t| t.key() == Some(key)).and_then(|t| t.value()).unwrap_or_default().to_string()
    }

    /// Sets tag `key` on the group.
    pub async fn tag_group(&self, group: &str, key: &str, value: &str) {
        let tag = aws_sdk_autoscaling::types::Tag::builder()
            .key(key)
            .value(value)
            .propagate_at_launch(false)
            .resource_id(group)
            .resource_type("auto-scaling-group")
            .build();
        self.asg.create_or_update_tags().tags(tag).send().await.expect("CreateOrUpdateTags");
    }

    /// Launches an instance carrying `tags`, and returns its id.
    pub async fn launch(&self, tags: &[(&str, &str)]) -> String {
        let mut spec = TagSpecification::builder().resource_type(ResourceType::Instance);
        for (k, v) in tags {
            spec = spec.tags(Tag::builder().key(*k).value(*v).build());
        }
        let mut req = self.ec2.run_instances().image_id("ami-12c6146b").min_count(1).max_count(1);
        if !tags.is_empty() {
            req = req.tag_specifications(spec.build());
        }
        let out = req.send().await.expect("RunInstances");
        out.instances()[0].instance_id().unwrap().to_string()
    }

    /// Allocates an Elastic IP tagged as the appliance's; returns (allocation id, public IP).
    pub async fn allocate(&self) -> (String, String) {
        let out = self
            .ec2
            .allocate_address()
            .domain(aws_sdk_ec2::types::DomainType::Vpc)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::ElasticIp)
                    .tags(Tag::builder().key("static-ingress:managed").value("true").build())
                    .build(),
            )
            .send()
            .await
            .expect("AllocateAddress");
        (out.allocation_id().unwrap().to_string(), out.public_ip().unwrap().to_string())
    }

    pub async fn associate(&self, allocation: &str, instance: &str) -> String {
        let out = self
            .ec2
            .associate_address()
            .allocation_id(allocation)
            .instance_id(instance)
            .allow_reassociation(true)
            .send()
            .await
            .expect("AssociateAddress");
        out.association_id().unwrap_or_default().to_string()
    }

    /// (instance id, association id) of the allocation, as EC2 sees it now.
    pub async fn holder(&self, allocation: &str) -> (Option<String>, Option<String>) {
        holder(&self.ec2, allocation).await
    }

    /// [`Moto::holder`], asked with other credentials (once moto enforces IAM).
    pub async fn holder_as(&self, key: &str, secret: &str, allocation: &str) -> (Option<String>, Option<String>) {
        holder(&client(&self.endpoint, key, secret).await, allocation).await
    }
}

/// The address in werkzeug's start-up line, ` * Running on http://127.0.0.1:PORT`.
fn listening_on(line: &str) -> Option<SocketAddr> {
    let rest = line.split_once("Running on http://")?.1;
    rest.split(|c: char| c.is_whitespace() || c == '/' || c == '\u{1b}').next()?.parse().ok()
}

#[test]
fn the_address_moto_logs_is_read() {
    assert_eq!(listening_on(" * Running on http://127.0.0.1:34703"), Some(SocketAddr::from(([127, 0, 0, 1], 34703))));
    assert_eq!(
        listening_on("\u{1b}[1m * Running on http://127.0.0.1:80/\u{1b}[0m"),
        Some(SocketAddr::from(([127, 0, 0, 1], 80)))
    );
    assert_eq!(listening_on("Press CTRL+C to quit"), None);
}

async fn holder(ec2: &aws_sdk_ec2::Client, allocation: &str) -> (Option<String>, Option<String>) {
    let out = ec2
        .describe_addresses()
        .filters(Filter::builder().name("allocation-id").values(allocation).build())
        .send()
        .await
        .expect("DescribeAddresses");
    let a = &out.addresses()[0];
    let some = |s: Option<&str>| s.filter(|s| !s.is_empty()).map(str::to_string);
    (some(a.instance_id()), some(a.association_id()))
}

async fn client(endpoint: &str, key: &str, secret: &str) -> aws_sdk_ec2::Client {
    aws_sdk_ec2::Client::new(&sdk_config(endpoint, key, secret).await)
}

async fn sdk_config(endpoint: &str, key: &str, secret: &str) -> aws_config::SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .credentials_provider(Credentials::new(key, secret, None, None, "test"))
        .endpoint_url(endpoint)
        .http_client(static_ingress::eip::aws::http_client())
        .load()
        .await
}

/// What the IMDS stand-in serves, and what it saw.
#[derive(Debug, Default)]
pub struct ImdsState {
    pub instance_id: String,
    pub region: String,
    /// `None`: the instance's metadata options do not include tags (every tag path is 404).
    pub tags: Option<HashMap<String, String>>,
    pub tokens: Vec<String>,
    pub token_puts: usize,
    /// GETs without a valid token: an IMDSv1 client would make these. Answered 401.
    pub unauthorized: usize,
    pub gets: usize,
    /// `/latest/meta-data/autoscaling/target-lifecycle-state`; `None`: 404, not in a group.
    pub lifecycle_state: Option<String>,
}

/// A small IMDSv2: `PUT /latest/api/token` with a TTL header hands out a token; a `GET` without
/// a valid token is 401, as on an instance with `HttpTokens: required`.
pub struct Imds {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<ImdsState>>,
}

impl Imds {
    pub async fn start(instance_id: &str, tags: Option<&[(&str, &str)]>) -> Imds {
        let state = Arc::new(Mutex::new(ImdsState {
            instance_id: instance_id.to_string(),
            region: REGION.to_string(),
            tags: tags.map(|t| t.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            ..ImdsState::default()
        }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = Arc::clone(&state);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let state = Arc::clone(&served);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, std::convert::Infallible>(answer(&state, &req)) }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
        });
        Imds { addr, state }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn answer(state: &Mutex<ImdsState>, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let mut s = state.lock().unwrap();
    let reply = |status: StatusCode, body: String| {
        Response::builder().status(status).body(Full::new(Bytes::from(body))).unwrap()
    };
    if req.method() == Method::PUT && req.uri().path() == "/latest/api/token" {
        // As IMDS does: the TTL asked for is required, and echoed with the token.
        let Some(ttl) = req.headers().get("x-aws-ec2-metadata-token-ttl-seconds").cloned() else {
            return reply(StatusCode::BAD_REQUEST, String::new());
        };
        s.token_puts += 1;
        let token = format!("token-{}-{}", s.token_puts, std::process::id());
        s.tokens.push(token.clone());
        let mut response = reply(StatusCode::OK, token);
        response.headers_mut().insert("x-aws-ec2-metadata-token-ttl-seconds", ttl);
        return response;
    }
    if req.method() != Method::GET {
        return reply(StatusCode::METHOD_NOT_ALLOWED, String::new());
    }
    let token = req.headers().get("x-aws-ec2-metadata-token").and_then(|v| v.to_str().ok()).unwrap_or("");
    if !s.tokens.iter().any(|t| t == token) {
        s.unauthorized += 1;
        return reply(StatusCode::UNAUTHORIZED, String::new());
    }
    s.gets += 1;
    let path = req.uri().path();
    let found = match path {
        "/latest/meta-data/instance-id" => Some(s.instance_id.clone()),
        "/latest/meta-data/placement/region" => Some(s.region.clone()),
        "/latest/meta-data/autoscaling/target-lifecycle-state" => s.lifecycle_state.clone(),
        "/latest/meta-data/tags/instance" => s.tags.as_ref().map(|t| t.keys().cloned().collect::<Vec<_>>().join("\n")),
        _ => path
            .strip_prefix("/latest/meta-data/tags/instance/")
            .and_then(|key| s.tags.as_ref().and_then(|t| t.get(key).cloned())),
    };
    match found {
        Some(body) => reply(StatusCode::OK, body),
        None => reply(StatusCode::NOT_FOUND, String::new()),
    }
}
