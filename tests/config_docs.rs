//! The configuration reference cannot drift from the code: every field of both programs' config
//! structs must appear in `docs/configuration.md` under its own section's heading, with its
//! environment variable (except in arrays of tables such as cache-node's `[[origin]]`, which the
//! environment cannot set),
//! and every key the reference documents must exist in the code. The fields are read from the
//! serialised default configs, so a new field is checked without editing this test.

use std::collections::{BTreeMap, BTreeSet};

/// The top-level keys' section name (peer-client has keys outside any table).
const TOP_LEVEL: &str = "";

/// A program's tables, by section (`server`, `[origin]` for an array of tables, `""` for the top
/// level): key → table row.
type Documented = BTreeMap<String, BTreeMap<String, String>>;

/// Reads one program's part of the reference.
fn documented_sections(markdown: &str) -> Documented {
    let mut sections = Documented::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        if let Some(heading) = line.strip_prefix("## `[") {
            // "## `[server]`: ..." → "server"; "## `[[origin]]`: ..." → "[origin]".
            current = heading.split("]`").next().map(str::to_owned);
            continue;
        }
        if line.starts_with("## Top-level keys") {
            current = Some(TOP_LEVEL.to_owned());
            continue;
        }
        if line.starts_with("## ") {
            current = None;
            continue;
        }
        let (Some(section), Some(row)) = (&current, line.strip_prefix("| `")) else {
            continue;
        };
        if let Some(key) = row.split('`').next() {
            sections
                .entry(section.clone())
                .or_default()
                .insert(key.to_owned(), line.to_owned());
        }
    }
    sections
}

/// The first table of `value` when it is an array of tables.
fn table_array(value: &serde_json::Value) -> Option<&serde_json::Map<String, serde_json::Value>> {
    value.as_array()?.first()?.as_object()
}

/// Every (section, key) of a serialised config: tables are sections, arrays of tables are
/// `[name]` sections (`[table.name]` inside a table), everything else is a top-level key.
fn code_sections(config: serde_json::Value) -> BTreeMap<String, BTreeSet<String>> {
    let mut sections: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (name, value) in config.as_object().unwrap() {
        let (section, fields) = match (value, table_array(value)) {
            (serde_json::Value::Object(fields), _) => (name.clone(), fields),
            (_, Some(item)) => (format!("[{name}]"), item),
            _ => {
                sections
                    .entry(TOP_LEVEL.to_owned())
                    .or_default()
                    .insert(name.clone());
                continue;
            }
        };
        for (key, field) in fields {
            match table_array(field) {
                Some(item) if !section.starts_with('[') => {
                    sections
                        .entry(format!("[{section}.{key}]"))
                        .or_default()
                        .extend(item.keys().cloned());
                }
                _ => {
                    sections
                        .entry(section.clone())
                        .or_default()
                        .insert(key.clone());
                }
            }
        }
    }
    sections
}

/// Compares one program's documented keys with its code; returns the problems.
fn compare(
    program: &str,
    env_prefix: &str,
    documented: &Documented,
    config: serde_json::Value,
) -> Vec<String> {
    let code = code_sections(config);
    let mut problems = Vec::new();
    for (section, keys) in &code {
        let shown = if section.is_empty() {
            "top level"
        } else {
            section
        };
        let Some(rows) = documented.get(section) else {
            problems.push(format!(
                "{program}: section {shown} has no table in docs/configuration.md"
            ));
            continue;
        };
        for key in keys {
            let Some(row) = rows.get(key) else {
                problems.push(format!("{program}: {shown}.{key} is not documented"));
                continue;
            };
            if section.starts_with('[') {
                continue; // arrays of tables cannot be set from the environment
            }
            let variable = if section.is_empty() {
                format!("{env_prefix}__{}", key.to_uppercase())
            } else {
                format!(
                    "{env_prefix}__{}__{}",
                    section.to_uppercase(),
                    key.to_uppercase()
                )
            };
            if !row.contains(&variable) {
                problems.push(format!(
                    "{program}: {shown}.{key}: the row does not name {variable}"
                ));
            }
        }
    }
    for (section, rows) in documented {
        for key in rows.keys() {
            if !code.get(section).is_some_and(|keys| keys.contains(key)) {
                problems.push(format!(
                    "{program}: docs/configuration.md documents {section}.{key}, which the code does not have"
                ));
            }
        }
    }
    if code.len() < 4 {
        problems.push(format!(
            "{program}: the walk found too few sections: {code:?}"
        ));
    }
    problems
}

#[test]
fn every_config_field_of_both_programs_is_documented_with_its_environment_variable() {
    let markdown = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/configuration.md"
    ))
    .unwrap();
    let (cache_node_part, peer_client_part) = markdown
        .split_once("\n# peer-client")
        .expect("docs/configuration.md has a `# peer-client` part after cache-node's");

    let mut cache_node_config = cache_node::config::Config {
        origin: vec![cache_node::config::OriginConfig::default()],
        content_set: vec![cache_node::config::ContentSetConfig::default()],
        ..cache_node::config::Config::default()
    };
    cache_node_config.storage.extra_drives = vec![cache_node::config::DriveConfig::default()];
    cache_node_config.prefill.schedule = vec![cache_node::schedule::ScheduleConfig::default()];
    let mut problems = compare(
        "cache-node",
        "CACHE_NODE",
        &documented_sections(cache_node_part),
        serde_json::to_value(&cache_node_config).unwrap(),
    );
    problems.extend(compare(
        "peer-client",
        "PEER_CLIENT",
        &documented_sections(peer_client_part),
        serde_json::to_value(peer_client::config::Config::default()).unwrap(),
    ));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
