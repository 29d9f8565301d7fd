//! The AWS APIs the appliance talks to, each call counted, and API calls retried under the
//! caller's deadline:
//!
//! - the instance metadata service, IMDSv2 only (aws-config's client: a token from a `PUT`,
//!   then `GET`s with it; it never falls back to IMDSv1), for the instance id, the region and
//!   the instance's tags;
//! - EC2 (aws-sdk-ec2) and Auto Scaling (aws-sdk-autoscaling), on rustls with ring. The SDKs'
//!   own retries are off: this module retries, so that one deadline bounds the whole claim
//!   (or report) and every retry is logged.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use aws_config::default_provider::credentials::DefaultCredentialsChain;
use aws_config::imds::client::error::ImdsError;
use aws_config::provider_config::ProviderConfig;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::Filter;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use tokio::time::Instant;

use super::error::{ClaimError, Class, classify, describe};
use super::newer::{GENERATION_TAG, Rank, parse_generation};
use crate::config::EipConfig;

/// Where IMDS is when `eip.imds_endpoint` is empty.
pub const DEFAULT_IMDS: &str = "http://169.254.169.254";

/// First retry delay; each later one doubles, up to [`BACKOFF_CAP`], with jitter.
const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(8);

/// How many calls a claim made, for its report and the closing log line.
#[derive(Debug, Default)]
pub struct Calls {
    pub imds: AtomicU32,
    pub ec2_reads: AtomicU32,
    pub ec2_writes: AtomicU32,
    /// Auto Scaling calls (not in [`Calls::snapshot`], which a claim reports).
    pub autoscaling: AtomicU32,
}

impl Calls {
    pub fn snapshot(&self) -> (u32, u32, u32) {
        (
            self.imds.load(Ordering::Relaxed),
            self.ec2_reads.load(Ordering::Relaxed),
            self.ec2_writes.load(Ordering::Relaxed),
        )
    }
}

/// The instance metadata service.
pub struct Metadata {
    client: aws_config::imds::Client,
    endpoint: String,
}

/// What an instance tag lookup in IMDS found.
pub enum TagLookup {
    Found(String),
    /// The instance's metadata serves tags, but not this one.
    Absent,
    /// The instance's metadata options do not include tags.
    NotEnabled,
}

impl Metadata {
    pub fn new(config: &EipConfig, provider: &ProviderConfig) -> Result<Metadata, ClaimError> {
        let endpoint = config.imds_endpoint.clone().unwrap_or_else(|| DEFAULT_IMDS.to_string());
        // Retry connect timeouts too (aws-config retries only 5xx and 401 by default): a busy
        // instance can be slow to answer right after boot.
        let classifier =
            aws_config::imds::client::ImdsResponseRetryClassifier::default().with_retry_connect_timeouts(true);
        let builder = aws_config::imds::Client::builder()
            .configure(provider)
            .max_attempts(4)
            .connect_timeout(Duration::from_secs(1))
            .read_timeout(Duration::from_secs(2))
            .retry_classifier(aws_smithy_runtime_api::client::retries::classifiers::SharedRetryClassifier::new(
                classifier,
            ));
        let builder = builder.endpoint(&endpoint).map_err(|e| ClaimError::Metadata {
            what: "instance id",
            endpoint: endpoint.clone(),
            detail: format!("invalid endpoint: {e}"),
        })?;
        Ok(Metadata { client: builder.build(), endpoint })
    }

    pub fn client(&self) -> aws_config::imds::Client {
        self.client.clone()
    }

    async fn get(&self, what: &'static str, path: &str, calls: &Calls) -> Result<String, ImdsFailure> {
        calls.imds.fetch_add(1, Ordering::Relaxed);
        match self.client.get(path).await {
            Ok(v) => Ok(String::from(v).trim().to_string()),
            Err(ImdsError::ErrorResponse(r)) if r.response().status().as_u16() == 404 => Err(ImdsFailure::NotFound),
            Err(e) => Err(ImdsFailure::Error(self.error(what, &e))),
        }
    }

    fn error(&self, what: &'static str, e: &ImdsError) -> ClaimError {
        let detail = match e {
            ImdsError::ErrorResponse(r) => format!("HTTP {}", r.response().status().as_u16()),
            // The useful part (connection refused, a timeout...) is further down the chain.
            _ => crate::logging::error_chain(e),
        };
        ClaimError::Metadata { what, endpoint: self.endpoint.clone(), detail }
    }

