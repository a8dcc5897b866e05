//! The configuration reference cannot drift from the code: every field of cache-node's config
//! structs must appear in `docs/configuration.md` under its own section's heading, with its
//! environment variable (except in `[[origin]]`, which the environment cannot set), and every key
//! the reference documents must exist in the code. The fields are read from the serialised
//! default config, so a new field is checked without editing this test.

use std::collections::BTreeMap;

use cache_node::config::{Config, OriginConfig};

/// The reference's tables, by section heading (`server`, `[origin]`, ...): key → table row.
fn documented_sections(markdown: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut sections = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        if let Some(heading) = line.strip_prefix("## `[") {
            // "## `[server]`: ..." → "server"; "## `[[origin]]`: ..." → "[origin]".
            current = heading.split("]`").next().map(str::to_owned);
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
                .or_insert_with(BTreeMap::new)
                .insert(key.to_owned(), line.to_owned());
        }
    }
    sections
}

/// Every (section, key) of the config structs, from their serialised defaults.
fn code_sections() -> BTreeMap<String, Vec<String>> {
    let config = Config {
        origin: vec![OriginConfig::default()],
        ..Config::default()
    };
    let value = serde_json::to_value(&config).unwrap();
    let mut sections = BTreeMap::new();
    for (section, fields) in value.as_object().unwrap() {
        let (name, fields) = match fields {
            serde_json::Value::Array(tables) => (format!("[{section}]"), &tables[0]),
            table => (section.clone(), table),
        };
        let keys = fields.as_object().unwrap().keys().cloned().collect();
        sections.insert(name, keys);
    }
    sections
}

#[test]
fn every_config_field_is_documented_with_its_environment_variable() {
    let markdown = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/configuration.md"
    ))
    .unwrap();
    // cache-node's part of the reference: everything before peer-client's part, if any.
    let cache_node_part = markdown.split("\n# peer-client").next().unwrap();
    let documented = documented_sections(cache_node_part);
    let code = code_sections();
    let mut problems = Vec::new();
    for (section, keys) in &code {
        let Some(rows) = documented.get(section) else {
            problems.push(format!(
                "section [{section}] has no table in docs/configuration.md"
            ));
            continue;
        };
        for key in keys {
            match rows.get(key) {
                None => problems.push(format!("{section}.{key} is not documented")),
                Some(row) if !section.starts_with('[') => {
                    let variable = format!(
                        "CACHE_NODE__{}__{}",
                        section.to_uppercase(),
                        key.to_uppercase()
                    );
                    if !row.contains(&variable) {
                        problems.push(format!("{section}.{key}: the row does not name {variable}"));
                    }
                }
                Some(_) => {}
            }
        }
        for key in rows.keys() {
            if !keys.contains(key) {
                problems.push(format!(
                    "docs/configuration.md documents {section}.{key}, which the code does not have"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(code.len() >= 6, "the walk found the sections: {code:?}");
}
