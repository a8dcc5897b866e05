//! The shape of both programs, checked: every module belongs to a layer, and a module never
//! refers to a module in a layer above its own (`use crate::...` lines, paths in code and
//! intra-doc links alike, since a link up is a dependency a reader follows up). Modules of one
//! layer may refer to each other, but no set of modules may refer to each other in a circle.
//!
//! The layer tables below are the ones `docs/architecture.md` describes; a new top-level module
//! must be added to a table before it can be used. Test modules (`#[cfg(test)] mod tests` at the
//! end of a file) are not part of the shape and are skipped. Modelled on rust-analyzer's tidy
//! tests, which read the source the same way.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// cache-node's layers, bottom to top: top-level modules of `cache-node/src`.
const CACHE_NODE_LAYERS: &[(&str, &[&str])] = &[
    ("foundation", &["error", "stats", "history", "schedule"]),
    ("http, disk and tls", &["http", "disk", "tls"]),
    ("cache", &["cache"]),
    ("upstream", &["upstream"]),
    ("peering", &["peering"]),
    ("node", &["node"]),
    ("fill", &["fill"]),
    ("serve", &["serve"]),
    ("api", &["api"]),
    ("config", &["config"]),
    ("server", &["server"]),
    ("cli", &["cli"]),
];

/// peer-client's layers, bottom to top: top-level modules of `peer-client/src`.
const PEER_CLIENT_LAYERS: &[(&str, &[&str])] = &[
    ("foundation", &["error", "config"]),
    ("content", &["content"]),
    ("net", &["net"]),
    ("sources", &["sources"]),
    ("download", &["download"]),
    ("daemon", &["daemon"]),
];

/// A module's path inside its crate, e.g. `["cache", "index"]`; empty for `lib.rs`/`main.rs`.
type ModulePath = Vec<String>;

/// Every module file of a crate's `src`, by module path.
fn module_files(src: &Path) -> BTreeMap<ModulePath, PathBuf> {
    let mut modules = BTreeMap::new();
    let mut folders = vec![src.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                folders.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let relative = path.strip_prefix(src).unwrap().with_extension("");
            let mut parts: Vec<String> = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts.last().map(String::as_str) == Some("mod") {
                parts.pop();
            }
            if parts == ["lib"] || parts == ["main"] {
                parts.clear();
            }
            modules.insert(parts, path);
        }
    }
    modules
}

/// The source of a module without its trailing test module.
fn without_tests(text: &str) -> &str {
    let mut cut = text.len();
    for marker in [
        "#[cfg(test)]\nmod tests",
        "#[cfg(test)]\npub(crate) mod tests",
    ] {
        if let Some(at) = text.find(marker) {
            cut = cut.min(at);
        }
    }
    &text[..cut]
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Reads the `::`-separated lower-case identifiers at the start of `text`, and whether they end
/// in `::{`, a group.
fn path_at(text: &str) -> (Vec<String>, Option<&str>) {
    let mut segments = Vec::new();
    let mut rest = text;
    loop {
        let end = rest.find(|c: char| !is_ident(c)).unwrap_or(rest.len());
        let ident = &rest[..end];
        if ident.is_empty() || !ident.starts_with(|c: char| c.is_ascii_lowercase() || c == '_') {
            return (segments, None);
        }
        segments.push(ident.to_string());
        match rest[end..].strip_prefix("::") {
            Some(group) if group.starts_with('{') => return (segments, Some(&group[1..])),
            Some(after) => rest = after,
            None => return (segments, None),
        }
    }
}

/// The module paths a source text refers to with `crate::...`, including the items of
/// `crate::{a, b::c}` and `crate::a::{b, c}` groups (one level deep).
fn crate_paths(text: &str) -> Vec<Vec<String>> {
    paths_after(text, "crate::", &[])
}

/// The crate-relative module paths the `super::` paths of module `module` refer to.
fn super_paths(text: &str, module: &[String]) -> Vec<Vec<String>> {
    (1..=module.len())
        .flat_map(|depth| {
            let base = &module[..module.len() - depth];
            paths_after(text, &"super::".repeat(depth), base)
        })
        .collect()
}

/// The paths written after each `marker` (`crate::`, `super::`...), prefixed with `base`.
fn paths_after(text: &str, marker: &str, base: &[String]) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    for (at, _) in text.match_indices(marker) {
        if at > 0 && (text[..at].ends_with(is_ident) || text[..at].ends_with("::")) {
            continue; // e.g. `outpost_crate::`, or the tail of a longer `super::super::` chain
        }
        let rest = &text[at + marker.len()..];
        if rest.starts_with("super::") {
            continue; // a longer chain, read with its own marker
        }
        let (prefix, group) = match rest.strip_prefix('{') {
            Some(group) => (Vec::new(), Some(group)),
            None => path_at(rest),
        };
        let prefix: Vec<String> = base.iter().cloned().chain(prefix).collect();
        let Some(group) = group else {
            if prefix.len() > base.len() {
                paths.push(prefix);
            }
            continue;
        };
        let inner = &group[..group.find('}').unwrap_or(group.len())];
        for item in inner.split(',') {
            let (tail, _) = path_at(item.trim());
            let mut path = prefix.clone();
            if tail.is_empty() || tail == ["self"] {
                if path.len() <= base.len() {
                    continue;
                }
            } else {
                path.extend(tail);
            }
            paths.push(path);
        }
    }
    paths
}

