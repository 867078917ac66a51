//! Text → documents → resources. Each document is parsed independently so one broken document does not hide
//! the problems of the others, and errors carry the document index and a field path.

use std::collections::HashMap;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::authz::AuthorizationPolicy;
use crate::error::{DocumentError, Errors, Failure, FieldError, ParseError, prefixed};
use crate::kind::{Kind, ResourceKey};
use crate::limits;
use crate::metadata::{DEFAULT_NAMESPACE, Metadata};
use crate::peer_authn::PeerAuthentication;
use crate::request_authn::RequestAuthentication;
use crate::resource::{API_VERSIONS, Resource, Spec};
use crate::strict::StrictValue;
use crate::validate;

const TOP_LEVEL_FIELDS: [&str; 5] = ["apiVersion", "kind", "metadata", "spec", "status"];

/// Parses a multi-document YAML (or JSON) text ("---" separated; empty documents skipped). All-or-nothing: if any
/// document is invalid, returns Err listing EVERY invalid document. Duplicate keys (same kind/ns/name twice in one
/// text) are an error.
///
/// A Kubernetes `kind: List` document (what `kubectl get -o yaml` prints for several objects) is expanded into its
/// `items`; errors in an item are reported with an `items[N].` field prefix.
pub fn parse_documents(text: &str) -> Result<Vec<Resource>, ParseError> {
    let mut resources = Vec::new();
    let mut errors = Vec::new();
    let mut seen: HashMap<ResourceKey, usize> = HashMap::new();
    for_each_object(text, &mut errors, |document, prefix, value, errors| match parse_object(value) {
        Ok(resource) => {
            let key = resource.key();
            if let Some(first) = seen.get(&key) {
                errors.push(DocumentError {
                    document,
                    kind: Some(key.kind.to_string()),
                    name: Some(key.name.clone()),
                    namespace: Some(key.namespace.clone()),
                    field: prefixed(prefix, "metadata.name"),
                    reason: format!("duplicate resource {key}: already defined in document {}", first + 1),
                });
            } else {
                seen.insert(key, document);
                resources.push(resource);
            }
        }
        Err(failure) => errors.extend(failure.into_document_errors(document, prefix)),
    });
    if errors.is_empty() { Ok(resources) } else { Err(ParseError { errors }) }
}

/// For delete -f: only apiVersion/kind/metadata.name/metadata.namespace are read (spec not validated).
///
/// All-or-nothing like [`parse_documents`]; a key listed twice is returned once (deleting twice is harmless).
pub fn parse_keys(text: &str) -> Result<Vec<ResourceKey>, ParseError> {
    let mut keys: Vec<ResourceKey> = Vec::new();
    let mut errors = Vec::new();
    for_each_object(text, &mut errors, |document, prefix, value, errors| match key_from_object(&value) {
        Ok(key) => {
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        Err(failure) => errors.extend(failure.into_document_errors(document, prefix)),
    });
    if errors.is_empty() { Ok(keys) } else { Err(ParseError { errors }) }
}

impl Resource {
    /// Parses and validates one JSON document.
    pub fn from_json(s: &str) -> Result<Resource, ParseError> {
        let value: Value =
            serde_json::from_str(s).map_err(|e| ParseError::single(0, "", format!("invalid JSON: {e}")))?;
        resource_from_value(value, 0)
    }
}

impl<'de> Deserialize<'de> for Resource {
    /// Goes through the same parse + validate path as [`Resource::from_json`], so a deserialized `Resource` is
    /// always valid.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Via a YAML value so that non-string mapping keys (YAML `portLevelMtls: {8080: ...}`) survive any format.
        let value = serde_yaml_ng::Value::deserialize(d)?;
        let value = yaml_to_json(value).map_err(serde::de::Error::custom)?;
        resource_from_value(value, 0).map_err(serde::de::Error::custom)
    }
}

/// Parses and validates one already-decoded document (used by `from_json` and `Deserialize`).
fn resource_from_value(value: Value, document: usize) -> Result<Resource, ParseError> {
    parse_object(value).map_err(|failure| ParseError { errors: failure.into_document_errors(document, "") })
}

// ---------------------------------------------------------------------------------------------------------------
// Splitting and decoding

