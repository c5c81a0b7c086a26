//! What the control plane's long operations run on this host: a backup of a cluster (then the
//! expire of what retention no longer needs), a WAL switch that gets everything committed into
//! the archive, and the restore of one database from another cluster's backups into a new
//! database (a point-in-time clone), the archive of a database its owner retires (and loading
//! it back), and both sides of a database move between clusters. Each runs under a [`crate::jobs::JobTable`] so a retried
//! call joins it.

pub mod archive;
pub mod backup;
pub mod clone;
pub mod dumps;
pub mod moves;

pub use archive::{archive_database, delete_archive, load_archive, ArchiveRequest, LoadRequest};
pub use backup::{run_backup, switch_wal};
pub use clone::{restore_database, restore_work_dir, DatabaseRestore};
