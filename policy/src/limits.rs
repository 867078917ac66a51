//! Bounds on what one text may ask of the parser, checked by a cheap linear scan BEFORE any YAML or JSON parser
//! sees the text. The parsers' own cost grows faster than the input for deep nesting (a flow sequence nested
//! 100,000 levels, 200 KB, takes tens of seconds before their recursion limit applies), so the limit has to be
//! enforced in front of them: [`check_nesting`] reads one document once, in time linear in its length.
//!
//! The scan counts a level for every indentation step, every `- `/`? ` block indicator and every open flow `[`/`{`;
//! a YAML node nests at most twice as deep as that count (a `- ` item holding a mapping is two levels), so a
//! document under [`MAX_NESTING`] stays within the YAML deserializer's own recursion limit (128). Quoted scalars,
//! comments and block scalars (`|`, `>`) are skipped, so brackets inside them do not count; a quote or bracket
//! inside a plain scalar (`it's`, `x[0]`) opens nothing, as the parser reads it.

/// Deepest nesting a document may have, as the scan counts it: Istio's resources need about ten levels
/// (`spec.rules[].from[].source.principals[]`).
pub const MAX_NESTING: usize = 64;

/// Most resources one text may hold, documents and `kind: List` items together (each becomes a stored resource
/// pushed to every proxy).
pub const MAX_RESOURCES: usize = 1000;

/// Why a text is refused before it is parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// `line` counts from 1 (within the text [`check_nesting`] was given).
    #[error("nesting deeper than {max} levels (line {line})")]
    TooDeep { max: usize, line: usize },
    #[error("more than {max} resources in one text")]
    TooManyResources { max: usize },
}

/// Checks that no node of `document` (one YAML or JSON document) nests deeper than `max` levels.
pub fn check_nesting(document: &str, max: usize) -> Result<(), LimitError> {
    let mut scan = Scan::default();
    for (n, line) in document.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if scan.line(line) > max {
            return Err(LimitError::TooDeep { max, line: n + 1 });
        }
    }
    Ok(())
}

#[derive(Default)]
struct Scan {
    /// Indentation columns of the enclosing block nodes, innermost last.
    indents: Vec<usize>,
    /// Open flow collections (`[`, `{`).
    flow: usize,
    /// Inside a quoted scalar that continues on the next line: its quote character.
    quote: Option<char>,
    /// The last character outside quotes and comments that is not whitespace, within the current block line or
    /// flow collection (which may span lines): whether a quote or bracket starts a node depends on it.
    significant: Option<char>,
    /// Inside a block scalar (`|`, `>`): the indentation of the line that introduced it; its content is every
    /// following line indented deeper (or blank).
    block_scalar: Option<usize>,
}

impl Scan {
    /// Reads one line; returns the deepest nesting it reaches.
    fn line(&mut self, line: &str) -> usize {
        let content = line.trim_start_matches(' ');
        let indent = line.len() - content.len();
        if let Some(parent) = self.block_scalar {
            if content.trim().is_empty() || indent > parent {
                return self.indents.len();
            }
            self.block_scalar = None;
        }
        let mut rest = content;
        let mut block_depth = self.indents.len();
        if self.quote.is_none() && self.flow == 0 {
            let trimmed = content.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                return block_depth;
            }
            while self.indents.last().is_some_and(|&top| top > indent) {
                self.indents.pop();
            }
            if self.indents.last() != Some(&indent) {
                self.indents.push(indent);
            }
            block_depth = self.indents.len();
            // Compact block collections: `- - x`, `- key: v`, `? key`: each indicator opens a level.
            loop {
                match rest.strip_prefix("- ").or_else(|| rest.strip_prefix("? ")) {
                    Some(after) => {
                        block_depth += 1;
                        rest = after.trim_start_matches(' ');
                    }
                    None => {
                        if rest == "-" || rest == "?" {
                            block_depth += 1;
                        }
                        break;
                    }
                }
            }
            self.significant = None;
        }
        let mut deepest = block_depth + self.flow;
        let mut previous: Option<char> = None;
        let mut chars = rest.chars().peekable();
        while let Some(c) = chars.next() {
            match self.quote {
                Some('"') => match c {
                    '\\' => {
                        chars.next();
                    }
                    '"' => self.quote = None,
                    _ => {}
                },
                Some(_) => {
                    if c == '\'' {
                        if chars.peek() == Some(&'\'') {
                            chars.next();
                        } else {
                            self.quote = None;
                        }
                    }
                }
                None if c == '#' && matches!(previous, None | Some(' ' | '\t')) => break,
                None if c == ' ' || c == '\t' => {}
                None => {
                    // A quote or a flow indicator opens a node only where a node starts: in a flow collection
                    // after `[`, `{`, `,` or `:`; in block context at the start of the line's value or after `: `.
                    // Anywhere else it is part of a plain scalar (`it's`, `x[0]`), as the parser reads it.
                    let node_start = if self.flow > 0 {
                        matches!(self.significant, None | Some('[' | '{' | ',' | ':'))
                    } else {
                        self.significant.is_none() || (self.significant == Some(':') && previous == Some(' '))
                    };
                    match c {
                        '"' | '\'' if node_start => self.quote = Some(c),
                        '[' | '{' if node_start => {
                            self.flow += 1;
                            deepest = deepest.max(block_depth + self.flow);
                        }
                        ']' | '}' if self.flow > 0 => self.flow -= 1,
                        _ => {}
                    }
                    self.significant = Some(c);
                }
            }
            previous = Some(c);
        }
        if self.quote.is_none() && self.flow == 0 && introduces_block_scalar(rest) {
            self.block_scalar = Some(indent);
        }
        deepest
    }
}