/// One YAML document of the input text.
struct RawDocument {
    index: usize,
    /// 0-based line of the input where the document's text starts (for error line numbers).
    first_line: usize,
    text: String,
}

/// Text after a `---` document marker, if `line` is one.
fn marker_rest(line: &str) -> Option<&str> {
    let rest = line.strip_prefix("---")?;
    (rest.is_empty() || rest.starts_with([' ', '\t'])).then_some(rest)
}

fn is_document_end(line: &str) -> bool {
    line.strip_prefix("...").is_some_and(|rest| rest.trim().is_empty() || rest.trim_start().starts_with('#'))
}

/// Whether a chunk holds anything but blank lines, comments and directives.
fn has_content(text: &str) -> bool {
    text.lines().map(str::trim).any(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('%'))
}

/// Splits at `---` lines (YAML forbids that marker inside content at column 0, so this is exact). Numbering
/// follows YAML: text before the first marker is a document only if it has content; every marker starts one.
fn split_documents(text: &str) -> Vec<RawDocument> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut first_line = 0;
    let mut explicit = false;
    let mut flush = |current: &mut String, first_line: usize, explicit: bool| {
        if explicit || has_content(current) {
            docs.push(RawDocument { index: docs.len(), first_line, text: std::mem::take(current) });
        }
        current.clear();
    };
    let line_count = text.split('\n').count();
    for (n, line) in text.split('\n').enumerate() {
        if n + 1 == line_count && line.is_empty() {
            break;
        }
        let line = line.strip_suffix('\r').unwrap_or(line);
        if let Some(rest) = marker_rest(line) {
            flush(&mut current, first_line, explicit);
            current.push_str(rest);
            current.push('\n');
            first_line = n;
            explicit = true;
        } else if !is_document_end(line) {
            current.push_str(line);
            current.push('\n');
        }
    }
    flush(&mut current, first_line, explicit);
    docs
}

/// Decodes one document; `Ok(None)` for an empty document.
fn decode(doc: &RawDocument) -> Result<Option<Value>, String> {
    if !has_content(&doc.text) {
        return Ok(None);
    }
    // Bounded before any parser runs: their cost grows faster than the nesting.
    limits::check_nesting(&doc.text, limits::MAX_NESTING).map_err(|e| match e {
        limits::LimitError::TooDeep { max, line } => {
            limits::LimitError::TooDeep { max, line: line + doc.first_line }.to_string()
        }
        other => other.to_string(),
    })?;
    // One leading newline, so that no position is line 1 column 1 (which libyaml prints as "position 0"); the
    // line numbers of messages are then shifted to refer to the whole input. (Padding with every preceding line
    // instead would make a text of many documents cost quadratic time.)
    let padded = format!("\n{}", doc.text);
    let json = if doc.text.trim_start().starts_with('{') { serde_json::from_str::<Value>(&padded).ok() } else { None };
    if let Some(v) = json {
        return Ok(Some(v));
    }
    let invalid = |e: serde_yaml_ng::Error| format!("invalid YAML: {}", shift_lines(&e.to_string(), doc.first_line));
    let mut yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&padded).map_err(invalid)?;
    // `<<: *anchor` merge keys, as Kubernetes' YAML reader supports them.
    yaml.apply_merge().map_err(invalid)?;
    match yaml_to_json(yaml)? {
        Value::Null => Ok(None),
        v => Ok(Some(v)),
    }
}

/// `message` with every "line N column" position moved down by `by - 1` lines (the parsed text had one padding
/// line; the document starts at 0-based line `by` of the input).
fn shift_lines(message: &str, by: usize) -> String {
    const LINE: &str = "line ";
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(LINE) {
        let (before, after) = rest.split_at(at + LINE.len());
        out.push_str(before);
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        match after[..digits].parse::<usize>() {
            Ok(n) if after[digits..].starts_with(" column ") => out.push_str(&(n + by).saturating_sub(1).to_string()),
            _ => out.push_str(&after[..digits]),
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
}

fn yaml_to_json(v: serde_yaml_ng::Value) -> Result<Value, String> {
    use serde_yaml_ng::Value as Y;
    Ok(match v {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(b),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                serde_json::Number::from_f64(f).map(Value::Number).ok_or(format!("unsupported number {n}"))?
            }
        }
        Y::String(s) => Value::String(s),
        Y::Sequence(seq) => Value::Array(seq.into_iter().map(yaml_to_json).collect::<Result<_, _>>()?),
        Y::Mapping(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                let key = match k {
                    Y::String(s) => s,
                    // Integer keys are legitimate (portLevelMtls: {8080: ...}); JSON needs them as strings.
                    Y::Number(n) => n.to_string(),
                    Y::Bool(b) => b.to_string(),
                    other => return Err(format!("unsupported mapping key {other:?}: keys must be strings")),
                };
                out.insert(key, yaml_to_json(v)?);
            }
            Value::Object(out)
        }
        Y::Tagged(t) => return Err(format!("YAML tags are not supported (found {})", t.tag)),
    })
}

