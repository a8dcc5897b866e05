//! The partial file and its resume state, beside the output.
//!
//! - `<output>.peer-partial` has the file's final length from the start; pieces are written at
//!   their offsets (positional writes) as they arrive, in any order.
//! - `<output>.peer-state` is a small JSON document: the URL, the length, the piece size, the
//!   validators the download is pinned to (ETag, Last-Modified) and a bitmap of completed pieces.
//!   It is replaced atomically (written under a temporary name and renamed) at each checkpoint.
//!
//! A piece enters the bitmap only after its bytes were written (and, with `storage.fsync`,
//! flushed), so after Ctrl-C, kill -9 or a power cut a rerun trusts every recorded piece and
//! fetches the others. The output appears under its final name by one rename, when the download
//! is complete and verified.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The format version of the state file; a different one is ignored (the download restarts).
pub const STATE_VERSION: u32 = 1;

/// The validators a download is pinned to, from the first response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Validator {
    /// The `ETag` header.
    pub etag: Option<String>,
    /// The `Last-Modified` header.
    pub last_modified: Option<String>,
}

impl Validator {
    /// The `If-Range` value that asks for the same version: the strong ETag, else the date.
    pub fn if_range(&self) -> Option<&str> {
        match &self.etag {
            Some(etag) if !etag.starts_with("W/") => Some(etag),
            _ => self.last_modified.as_deref(),
        }
    }

    /// Describes how `other` differs from `self`, or `None` when it is the same version. A
    /// validator missing on either side is not a difference (caches may drop headers).
    pub fn difference(&self, other: &Validator) -> Option<String> {
        if let (Some(mine), Some(theirs)) = (&self.etag, &other.etag) {
            if mine != theirs {
                return Some(format!("ETag {mine} became {theirs}"));
            }
        }
        if let (Some(mine), Some(theirs)) = (&self.last_modified, &other.last_modified) {
            if mine != theirs {
                return Some(format!("Last-Modified {mine} became {theirs}"));
            }
        }
        None
    }
}

/// The resume state document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeState {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// The URL downloaded.
    pub url: String,
    /// The length of the file.
    pub file_len: u64,
    /// The piece size the bitmap counts in.
    pub piece_len: u64,
    /// The validators of the version being downloaded.
    pub validator: Validator,
    /// Completed pieces, one bit per piece (piece 0 is the high bit of the first byte), in hex.
    pub done_pieces: String,
}

/// Packs a completion map into the state's hex bitmap.
pub fn encode_bitmap(done: &[bool]) -> String {
    let mut bytes = vec![0_u8; done.len().div_ceil(8)];
    for (index, _) in done.iter().enumerate().filter(|(_, is_done)| **is_done) {
        bytes[index / 8] |= 0x80 >> (index % 8);
    }
    hex::encode(bytes)
}

/// Unpacks a hex bitmap into `piece_count` flags; `None` when it does not fit.
pub fn decode_bitmap(text: &str, piece_count: usize) -> Option<Vec<bool>> {
    let bytes = hex::decode(text).ok()?;
    if bytes.len() != piece_count.div_ceil(8) {
        return None;
    }
    Some(
        (0..piece_count)
            .map(|index| bytes[index / 8] & (0x80 >> (index % 8)) != 0)
            .collect(),
    )
}

/// Where the partial file and the state of an output live.
#[derive(Debug, Clone)]
pub struct PartialPaths {
    /// The final name.
    pub output: PathBuf,
    /// `<output>.peer-partial`.
    pub partial: PathBuf,
    /// `<output>.peer-state`.
    pub state: PathBuf,
}

impl PartialPaths {
    /// The paths beside `output`.
    pub fn beside(output: &Path) -> PartialPaths {
        let with_suffix = |suffix: &str| {
            let mut name = output.as_os_str().to_owned();
            name.push(suffix);
            PathBuf::from(name)
        };
        PartialPaths {
            output: output.to_path_buf(),
            partial: with_suffix(".peer-partial"),
            state: with_suffix(".peer-state"),
        }
    }

    /// The saved state, when there is one that belongs to `url` and a partial file of its length.
    /// Anything else (no state, another URL, an old format, a truncated partial file) means
    /// starting over.
    pub fn load_resumable(&self, url: &str) -> Option<(ResumeState, Vec<bool>)> {
        let text = std::fs::read_to_string(&self.state).ok()?;
        let state: ResumeState = serde_json::from_str(&text).ok()?;
        if state.version != STATE_VERSION || state.url != url || state.piece_len == 0 {
            return None;
        }
        let partial_len = std::fs::metadata(&self.partial).ok()?.len();
        if partial_len != state.file_len {
            return None;
        }
        let piece_count = state.file_len.div_ceil(state.piece_len) as usize;
        let done = decode_bitmap(&state.done_pieces, piece_count)?;
        Some((state, done))
    }

