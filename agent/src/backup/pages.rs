//! Page-level deltas for incremental backups. PostgreSQL stamps every relation page with the
//! LSN of the last WAL record that changed it (`pd_lsn`, its first 8 bytes); with data
//! checksums on (so hint-bit changes are WAL-logged too) a page whose LSN is below the prior
//! backup's start LSN is the same as in that backup. Only the other pages are stored, in a
//! small binary format: `STWPAGE1`, page size (u32 LE), file size (u64 LE), count (u32 LE),
//! then per page its number (u32 LE) and its bytes.

const MAGIC: &[u8; 8] = b"STWPAGE1";

/// The LSN stamped on a page (native byte order, as PostgreSQL writes it).
pub fn page_lsn(page: &[u8]) -> u64 {
    if page.len() < 8 {
        return 0;
    }
    let hi = u32::from_ne_bytes([page[0], page[1], page[2], page[3]]);
    let lo = u32::from_ne_bytes([page[4], page[5], page[6], page[7]]);
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Whether a path in PGDATA is the main fork of a relation, whose pages are WAL-logged and so
/// may be stored as a delta: `base/<db oid>/<relfilenode>[.<segment>]` or `global/<...>`.
/// Free-space maps (not WAL-logged), init forks and everything else are stored whole.
pub fn is_relation_main_fork(path: &str) -> bool {
    let name = match path.split('/').collect::<Vec<_>>().as_slice() {
        ["base", db, name] if db.bytes().all(|b| b.is_ascii_digit()) => *name,
        ["global", name] => *name,
        _ => return false,
    };
    let (node, seg) = name.split_once('.').unwrap_or((name, "0"));
    !node.is_empty()
        && node.bytes().all(|b| b.is_ascii_digit())
        && !seg.is_empty()
        && seg.bytes().all(|b| b.is_ascii_digit())
}

/// The numbers of the pages of `data` changed since `since_lsn`: every page at or past
/// `prior_pages` (the file grew) and every page stamped at or after `since_lsn`.
pub fn changed_pages(data: &[u8], page_size: usize, prior_pages: u64, since_lsn: u64) -> Vec<u32> {
    data.chunks(page_size)
        .enumerate()
        .filter(|(i, page)| changed(page, *i as u64, page_size, prior_pages, since_lsn))
        .map(|(i, _)| i as u32)
        .collect()
}

/// The header of a delta of `count` pages of `page_size` bytes, of a file of `file_size` bytes;
/// each page follows as its number (u32 LE) and its bytes.
pub fn header(page_size: usize, file_size: u64, count: u32) -> [u8; 24] {
    let mut h = [0u8; 24];
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&(page_size as u32).to_le_bytes());
    h[12..20].copy_from_slice(&file_size.to_le_bytes());
    h[20..24].copy_from_slice(&count.to_le_bytes());
    h
}

/// Whether the page `number` of a file is stored in a delta since `since_lsn`: every page at or
/// past `prior_pages` (the file grew), a partial last page, and every page stamped at or after
/// `since_lsn`.
pub fn changed(page: &[u8], number: u64, page_size: usize, prior_pages: u64, since_lsn: u64) -> bool {
    number >= prior_pages || page.len() < page_size || page_lsn(page) >= since_lsn
}

/// Encodes the listed pages of `data`.
pub fn encode(data: &[u8], page_size: usize, pages: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + pages.len() * (page_size + 4));
    out.extend_from_slice(&header(page_size, data.len() as u64, pages.len() as u32));
    for &p in pages {
        let start = p as usize * page_size;
        let page = &data[start..(start + page_size).min(data.len())];
        out.extend_from_slice(&p.to_le_bytes());
        out.extend_from_slice(page);
        out.resize(out.len() + page_size - page.len(), 0);
    }
    out
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Checks a delta's header and length; returns (page size, file size, page count).
fn parse_header(delta: &[u8]) -> Result<(usize, u64, usize), String> {
    let header = delta.get(0..24).ok_or("page delta shorter than its header")?;
    if &header[0..8] != MAGIC {
        return Err("not a page delta (bad magic)".into());
    }
    let page_size = le32(&header[8..12]) as usize;
    let mut size_bytes = [0u8; 8];
    size_bytes.copy_from_slice(&header[12..20]);
    let count = le32(&header[20..24]) as usize;
    if page_size == 0 || delta.len() != 24 + count * (4 + page_size) {
        return Err(format!("page delta of {} bytes does not hold {count} pages of {page_size}", delta.len()));
    }
    Ok((page_size, u64::from_le_bytes(size_bytes), count))
}

