//! One claim: find out who we are and which allocation we hold, associate it with this
//! instance unless it already is, and confirm the association before calling it done.

use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

use super::aws::{AddressView, Calls, Ec2, Failure, Metadata, TagLookup, provider_config};
use super::error::{ClaimError, Class};
use crate::config::EipConfig;

/// First wait between two DescribeAddresses calls while confirming; doubles up to the cap.
const CONFIRM_FIRST_WAIT: Duration = Duration::from_millis(100);
const CONFIRM_MAX_WAIT: Duration = Duration::from_secs(2);

/// Where the allocation id came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Config,
    MetadataTag(String),
    DescribeTags(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Config => write!(f, "eip.allocation_id"),
            Source::MetadataTag(key) => write!(f, "instance tag {key}, read from instance metadata"),
            Source::DescribeTags(key) => write!(f, "instance tag {key}, read with ec2:DescribeTags"),
        }
    }
}

/// This instance, as the claim sees it: the clients stay open for the ownership checks.
pub struct Instance {
    pub instance_id: String,
    pub region: String,
    pub allocation_id: String,
    pub source: Source,
    ec2: Ec2,
    pub calls: Calls,
    /// When discovery began: a report's time covers it.
    started: Instant,
}

/// What a claim did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The address was already associated with this instance: nothing was written.
    AlreadyOurs,
    /// Associated now, and seen so by DescribeAddresses after `confirm_reads` reads.
    Associated { association_id: String, confirm_reads: u32 },
    /// `--dry-run`: EC2 said the association would be allowed; nothing was written.
    WouldAssociate,
}

/// A finished claim, for `claim-eip` to print and `run` to log.
#[derive(Debug, Clone)]
pub struct Report {
    pub instance_id: String,
    pub region: String,
    pub allocation_id: String,
    pub source: Source,
    pub public_ip: Option<String>,
    /// The instance that held the address before, if any and not us.
    pub previous: Option<String>,
    pub outcome: Outcome,
    /// Instance metadata, EC2 reads and EC2 writes made by the claim.
    pub calls: (u32, u32, u32),
    pub elapsed: Duration,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ip = self.public_ip.as_deref().unwrap_or("(no public IP)");
        writeln!(f, "instance:   {} in {} (from instance metadata, IMDSv2)", self.instance_id, self.region)?;
        writeln!(f, "allocation: {} (from {})", self.allocation_id, self.source)?;
        let before = match &self.previous {
            Some(other) => format!("associated with {other}"),
            None if self.outcome == Outcome::AlreadyOurs => "associated with this instance".to_string(),
            None => "not associated".to_string(),
        };
        writeln!(f, "address:    {ip}, was {before}")?;
        let taking = match &self.previous {
            Some(other) => format!(", taking it from {other}"),
            None => String::new(),
        };
        match &self.outcome {
            Outcome::AlreadyOurs => writeln!(f, "result:     already ours; nothing to do")?,
            Outcome::Associated { association_id, confirm_reads } => writeln!(
                f,
                "result:     associated{taking} ({association_id}); confirmed by DescribeAddresses after {} read{}",
                confirm_reads,
                if *confirm_reads == 1 { "" } else { "s" }
            )?,
            Outcome::WouldAssociate => {
                writeln!(f, "result:     dry run: EC2 would allow the association{taking}; nothing was changed")?
            }
        }
        let (imds, reads, writes) = self.calls;
        write!(
            f,
            "calls:      {imds} instance metadata, {reads} EC2 read{}, {writes} EC2 write{}, in {:.2}s",
            if reads == 1 { "" } else { "s" },
            if writes == 1 { "" } else { "s" },
            self.elapsed.as_secs_f64()
        )
    }
}

impl Instance {
    /// Reads who we are from instance metadata and which allocation we hold from the config
    /// or our tag.
    pub async fn discover(config: &EipConfig, deadline: Instant) -> Result<Instance, ClaimError> {
        let started = Instant::now();
        let calls = Calls::default();
        let provider = provider_config();
        let metadata = Metadata::new(config, &provider)?;
        let instance_id = metadata.instance_id(&calls).await?;
        let region = metadata.region(&calls).await?;
        let ec2 = Ec2::new(config, &region, &metadata, &provider).await;
        let (allocation_id, source) = match &config.allocation_id {
            Some(id) => (id.clone(), Source::Config),
            None => {
                let key = &config.tag_key;
                let in_metadata = metadata.tag(key, &calls).await?;
                match in_metadata {
                    TagLookup::Found(v) => (v, Source::MetadataTag(key.clone())),
                    lookup => {
                        let found = ec2
                            .instance_tag(&instance_id, key, &calls, deadline)
                            .await
                            .map_err(|f| refused(f, &instance_id, &region, "", &Source::DescribeTags(key.clone())))?;
                        match found {
                            Some(v) => (v, Source::DescribeTags(key.clone())),
                            None => {
                                return Err(ClaimError::MissingTag {
                                    key: key.clone(),
                                    instance: instance_id,
                                    metadata_tags: !matches!(lookup, TagLookup::NotEnabled),
                                });
                            }
                        }
                    }
                }
            }
        };
        let allocation_id = allocation_id.trim().to_string();
        if let (false, Source::MetadataTag(key) | Source::DescribeTags(key)) =
            (crate::config::value::is_allocation_id(&allocation_id), &source)
        {
            return Err(ClaimError::BadTag { key: key.clone(), instance: instance_id, value: allocation_id });
        }
        Ok(Instance { instance_id, region, allocation_id, source, ec2, calls, started })
    }