    /// Writes the state atomically.
    pub fn save_state(&self, state: &ResumeState) -> std::io::Result<()> {
        let mut temporary = self.state.as_os_str().to_owned();
        temporary.push(".tmp");
        let temporary = PathBuf::from(temporary);
        std::fs::write(
            &temporary,
            serde_json::to_vec(state).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(&temporary, &self.state)
    }

    /// Removes the partial file and the state (starting over, or after success).
    pub fn remove_all(&self) {
        let _ = std::fs::remove_file(&self.partial);
        let _ = std::fs::remove_file(&self.state);
    }
}

/// The open partial file, shared by the tasks that write pieces into it.
#[derive(Debug, Clone)]
pub struct PartialFile {
    file: Arc<File>,
}

impl PartialFile {
    /// Opens the partial file for a resume, keeping its content.
    pub fn open_existing(path: &Path) -> std::io::Result<PartialFile> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        Ok(PartialFile {
            file: Arc::new(file),
        })
    }

    /// Creates (or truncates) the partial file with its final length.
    pub fn create(path: &Path, file_len: u64) -> std::io::Result<PartialFile> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len(file_len)?;
        Ok(PartialFile {
            file: Arc::new(file),
        })
    }

    /// Writes `data` at `offset`, on the blocking pool.
    pub async fn write_at(&self, offset: u64, data: Bytes) -> std::io::Result<()> {
        let file = Arc::clone(&self.file);
        tokio::task::spawn_blocking(move || file.write_all_at(&data, offset))
            .await
            .map_err(std::io::Error::other)?
    }

    /// Flushes the data to stable storage, on the blocking pool.
    pub async fn sync_data(&self) -> std::io::Result<()> {
        let file = Arc::clone(&self.file);
        tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .map_err(std::io::Error::other)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmaps_round_trip() {
        for count in [0, 1, 7, 8, 9, 1024, 1025] {
            let done: Vec<bool> = (0..count).map(|index| index % 3 == 0).collect();
            assert_eq!(decode_bitmap(&encode_bitmap(&done), count).unwrap(), done);
        }
        assert_eq!(encode_bitmap(&[true, false, true]), "a0");
        assert_eq!(decode_bitmap("a0", 20), None);
        assert_eq!(decode_bitmap("zz", 3), None);
    }

    #[test]
    fn if_range_prefers_a_strong_etag() {
        let strong = Validator {
            etag: Some("\"abc\"".into()),
            last_modified: Some("Mon, 01 Jan 2024 00:00:00 GMT".into()),
        };
        assert_eq!(strong.if_range(), Some("\"abc\""));
        let weak = Validator {
            etag: Some("W/\"abc\"".into()),
            ..strong.clone()
        };
        assert_eq!(weak.if_range(), Some("Mon, 01 Jan 2024 00:00:00 GMT"));
        assert_eq!(Validator::default().if_range(), None);
        assert!(strong.difference(&weak).is_some());
        assert!(strong.difference(&Validator::default()).is_none());
    }

    #[test]
    fn state_resumes_only_for_the_same_url_and_a_whole_partial_file() {
        let directory = tempfile::tempdir().unwrap();
        let paths = PartialPaths::beside(&directory.path().join("out.bin"));
        assert!(paths.partial.ends_with("out.bin.peer-partial"));
        let state = ResumeState {
            version: STATE_VERSION,
            url: "http://example.org/a".into(),
            file_len: 2500,
            piece_len: 1000,
            validator: Validator::default(),
            done_pieces: encode_bitmap(&[true, false, true]),
        };
        paths.save_state(&state).unwrap();
        assert!(
            paths.load_resumable("http://example.org/a").is_none(),
            "no partial file yet"
        );
        PartialFile::create(&paths.partial, 2500).unwrap();
        let (loaded, done) = paths.load_resumable("http://example.org/a").unwrap();
        assert_eq!(loaded, state);
        assert_eq!(done, [true, false, true]);
        assert!(paths.load_resumable("http://example.org/b").is_none());
        PartialFile::create(&paths.partial, 10).unwrap();
        assert!(paths.load_resumable("http://example.org/a").is_none());
        paths.remove_all();
        assert!(!paths.state.exists() && !paths.partial.exists());
    }
}
