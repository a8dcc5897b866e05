//! What a scenario sees of the machine it runs on, beyond HTTP: connections from a loopback
//! address of its choice (to play several LAN clients at once), the files a node left under a
//! directory and the bytes they hold, and what a process holds of memory and file descriptors.
//! The measurements read `/proc`, so they are Linux's, as the appliance is.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tokio::net::{TcpSocket, TcpStream};

/// A TCP connection to `addr` from the loopback address `source` (any of 127.0.0.0/8), so that
/// one test can be many clients as the node tells them apart.
pub async fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(source.parse().unwrap(), 0))
        .unwrap();
    socket.connect(addr).await.unwrap()
}

/// Every regular file under `root`, at any depth; nothing when `root` does not exist.
pub fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(directory) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&directory) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                pending.push(entry.path());
            } else {
                files.push(entry.path());
            }
        }
    }
    files
}

/// Bytes in the regular files under `root` (a file deleted while they are counted counts
/// nothing).
pub fn bytes_under(root: &Path) -> u64 {
    files_under(root)
        .iter()
        .filter_map(|file| std::fs::metadata(file).ok())
        .map(|metadata| metadata.len())
        .sum()
}

/// The resident memory of process `pid` in bytes (`VmRSS` in `/proc/<pid>/status`); the test
/// process's own is `resident_bytes(std::process::id())`.
pub fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .expect("VmRSS in /proc/<pid>/status");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|value| value.parse().ok())
        .expect("VmRSS is a number of kB");
    kib * 1024
}

/// The file descriptors the test process has open (a node or daemon started in it included).
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_and_bytes_under_a_tree_count_every_level_and_a_missing_root_is_empty() {
        let directory = tempfile::tempdir().unwrap();
        let root = directory.path().join("root");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("top"), [0u8; 3]).unwrap();
        std::fs::write(root.join("a/b/deep"), [0u8; 5]).unwrap();
        let mut files = files_under(&root);
        files.sort();
        assert_eq!(files, [root.join("a/b/deep"), root.join("top")]);
        assert_eq!(bytes_under(&root), 8);
        std::fs::remove_dir_all(&root).unwrap();
        assert!(files_under(&root).is_empty());
        assert_eq!(bytes_under(&root), 0);
    }

    #[test]
    fn the_test_process_has_memory_and_descriptors() {
        assert!(resident_bytes(std::process::id()) > 0);
        assert!(open_fds() >= 3);
    }

    #[tokio::test]
    async fn a_connection_comes_from_the_chosen_loopback_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = connect_from("127.0.0.7", addr).await;
        let (_server_side, peer) = listener.accept().await.unwrap();
        assert_eq!(peer.ip().to_string(), "127.0.0.7");
    }
}
