//! Reading `iptables-save -t <table>` output: which chains exist, which rules, and where they
//! jump. The nat table holds the redirects; the IPv6 filter table holds the refusal of inbound
//! IPv6 when IPv6 is not redirected.
//!
//! This is the "what already exists" input of the pure rule generators, and the ground truth
//! for backend choice (count real `-A` rules: a listed-but-empty table means nothing) and for
//! validation. Parsing never fails: lines it does not understand are ignored, since the tools'
//! output is not ours to reject.

/// Chains whose names start with this prefix are Pillion's, whoever created them.
pub const CHAIN_PREFIX: &str = "PILLION_";

pub fn is_ours(chain: &str) -> bool {
    chain.starts_with(CHAIN_PREFIX)
}

/// The netfilter tables we write to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    Nat,
    Filter,
}

impl Table {
    pub fn name(self) -> &'static str {
        match self {
            Table::Nat => "nat",
            Table::Filter => "filter",
        }
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One table as one `*-save -t <table>` call printed it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ruleset {
    /// User-defined chains (those declared with `-` as policy), in save order.
    pub user_chains: Vec<String>,
    pub rules: Vec<SavedRule>,
}

/// One `-A CHAIN ...` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedRule {
    pub chain: String,
    /// Everything after `-A CHAIN `, verbatim (quoting included), so it can be replayed as `-D`.
    pub spec: String,
    /// The spec split into words, quotes removed.
    pub words: Vec<String>,
}

impl Ruleset {
    /// The nat table in `save_output`.
    pub fn parse(save_output: &str) -> Ruleset {
        Ruleset::parse_table(save_output, Table::Nat)
    }

    /// `table` in `save_output`; other tables' lines are ignored.
    pub fn parse_table(save_output: &str, table: Table) -> Ruleset {
        let header = format!("*{table}");
        let mut ruleset = Ruleset::default();
        let mut in_table = false;
        for line in save_output.lines().map(str::trim_end) {
            if line.starts_with('*') {
                in_table = line == header;
            } else if line == "COMMIT" {
                in_table = false;
            } else if !in_table {
                continue;
            } else if let Some(decl) = line.strip_prefix(':') {
                // `:NAME POLICY [packets:bytes]`; built-in chains have a real policy.
                let mut parts = decl.split_whitespace();
                if let (Some(name), Some("-")) = (parts.next(), parts.next()) {
                    ruleset.user_chains.push(name.to_string());
                }
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
                ruleset.rules.push(SavedRule {
                    chain: chain.to_string(),
                    spec: spec.to_string(),
                    words: split_words(spec),
                });
            }
        }
        ruleset
    }

    /// Real rules, as opposed to chain headers (which an empty, merely listed table also has).
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    pub fn rules_in<'a>(&'a self, chain: &'a str) -> impl Iterator<Item = &'a SavedRule> + 'a {
        self.rules.iter().filter(move |r| r.chain == chain)
    }

    pub fn our_chains(&self) -> impl Iterator<Item = &str> {
        self.user_chains.iter().map(String::as_str).filter(|c| is_ours(c))
    }
}

impl SavedRule {
    /// The chain this rule jumps or goes to, if any (`-j X`, `-g X`); `RETURN`, `REDIRECT` too.
    pub fn target(&self) -> Option<&str> {
        let at = self
            .words
            .iter()
            .position(|w| matches!(w.as_str(), "-j" | "--jump" | "-g" | "--goto"))?;
        self.words.get(at + 1).map(String::as_str)
    }

    /// True when the rule matches everything: nothing but an optional comment and the target.
    pub fn is_unconditional(&self) -> bool {
        let mut words = self.words.iter().map(String::as_str);
        let mut remaining = Vec::new();
        while let Some(word) = words.next() {
            match word {
                "-m" | "--match" => {
                    let module = words.next();
                    if module != Some("comment") {
                        remaining.extend(["-m"].into_iter().chain(module));
                    }
                }
                "--comment" => {
                    words.next();
                }
                other => remaining.push(other),
            }
        }
        matches!(remaining.as_slice(), [flag, _] if matches!(*flag, "-j" | "--jump" | "-g" | "--goto"))
    }