    pub async fn instance_id(&self, calls: &Calls) -> Result<String, ClaimError> {
        self.required("instance id", "/latest/meta-data/instance-id", calls).await
    }

    pub async fn region(&self, calls: &Calls) -> Result<String, ClaimError> {
        self.required("region", "/latest/meta-data/placement/region", calls).await
    }

    async fn required(&self, what: &'static str, path: &str, calls: &Calls) -> Result<String, ClaimError> {
        match self.get(what, path, calls).await {
            Ok(v) if !v.is_empty() => Ok(v),
            Ok(_) | Err(ImdsFailure::NotFound) => {
                Err(ClaimError::Metadata { what, endpoint: self.endpoint.clone(), detail: format!("{path} is empty") })
            }
            Err(ImdsFailure::Error(e)) => Err(e),
        }
    }

    /// The Auto Scaling lifecycle state Auto Scaling has decided for this instance
    /// (`InService`, `Terminated`, ...); `None` when the instance is not in a group.
    pub async fn target_lifecycle_state(&self, calls: &Calls) -> Result<Option<String>, ClaimError> {
        match self
            .get("Auto Scaling lifecycle state", "/latest/meta-data/autoscaling/target-lifecycle-state", calls)
            .await
        {
            Ok(v) => Ok(Some(v)),
            Err(ImdsFailure::NotFound) => Ok(None),
            Err(ImdsFailure::Error(e)) => Err(e),
        }
    }

    /// The value of this instance's tag `key`, served when the launch template enables
    /// instance metadata tags.
    pub async fn tag(&self, key: &str, calls: &Calls) -> Result<TagLookup, ClaimError> {
        match self.get("instance tags", &format!("/latest/meta-data/tags/instance/{key}"), calls).await {
            Ok(v) => Ok(TagLookup::Found(v)),
            Err(ImdsFailure::Error(e)) => Err(e),
            // 404 both when tags are off and when this key is missing; the listing tells which.
            Err(ImdsFailure::NotFound) => {
                match self.get("instance tags", "/latest/meta-data/tags/instance", calls).await {
                    Ok(_) => Ok(TagLookup::Absent),
                    Err(ImdsFailure::NotFound) => Ok(TagLookup::NotEnabled),
                    Err(ImdsFailure::Error(e)) => Err(e),
                }
            }
        }
    }
}

enum ImdsFailure {
    NotFound,
    Error(ClaimError),
}

/// The HTTPS client for every AWS call: hyper with rustls on the ring provider, so no C crypto
/// library is built. It also speaks plain HTTP, which IMDS uses.
pub fn http_client() -> aws_sdk_ec2::config::SharedHttpClient {
    aws_smithy_http_client::Builder::new().tls_provider(tls::Provider::Rustls(CryptoMode::Ring)).build_https()
}

/// Shared settings for the metadata client and the credential providers.
pub fn provider_config() -> ProviderConfig {
    ProviderConfig::default().with_http_client(http_client())
}

/// An address as DescribeAddresses shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressView {
    pub public_ip: Option<String>,
    pub instance_id: Option<String>,
    pub association_id: Option<String>,
    /// The address's tags: the handoff's shared record (see [`super::handoff`]).
    pub tags: Vec<(String, String)>,
}

impl AddressView {
    fn from_sdk(a: &aws_sdk_ec2::types::Address) -> AddressView {
        AddressView {
            public_ip: a.public_ip().map(str::to_string),
            instance_id: a.instance_id().map(str::to_string).filter(|s| !s.is_empty()),
            association_id: a.association_id().map(str::to_string).filter(|s| !s.is_empty()),
            tags: a
                .tags()
                .iter()
                .filter_map(|t| Some((t.key()?.to_string(), t.value().unwrap_or_default().to_string())))
                .collect(),
        }
    }

    /// The value of tag `key`; an empty value counts as none (a tag is cleared by emptying it).
    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tags.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str()).filter(|v| !v.trim().is_empty())
    }
}

/// An instance as DescribeInstances shows it: its rank for the newer-wins rule and its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceView {
    pub rank: Rank,
    /// `pending`, `running`, `shutting-down`, `terminated`, `stopping` or `stopped`.
    pub state: String,
}

