//! nginx configured the way lancache configures it (`slice 1m`, a cache key with
//! `$slice_range`, `proxy_cache_lock`, `sendfile`, `aio threads`), the alternative every
//! benchmark in `benches/` measures cache-node against. Shared by the benchmark programs.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Downloads `url` with curl to /dev/null and returns (seconds, bytes).
#[allow(dead_code)] // not every benchmark downloads with curl
pub fn curl_download(url: &str) -> (f64, u64) {
    let output = Command::new("curl")
        .args([
            "-sS",
            "--fail",
            "--noproxy",
            "*",
            "-o",
            "/dev/null",
            "-w",
            "%{time_total} %{size_download}",
            url,
        ])
        .output()
        .expect("curl runs");
    assert!(
        output.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let mut fields = text.split_whitespace();
    let seconds: f64 = fields.next().unwrap().parse().unwrap();
    let bytes: u64 = fields.next().unwrap().parse().unwrap();
    (seconds, bytes)
}

/// True when `name` is on the PATH.
pub fn tool_available(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .status()
        .map(|status| status.success())
        .unwrap_or(false)
}

/// True when this process runs as root.
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|output| output.stdout == b"0\n")
        .unwrap_or(false)
}

/// A running nginx; stopped with SIGTERM on drop so its master stops the workers.
pub struct LancacheNginx {
    child: Child,
}

impl LancacheNginx {
    /// Starts nginx with its files under `prefix`, listening on `127.0.0.1:port` and proxying
    /// to the origin on `127.0.0.1:origin_port`. Returns once the port accepts connections.
    pub fn start(prefix: &Path, port: u16, origin_port: u16) -> LancacheNginx {
        let server = format!(
            r#"    upstream origin {{ server 127.0.0.1:{origin_port}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port} reuseport;
        keepalive_requests 1000000;
        location / {{
            slice 1m;
            proxy_cache generic;
            proxy_cache_key $uri$slice_range;
            proxy_set_header Range $slice_range;
            proxy_set_header Host $host;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache_valid 200 206 3650d;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 1h;
            proxy_ignore_headers Expires Cache-Control;
            proxy_pass http://origin;
        }}
    }}
"#
        );
        Self::start_with(prefix, port, server)
    }

    /// Starts plain nginx serving the files under `root` straight from disk on
    /// `127.0.0.1:port`, with the same `sendfile` and `aio threads` settings: the practical
    /// ceiling any cache on this machine can reach.
    #[allow(dead_code)] // the cold-fill benchmark has no use for it
    pub fn start_static(prefix: &Path, port: u16, root: &Path) -> LancacheNginx {
        let server = format!(
            r#"    server {{
        listen 127.0.0.1:{port} reuseport;
        keepalive_requests 1000000;
        location / {{ root {root}; }}
    }}
"#,
            root = root.display()
        );
        Self::start_with(prefix, port, server)
    }

    /// Starts nginx serving files under `root` over TLS 1.3 only, with `cert`/`key` and the one
    /// cipher suite `cipher_suite` (an OpenSSL name such as `TLS_AES_256_GCM_SHA384`), so it
    /// negotiates what the node negotiates.
    #[allow(dead_code)] // only the hit-path benchmark serves TLS
    pub fn start_static_tls(
        prefix: &Path,
        port: u16,
        root: &Path,
        cert: &Path,
        key: &Path,
        cipher_suite: &str,
    ) -> LancacheNginx {
        let server = format!(
            r#"    server {{
        listen 127.0.0.1:{port} ssl reuseport;
        keepalive_requests 1000000;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.3;
        ssl_conf_command Ciphersuites {cipher_suite};
        location / {{ root {root}; }}
    }}
"#,
            root = root.display(),
            cert = cert.display(),
            key = key.display(),
        );
        Self::start_with(prefix, port, server)
    }

    /// The master's process id and its workers', for resource sampling.
    #[allow(dead_code)] // only the abuse benchmark samples nginx
    pub fn process_ids(&self) -> Vec<u32> {
        let master = self.child.id();
        let mut ids = vec![master];
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            // The parent pid is the second field after the parenthesised command name.
            let parent = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            if parent == Some(master) {
                ids.push(pid);
            }
        }
        ids
    }

    /// Starts nginx with the shared `http` settings and `server` (which listens on `port`).
    fn start_with(prefix: &Path, port: u16, server: String) -> LancacheNginx {
        for directory in ["cache", "tmp", "logs"] {
            std::fs::create_dir_all(prefix.join(directory)).unwrap();
        }
        let config = format!(
            r#"{user}
worker_processes auto;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    aio threads;
    client_body_temp_path {prefix}/tmp/client;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    proxy_temp_path {prefix}/tmp/proxy;
    proxy_cache_path {prefix}/cache levels=2:2 keys_zone=generic:100m inactive=200d max_size=20g use_temp_path=off;
{server}}}
"#,
            user = if is_root() { "user root;" } else { "" },
            prefix = prefix.display()
        );
        let config_path = prefix.join("nginx.conf");
        std::fs::write(&config_path, config).unwrap();
        let child = Command::new("nginx")
            .arg("-p")
            .arg(prefix)
            .arg("-c")
            .arg(&config_path)
            .spawn()
            .expect("nginx starts");
        let nginx = LancacheNginx { child };
        for _ in 0..500 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return nginx;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("nginx did not start listening on port {port}");
    }
}

impl Drop for LancacheNginx {
    fn drop(&mut self) {
        // SIGTERM lets the nginx master stop its workers; SIGKILL would orphan them.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}
