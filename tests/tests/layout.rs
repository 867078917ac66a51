//! The layering rule of ARCHITECTURE.md, checked: in every crate of the workspace, no two sibling modules depend on
//! each other, directly or through other siblings (no import cycles).
//!
//! How it reads the code (text only, no compiler): each `.rs` file under a crate's `src/` is a module (`a/mod.rs`
//! and `a.rs` are `a`; `lib.rs`, `main.rs` and `bin/*` are crate roots, left out). A module depends on every module
//! that a path in its code names: `crate::x::y` anywhere in a line (a `use` or an inline path), and `super::x` from a
//! child. Test code is left out: files named `tests.rs` or `testing.rs` (test fixtures, declared `#[cfg(test)]`) or
//! under a `tests/` folder, and the item that follows a `#[cfg(test)]` line. For each parent module, an edge between
//! two of its children exists when anything under one names anything under the other; a cycle among them is a
//! strongly connected component of more than one child. Re-exports through a crate root (`crate::Item` for an item a
//! root re-exports) are not followed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const CRATES: &[&str] = &["proto", "policy", "control-plane", "data-plane", "tests"];

/// A module path from the crate root: `["proxy", "inbound"]`.
type ModPath = Vec<String>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> =
        std::fs::read_dir(dir).expect("read src dir").map(|e| e.expect("dir entry").path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module a file defines, or `None` for crate roots and test-only files.
fn module_of(src: &Path, file: &Path) -> Option<ModPath> {
    let rel = file.strip_prefix(src).expect("file under src");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if parts.first().is_some_and(|p| p == "bin") || parts.iter().any(|p| p == "tests") {
        return None;
    }
    let last = parts.pop().expect("a file name");
    match last.as_str() {
        "lib.rs" | "main.rs" if parts.is_empty() => return None,
        "tests.rs" | "testing.rs" => return None,
        "mod.rs" => {}
        other => parts.push(other.trim_end_matches(".rs").to_owned()),
    }
    Some(parts)
}

/// The code of a file without its test items and without comments. The item after a `#[cfg(test)]` line is left
/// out up to the `;` that ends it or the `}` that closes its first `{` (brace counting on code lines; braces inside
/// strings or char literals would confuse it, and none of this workspace's test items start with such a line).
fn production_code(text: &str) -> String {
    let mut out = String::new();
    // Inside a test item: the brace depth so far and whether its body has opened.
    let mut skipping: Option<(i32, bool)> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("//") {
            continue;
        }
        if let Some((depth, opened)) = skipping.as_mut() {
            for c in trimmed.chars() {
                match c {
                    '{' => {
                        *depth += 1;
                        *opened = true;
                    }
                    '}' => *depth -= 1,
                    _ => {}
                }
            }
            let ends_without_body = !*opened && trimmed.ends_with(';');
            if ends_without_body || (*opened && *depth <= 0) {
                skipping = None;
            }
            continue;
        }
        if trimmed.starts_with("#[cfg(test)]") {
            skipping = Some((0, false));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The module paths a file's code names, resolved against the file's own module.
fn references(code: &str, own: &ModPath) -> Vec<ModPath> {
    let mut found = Vec::new();
    for (prefix, base) in [("crate::", Vec::new()), ("super::", own[..own.len().saturating_sub(1)].to_vec())] {
        let mut rest = code;
        while let Some(at) = rest.find(prefix) {
            let before = rest[..at].chars().next_back();
            let after = &rest[at + prefix.len()..];
            rest = after;
            if before.is_some_and(|c| is_ident(c) || c == ':') {
                continue; // `foo::crate::` or `super::super::`: not a path start we resolve
            }
            // `crate::a::b::{c, d}` and `crate::{a, b}`: the first segment, or each first segment of a group.
            let segments: Vec<String> = if let Some(group) = after.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                group[..end]
                    .split(',')
                    .filter_map(|part| {
                        let name: String = part.trim().chars().take_while(|c| is_ident(*c)).collect();
                        (!name.is_empty()).then_some(name)
                    })
                    .collect()
            } else {
                let name: String = after.chars().take_while(|c| is_ident(*c)).collect();
                if name.is_empty() { Vec::new() } else { vec![name] }
            };
            for segment in segments {
                let mut target = base.clone();
                target.push(segment.clone());
                // Deeper segments matter for nested parents: `crate::proxy::inbound::X` from `proxy::outbound`.
                let mut tail = after[segment.len()..].to_owned();
                while let Some(next) = tail.strip_prefix("::") {
                    let name: String = next.chars().take_while(|c| is_ident(*c)).collect();
                    if name.is_empty() {
                        break;
                    }
                    tail = next[name.len()..].to_owned();
                    target.push(name);
                }
                found.push(target);
            }
        }
    }
    found
}

/// Cycles among the children of each parent module: `(parent, [children in one cycle])`.
fn sibling_cycles(modules: &BTreeMap<ModPath, Vec<ModPath>>) -> Vec<(ModPath, Vec<String>)> {
    let known: BTreeSet<&ModPath> = modules.keys().collect();
    // Every prefix of a known module is a module too (a folder without mod.rs is not used here, but be safe).
    let is_module = |p: &[String]| known.iter().any(|k| k.starts_with(p));
    let mut edges: BTreeMap<ModPath, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (from, targets) in modules {
        for target in targets {
            // The longest prefix of `target` that is a module: `crate::a::Item` names module `a`.
            let mut to = target.clone();
            while !to.is_empty() && !is_module(&to) {
                to.pop();
            }
            // Find the common parent and the two children under it.
            let common = from.iter().zip(to.iter()).take_while(|(a, b)| a == b).count();
            if common >= from.len() || common >= to.len() {
                continue; // one contains the other: a parent naming its child or a child naming its parent
            }
            let parent = from[..common].to_vec();
            edges.entry(parent).or_default().entry(from[common].clone()).or_default().insert(to[common].clone());
        }
    }
    let mut cycles = Vec::new();
    for (parent, graph) in edges {
        for component in strongly_connected(&graph) {
            if component.len() > 1 {
                cycles.push((parent.clone(), component));
            }
        }
    }
    cycles
}

/// Tarjan's algorithm over a small graph of names.
fn strongly_connected(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct Walk<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, node: &'a str) {
            self.index.insert(node, self.next);
            self.low.insert(node, self.next);
            self.next += 1;
            self.stack.push(node);
            self.on_stack.insert(node);
            if let Some(targets) = self.graph.get(node) {
                for target in targets {
                    let target = target.as_str();
                    if !self.index.contains_key(target) {
                        self.visit(target);
                        let low = self.low[node].min(self.low[target]);
                        self.low.insert(node, low);
                    } else if self.on_stack.contains(target) {
                        let low = self.low[node].min(self.index[target]);
                        self.low.insert(node, low);
                    }
                }
            }
            if self.low[node] == self.index[node] {
                let mut component = Vec::new();
                while let Some(top) = self.stack.pop() {
                    self.on_stack.remove(top);
                    component.push(top.to_owned());
                    if top == node {
                        break;
                    }
                }
                component.sort();
                self.out.push(component);
            }
        }
    }
    let mut walk = Walk {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for node in graph.keys() {
        if !walk.index.contains_key(node.as_str()) {
            walk.visit(node);
        }
    }
    walk.out
}

fn crate_modules(src: &Path) -> BTreeMap<ModPath, Vec<ModPath>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut modules: BTreeMap<ModPath, Vec<ModPath>> = BTreeMap::new();
    for file in files {
        let Some(module) = module_of(src, &file) else { continue };
        let text = std::fs::read_to_string(&file).expect("read source");
        let refs = references(&production_code(&text), &module);
        modules.entry(module).or_default().extend(refs);
    }
    modules
}

