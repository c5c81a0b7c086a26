//! What PostgreSQL hands to `archive_command`: WAL segment files, partial segments left at a
//! timeline switch, timeline history files and backup history files. Pure parsing of their
//! names and of a segment's first page, so archive-push can refuse WAL from another cluster.

use std::path::Path;

use super::BackupError;

/// `XLP_LONG_HEADER`: the first page of every segment carries the long header.
const XLP_LONG_HEADER: u16 = 0x0002;

/// Size of `XLogLongPageHeaderData` (the short header is 24 bytes after alignment, then
/// `xlp_sysid` u64, `xlp_seg_size` u32, `xlp_xlog_blcksz` u32).
pub const LONG_HEADER_LEN: usize = 40;

/// The name of the segment holding the WAL just before `lsn` on `timeline` (PostgreSQL's
/// `pg_walfile_name`, which a standby cannot call): a position at a segment boundary belongs
/// to the segment before it.
pub fn segment_before(timeline: u32, lsn: u64, segment_size: u32) -> String {
    let size = u64::from(segment_size.max(1));
    let per_log = 0x1_0000_0000u64 / size;
    let segno = lsn.saturating_sub(1) / size;
    format!("{timeline:08X}{:08X}{:08X}", segno / per_log, segno % per_log)
}

/// One file name that PostgreSQL archives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalName {
    /// `TTTTTTTTXXXXXXXXYYYYYYYY`, or with `.partial` for the last segment of an old timeline.
    Segment { timeline: u32, log: u32, seg: u32, partial: bool },
    /// `TTTTTTTT.history`: the timeline's ancestry, written at each promotion.
    History { timeline: u32 },
    /// `TTTTTTTTXXXXXXXXYYYYYYYY.OOOOOOOO.backup`: start and stop of a base backup.
    BackupHistory { timeline: u32 },
}

/// Eight upper-case hex digits, as PostgreSQL writes them (so every name has one spelling).
fn hex8(s: &str) -> Option<u32> {
    let upper_hex = |b: u8| b.is_ascii_digit() || (b'A'..=b'F').contains(&b);
    (s.len() == 8 && s.bytes().all(upper_hex)).then(|| u32::from_str_radix(s, 16).ok()).flatten()
}

impl WalName {
    /// Parses a bare file name (no directories). Upper-case hex only, as PostgreSQL writes it,
    /// so every archived name has exactly one spelling.
    pub fn parse(name: &str) -> Result<Self, BackupError> {
        let bad = |why| BackupError::NotWalName { name: name.to_string(), why };
        if let Some(tli) = name.strip_suffix(".history") {
            let timeline = hex8(tli).ok_or_else(|| bad("a history file is 8 hex digits + .history"))?;
            return Ok(WalName::History { timeline });
        }
        if let Some(rest) = name.strip_suffix(".backup") {
            let (seg, offset) =
                rest.split_once('.').ok_or_else(|| bad("a backup history file is SEGMENT.OFFSET.backup"))?;
            let WalName::Segment { timeline, partial: false, .. } =
                Self::parse_segment(seg).ok_or_else(|| bad("bad segment part"))?
            else {
                return Err(bad("bad segment part"));
            };
            hex8(offset).ok_or_else(|| bad("the offset of a backup history file is 8 hex digits"))?;
            return Ok(WalName::BackupHistory { timeline });
        }
        let (seg, partial) = match name.strip_suffix(".partial") {
            Some(s) => (s, true),
            None => (name, false),
        };
        match Self::parse_segment(seg) {
            Some(WalName::Segment { timeline, log, seg, .. }) => Ok(WalName::Segment { timeline, log, seg, partial }),
            _ => Err(bad("expected 24 hex digits (a segment), TIMELINE.history or SEGMENT.OFFSET.backup")),
        }
    }

    fn parse_segment(s: &str) -> Option<WalName> {
        if s.len() != 24 {
            return None;
        }
        Some(WalName::Segment {
            timeline: hex8(&s[0..8])?,
            log: hex8(&s[8..16])?,
            seg: hex8(&s[16..24])?,
            partial: false,
        })
    }