/// Lays the pages of `delta` over `base` and cuts or extends it to the recorded file size.
pub fn apply(mut base: Vec<u8>, delta: &[u8]) -> Result<Vec<u8>, String> {
    let (page_size, size, count) = parse_header(delta)?;
    let size = usize::try_from(size).map_err(|_| "file size too large")?;
    base.resize(size, 0);
    for i in 0..count {
        let at = 24 + i * (4 + page_size);
        let page_no = le32(&delta[at..at + 4]) as usize;
        let start = page_no * page_size;
        if start >= size {
            return Err(format!("page {page_no} lies past the file's end ({size} bytes)"));
        }
        let end = (start + page_size).min(size);
        base[start..end].copy_from_slice(&delta[at + 4..at + 4 + (end - start)]);
    }
    Ok(base)
}

/// Like [`apply`], on a file holding the base version: writes the pages in place and cuts or
/// extends the file to the recorded size, which it returns.
pub fn apply_to_file(file: &std::fs::File, delta: &[u8]) -> Result<u64, String> {
    use std::os::unix::fs::FileExt;
    let (page_size, size, count) = parse_header(delta)?;
    file.set_len(size).map_err(|e| format!("resizing: {e}"))?;
    for i in 0..count {
        let at = 24 + i * (4 + page_size);
        let start = u64::from(le32(&delta[at..at + 4])) * page_size as u64;
        if start >= size {
            return Err(format!("a page lies past the file's end ({size} bytes)"));
        }
        let len = (page_size as u64).min(size - start) as usize;
        file.write_all_at(&delta[at + 4..at + 4 + len], start).map_err(|e| format!("writing a page: {e}"))?;
    }
    Ok(size)
}

/// Several deltas laid over a base file (oldest first), to be merged into the base as it is
/// streamed, so a file is written and hashed once: what [`apply`] of each delta in turn makes,
/// without the base in memory. Each delta cuts or extends the file to its recorded size, so a
/// byte of the base survives only below the smallest size since, and a page of a delta only
/// below the smallest size of the deltas after it.
pub struct Overlay<'a> {
    page_size: usize,
    size: u64,
    /// Base bytes at or past this are gone (zero, unless a page covers them).
    base_cut: u64,
    pages: std::collections::BTreeMap<u64, &'a [u8]>,
}

impl<'a> Overlay<'a> {
    /// The overlay of `deltas`, oldest first (at least one); errors name what is wrong.
    pub fn new(deltas: &'a [Vec<u8>]) -> Result<Self, String> {
        let mut o = Overlay { page_size: 0, size: 0, base_cut: u64::MAX, pages: Default::default() };
        for delta in deltas {
            let (page_size, size, count) = parse_header(delta)?;
            if o.page_size != 0 && o.page_size != page_size {
                return Err(format!("page deltas of {} and {page_size} byte pages", o.page_size));
            }
            o.page_size = page_size;
            let ps = page_size as u64;
            // Pages (and base bytes) at or past the new end were cut off by this delta.
            let first_cut = size.div_ceil(ps);
            let cut: Vec<u64> = o.pages.range(first_cut..).map(|(n, _)| *n).collect();
            for n in cut {
                o.pages.remove(&n);
            }
            if let Some(&last) = o.pages.keys().next_back() {
                // A partial last page keeps only what lies below the new size.
                if (last + 1) * ps > size {
                    let keep = (size - last * ps) as usize;
                    if let Some(p) = o.pages.get_mut(&last) {
                        *p = &p[..keep.min(p.len())];
                    }
                }
            }
            o.base_cut = o.base_cut.min(size);
            for i in 0..count {
                let at = 24 + i * (4 + page_size);
                let n = u64::from(le32(&delta[at..at + 4]));
                if n * ps >= size {
                    return Err(format!("page {n} lies past the file's end ({size} bytes)"));
                }
                let len = ps.min(size - n * ps) as usize;
                o.pages.insert(n, &delta[at + 4..at + 4 + len]);
            }
            o.size = size;
        }
        if o.page_size == 0 {
            return Err("no page delta to lay over".into());
        }
        Ok(o)
    }

