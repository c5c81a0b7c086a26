//! Lease rules, as pure functions over monotonic instants.
//!
//! A primary of an HA cluster may run only while it holds a lease: granted by the control plane
//! with each heartbeat (valid `lease_ms` from when the agent *sent* the heartbeat, so the agent's
//! view always expires before the control plane's), or — when the control plane is unreachable —
//! acknowledged by every standby's agent (a peer lease). A standby that acknowledged a primary
//! within the lease refuses to be promoted, so a primary that every member can still see keeps
//! serving through a control-plane outage, and nobody is promoted behind its back.

use std::time::{Duration, Instant};

/// What a primary's agent knows about its right to run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrimaryLease {
    /// Valid until, as granted by the control plane.
    pub control_plane_until: Option<Instant>,
    /// Valid until, as acknowledged by every standby.
    pub peers_until: Option<Instant>,
    /// Until when a freshly started agent may keep an already running primary without a lease
    /// (one lease period after start), so restarting the agent does not stop a healthy primary.
    pub boot_grace_until: Option<Instant>,
}

impl PrimaryLease {
    /// Whether the primary may keep accepting writes at `now`.
    pub fn valid(&self, now: Instant) -> bool {
        [self.control_plane_until, self.peers_until, self.boot_grace_until].iter().flatten().any(|u| *u > now)
    }

    /// Records a control-plane grant for a heartbeat sent at `sent`.
    pub fn granted(&mut self, sent: Instant, lease: Duration) {
        let until = sent + lease;
        self.control_plane_until = Some(self.control_plane_until.map_or(until, |u| u.max(until)));
    }

    /// Records that every standby acknowledged a request sent at `sent`.
    pub fn peers_acknowledged(&mut self, sent: Instant, lease: Duration) {
        let until = sent + lease;
        self.peers_until = Some(self.peers_until.map_or(until, |u| u.max(until)));
    }
}

/// A standby's promise to a primary: not to be promoted before `until` unless the epoch moved on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerPromise {
    pub epoch: u64,
    pub until: Instant,
}

/// Whether a standby may grant a peer lease to a primary claiming `epoch`.
pub fn may_grant(known_epoch: u64, is_standby: bool, epoch: u64) -> Result<(), String> {
    if !is_standby {
        return Err("this member is not a standby".into());
    }
    if epoch < known_epoch {
        return Err(format!("epoch {epoch} is stale: this member has seen epoch {known_epoch}"));
    }
    Ok(())
}

/// Whether a standby may be promoted at `now` to `new_epoch`, given its last promise.
pub fn may_promote(promise: Option<PeerPromise>, new_epoch: u64, now: Instant) -> Result<(), String> {
    match promise {
        Some(p) if p.until > now && p.epoch >= new_epoch.saturating_sub(1) => Err(format!(
            "the primary at epoch {} was alive {} ms ago and this member promised not to be promoted before its lease ends",
            p.epoch,
            (p.until - now).as_millis()
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_from_either_source_or_boot_grace() {
        let t0 = Instant::now();
        let lease = Duration::from_secs(2);
        let mut l = PrimaryLease::default();
        assert!(!l.valid(t0));
        l.granted(t0, lease);
        assert!(l.valid(t0 + Duration::from_secs(1)));
        assert!(!l.valid(t0 + Duration::from_secs(3)));
        l.peers_acknowledged(t0 + Duration::from_secs(2), lease);
        assert!(l.valid(t0 + Duration::from_secs(3)));
        let boot = PrimaryLease { boot_grace_until: Some(t0 + lease), ..Default::default() };
        assert!(boot.valid(t0) && !boot.valid(t0 + lease));
    }

    #[test]
    fn older_grants_never_shorten_a_lease() {
        let t0 = Instant::now();
        let mut l = PrimaryLease::default();
        l.granted(t0 + Duration::from_secs(5), Duration::from_secs(1));
        l.granted(t0, Duration::from_secs(1));
        assert!(l.valid(t0 + Duration::from_millis(5500)));
    }

    #[test]
    fn promises_block_promotion_until_they_expire() {
        let t0 = Instant::now();
        let p = PeerPromise { epoch: 3, until: t0 + Duration::from_secs(2) };
        assert!(may_promote(Some(p), 4, t0).is_err());
        assert!(may_promote(Some(p), 4, t0 + Duration::from_secs(3)).is_ok());
        assert!(may_promote(None, 4, t0).is_ok());
        // A promise to an older epoch's primary does not block a later promotion.
        assert!(may_promote(Some(PeerPromise { epoch: 1, until: t0 + Duration::from_secs(2) }), 4, t0).is_ok());
        assert!(may_grant(3, true, 2).is_err());
        assert!(may_grant(3, false, 3).is_err());
        assert!(may_grant(3, true, 3).is_ok());
    }
}