/// `path` resolved to the longest module it names.
fn resolve(modules: &BTreeMap<ModulePath, PathBuf>, path: &[String]) -> Option<ModulePath> {
    (1..=path.len())
        .rev()
        .map(|length| path[..length].to_vec())
        .find(|candidate| modules.contains_key(candidate))
}

/// The strongly connected sets of more than one module (Tarjan's algorithm).
fn cycles(edges: &BTreeMap<ModulePath, BTreeSet<ModulePath>>) -> Vec<Vec<ModulePath>> {
    struct Walk<'a> {
        edges: &'a BTreeMap<ModulePath, BTreeSet<ModulePath>>,
        next: usize,
        index: BTreeMap<ModulePath, usize>,
        low: BTreeMap<ModulePath, usize>,
        stack: Vec<ModulePath>,
        found: Vec<Vec<ModulePath>>,
    }
    impl Walk<'_> {
        fn visit(&mut self, module: &ModulePath) {
            self.index.insert(module.clone(), self.next);
            self.low.insert(module.clone(), self.next);
            self.next += 1;
            self.stack.push(module.clone());
            for target in self.edges.get(module).into_iter().flatten() {
                if !self.index.contains_key(target) {
                    self.visit(target);
                    let low = self.low[module].min(self.low[target]);
                    self.low.insert(module.clone(), low);
                } else if self.stack.contains(target) {
                    let low = self.low[module].min(self.index[target]);
                    self.low.insert(module.clone(), low);
                }
            }
            if self.low[module] == self.index[module] {
                let mut component = Vec::new();
                loop {
                    let member = self.stack.pop().unwrap();
                    let done = &member == module;
                    component.push(member);
                    if done {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.found.push(component);
                }
            }
        }
    }
    let mut walk = Walk {
        edges,
        next: 0,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        found: Vec::new(),
    };
    for module in edges.keys() {
        if !walk.index.contains_key(module) {
            walk.visit(module);
        }
    }
    walk.found
}

fn show(module: &[String]) -> String {
    if module.is_empty() {
        "crate root".to_string()
    } else {
        module.join("::")
    }
}