    /// Associates the allocation with this instance unless it already is, then confirms it.
    /// With `dry_run`, only reads and a DryRun association are made.
    pub async fn claim(&self, dry_run: bool, deadline: Instant) -> Result<Report, ClaimError> {
        let before = self.describe(deadline).await?;
        let previous = before.instance_id.clone().filter(|i| *i != self.instance_id);
        let mut report = Report {
            instance_id: self.instance_id.clone(),
            region: self.region.clone(),
            allocation_id: self.allocation_id.clone(),
            source: self.source.clone(),
            public_ip: before.public_ip.clone(),
            previous: previous.clone(),
            outcome: Outcome::AlreadyOurs,
            calls: (0, 0, 0),
            elapsed: Duration::ZERO,
        };
        if before.instance_id.as_deref() == Some(self.instance_id.as_str()) {
            return Ok(self.finish(report));
        }
        if let Some(owner) = &previous {
            self.refuse_if_newer(owner, deadline).await?;
        }
        let association = self
            .ec2
            .associate(&self.allocation_id, &self.instance_id, dry_run, &self.calls, deadline)
            .await
            .map_err(|f| self.refused(f))?;
        if dry_run {
            report.outcome = Outcome::WouldAssociate;
            return Ok(self.finish(report));
        }
        let confirm_reads = self.confirm(association.as_deref(), &before, deadline).await?;
        report.outcome = Outcome::Associated { association_id: association.unwrap_or_default(), confirm_reads };
        Ok(self.finish(report))
    }

    /// Newer fleets take addresses from older ones, never the other way round: an instance of
    /// an old fleet whose proxy restarts (a crash, a reboot) must not take its address back
    /// from the instance that replaced it. So the address is taken only from an instance
    /// launched no later than this one (or one EC2 no longer lists).
    async fn refuse_if_newer(&self, owner: &str, deadline: Instant) -> Result<(), ClaimError> {
        let times = self
            .ec2
            .launch_times(&[self.instance_id.as_str(), owner], &self.calls, deadline)
            .await
            .map_err(|f| self.refused(f))?;
        let launched = |id: &str| times.iter().find(|(i, _)| i == id).map(|(_, t)| *t);
        match (launched(&self.instance_id), launched(owner)) {
            (Some(mine), Some(theirs)) if theirs > mine => Err(ClaimError::HeldByNewer {
                allocation: self.allocation_id.clone(),
                instance: self.instance_id.clone(),
                owner: owner.to_string(),
            }),
            _ => Ok(()),
        }
    }

    /// Who holds the address now: one DescribeAddresses call (retried until `deadline`).
    pub async fn describe(&self, deadline: Instant) -> Result<AddressView, ClaimError> {
        self.ec2.describe_address(&self.allocation_id, &self.calls, deadline).await.map_err(|f| self.refused(f))
    }

    /// Reads the address until it shows our association. DescribeAddresses is eventually
    /// consistent, so for a while it may still show the state from before our call, or no
    /// instance at all; another instance with a third association means it took the address
    /// in the meantime. One read showing ours ends the wait, so a claim racing another one can
    /// still both succeed here; `run`'s next ownership check then tells which one won.
    async fn confirm(&self, ours: Option<&str>, before: &AddressView, deadline: Instant) -> Result<u32, ClaimError> {
        let started = Instant::now();
        let mut wait = CONFIRM_FIRST_WAIT;
        let mut reads = 0;
        loop {
            let now = self.describe(deadline).await?;
            reads += 1;
            let mine = now.instance_id.as_deref() == Some(self.instance_id.as_str());
            match (ours, now.association_id.as_deref()) {
                (Some(ours), Some(seen)) if seen == ours && mine => return Ok(reads),
                // Without an association id to compare, our instance id will do.
                (None, _) if mine => return Ok(reads),
                (_, seen) if seen == before.association_id.as_deref() => {} // not caught up yet
                _ if mine || now.instance_id.is_none() => {}                // a view in between
                _ => {
                    return Err(ClaimError::Lost {
                        allocation: self.allocation_id.clone(),
                        instance: self.instance_id.clone(),
                        owner: now.instance_id.unwrap_or_else(|| "no instance".into()),
                    });
                }
            }
            if Instant::now() + wait >= deadline {
                return Err(ClaimError::Deadline {
                    action: "confirming the association with DescribeAddresses",
                    attempts: reads,
                    waited: started.elapsed(),
                    last: format!("the address still shows {}", now.instance_id.as_deref().unwrap_or("no instance")),
                });
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(CONFIRM_MAX_WAIT);
        }
    }

    fn finish(&self, mut report: Report) -> Report {
        report.calls = self.calls.snapshot();
        report.elapsed = self.started.elapsed();
        report
    }

    fn refused(&self, f: Failure) -> ClaimError {
        refused(f, &self.instance_id, &self.region, &self.allocation_id, &self.source)
    }
}

/// Turns a failed call into the error that says what to fix.
fn refused(f: Failure, instance: &str, region: &str, allocation: &str, source: &Source) -> ClaimError {
    match f {
        Failure::Deadline { action, attempts, waited, last } => ClaimError::Deadline { action, attempts, waited, last },
        Failure::Refused { class, action, detail } => match class {
            Class::AccessDenied => ClaimError::AccessDenied { action, detail },
            Class::UnknownAllocation => ClaimError::UnknownAllocation {
                allocation: allocation.to_string(),
                region: region.to_string(),
                source: source.to_string(),
                detail,
            },
            Class::InvalidInstance => ClaimError::InvalidInstance { instance: instance.to_string(), detail },
            Class::NoCredentials => ClaimError::NoCredentials { action, detail },
            Class::Transient | Class::DryRunOk | Class::Permanent => ClaimError::Other { action, detail },
        },
    }
}
