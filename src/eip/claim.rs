//! One claim: find out who we are and which allocation we hold, associate it with this
//! instance unless it already is, and confirm the association before calling it done.

use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

use super::aws::{AddressView, Calls, Ec2, Failure, InstanceView, Metadata, TagLookup, jittered, provider_config};
use super::error::{ClaimError, Class};
use super::newer::Newer;
use crate::config::EipConfig;

/// First wait between two DescribeAddresses calls while confirming; doubles up to the cap,
/// each wait jittered (half to all of it).
const CONFIRM_FIRST_WAIT: Duration = Duration::from_millis(100);
const CONFIRM_MAX_WAIT: Duration = Duration::from_millis(500);
/// How long DescribeAddresses must keep showing our association before the claim counts as
/// won. It covers a racing claim whose AssociateAddress is still on its way (it read the
/// owner before our write landed) and EC2's lag in showing that write; against EC2, reads
/// usually catch up within a second. A write that lands even later is still settled by the
/// same rule: the running proxy's ownership check takes the address back from an older
/// instance.
pub const CONFIRM_SETTLE: Duration = Duration::from_secs(2);
/// Reads showing our association needed at the least, so that one lucky read is never enough.
const CONFIRM_MIN_READS: u32 = 3;
/// The pause (jittered) before reading the owner again when a racing claim got in between.
const RETAKE_PAUSE: Duration = Duration::from_millis(200);

