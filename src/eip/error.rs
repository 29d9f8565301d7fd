//! What can go wrong in a claim, one line each that says what was tried and what to fix, and
//! which failed EC2 calls are worth retrying.

use std::fmt;
use std::time::Duration;

use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};

use super::newer::Newer;

/// Exit codes of `claim-eip`, one per thing the operator has to fix (documented in the README).
pub mod exit {
    /// The instance metadata service could not be read: not on EC2, or IMDSv2 is off.
    pub const METADATA: u8 = 10;
    /// No allocation id: the instance has no such tag and none is configured.
    pub const MISSING_TAG: u8 = 11;
    /// The allocation id does not exist in this region.
    pub const UNKNOWN_ALLOCATION: u8 = 12;
    /// The instance role may not make a call.
    pub const ACCESS_DENIED: u8 = 13;
    /// EC2 does not accept this instance for the association.
    pub const INVALID_INSTANCE: u8 = 14;
    /// A newer instance holds the address (a newer fleet generation, else a later launch, else
    /// a larger instance id): it held it already, or took it while this one was claiming.
    pub const LOST: u8 = 15;
    /// Calls kept failing with retryable errors until the deadline.
    pub const DEADLINE: u8 = 16;
    /// No AWS credentials: no instance role, and none in the environment or a profile.
    pub const CREDENTIALS: u8 = 17;
}

/// How a failed EC2 call is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Throttling, a 5xx, a timeout or a network error: retried with backoff.
    Transient,
    AccessDenied,
    UnknownAllocation,
    /// EC2 does not know the instance, or it is not running yet. Right after launch that is
    /// eventual consistency, so it is retried like a transient error until the deadline.
    InvalidInstance,
    /// No credentials could be loaded.
    NoCredentials,
    /// `DryRunOperation`: the call would have succeeded.
    DryRunOk,
    /// `Resource.AlreadyAssociated`: an association without reassociation found the address
    /// taken (another instance claimed it between our read and our write).
    AlreadyAssociated,
    /// Anything else EC2 refused: retrying would not help.
    Permanent,
}

/// Error codes EC2 (and the AWS SDKs' shared retry rules) use for throttling and for its own
/// transient failures.
const TRANSIENT_CODES: &[&str] = &[
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "SlowDown",
    "EC2ThrottledException",
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "Unavailable",
    "RequestTimeout",
    "RequestTimeoutException",
    "PriorRequestNotComplete",
];

const ACCESS_CODES: &[&str] =
    &["UnauthorizedOperation", "AccessDenied", "AccessDeniedException", "AuthFailure", "OptInRequired", "Blocked"];

/// Sorts a failed call into retry-or-not, and the not-retryable ones by what to fix.
pub fn classify<E: ProvideErrorMetadata + std::error::Error + 'static>(err: &SdkError<E, HttpResponse>) -> Class {
    match err {
        // Timeouts, connection failures and responses that could not be read are all worth
        // another try; a request the SDK could not even build is not.
        SdkError::TimeoutError(_) | SdkError::ResponseError(_) => Class::Transient,
        // Credentials that cannot be loaded also arrive as a dispatch failure: that is final.
        SdkError::DispatchFailure(_) if missing_credentials(err) => Class::NoCredentials,
        SdkError::DispatchFailure(d) if d.is_io() || d.is_timeout() || d.is_other() => Class::Transient,
        SdkError::DispatchFailure(_) | SdkError::ConstructionFailure(_) => Class::Permanent,
        SdkError::ServiceError(ctx) => {
            let status = ctx.raw().status().as_u16();
            classify_code(err.code(), status)
        }
        _ => Class::Permanent,
    }
}

