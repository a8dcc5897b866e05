//! The on-disk layout of cached content, and the start-up scan that rebuilds the index from it.
//!
//! ```text
//! <drive>/format
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
//!
//! `format` holds the store format ([`STORE_FORMAT`]), which every `meta.json` repeats: recovery
//! upgrades metadata of an older format in place (or deletes that version, counted and logged,
//! when it cannot), and a drive or object of a newer format stops the node before anything is
//! deleted.
//!
//! Recovery trusts nothing it reads: a `meta.json` that does not parse, names a key that does not
//! hash to the directory it sits in, declares a length above `storage.max_object_size` or a slice
//! length that is not a sane power of two is logged and its directory deleted before anything is
//! sized from it. Objects stored with another `storage.slice_size` cannot be read with the
//! current one, so they are deleted too (they would otherwise hold disk space that `max_size`
//! does not count).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cache::header_section::{self, StoredField, StoredValue};
use crate::cache::key::CacheKey;
use crate::cache::piece_file;
use crate::disk::portable::TEMP_PREFIX;
use crate::error::DiskError;

/// The store format this node writes: the number in each drive's `format` file and in every
/// `meta.json`. Format 1 (no `format` anywhere) kept only a few origin headers in
/// `extra_headers`; format 2 keeps the whole stored header section (`headers`,
/// `content_encoding`). Recovery upgrades format-1 metadata in place; a drive or object of a
/// higher format stops the node at start-up, with nothing deleted.
pub const STORE_FORMAT: u32 = 2;

/// The name of the format file at each drive's root.
const FORMAT_FILE: &str = "format";

/// What the node knows about one version of one piece of content. Written once per generation,
/// and again when a revalidation refreshes its headers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectMeta {
    /// The store format this metadata is written in ([`STORE_FORMAT`]).
    pub format: u32,
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
    /// The origin's `Content-Encoding`, if it sent one: the stored bytes are in that coding, and
    /// an answer in another coding is another version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_encoding: Option<String>,
    /// Every other stored field of the origin's header section, in its order (see
    /// [`crate::cache::header_section`]). In memory, the index entry holds them as a parsed
    /// map instead, and this list is empty.
    #[serde(default)]
    pub headers: Vec<StoredField>,
    /// When the node started storing this version, in seconds since the Unix epoch.
    pub stored_at_unix: u64,
    /// When the origin last confirmed this version, when that was after it was stored (a
    /// revalidation that refreshed the stored fields); a restarted node counts the version's
    /// age from here, else from `stored_at_unix`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed_at_unix: Option<u64>,
    /// How long the version is fresh after the origin confirms it, in seconds, from the origin's
    /// `Cache-Control` or `Expires`; absent when the origin said nothing, and
    /// `upstream.revalidate_after` applies (see `crate::cache::freshness`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fresh_for_secs: Option<u64>,
    /// The heuristic lifetime (RFC 9111 §4.2.2) in seconds, when the origin gave only
    /// `Last-Modified`; capped by `upstream.revalidate_after` when used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heuristic_fresh_for_secs: Option<u64>,
    /// The origin's `stale-while-revalidate` window in seconds (RFC 5861).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_while_revalidate_secs: Option<u64>,
    /// The origin's `stale-if-error` window in seconds (RFC 5861).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_if_error_secs: Option<u64>,
    /// The origin sent `must-revalidate` or `proxy-revalidate`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub must_revalidate: bool,
    /// The request fields the origin's `Vary` named, lower-case and sorted: this version is one
    /// variant, and its key says which (see the `vary` module). Empty when it does not
    /// vary.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vary: Vec<String>,
}

