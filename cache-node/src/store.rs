//! The on-disk layout of cached content, and the start-up scan that rebuilds the index from it.
//!
//! ```text
//! <storage.path>/objects/<id[0..2]>/<id>/<generation>/meta.json
//! <storage.path>/objects/<id[0..2]>/<id>/<generation>/<slice index>
//! <storage.path>/objects/<id[0..2]>/<id>/<generation>/pieces.sha256
//! ```
//!
//! `<id>` is the SHA-256 of the cache key. `<generation>` is a random number picked each time the
//! node starts storing a version of the content; when the origin's version changes, a new
//! generation directory is started and the old one deleted, so slices of two versions can never
//! be read as one. Every file is written under a temporary name and renamed into place, so after a
//! crash a slice file is either absent or complete. Only this module knows these paths.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::disk::portable::TEMP_PREFIX;
use crate::error::DiskError;
use crate::key::CacheKey;

/// What the node knows about one version of one piece of content. Written once per generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectMeta {
    /// The cache key text (origin host, path and query).
    pub key: String,
    /// Random identifier of this version's directory.
    pub generation: u64,
    /// The complete length in bytes.
    pub length: u64,
    /// The slice length this object was stored with.
    pub slice_len: u64,
    /// The origin's `ETag`, if it sent one.
    pub etag: Option<String>,
    /// The origin's `Last-Modified`, if it sent one.
    pub last_modified: Option<String>,
    /// The origin's `Content-Type`, if it sent one.
    pub content_type: Option<String>,
    /// Other origin headers worth replaying to clients (`Cache-Control`, `Expires`,
    /// `Content-Disposition`...), as name/value pairs.
    pub extra_headers: Vec<(String, String)>,
    /// When the node started storing this version, in seconds since the Unix epoch.
    pub stored_at_unix: u64,
    /// How long the version is fresh after the origin confirms it, in seconds, from the origin's
    /// `Cache-Control` or `Expires`; absent when the origin said nothing, and
    /// `upstream.revalidate_after` applies (see [`crate::freshness`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fresh_for_secs: Option<u64>,
}

impl ObjectMeta {
    /// How many slices the object has.
    pub fn slice_count(&self) -> u64 {
        self.length.div_ceil(self.slice_len)
    }

    /// The byte length of slice `index` (the last one may be short).
    pub fn slice_length(&self, index: u64) -> u64 {
        let start = index * self.slice_len;
        self.slice_len.min(self.length.saturating_sub(start))
    }

    /// True when `other` describes the same version: same length and same validators.
    pub fn same_version(
        &self,
        length: u64,
        etag: Option<&str>,
        last_modified: Option<&str>,
    ) -> bool {
        self.length == length
            && (self.etag.is_none() || etag.is_none() || self.etag.as_deref() == etag)
            && (self.etag.is_some()
                || self.last_modified.is_none()
                || last_modified.is_none()
                || self.last_modified.as_deref() == last_modified)
    }
}

/// Seconds since the Unix epoch, for `stored_at_unix`.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

/// Paths of the store under `storage.path`.
#[derive(Debug, Clone)]
pub struct Layout {
    objects_root: PathBuf,
}

/// One object found on disk at start-up.
#[derive(Debug)]
pub struct RecoveredObject {
    /// Its metadata.
    pub meta: ObjectMeta,
    /// Indexes of the slices whose files are present with the right length.
    pub present_slices: Vec<u64>,
    /// The piece length of its `pieces.sha256`, when one is present with a plausible length
    /// (its content is checked when it is read).
    pub pieces_file: Option<u64>,
}

/// The name of the piece hash file in a generation directory (see [`crate::pieces`]).
const PIECES_FILE: &str = "pieces.sha256";

impl Layout {
    /// Creates the directories under `root` if needed.
    pub fn create(root: &Path) -> Result<Layout, DiskError> {
        let objects_root = root.join("objects");
        fs::create_dir_all(&objects_root)
            .map_err(|error| DiskError::io("mkdir", &objects_root, error))?;
        Ok(Layout { objects_root })
    }

    /// The directory of all generations of one key.
    pub fn object_dir(&self, key: &CacheKey) -> PathBuf {
        let id = key.object_id();
        self.objects_root.join(&id[..2]).join(id)
    }