    /// The directory of the archive this name is stored in: segments (and their `.partial` and
    /// `.backup` companions) are grouped by their first 16 hex digits (timeline and log), so no
    /// directory grows past 256 entries per timeline with 16 MiB segments; history files sit
    /// at the top. Returns the name's first 16 characters, or None for the top.
    pub fn group<'a>(&self, name: &'a str) -> Option<&'a str> {
        match self {
            WalName::History { .. } => None,
            _ => name.get(0..16),
        }
    }

    /// Where a segment lies in the WAL, in segments from the start (timeline aside), for
    /// segments of `segment_size` bytes; None for history files.
    pub fn position(&self, segment_size: u32) -> Option<u64> {
        let per_log = 0x1_0000_0000u64 / u64::from(segment_size.max(1));
        match self {
            WalName::Segment { log, seg, .. } => Some(u64::from(*log) * per_log + u64::from(*seg)),
            _ => None,
        }
    }

    /// The timeline the file belongs to.
    pub fn timeline(&self) -> u32 {
        match self {
            WalName::Segment { timeline, .. } | WalName::History { timeline } | WalName::BackupHistory { timeline } => {
                *timeline
            }
        }
    }

    /// Whether the file starts with a WAL page header (so its system identifier can be read).
    pub fn has_page_header(&self) -> bool {
        matches!(self, WalName::Segment { .. })
    }
}

/// What a segment's first page says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// `xlp_magic`: changes with each major version's WAL format.
    pub magic: u16,
    pub timeline: u32,
    /// The database system identifier, the same on a primary and its physical standbys.
    pub system_identifier: u64,
    pub segment_size: u32,
    pub block_size: u32,
}

/// Reads the long page header at the start of a segment (native byte order: WAL is never
/// moved between architectures) and checks it is one, and that the file has the size it names.
pub fn parse_segment_header(path: &Path, data: &[u8]) -> Result<SegmentHeader, BackupError> {
    let bad = |why: String| BackupError::BadSegment { path: path.to_path_buf(), why };
    if data.len() < LONG_HEADER_LEN {
        return Err(bad(format!("{} bytes is shorter than a page header", data.len())));
    }
    let u16_at = |o: usize| u16::from_ne_bytes([data[o], data[o + 1]]);
    let u32_at = |o: usize| u32::from_ne_bytes([data[o], data[o + 1], data[o + 2], data[o + 3]]);
    let mut sysid = [0u8; 8];
    sysid.copy_from_slice(&data[24..32]);
    let h = SegmentHeader {
        magic: u16_at(0),
        timeline: u32_at(4),
        system_identifier: u64::from_ne_bytes(sysid),
        segment_size: u32_at(32),
        block_size: u32_at(36),
    };
    if u16_at(2) & XLP_LONG_HEADER == 0 {
        return Err(bad("the first page has no long header".into()));
    }
    if h.system_identifier == 0 {
        return Err(bad("the system identifier is zero".into()));
    }
    if !h.block_size.is_power_of_two() || h.block_size < 1024 || !h.segment_size.is_power_of_two() {
        return Err(bad(format!("implausible block size {} or segment size {}", h.block_size, h.segment_size)));
    }
    if data.len() as u64 != u64::from(h.segment_size) {
        return Err(bad(format!(
            "the file has {} bytes but its header says segments have {}",
            data.len(),
            h.segment_size
        )));
    }
    Ok(h)
}

/// The system identifier from `global/pg_control` (its first field).
pub fn control_system_identifier(pg_data: &Path) -> Result<u64, BackupError> {
    let path = pg_data.join("global").join("pg_control");
    let data = std::fs::read(&path).map_err(|e| BackupError::io("read", &path, e))?;
    let first: [u8; 8] = data
        .get(0..8)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| BackupError::BadSegment { path: path.clone(), why: "pg_control is truncated".into() })?;
    Ok(u64::from_ne_bytes(first))
}