    /// The file's size once every delta is laid over.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Makes `chunk`, which holds the base's bytes from `offset` (zeros past the base's end),
    /// what the rebuilt file holds there.
    pub fn apply(&self, chunk: &mut [u8], offset: u64) {
        let end = offset + chunk.len() as u64;
        if end > self.base_cut {
            let from = self.base_cut.saturating_sub(offset) as usize;
            chunk[from..].fill(0);
        }
        let ps = self.page_size as u64;
        for (&n, page) in self.pages.range(offset / ps..end.div_ceil(ps)) {
            let start = n * ps;
            let (from, to) = (start.max(offset), (start + page.len() as u64).min(end));
            if from < to {
                let src = &page[(from - start) as usize..(to - start) as usize];
                chunk[(from - offset) as usize..(to - offset) as usize].copy_from_slice(src);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(lsn: u64, fill: u8) -> Vec<u8> {
        let mut p = vec![fill; 64];
        p[0..4].copy_from_slice(&((lsn >> 32) as u32).to_ne_bytes());
        p[4..8].copy_from_slice(&(lsn as u32).to_ne_bytes());
        p
    }

    #[test]
    fn relation_paths() {
        for yes in ["base/1/1259", "base/16384/16390.1", "global/1262"] {
            assert!(is_relation_main_fork(yes), "{yes}");
        }
        for no in [
            "base/1/1259_fsm",
            "base/1/1259_vm",
            "base/1/1259_init",
            "base/1/PG_VERSION",
            "pg_xact/0000",
            "global/pg_control",
            "base/x/1",
            "base/1/2/3",
            "base/1/12.",
        ] {
            assert!(!is_relation_main_fork(no), "{no}");
        }
    }

    #[test]
    fn deltas_rebuild_the_new_file() {
        let old: Vec<u8> = [page(100, 1), page(200, 2), page(300, 3)].concat();
        // page 1 changed after LSN 250, a page was added
        let new: Vec<u8> = [page(100, 1), page(260, 9), page(300, 3), page(270, 4)].concat();
        let changed = changed_pages(&new, 64, 3, 250);
        assert_eq!(changed, vec![1, 2, 3], "page 2 is stamped 300 >= 250, page 3 is new");
        let delta = encode(&new, 64, &changed);
        assert_eq!(apply(old.clone(), &delta).unwrap(), new);
        // the file shrank
        let shrunk = new[..64].to_vec();
        let delta = encode(&shrunk, 64, &changed_pages(&shrunk, 64, 3, 1000));
        assert_eq!(apply(old.clone(), &delta).unwrap(), shrunk);
        // damage is refused
        let mut bad = encode(&new, 64, &[1]);
        bad.pop();
        assert!(apply(old.clone(), &bad).is_err());
        assert!(apply(old.clone(), b"garbage").is_err());
        // the same on a file
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, &old).unwrap();
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let delta = encode(&new, 64, &changed_pages(&new, 64, 3, 250));
        assert_eq!(apply_to_file(&f, &delta).unwrap(), new.len() as u64);
        assert_eq!(std::fs::read(&path).unwrap(), new);
    }

    /// Streams `base` in odd-sized chunks through an overlay of `deltas`.
    fn merged(base: &[u8], deltas: &[Vec<u8>], chunk: usize) -> Vec<u8> {
        let o = Overlay::new(deltas).unwrap();
        let size = o.size() as usize;
        let mut out = Vec::new();
        let mut offset = 0;
        while offset < size {
            let n = chunk.min(size - offset);
            let mut c = vec![0u8; n];
            let have = base.len().saturating_sub(offset).min(n);
            if have > 0 {
                c[..have].copy_from_slice(&base[offset..offset + have]);
            }
            o.apply(&mut c, offset as u64);
            out.extend_from_slice(&c);
            offset += n;
        }
        out
    }

    #[test]
    fn an_overlay_rebuilds_what_applying_each_delta_does() {
        let v1: Vec<u8> = [page(100, 1), page(200, 2), page(300, 3), page(310, 5)].concat();
        // shrink to 2 pages (page 1 changed)
        let v2: Vec<u8> = [page(100, 1), page(400, 6)].concat();
        // grow to 5 pages and a half: page 0 changed, pages 2-4 new
        let mut v3: Vec<u8> = [page(500, 7), page(400, 6), page(510, 8), page(520, 9), page(530, 10)].concat();
        v3.extend_from_slice(&[11u8; 32]);
        let d2 = encode(&v2, 64, &changed_pages(&v2, 64, 4, 350));
        let d3 = encode(&v3, 64, &changed_pages(&v3, 64, 2, 450));
        let deltas = vec![d2, d3];
        let want = apply(apply(v1.clone(), &deltas[0]).unwrap(), &deltas[1]).unwrap();
        assert_eq!(want, v3);
        for chunk in [1, 7, 64, 100, 1000] {
            assert_eq!(merged(&v1, &deltas, chunk), want, "chunk {chunk}");
        }
        // The base's third page must not come back when a later delta grows the file again.
        let d_only_grow = encode(&v3, 64, &[0, 2, 3, 4, 5]);
        let deltas = vec![deltas[0].clone(), d_only_grow];
        let want = apply(apply(v1.clone(), &deltas[0]).unwrap(), &deltas[1]).unwrap();
        assert_eq!(merged(&v1, &deltas, 50), want);
        assert!(Overlay::new(&[]).is_err());
        assert!(Overlay::new(&[b"garbage".to_vec()]).is_err());
    }
}
