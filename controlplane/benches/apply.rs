//! Cost of applying team creates to the state, the work every node repeats for every write:
//! `cargo bench -p steward-controlplane --bench apply [-- TEAMS]`.
//!
//! Applies TEAMS (default 60,000) `CreateTeam` commands in transactions of 16, as group commit
//! hands them to the state machine at ~2,000 writes/s, to a state on tmpfs (`/dev/shm`, as
//! `--state-dir` keeps it), and reports the process's CPU time per create (the applying thread,
//! the state's checkpoint thread, and building the commands, the same in every variant). Four
//! variants run side by side, in turns, so a drifting machine affects them alike: with the
//! state's schema before and after migration 0008 (which dropped the UNIQUE index on
//! `teams.token_hash`), and with random (UUIDv4) or time-ordered (UUIDv7) token ids.

use std::path::PathBuf;
use std::time::Instant;

use steward_controlplane::api::auth::{new_token, token_hash};
use steward_controlplane::state::apply::apply_entry;
use steward_controlplane::state::{Command, Store};

/// Commands per apply transaction.
const BATCH: usize = 16;

/// Variants in turns: (label, UNIQUE index on teams.token_hash, time-ordered ids).
const VARIANTS: [(&str, bool, bool); 4] = [
    ("before: token_hash index, random ids", true, false),
    ("token_hash index dropped", false, false),
    ("time-ordered ids", true, true),
    ("now: both", false, true),
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let teams: usize = match std::env::args().skip(1).find(|a| !a.starts_with('-')) {
        Some(a) => a.parse().map_err(|e| format!("TEAMS must be a number, not {a:?}: {e}"))?,
        None => 60_000,
    };
    let root = if std::path::Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    eprintln!("{teams} team creates per variant, {BATCH} per transaction, state under {}", root.display());
    let mut rows = Vec::new();
    for round in 0..2 {
        for (label, index, ordered) in VARIANTS {
            let dir = tempfile::Builder::new().prefix("steward-apply-bench-").tempdir_in(&root)?;
            let (cpu_us, wall_us, bytes) = rt.block_on(run(dir.path(), teams, index, ordered))?;
            eprintln!("round {round}: {label}: {cpu_us:.1} us CPU, {wall_us:.1} us wall per create");
            rows.push((label, cpu_us, wall_us, bytes));
        }
    }
    println!("| variant | CPU us per create (two runs) | wall us per create | state file MiB |");
    println!("| --- | --- | --- | --- |");
    for (label, ..) in VARIANTS {
        let r: Vec<_> = rows.iter().filter(|r| r.0 == label).collect();
        let cpu: Vec<String> = r.iter().map(|r| format!("{:.1}", r.1)).collect();
        let wall: Vec<String> = r.iter().map(|r| format!("{:.1}", r.2)).collect();
        let mib = r.last().map(|r| r.3 as f64 / (1 << 20) as f64).unwrap_or(0.0);
        println!("| {label} | {} | {} | {mib:.1} |", cpu.join(" / "), wall.join(" / "));
    }
    Ok(())
}

/// One variant in a fresh state directory: (CPU us per create, wall us per create, file bytes).
async fn run(
    dir: &std::path::Path,
    teams: usize,
    index: bool,
    ordered: bool,
) -> Result<(f64, f64, u64), Box<dyn std::error::Error>> {
    let store = Store::open(dir).await?;
    if index {
        store
            .writer()
            .run(|c| c.execute_batch("CREATE UNIQUE INDEX teams_token_hash_before_0008 ON teams (token_hash)"))
            .await?;
    }
    let (cpu0, started) = (process_cpu_secs(), Instant::now());
    for first in (0..teams).step_by(BATCH) {
        let commands: Vec<Command> = (first..(first + BATCH).min(teams))
            .map(|i| {
                let id = if ordered { uuid::Uuid::now_v7() } else { uuid::Uuid::new_v4() };
                Command::CreateTeam {
                    // As cp-bench names them: 64 clients, each counting up.
                    name: format!("bench-c{}-s{}", i % 64, i / 64),
                    contact: "bench@example.com".into(),
                    token_hash: token_hash(&new_token("stw")),
                    at: steward_controlplane::now(),
                    actor: "admin".into(),
                    token_id: Some(id.simple().to_string()),
                }
            })
            .collect();
        store
            .writer()
            .run(move |conn| {
                let tx = conn.transaction()?;
                apply_entry(&tx, &Command::Batch { commands })?;
                tx.commit()
            })
            .await?;
    }
    let (cpu, wall) = (process_cpu_secs() - cpu0, started.elapsed().as_secs_f64());
    let bytes = std::fs::metadata(store.path())?.len();
    Ok((cpu * 1e6 / teams as f64, wall * 1e6 / teams as f64, bytes))
}

/// CPU seconds this process has used, from `/proc/self/stat` (user + system, in clock ticks of
/// 10 ms: a variant runs for seconds).
fn process_cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let ticks: u64 = [11, 12].iter().filter_map(|&i| fields.get(i)?.parse::<u64>().ok()).sum();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100);
    ticks as f64 / hz as f64
}