/// True when the error's causes include credentials that could not be loaded (as opposed to a
/// credential provider that timed out, which is worth another try).
fn missing_credentials(err: &(dyn std::error::Error + 'static)) -> bool {
    use aws_credential_types::provider::error::CredentialsError;
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cause {
        if let Some(c) = e.downcast_ref::<CredentialsError>() {
            return matches!(c, CredentialsError::CredentialsNotLoaded(_) | CredentialsError::InvalidConfiguration(_));
        }
        cause = e.source();
    }
    false
}

/// The part of [`classify`] that looks at an EC2 error code and HTTP status.
pub fn classify_code(code: Option<&str>, status: u16) -> Class {
    match code {
        Some(c) if TRANSIENT_CODES.contains(&c) => Class::Transient,
        Some(c) if ACCESS_CODES.contains(&c) => Class::AccessDenied,
        Some("DryRunOperation") => Class::DryRunOk,
        Some("Resource.AlreadyAssociated") => Class::AlreadyAssociated,
        Some("InvalidAllocationID.NotFound" | "InvalidAddress.NotFound" | "InvalidAllocationID.Malformed") => {
            Class::UnknownAllocation
        }
        Some(
            "InvalidInstanceID.NotFound"
            | "InvalidInstanceID.Malformed"
            | "InvalidInstanceID"
            | "IncorrectInstanceState"
            | "InvalidInstanceID.NotLinkable",
        ) => Class::InvalidInstance,
        _ if status == 429 || status >= 500 => Class::Transient,
        _ => Class::Permanent,
    }
}

/// `Code: message` of a service error, or the error chain of a transport failure, for logs
/// and error lines.
pub fn describe<E: ProvideErrorMetadata + std::error::Error + 'static>(err: &SdkError<E, HttpResponse>) -> String {
    if let SdkError::ServiceError(_) = err
        && let Some(code) = err.code()
    {
        return match err.message() {
            Some(m) if !m.is_empty() => format!("{code}: {m}"),
            _ => code.to_string(),
        };
    }
    crate::logging::error_chain(err)
}

/// A claim that could not be completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimError {
    Metadata {
        what: &'static str,
        endpoint: String,
        detail: String,
    },
    MissingTag {
        key: String,
        instance: String,
        metadata_tags: bool,
    },
    BadTag {
        key: String,
        instance: String,
        value: String,
    },
    UnknownAllocation {
        allocation: String,
        region: String,
        source: String,
        detail: String,
    },
    AccessDenied {
        action: &'static str,
        detail: String,
    },
    NoCredentials {
        action: &'static str,
        detail: String,
    },
    InvalidInstance {
        instance: String,
        detail: String,
    },
    /// A newer instance took the address while this one was claiming it.
    Lost {
        allocation: String,
        instance: String,
        owner: String,
        why: Newer,
    },
    /// The address is held by a newer instance (by [`Newer`]'s rule): this one does not take it.
    HeldByNewer {
        allocation: String,
        instance: String,
        owner: String,
        why: Newer,
    },
    Deadline {
        action: &'static str,
        attempts: u32,
        waited: Duration,
        last: String,
    },
    Other {
        action: &'static str,
        detail: String,
    },
}

impl ClaimError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ClaimError::Metadata { .. } => exit::METADATA,
            ClaimError::MissingTag { .. } | ClaimError::BadTag { .. } => exit::MISSING_TAG,
            ClaimError::UnknownAllocation { .. } => exit::UNKNOWN_ALLOCATION,
            ClaimError::AccessDenied { .. } => exit::ACCESS_DENIED,
            ClaimError::NoCredentials { .. } => exit::CREDENTIALS,
            ClaimError::InvalidInstance { .. } => exit::INVALID_INSTANCE,
            ClaimError::Lost { .. } | ClaimError::HeldByNewer { .. } => exit::LOST,
            ClaimError::Deadline { .. } => exit::DEADLINE,
            ClaimError::Other { .. } => 1,
        }
    }
}

