//! End-to-end: reloading the configuration of a running `cache-node` process, as an admin does
//! it: edit the file, then `POST /reload` (with the token) or `kill -HUP`. A reload that adds an
//! origin makes requests for it succeed while a fill that started before it carries on; a
//! reload that fails validation is refused as a whole (422 with the reason) and the old config
//! keeps serving; a reload that changes a setting that can't change live names it and keeps the
//! running value; the admin token rotates.

mod common;

use std::path::Path;
use std::time::Duration;

use cache_node::config::{Config, OriginConfig};
use common::*;
use outpost_testkit::{eventually_async, pattern_bytes, Behaviour, MockOrigin};

/// The second origin's host, unknown to the node until the reload.
const NEW_HOST: &str = "mirror.reload.example";

fn rewrite(config_path: &Path, edit: impl FnOnce(&mut Config)) {
    let mut config: Config =
        toml::from_str(&std::fs::read_to_string(config_path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(config_path, config_to_toml(&config)).unwrap();
}

async fn post_reload(node: &NodeProcess, token: &str) -> (u16, serde_json::Value) {
    let response = client()
        .post(format!("http://{}/reload", node.admin_addr))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.bytes().await.unwrap();
    let value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    (status, value)
}

async fn stats_of(node: &NodeProcess) -> serde_json::Value {
    admin_stats(node.admin_addr).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_add_origins_refuse_bad_configs_and_name_restart_only_settings() {
    let origin = MockOrigin::start().await;
    let second = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let binary = Path::new(env!("CARGO_BIN_EXE_cache-node"));
    let config_path = work.path().join("node.toml");
    let mut node = NodeProcess::spawn(
        binary,
        work.path(),
        usual_config(storage.path(), &origin.base_url()),
    );
    node.wait_healthy().await;

    // A slow fill from the first origin is under way across every reload below.
    let slow = pattern_bytes(2 * 1024 * 1024 + 3, 41);
    origin.put_with(
        "/slow.bin",
        slow.clone(),
        Behaviour {
            chunk_delay: Some(Duration::from_millis(100)),
            chunk_size: Some(32 * 1024),
            ..Behaviour::default()
        },
    );
    let slow_download = tokio::spawn(
        client()
            .get(mcc_url(node.addr, "/slow.bin"))
            .send()
            .await
            .unwrap()
            .bytes(),
    );

    let content = pattern_bytes(100_000, 42);
    second.put("/pool/new.deb", content.clone());
    let new_url = format!(
        "http://{}/pool/new.deb?cacheHostOrigin={NEW_HOST}",
        node.addr
    );
    assert_eq!(get(&new_url, &[]).await.status, 403);

    // 1. Add the origin: applied, and a request for it now succeeds.
    rewrite(&config_path, |config| {
        config.origin.push(OriginConfig {
            host: NEW_HOST.into(),
            upstream: Some(second.base_url()),
            ..OriginConfig::default()
        });
    });
    let (status, report) = post_reload(&node, "test-token").await;
    assert_eq!(status, 200, "{report}");
    assert!(
        !slow_download.is_finished(),
        "the slow fill spans the reloads"
    );
    assert_eq!(report["applied"], serde_json::json!(["origin"]));
    assert_eq!(report["restart_needed"], serde_json::json!([]));
    let fetched = get(&new_url, &[]).await;
    assert_eq!(fetched.status, 200);
    assert_eq!(fetched.bytes(), &content[..]);
    // The new origin has its own label in the per-origin numbers, the old ones keep theirs.
    let stats = stats_of(&node).await;
    let labels = origin_labels(&stats);
    assert!(labels.contains(&ORIGIN_HOST), "{labels:?}");
    let added = origin_figures(&stats, NEW_HOST);
    assert_eq!(added["requests"], 1);
    assert_eq!(added["egress_bytes"], content.len() as u64);

    // 2. A config that fails validation is refused whole, with the key and the reason; the
    // running one keeps serving the new origin, and the rest of the bad file is not applied.
    rewrite(&config_path, |config| {
        config.origin.push(OriginConfig::default());
        config.admin.token = "never-applied".into();
    });
    let (status, refusal) = post_reload(&node, "test-token").await;
    assert_eq!(status, 422, "{refusal}");
    let reason = refusal["error"].as_str().unwrap();
    assert!(reason.contains("origin[3].host"), "{reason}");
    assert_eq!(get(&new_url, &[]).await.status, 200);
    assert_eq!(stats_of(&node).await["config_reload_failures"], 1);

    // 3. SIGHUP with a live-only change and a new token: the token rotates at once, and the
    // live-only setting is named and keeps its running value.
    rewrite(&config_path, |config| {
        config.origin.pop();
        config.admin.token = "rotated-token".into();
        config.server.max_connections += 1;
    });
    let hangup = std::process::Command::new("kill")
        .arg("-HUP")
        .arg(node.child.id().to_string())
        .status()
        .unwrap();
    assert!(hangup.success());
    eventually_async("the SIGHUP reload", Duration::from_secs(10), async || {
        stats_of(&node).await["config_reloads"].as_u64() == Some(2)
    })
    .await;
    let (status, _) = post_reload(&node, "test-token").await;
    assert_eq!(status, 401, "the old token no longer works");
    let (status, report) = post_reload(&node, "rotated-token").await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["applied"], serde_json::json!([]));
    assert_eq!(
        report["restart_needed"],
        serde_json::json!(["server.max_connections"])
    );

    // The fill that was running through all of it completes, byte-exact, and nothing dropped it.
    let downloaded = slow_download.await.unwrap().unwrap();
    assert_eq!(downloaded.len(), slow.len());
    assert!(downloaded == slow, "the slow download is byte-exact");
    assert_eq!(stats_of(&node).await["config_reloads"], 3);
    node.kill_9();
}