/// Checks one crate; returns the problems found and prints its shape.
fn check_crate(name: &str, src: &Path, layers: &[(&str, &[&str])]) -> Vec<String> {
    let modules = module_files(src);
    let layer_of = |module: &ModulePath| -> Option<usize> {
        let top = module.first()?;
        layers
            .iter()
            .position(|(_, members)| members.contains(&top.as_str()))
    };
    let mut problems = Vec::new();
    let mut edges: BTreeMap<ModulePath, BTreeSet<ModulePath>> = BTreeMap::new();
    for (module, file) in &modules {
        if !module.is_empty() && layer_of(module).is_none() {
            problems.push(format!(
                "{name}: module `{}` is in no layer; add it to a layer table in tests/layering.rs \
                 and to docs/architecture.md",
                show(module)
            ));
        }
        let text = std::fs::read_to_string(file).unwrap();
        let source = without_tests(&text);
        let mut referred = crate_paths(source);
        referred.extend(super_paths(source, module));
        for path in referred {
            let Some(target) = resolve(&modules, &path) else {
                continue;
            };
            if &target == module || target.is_empty() {
                continue;
            }
            edges
                .entry(module.clone())
                .or_default()
                .insert(target.clone());
            if let (Some(from), Some(to)) = (layer_of(module), layer_of(&target)) {
                if to > from {
                    problems.push(format!(
                        "{name}: `{}` (layer {}) refers to `crate::{}` in layer {}, above it",
                        show(module),
                        layers[from].0,
                        path.join("::"),
                        layers[to].0
                    ));
                }
            }
        }
    }
    for cycle in cycles(&edges) {
        let members: Vec<String> = cycle.iter().map(|m| show(m)).collect();
        problems.push(format!(
            "{name}: modules refer to each other in a circle: {}",
            members.join(", ")
        ));
    }
    let edge_count: usize = edges.values().map(BTreeSet::len).sum();
    println!(
        "{name}: {} modules, {edge_count} references between modules, {} layers:",
        modules.len(),
        layers.len()
    );
    for (position, (layer, members)) in layers.iter().enumerate() {
        let files = modules
            .keys()
            .filter(|module| layer_of(module) == Some(position))
            .count();
        println!(
            "  {position:>2} {layer:<32} {:<40} {files} files",
            members.join(", ")
        );
    }
    problems
}

#[test]
fn modules_refer_only_to_their_own_layer_or_below_and_never_in_a_circle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut problems = check_crate(
        "cache-node",
        &root.join("cache-node/src"),
        CACHE_NODE_LAYERS,
    );
    problems.extend(check_crate(
        "peer-client",
        &root.join("peer-client/src"),
        PEER_CLIENT_LAYERS,
    ));
    for problem in &problems {
        println!("{problem}");
    }
    assert!(
        problems.is_empty(),
        "{} layering problems (listed above)",
        problems.len()
    );
    println!("no upward references, no circles");
}

#[test]
fn the_reader_finds_grouped_and_nested_paths_and_skips_tests() {
    let text = "use crate::cache::{index, key};\nuse crate::{fill, serve::Body};\n\
                //! see [`crate::node::Node`]\nfn f() { crate::http::range::parse(); }\n\
                #[cfg(test)]\nmod tests { use crate::server; }\n";
    let found: Vec<String> = crate_paths(without_tests(text))
        .iter()
        .map(|p| p.join("::"))
        .collect();
    assert_eq!(
        found,
        [
            "cache::index",
            "cache::key",
            "fill",
            "serve",
            "node",
            "http::range::parse"
        ]
    );
    let module = vec!["download".to_string(), "dispatch".to_string()];
    let found: Vec<String> = super_paths(
        "use super::{Engine, scheduler::Plan};\nuse super::super::net::http;",
        &module,
    )
    .iter()
    .map(|p| p.join("::"))
    .collect();
    assert_eq!(found, ["download::scheduler", "net::http"]);
    let mut edges = BTreeMap::new();
    let a = vec!["a".to_string()];
    let b = vec!["b".to_string()];
    edges.insert(a.clone(), BTreeSet::from([b.clone()]));
    edges.insert(b.clone(), BTreeSet::from([a.clone()]));
    assert_eq!(cycles(&edges), vec![vec![a, b]]);
}
