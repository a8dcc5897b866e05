//! Files the control API hands back to the user who asked for them, by reference: the daemon
//! owns the table, the control API fills and empties it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use outpost_shared::sync::lock;
use tokio::time::Instant;

use crate::sources::node_api::{ContentId, Manifest};

/// A file handed back to the user who asked for it.
#[derive(Debug)]
pub(crate) struct HandedFile {
    pub(crate) path: PathBuf,
    pub(crate) owner_uid: u32,
    pub(crate) expires: Instant,
    /// The manifest to check the stream against, and the cache entry to drop if it fails.
    pub(crate) manifest: Option<Arc<Manifest>>,
    pub(crate) cached: Option<ContentId>,
    /// A transient file (content that is not cached) is deleted once sent or expired.
    pub(crate) transient: bool,
}

/// The references handed out and not yet used.
#[derive(Debug, Default)]
pub struct FileRefs {
    files: Mutex<HashMap<String, HandedFile>>,
}

impl FileRefs {
    pub(crate) fn insert(&self, file: HandedFile) -> String {
        let reference = format!("{:032x}", rand::random::<u128>());
        let mut files = lock(&self.files);
        let now = Instant::now();
        files.retain(|_, handed| {
            let keep = handed.expires > now;
            if !keep && handed.transient {
                let _ = std::fs::remove_file(&handed.path);
            }
            keep
        });
        files.insert(reference.clone(), file);
        reference
    }

    /// Takes the file of `reference` if `uid` asked for it (anyone else finds nothing, and the
    /// reference stays for its owner).
    pub(crate) fn take(&self, reference: &str, uid: u32) -> Option<HandedFile> {
        let mut files = lock(&self.files);
        let handed = files.get(reference)?;
        if handed.owner_uid != uid || handed.expires <= Instant::now() {
            return None;
        }
        files.remove(reference)
    }

    /// References outstanding.
    pub fn len(&self) -> usize {
        lock(&self.files).len()
    }

    /// True when none are outstanding.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
