//! The one rule that decides which of two instances holds an address: the newer fleet wins.
//!
//! "Newer" is the fleet generation first (the tag [`GENERATION_TAG`], set by each fleet stack
//! and propagated to its instances), then the launch time, then the instance id. The launch
//! time alone is not enough: an old fleet's Auto Scaling group that replaces a broken
//! instance launches one later than the new fleet's, and that one must not take the address
//! back. The order is total, so of two instances exactly one is newer: they never both yield,
//! and never both take.

use std::cmp::Ordering;
use std::fmt;

/// The instance tag holding the fleet's generation: a whole number, larger for a later
/// release (the fleet template sets it from its `FleetGeneration` parameter).
pub const GENERATION_TAG: &str = "static-ingress:fleet-generation";

/// What ranks an instance against another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rank {
    pub instance_id: String,
    /// `None`: no generation tag (or one that is not a whole number), which ranks below every
    /// tagged fleet, as a fleet from before generations would.
    pub generation: Option<u64>,
    /// Seconds and nanoseconds since the epoch, as EC2 reports it (to the second).
    pub launched: (i64, u32),
}

impl Rank {
    fn key(&self) -> (Option<u64>, (i64, u32), &str) {
        (self.generation, self.launched, &self.instance_id)
    }

    /// Why `self` is newer than `other`, or `None` when it is not.
    pub fn newer_than(&self, other: &Rank) -> Option<Newer> {
        if self.key().cmp(&other.key()) != Ordering::Greater {
            return None;
        }
        Some(if self.generation != other.generation {
            Newer::Generation { newer: self.generation, older: other.generation }
        } else if self.launched != other.launched {
            Newer::LaunchedLater
        } else {
            Newer::InstanceId
        })
    }
}

/// Which part of the rule made one instance the newer one, for logs and error lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Newer {
    Generation {
        newer: Option<u64>,
        older: Option<u64>,
    },
    /// Same generation, launched later.
    LaunchedLater,
    /// Same generation, launched in the same second: the larger instance id.
    InstanceId,
}

impl fmt::Display for Newer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let generation = |g: &Option<u64>| g.map_or_else(|| "none".to_string(), |g| g.to_string());
        match self {
            Newer::Generation { newer, older } => {
                write!(f, "a newer fleet: {GENERATION_TAG} {} against {}", generation(newer), generation(older))
            }
            Newer::LaunchedLater => write!(f, "the same fleet generation, launched later"),
            Newer::InstanceId => write!(f, "the same fleet generation and launch time, and a larger instance id"),
        }
    }
}

/// Reads a generation tag's value: a whole number, or nothing.
pub fn parse_generation(value: &str) -> Option<u64> {
    let v = value.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rank(id: &str, generation: Option<u64>, launched: i64) -> Rank {
        Rank { instance_id: id.into(), generation, launched: (launched, 0) }
    }

    #[test]
    fn generation_beats_launch_time() {
        // The old fleet's replacement, launched an hour after the new fleet's instance.
        let new_fleet = rank("i-0aaa", Some(20261205), 1_000);
        let old_replacement = rank("i-0fff", Some(20261121), 4_600);
        assert_eq!(
            new_fleet.newer_than(&old_replacement),
            Some(Newer::Generation { newer: Some(20261205), older: Some(20261121) })
        );
        assert_eq!(old_replacement.newer_than(&new_fleet), None);
        // Untagged ranks below tagged.
        let untagged = rank("i-0fff", None, 9_000);
        assert!(matches!(new_fleet.newer_than(&untagged), Some(Newer::Generation { older: None, .. })));
        assert_eq!(untagged.newer_than(&new_fleet), None);
    }

    #[test]
    fn launch_time_then_instance_id_break_ties_and_exactly_one_is_newer() {
        let a = rank("i-0aaa", Some(3), 1_000);
        let b = rank("i-0bbb", Some(3), 1_001);
        assert_eq!(b.newer_than(&a), Some(Newer::LaunchedLater));
        assert_eq!(a.newer_than(&b), None);
        let c = rank("i-0ccc", Some(3), 1_000);
        assert_eq!(c.newer_than(&a), Some(Newer::InstanceId));
        assert_eq!(a.newer_than(&c), None);
        assert_eq!(a.newer_than(&a), None, "an instance is not newer than itself");
        assert_eq!(
            Newer::Generation { newer: Some(4), older: None }.to_string(),
            "a newer fleet: static-ingress:fleet-generation 4 against none"
        );
    }

    #[test]
    fn generations_are_whole_numbers() {
        assert_eq!(parse_generation("20261205113000"), Some(20261205113000));
        assert_eq!(parse_generation(" 7 "), Some(7));
        for bad in ["", "v2", "-1", "1.5", "99999999999999999999999"] {
            assert_eq!(parse_generation(bad), None, "{bad:?}");
        }
    }
}
