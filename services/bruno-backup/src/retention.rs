//! Which backups to delete: keep the newest verified backup of each of the
//! last `hourly` hours and of each of the last `daily` days that have one;
//! delete anything older only once a newer verified backup exists; never
//! the newest verified one.

use std::collections::HashSet;

use chrono::{DateTime, Timelike, Utc};
use serde::Deserialize;

/// `[backup.retention]`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Hourly backups kept (the newest of each hour).
    pub hourly: usize,
    /// Daily backups kept (the newest of each day, UTC).
    pub daily: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            hourly: 24,
            daily: 7,
        }
    }
}

/// A complete backup (its manifest exists) as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Backup id.
    pub id: String,
    /// When its tables were pinned.
    pub at: DateTime<Utc>,
    /// A restore of it was verified.
    pub verified: bool,
}

/// The ids to delete under `policy`.
pub fn plan(backups: &[Candidate], policy: Policy) -> Vec<String> {
    let mut verified: Vec<&Candidate> = backups.iter().filter(|b| b.verified).collect();
    verified.sort_by(|a, b| b.at.cmp(&a.at).then_with(|| b.id.cmp(&a.id)));
    let Some(newest) = verified.first() else {
        // Nothing is verified: nothing may go.
        return Vec::new();
    };
    let mut keep: HashSet<&str> = HashSet::from([newest.id.as_str()]);
    let mut hours = HashSet::new();
    let mut days = HashSet::new();
    for b in &verified {
        let hour = b.at.date_naive().and_hms_opt(b.at.hour(), 0, 0);
        if hours.len() < policy.hourly && hours.insert(hour) {
            keep.insert(b.id.as_str());
        }
        let day = b.at.date_naive();
        if days.len() < policy.daily && days.insert(day) {
            keep.insert(b.id.as_str());
        }
    }
    let mut delete: Vec<String> = backups
        .iter()
        .filter(|b| !keep.contains(b.id.as_str()))
        // Older than the newest verified one: a newer verified backup exists.
        // (An unverified backup newer than it may still be verifying.)
        .filter(|b| b.at < newest.at || (b.verified && b.id != newest.id))
        .map(|b| b.id.clone())
        .collect();
    delete.sort();
    delete
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone};

    fn at(start: DateTime<Utc>, minutes: i64) -> DateTime<Utc> {
        start + Duration::minutes(minutes)
    }

    fn candidate(id: &str, when: DateTime<Utc>, verified: bool) -> Candidate {
        Candidate {
            id: id.into(),
            at: when,
            verified,
        }
    }

    /// A fake clock: a backup every 20 minutes for three days.
    #[test]
    fn keeps_the_newest_of_each_hour_and_day_and_deletes_exactly_the_rest() {
        let t0 = Utc.with_ymd_and_hms(2026, 11, 20, 0, 10, 0).unwrap();
        let backups: Vec<Candidate> = (0..3 * 24 * 3)
            .map(|i| candidate(&format!("b{i:04}"), at(t0, 20 * i), true))
            .collect();
        let policy = Policy {
            hourly: 5,
            daily: 3,
        };
        let delete = plan(&backups, policy);
        let kept: Vec<&Candidate> = backups.iter().filter(|b| !delete.contains(&b.id)).collect();
        // The last 5 hours' newest (the :50 ones) and each day's newest
        // (23:50 of day 1 and 2; day 3's is the newest overall).
        let ids: Vec<&str> = kept.iter().map(|b| b.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "b0071", "b0143", "b0203", "b0206", "b0209", "b0212", "b0215"
            ]
        );
        assert_eq!(delete.len(), backups.len() - 7);
    }

    #[test]
    fn never_deletes_the_newest_verified_backup_nor_anything_without_one() {
        let t0 = Utc.with_ymd_and_hms(2026, 11, 20, 8, 0, 0).unwrap();
        let zero = Policy {
            hourly: 0,
            daily: 0,
        };
        // Nothing verified: nothing goes, however old.
        let unverified = vec![
            candidate("a", at(t0, 0), false),
            candidate("b", at(t0, 60), false),
        ];
        assert!(plan(&unverified, zero).is_empty());
        // The newest verified backup survives a policy that keeps nothing;
        // an unverified newer one may still be verifying; older ones go.
        let mixed = vec![
            candidate("a", at(t0, 0), true),
            candidate("b", at(t0, 60), false),
            candidate("c", at(t0, 120), true),
            candidate("d", at(t0, 180), false),
        ];
        assert_eq!(plan(&mixed, zero), ["a", "b"]);
    }
}