impl fmt::Display for ClaimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClaimError::Metadata { what, endpoint, detail } => write!(
                f,
                "cannot read the {what} from the instance metadata service at {endpoint} ({detail}); run this on an \
                 EC2 instance whose metadata options enable the endpoint and IMDSv2 tokens with a hop limit of 1 \
                 or more, or set eip.enabled = false off EC2"
            ),
            ClaimError::MissingTag { key, instance, metadata_tags } => {
                let looked = if *metadata_tags {
                    "in instance metadata tags and with ec2:DescribeTags"
                } else {
                    "with ec2:DescribeTags (instance metadata tags are not enabled for this instance)"
                };
                write!(
                    f,
                    "instance {instance} has no tag {key} (looked {looked}); tag its Auto Scaling group with \
                     {key} = <eipalloc-...> and PropagateAtLaunch, or set eip.allocation_id"
                )
            }
            ClaimError::BadTag { key, instance, value } => write!(
                f,
                "instance {instance}'s tag {key} is \"{value}\", which is not an allocation id (eipalloc- and hex \
                 digits); fix the tag on its Auto Scaling group"
            ),
            ClaimError::UnknownAllocation { allocation, region, source, detail } => write!(
                f,
                "Elastic IP allocation {allocation} (from {source}) does not exist in {region} ({detail}); use an \
                 allocation id from the addresses stack's outputs, in the instance's region"
            ),
            ClaimError::AccessDenied { action, detail } => write!(
                f,
                "ec2:{action} was denied ({detail}); attach the policy in docs/iam-policy.json to the instance role, \
                 and tag the Elastic IP static-ingress:managed = true"
            ),
            ClaimError::NoCredentials { action, detail } => write!(
                f,
                "no AWS credentials for ec2:{action} ({detail}); attach an instance profile whose role has the \
                 policy in docs/iam-policy.json"
            ),
            ClaimError::InvalidInstance { instance, detail } => write!(
                f,
                "EC2 refused instance {instance} until the deadline ({detail}); the id came from this instance's \
                 metadata, so EC2 in this region should know it: check that the instance is running"
            ),
            ClaimError::Lost { allocation, instance, owner, why } => write!(
                f,
                "{allocation} was taken by {owner} while {instance} was claiming it; {owner} is newer ({why}), so \
                 this instance leaves it to {owner} and keeps serving whoever still reaches it"
            ),
            ClaimError::HeldByNewer { allocation, instance, owner, why } => write!(
                f,
                "{allocation} is held by {owner}, which is newer than {instance} ({why}), so this instance does \
                 not take it; to move the address here, deploy a fleet with a larger FleetGeneration"
            ),
            ClaimError::Deadline { action, attempts, waited, last } => write!(
                f,
                "gave up after {attempts} attempt{} over {} (eip.deadline): {action} kept failing ({last}); EC2 may \
                 be throttling or unreachable from here",
                if *attempts == 1 { "" } else { "s" },
                humantime::format_duration(Duration::from_millis(waited.as_millis() as u64)),
            ),
            ClaimError::Other { action, detail } => write!(f, "{action} failed: {detail}"),
        }
    }
}

impl std::error::Error for ClaimError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_sort_into_retry_or_fix() {
        assert_eq!(classify_code(Some("RequestLimitExceeded"), 503), Class::Transient);
        assert_eq!(classify_code(Some("Throttling"), 400), Class::Transient);
        assert_eq!(classify_code(Some("InternalError"), 500), Class::Transient);
        assert_eq!(classify_code(None, 502), Class::Transient);
        assert_eq!(classify_code(Some("Whatever"), 503), Class::Transient);
        assert_eq!(classify_code(Some("UnauthorizedOperation"), 403), Class::AccessDenied);
        assert_eq!(classify_code(Some("InvalidAllocationID.NotFound"), 400), Class::UnknownAllocation);
        assert_eq!(classify_code(Some("InvalidInstanceID.NotFound"), 400), Class::InvalidInstance);
        assert_eq!(classify_code(Some("DryRunOperation"), 412), Class::DryRunOk);
        assert_eq!(classify_code(Some("Resource.AlreadyAssociated"), 400), Class::AlreadyAssociated);
        assert_eq!(classify_code(Some("InvalidParameterValue"), 400), Class::Permanent);
        assert_eq!(classify_code(None, 400), Class::Permanent);
    }

    #[test]
    fn missing_credentials_are_found_down_the_chain() {
        use aws_credential_types::provider::error::CredentialsError;
        #[derive(Debug, thiserror::Error)]
        #[error("dispatch failed")]
        struct Wrapper(#[source] CredentialsError);
        let missing = Wrapper(CredentialsError::not_loaded("no providers in chain provided credentials"));
        assert!(missing_credentials(&missing));
        let slow = Wrapper(CredentialsError::provider_timed_out(Duration::from_secs(5)));
        assert!(!missing_credentials(&slow), "a timed-out provider is worth another try");
        assert!(!missing_credentials(&std::io::Error::other("connection refused")));
    }

    #[test]
    fn exit_codes_are_distinct() {
        let mut codes = vec![
            exit::METADATA,
            exit::MISSING_TAG,
            exit::UNKNOWN_ALLOCATION,
            exit::ACCESS_DENIED,
            exit::INVALID_INSTANCE,
            exit::LOST,
            exit::DEADLINE,
            exit::CREDENTIALS,
        ];
        let n = codes.len();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), n);
        // Clear of the codes the rest of the program uses: 0, 1, 2 and 78.
        assert!(codes.iter().all(|c| !matches!(c, 0..=2 | 78)));
    }
}