/// EC2 in this instance's region, every call counted and retried until the deadline.
pub struct Ec2 {
    client: aws_sdk_ec2::Client,
}

/// The settings every AWS client of the appliance shares: this region, the default credential
/// chain (environment, profile, web identity, container, then the instance role through the
/// same metadata client), no SDK retries (the callers retry, under their own deadline), short
/// timeouts, and `endpoint` when a test points the client at an emulator.
async fn sdk_config(
    region: &str,
    metadata: &Metadata,
    provider: &ProviderConfig,
    endpoint: Option<&str>,
) -> aws_config::SdkConfig {
    let region = Region::new(region.to_string());
    let credentials = DefaultCredentialsChain::builder()
        .configure(provider.clone().with_region(Some(region.clone())))
        .imds_client(metadata.client())
        .region(region.clone())
        .build()
        .await;
    // A read timeout as well: associating the address replaces the instance's public IP,
    // which can leave a pooled connection to the endpoint dead; fail fast and retry.
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(3))
        .read_timeout(Duration::from_secs(5))
        .operation_attempt_timeout(Duration::from_secs(10))
        .build();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http_client())
        .region(region)
        .credentials_provider(credentials)
        .retry_config(RetryConfig::disabled())
        .timeout_config(timeouts);
    if let Some(url) = endpoint {
        loader = loader.endpoint_url(url);
    }
    loader.load().await
}

impl Ec2 {
    pub async fn new(config: &EipConfig, region: &str, metadata: &Metadata, provider: &ProviderConfig) -> Ec2 {
        let sdk = sdk_config(region, metadata, provider, config.ec2_endpoint.as_deref()).await;
        Ec2 { client: aws_sdk_ec2::Client::new(&sdk) }
    }

    /// The allocation as EC2 sees it now.
    pub async fn describe_address(
        &self,
        allocation: &str,
        calls: &Calls,
        deadline: Instant,
    ) -> Result<AddressView, Failure> {
        let out = retry("DescribeAddresses", deadline, || {
            calls.ec2_reads.fetch_add(1, Ordering::Relaxed);
            self.client.describe_addresses().allocation_ids(allocation).send()
        })
        .await?;
        let Some(a) = out.addresses().iter().find(|a| a.allocation_id() == Some(allocation)) else {
            return Err(Failure::Refused {
                class: Class::UnknownAllocation,
                action: "DescribeAddresses",
                detail: "no such address in the answer".into(),
            });
        };
        Ok(AddressView::from_sdk(a))
    }

    /// Every address whose tag `key` is `value` (the address set), by allocation id.
    pub async fn describe_tagged(
        &self,
        key: &str,
        value: &str,
        calls: &Calls,
        deadline: Instant,
    ) -> Result<Vec<(String, AddressView)>, Failure> {
        let filter = Filter::builder().name(format!("tag:{key}")).values(value).build();
        let out = retry("DescribeAddresses", deadline, || {
            calls.ec2_reads.fetch_add(1, Ordering::Relaxed);
            self.client.describe_addresses().filters(filter.clone()).send()
        })
        .await?;
        Ok(out
            .addresses()
            .iter()
            .filter_map(|a| Some((a.allocation_id()?.to_string(), AddressView::from_sdk(a))))
            .collect())
    }

    /// Sets tags on the allocation (CreateTags overwrites a key's value; no tag is deleted).
    pub async fn tag_address(
        &self,
        allocation: &str,
        tags: &[(&str, String)],
        calls: &Calls,
        deadline: Instant,
    ) -> Result<(), Failure> {
        let tags: Vec<aws_sdk_ec2::types::Tag> =
            tags.iter().map(|(k, v)| aws_sdk_ec2::types::Tag::builder().key(*k).value(v).build()).collect();
        retry("CreateTags", deadline, || {
            calls.ec2_writes.fetch_add(1, Ordering::Relaxed);
            self.client.create_tags().resources(allocation).set_tags(Some(tags.clone())).send()
        })
        .await?;
        Ok(())
    }

