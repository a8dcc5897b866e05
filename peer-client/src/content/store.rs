//! The daemon's content cache: what this machine downloaded, kept to serve peers.
//!
//! Layout under `daemon.cache_dir`: `content/<content id>/data` (the file, or
//! `data.peer-partial` while its download runs) and `content/<content id>/meta.json` (the
//! manifest, the URL and when it was last used). Every path is built from a [`ContentId`], which
//! is 32 bytes printed as hex, never from text a peer sent, so nothing outside the cache can be
//! named. Entries are in memory; the directory is read once at start-up, and what is not complete
//! there is deleted.
//!
//! Policy: content below `min_file_size_to_cache` is never stored (it skips peering), content
//! unused for `max_cache_age` is deleted, and the least recently used complete content goes
//! when the cache is over `max_cache_size`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use outpost_shared::sync::lock;
use serde::{Deserialize, Serialize};

use crate::config::CacheSizeLimit;
use outpost_shared::wire::{ContentId, Manifest};

/// The most piece ranges one announcement carries (the tracker's bound).
pub const MAX_ANNOUNCED_RANGES: usize = 64;

/// What `meta.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    url: String,
    manifest: Manifest,
    last_used_unix_secs: u64,
}

/// One content item in the cache.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The URL it was downloaded from.
    pub url: String,
    /// Its manifest.
    pub manifest: Arc<Manifest>,
    /// Which pieces are on disk.
    pub held: Vec<bool>,
    /// Every piece is on disk under the final name.
    pub complete: bool,
    /// Last download or upload.
    pub last_used: SystemTime,
    /// Bumped whenever `held` changes (the announcer compares it).
    pub generation: u64,
}

impl Entry {
    /// Held pieces as announcement ranges.
    pub fn ranges(&self) -> Vec<[u64; 2]> {
        piece_ranges(&self.held, MAX_ANNOUNCED_RANGES)
    }

    /// True when every piece covering `range` is on disk.
    pub fn holds_range(&self, range: &std::ops::Range<u64>) -> bool {
        let piece = self.manifest.piece_size;
        if range.start >= range.end || range.end > self.manifest.size {
            return false;
        }
        (range.start / piece..range.end.div_ceil(piece))
            .all(|index| self.held.get(index as usize).copied().unwrap_or(false))
    }
}

/// What [`ContentStore::begin`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Begin {
    /// A fresh entry: download into it.
    Fresh,
    /// The complete content is here already.
    Complete,
    /// Another download of it is running.
    InProgress,
}

/// The content cache.
#[derive(Debug, Clone)]
pub struct ContentStore {
    root: PathBuf,
    entries: Arc<Mutex<HashMap<ContentId, Entry>>>,
}