    /// The directory of one generation.
    pub fn generation_dir(&self, key: &CacheKey, generation: u64) -> PathBuf {
        self.object_dir(key).join(format!("{generation:016x}"))
    }

    /// The metadata file of one generation.
    pub fn meta_path(&self, key: &CacheKey, generation: u64) -> PathBuf {
        self.generation_dir(key, generation).join("meta.json")
    }

    /// The piece hash file of one generation.
    pub fn pieces_path(&self, key: &CacheKey, generation: u64) -> PathBuf {
        self.generation_dir(key, generation).join(PIECES_FILE)
    }

    /// The file of one slice.
    pub fn slice_path(&self, key: &CacheKey, generation: u64, slice_index: u64) -> PathBuf {
        self.generation_dir(key, generation)
            .join(slice_index.to_string())
    }

    /// Walks the store, deleting leftovers (temporary files, generations without metadata,
    /// superseded generations, slices of the wrong length) and returning what can be served.
    /// This runs once before the node accepts connections, so it uses blocking calls.
    pub fn recover(&self) -> Result<Vec<RecoveredObject>, DiskError> {
        let mut recovered = Vec::new();
        for shard in read_dir_paths(&self.objects_root)? {
            for object_dir in read_dir_paths(&shard)? {
                if let Some(object) = recover_object(&object_dir)? {
                    recovered.push(object);
                }
                // Remove the key's directory if nothing in it survived.
                let _ = fs::remove_dir(&object_dir);
            }
        }
        Ok(recovered)
    }
}

fn read_dir_paths(directory: &Path) -> Result<Vec<PathBuf>, DiskError> {
    let entries = match fs::read_dir(directory) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(DiskError::io("list", directory, error)),
    };
    Ok(entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .collect())
}

/// Recovers the newest complete generation of one key, deleting every other generation.
fn recover_object(object_dir: &Path) -> Result<Option<RecoveredObject>, DiskError> {
    let mut best: Option<(ObjectMeta, PathBuf)> = None;
    for generation_dir in read_dir_paths(object_dir)? {
        let meta = fs::read(generation_dir.join("meta.json"))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<ObjectMeta>(&bytes).ok())
            .filter(|meta| {
                meta.slice_len > 0
                    && generation_dir
                        .file_name()
                        .map(|name| name.to_string_lossy().into_owned())
                        == Some(format!("{:016x}", meta.generation))
            });
        let Some(meta) = meta else {
            remove_dir_quietly(&generation_dir);
            continue;
        };
        match &best {
            Some((kept, _)) if kept.stored_at_unix >= meta.stored_at_unix => {
                remove_dir_quietly(&generation_dir);
            }
            _ => {
                if let Some((_, superseded)) = best.replace((meta, generation_dir)) {
                    remove_dir_quietly(&superseded);
                }
            }
        }
    }
    let Some((meta, generation_dir)) = best else {
        return Ok(None);
    };
    let mut present_slices = Vec::new();
    let mut pieces_file = None;
    for path in read_dir_paths(&generation_dir)? {
        let name = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name == "meta.json" {
            continue;
        }
        if name == PIECES_FILE {
            pieces_file = read_pieces_header(&path, &meta);
            if pieces_file.is_none() {
                let _ = fs::remove_file(&path);
            }
            continue;
        }
        let index = name
            .parse::<u64>()
            .ok()
            .filter(|index| *index < meta.slice_count());
        let length_ok = |index: u64| {
            fs::metadata(&path)
                .map(|file| file.len() == meta.slice_length(index))
                .unwrap_or(false)
        };
        match index {
            Some(index) if !name.starts_with(TEMP_PREFIX) && length_ok(index) => {
                present_slices.push(index)
            }
            _ => {
                let _ = fs::remove_file(&path);
            }
        }
    }
    present_slices.sort_unstable();
    Ok(Some(RecoveredObject {
        meta,
        present_slices,
        pieces_file,
    }))
}

/// The piece length a `pieces.sha256` file declares, if its length fits the object.
fn read_pieces_header(path: &Path, meta: &ObjectMeta) -> Option<u64> {
    use std::io::Read;
    let mut header = [0u8; 8];
    let mut file = fs::File::open(path).ok()?;
    file.read_exact(&mut header).ok()?;
    let piece_len = u64::from_le_bytes(header);
    let plausible = piece_len.is_power_of_two()
        && meta.slice_len % piece_len == 0
        && file.metadata().ok()?.len() == crate::pieces::file_len(meta.length, piece_len) as u64;
    plausible.then_some(piece_len)
}

