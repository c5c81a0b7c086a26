//! Server settings derived from the resources granted to an instance, so every
//! cluster gets sane memory, WAL and replication settings without hand tuning.

use std::fmt::Write as _;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// WAL kept for standbys beyond what their slots hold: lets a standby without a
/// slot (or a pg_rewind right after a failover) find recent WAL on its upstream.
const WAL_KEEP_SIZE: u64 = 256 * MIB;

/// Budgets below this are treated as this (PostgreSQL needs some memory to start).
const MIN_BUDGET: u64 = 128 * MIB;

/// Tuned settings for one instance; render with [`Tuning::render`].
#[derive(Debug, Clone, PartialEq)]
pub struct Tuning {
    /// 25% of the budget.
    pub shared_buffers_bytes: u64,
    /// 75% of the budget (planner hint only).
    pub effective_cache_size_bytes: u64,
    /// ~5% of the budget, capped at 2 GiB.
    pub maintenance_work_mem_bytes: u64,
    /// Per-sort/hash memory so that all connections fit the budget.
    pub work_mem_bytes: u64,
    /// 50 plus 25 per GiB of budget, within 50..=500.
    pub max_connections: u32,
    /// Background worker slots: at least 8 (PostgreSQL's default), more with many cores.
    pub max_worker_processes: u32,
    /// Parallel query workers: one per core.
    pub max_parallel_workers: u32,
    /// Workers one query may use: half the cores, 1..=4.
    pub max_parallel_workers_per_gather: u32,
    /// Workers for CREATE INDEX / VACUUM: half the cores, 1..=4.
    pub max_parallel_maintenance_workers: u32,
    /// WAL sender processes for standbys and base backups.
    pub max_wal_senders: u32,
    /// Replication slots, so standbys never miss WAL they need.
    pub max_replication_slots: u32,
    /// WAL kept for reuse: 1 GiB, or 128 MiB for budgets under 1 GiB.
    pub min_wal_size_bytes: u64,
    /// WAL between checkpoints: 4 GiB, or 1 GiB for budgets under 1 GiB.
    pub max_wal_size_bytes: u64,
    /// Spread checkpoint writes over 90% of the interval to avoid I/O spikes.
    pub checkpoint_completion_target: f64,
}

/// Settings derived from the memory the agent may give this instance and its cores.
pub fn tuning_for(memory_budget_bytes: u64, cores: u32) -> Tuning {
    let budget = memory_budget_bytes.max(MIN_BUDGET);
    let cores = cores.max(1);

    let shared_buffers = round_down(budget / 4, 8 * KIB);
    let gib_tenths = budget * 10 / GIB; // budget in tenths of a GiB
    let max_connections = u32::try_from(50 + gib_tenths * 25 / 10).unwrap_or(u32::MAX).clamp(50, 500);
    let per_conn = (budget - shared_buffers) / (u64::from(max_connections) * 3);
    let (min_wal, max_wal) = if budget < GIB { (128 * MIB, GIB) } else { (GIB, 4 * GIB) };

    Tuning {
        shared_buffers_bytes: shared_buffers,
        effective_cache_size_bytes: round_down(budget / 4 * 3, 8 * KIB),
        maintenance_work_mem_bytes: round_down(budget / 20, KIB).clamp(16 * MIB, 2 * GIB),
        work_mem_bytes: round_down(per_conn, KIB).clamp(MIB, 512 * MIB),
        max_connections,
        max_worker_processes: cores.max(8),
        max_parallel_workers: cores,
        max_parallel_workers_per_gather: (cores / 2).clamp(1, 4),
        max_parallel_maintenance_workers: (cores / 2).clamp(1, 4),
        max_wal_senders: 10,
        max_replication_slots: 10,
        min_wal_size_bytes: min_wal,
        max_wal_size_bytes: max_wal,
        checkpoint_completion_target: 0.9,
    }
}