    /// The value following `option` (e.g. `--to-ports`), if present.
    pub fn option(&self, option: &str) -> Option<&str> {
        let at = self.words.iter().position(|w| w == option)?;
        self.words.get(at + 1).map(String::as_str)
    }
}

/// Splits a rule spec into words the way iptables-save quotes them: double quotes group, and a
/// backslash escapes the next character (save writes `'` inside comments as `\'`).
fn split_words(spec: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = spec.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                word.extend(chars.next());
                in_word = true;
            }
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVE: &str = "\
# Generated by iptables-nft-save v1.8.9 (nf_tables) on Sun Nov 22 00:13:18 2026
*filter
:INPUT ACCEPT [0:0]
-A INPUT -p tcp -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [12:720]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:PILLION_OUTPUT - [0:0]
:app-chain - [0:0]
-A OUTPUT -m comment --comment \"pillion: send outbound traffic through PILLION_OUTPUT\" -j PILLION_OUTPUT
-A OUTPUT -p udp -m udp --dport 53 -j app-chain
-A PILLION_OUTPUT -m owner --uid-owner 2102 -m comment --comment \"the proxy\\'s own\" -j RETURN
-A PILLION_OUTPUT -p tcp -m comment --comment \"pillion: redirect\" -j REDIRECT --to-ports 4140
COMMIT
# Completed on Sun Nov 22 00:13:18 2026
";

    #[test]
    fn reads_only_the_nat_table() {
        let rs = Ruleset::parse(SAVE);
        assert_eq!(rs.user_chains, ["PILLION_OUTPUT", "app-chain"]);
        assert_eq!(rs.rule_count(), 4);
        assert_eq!(rs.our_chains().collect::<Vec<_>>(), ["PILLION_OUTPUT"]);
    }

    #[test]
    fn reads_the_filter_table_when_asked() {
        let rs = Ruleset::parse_table(SAVE, Table::Filter);
        assert_eq!(rs.rule_count(), 1);
        assert_eq!(rs.rules[0].chain, "INPUT");
    }

    #[test]
    fn empty_and_merely_listed_tables_have_no_rules() {
        let listed = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";
        assert_eq!(Ruleset::parse(listed).rule_count(), 0);
        assert_eq!(Ruleset::parse("").rule_count(), 0);
        assert_eq!(Ruleset::parse("garbage\n-A OUTPUT -j X\n").rule_count(), 0);
    }

    #[test]
    fn rules_keep_their_spec_verbatim_and_split_quoted_words() {
        let rs = Ruleset::parse(SAVE);
        let owner = &rs.rules[2];
        assert_eq!(owner.chain, "PILLION_OUTPUT");
        assert_eq!(
            owner.spec,
            "-m owner --uid-owner 2102 -m comment --comment \"the proxy\\'s own\" -j RETURN"
        );
        assert!(owner.words.contains(&"the proxy's own".to_string()));
        assert_eq!(owner.target(), Some("RETURN"));
        assert_eq!(rs.rules[3].option("--to-ports"), Some("4140"));
    }

    #[test]
    fn unconditional_means_only_a_comment_and_a_target() {
        let rs = Ruleset::parse(SAVE);
        assert!(rs.rules[0].is_unconditional());
        assert_eq!(rs.rules[0].target(), Some("PILLION_OUTPUT"));
        assert!(!rs.rules[1].is_unconditional());
        let bare = Ruleset::parse("*nat\n-A PREROUTING -j PILLION_PREROUTING\nCOMMIT\n");
        assert!(bare.rules[0].is_unconditional());
        let tcp = Ruleset::parse("*nat\n-A PREROUTING -p tcp -j PILLION_PREROUTING\nCOMMIT\n");
        assert!(!tcp.rules[0].is_unconditional());
    }
}