    /// The value of tag `key` on `instance`, if it has one.
    pub async fn instance_tag(
        &self,
        instance: &str,
        key: &str,
        calls: &Calls,
        deadline: Instant,
    ) -> Result<Option<String>, Failure> {
        let filter = |name: &str, value: &str| Filter::builder().name(name).values(value).build();
        let out = retry("DescribeTags", deadline, || {
            calls.ec2_reads.fetch_add(1, Ordering::Relaxed);
            self.client.describe_tags().filters(filter("resource-id", instance)).filters(filter("key", key)).send()
        })
        .await?;
        Ok(out.tags().iter().find(|t| t.key() == Some(key)).and_then(|t| t.value().map(str::to_string)))
    }

    /// How each of `instances` ranks for the newer-wins rule (generation tag, launch time),
    /// for those EC2 lists. Terminated instances stay listed for a while; an EC2 that does not
    /// know one of the ids at all refuses the whole call (retried as an unknown instance).
    pub async fn ranks(&self, instances: &[&str], calls: &Calls, deadline: Instant) -> Result<Vec<Rank>, Failure> {
        Ok(self.instances(instances, calls, deadline).await?.into_iter().map(|i| i.rank).collect())
    }

    /// Each of `instances` that EC2 lists, with its rank and state.
    pub async fn instances(
        &self,
        instances: &[&str],
        calls: &Calls,
        deadline: Instant,
    ) -> Result<Vec<InstanceView>, Failure> {
        let ids: Vec<String> = instances.iter().map(|s| s.to_string()).collect();
        let out = retry("DescribeInstances", deadline, || {
            calls.ec2_reads.fetch_add(1, Ordering::Relaxed);
            self.client.describe_instances().set_instance_ids(Some(ids.clone())).send()
        })
        .await?;
        Ok(out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter_map(|i| {
                let t = i.launch_time()?;
                let instance_id = i.instance_id()?.to_string();
                let tag = i.tags().iter().find(|t| t.key() == Some(GENERATION_TAG)).and_then(|t| t.value());
                let generation = tag.and_then(parse_generation);
                if let (Some(value), None) = (tag, generation) {
                    tracing::warn!(instance = %instance_id, tag = GENERATION_TAG, value,
                        "the fleet generation tag is not a whole number; ranking the instance as untagged");
                }
                let state = i.state().and_then(|s| s.name()).map_or("unknown", |n| n.as_str()).to_string();
                Some(InstanceView {
                    rank: Rank { instance_id, generation, launched: (t.secs(), t.subsec_nanos()) },
                    state,
                })
            })
            .collect())
    }

    /// Associates the allocation with the instance. With `reassociate`, it is taken from
    /// whatever holds it; without, EC2 refuses (`Resource.AlreadyAssociated`) if anything
    /// holds it by the time the call arrives, which makes taking a free address a
    /// compare-and-set: two claims of a free address cannot both succeed. With `dry_run`, EC2
    /// only checks that the call would be allowed; nothing changes.
    pub async fn associate(
        &self,
        allocation: &str,
        instance: &str,
        reassociate: bool,
        dry_run: bool,
        calls: &Calls,
        deadline: Instant,
    ) -> Result<Option<String>, Failure> {
        let result = retry("AssociateAddress", deadline, || {
            if !dry_run {
                calls.ec2_writes.fetch_add(1, Ordering::Relaxed);
            } else {
                calls.ec2_reads.fetch_add(1, Ordering::Relaxed);
            }
            self.client
                .associate_address()
                .allocation_id(allocation)
                .instance_id(instance)
                .allow_reassociation(reassociate)
                .dry_run(dry_run)
                .send()
        })
        .await;
        match result {
            Ok(out) => Ok(out.association_id().map(str::to_string)),
            Err(Failure::Refused { class: Class::DryRunOk, .. }) if dry_run => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// An Auto Scaling group as DescribeAutoScalingGroups shows it: its tags and its instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupView {
    pub name: String,
    pub tags: Vec<(String, String)>,
    pub instances: Vec<GroupInstance>,
    pub desired: usize,
}

impl GroupView {
    /// The value of tag `key`; an empty value counts as none.
    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tags.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str()).filter(|v| !v.trim().is_empty())
    }
}

/// One instance of a group: `InService`, `Pending`, `Terminating:Wait`...; `Healthy` or
/// `Unhealthy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInstance {
    pub id: String,
    pub lifecycle_state: String,
    pub health: String,
}

