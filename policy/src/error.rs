//! Parse/validation errors. Every problem is attributed to a document and a field path so users can fix a
//! multi-document file in one pass instead of one error at a time.

use std::fmt;

use crate::metadata::DEFAULT_NAMESPACE;

/// All problems found in one text. Never empty when returned as an `Err`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", display_lines(.errors))]
pub struct ParseError {
    pub errors: Vec<DocumentError>,
}

fn display_lines(errors: &[DocumentError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
}

/// One problem in one document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentError {
    /// 0-based index of the YAML document in the text (empty documents count, as YAML counts them). Messages
    /// count from 1, as users do: index 0 is shown as "document 1".
    pub document: usize,
    /// The document's `kind`, when it could be read (even if it is not a supported kind).
    pub kind: Option<String>,
    /// `metadata.name`, when it could be read.
    pub name: Option<String>,
    /// `metadata.namespace` (defaulted to `default`), when the name could be read.
    pub namespace: Option<String>,
    /// Path of the offending field, e.g. `spec.rules[0].from[0].source.ipBlocks[1]`; empty for whole-document problems.
    pub field: String,
    /// Human-readable explanation.
    pub reason: String,
}

impl fmt::Display for DocumentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "document {}", self.document + 1)?;
        match (&self.kind, &self.name) {
            (Some(kind), Some(name)) => {
                let ns = self.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE);
                write!(f, " ({kind} {ns}/{name})")?;
            }
            (Some(kind), None) => write!(f, " ({kind})")?,
            (None, Some(name)) => {
                let ns = self.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE);
                write!(f, " ({ns}/{name})")?;
            }
            (None, None) => {}
        }
        if self.field.is_empty() {
            write!(f, ": {}", self.reason)
        } else {
            write!(f, ": {}: {}", self.field, self.reason)
        }
    }
}

impl ParseError {
    pub(crate) fn single(document: usize, field: impl Into<String>, reason: impl Into<String>) -> Self {
        ParseError {
            errors: vec![DocumentError {
                document,
                kind: None,
                name: None,
                namespace: None,
                field: field.into(),
                reason: reason.into(),
            }],
        }
    }
}

/// Field errors of one object, with whatever identity (kind, name, namespace) could be read from it: what becomes
/// that document's [`DocumentError`]s.
#[derive(Debug, Default)]
pub(crate) struct Failure {
    pub(crate) kind: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) namespace: Option<String>,
    pub(crate) errors: Vec<FieldError>,
}

impl Failure {
    /// Attributes the errors to document `document`; `prefix` is prepended to each field path (`items[N]` for an
    /// item of a `kind: List`).
    pub(crate) fn into_document_errors(self, document: usize, prefix: &str) -> Vec<DocumentError> {
        self.errors
            .into_iter()
            .map(|e| DocumentError {
                document,
                kind: self.kind.clone(),
                name: self.name.clone(),
                namespace: self.namespace.clone(),
                field: prefixed(prefix, &e.field),
                reason: e.reason,
            })
            .collect()
    }
}

/// `field` under `prefix` (either may be empty).
pub(crate) fn prefixed(prefix: &str, field: &str) -> String {
    match (prefix.is_empty(), field.is_empty()) {
        (true, _) => field.to_string(),
        (false, true) => prefix.to_string(),
        (false, false) => format!("{prefix}.{field}"),
    }
}

/// A field-level problem, before it is attributed to a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

/// Collects field errors; validation keeps going after the first problem so all of them are reported at once.
#[derive(Debug, Default)]
pub(crate) struct Errors(pub(crate) Vec<FieldError>);

impl Errors {
    pub(crate) fn push(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.0.push(FieldError { field: field.into(), reason: reason.into() });
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(kind: Option<&str>, name: Option<&str>, ns: Option<&str>, field: &str) -> DocumentError {
        DocumentError {
            document: 2,
            kind: kind.map(String::from),
            name: name.map(String::from),
            namespace: ns.map(String::from),
            field: field.to_string(),
            reason: "\"10.0.0.300/8\" is not an IP address or CIDR".to_string(),
        }
    }

    /// `document: 2` is the third document of the text.
    #[test]
    fn display_formats() {
        let full =
            err(Some("AuthorizationPolicy"), Some("deny-all"), Some("foo"), "spec.rules[0].from[0].source.ipBlocks[1]");
        assert_eq!(
            full.to_string(),
            "document 3 (AuthorizationPolicy foo/deny-all): spec.rules[0].from[0].source.ipBlocks[1]: \
             \"10.0.0.300/8\" is not an IP address or CIDR"
        );
        assert_eq!(
            err(Some("AuthorizationPolicy"), Some("x"), None, "").to_string(),
            "document 3 (AuthorizationPolicy default/x): \"10.0.0.300/8\" is not an IP address or CIDR"
        );
        assert_eq!(err(Some("Foo"), None, None, "kind").to_string().split(':').next().unwrap(), "document 3 (Foo)");
        assert_eq!(err(None, None, None, "").to_string().split(':').next().unwrap(), "document 3");
        let pe = ParseError { errors: vec![full.clone(), full] };
        assert_eq!(pe.to_string().lines().count(), 2);
    }
}