/// How a confirmation ended.
enum Confirmed {
    Ours {
        reads: u32,
        settled: Duration,
    },
    /// Another instance's association showed up after ours.
    Taken,
}

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
    /// Associated now, and seen so by DescribeAddresses in `confirm_reads` reads over
    /// `settled` (at least [`CONFIRM_SETTLE`] of them showing ours).
    Associated { association_id: String, confirm_reads: u32, settled: Duration },
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
            Outcome::Associated { association_id, confirm_reads, settled } => writeln!(
                f,
                "result:     associated{taking} ({association_id}); confirmed by {confirm_reads} DescribeAddresses \
                 reads over {:.2}s",
                settled.as_secs_f64()
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
    ///
    /// Two instances may claim the same allocation at once (an old fleet's proxy restarting
    /// while the new fleet boots, or a misconfiguration). Every decision follows one rule,
    /// [`Rank::newer_than`], so they agree on the winner whatever the order of their calls:
    /// a free address is taken without reassociation (EC2 refuses it if another claim got
    /// there first), an address held by an older instance is taken, one held by a newer
    /// instance is left alone, and each later step reads the owner afresh. The claim counts
    /// as won only once DescribeAddresses has shown it for [`CONFIRM_SETTLE`], long enough
    /// for a racing claim's write still in flight, and EC2's lag in showing it, to surface.
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
        // `replaced`: the view our last write replaced, so that a read still showing it is
        // known for what it is (EC2 not caught up yet).
        let mut replaced = before.clone();
        let mut view = before;
        let mut wrote = false;
        loop {
            let association = match view.instance_id.as_deref() {
                // A fresh read after a race shows ours: confirm it, without another write.
                Some(owner) if owner == self.instance_id => view.association_id.clone(),
                owner => {
                    let reassociate = match owner {
                        Some(owner) => match self.newer(owner, deadline).await? {
                            Some(why) => return Err(self.lost(owner, why, wrote)),
                            None => true,
                        },
                        None => false,
                    };
                    let written = self
                        .ec2
                        .associate(&self.allocation_id, &self.instance_id, reassociate, dry_run, &self.calls, deadline)
                        .await;
                    match written {
                        Ok(_) if dry_run => {
                            report.outcome = Outcome::WouldAssociate;
                            return Ok(self.finish(report));
                        }
                        Ok(association) => {
                            wrote = true;
                            replaced = view;
                            association
                        }
                        Err(Failure::Refused { class: Class::AlreadyAssociated, .. }) => {
                            // Another claim got the free address between our read and our write.
                            view = self.read_again(deadline).await?;
                            continue;
                        }
                        Err(f) => return Err(self.refused(f)),
                    }
                }
            };
            match self.confirm(association.as_deref(), &replaced, deadline).await? {
                Confirmed::Ours { reads, settled } => {
                    report.outcome = Outcome::Associated {
                        association_id: association.unwrap_or_default(),
                        confirm_reads: reads,
                        settled,
                    };
                    return Ok(self.finish(report));
                }
                // Someone else's association: the top of the loop ranks it.
                Confirmed::Taken => view = self.read_again(deadline).await?,
            }
        }
    }

    /// The error for a newer `owner` holding the address: it held it from the start, or (after
    /// our write) took it while we were claiming.
    fn lost(&self, owner: &str, why: Newer, wrote: bool) -> ClaimError {
        let (allocation, instance, owner) = (self.allocation_id.clone(), self.instance_id.clone(), owner.to_string());
        if wrote {
            ClaimError::Lost { allocation, instance, owner, why }
        } else {
            ClaimError::HeldByNewer { allocation, instance, owner, why }
        }
    }

    /// A fresh read before another attempt, after a short jittered pause so that two racing
    /// claims do not keep meeting at the same moment.
    async fn read_again(&self, deadline: Instant) -> Result<AddressView, ClaimError> {
        let pause = jittered(RETAKE_PAUSE);
        if Instant::now() + pause >= deadline {
            return Err(ClaimError::Deadline {
                action: "claiming the address against a racing claim",
                attempts: 1,
                waited: self.started.elapsed(),
                last: "another instance kept taking it".into(),
            });
        }
        tokio::time::sleep(pause).await;
        self.describe(deadline).await
    }

    /// Whether `owner` is newer than this instance, and why. An owner EC2 no longer lists
    /// cannot be ranked and is not newer.
    pub async fn newer(&self, owner: &str, deadline: Instant) -> Result<Option<Newer>, ClaimError> {
        let ranks = self
            .ec2
            .ranks(&[self.instance_id.as_str(), owner], &self.calls, deadline)
            .await
            .map_err(|f| self.refused(f))?;
        let find = |id: &str| ranks.iter().find(|r| r.instance_id == id);
        Ok(match (find(&self.instance_id), find(owner)) {
            (Some(mine), Some(theirs)) => theirs.newer_than(mine),
            _ => None,
        })
    }

    /// Each of `ids` that EC2 lists, with its rank and state.
    pub async fn instances(&self, ids: &[&str], deadline: Instant) -> Result<Vec<InstanceView>, ClaimError> {
        self.ec2.instances(ids, &self.calls, deadline).await.map_err(|f| self.refused(f))
    }

    /// One instance as EC2 lists it; `None` when EC2 does not know the id (any more).
    pub async fn instance(&self, id: &str, deadline: Instant) -> Result<Option<InstanceView>, ClaimError> {
        // An unknown id is retried as "not there yet" by `retry`: a short deadline of its own
        // keeps a forgotten id from holding up the caller.
        let short = deadline.min(Instant::now() + Duration::from_secs(3));
        match self.ec2.instances(&[id], &self.calls, short).await {
            Ok(found) => Ok(found.into_iter().find(|v| v.rank.instance_id == id)),
            Err(Failure::Refused { class: Class::InvalidInstance, .. }) => Ok(None),
            Err(f) => Err(self.refused(f)),
        }
    }

    /// Sets tags on our allocation.
    pub async fn tag_address(&self, tags: &[(&str, String)], deadline: Instant) -> Result<(), ClaimError> {
        self.ec2.tag_address(&self.allocation_id, tags, &self.calls, deadline).await.map_err(|f| self.refused(f))
    }

    /// Every address of the address set `set`.
    pub async fn describe_set(&self, set: &str, deadline: Instant) -> Result<Vec<(String, AddressView)>, ClaimError> {
        self.ec2
            .describe_tagged(super::handoff::ADDRESS_SET, set, &self.calls, deadline)
            .await
            .map_err(|f| self.refused(f))
    }

    /// Moves the address from us to `to`, and reads until EC2 shows it there.
    pub async fn give(&self, to: &str, deadline: Instant) -> Result<(), ClaimError> {
        self.ec2
            .associate(&self.allocation_id, to, true, false, &self.calls, deadline)
            .await
            .map_err(|f| self.refused(f))?;
        let mut wait = CONFIRM_FIRST_WAIT;
        loop {
            let now = self.describe(deadline).await?;
            if now.instance_id.as_deref() == Some(to) {
                return Ok(());
            }
            if Instant::now() + wait >= deadline {
                return Err(ClaimError::Deadline {
                    action: "confirming the handoff with DescribeAddresses",
                    attempts: 1,
                    waited: self.started.elapsed(),
                    last: format!("the address still shows {}", now.instance_id.as_deref().unwrap_or("no instance")),
                });
            }
            tokio::time::sleep(jittered(wait)).await;
            wait = (wait * 2).min(CONFIRM_MAX_WAIT);
        }
    }

    /// Who holds the address now: one DescribeAddresses call (retried until `deadline`).
    pub async fn describe(&self, deadline: Instant) -> Result<AddressView, ClaimError> {
        self.ec2.describe_address(&self.allocation_id, &self.calls, deadline).await.map_err(|f| self.refused(f))
    }

    /// Reads the address until it has shown our association for [`CONFIRM_SETTLE`] (and at
    /// least [`CONFIRM_MIN_READS`] times), or shows someone else's. DescribeAddresses is
    /// eventually consistent, so for a while it may still show the state from before our call
    /// (`before`), or no instance at all: those reads are waited out. Another instance with a
    /// third association took the address after our write, or is a racing claim whose write
    /// landed after ours: the caller ranks it.
    async fn confirm(
        &self,
        ours: Option<&str>,
        before: &AddressView,
        deadline: Instant,
    ) -> Result<Confirmed, ClaimError> {
        let started = Instant::now();
        let mut wait = CONFIRM_FIRST_WAIT;
        let (mut reads, mut ours_reads) = (0, 0);
        let mut ours_since: Option<Instant> = None;
        loop {
            let now = self.describe(deadline).await?;
            reads += 1;
            let mine = now.instance_id.as_deref() == Some(self.instance_id.as_str());
            let is_ours = match (ours, now.association_id.as_deref()) {
                (Some(ours), Some(seen)) => seen == ours && mine,
                // Without an association id to compare, our instance id will do.
                (None, _) => mine,
                (Some(_), None) => false,
            };
            if is_ours {
                ours_reads += 1;
                let since = *ours_since.get_or_insert_with(Instant::now);
                if ours_reads >= CONFIRM_MIN_READS && since.elapsed() >= CONFIRM_SETTLE {
                    return Ok(Confirmed::Ours { reads, settled: started.elapsed() });
                }
            } else if now.association_id != before.association_id && !mine && now.instance_id.is_some() {
                return Ok(Confirmed::Taken);
            }
            // Otherwise: not caught up yet (the view from before our call), or a view in between.
            if Instant::now() + wait >= deadline {
                return Err(ClaimError::Deadline {
                    action: "confirming the association with DescribeAddresses",
                    attempts: reads,
                    waited: started.elapsed(),
                    last: format!("the address still shows {}", now.instance_id.as_deref().unwrap_or("no instance")),
                });
            }
            tokio::time::sleep(jittered(wait)).await;
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
            Class::Transient | Class::DryRunOk | Class::AlreadyAssociated | Class::Permanent => {
                ClaimError::Other { action, detail }
            }
        },
    }
}