/// Calls `f(document, field_prefix, object, errors)` for every object in the text, expanding `kind: List`.
fn for_each_object(
    text: &str,
    errors: &mut Vec<DocumentError>,
    mut f: impl FnMut(usize, &str, Value, &mut Vec<DocumentError>),
) {
    let documents = split_documents(text);
    // Bounded before anything is parsed: documents with content, then the items of `kind: List`s as they appear.
    let max = limits::MAX_RESOURCES;
    let with_content: Vec<&RawDocument> = documents.iter().filter(|d| has_content(&d.text)).collect();
    if let Some(over) = with_content.get(max) {
        errors.push(limit_error(over.index, None, limits::LimitError::TooManyResources { max }));
        return;
    }
    // What `kind: List` items may add beyond one resource per document.
    let mut spare = max - with_content.len();
    for doc in documents {
        let value = match decode(&doc) {
            Ok(Some(v)) => v,
            Ok(None) => continue,
            Err(reason) => {
                errors.push(DocumentError {
                    document: doc.index,
                    kind: None,
                    name: None,
                    namespace: None,
                    field: String::new(),
                    reason,
                });
                continue;
            }
        };
        if value.get("kind").and_then(Value::as_str) == Some("List") && value.get("items").is_some() {
            match value.get("items") {
                Some(Value::Array(items)) => {
                    let extra = items.len().saturating_sub(1);
                    if extra > spare {
                        errors.push(limit_error(
                            doc.index,
                            Some("items"),
                            limits::LimitError::TooManyResources { max },
                        ));
                        return;
                    }
                    spare -= extra;
                    for (i, item) in items.iter().enumerate() {
                        f(doc.index, &format!("items[{i}]"), item.clone(), errors);
                    }
                }
                _ => errors.push(DocumentError {
                    document: doc.index,
                    kind: Some("List".to_string()),
                    name: None,
                    namespace: None,
                    field: "items".to_string(),
                    reason: "must be a list of objects".to_string(),
                }),
            }
        } else {
            f(doc.index, "", value, errors);
        }
    }
}