/// Auto Scaling in this instance's region: the groups, marking an instance unhealthy, and the
/// termination lifecycle action. Calls retried as EC2's are, counted in `calls`.
pub struct AutoScaling {
    client: aws_sdk_autoscaling::Client,
}

impl AutoScaling {
    pub async fn new(config: &EipConfig, region: &str, metadata: &Metadata, provider: &ProviderConfig) -> AutoScaling {
        let sdk = sdk_config(region, metadata, provider, config.autoscaling_endpoint.as_deref()).await;
        AutoScaling { client: aws_sdk_autoscaling::Client::new(&sdk) }
    }

    /// Every group of the region, every page.
    pub async fn groups(&self, calls: &Calls, deadline: Instant) -> Result<Vec<GroupView>, Failure> {
        self.describe(None, calls, deadline).await
    }

    /// The groups whose tag `key` is `value` (a fleet), every page.
    pub async fn fleet(
        &self,
        key: &str,
        value: &str,
        calls: &Calls,
        deadline: Instant,
    ) -> Result<Vec<GroupView>, Failure> {
        let filter = aws_sdk_autoscaling::types::Filter::builder().name(format!("tag:{key}")).values(value).build();
        self.describe(Some(filter), calls, deadline).await
    }

    async fn describe(
        &self,
        filter: Option<aws_sdk_autoscaling::types::Filter>,
        calls: &Calls,
        deadline: Instant,
    ) -> Result<Vec<GroupView>, Failure> {
        let mut groups = Vec::new();
        let mut token: Option<String> = None;
        // Bounded: 100 groups a page, and no region has 10,000 pages of groups.
        for _ in 0..10_000 {
            let out = retry("DescribeAutoScalingGroups", deadline, || {
                calls.autoscaling.fetch_add(1, Ordering::Relaxed);
                self.client
                    .describe_auto_scaling_groups()
                    .max_records(100)
                    .set_filters(filter.clone().map(|f| vec![f]))
                    .set_next_token(token.clone())
                    .send()
            })
            .await?;
            for g in out.auto_scaling_groups() {
                groups.push(GroupView {
                    name: g.auto_scaling_group_name().unwrap_or_default().to_string(),
                    tags: g
                        .tags()
                        .iter()
                        .filter_map(|t| Some((t.key()?.to_string(), t.value().unwrap_or_default().to_string())))
                        .collect(),
                    instances: g
                        .instances()
                        .iter()
                        .map(|i| GroupInstance {
                            id: i.instance_id().unwrap_or_default().to_string(),
                            lifecycle_state: i.lifecycle_state().map(|s| s.as_str().to_string()).unwrap_or_default(),
                            health: i.health_status().unwrap_or_default().to_string(),
                        })
                        .collect(),
                    desired: g.desired_capacity().and_then(|d| usize::try_from(d).ok()).unwrap_or(0),
                });
            }
            token = out.next_token().filter(|t| !t.is_empty()).map(str::to_string);
            if token.is_none() {
                break;
            }
        }
        Ok(groups)
    }

    /// Sets tag `key` on the group (not propagated to instances).
    pub async fn tag_group(
        &self,
        group: &str,
        key: &str,
        value: &str,
        calls: &Calls,
        deadline: Instant,
    ) -> Result<(), Failure> {
        let tag = aws_sdk_autoscaling::types::Tag::builder()
            .resource_id(group)
            .resource_type("auto-scaling-group")
            .key(key)
            .value(value)
            .propagate_at_launch(false)
            .build();
        retry("CreateOrUpdateTags", deadline, || {
            calls.autoscaling.fetch_add(1, Ordering::Relaxed);
            self.client.create_or_update_tags().tags(tag.clone()).send()
        })
        .await?;
        Ok(())
    }

    /// Marks `instance` unhealthy: its group replaces it. Not held back by the group's health
    /// check grace period (the caller has waited longer than that already).
    pub async fn set_unhealthy(&self, instance: &str, calls: &Calls, deadline: Instant) -> Result<(), Failure> {
        retry("SetInstanceHealth", deadline, || {
            calls.autoscaling.fetch_add(1, Ordering::Relaxed);
            self.client
                .set_instance_health()
                .instance_id(instance)
                .health_status("Unhealthy")
                .should_respect_grace_period(false)
                .send()
        })
        .await?;
        Ok(())
    }

