//! Splitting a YAML stream into documents, the way kubectl does.
//!
//! A document ends at a line that starts with `---` followed by nothing but blanks or a comment
//! (kubectl's rule, so we find the same documents `kubectl apply -f` would). Each document keeps
//! its exact text, so one we do not change is written back byte for byte, and its position, so a
//! parse error names the document and the line in the whole input, not in the document.

use yaml_serde::Value;

/// One document of the stream, as it appears in the input.
pub(super) struct Document<'a> {
    /// 1-based position in the stream.
    pub number: usize,
    /// 1-based line of the input where the document starts (its `---` line, if it has one).
    pub first_line: usize,
    /// The whole document: separator line and body, exactly as read.
    pub text: &'a str,
    /// The `---` line with its line ending, or empty for a first document without one.
    pub separator: &'a str,
    body: &'a str,
}

impl<'a> Document<'a> {
    /// The document's value; `Null` for a document of only comments.
    pub fn parse(&self) -> Result<Value, String> {
        yaml_serde::from_str(self.body).map_err(|_| {
            // Parse again with the body where it sits in the input, so that the parser's
            // "at line L column C" counts from the top of the stream. Only on the error path:
            // this is quadratic in the number of documents.
            let body_line = self.first_line + usize::from(!self.separator.is_empty());
            let placed = "\n".repeat(body_line - 1) + self.body;
            match yaml_serde::from_str::<Value>(&placed) {
                Err(e) => e.to_string(),
                Ok(_) => "not valid YAML".to_string(),
            }
        })
    }

    /// The blank and comment lines at the top of the body, kept when the document is rewritten.
    pub fn leading_comments(&self) -> &'a str {
        let mut end = 0;
        for line in self.body.split_inclusive('\n') {
            let trimmed = line.trim_start();
            // YAML (1.1, as libyaml reads it) also ends a line at a bare CR, NEL, LS or PS: what
            // follows one on this "comment" line is content, which the rewritten document already
            // holds. Copying it would write it twice.
            let other_break = line
                .trim_end_matches(['\r', '\n'])
                .contains(['\r', '\u{85}', '\u{2028}', '\u{2029}']);
            if !(trimmed.is_empty() || trimmed.starts_with('#')) || other_break {
                break;
            }
            end += line.len();
        }
        &self.body[..end]
    }
}

/// The documents of `input`, in order. Text before a first `---` line is a document only if
/// it is not empty.
pub(super) fn split(input: &str) -> Vec<Document<'_>> {
    // Byte offsets and line numbers of the separator lines.
    let mut separators = Vec::new();
    let mut offset = 0;
    for (index, line) in input.split_inclusive('\n').enumerate() {
        if is_separator(line) {
            separators.push((offset, index + 1, line.len()));
        }
        offset += line.len();
    }

    let mut documents = Vec::new();
    let mut push = |start: usize, end: usize, first_line: usize, separator_len: usize| {
        documents.push(Document {
            number: documents.len() + 1,
            first_line,
            text: &input[start..end],
            separator: &input[start..start + separator_len],
            body: &input[start + separator_len..end],
        });
    };
    let first_separator = separators.first().map_or(input.len(), |s| s.0);
    if first_separator > 0 || separators.is_empty() && !input.is_empty() {
        push(0, first_separator, 1, 0);
    }
    for (i, &(start, line, len)) in separators.iter().enumerate() {
        let end = separators.get(i + 1).map_or(input.len(), |next| next.0);
        push(start, end, line, len);
    }
    documents
}

/// `---`, optionally followed by blanks or a comment; `----` or `--- |` are not separators.
fn is_separator(line: &str) -> bool {
    line.strip_prefix("---").is_some_and(|rest| {
        let rest = rest.trim();
        rest.is_empty() || rest.starts_with('#')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(input: &str) -> Vec<(usize, usize, &str, &str)> {
        split(input)
            .into_iter()
            .map(|d| (d.number, d.first_line, d.separator, d.body))
            .collect()
    }

    #[test]
    fn splits_on_kubectl_separators_only() {
        let input = "a: 1\n---\nb: 2\n--- # c\nc: |\n  ----\n  --- x\n----\n";
        assert_eq!(
            texts(input),
            vec![
                (1, 1, "", "a: 1\n"),
                (2, 2, "---\n", "b: 2\n"),
                (3, 4, "--- # c\n", "c: |\n  ----\n  --- x\n----\n"),
            ]
        );
        // The pieces add up to the input.
        let joined: String = split(input).iter().map(|d| d.text).collect();
        assert_eq!(joined, input);
    }

    #[test]
    fn leading_separator_and_crlf() {
        let input = "---\r\na: 1\r\n---\r\n";
        assert_eq!(texts(input), vec![(1, 1, "---\r\n", "a: 1\r\n"), (2, 3, "---\r\n", "")]);
        assert!(split("").is_empty());
        assert_eq!(texts("a: 1"), vec![(1, 1, "", "a: 1")]);
    }

    #[test]
    fn errors_count_lines_from_the_top_of_the_stream() {
        let docs = split("a: 1\n---\n# x\nb: [1, 2\n");
        assert!(docs[0].parse().is_ok());
        let err = docs[1].parse().unwrap_err();
        assert!(err.contains("line 5 column 1"), "{err}");
    }

    #[test]
    fn leading_comments_stop_at_content() {
        let docs = split("---\n# web\n\n  # indented\nkind: Pod # not this\n# nor this\n");
        assert_eq!(docs[0].leading_comments(), "# web\n\n  # indented\n");
    }

    /// Found by the `inject` fuzz target: a bare CR ends a YAML line, so the text after it in a
    /// top comment is a key of the document; copying the comment line wrote that key twice.
    #[test]
    fn a_comment_line_with_a_bare_cr_is_not_kept() {
        let docs = split("# a\rb: 1\nkind: Pod\n");
        assert_eq!(docs[0].leading_comments(), "");
        let docs = split("# ok\r\n# a\rb: 1\nkind: Pod\n");
        assert_eq!(docs[0].leading_comments(), "# ok\r\n");
        // YAML 1.1's other line breaks: NEL, LS, PS.
        for line_break in ['\u{85}', '\u{2028}', '\u{2029}'] {
            let input = format!("# ok\n# a{line_break}b: 1\nkind: Pod\n");
            let docs = split(&input);
            assert_eq!(docs[0].leading_comments(), "# ok\n", "{line_break:?}");
        }
    }
}