/// A `meta.json` of store format 1, exactly as nodes before [`STORE_FORMAT`] 2 wrote it; read
/// only to upgrade it.
#[derive(Debug, Deserialize)]
struct MetaFormat1 {
    key: String,
    generation: u64,
    length: u64,
    slice_len: u64,
    etag: Option<String>,
    last_modified: Option<String>,
    content_type: Option<String>,
    /// The few headers format 1 replayed (`Cache-Control`, `Expires`, `Content-Disposition`,
    /// `Content-Language`).
    extra_headers: Vec<(String, String)>,
    stored_at_unix: u64,
    #[serde(default)]
    fresh_for_secs: Option<u64>,
}

impl MetaFormat1 {
    /// The same version in the current format. Format 1 stored no encoded content, so there is
    /// no `Content-Encoding` to carry over.
    fn upgrade(self) -> ObjectMeta {
        ObjectMeta {
            format: STORE_FORMAT,
            key: self.key,
            generation: self.generation,
            length: self.length,
            slice_len: self.slice_len,
            etag: self.etag,
            last_modified: self.last_modified,
            content_type: self.content_type,
            content_encoding: None,
            headers: self
                .extra_headers
                .into_iter()
                .map(|(name, value)| (name, StoredValue::Text(value)))
                .collect(),
            stored_at_unix: self.stored_at_unix,
            confirmed_at_unix: None,
            fresh_for_secs: self.fresh_for_secs,
            // Format 1 kept no directives beyond the lifetime.
            heuristic_fresh_for_secs: None,
            stale_while_revalidate_secs: None,
            stale_if_error_secs: None,
            must_revalidate: false,
            vary: Vec::new(),
        }
    }
}

/// The `format` of a `meta.json`, read before the rest; absent in format 1.
#[derive(Debug, Deserialize)]
struct FormatProbe {
    #[serde(default)]
    format: Option<u32>,
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

    /// The typed fields replayed from the index entry's header map (`Content-Type` is set per
    /// answer).
    pub fn typed_fields(&self) -> [(http::HeaderName, Option<&str>); 3] {
        [
            (http::header::ETAG, self.etag.as_deref()),
            (http::header::LAST_MODIFIED, self.last_modified.as_deref()),
            (
                http::header::CONTENT_ENCODING,
                self.content_encoding.as_deref(),
            ),
        ]
    }
}

