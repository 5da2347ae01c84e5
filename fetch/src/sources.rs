//! The sources file: what to download, the digests it must have, and where it lands.
//!
//! The file is TOML (see `sources.toml` beside this crate, which is built in as the default).
//! Everything is checked when it is read, so a mistake in it is reported with the source and the
//! field before anything is downloaded.

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use crate::FetchError;

/// The sources built into ferry: WikiText-103, the NLTK Gutenberg books, the airline tweets.
pub const BUILT_IN: &str = include_str!("../sources.toml");
/// How the built-in sources are named in messages.
pub const BUILT_IN_NAME: &str = "ferry's built-in sources (fetch/sources.toml)";

/// The digests a file is pinned by. Any that is given must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pins {
    pub sha256: Option<String>,
    pub sha1: Option<String>,
}

impl Pins {
    pub fn is_empty(&self) -> bool {
        self.sha256.is_none() && self.sha1.is_none()
    }
}

/// One file ferry keeps, as a path relative to the data directory.
#[derive(Debug, Clone)]
pub struct Member {
    /// The member's name inside the archive (for a plain download, empty).
    pub from: String,
    pub to: PathBuf,
    pub pins: Pins,
    pub min_bytes: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unpack {
    /// The download is the file: `files` holds exactly one member, with an empty `from`.
    None,
    Zip,
}

/// One download.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub description: String,
    /// The URL first, then its mirrors, in the order they are tried.
    pub urls: Vec<String>,
    pub pins: Pins,
    /// Why the download has no digest; `None` when it has one.
    pub unpinned: Option<String>,
    pub min_bytes: Option<u64>,
    pub unpack: Unpack,
    pub files: Vec<Member>,
}

#[derive(Debug, Clone)]
pub struct Sources {
    /// Where the sources came from, for messages.
    pub origin: String,
    pub sources: Vec<Source>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(rename = "source", default)]
    sources: Vec<RawSource>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    name: String,
    #[serde(default)]
    description: String,
    url: String,
    #[serde(default)]
    mirrors: Vec<String>,
    sha256: Option<String>,
    sha1: Option<String>,
    unpinned: Option<String>,
    min_bytes: Option<u64>,
    to: Option<String>,
    unpack: Option<String>,
    #[serde(default)]
    files: Vec<RawMember>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMember {
    from: String,
    to: String,
    sha256: Option<String>,
    sha1: Option<String>,
    min_bytes: Option<u64>,
}

impl Sources {
    pub fn built_in() -> Result<Self, FetchError> {
        Self::parse(BUILT_IN, BUILT_IN_NAME)
    }

    pub fn read(path: &Path) -> Result<Self, FetchError> {
        let text = std::fs::read_to_string(path).map_err(|e| FetchError::Sources {
            origin: path.display().to_string(),
            reason: format!("cannot read it: {e}"),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self, FetchError> {
        let bad = |reason: String| FetchError::Sources {
            origin: origin.to_string(),
            reason,
        };
        let raw: RawFile = toml::from_str(text).map_err(|e| bad(one_line(&e.to_string())))?;
        if raw.sources.is_empty() {
            return Err(bad("it lists no [[source]]".into()));
        }
        let mut names = HashSet::new();
        let mut targets = HashSet::new();
        let mut sources = Vec::new();
        for (i, s) in raw.sources.into_iter().enumerate() {
            let at = format!("[[source]] {} ({:?})", i + 1, s.name);
            let field = |f: &str, why: String| bad(format!("{at}: {f}: {why}"));
            if s.name.is_empty()
                || !s
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(field("name", "must be letters, digits, '-' or '_'".into()));
            }
            if !names.insert(s.name.clone()) {
                return Err(field("name", "another source has the same name".into()));
            }
            let mut urls = vec![s.url.clone()];
            urls.extend(s.mirrors.iter().cloned());
            for (k, url) in urls.iter().enumerate() {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    let f = if k == 0 {
                        "url".to_string()
                    } else {
                        format!("mirrors[{}]", k - 1)
                    };
                    return Err(field(
                        &f,
                        format!("{url:?} is not an http:// or https:// URL"),
                    ));
                }
            }
            let pins = parse_pins(s.sha256, s.sha1).map_err(|why| field("sha256/sha1", why))?;
            match (&s.unpinned, pins.is_empty()) {
                (None, true) => {
                    return Err(field(
                        "sha256",
                        "missing: pin the download, or say in `unpinned` why it cannot be".into(),
                    ))
                }
                (Some(_), false) => {
                    return Err(field(
                        "unpinned",
                        "given although the download is pinned".into(),
                    ))
                }
                _ => {}
            }
            let (unpack, files) = match (s.unpack.as_deref(), s.to) {
                (None, Some(to)) => {
                    if !s.files.is_empty() {
                        return Err(field(
                            "files",
                            "only an archive (`unpack`) has files".into(),
                        ));
                    }
                    let to = relative(&to).map_err(|why| field("to", why))?;
                    let member = Member {
                        from: String::new(),
                        to,
                        pins: Pins::default(),
                        min_bytes: None,
                    };
                    (Unpack::None, vec![member])
                }
                (Some("zip"), None) => {
                    if s.files.is_empty() {
                        return Err(field(
                            "files",
                            "an archive must list the files it gives".into(),
                        ));
                    }
                    let mut members = Vec::new();
                    for (k, m) in s.files.into_iter().enumerate() {
                        let f = |name: &str| format!("files[{k}].{name}");
                        if m.from.is_empty() {
                            return Err(field(&f("from"), "empty".into()));
                        }
                        let to = relative(&m.to).map_err(|why| field(&f("to"), why))?;
                        let pins =
                            parse_pins(m.sha256, m.sha1).map_err(|why| field(&f("sha256"), why))?;
                        members.push(Member {
                            from: m.from,
                            to,
                            pins,
                            min_bytes: m.min_bytes,
                        });
                    }
                    (Unpack::Zip, members)
                }
                (Some("zip"), Some(_)) => {
                    return Err(field(
                        "to",
                        "an archive lands through `files`, not `to`".into(),
                    ))
                }
                (Some(other), _) => {
                    return Err(field(
                        "unpack",
                        format!("{other:?} is not known (only \"zip\")"),
                    ))
                }
                (None, None) => {
                    return Err(field(
                        "to",
                        "missing: where the file lands, or `unpack`".into(),
                    ))
                }
            };
            for m in &files {
                if !targets.insert(m.to.clone()) {
                    return Err(field(
                        "to",
                        format!("{} is written by two sources or members", m.to.display()),
                    ));
                }
            }
            sources.push(Source {
                name: s.name,
                description: s.description,
                urls,
                pins,
                unpinned: s.unpinned,
                min_bytes: s.min_bytes,
                unpack,
                files,
            });
        }
        Ok(Sources {
            origin: origin.to_string(),
            sources,
        })
    }

    /// The sources named in `only` (all of them when it is empty), in file order.
    pub fn select(&self, only: &[String]) -> Result<Vec<&Source>, FetchError> {
        for name in only {
            if !self.sources.iter().any(|s| &s.name == name) {
                let known: Vec<&str> = self.sources.iter().map(|s| s.name.as_str()).collect();
                return Err(FetchError::Sources {
                    origin: self.origin.clone(),
                    reason: format!(
                        "no source is named {name:?} (there are: {})",
                        known.join(", ")
                    ),
                });
            }
        }
        Ok(self
            .sources
            .iter()
            .filter(|s| only.is_empty() || only.contains(&s.name))
            .collect())
    }
}

fn parse_pins(sha256: Option<String>, sha1: Option<String>) -> Result<Pins, String> {
    let check = |name: &str, value: &Option<String>, len: usize| -> Result<(), String> {
        match value {
            Some(v) if v.len() != len || !v.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Err(format!("{name} {v:?} is not {len} hexadecimal digits"))
            }
            _ => Ok(()),
        }
    };
    check("sha256", &sha256, 64)?;
    check("sha1", &sha1, 40)?;
    Ok(Pins {
        sha256: sha256.map(|v| v.to_ascii_lowercase()),
        sha1: sha1.map(|v| v.to_ascii_lowercase()),
    })
}