fn limit_error(document: usize, field: Option<&str>, error: limits::LimitError) -> DocumentError {
    DocumentError {
        document,
        kind: field.map(|_| "List".to_string()),
        name: None,
        namespace: None,
        field: field.unwrap_or_default().to_string(),
        reason: error.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// One object

/// The identity (kind, name, namespace) that can be read from an object, for its errors.
fn failure_from_object(obj: &Map<String, Value>, errors: Vec<FieldError>) -> Failure {
    let meta = obj.get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str).filter(|n| !n.is_empty());
    let namespace = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .unwrap_or(DEFAULT_NAMESPACE);
    Failure {
        kind: obj.get("kind").and_then(Value::as_str).map(String::from),
        name: name.map(String::from),
        namespace: name.map(|_| namespace.to_string()),
        errors,
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// Kubernetes treats `field: null` as unset; doing the same keeps `null` from tripping typed deserialization.
fn strip_nulls(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(strip_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// Typed deserialization with the failing field's path (unknown field, wrong type, bad enum value).
fn deserialize_at<T: DeserializeOwned>(prefix: &str, value: Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(StrictValue(value)).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            prefix.to_string()
        } else if path.starts_with('[') {
            format!("{prefix}{path}")
        } else {
            format!("{prefix}.{path}")
        };
        FieldError { field, reason: e.into_inner().to_string() }
    })
}

fn read_api_version(obj: &mut Map<String, Value>, errs: &mut Errors) -> Option<String> {
    match obj.remove("apiVersion") {
        Some(Value::String(s)) if API_VERSIONS.contains(&s.as_str()) => Some(s),
        Some(Value::String(s)) => {
            errs.push("apiVersion", validate::api_version_reason(&s));
            None
        }
        None => {
            errs.push("apiVersion", "is required (security.istio.io/v1 or security.istio.io/v1beta1)");
            None
        }
        Some(other) => {
            errs.push("apiVersion", format!("must be a string, found {}", type_name(&other)));
            None
        }
    }
}

fn read_kind(obj: &mut Map<String, Value>, errs: &mut Errors) -> Option<Kind> {
    match obj.remove("kind") {
        Some(Value::String(s)) => {
            let kind = Kind::from_manifest_kind(&s);
            if kind.is_none() {
                errs.push(
                    "kind",
                    format!(
                        "unsupported kind {s:?}: expected AuthorizationPolicy, PeerAuthentication or \
                         RequestAuthentication"
                    ),
                );
            }
            kind
        }
        None => {
            errs.push("kind", "is required");
            None
        }
        Some(other) => {
            errs.push("kind", format!("must be a string, found {}", type_name(&other)));
            None
        }
    }
}

/// Checks the typed model cannot express: lists that Istio rejects when present but empty, and non-numeric
/// `portLevelMtls` keys (removed after reporting, so the rest of the spec is still checked).
fn precheck_raw_spec(kind: Kind, spec: &mut Value, errs: &mut Errors) {
    match kind {
        Kind::AuthorizationPolicy => {
            let Some(Value::Array(rules)) = spec.get("rules") else { return };
            for (i, rule) in rules.iter().enumerate() {
                for (field, what) in [("from", "source"), ("to", "operation")] {
                    if matches!(rule.get(field), Some(Value::Array(a)) if a.is_empty()) {
                        errs.push(
                            format!("spec.rules[{i}].{field}"),
                            format!("`{field}` must not be empty; omit it to match any {what}"),
                        );
                    }
                }
            }
        }
        Kind::PeerAuthentication => {
            let Some(Value::Object(ports)) = spec.get_mut("portLevelMtls") else { return };
            if ports.is_empty() {
                errs.push("spec.portLevelMtls", "port level mTLS, if defined, must have at least one element");
            }
            ports.retain(|port, _| {
                let numeric =
                    !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u32>().is_ok();
                if !numeric {
                    errs.push(
                        format!("spec.portLevelMtls[{port}]"),
                        format!("port {port:?} is not a number in 1..65535"),
                    );
                }
                numeric
            });
        }
        Kind::RequestAuthentication => {}
    }
}

fn parse_spec(kind: Kind, spec: Value) -> Result<Spec, FieldError> {
    Ok(match kind {
        Kind::AuthorizationPolicy => Spec::AuthorizationPolicy(deserialize_at::<AuthorizationPolicy>("spec", spec)?),
        Kind::PeerAuthentication => Spec::PeerAuthentication(deserialize_at::<PeerAuthentication>("spec", spec)?),
        Kind::RequestAuthentication => {
            Spec::RequestAuthentication(deserialize_at::<RequestAuthentication>("spec", spec)?)
        }
    })
}

/// Full parse + validation of one object.
fn parse_object(value: Value) -> Result<Resource, Failure> {
    let Value::Object(mut obj) = value else {
        let reason = format!(
            "expected a Kubernetes object (a mapping with apiVersion, kind, metadata and spec), found {}",
            type_name(&value)
        );
        return Err(Failure { errors: vec![FieldError { field: String::new(), reason }], ..Failure::default() });
    };
    let identity = failure_from_object(&obj, Vec::new());
    let mut errs = Errors::default();
    for key in obj.keys().filter(|k| !TOP_LEVEL_FIELDS.contains(&k.as_str())) {
        errs.push(
            key.clone(),
            format!("unknown field `{key}`, expected one of `apiVersion`, `kind`, `metadata`, `spec`, `status`"),
        );
    }

    let api_version = read_api_version(&mut obj, &mut errs);
    let kind = read_kind(&mut obj, &mut errs);

    let metadata = match obj.remove("metadata") {
        None | Some(Value::Null) => {
            errs.push("metadata", "is required (with at least metadata.name)");
            None
        }
        Some(mut v) => {
            strip_nulls(&mut v);
            match deserialize_at::<Metadata>("metadata", v) {
                Ok(m) => {
                    validate::validate_metadata(&m, &mut errs);
                    Some(m)
                }
                Err(e) => {
                    errs.0.push(e);
                    None
                }
            }
        }
    };

    let spec = kind.and_then(|kind| {
        let mut spec = match obj.remove("spec") {
            // A missing spec is an empty spec, as in Istio (for AuthorizationPolicy: allow-nothing).
            None | Some(Value::Null) => Value::Object(Map::new()),
            Some(v) => v,
        };
        strip_nulls(&mut spec);
        precheck_raw_spec(kind, &mut spec, &mut errs);
        match parse_spec(kind, spec) {
            Ok(spec) => {
                let ns = metadata.as_ref().map_or(DEFAULT_NAMESPACE, |m| m.namespace.as_str());
                validate::validate_spec(&spec, ns, &mut errs);
                Some(spec)
            }
            Err(e) => {
                errs.0.push(e);
                None
            }
        }
    });

    if let (Some(metadata), Some(spec)) = (&metadata, &spec) {
        validate::validate_dry_run(metadata, spec, &mut errs);
    }

    match (api_version, kind, metadata, spec) {
        (Some(api_version), Some(kind), Some(metadata), Some(spec)) if errs.is_empty() => {
            Ok(Resource { api_version, kind, metadata, spec })
        }
        _ => Err(Failure { errors: errs.0, ..identity }),
    }
}

/// Identity-only read for deletes: the spec may be anything.
fn key_from_object(value: &Value) -> Result<ResourceKey, Failure> {
    let Value::Object(obj) = value else {
        let reason = format!("expected a Kubernetes object, found {}", type_name(value));
        return Err(Failure { errors: vec![FieldError { field: String::new(), reason }], ..Failure::default() });
    };
    let mut errs = Errors::default();
    let mut obj_copy = Map::new();
    for key in ["apiVersion", "kind"] {
        if let Some(v) = obj.get(key) {
            obj_copy.insert(key.to_string(), v.clone());
        }
    }
    read_api_version(&mut obj_copy, &mut errs);
    let kind = read_kind(&mut obj_copy, &mut errs);
    let (mut name, mut namespace) = (None, DEFAULT_NAMESPACE.to_string());
    match obj.get("metadata") {
        Some(Value::Object(meta)) => {
            match meta.get("name") {
                Some(Value::String(n)) => match validate::name_reason(n) {
                    Some(reason) => errs.push("metadata.name", reason),
                    None => name = Some(n.clone()),
                },
                None | Some(Value::Null) => errs.push("metadata.name", "is required"),
                Some(other) => errs.push("metadata.name", format!("must be a string, found {}", type_name(other))),
            }
            match meta.get("namespace") {
                Some(Value::String(ns)) if ns.is_empty() => {}
                Some(Value::String(ns)) => match validate::namespace_reason(ns) {
                    Some(reason) => errs.push("metadata.namespace", reason),
                    None => namespace = ns.clone(),
                },
                None | Some(Value::Null) => {}
                Some(other) => {
                    errs.push("metadata.namespace", format!("must be a string, found {}", type_name(other)));
                }
            }
        }
        None | Some(Value::Null) => errs.push("metadata", "is required (with at least metadata.name)"),
        Some(other) => errs.push("metadata", format!("must be a mapping, found {}", type_name(other))),
    }
    match (kind, name) {
        (Some(kind), Some(name)) if errs.is_empty() => Ok(ResourceKey { kind, namespace, name }),
        _ => Err(failure_from_object(obj, errs.0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_numbering_follows_yaml() {
        let idx = |text: &str| -> Vec<(usize, usize, bool)> {
            split_documents(text).iter().map(|d| (d.index, d.first_line, has_content(&d.text))).collect()
        };
        assert_eq!(idx(""), vec![]);
        assert_eq!(idx("# only a comment\n"), vec![]);
        assert_eq!(idx("a: 1\n"), vec![(0, 0, true)]);
        assert_eq!(idx("---\na: 1\n"), vec![(0, 0, true)]);
        assert_eq!(idx("# c\n---\na: 1\n---\nb: 2\n"), vec![(0, 1, true), (1, 3, true)]);
        assert_eq!(idx("a: 1\n---\n---\nb: 2\n"), vec![(0, 0, true), (1, 1, false), (2, 2, true)]);
        assert_eq!(idx("a: 1\n--- # comment\nb: 2\n...\n"), vec![(0, 0, true), (1, 1, true)]);
        assert_eq!(idx("a: 1\r\n---\r\nb: 2\r\n"), vec![(0, 0, true), (1, 1, true)]);
        // `---x` and indented `---` are content, not markers.
        assert_eq!(idx("a: |\n  ---\n  x\n"), vec![(0, 0, true)]);
    }

    #[test]
    fn yaml_error_line_numbers_refer_to_whole_text() {
        let doc = split_documents("a: 1\n---\nb: x: y\n").remove(1);
        let err = decode(&doc).unwrap_err();
        assert!(err.contains("at line 3 column 5"), "{err}");
    }

    #[test]
    fn yaml_error_line_numbers_in_later_documents() {
        let text = "a: 1\n---\nb: 2\n---\n\nc: [x\n";
        let doc = split_documents(text).remove(2);
        let err = decode(&doc).unwrap_err();
        assert!(err.contains("at line 6 column"), "{err}");
        assert!(!err.contains("line 2 column"), "{err}");
        assert_eq!(
            shift_lines("x at line 2 column 3, y at line 1 column 1 (line 9)", 10),
            "x at line 11 column 3, y at line 10 column 1 (line 9)"
        );
    }

    const POLICY: &str =
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: ns}\nspec: {}\n";

    /// The limits are checked before any parser runs, and name the limit and the document.
    #[test]
    fn hostile_texts_are_refused_before_parsing() {
        let deep = format!("{POLICY}---\n{}{}\n", "[".repeat(100_000), "]".repeat(100_000));
        let err = parse_documents(&deep).unwrap_err();
        assert_eq!(err.to_string(), "document 2: nesting deeper than 64 levels (line 6)");
        assert_eq!(parse_keys(&deep).unwrap_err().to_string(), err.to_string(), "delete -f reads the same way");
        let deep_block: String = (0..100).map(|i| format!("{}k{i}:\n", "  ".repeat(i))).collect();
        assert_eq!(
            parse_documents(&deep_block).unwrap_err().to_string(),
            "document 1: nesting deeper than 64 levels (line 65)"
        );

        let many = |n: usize| -> String {
            (0..n).map(|i| POLICY.replace("name: p", &format!("name: p{i}"))).collect::<Vec<_>>().join("---\n")
        };
        assert_eq!(parse_documents(&many(MAX)).map(|r| r.len()), Ok(MAX), "control: at the limit");
        assert_eq!(
            parse_documents(&many(MAX + 1)).unwrap_err().to_string(),
            "document 1001: more than 1000 resources in one text"
        );
        // `kind: List` items count too.
        let items = |n: usize| -> String {
            let items: Vec<String> = (0..n)
                .map(|i| format!("- {{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {{name: p{i}}}, spec: {{}}}}"))
                .collect();
            format!("{POLICY}---\nkind: List\nitems:\n{}\n", items.join("\n"))
        };
        assert_eq!(parse_documents(&items(MAX - 1)).map(|r| r.len()), Ok(MAX));
        assert_eq!(
            parse_documents(&items(MAX)).unwrap_err().to_string(),
            "document 2 (List): items: more than 1000 resources in one text"
        );
    }

    const MAX: usize = limits::MAX_RESOURCES;

    #[test]
    fn yaml_to_json_conversion() {
        let v =
            decode(&split_documents("a: 1\nb: [x, 2.5, true, null]\n8080: {m: STRICT}\n").remove(0)).unwrap().unwrap();
        assert_eq!(v, serde_json::json!({"a": 1, "b": ["x", 2.5, true, null], "8080": {"m": "STRICT"}}));
        assert!(decode(&split_documents("a: !foo 1\n").remove(0)).unwrap_err().contains("tags"));
        assert!(decode(&split_documents("a: 1\na: 2\n").remove(0)).unwrap_err().contains("duplicate"));
        assert!(decode(&split_documents("null\n").remove(0)).unwrap().is_none());
    }
}