/// Parses a slice or piece size: a power of two between 64 KiB and 64 MiB. The error is a
/// message for the config key that held `text`.
pub fn parse_block_size(text: &str) -> Result<u64, String> {
    let bytes = outpost_shared::units::parse_size(text)?;
    if !bytes.is_power_of_two() || !(64 << 10..=64 << 20).contains(&bytes) {
        return Err(format!(
            "\"{text}\" must be a power of two between 64KiB and 64MiB, e.g. \"1MiB\""
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
impl ObjectMeta {
    /// Generation 1 of `key`, `length` bytes in slices of `slice_len`, without validators.
    pub(crate) fn for_tests(key: &str, length: u64, slice_len: u64) -> ObjectMeta {
        ObjectMeta {
            format: STORE_FORMAT,
            key: key.to_owned(),
            generation: 1,
            length,
            slice_len,
            etag: None,
            last_modified: None,
            content_type: None,
            content_encoding: None,
            headers: vec![],
            stored_at_unix: 0,
            confirmed_at_unix: None,
            fresh_for_secs: None,
            heuristic_fresh_for_secs: None,
            stale_while_revalidate_secs: None,
            stale_if_error_secs: None,
            must_revalidate: false,
            vary: Vec::new(),
        }
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

/// The name of the piece hash file in a generation directory (see [`crate::cache::piece_file`]).
const PIECES_FILE: &str = "pieces.sha256";

/// The largest `meta.json` recovery reads; the node writes a few hundred bytes, plus the stored
/// header section, itself at most [`header_section::MAX_STORED_HEADER_BYTES`] (which JSON
/// escaping or a non-UTF-8 value written as numbers can grow at most fourfold).
const MAX_META_FILE_BYTES: u64 = 1 << 20;

/// The slice lengths any configuration allows (`storage.slice_size`).
const SLICE_LEN_RANGE: std::ops::RangeInclusive<u64> = 64 << 10..=64 << 20;

/// What recovery accepts: the current configuration's slice length and largest object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecoveryLimits {
    /// `storage.slice_size`: objects stored with another slice length are deleted.
    pub slice_len: u64,
    /// `storage.max_object_size`: objects declaring more are deleted.
    pub max_object_size: u64,
}

impl RecoveryLimits {
    /// Limits that accept any sane object stored with `slice_len` (for tools and tests).
    pub fn any_size(slice_len: u64) -> RecoveryLimits {
        RecoveryLimits {
            slice_len,
            max_object_size: u64::MAX,
        }
    }
}

/// Why recovery deleted a generation directory instead of serving it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Rejected {
    /// `meta.json` is missing, unreadable, too large, not valid JSON, or describes something
    /// impossible (a slice length that no configuration allows, a generation that is not the
    /// directory's name).
    CorruptMeta(String),
    /// `meta.json` names a key whose object id is not the directory it sits in.
    KeyMismatch(String),
    /// The declared length is above `storage.max_object_size`.
    TooLarge(u64),
    /// Stored with another `storage.slice_size`.
    OtherSliceSize(u64),
    /// An older version of the same key (or an equally old one with a lower generation).
    Superseded,
    /// Written in an older store format and could not be rewritten in the current one.
    NotUpgraded(String),
    /// Written in a newer store format than this node knows: never deleted, the node refuses
    /// to start instead.
    NewerFormat(u32),
}

/// Counts of what recovery deleted on one drive, for its log lines.
#[derive(Debug, Default)]
struct RecoveryTally {
    moved: u64,
    corrupt: u64,
    other_slice_size: u64,
    /// Versions whose metadata was upgraded from an older store format.
    upgraded: u64,
    /// Versions of an older store format that could not be upgraded.
    not_upgraded: u64,
}

impl RecoveryTally {
    /// One warning per kind of deletion that happened on the drive at `root`.
    fn log(&self, root: &Path) {
        for (count, what) in [
            (
                self.moved,
                "objects dropped: they now belong on another drive (the drive list changed)",
            ),
            (
                self.other_slice_size,
                "stored versions deleted: stored with another storage.slice_size, which this one cannot read",
            ),
            (
                self.corrupt,
                "stored versions deleted: their metadata could not be trusted (see the lines above)",
            ),
            (
                self.not_upgraded,
                "stored versions deleted: written in an older store format and could not be upgraded (see the lines above)",
            ),
        ] {
            if count > 0 {
                tracing::warn!(drive = %root.display(), count, "{what}");
            }
        }
        if self.upgraded > 0 {
            tracing::info!(
                drive = %root.display(),
                count = self.upgraded,
                format = STORE_FORMAT,
                "stored versions upgraded from an older store format"
            );
        }
    }
}

impl Layout {
    /// A store on the one drive `root`, unbounded (for tools and tests).
    pub fn create(root: &Path) -> Result<Layout, DiskError> {
        Self::create_drives(&[DriveSpec {
            root: root.to_path_buf(),
            max_bytes: u64::MAX,
        }])
    }

    /// A store over `drives` (at least one), creating their directories if needed. A drive
    /// whose `format` file names a newer store format than [`STORE_FORMAT`] (or cannot be read)
    /// is an error, found before anything on any drive is touched; the others get the current
    /// format written (objects of an older one are upgraded one by one by
    /// [`Layout::recover`], which their own `meta.json` tells apart).
    pub fn create_drives(drives: &[DriveSpec]) -> Result<Layout, DiskError> {
        assert!(!drives.is_empty(), "a store needs a drive");
        for spec in drives {
            check_format_file(&spec.root)?;
        }
        let mut created = Vec::with_capacity(drives.len());
        for spec in drives {
            let format_path = spec.root.join(FORMAT_FILE);
            fs::create_dir_all(&spec.root)
                .and_then(|()| fs::write(&format_path, format!("{STORE_FORMAT}\n")))
                .map_err(|error| DiskError::io("write", &format_path, error))?;
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

    /// The drive (its position in [`Layout::drives`]) whose directory holds `path`, if any: the
    /// longest drive root `path` starts with.
    pub fn drive_of_path(&self, path: &Path) -> Option<usize> {
        self.drives
            .iter()
            .enumerate()
            .filter(|(_, drive)| path.starts_with(&drive.spec.root))
            .max_by_key(|(_, drive)| drive.spec.root.as_os_str().len())
            .map(|(position, _)| position)
    }

    /// Walks the store, deleting leftovers (temporary files, generations without metadata,
    /// superseded generations, slices of the wrong length) and returning what can be served.
    /// This runs once before the node accepts connections, so it uses blocking calls.
    /// Objects found on a drive other than the one their key now maps to (the drive list
    /// changed), objects of another slice length, and objects whose metadata is corrupt, names a
    /// key that does not hash to its directory or declares more than `limits` allow are deleted
    /// too (see the module documentation).
    pub fn recover(&self, limits: RecoveryLimits) -> Result<Vec<RecoveredObject>, DiskError> {
        let mut recovered = Vec::new();
        for (drive_index, drive) in self.drives.iter().enumerate() {
            let mut tally = RecoveryTally::default();
            for shard in read_dir_paths(&drive.objects_root)? {
                if !shard.is_dir() {
                    let _ = fs::remove_file(&shard);
                    continue;
                }
                for object_dir in read_dir_paths(&shard)? {
                    if !object_dir.is_dir() {
                        let _ = fs::remove_file(&object_dir);
                        continue;
                    }
                    if let Some(object) = recover_object(&object_dir, limits, &mut tally)? {
                        let key = CacheKey::from_text(object.meta.key.clone());
                        if self.drive_of(&key) == drive_index {
                            recovered.push(object);
                        } else {
                            tally.moved += 1;
                            remove_dir_quietly(&object_dir);
                        }
                    }
                    // Remove the key's directory if nothing in it survived.
                    let _ = fs::remove_dir(&object_dir);
                }
                let _ = fs::remove_dir(&shard);
            }
            tally.log(&drive.spec.root);
        }
        Ok(recovered)
    }
}

/// Refuses a drive whose `format` file names a store format newer than this node knows, or
/// that is not a number. A missing file is a new drive or a format-1 store.
fn check_format_file(root: &Path) -> Result<(), DiskError> {
    let path = root.join(FORMAT_FILE);
    let text = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(DiskError::io("read", &path, error)),
    };
    let found = std::str::from_utf8(&text)
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok())
        .ok_or_else(|| DiskError::UnreadableFormat { path: path.clone() })?;
    if found > STORE_FORMAT {
        return Err(DiskError::NewerFormat {
            path,
            found,
            known: STORE_FORMAT,
        });
    }
    Ok(())
}

/// Reads and checks the metadata of one generation directory of `object_dir`.
fn read_trusted_meta(
    object_dir: &Path,
    generation_dir: &Path,
    limits: RecoveryLimits,
) -> Result<TrustedMeta, Rejected> {
    use std::io::Read;
    let path = generation_dir.join("meta.json");
    let mut bytes = Vec::new();
    fs::File::open(&path)
        .and_then(|file| file.take(MAX_META_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|error| Rejected::CorruptMeta(format!("unreadable: {error}")))?;
    if bytes.len() as u64 > MAX_META_FILE_BYTES {
        return Err(Rejected::CorruptMeta(format!(
            "longer than {MAX_META_FILE_BYTES} bytes"
        )));
    }
    let corrupt =
        |error: serde_json::Error| Rejected::CorruptMeta(format!("not valid metadata: {error}"));
    let probe: FormatProbe = serde_json::from_slice(&bytes).map_err(corrupt)?;
    let (meta, upgraded) = match probe.format {
        None => (
            serde_json::from_slice::<MetaFormat1>(&bytes)
                .map_err(corrupt)?
                .upgrade(),
            true,
        ),
        Some(STORE_FORMAT) => (
            serde_json::from_slice::<ObjectMeta>(&bytes).map_err(corrupt)?,
            false,
        ),
        Some(format) if format > STORE_FORMAT => return Err(Rejected::NewerFormat(format)),
        Some(format) => {
            return Err(Rejected::CorruptMeta(format!(
                "store format {format} does not exist"
            )))
        }
    };
    header_section::replay_map(&meta.typed_fields(), &meta.headers)
        .map_err(Rejected::CorruptMeta)?;
    let directory_name = |path: &Path| {
        path.file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    if directory_name(generation_dir) != format!("{:016x}", meta.generation) {
        return Err(Rejected::CorruptMeta(format!(
            "generation {:016x} is not its directory's name",
            meta.generation
        )));
    }
    let object_id = CacheKey::from_text(meta.key.clone()).object_id();
    let shard_name = object_dir.parent().map(directory_name).unwrap_or_default();
    if directory_name(object_dir) != object_id || shard_name != object_id[..2] {
        return Err(Rejected::KeyMismatch(meta.key));
    }
    if !meta.slice_len.is_power_of_two() || !SLICE_LEN_RANGE.contains(&meta.slice_len) {
        return Err(Rejected::CorruptMeta(format!(
            "slice length {} is not a power of two between 64KiB and 64MiB",
            meta.slice_len
        )));
    }
    if meta.length > limits.max_object_size {
        return Err(Rejected::TooLarge(meta.length));
    }
    if meta.slice_len != limits.slice_len {
        return Err(Rejected::OtherSliceSize(meta.slice_len));
    }
    if upgraded {
        if let Err(error) = write_meta_file(generation_dir, &meta) {
            return Err(Rejected::NotUpgraded(error.to_string()));
        }
    }
    Ok(TrustedMeta { meta, upgraded })
}

/// Metadata recovery trusts, and whether it was just upgraded from an older store format.
struct TrustedMeta {
    meta: ObjectMeta,
    upgraded: bool,
}

/// Writes `meta` as the `meta.json` of `generation_dir`, under a temporary name renamed into
/// place (recovery's upgrade; the running node writes through its storage backend).
fn write_meta_file(generation_dir: &Path, meta: &ObjectMeta) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(meta).expect("metadata serialises");
    let temporary = generation_dir.join(format!("{TEMP_PREFIX}meta.json"));
    fs::write(&temporary, json)?;
    fs::File::open(&temporary)?.sync_all()?;
    fs::rename(&temporary, generation_dir.join("meta.json"))
}

/// Deletes a generation directory recovery will not serve, with a log line saying why.
fn reject_generation(generation_dir: &Path, reason: &Rejected, tally: &mut RecoveryTally) {
    let path = generation_dir.display();
    match reason {
        Rejected::CorruptMeta(problem) => {
            tally.corrupt += 1;
            tracing::warn!(%path, problem, "corrupt meta.json; stored version deleted");
        }
        Rejected::KeyMismatch(key) => {
            tally.corrupt += 1;
            tracing::warn!(
                %path,
                key,
                "meta.json names a key that does not hash to its directory; stored version deleted"
            );
        }
        Rejected::TooLarge(length) => {
            tally.corrupt += 1;
            tracing::warn!(
                %path,
                length,
                "stored version declares more than storage.max_object_size; deleted"
            );
        }
        Rejected::OtherSliceSize(_) => tally.other_slice_size += 1,
        Rejected::NotUpgraded(error) => {
            tally.not_upgraded += 1;
            tracing::warn!(%path, error, "could not upgrade meta.json to the current store format; stored version deleted");
        }
        Rejected::Superseded => {}
        Rejected::NewerFormat(_) => unreachable!("a newer format stops recovery before deleting"),
    }
    remove_dir_quietly(generation_dir);
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

/// Recovers the newest trusted generation of one key, deleting every other generation. Of two
/// versions stored in the same second, the one with the higher generation number is kept, so the
/// choice does not depend on the order the directory lists them in.
fn recover_object(
    object_dir: &Path,
    limits: RecoveryLimits,
    tally: &mut RecoveryTally,
) -> Result<Option<RecoveredObject>, DiskError> {
    let mut best: Option<(ObjectMeta, PathBuf)> = None;
    for generation_dir in read_dir_paths(object_dir)? {
        if !generation_dir.is_dir() {
            let _ = fs::remove_file(&generation_dir);
            continue;
        }
        let meta = match read_trusted_meta(object_dir, &generation_dir, limits) {
            Ok(TrustedMeta { meta, upgraded }) => {
                tally.upgraded += u64::from(upgraded);
                meta
            }
            Err(Rejected::NewerFormat(found)) => {
                return Err(DiskError::NewerFormat {
                    path: generation_dir.join("meta.json"),
                    found,
                    known: STORE_FORMAT,
                })
            }
            // A crash between creating the directory and writing meta.json leaves a generation
            // without metadata: an ordinary leftover, deleted without a warning.
            Err(Rejected::CorruptMeta(_)) if !generation_dir.join("meta.json").exists() => {
                remove_dir_quietly(&generation_dir);
                continue;
            }
            Err(reason) => {
                reject_generation(&generation_dir, &reason, tally);
                continue;
            }
        };
        let newer = |kept: &ObjectMeta| {
            (meta.stored_at_unix, meta.generation) > (kept.stored_at_unix, kept.generation)
        };
        match &best {
            Some((kept, _)) if !newer(kept) => {
                reject_generation(&generation_dir, &Rejected::Superseded, tally);
            }
            _ => {
                if let Some((_, superseded)) = best.replace((meta, generation_dir)) {
                    reject_generation(&superseded, &Rejected::Superseded, tally);
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
    let mut header = [0u8; piece_file::FILE_HEADER_LEN];
    let mut file = fs::File::open(path).ok()?;
    file.read_exact(&mut header).ok()?;
    let file_length = file.metadata().ok()?.len();
    piece_file::plausible_header(header, file_length, meta.length, meta.slice_len)
}

fn remove_dir_quietly(path: &Path) {
    if let Err(error) = fs::remove_dir_all(path) {
        tracing::warn!(path = %path.display(), %error, "could not remove stale cache directory");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The smallest slice length a configuration allows.
    const SLICE: u64 = 64 << 10;

    fn limits() -> RecoveryLimits {
        RecoveryLimits {
            slice_len: SLICE,
            max_object_size: 1 << 40,
        }
    }

    fn meta(key: &CacheKey, generation: u64, length: u64, stored_at_unix: u64) -> ObjectMeta {
        ObjectMeta {
            generation,
            etag: Some("\"a\"".into()),
            stored_at_unix,
            confirmed_at_unix: None,
            ..ObjectMeta::for_tests(key.as_str(), length, SLICE)
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
        // Two and a half slices.
        let length = 2 * SLICE + SLICE / 2;
        let whole = vec![b'a'; SLICE as usize];
        let last = vec![b'c'; (SLICE / 2) as usize];
        let old = meta(&key, 1, length, 100);
        let new = meta(&key, 2, length, 200);
        write_meta(&layout, &key, &old);
        write_meta(&layout, &key, &new);
        fs::write(layout.slice_path(&key, 1, 0), &whole).unwrap();
        fs::write(layout.slice_path(&key, 2, 0), &whole).unwrap();
        fs::write(layout.slice_path(&key, 2, 1), b"ef").unwrap(); // short: dropped
        fs::write(layout.slice_path(&key, 2, 2), &last).unwrap(); // last slice, right length
        fs::write(layout.slice_path(&key, 2, 7), &whole).unwrap(); // out of range
        fs::write(layout.generation_dir(&key, 2).join(".tmp-1-00ff"), b"ef").unwrap();
        let hashes = crate::cache::piece_file::encode_file(SLICE, &[[7; 32]; 3]);
        fs::write(layout.pieces_path(&key, 2), hashes).unwrap();
        // A piece file whose length does not fit its object is deleted.
        fs::write(layout.pieces_path(&key, 1), [0u8; 9]).unwrap();
        // A generation directory with no metadata (a crash before meta.json landed).
        let orphan = layout.generation_dir(&key, 3);
        fs::create_dir_all(&orphan).unwrap();
        fs::write(orphan.join("0"), &whole).unwrap();

        let recovered = layout.recover(limits()).unwrap();
        assert_eq!(recovered.len(), 1);
        assert_eq!(recovered[0].meta, new);
        assert_eq!(recovered[0].present_slices, vec![0, 2]);
        assert_eq!(recovered[0].pieces_file, Some(SLICE));
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
        let mut object = meta(&key, 1, 10, 0);
        object.slice_len = 4;
        assert_eq!(object.slice_count(), 3);
        assert_eq!(object.slice_length(0), 4);
        assert_eq!(object.slice_length(2), 2);
        object.length = 0;
        assert_eq!(object.slice_count(), 0);
        object.length = 8;
        assert_eq!(object.slice_count(), 2);
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
        let recovered = two.recover(limits()).unwrap();
        let staying = all.iter().filter(|key| two.drive_of(key) == 0).count();
        assert!(staying > 0 && staying < all.len(), "{staying}");
        assert_eq!(recovered.len(), staying);
        for key in &all {
            // Kept exactly where the new layout looks for it; the others are gone.
            assert_eq!(one.object_dir(key).exists(), two.drive_of(key) == 0);
        }
    }

    /// Writes one generation of `key` with one stored slice; returns its directory.
    fn stored_version(layout: &Layout, key: &CacheKey, meta: &ObjectMeta) -> PathBuf {
        write_meta(layout, key, meta);
        fs::write(
            layout.slice_path(key, meta.generation, 0),
            vec![1u8; meta.slice_length(0) as usize],
        )
        .unwrap();
        layout.generation_dir(key, meta.generation)
    }

    #[test]
    fn recovery_never_sizes_anything_from_a_declared_length_above_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::create(dir.path()).unwrap();
        // What a node before storage.max_object_size wrote for an origin that declared
        // 18446744073709551615 bytes: recovery used to abort on a 16 TiB allocation.
        let huge_key = CacheKey::new("h.example", "/huge");
        let huge = stored_version(&layout, &huge_key, &meta(&huge_key, 1, u64::MAX, 100));
        let at_limit_key = CacheKey::new("h.example", "/at-limit");
        let at_limit = meta(&at_limit_key, 2, limits().max_object_size, 100);
        stored_version(&layout, &at_limit_key, &at_limit);

        let recovered = layout.recover(limits()).unwrap();
        assert_eq!(recovered.len(), 1);
        assert_eq!(recovered[0].meta, at_limit);
        assert_eq!(recovered[0].present_slices, vec![0]);
        assert!(!huge.exists(), "the oversized version is deleted");
        assert!(!layout.object_dir(&huge_key).exists());
    }

    #[test]
    fn recovery_deletes_corrupt_metadata_and_keys_filed_under_another_directory() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::create(dir.path()).unwrap();
        let garbled_key = CacheKey::new("h.example", "/garbled");
        let garbled = stored_version(&layout, &garbled_key, &meta(&garbled_key, 1, SLICE, 100));
        fs::write(
            garbled.join("meta.json"),
            b"{\"key\": \"h.example/garbled\", trunc",
        )
        .unwrap();
        // An edited meta.json that files this directory's bytes under another URL.
        let real_key = CacheKey::new("h.example", "/real");
        let mut forged = meta(&real_key, 1, SLICE, 100);
        let forged_dir = stored_version(&layout, &real_key, &forged);
        forged.key = "h.example/other".into();
        fs::write(
            forged_dir.join("meta.json"),
            serde_json::to_vec(&forged).unwrap(),
        )
        .unwrap();
        // Impossible slice lengths.
        for (name, slice_len) in [("/zero", 0), ("/odd", 3 * SLICE), ("/tiny", 4)] {
            let key = CacheKey::new("h.example", name);
            let mut insane = meta(&key, 1, 10, 100);
            insane.slice_len = slice_len;
            write_meta(&layout, &key, &insane);
        }
        // A meta.json far larger than the node ever writes.
        let bloated_key = CacheKey::new("h.example", "/bloated");
        let mut bloated = meta(&bloated_key, 1, SLICE, 100);
        bloated.headers = vec![(
            "x".into(),
            StoredValue::Text("y".repeat(MAX_META_FILE_BYTES as usize)),
        )];
        write_meta(&layout, &bloated_key, &bloated);
        // A stray file where a shard directory belongs does not stop the node.
        fs::write(dir.path().join("objects").join("stray"), b"x").unwrap();

        let recovered = layout.recover(limits()).unwrap();
        assert!(recovered.is_empty(), "{recovered:?}");
        let left: Vec<_> = fs::read_dir(dir.path().join("objects")).unwrap().collect();
        assert!(
            left.is_empty(),
            "every rejected directory is deleted: {left:?}"
        );
    }

    #[test]
    fn recovery_deletes_content_of_another_slice_size() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::create(dir.path()).unwrap();
        let key = CacheKey::new("h.example", "/resliced");
        let mut other = meta(&key, 1, 4 * SLICE, 100);
        other.slice_len = 2 * SLICE;
        let other_dir = stored_version(&layout, &key, &other);
        let kept_key = CacheKey::new("h.example", "/kept");
        stored_version(&layout, &kept_key, &meta(&kept_key, 1, SLICE, 100));

        let recovered = layout.recover(limits()).unwrap();
        assert_eq!(recovered.len(), 1);
        assert_eq!(recovered[0].meta.key, kept_key.as_str());
        assert!(
            !other_dir.exists(),
            "it could never be served, nor counted in max_size"
        );
    }

    #[test]
    fn of_two_versions_stored_in_the_same_second_the_higher_generation_wins_in_any_order() {
        for (first, second) in [(7u64, 9u64), (9, 7)] {
            let dir = tempfile::tempdir().unwrap();
            let layout = Layout::create(dir.path()).unwrap();
            let key = CacheKey::new("h.example", "/tie");
            stored_version(&layout, &key, &meta(&key, first, SLICE, 500));
            stored_version(&layout, &key, &meta(&key, second, SLICE, 500));
            let recovered = layout.recover(limits()).unwrap();
            assert_eq!(recovered.len(), 1);
            assert_eq!(recovered[0].meta.generation, 9);
            assert!(!layout.generation_dir(&key, 7).exists());
            assert!(layout.generation_dir(&key, 9).exists());
        }
    }

    #[test]
    fn a_path_names_the_drive_whose_directory_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let layout =
            Layout::create_drives(&drives(dir.path(), &[("a", 500), ("a/b", 500)])).unwrap();
        assert_eq!(
            layout.drive_of_path(&dir.path().join("a/objects/x")),
            Some(0)
        );
        assert_eq!(
            layout.drive_of_path(&dir.path().join("a/b/objects/x")),
            Some(1)
        );
        assert_eq!(layout.drive_of_path(&dir.path().join("c")), None);
    }
}