/// A path that stays inside the data directory: relative, no `..`, not empty.
fn relative(path: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(path);
    let inside = !path.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)));
    if inside {
        Ok(p)
    } else {
        Err(format!(
            "{path:?} must be a relative path inside the data directory"
        ))
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_sources_read_and_pin_every_download_or_say_why_not() {
        let s = Sources::built_in().unwrap();
        let names: Vec<&str> = s.sources.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["wikitext-103", "books", "airline"]);
        for source in &s.sources {
            assert!(
                !source.pins.is_empty() || source.unpinned.is_some(),
                "{}",
                source.name
            );
        }
        let books = &s.sources[1];
        assert_eq!(books.files.len(), 17);
        assert!(books.files.iter().all(|m| m.to.starts_with("books")));
    }

    fn parse_err(text: &str) -> String {
        Sources::parse(text, "t.toml").unwrap_err().to_string()
    }

    #[test]
    fn a_mistake_in_a_sources_file_names_the_source_and_the_field() {
        let e = parse_err("[[source]]\nname = \"a\"\nurl = \"http://x/a\"\nto = \"a.txt\"\n");
        assert!(
            e.contains("t.toml") && e.contains("\"a\"") && e.contains("sha256: missing"),
            "{e}"
        );
        let e = parse_err(
            "[[source]]\nname = \"a\"\nurl = \"http://x/a\"\nsha256 = \"12\"\nto = \"a.txt\"\n",
        );
        assert!(e.contains("not 64 hexadecimal digits"), "{e}");
        let pin = "a".repeat(64);
        let e = parse_err(&format!(
            "[[source]]\nname = \"a\"\nurl = \"http://x/a\"\nsha256 = \"{pin}\"\nto = \"../a.txt\"\n"
        ));
        assert!(
            e.contains("to: \"../a.txt\" must be a relative path"),
            "{e}"
        );
        let e = parse_err(&format!(
            "[[source]]\nname = \"a\"\nurl = \"ftp://x/a\"\nsha256 = \"{pin}\"\nto = \"a.txt\"\n"
        ));
        assert!(e.contains("url: \"ftp://x/a\" is not an http"), "{e}");
        let e = parse_err(&format!(
            "[[source]]\nname = \"a\"\nurl = \"http://x/a\"\nsha256 = \"{pin}\"\nto = \"a.txt\"\n\
             [[source]]\nname = \"b\"\nurl = \"http://x/b\"\nsha256 = \"{pin}\"\nto = \"a.txt\"\n"
        ));
        assert!(e.contains("(\"b\"): to: a.txt is written by two"), "{e}");
        let e = parse_err("[[source]]\nname = \"a\"\nurl = \"http://x/a\"\nsize = 3\n");
        assert!(e.contains("t.toml") && e.contains("size"), "{e}");
    }
}
