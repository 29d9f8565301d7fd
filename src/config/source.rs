//! Where a configuration value comes from: the TOML file (with its line), a flag, an
//! environment variable or the default; and the errors that name that place.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use toml::Spanned;

use super::keys::{self, Key};

/// Where a value was set. Shown in every error and in `check-config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Default,
    File { path: PathBuf, line: Option<usize> },
    Flag(String),
    Env(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::File { path, line: Some(line) } => write!(f, "{}:{line}", path.display()),
            Origin::File { path, line: None } => write!(f, "{}", path.display()),
            Origin::Flag(flag) => write!(f, "flag --{flag}"),
            Origin::Env(var) => write!(f, "environment variable {var}"),
        }
    }
}

/// One thing wrong with the configuration, with the place to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub origin: Origin,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(key) => write!(f, "{}: {key}: {}", self.origin, self.message),
            None => write!(f, "{}: {}", self.origin, self.message),
        }
    }
}

/// Every error found in one load, in the order the keys are listed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// A value set on the command line or in the environment.
#[derive(Debug, Clone)]
pub struct Override {
    pub key: &'static Key,
    pub value: String,
    pub origin: Origin,
}

impl Override {
    /// A value for `name` as if given by its flag; used by tests and embedders.
    pub fn flag(name: &str, value: impl Into<String>) -> Result<Override, ConfigError> {
        let key = keys::find(name).ok_or_else(|| ConfigError {
            origin: Origin::Default,
            key: Some(name.to_string()),
            message: "unknown key".into(),
        })?;
        Ok(Override { key, value: value.into(), origin: Origin::Flag(key.flag()) })
    }
}

/// A value from the file and the line it is on.
#[derive(Debug, Clone)]
pub struct FileEntry {
    pub value: toml::Value,
    pub line: usize,
}

/// The parsed config file: `section.key` to value, every key already known to exist.
#[derive(Debug, Clone)]
pub struct FileLayer {
    pub path: PathBuf,
    pub entries: BTreeMap<String, FileEntry>,
}

type Document = BTreeMap<String, Spanned<BTreeMap<String, Spanned<toml::Value>>>>;

impl FileLayer {
    /// Reads and parses `path`, refusing unknown sections and keys (all of them, not just
    /// the first).
    pub fn read(path: &Path) -> Result<FileLayer, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                origin: Origin::File { path: path.to_path_buf(), line: None },
                key: None,
                message: format!("cannot read the config file: {e}"),
            }])
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<FileLayer, ConfigErrors> {
        let at = |line: Option<usize>| Origin::File { path: path.to_path_buf(), line };
        let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;

        let doc: Document = match toml::from_str(text) {
            Ok(doc) => doc,
            Err(e) => {
                let line = e.span().map(|s| line_of(s.start));
                let message = match not_a_section(text) {
                    Some(name) => format!("`{name}` must be a section: write [{name}] and put its keys below it"),
                    None => e.message().trim().to_string(),
                };
                return Err(ConfigErrors(vec![ConfigError { origin: at(line), key: None, message }]));
            }
        };

        let mut errors = Vec::new();
        let mut entries = BTreeMap::new();
        let known_sections = keys::sections();
        for (section, table) in doc {
            if !known_sections.contains(&section.as_str()) {
                let hint = did_you_mean(&section, known_sections.iter().copied());
                errors.push(ConfigError {
                    origin: at(Some(line_of(table.span().start))),
                    key: None,
                    message: format!(
                        "unknown section [{section}]{}",
                        hint.map(|h| format!(" (did you mean [{h}]?)")).unwrap_or_default()
                    ),
                });
                continue;
            }
            for (field, value) in table.into_inner() {
                let name = format!("{section}.{field}");
                let line = line_of(value.span().start);
                if keys::find(&name).is_none() {
                    let in_section = keys::KEYS.iter().filter(|k| k.section() == section).map(|k| k.field());
                    let hint = did_you_mean(&field, in_section);
                    errors.push(ConfigError {
                        origin: at(Some(line)),
                        key: None,
                        message: format!(
                            "unknown key {name}{}",
                            hint.map(|h| format!(" (did you mean {section}.{h}?)")).unwrap_or_default()
                        ),
                    });
                    continue;
                }
                entries.insert(name, FileEntry { value: value.into_inner(), line });
            }
        }
        errors.sort_by_key(|e: &ConfigError| match e.origin {
            Origin::File { line, .. } => line,
            _ => None,
        });
        if errors.is_empty() { Ok(FileLayer { path: path.to_path_buf(), entries }) } else { Err(ConfigErrors(errors)) }
    }
}

/// The first top-level key that is a plain value instead of a `[section]`, if any.
fn not_a_section(text: &str) -> Option<String> {
    let table: toml::Table = text.parse().ok()?;
    table.into_iter().find(|(_, v)| !v.is_table()).map(|(k, _)| k)
}

/// The candidate closest to `word`, if it is close enough to be a likely typo.
fn did_you_mean<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        FileLayer::parse(Path::new("t.toml"), text).unwrap_err().0.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn every_unknown_key_is_reported_with_its_line() {
        let text = "[proxy]\nconect_timeout = \"1s\"\n\n[admin]\nlisten = \"127.0.0.1:1\"\nbogus = 1\n";
        assert_eq!(
            errors(text),
            vec![
                "t.toml:2: unknown key proxy.conect_timeout (did you mean proxy.connect_timeout?)".to_string(),
                "t.toml:6: unknown key admin.bogus".to_string(),
            ]
        );
    }

    #[test]
    fn unknown_section_and_plain_top_level_value() {
        assert_eq!(
            errors("[prxy]\nlisten = \"x\"\n"),
            vec!["t.toml:1: unknown section [prxy] (did you mean [proxy]?)"]
        );
        assert_eq!(
            errors("backend = \"a:1\"\n"),
            vec!["t.toml:1: `backend` must be a section: write [backend] and put its keys below it"]
        );
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let got = errors("[proxy]\nlisten = \n");
        assert_eq!(got.len(), 1);
        assert!(got[0].starts_with("t.toml:2: "), "{got:?}");
    }

    #[test]
    fn values_keep_their_lines() {
        let layer = FileLayer::parse(Path::new("t.toml"), "# c\n[backend]\naddress = \"a:1\"\n").unwrap();
        assert_eq!(layer.entries["backend.address"].line, 3);
    }
}