impl Tuning {
    /// `postgresql.conf` lines for these settings plus the fixed replication,
    /// WAL and authentication choices every Steward instance shares.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let mut line = |k: &str, v: String| {
            let _ = writeln!(s, "{k} = {v}");
        };
        line("shared_buffers", mem(self.shared_buffers_bytes));
        line("effective_cache_size", mem(self.effective_cache_size_bytes));
        line("maintenance_work_mem", mem(self.maintenance_work_mem_bytes));
        line("work_mem", mem(self.work_mem_bytes));
        line("max_connections", self.max_connections.to_string());
        line("max_worker_processes", self.max_worker_processes.to_string());
        line("max_parallel_workers", self.max_parallel_workers.to_string());
        let gather = self.max_parallel_workers_per_gather.to_string();
        line("max_parallel_workers_per_gather", gather);
        let maint = self.max_parallel_maintenance_workers.to_string();
        line("max_parallel_maintenance_workers", maint);
        // logical, not replica: a database can then be moved to another cluster by logical
        // replication without restarting its primary first.
        line("wal_level", "logical".into());
        line("max_wal_senders", self.max_wal_senders.to_string());
        line("max_replication_slots", self.max_replication_slots.to_string());
        line("wal_compression", "on".into());
        line("wal_log_hints", "on".into());
        line("hot_standby", "on".into());
        line("hot_standby_feedback", "on".into());
        line("wal_keep_size", mem(WAL_KEEP_SIZE));
        line("min_wal_size", mem(self.min_wal_size_bytes));
        line("max_wal_size", mem(self.max_wal_size_bytes));
        let target = format!("{:.2}", self.checkpoint_completion_target);
        line("checkpoint_completion_target", target);
        line("password_encryption", "'scram-sha-256'".into());
        s
    }
}

fn round_down(v: u64, unit: u64) -> u64 {
    v / unit * unit
}

/// Memory value with the largest exact PostgreSQL unit, quoted: `'256MB'`.
fn mem(bytes: u64) -> String {
    let (n, unit) = if bytes.is_multiple_of(GIB) {
        (bytes / GIB, "GB")
    } else if bytes.is_multiple_of(MIB) {
        (bytes / MIB, "MB")
    } else {
        (bytes / KIB, "kB")
    };
    format!("'{n}{unit}'")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_budget() {
        let t = tuning_for(512 * MIB, 1);
        assert_eq!(t.shared_buffers_bytes, 128 * MIB);
        assert_eq!(t.effective_cache_size_bytes, 384 * MIB);
        assert_eq!(t.max_connections, 62);
        assert!(t.maintenance_work_mem_bytes >= 16 * MIB && t.maintenance_work_mem_bytes < 32 * MIB);
        assert!(t.work_mem_bytes >= MIB && t.work_mem_bytes <= 4 * MIB);
        assert_eq!((t.min_wal_size_bytes, t.max_wal_size_bytes), (128 * MIB, GIB));
        assert_eq!(t.max_parallel_workers_per_gather, 1);
        // everything that can be allocated per connection still fits the budget
        let worst = t.shared_buffers_bytes + u64::from(t.max_connections) * t.work_mem_bytes;
        assert!(worst <= 512 * MIB);
    }

    #[test]
    fn large_budget() {
        let t = tuning_for(64 * GIB, 16);
        assert_eq!(t.shared_buffers_bytes, 16 * GIB);
        assert_eq!(t.effective_cache_size_bytes, 48 * GIB);
        assert_eq!(t.maintenance_work_mem_bytes, 2 * GIB);
        assert_eq!(t.max_connections, 500);
        assert_eq!(t.work_mem_bytes, round_down(48 * GIB / 1500, KIB));
        assert_eq!((t.min_wal_size_bytes, t.max_wal_size_bytes), (GIB, 4 * GIB));
        assert_eq!(t.max_worker_processes, 16);
        assert_eq!(t.max_parallel_workers_per_gather, 4);
    }

    #[test]
    fn tiny_budget_and_zero_cores_are_floored() {
        let t = tuning_for(0, 0);
        assert_eq!(t.shared_buffers_bytes, 32 * MIB);
        assert_eq!(t.max_connections, 52);
        assert_eq!(t.max_parallel_workers, 1);
        assert_eq!(t, tuning_for(MIN_BUDGET, 1));
    }

    #[test]
    fn renders_units_and_fixed_settings() {
        let r = tuning_for(512 * MIB, 2).render();
        assert!(r.contains("shared_buffers = '128MB'\n"), "{r}");
        assert!(r.contains("max_wal_size = '1GB'\n"), "{r}");
        assert!(r.contains("wal_level = logical\n"));
        assert!(r.contains("wal_log_hints = on\n"));
        assert!(r.contains("max_wal_senders = 10\n"));
        assert!(r.contains("max_replication_slots = 10\n"));
        assert!(r.contains("hot_standby_feedback = on\n"));
        assert!(r.contains("wal_keep_size = '256MB'\n"));
        assert!(r.contains("checkpoint_completion_target = 0.90\n"));
        assert!(r.contains("password_encryption = 'scram-sha-256'\n"));
        assert_eq!(mem(1536 * KIB), "'1536kB'");
    }
}