    /// Lets the termination of `instance` go on now (`CONTINUE`), before the hook times out.
    pub async fn complete_lifecycle_action(
        &self,
        group: &str,
        hook: &str,
        instance: &str,
        calls: &Calls,
        deadline: Instant,
    ) -> Result<(), Failure> {
        retry("CompleteLifecycleAction", deadline, || {
            calls.autoscaling.fetch_add(1, Ordering::Relaxed);
            self.client
                .complete_lifecycle_action()
                .auto_scaling_group_name(group)
                .lifecycle_hook_name(hook)
                .instance_id(instance)
                .lifecycle_action_result("CONTINUE")
                .send()
        })
        .await?;
        Ok(())
    }
}

/// A call that failed for good.
#[derive(Debug)]
pub enum Failure {
    /// EC2 refused it in a way retrying cannot fix.
    Refused { class: Class, action: &'static str, detail: String },
    /// Retryable failures until the deadline.
    Deadline { action: &'static str, attempts: u32, waited: Duration, last: String },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Refused { action, detail, .. } => write!(f, "{action} was refused: {detail}"),
            Failure::Deadline { action, attempts, waited, last } => write!(
                f,
                "{action} kept failing ({attempts} attempts in {}): {last}",
                humantime::format_duration(Duration::from_secs(waited.as_secs()))
            ),
        }
    }
}

/// Runs `call` until it succeeds, fails for good, or the deadline passes (an attempt in flight
/// at the deadline is abandoned). Retries wait with exponential backoff and jitter. An
/// instance EC2 does not know yet is retried too, and reported as such at the deadline.
async fn retry<T, E, F, Fut>(action: &'static str, deadline: Instant, mut call: F) -> Result<T, Failure>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, SdkError<E, HttpResponse>>>,
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let started = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let err = match tokio::time::timeout_at(deadline, call()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => e,
            Err(_) => {
                let last = "the last attempt was still running at the deadline".to_string();
                return Err(Failure::Deadline { action, attempts, waited: started.elapsed(), last });
            }
        };
        let class = classify(&err);
        let detail = describe(&err);
        if !matches!(class, Class::Transient | Class::InvalidInstance) {
            return Err(Failure::Refused { class, action, detail });
        }
        let delay = backoff(attempts);
        if Instant::now() + delay >= deadline {
            if class == Class::InvalidInstance {
                return Err(Failure::Refused { class, action, detail });
            }
            return Err(Failure::Deadline { action, attempts, waited: started.elapsed(), last: detail });
        }
        tracing::warn!(action, attempt = attempts, error = %detail, retry_in = ?delay, "AWS call failed; retrying");
        tokio::time::sleep(delay).await;
    }
}

/// The wait before retry number `attempt` (1-based): a random time between half and all of
/// `BACKOFF_BASE * 2^(attempt-1)`, capped at `BACKOFF_CAP` ("equal jitter"), so instances
/// throttled together do not retry together.
pub fn backoff(attempt: u32) -> Duration {
    let ceiling = BACKOFF_BASE.saturating_mul(1 << attempt.saturating_sub(1).min(16)).min(BACKOFF_CAP);
    jittered(ceiling)
}

