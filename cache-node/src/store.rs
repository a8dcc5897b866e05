//! The on-disk layout of cached content, and the start-up scan that rebuilds the index from it.
//!
//! ```text
//! <drive>/objects/<id[0..2]>/<id>/<generation>/meta.json
//! <drive>/objects/<id[0..2]>/<id>/<generation>/<slice index>
//! <drive>/objects/<id[0..2]>/<id>/<generation>/pieces.sha256
//! ```
//!
//! `<drive>` is `storage.path` or one of `storage.extra_drives`: every object lives on exactly one
//! drive, picked by weighted rendezvous hashing of its key over the drives' paths, with each
//! drive's `max_size` as its weight ([`Layout::drive_of`]). Adding a drive moves only the objects
//! that now hash to it (they are dropped at start-up and fetched again); reordering the list
//! moves nothing. `<id>` is the SHA-256 of the cache key. `<generation>` is a random number picked each time the
//! node starts storing a version of the content; when the origin's version changes, a new
//! generation directory is started and the old one deleted, so slices of two versions can never
//! be read as one. Every file is written under a temporary name and renamed into place, so after a
//! crash a slice file is either absent or complete. Only this module knows these paths.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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

    /// True when `other` describes the same version: same length and same validators. The ETag
    /// decides when this version has one, else the Last-Modified. An answer without the
    /// validator this version has is another version: nothing vouches that it is this one.
    pub fn same_version(
        &self,
        length: u64,
        etag: Option<&str>,
        last_modified: Option<&str>,
    ) -> bool {
        let same_validator = match (&self.etag, &self.last_modified) {
            (Some(stored), _) => etag == Some(stored.as_str()),
            (None, Some(stored)) => last_modified == Some(stored.as_str()),
            (None, None) => true,
        };
        self.length == length && same_validator
    }
}

/// Seconds since the Unix epoch, for `stored_at_unix`.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

/// One cache drive as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveSpec {
    /// The directory on the drive (`storage.path`, or an extra drive's `path`).
    pub root: PathBuf,
    /// Its `max_size`, in bytes.
    pub max_bytes: u64,
}

/// Paths of the store, on one or more drives. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Layout {
    drives: Arc<[Drive]>,
}

#[derive(Debug)]
struct Drive {
    spec: DriveSpec,
    objects_root: PathBuf,
    /// Mixed into the drive's rendezvous hash: its path, so the choice does not depend on the
    /// order drives are listed in.
    hash_seed: Vec<u8>,
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
    /// A store on the one drive `root`, unbounded (for tools and tests).
    pub fn create(root: &Path) -> Result<Layout, DiskError> {
        Self::create_drives(&[DriveSpec {
            root: root.to_path_buf(),
            max_bytes: u64::MAX,
        }])
    }

    /// A store over `drives` (at least one), creating their directories if needed.
    pub fn create_drives(drives: &[DriveSpec]) -> Result<Layout, DiskError> {
        assert!(!drives.is_empty(), "a store needs a drive");
        let mut created = Vec::with_capacity(drives.len());
        for spec in drives {
            let objects_root = spec.root.join("objects");
            fs::create_dir_all(&objects_root)
                .map_err(|error| DiskError::io("mkdir", &objects_root, error))?;
            created.push(Drive {
                spec: spec.clone(),
                objects_root,
                hash_seed: spec.root.as_os_str().as_encoded_bytes().to_vec(),
            });
        }
        Ok(Layout {
            drives: created.into(),
        })
    }

    /// The drives, in configuration order.
    pub fn drives(&self) -> impl Iterator<Item = &DriveSpec> {
        self.drives.iter().map(|drive| &drive.spec)
    }

    /// How many drives the store spans.
    pub fn drive_count(&self) -> usize {
        self.drives.len()
    }

    /// The drive (its position in [`Layout::drives`]) that holds `key`: the highest
    /// `weight / -ln(u)` over the drives, `u` a hash of the key and the drive's path mapped into
    /// (0, 1). Each drive gets keys in proportion to its size, and a key only moves when its
    /// drive goes or a new drive outbids it.
    pub fn drive_of(&self, key: &CacheKey) -> usize {
        if self.drives.len() == 1 {
            return 0;
        }
        let mut best = (0, f64::NEG_INFINITY);
        for (index, drive) in self.drives.iter().enumerate() {
            let digest = Sha256::new()
                .chain_update(&drive.hash_seed)
                .chain_update([0])
                .chain_update(key.as_str().as_bytes())
                .finalize();
            let bits = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"));
            let unit = (bits as f64 + 0.5) / (u64::MAX as f64 + 1.0);
            let score = drive.spec.max_bytes as f64 / -unit.ln();
            if score > best.1 {
                best = (index, score);
            }
        }
        best.0
    }

