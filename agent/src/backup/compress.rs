//! Compression of archived objects. The algorithm is part of each object's name (its
//! extension), so a repository may hold objects written with different settings and every
//! reader knows how to open each one.

use std::io::{Read, Write};

/// How an object is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// zstd: the best ratio for its speed; the default.
    Zstd,
    /// lz4 (frame format): the fastest, for hosts short of CPU.
    Lz4,
    /// Stored as is.
    None,
}

impl Compression {
    /// The file extension that names this compression in the repository.
    pub fn extension(self) -> &'static str {
        match self {
            Compression::Zstd => "zst",
            Compression::Lz4 => "lz4",
            Compression::None => "raw",
        }
    }

    /// The name of this compression on the command line (`--compress`).
    pub fn cli_name(self) -> String {
        clap::ValueEnum::to_possible_value(&self).map(|v| v.get_name().to_string()).unwrap_or_default()
    }

    /// The compression an object name's extension stands for.
    pub fn from_extension(ext: &str) -> Option<Self> {
        match ext {
            "zst" => Some(Compression::Zstd),
            "lz4" => Some(Compression::Lz4),
            "raw" => Some(Compression::None),
            _ => None,
        }
    }

    /// Compresses `data`; `level` applies to zstd only (1 = fastest, 19 = smallest).
    pub fn compress(self, data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
        match self {
            Compression::Zstd => zstd::bulk::compress(data, level),
            Compression::Lz4 => {
                let mut enc = lz4_flex::frame::FrameEncoder::new(Vec::with_capacity(data.len() / 2));
                enc.write_all(data)?;
                enc.finish().map_err(std::io::Error::other)
            }
            Compression::None => Ok(data.to_vec()),
        }
    }

    /// Compresses everything `src` yields into `dst` (what [`Compression::compress`] makes, in
    /// bounded memory).
    pub fn compress_stream(self, src: &mut dyn Read, dst: &mut dyn Write, level: i32) -> std::io::Result<()> {
        match self {
            Compression::Zstd => {
                let mut enc = zstd::stream::write::Encoder::new(dst, level)?;
                std::io::copy(src, &mut enc)?;
                enc.finish()?;
            }
            Compression::Lz4 => {
                let mut enc = lz4_flex::frame::FrameEncoder::new(dst);
                std::io::copy(src, &mut enc)?;
                enc.finish().map_err(std::io::Error::other)?;
            }
            Compression::None => {
                std::io::copy(src, dst)?;
            }
        }
        Ok(())
    }

    /// A reader of the decompressed contents of `data`, for streaming large objects.
    pub fn reader<'a>(self, data: &'a [u8]) -> std::io::Result<Box<dyn Read + 'a>> {
        Ok(match self {
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(data)?),
            Compression::Lz4 => Box::new(lz4_flex::frame::FrameDecoder::new(data)),
            Compression::None => Box::new(data),
        })
    }

    /// Decompresses what [`Compression::compress`] made, refusing to grow past `limit` bytes
    /// (a corrupt or hostile object must not exhaust memory).
    pub fn decompress(self, data: &[u8], limit: usize) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let read = match self {
            Compression::Zstd => zstd::stream::read::Decoder::new(data)?.take(limit as u64 + 1).read_to_end(&mut out),
            Compression::Lz4 => lz4_flex::frame::FrameDecoder::new(data).take(limit as u64 + 1).read_to_end(&mut out),
            Compression::None => {
                out.extend_from_slice(data);
                Ok(data.len())
            }
        };
        read?;
        if out.len() > limit {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("decompresses to more than {limit} bytes"),
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_bounds() {
        let data: Vec<u8> = (0..200_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        for c in [Compression::Zstd, Compression::Lz4, Compression::None] {
            let packed = c.compress(&data, 1).unwrap();
            assert_eq!(Compression::from_extension(c.extension()), Some(c));
            assert_eq!(<Compression as clap::ValueEnum>::from_str(&c.cli_name(), false), Ok(c));
            assert_eq!(c.decompress(&packed, data.len()).unwrap(), data, "{c:?}");
            assert!(c.decompress(&packed, data.len() - 1).is_err(), "{c:?} ignored the limit");
        }
        let packed = Compression::Zstd.compress(&data, 1).unwrap();
        assert!(packed.len() < data.len() / 4);
        let mut broken = packed.clone();
        let mid = broken.len() / 2;
        broken[mid] ^= 0xFF;
        broken.truncate(mid + 8);
        assert!(Compression::Zstd.decompress(&broken, data.len()).is_err());
        assert!(Compression::Lz4.decompress(b"not lz4 at all", 100).is_err());
    }
}