/// Whether a block-context line's value is a block scalar header (`|`, `>-`, `|+2`, optionally followed by a
/// comment): its value is the more indented lines that follow.
fn introduces_block_scalar(line: &str) -> bool {
    let code = match line.find(" #") {
        Some(at) => &line[..at],
        None => line,
    };
    let code = code.trim_end();
    let header = code.rsplit([' ', '\t']).next().unwrap_or("");
    let mut chars = header.chars();
    let is_header = matches!(chars.next(), Some('|' | '>')) && chars.all(|c| matches!(c, '-' | '+' | '1'..='9'));
    let before = code[..code.len() - header.len()].trim_end();
    is_header && (before.is_empty() || before.ends_with(':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth(text: &str) -> usize {
        // The smallest limit the text passes.
        (0..=200).find(|&max| check_nesting(text, max).is_ok()).expect("under 200 levels")
    }

    #[test]
    fn flow_nesting_counts_each_open_bracket() {
        assert_eq!(depth("a"), 1);
        assert_eq!(depth("[a]"), 2);
        assert_eq!(depth("[[[a]]]"), 4);
        assert_eq!(depth("{a: [{b: c}]}"), 4);
        assert_eq!(depth("[[a], [b], [c]]"), 3, "siblings do not add up");
        assert_eq!(depth("[\n [\n  [\n   a\n  ]\n ]\n]"), 4, "a flow collection spanning lines");
        assert_eq!(depth(r#"{"a": {"b": {"c": [1, 2]}}}"#), 5, "JSON");
    }

    #[test]
    fn block_nesting_counts_indentation_and_indicators() {
        assert_eq!(depth("a: 1\nb: 2\n"), 1);
        assert_eq!(depth("a:\n  b:\n    c: 1\n"), 3);
        assert_eq!(depth("a:\n  b:\n    c: 1\nd: 2\n"), 3, "dedent pops levels");
        assert_eq!(depth("rules:\n- from:\n  - source:\n      principals: [x]\n"), 4);
        assert_eq!(depth("- - - - x\n"), 5, "compact sequences");
        assert_eq!(depth("a: [x, {b: [y]}]\n"), 4, "flow inside block");
        // Comments and blank lines are not nodes.
        assert_eq!(depth("a:\n      # deep comment\n\n  b: 1\n"), 2);
    }

    #[test]
    fn quoted_brackets_and_plain_scalars_do_not_count() {
        assert_eq!(depth(r#"a: "[[[[[[""#), 1);
        assert_eq!(depth("a: '[[[[[['"), 1);
        assert_eq!(depth(r#"a: "\"[[[[""#), 1, "an escaped quote does not end a double-quoted scalar");
        assert_eq!(depth("a: 'it''s [[[['"), 1, "'' is a quote inside a single-quoted scalar");
        assert_eq!(depth("a: it's [[[\n"), 1, "an apostrophe inside a plain scalar opens nothing");
        assert_eq!(depth("a: x[[[[\n"), 1, "brackets inside a plain scalar");
        assert_eq!(depth("a: 1 # [[[[[[\n"), 1, "comments");
        assert_eq!(depth("[\"]]]]\", '[[[', [b]]"), 3, "quotes inside flow");
        assert_eq!(depth("a: \"[[[\n  [[[[\"\nb: 1\n"), 1, "a quoted scalar spanning lines");
    }

    #[test]
    fn block_scalars_are_skipped() {
        let text = "a: |\n  [[[[[[\n      deeper\n          deeper still\nb: >-\n  {{{{\nc: 1\n";
        assert_eq!(depth(text), 1);
        assert_eq!(depth("jwks: |\n  {\"keys\": [{\"kty\": \"EC\"}]}\nx:\n  y: 1\n"), 2, "levels resume after");
    }

    #[test]
    fn hostile_nesting_is_refused_with_its_line() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(check_nesting(&deep, MAX_NESTING), Err(LimitError::TooDeep { max: MAX_NESTING, line: 1 }));
        let block: String = (0..100).map(|i| format!("{}k{i}:\n", " ".repeat(i))).collect();
        assert_eq!(check_nesting(&block, MAX_NESTING), Err(LimitError::TooDeep { max: MAX_NESTING, line: 65 }));
        let dashes = format!("{}x\n", "- ".repeat(100));
        assert!(check_nesting(&dashes, MAX_NESTING).is_err());
        // At the limit: accepted.
        let at_limit = format!("{}{}", "[".repeat(MAX_NESTING - 1), "]".repeat(MAX_NESTING - 1));
        assert_eq!(check_nesting(&at_limit, MAX_NESTING), Ok(()));
        assert!(check_nesting(&format!("[{at_limit}]"), MAX_NESTING).is_err());
    }
}