fn remove_dir_quietly(path: &Path) {
    if let Err(error) = fs::remove_dir_all(path) {
        tracing::warn!(path = %path.display(), %error, "could not remove stale cache directory");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(key: &CacheKey, generation: u64, length: u64, stored_at_unix: u64) -> ObjectMeta {
        ObjectMeta {
            key: key.as_str().to_owned(),
            generation,
            length,
            slice_len: 4,
            etag: Some("\"a\"".into()),
            last_modified: None,
            content_type: None,
            extra_headers: vec![],
            stored_at_unix,
            fresh_for_secs: None,
        }
    }

    fn write_meta(layout: &Layout, key: &CacheKey, meta: &ObjectMeta) {
        let path = layout.meta_path(key, meta.generation);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, serde_json::to_vec(meta).unwrap()).unwrap();
    }

    #[test]
    fn recovery_keeps_complete_slices_of_the_newest_generation_only() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::create(dir.path()).unwrap();
        let key = CacheKey::new("h.example", "/f");
        let old = meta(&key, 1, 10, 100);
        let new = meta(&key, 2, 10, 200);
        write_meta(&layout, &key, &old);
        write_meta(&layout, &key, &new);
        fs::write(layout.slice_path(&key, 1, 0), b"oldd").unwrap();
        fs::write(layout.slice_path(&key, 2, 0), b"abcd").unwrap();
        fs::write(layout.slice_path(&key, 2, 1), b"ef").unwrap(); // short: dropped
        fs::write(layout.slice_path(&key, 2, 2), b"ij").unwrap(); // last slice, right length
        fs::write(layout.slice_path(&key, 2, 7), b"zzzz").unwrap(); // out of range
        fs::write(layout.generation_dir(&key, 2).join(".tmp-1-00ff"), b"ef").unwrap();
        let hashes = crate::pieces::encode_file(4, &[[7; 32]; 3]);
        fs::write(layout.pieces_path(&key, 2), hashes).unwrap();
        // A piece file whose length does not fit its object is deleted.
        fs::write(layout.pieces_path(&key, 1), [0u8; 9]).unwrap();
        // A generation directory with no metadata (a crash before meta.json landed).
        let orphan = layout.generation_dir(&key, 3);
        fs::create_dir_all(&orphan).unwrap();
        fs::write(orphan.join("0"), b"abcd").unwrap();

        let recovered = layout.recover().unwrap();
        assert_eq!(recovered.len(), 1);
        assert_eq!(recovered[0].meta, new);
        assert_eq!(recovered[0].present_slices, vec![0, 2]);
        assert_eq!(recovered[0].pieces_file, Some(4));
        assert!(!layout.generation_dir(&key, 1).exists());
        assert!(!orphan.exists());
        let mut left: Vec<String> = fs::read_dir(layout.generation_dir(&key, 2))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec!["0", "2", "meta.json", "pieces.sha256"]);
    }

    #[test]
    fn slice_arithmetic_handles_short_last_slices_and_empty_objects() {
        let key = CacheKey::new("h", "/");
        let object = meta(&key, 1, 10, 0);
        assert_eq!(object.slice_count(), 3);
        assert_eq!(object.slice_length(0), 4);
        assert_eq!(object.slice_length(2), 2);
        assert_eq!(meta(&key, 1, 0, 0).slice_count(), 0);
        assert_eq!(meta(&key, 1, 8, 0).slice_count(), 2);
    }

    #[test]
    fn version_comparison_uses_the_strongest_validator_available() {
        let key = CacheKey::new("h", "/");
        let object = meta(&key, 1, 10, 0);
        assert!(object.same_version(10, Some("\"a\""), None));
        assert!(!object.same_version(10, Some("\"b\""), None));
        assert!(!object.same_version(11, Some("\"a\""), None));
        let mut dated = object.clone();
        dated.etag = None;
        dated.last_modified = Some("x".into());
        assert!(dated.same_version(10, None, Some("x")));
        assert!(!dated.same_version(10, None, Some("y")));
    }
}