impl ContentStore {
    /// Opens (creating) the cache under `cache_dir`, keeping the complete content found there.
    pub fn open(cache_dir: &Path) -> std::io::Result<ContentStore> {
        let root = cache_dir.join("content");
        std::fs::create_dir_all(&root)?;
        let mut entries = HashMap::new();
        for dir_entry in std::fs::read_dir(&root)? {
            let dir_entry = dir_entry?;
            let name = dir_entry.file_name();
            let Some(id) = name.to_str().and_then(ContentId::parse) else {
                let _ = remove_path(&dir_entry.path());
                continue;
            };
            match load_entry(&root, id) {
                Some(entry) => {
                    entries.insert(id, entry);
                }
                None => {
                    let _ = std::fs::remove_dir_all(dir_entry.path());
                }
            }
        }
        Ok(ContentStore {
            root,
            entries: Arc::new(Mutex::new(entries)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ContentId, Entry>> {
        lock(&self.entries)
    }

    /// The directory of `id`.
    fn dir(&self, id: ContentId) -> PathBuf {
        self.root.join(id.to_string())
    }

    /// Where the download of `id` writes (the engine adds `.peer-partial` while it runs).
    pub fn data_path(&self, id: ContentId) -> PathBuf {
        self.dir(id).join("data")
    }

    /// The partial file of a download in progress.
    pub fn partial_path(&self, id: ContentId) -> PathBuf {
        self.dir(id).join("data.peer-partial")
    }

    /// A copy of the entry of `id`.
    pub fn get(&self, id: ContentId) -> Option<Entry> {
        self.lock().get(&id).cloned()
    }

    /// Copies of every entry.
    pub fn entries(&self) -> Vec<(ContentId, Entry)> {
        self.lock()
            .iter()
            .map(|(id, entry)| (*id, entry.clone()))
            .collect()
    }

    /// Starts storing `manifest`'s content in a fresh, empty entry (a complete entry of
    /// another version is dropped), unless it is complete here already or being downloaded.
    pub fn begin(&self, url: &str, manifest: Arc<Manifest>) -> std::io::Result<Begin> {
        let id = manifest.content_id;
        if let Some(entry) = self.lock().get_mut(&id) {
            if !entry.complete {
                return Ok(Begin::InProgress);
            }
            if *entry.manifest == *manifest {
                entry.last_used = SystemTime::now();
                return Ok(Begin::Complete);
            }
        }
        let dir = self.dir(id);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let entry = Entry {
            url: url.to_owned(),
            held: vec![false; manifest.piece_count() as usize],
            complete: manifest.size == 0,
            manifest,
            last_used: SystemTime::now(),
            generation: 0,
        };
        write_meta(&dir, &entry)?;
        self.lock().insert(id, entry);
        Ok(Begin::Fresh)
    }

    /// Piece `index` of `id` is on disk.
    pub fn piece_written(&self, id: ContentId, index: u64) {
        if let Some(entry) = self.lock().get_mut(&id) {
            if let Some(held) = entry.held.get_mut(index as usize) {
                if !*held {
                    *held = true;
                    entry.generation += 1;
                }
            }
        }
    }

    /// The download of `id` completed and was renamed into place.
    pub fn completed(&self, id: ContentId) {
        let dir = self.dir(id);
        if let Some(entry) = self.lock().get_mut(&id) {
            entry.held.iter_mut().for_each(|held| *held = true);
            entry.complete = true;
            entry.generation += 1;
            entry.last_used = SystemTime::now();
            let _ = write_meta(&dir, entry);
        }
    }

    /// The download of `id` failed: its entry and files go.
    pub fn abandon(&self, id: ContentId) {
        self.lock().remove(&id);
        let _ = std::fs::remove_dir_all(self.dir(id));
    }

    /// Drops the complete content `id` (its copy on disk is corrupt); an entry being downloaded
    /// again meanwhile is left alone. Returns true when something was dropped.
    pub fn drop_complete(&self, id: ContentId) -> bool {
        let mut entries = self.lock();
        if !entries.get(&id).is_some_and(|entry| entry.complete) {
            return false;
        }
        entries.remove(&id);
        let _ = std::fs::remove_dir_all(self.dir(id));
        true
    }

    /// Records a use (an upload) of `id`.
    pub fn touch(&self, id: ContentId) {
        if let Some(entry) = self.lock().get_mut(&id) {
            entry.last_used = SystemTime::now();
        }
    }

    /// The file to read `id`'s pieces from: the final file, or the partial one while the download
    /// runs (the rename between the two is atomic, so one of them exists).
    pub fn open_for_reading(&self, id: ContentId) -> std::io::Result<std::fs::File> {
        std::fs::File::open(self.data_path(id))
            .or_else(|_| std::fs::File::open(self.partial_path(id)))
    }

    /// Bytes of content held (complete entries at full size, others at their held pieces).
    pub fn size_bytes(&self) -> u64 {
        self.lock().values().map(entry_bytes).sum()
    }

    /// Applies the age and size limits; `busy` entries (downloads running) are kept. Returns the
    /// ids deleted.
    pub fn enforce(
        &self,
        max_age: Duration,
        max_size: CacheSizeLimit,
        busy: &[ContentId],
    ) -> Vec<ContentId> {
        let limit = match max_size {
            CacheSizeLimit::Bytes(bytes) => bytes,
            CacheSizeLimit::PercentOfDisk(percent) => rustix::fs::statvfs(&self.root)
                .map(|stats| {
                    (stats.f_blocks as f64 * stats.f_frsize as f64 * percent / 100.0) as u64
                })
                .unwrap_or(u64::MAX),
        };
        let now = SystemTime::now();
        let mut removed = Vec::new();
        {
            let mut entries = self.lock();
            let mut candidates: Vec<(SystemTime, ContentId, u64)> = entries
                .iter()
                .filter(|(id, entry)| entry.complete && !busy.contains(id))
                .map(|(id, entry)| (entry.last_used, *id, entry_bytes(entry)))
                .collect();
            candidates.sort();
            let mut total: u64 = entries.values().map(entry_bytes).sum();
            for (last_used, id, bytes) in candidates {
                let too_old = now.duration_since(last_used).unwrap_or_default() > max_age;
                if too_old || total > limit {
                    entries.remove(&id);
                    total -= bytes;
                    removed.push(id);
                }
            }
        }
        for id in &removed {
            let _ = std::fs::remove_dir_all(self.dir(*id));
        }
        removed
    }
}

fn entry_bytes(entry: &Entry) -> u64 {
    if entry.complete {
        return entry.manifest.size;
    }
    let piece = entry.manifest.piece_size;
    (0..entry.held.len() as u64)
        .filter(|&index| entry.held[index as usize])
        .map(|index| piece.min(entry.manifest.size - index * piece))
        .sum()
}

fn write_meta(dir: &Path, entry: &Entry) -> std::io::Result<()> {
    let meta = Meta {
        url: entry.url.clone(),
        manifest: (*entry.manifest).clone(),
        last_used_unix_secs: entry
            .last_used
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
    };
    let temporary = dir.join("meta.json.tmp");
    std::fs::write(
        &temporary,
        serde_json::to_vec(&meta).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(temporary, dir.join("meta.json"))
}

fn load_entry(root: &Path, id: ContentId) -> Option<Entry> {
    let dir = root.join(id.to_string());
    let meta: Meta = serde_json::from_slice(&std::fs::read(dir.join("meta.json")).ok()?).ok()?;
    let length = std::fs::metadata(dir.join("data")).ok()?.len();
    if meta.manifest.content_id != id || length != meta.manifest.size {
        return None;
    }
    Some(Entry {
        url: meta.url,
        held: vec![true; meta.manifest.piece_count() as usize],
        complete: true,
        manifest: Arc::new(meta.manifest),
        last_used: SystemTime::UNIX_EPOCH + Duration::from_secs(meta.last_used_unix_secs),
        generation: 0,
    })
}

fn remove_path(path: &Path) -> std::io::Result<()> {
    if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
}

/// Inclusive ranges of the `true` entries of `held`, at most `max_ranges` of them (the first
/// ones: under-reporting is safe, a peer is then just asked less).
pub fn piece_ranges(held: &[bool], max_ranges: usize) -> Vec<[u64; 2]> {
    let mut ranges: Vec<[u64; 2]> = Vec::new();
    for (index, _) in held.iter().enumerate().filter(|(_, &held)| held) {
        let index = index as u64;
        if let Some(last) = ranges.last_mut().filter(|last| last[1] + 1 == index) {
            last[1] = index;
        } else if ranges.len() == max_ranges {
            break;
        } else {
            ranges.push([index, index]);
        }
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(seed: u8, size: u64) -> Arc<Manifest> {
        Arc::new(Manifest {
            content_id: ContentId([seed; 32]),
            key: String::new(),
            size,
            etag: Some("\"e\"".into()),
            last_modified: None,
            piece_size: 100,
            pieces: vec![[seed; 32]; size.div_ceil(100) as usize],
        })
    }

    #[test]
    fn complete_content_survives_a_restart_and_partial_content_does_not() {
        let directory = tempfile::tempdir().unwrap();
        let store = ContentStore::open(directory.path()).unwrap();
        let done = manifest(1, 250);
        assert_eq!(
            store.begin("http://o/a", Arc::clone(&done)).unwrap(),
            Begin::Fresh
        );
        std::fs::write(store.data_path(done.content_id), vec![0; 250]).unwrap();
        store.completed(done.content_id);
        let partial = manifest(2, 300);
        store.begin("http://o/b", Arc::clone(&partial)).unwrap();
        assert_eq!(
            store.begin("http://o/b", Arc::clone(&partial)).unwrap(),
            Begin::InProgress
        );
        store.piece_written(partial.content_id, 1);
        assert!(store
            .get(partial.content_id)
            .unwrap()
            .holds_range(&(100..200)));
        assert!(!store
            .get(partial.content_id)
            .unwrap()
            .holds_range(&(150..250)));
        assert_eq!(store.size_bytes(), 350);
        std::fs::create_dir_all(directory.path().join("content/not-an-id")).unwrap();

        let reopened = ContentStore::open(directory.path()).unwrap();
        assert!(reopened.get(done.content_id).unwrap().complete);
        assert!(reopened.get(partial.content_id).is_none());
        assert!(!directory.path().join("content/not-an-id").exists());
        assert_eq!(reopened.begin("http://o/a", done).unwrap(), Begin::Complete);
    }

    #[test]
    fn old_and_least_recently_used_content_is_evicted_first() {
        let directory = tempfile::tempdir().unwrap();
        let store = ContentStore::open(directory.path()).unwrap();
        for seed in 1..=3 {
            let content = manifest(seed, 100);
            store.begin("http://o/x", Arc::clone(&content)).unwrap();
            std::fs::write(store.data_path(content.content_id), vec![0; 100]).unwrap();
            store.completed(content.content_id);
            store.lock().get_mut(&content.content_id).unwrap().last_used =
                SystemTime::now() - Duration::from_secs(100 * (4 - seed as u64));
        }
        // Over 200 bytes: the oldest goes; content 2 is busy, so it stays though older than 3.
        let removed = store.enforce(
            Duration::from_secs(3600),
            CacheSizeLimit::Bytes(200),
            &[ContentId([2; 32])],
        );
        assert_eq!(removed, [ContentId([1; 32])]);
        let removed = store.enforce(Duration::from_secs(150), CacheSizeLimit::Bytes(1000), &[]);
        assert_eq!(removed, [ContentId([2; 32])]);
        assert_eq!(store.size_bytes(), 100);
    }
}
