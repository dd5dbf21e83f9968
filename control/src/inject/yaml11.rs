//! Writing a changed document so that Kubernetes reads it back as we meant it.
//!
//! kubectl and the API server read YAML 1.1 (go-yaml v2, under sigs.k8s.io/yaml); yaml_serde
//! reads and writes YAML 1.2. They disagree on some plain scalars: to YAML 1.1 `yes`, `on` and
//! `n` are booleans, `0644` is the octal number 420 and `1_000` is 1000; to YAML 1.2 they are
//! strings, which yaml_serde writes without quotes. Written as they come, `value: "yes"` would
//! reach the API server as a boolean and be refused. So, when writing:
//!
//! - every string that YAML 1.1 reads as anything but that string is single-quoted;
//! - except file modes (`defaultMode: 0644`, `mode: 0755`): written plain, Kubernetes reads them
//!   as octal numbers, which is what their author meant and the only valid reading there.
//!
//! yaml_serde cannot be told how to write one particular scalar, so those strings are swapped for
//! placeholder words that occur nowhere in the document, and the words are replaced after writing.

use std::sync::LazyLock;

use regex::Regex;
use yaml_serde::Value;

/// Serialises one document (without a leading `---`).
pub(super) fn to_string(value: &Value) -> Result<String, String> {
    let mut placeholders = Placeholders::new(value);
    let marked = placeholders.mark(value.clone(), None);
    let mut text = yaml_serde::to_string(&marked).map_err(|e| format!("cannot write YAML: {e}"))?;
    // Highest first, although no word is a prefix of another (each ends with `_`).
    for (i, replacement) in placeholders.replacements.iter().enumerate().rev() {
        text = text.replace(&placeholders.word(i), replacement);
    }
    Ok(text)
}

/// Whether a plain scalar `s` would be read by YAML 1.1 as a boolean, null, number, timestamp
/// or merge key. Errs on the side of quoting: a quoted string is a string in every YAML.
fn yaml11_reads_as_non_string(s: &str) -> bool {
    static NUMBER: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(concat!(
            r"^[-+]?(",
            r"\.[0-9]+|[0-9]+(\.[0-9]*)?", // decimal, float and leading-zero octal
            r")([eE][-+]?[0-9]+)?$",
            r"|^[-+]?0(x[0-9a-fA-F]+|b[01]+|o[0-7]+)$",
            r"|^[-+]?[0-9]+(:[0-5]?[0-9])+(\.[0-9]*)?$", // sexagesimal, 1:30
            r"|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$",
            r"|^[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}", // timestamps
        ))
        .expect("valid regex")
    });
    matches!(
        s,
        "" | "~"
            | "null"
            | "Null"
            | "NULL"
            | "<<"
            | "y"
            | "Y"
            | "yes"
            | "Yes"
            | "YES"
            | "true"
            | "True"
            | "TRUE"
            | "on"
            | "On"
            | "ON"
            | "n"
            | "N"
            | "no"
            | "No"
            | "NO"
            | "false"
            | "False"
            | "FALSE"
            | "off"
            | "Off"
            | "OFF"
    ) || NUMBER.is_match(&s.replace('_', ""))
}

/// An octal file mode as people write them (`0644`), under a key Kubernetes uses for modes.
fn is_octal_mode(key: Option<&str>, s: &str) -> bool {
    matches!(key, Some("defaultMode" | "mode"))
        && s.len() > 1
        && s.starts_with('0')
        && s.bytes().all(|b| matches!(b, b'0'..=b'7'))
}

/// Strings that must be written differently from yaml_serde's choice, by placeholder word.
struct Placeholders {
    prefix: String,
    replacements: Vec<String>,
}

impl Placeholders {
    fn new(document: &Value) -> Self {
        let mut prefix = "pillion_yaml11_".to_string();
        while contains_text(document, &prefix) {
            prefix.push('x');
        }
        Placeholders {
            prefix,
            replacements: Vec::new(),
        }
    }

    fn word(&self, index: usize) -> String {
        format!("{}{index}_", self.prefix)
    }

    /// `value` with every string that needs it swapped for a placeholder word.
    fn mark(&mut self, value: Value, key: Option<&str>) -> Value {
        match value {
            Value::String(s) => {
                let replacement = if is_octal_mode(key, &s) {
                    s
                } else if !s.contains('\n') && yaml11_reads_as_non_string(&s) {
                    format!("'{}'", s.replace('\'', "''"))
                } else {
                    return Value::String(s);
                };
                self.replacements.push(replacement);
                Value::String(self.word(self.replacements.len() - 1))
            }
            Value::Sequence(items) => Value::Sequence(items.into_iter().map(|v| self.mark(v, None)).collect()),
            Value::Mapping(map) => Value::Mapping(
                map.into_iter()
                    .map(|(k, v)| {
                        let v = self.mark(v, k.as_str());
                        (self.mark(k, None), v)
                    })
                    .collect(),
            ),
            Value::Tagged(mut tagged) => {
                tagged.value = self.mark(tagged.value, key);
                Value::Tagged(tagged)
            }
            other => other,
        }
    }
}

/// Whether any string (key or value) in `value` contains `text`.
fn contains_text(value: &Value, text: &str) -> bool {
    match value {
        Value::String(s) => s.contains(text),
        Value::Sequence(items) => items.iter().any(|v| contains_text(v, text)),
        Value::Mapping(map) => map
            .iter()
            .any(|(k, v)| contains_text(k, text) || contains_text(v, text)),
        Value::Tagged(tagged) => contains_text(&tagged.value, text),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(yaml: &str) -> String {
        to_string(&yaml_serde::from_str(yaml).unwrap()).unwrap()
    }

    #[test]
    fn yaml11_lookalikes_are_quoted() {
        let out = rewrite(concat!(
            "a: \"yes\"\nb: 'on'\nc: \"0644\"\nd: \"1_000\"\ne: \"N\"\nf: \"2024-01-01\"\n",
            "g: \"1:30\"\nh: \"it's\"\n\"no\": key\ni: yes-really\nj: v1.2\nk: \"08\"\nl: .5\n",
        ));
        assert_eq!(
            out,
            concat!(
                "a: 'yes'\nb: 'on'\nc: '0644'\nd: '1_000'\ne: 'N'\nf: '2024-01-01'\n",
                "g: '1:30'\nh: it's\n'no': key\ni: yes-really\nj: v1.2\nk: '08'\nl: 0.5\n",
            )
        );
    }

    #[test]
    fn octal_file_modes_stay_numbers() {
        let out =
            rewrite("volumes:\n- configMap:\n    defaultMode: 0644\n    items:\n    - {key: a, path: a, mode: 0755}\n");
        assert_eq!(
            out,
            "volumes:\n- configMap:\n    defaultMode: 0644\n    items:\n    - key: a\n      path: a\n      mode: 0755\n"
        );
        // Anywhere else, the same characters are a string.
        assert_eq!(rewrite("value: 0644\n"), "value: '0644'\n");
    }

    #[test]
    fn placeholder_words_never_clash_with_content() {
        let out = rewrite("pillion_yaml11_0_: pillion_yaml11_x\nz: \"off\"\n");
        assert_eq!(out, "pillion_yaml11_0_: pillion_yaml11_x\nz: 'off'\n");
    }
}