/// Builds the first page header of a segment, for tests and benchmarks that need WAL files
/// without a server.
pub fn fake_segment(system_identifier: u64, timeline: u32, segment_size: u32, fill: u8) -> Vec<u8> {
    let mut data = vec![fill; segment_size as usize];
    data[0..2].copy_from_slice(&0xD110u16.to_ne_bytes());
    data[2..4].copy_from_slice(&(XLP_LONG_HEADER | 0x0004).to_ne_bytes());
    data[4..8].copy_from_slice(&timeline.to_ne_bytes());
    data[8..24].fill(0);
    data[24..32].copy_from_slice(&system_identifier.to_ne_bytes());
    data[32..36].copy_from_slice(&segment_size.to_ne_bytes());
    data[36..40].copy_from_slice(&8192u32.to_ne_bytes());
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_before_matches_pg_walfile_name() {
        let mb16 = 16 << 20;
        assert_eq!(segment_before(1, 0x0300_0028, mb16), "000000010000000000000003");
        // a boundary belongs to the segment before it
        assert_eq!(segment_before(1, 0x0300_0000, mb16), "000000010000000000000002");
        assert_eq!(segment_before(2, (1u64 << 32) + 0x10, mb16), "000000020000000100000000");
        assert_eq!(segment_before(1, 1u64 << 32, mb16), "0000000100000000000000FF");
        assert_eq!(segment_before(3, 0x4000_0001, 64 << 20), "000000030000000000000010");
    }

    #[test]
    fn names() {
        assert_eq!(
            WalName::parse("000000010000000A000000FF").unwrap(),
            WalName::Segment { timeline: 1, log: 10, seg: 255, partial: false }
        );
        assert_eq!(
            WalName::parse("000000020000000000000003.partial").unwrap(),
            WalName::Segment { timeline: 2, log: 0, seg: 3, partial: true }
        );
        assert_eq!(WalName::parse("00000002.history").unwrap(), WalName::History { timeline: 2 });
        assert_eq!(
            WalName::parse("000000010000000000000002.00000028.backup").unwrap(),
            WalName::BackupHistory { timeline: 1 }
        );
        for bad in [
            "",
            "0000000100000000000000",
            "000000010000000a000000ff",
            "../../etc/passwd",
            "00000001000000000000000G",
            "0000000X.history",
            "000000010000000000000002.backup",
            "000000010000000000000002.partial.backup",
            "000000010000000000000002/x",
        ] {
            assert!(WalName::parse(bad).is_err(), "{bad:?} accepted");
        }
        let seg = |s: &str| WalName::parse(s).unwrap().position(16 << 20);
        assert_eq!(seg("000000010000000000000001"), Some(1));
        assert_eq!(seg("0000000200000001000000FF"), Some(256 + 255), "16 MiB segments: 256 per log");
        assert_eq!(WalName::parse("000000030000000200000000").unwrap().position(1 << 30), Some(8));
        assert_eq!(WalName::parse("00000002.history").unwrap().position(16 << 20), None);
        let n = "000000010000000A000000FF";
        assert_eq!(WalName::parse(n).unwrap().group(n), Some("000000010000000A"));
        assert_eq!(WalName::parse("00000002.history").unwrap().group("00000002.history"), None);
    }

    #[test]
    fn segment_header_round_trip_and_rejections() {
        let p = Path::new("x");
        let seg = fake_segment(7_000_000_000_000_000_001, 3, 1 << 16, 0xAB);
        let h = parse_segment_header(p, &seg).unwrap();
        assert_eq!(h.system_identifier, 7_000_000_000_000_000_001);
        assert_eq!((h.timeline, h.segment_size, h.block_size), (3, 1 << 16, 8192));
        assert!(parse_segment_header(p, &seg[..100]).is_err(), "truncated file accepted");
        assert!(parse_segment_header(p, &seg[..10]).is_err());
        let mut short = seg.clone();
        short[2] = 0;
        short[3] = 0;
        assert!(parse_segment_header(p, &short).is_err(), "short header accepted");
        let zeros = vec![0u8; 1 << 16];
        assert!(parse_segment_header(p, &zeros).is_err(), "all-zero file accepted");
    }
}
