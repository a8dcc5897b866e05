//! End-to-end: the admin's dashboard (`GET /` on the admin listener) in a real browser, and the
//! Grafana dashboard in `docs/` against a real node's `/metrics`.
//!
//! The browser is Debian's `chromium` in headless mode, installed by `.ci/run`. It loads the page
//! from a running node after known traffic; the test reads the figures the page shows from the
//! DOM (each has an `id` and its raw value in `data-value`) and checks them against `/stats`, then
//! saves screenshots at a desktop and a phone size under
//! `$CARGO_TARGET_DIR/test-output/dashboard/` (`target/` without it). When chromium is missing
//! locally that test says so and passes, unless `OUTPOST_REQUIRE_TOOLS=1` (set in CI).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use outpost_testkit::{eventually_async, pattern_bytes};

/// Each test object's size: eight test slices.
const OBJECT_LEN: usize = 2 * 1024 * 1024;

/// The admin page at `path` of `node`, as a browser gets it.
async fn admin_get(node: &TestNode, path: &str) -> Fetched {
    get(&format!("http://{}{path}", node.admin_addr), &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_self_contained_under_a_strict_policy() {
    let (_origin, _storage, node) = origin_and_node().await;
    let page = admin_get(&node, "/").await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type").as_deref(),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(page.header("cache-control").as_deref(), Some("no-store"));
    let policy = page.header("content-security-policy").unwrap();
    for directive in [
        "default-src 'none'",
        "connect-src 'self'",
        "script-src 'sha256-",
        "style-src 'sha256-",
        "frame-ancestors 'none'",
    ] {
        assert!(policy.contains(directive), "{directive} in {policy}");
    }
    assert!(!policy.contains("unsafe"), "{policy}");
    assert_eq!(admin_get(&node, "/dashboard").await.bytes(), page.bytes());

    let html = std::str::from_utf8(page.bytes()).unwrap();
    assert!(html.starts_with("<!doctype html>"));
    assert_eq!(external_references(html), Vec::<String>::new());
    // The check above catches what it should.
    assert_eq!(
        external_references(r#"<img src="//cdn.example/x.png"><a href='https://e.example'>"#),
        ["src=//cdn.example/x.png", "href=https://e.example"]
    );
    node.stop().await;
}

/// Every reference in `html` that leaves the node: an absolute or scheme-relative `src`,
/// `href`, `action`, `url()`, `@import` or `fetch()` target, and any `http://` or `https://`
/// at all. `data:` URLs stay on the page and are allowed.
fn external_references(html: &str) -> Vec<String> {
    let mut found = Vec::new();
    for attribute in ["src=", "href=", "action=", "url(", "@import", "fetch("] {
        for (at, _) in html.match_indices(attribute) {
            let value = html[at + attribute.len()..]
                .trim_start_matches([' ', '"', '\'', '`'])
                .split(['"', '\'', '`', ')', ' ', '>'])
                .next()
                .unwrap_or("");
            let lower = value.to_ascii_lowercase();
            let leaves = lower.starts_with("//")
                || lower
                    .split_once(':')
                    .is_some_and(|(scheme, _)| scheme != "data" && !scheme.contains('/'));
            if leaves {
                found.push(format!("{attribute}{value}"));
            }
        }
    }
    for scheme in ["http://", "https://"] {
        if html.contains(scheme) && !found.iter().any(|reference| reference.contains(scheme)) {
            found.push(scheme.to_owned());
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_shows_the_numbers_of_stats() {
    if !tool_available("chromium") {
        return;
    }
    let (origin, _storage, node) = origin_and_node_configured(|storage, origin| {
        let mut config = usual_config(storage, &origin.base_url());
        config.admin.history_interval = Duration::from_secs(1);
        config
    })
    .await;

    // Known traffic over five history samples: three 2 MiB objects, each missed once, then hit
    // nine times in all. At most a quarter of the bytes came from fills: a missed response sends
    // the slices its fill has already stored from disk, so some of its bytes count as hits.
    let paths = ["/a.bin", "/b.bin", "/c.bin"];
    for (seed, path) in paths.iter().enumerate() {
        origin.put(path, pattern_bytes(OBJECT_LEN, 40 + seed as u64));
    }
    let rounds: [&[(&str, &str)]; 5] = [
        &[("/a.bin", "MISS")],
        &[("/a.bin", "HIT"), ("/b.bin", "MISS")],
        &[("/a.bin", "HIT"), ("/b.bin", "HIT"), ("/c.bin", "MISS")],
        &[("/a.bin", "HIT"), ("/b.bin", "HIT"), ("/c.bin", "HIT")],
        &[("/a.bin", "HIT"), ("/b.bin", "HIT"), ("/c.bin", "HIT")],
    ];
    for round in rounds {
        for (path, expected) in round {
            let fetched = get(&node.mcc_url(path), &[]).await;
            assert_eq!(fetched.bytes().len(), OBJECT_LEN, "{path}");
            assert_eq!(
                fetched.header("x-cache").as_deref(),
                Some(*expected),
                "{path}"
            );
            node.settle().await;
        }
        // Spread the rounds over the samples, so the charts have a shape.
        let seen = history_len(&node).await;
        eventually_async(
            "a new history sample",
            Duration::from_secs(10),
            async || history_len(&node).await > seen,
        )
        .await;
    }
    let stats = node.stats().await;
    assert_eq!(stat(&stats, "egress_bytes"), 12 * OBJECT_LEN as u64);
    assert_eq!(stat(&stats, "origin_bytes"), 3 * OBJECT_LEN as u64);
    assert!(stat(&stats, "hit_bytes") >= 9 * OBJECT_LEN as u64);

    let out = output_dir();
    let url = format!("http://{}/", node.admin_addr);
    let dom = chromium(&out, &["--dump-dom", &url]).await;
    let dom = String::from_utf8(dom).unwrap();
    std::fs::write(out.join("dashboard.dom.html"), &dom).unwrap();
    assert_eq!(
        attribute_of(&dom, "dashboard", "data-state").as_deref(),
        Some("ready"),
        "the page loaded its figures"
    );

    // The figures the page shows are /stats's, raw and as text.
    let after = node.stats().await;
    assert_eq!(after, stats, "no traffic while the browser looked");
    for (id, field) in [
        ("egress-bytes", "egress_bytes"),
        ("origin-bytes", "origin_bytes"),
        ("hit-bytes", "hit_bytes"),
        ("miss-bytes", "miss_bytes"),
        ("cache-used-bytes", "cache_used_bytes"),
        ("cache-max-bytes", "cache_max_bytes"),
        ("objects", "objects"),
        ("requests", "requests"),
        ("hit-requests", "hit_requests"),
        ("miss-requests", "miss_requests"),
        ("fills-in-flight", "fills_in_flight"),
        ("connections-open", "connections_open"),
        ("disk-write-errors", "disk_write_errors"),
    ] {
        let shown: u64 = value_of(&dom, id).parse().unwrap();
        assert_eq!(shown, stat(&stats, field), "#{id} against {field}");
    }
    let ratio: f64 = value_of(&dom, "hit-ratio").parse().unwrap();
    assert_eq!(ratio, stats["hit_ratio_bytes"].as_f64().unwrap());
    assert!(ratio >= 0.75, "{ratio}");
    // The ratio as a percentage with one decimal, e.g. "75.0 %".
    let percent: f64 = text_of(&dom, "hit-ratio")
        .strip_suffix(" %")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (percent - ratio * 100.0).abs() <= 0.05 + 1e-9,
        "{percent} %"
    );
    assert_eq!(text_of(&dom, "egress-bytes"), "24.0 MiB");
    assert_eq!(text_of(&dom, "origin-bytes"), "6.00 MiB");
    assert_eq!(text_of(&dom, "objects"), "3");
    assert_eq!(value_of(&dom, "health"), "ok");
    assert_eq!(
        value_of(&dom, "disk-backend"),
        stats["disk_backend"].as_str().unwrap()
    );

    // One row per drive, with /stats's figures.
    let drives = stats["drives"].as_array().unwrap();
    assert_eq!(
        attribute_of(&dom, "drives", "data-count"),
        Some(drives.len().to_string())
    );
    for drive in drives {
        let row = format!(
            "data-path=\"{}\" data-used-bytes=\"{}\" data-max-bytes=\"{}\" data-objects=\"{}\"",
            drive["path"].as_str().unwrap(),
            drive["used_bytes"],
            drive["max_bytes"],
            drive["objects"]
        );
        assert!(dom.contains(&row), "{row} in the drives list");
    }

    // The top origins by bytes sent, with /stats's figures: all the traffic went to one.
    let origins = stats["origins"].as_array().unwrap();
    assert_eq!(
        attribute_of(&dom, "origins", "data-count"),
        Some(origins.len().to_string())
    );
    let top = &origins[0];
    assert_eq!(top["label"], ORIGIN_HOST, "{stats}");
    assert_eq!(value_of(&dom, "origin-0-label"), ORIGIN_HOST);
    for (field, name) in [
        ("requests", "requests"),
        ("egress-bytes", "egress_bytes"),
        ("origin-bytes", "origin_bytes"),
        ("stored-bytes", "stored_bytes"),
    ] {
        let shown: u64 = value_of(&dom, &format!("origin-0-{field}"))
            .parse()
            .unwrap();
        assert_eq!(shown, stat(top, name), "#origin-0-{field} against {name}");
    }
    assert_eq!(stat(top, "egress_bytes"), 12 * OBJECT_LEN as u64);
    assert_eq!(text_of(&dom, "origin-0-egress-bytes"), "24.0 MiB");
    assert_eq!(value_of(&dom, "origin-1-egress-bytes"), "0");

    // The charts drew the rates between the samples (one point per pair).
    for chart in ["chart-hour", "chart-day"] {
        let points: usize = attribute_of(&dom, chart, "data-points")
            .unwrap()
            .parse()
            .unwrap();
        assert!(points >= 5, "{chart} has {points} points");
    }
    let history = admin_json(&node, "/stats/history").await;
    let samples = history["samples"].as_array().unwrap();
    assert!(samples.len() >= 6, "{history}");

    // The panels for figures the node does not publish yet say so, and only then.
    let prefill = admin_get(&node, "/prefill").await.status == 200;
    for (panel, available) in [
        ("origins", stats.get("origins").is_some()),
        ("tls", stats.get("tls").is_some()),
        ("fill-progress", stats.get("fills").is_some()),
        ("prefill", prefill),
    ] {
        assert_eq!(
            attribute_of(&dom, panel, "data-available"),
            Some(available.to_string()),
            "#{panel}"
        );
    }

    // Screenshots: a desktop window, a phone's, the whole page, and the dark palette (the page
    // follows `prefers-color-scheme`, which `--force-dark-mode` sets).
    for (name, width, height, palette) in [
        (
            "dashboard",
            1280,
            900,
            "--blink-settings=preferredColorScheme=1",
        ),
        (
            "dashboard-phone",
            390,
            844,
            "--blink-settings=preferredColorScheme=1",
        ),
        (
            "dashboard-full",
            1280,
            1640,
            "--blink-settings=preferredColorScheme=1",
        ),
        ("dashboard-dark", 1280, 900, "--force-dark-mode"),
    ] {
        let file = out.join(format!("{name}.png"));
        let _ = std::fs::remove_file(&file);
        chromium(
            &out,
            &[
                &format!("--screenshot={}", file.display()),
                &format!("--window-size={width},{height}"),
                "--hide-scrollbars",
                palette,
                &url,
            ],
        )
        .await;
        let png = std::fs::read(&file).unwrap();
        assert_eq!(png_size(&png), Some((width, height)), "{}", file.display());
        // A blank page compresses to a few hundred bytes; text and charts do not.
        assert!(
            png.len() > 10_000,
            "{} is {} bytes",
            file.display(),
            png.len()
        );
        println!("screenshot: {}", file.display());
    }
    node.stop().await;
}

async fn history_len(node: &TestNode) -> usize {
    admin_json(node, "/stats/history").await["samples"]
        .as_array()
        .unwrap()
        .len()
}

async fn admin_json(node: &TestNode, path: &str) -> serde_json::Value {
    serde_json::from_slice(admin_get(node, path).await.bytes()).unwrap()
}

/// Where this test leaves its screenshots, created if missing.
fn output_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    let dir = target.join("test-output").join("dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    println!("dashboard test output: {}", dir.display());
    dir
}

/// Runs headless chromium with `args` after the common ones and returns what it printed. Its
/// profile is a fresh directory, its background services are off, and it lets the page run
/// five seconds of virtual time (timers included) before it dumps or shoots.
async fn chromium(out: &Path, args: &[&str]) -> Vec<u8> {
    let profile = tempfile::tempdir_in(out).unwrap();
    let mut command = tokio::process::Command::new("chromium");
    command
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--force-device-scale-factor=1",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    succeeds(&mut command, &format!("chromium {args:?}")).await
}

/// Runs `command` (at most 90 s) and returns its standard output, failing the test with its
/// output when it fails.
async fn succeeds(command: &mut tokio::process::Command, what: &str) -> Vec<u8> {
    let output = tokio::time::timeout(Duration::from_secs(90), command.output())
        .await
        .unwrap_or_else(|_| panic!("{what} finishes within 90 s"))
        .unwrap_or_else(|error| panic!("{what} starts: {error}"));
    assert!(
        output.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

/// The start tag of the element whose `id` is `id` in a serialised DOM.
fn start_tag<'a>(dom: &'a str, id: &str) -> &'a str {
    let marker = format!(" id=\"{id}\"");
    let at = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("no #{id} in the page"));
    let start = dom[..at].rfind('<').unwrap();
    let end = at + dom[at..].find('>').unwrap();
    &dom[start..=end]
}

/// The value of attribute `name` on the element `id`.
fn attribute_of(dom: &str, id: &str, name: &str) -> Option<String> {
    let tag = start_tag(dom, id);
    let marker = format!(" {name}=\"");
    let at = tag.find(&marker)? + marker.len();
    Some(tag[at..at + tag[at..].find('"')?].to_owned())
}

/// The raw figure (`data-value`) the element `id` shows.
fn value_of(dom: &str, id: &str) -> String {
    attribute_of(dom, id, "data-value").unwrap_or_else(|| panic!("#{id} has no data-value"))
}

/// The text of the element `id` (up to its first child or end tag).
fn text_of(dom: &str, id: &str) -> String {
    let tag = start_tag(dom, id);
    let after = dom.find(tag).unwrap() + tag.len();
    dom[after..after + dom[after..].find('<').unwrap()].to_owned()
}

/// A PNG's width and height, from its signature and `IHDR` chunk; `None` if it is not a PNG.
fn png_size(png: &[u8]) -> Option<(u32, u32)> {
    const SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
    if png.len() < 24 || !png.starts_with(SIGNATURE) || &png[12..16] != b"IHDR" {
        return None;
    }
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    Some((width, height))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_reads_metrics_the_node_exports() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/grafana-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();

    // Importable: a Prometheus datasource input that every panel and query uses.
    let inputs = dashboard["__inputs"].as_array().unwrap();
    assert!(inputs.iter().any(|input| input["name"] == "DS_PROMETHEUS"
        && input["type"] == "datasource"
        && input["pluginId"] == "prometheus"));
    let panels = dashboard["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut expressions = Vec::new();
    for panel in panels {
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "panel ids unique"
        );
        assert!(panel["gridPos"]["w"].as_u64().is_some(), "{panel}");
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${DS_PROMETHEUS}", "{panel}");
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${DS_PROMETHEUS}");
            expressions.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    assert!(panels.len() >= 8, "{} panels", panels.len());
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        let query = &variable["query"];
        let query = query["query"].as_str().or(query.as_str()).unwrap_or("");
        expressions.push(query.to_owned());
    }

    // Every metric a query names is in a real node's /metrics, after a miss and a hit (so the
    // histograms have their `cache` labels).
    let (origin, _storage, node) = origin_and_node().await;
    origin.put("/g.bin", pattern_bytes(100_000, 23));
    let url = node.mcc_url("/g.bin");
    assert_eq!(
        get(&url, &[]).await.header("x-cache").as_deref(),
        Some("MISS")
    );
    node.settle().await;
    assert_eq!(
        get(&url, &[]).await.header("x-cache").as_deref(),
        Some("HIT")
    );
    let metrics = eventually_async("the hit's duration", Duration::from_secs(10), async || {
        let metrics = node.metrics().await;
        metrics
            .contains("outpost_response_duration_seconds_count{cache=\"hit\"} 1")
            .then_some(metrics)
    })
    .await;
    let exported: BTreeSet<&str> = metrics
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| line.split(['{', ' ']).next().unwrap())
        .collect();
    let mut referenced = BTreeSet::new();
    for expression in &expressions {
        for (at, _) in expression.match_indices("outpost_") {
            let name: String = expression[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            referenced.insert(name);
        }
    }
    assert!(referenced.len() >= 10, "{referenced:?}");
    let missing: Vec<&String> = referenced
        .iter()
        .filter(|name| !exported.contains(name.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "not in /metrics: {missing:?}\nexported: {exported:?}"
    );
    // And the labels the queries select on are ones the node writes.
    for expression in &expressions {
        for label in ["cache=\"hit\"", "cache=\"miss\""] {
            if expression.contains(label) {
                assert!(metrics.contains(label), "{label}");
            }
        }
    }
    node.stop().await;
    // Each query is PromQL that Prometheus parses: promtool checks them as recording rules, with
    // Grafana's variables given values.
    if !tool_available("promtool") {
        return;
    }
    let rules: Vec<serde_json::Value> = expressions
        .iter()
        .enumerate()
        .map(|(index, expression)| {
            let expression = expression
                .replace("$__rate_interval", "1m")
                .replace("$__interval", "1m")
                .replace("$__range", "1h")
                .replace("$instance", ".*");
            let expression = match expression.strip_prefix("label_values(") {
                // A variable's query is a Grafana function around a metric name.
                Some(call) => call.split(',').next().unwrap().to_owned(),
                None => expression,
            };
            serde_json::json!({ "record": format!("grafana:query_{index}"), "expr": expression })
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("grafana-queries.rules.json");
    let document = serde_json::json!({ "groups": [{ "name": "grafana", "rules": rules }] });
    std::fs::write(&file, document.to_string()).unwrap();
    let mut check = tokio::process::Command::new("promtool");
    check.args(["check", "rules"]).arg(&file);
    succeeds(&mut check, "promtool check rules").await;
}