#[test]
fn no_import_cycles_between_sibling_modules() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
    let mut report = Vec::new();
    for name in CRATES {
        let src = root.join(name).join("src");
        for (parent, cycle) in sibling_cycles(&crate_modules(&src)) {
            let parent = if parent.is_empty() { "crate".to_owned() } else { format!("crate::{}", parent.join("::")) };
            report.push(format!("{name}: under {parent}: {}", cycle.join(" <-> ")));
        }
    }
    assert!(report.is_empty(), "sibling modules that import each other:\n{}", report.join("\n"));
}

/// The checker itself finds a cycle, through `use` lines, inline paths, groups and `super::`, and ignores tests.
#[test]
fn the_checker_finds_cycles_and_ignores_test_code() {
    let module = |p: &str| p.split("::").map(str::to_owned).collect::<ModPath>();
    let mut modules = BTreeMap::new();
    modules.insert(module("a"), references("use crate::{b, c::Thing};\n", &module("a")));
    modules.insert(module("b"), references("fn f() { crate::a::go() }\n", &module("b")));
    // `c` names `a` only in test items (left out) and `d` after them (kept): `c <-> d`, not `a <-> c`.
    let c = "#[cfg(test)]\nmod testing;\nfn g() {}\n#[cfg(test)]\nmod tests {\n    use crate::a;\n}\nfn h() { crate::d::x() }\n";
    modules.insert(module("c"), references(&production_code(c), &module("c")));
    modules.insert(module("d"), references("use crate::c;\n", &module("d")));
    modules.insert(module("p::x"), references("use super::y::Y;\n", &module("p::x")));
    modules.insert(module("p::y"), references("use crate::p::x::X;\n", &module("p::y")));
    modules.insert(module("p"), Vec::new());
    let mut cycles = sibling_cycles(&modules);
    cycles.sort();
    let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        cycles,
        vec![(Vec::new(), names(&["a", "b"])), (Vec::new(), names(&["c", "d"])), (module("p"), names(&["x", "y"]))]
    );
}