    /// The directory of all generations of one key, on its drive.
    pub fn object_dir(&self, key: &CacheKey) -> PathBuf {
        let id = key.object_id();
        self.drives[self.drive_of(key)]
            .objects_root
            .join(&id[..2])
            .join(id)
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
    /// Objects found on a drive other than the one their key now maps to (the drive list
    /// changed) are deleted too.
    pub fn recover(&self) -> Result<Vec<RecoveredObject>, DiskError> {
        let mut recovered = Vec::new();
        for (drive_index, drive) in self.drives.iter().enumerate() {
            let mut moved = 0u64;
            for shard in read_dir_paths(&drive.objects_root)? {
                for object_dir in read_dir_paths(&shard)? {
                    if let Some(object) = recover_object(&object_dir)? {
                        let key = CacheKey::from_text(object.meta.key.clone());
                        if self.drive_of(&key) == drive_index {
                            recovered.push(object);
                        } else {
                            moved += 1;
                            remove_dir_quietly(&object_dir);
                        }
                    }
                    // Remove the key's directory if nothing in it survived.
                    let _ = fs::remove_dir(&object_dir);
                }
            }
            if moved > 0 {
                tracing::warn!(
                    drive = %drive.spec.root.display(),
                    objects = moved,
                    "dropped objects that now belong on another drive (the drive list changed)"
                );
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
        // Leaving out the validator this version has is a change, not a match.
        assert!(!object.same_version(10, None, None));
        assert!(!object.same_version(10, None, Some("x")));
        assert!(!dated.same_version(10, None, None));
        // A version stored without validators can only be compared by length.
        let mut bare = dated.clone();
        bare.last_modified = None;
        assert!(bare.same_version(10, None, None));
        assert!(!bare.same_version(11, None, None));
    }

    fn drives(dir: &Path, sizes: &[(&str, u64)]) -> Vec<DriveSpec> {
        sizes
            .iter()
            .map(|(name, max_bytes)| DriveSpec {
                root: dir.join(name),
                max_bytes: *max_bytes,
            })
            .collect()
    }

    fn keys(count: usize) -> Vec<CacheKey> {
        (0..count)
            .map(|index| CacheKey::new("h.example", &format!("/object-{index}")))
            .collect()
    }

    #[test]
    fn drives_get_keys_in_proportion_to_their_size() {
        let dir = tempfile::tempdir().unwrap();
        let layout =
            Layout::create_drives(&drives(dir.path(), &[("a", 100), ("b", 300), ("c", 600)]))
                .unwrap();
        let mut counts = [0usize; 3];
        for key in keys(10_000) {
            counts[layout.drive_of(&key)] += 1;
        }
        // Expected 1000 / 3000 / 6000; allow a few percent of sampling noise.
        for (count, expected) in counts.iter().zip([1000.0, 3000.0, 6000.0]) {
            let share = *count as f64 / expected;
            assert!((0.9..1.1).contains(&share), "{counts:?}");
        }
        assert!(layout.object_dir(&keys(1)[0]).starts_with(dir.path()));
    }

    #[test]
    fn reordering_drives_moves_nothing_and_adding_one_moves_only_keys_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let two = Layout::create_drives(&drives(dir.path(), &[("a", 500), ("b", 500)])).unwrap();
        let swapped =
            Layout::create_drives(&drives(dir.path(), &[("b", 500), ("a", 500)])).unwrap();
        let three =
            Layout::create_drives(&drives(dir.path(), &[("a", 500), ("b", 500), ("c", 500)]))
                .unwrap();
        let mut moved = 0;
        for key in keys(3000) {
            assert_eq!(two.object_dir(&key), swapped.object_dir(&key));
            if two.object_dir(&key) != three.object_dir(&key) {
                // Only to the new drive, never between the old ones.
                assert_eq!(three.drive_of(&key), 2);
                moved += 1;
            }
        }
        // About a third of the keys move to the new drive.
        assert!((800..1200).contains(&moved), "{moved}");
    }

    #[test]
    fn recovery_drops_objects_stored_on_a_drive_they_no_longer_map_to() {
        let dir = tempfile::tempdir().unwrap();
        let one = Layout::create_drives(&drives(dir.path(), &[("a", 500)])).unwrap();
        let all = keys(40);
        for (generation, key) in all.iter().enumerate() {
            let meta = meta(key, generation as u64 + 1, 4, 100);
            write_meta(&one, key, &meta);
            fs::write(one.slice_path(key, meta.generation, 0), b"abcd").unwrap();
        }
        let two = Layout::create_drives(&drives(dir.path(), &[("a", 500), ("b", 500)])).unwrap();
        let recovered = two.recover().unwrap();
        let staying = all.iter().filter(|key| two.drive_of(key) == 0).count();
        assert!(staying > 0 && staying < all.len(), "{staying}");
        assert_eq!(recovered.len(), staying);
        for key in &all {
            // Kept exactly where the new layout looks for it; the others are gone.
            assert_eq!(one.object_dir(key).exists(), two.drive_of(key) == 0);
        }
    }
}