/// A random time between half and all of `ceiling`, so that instances doing the same thing at
/// the same moment drift apart.
pub fn jittered(ceiling: Duration) -> Duration {
    let half = ceiling / 2;
    half + half.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_ec2::operation::describe_addresses::DescribeAddressesOutput;
    use aws_sdk_ec2::types::Address;
    use aws_smithy_mocks::{MockResponseInterceptor, Rule, RuleMode, create_mock_http_client, mock};

    /// An EC2 client whose HTTP responses come from `rules`, through the SDK's own response
    /// parsing: the errors below are real EC2 error documents, parsed as the SDK parses them.
    fn mocked(rules: &[&Rule]) -> aws_sdk_ec2::Client {
        let mut interceptor = MockResponseInterceptor::new().rule_mode(RuleMode::Sequential);
        for rule in rules {
            interceptor = interceptor.with_rule(rule);
        }
        let config = aws_sdk_ec2::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(aws_sdk_ec2::config::Credentials::new("a", "b", None, None, "test"))
            .http_client(create_mock_http_client())
            .interceptor(interceptor)
            .retry_config(RetryConfig::disabled())
            .build();
        aws_sdk_ec2::Client::from_conf(config)
    }

    fn ec2_error(code: &str) -> String {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code>\
             <Message>{code} happened</Message></Error></Errors><RequestID>r-1</RequestID></Response>"
        )
    }

    fn address() -> DescribeAddressesOutput {
        DescribeAddressesOutput::builder()
            .addresses(Address::builder().allocation_id("eipalloc-1").public_ip("192.0.2.1").build())
            .build()
    }

    async fn describe(client: &aws_sdk_ec2::Client, deadline: Duration) -> Result<AddressView, Failure> {
        let ec2 = Ec2 { client: client.clone() };
        ec2.describe_address("eipalloc-1", &Calls::default(), Instant::now() + deadline).await
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_and_server_errors_are_retried_until_success() {
        let rule = mock!(aws_sdk_ec2::Client::describe_addresses)
            .sequence()
            .http_status(503, Some(ec2_error("Unavailable")))
            .http_status(503, Some(ec2_error("RequestLimitExceeded")))
            .http_status(500, Some(ec2_error("InternalError")))
            .output(address)
            .build();
        let client = mocked(&[&rule]);
        let got = describe(&client, Duration::from_secs(60)).await.expect("succeeds after retries");
        assert_eq!(got.public_ip.as_deref(), Some("192.0.2.1"));
        assert_eq!(rule.num_calls(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_are_not_retried() {
        for (status, code, class) in [
            (403, "UnauthorizedOperation", Class::AccessDenied),
            (400, "InvalidAllocationID.NotFound", Class::UnknownAllocation),
            (400, "InvalidParameterValue", Class::Permanent),
        ] {
            let rule = mock!(aws_sdk_ec2::Client::describe_addresses)
                .sequence()
                .http_status(status, Some(ec2_error(code)))
                .output(address)
                .build();
            let client = mocked(&[&rule]);
            match describe(&client, Duration::from_secs(60)).await {
                Err(Failure::Refused { class: got, action: "DescribeAddresses", detail }) => {
                    assert_eq!(got, class, "{code}");
                    assert_eq!(detail, format!("{code}: {code} happened"));
                }
                other => panic!("{code}: expected a refusal, got {other:?}"),
            }
            assert_eq!(rule.num_calls(), 1, "{code} was retried");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_unknown_instance_is_retried_then_reported_as_such() {
        let rule = mock!(aws_sdk_ec2::Client::describe_addresses)
            .sequence()
            .http_status(400, Some(ec2_error("InvalidInstanceID.NotFound")))
            .repeatedly()
            .build();
        let client = mocked(&[&rule]);
        match describe(&client, Duration::from_secs(5)).await {
            Err(Failure::Refused { class: Class::InvalidInstance, .. }) => {}
            other => panic!("expected an invalid instance at the deadline, got {other:?}"),
        }
        assert!(rule.num_calls() >= 3, "only {} attempts", rule.num_calls());
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_at_the_deadline() {
        let rule = mock!(aws_sdk_ec2::Client::describe_addresses)
            .sequence()
            .http_status(400, Some(ec2_error("Throttling")))
            .repeatedly()
            .build();
        let client = mocked(&[&rule]);
        let started = Instant::now();
        match describe(&client, Duration::from_secs(5)).await {
            Err(Failure::Deadline { action: "DescribeAddresses", attempts, last, .. }) => {
                assert_eq!(last, "Throttling: Throttling happened");
                assert_eq!(attempts as usize, rule.num_calls());
                assert!(attempts >= 3, "only {attempts} attempts in 5s");
            }
            other => panic!("expected the deadline, got {other:?}"),
        }
        assert!(started.elapsed() <= Duration::from_secs(5), "{:?}", started.elapsed());
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        for attempt in 1..=12 {
            let ceiling = BACKOFF_BASE.saturating_mul(1 << (attempt - 1)).min(BACKOFF_CAP);
            for _ in 0..50 {
                let d = backoff(attempt);
                assert!(
                    d >= ceiling / 2 && d <= ceiling,
                    "attempt {attempt}: {d:?} outside {ceiling:?}/2..{ceiling:?}"
                );
            }
        }
        let spread: std::collections::HashSet<Duration> = (0..20).map(|_| backoff(3)).collect();
        assert!(spread.len() > 1, "backoff has no jitter");
    }
}
