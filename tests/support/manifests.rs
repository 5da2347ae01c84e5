//! Reading deploy manifests as what they are (YAML documents, shell scripts, a Dockerfile),
//! finding every `ferry` command line and `FERRY_*` variable in them, and checking those
//! against the binary's own description of its command line (`ferry help-json`).
#![allow(dead_code)]

use serde_json::Value as Json;
use serde_yaml::Value as Yaml;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

// ----- the binary's command line -----

#[derive(Debug, Clone)]
pub struct FlagSpec {
    pub long: Option<String>,
    pub aliases: Vec<String>,
    pub short: Option<String>,
    pub takes_value: bool,
    /// One occurrence takes several words (`--input a b c`).
    pub multiple_values: bool,
    pub required: bool,
    pub possible_values: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct CommandSpec {
    pub flags: Vec<FlagSpec>,
    pub positionals: Vec<(String, bool, bool)>, // (name, required, repeatable)
    pub has_subcommands: bool,
}

#[derive(Debug, Clone)]
pub struct CliSpec {
    pub commands: BTreeMap<Vec<String>, CommandSpec>,
    pub env: BTreeSet<String>,
}

/// One `ferry` command line found in a file.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// "file:line" or "file: what" for error messages.
    pub origin: String,
    /// The arguments after the binary.
    pub argv: Vec<String>,
}

impl CliSpec {
    /// Asks the binary: `ferry help-json`.
    pub fn from_binary(ferry: &Path) -> CliSpec {
        let out = std::process::Command::new(ferry)
            .arg("help-json")
            .output()
            .expect("run ferry help-json");
        assert!(
            out.status.success(),
            "ferry help-json failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Json = serde_json::from_slice(&out.stdout).expect("help-json prints JSON");
        CliSpec::from_json(&v)
    }

    pub fn from_json(v: &Json) -> CliSpec {
        let strings = |v: &Json| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut commands = BTreeMap::new();
        for c in v["commands"].as_array().expect("commands") {
            let flags = c["flags"]
                .as_array()
                .expect("flags")
                .iter()
                .map(|f| FlagSpec {
                    long: f["long"].as_str().map(str::to_string),
                    aliases: strings(&f["aliases"]),
                    short: f["short"].as_str().map(str::to_string),
                    takes_value: f["takes_value"].as_bool().unwrap_or(false),
                    multiple_values: f["multiple_values"].as_bool().unwrap_or(false),
                    required: f["required"].as_bool().unwrap_or(false),
                    possible_values: strings(&f["possible_values"]),
                })
                .collect();
            let positionals = c["positionals"]
                .as_array()
                .expect("positionals")
                .iter()
                .map(|p| {
                    (
                        p["name"].as_str().unwrap_or("").to_string(),
                        p["required"].as_bool().unwrap_or(false),
                        p["repeatable"].as_bool().unwrap_or(false),
                    )
                })
                .collect();
            commands.insert(
                strings(&c["path"]),
                CommandSpec {
                    flags,
                    positionals,
                    has_subcommands: c["has_subcommands"].as_bool().unwrap_or(false),
                },
            );
        }
        CliSpec {
            commands,
            env: strings(&v["env"]).into_iter().collect(),
        }
    }

    pub fn check_env(&self, name: &str) -> Result<(), String> {
        if self.env.contains(name) {
            Ok(())
        } else {
            Err(format!(
                "{name}: ferry reads no such environment variable (it reads {})",
                self.env.iter().cloned().collect::<Vec<_>>().join(", ")
            ))
        }
    }

    /// Parses `argv` (the words after `ferry`) the way the binary would, by its spec.
    /// Returns the subcommand path. Values are not interpreted beyond enum choices, since
    /// manifests pass placeholders such as `$(POD_IP)`.
    pub fn check_invocation(&self, argv: &[String]) -> Result<Vec<String>, String> {
        let mut path: Vec<String> = Vec::new();
        let mut seen_flags: BTreeSet<String> = BTreeSet::new();
        let mut positionals = 0usize;
        let mut only_positionals = false;
        let mut asked_for_help = false;
        let mut i = 0;
        let name = |p: &[String]| {
            if p.is_empty() {
                "ferry".to_string()
            } else {
                format!("ferry {}", p.join(" "))
            }
        };
        while i < argv.len() {
            let cmd = &self.commands[&path];
            let tok = &argv[i];
            i += 1;
            let flag = if only_positionals {
                None
            } else if tok == "--" {
                only_positionals = true;
                continue;
            } else if let Some(long) = tok.strip_prefix("--") {
                let (key, inline) = match long.split_once('=') {
                    Some((k, v)) => (k, Some(v.to_string())),
                    None => (long, None),
                };
                let f = cmd
                    .flags
                    .iter()
                    .find(|f| f.long.as_deref() == Some(key) || f.aliases.iter().any(|a| a == key))
                    .ok_or_else(|| {
                        format!(
                            "{}: no flag --{key} (it has {})",
                            name(&path),
                            cmd.flags
                                .iter()
                                .filter_map(|f| f.long.as_ref().map(|l| format!("--{l}")))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    })?;
                Some((f, format!("--{key}"), inline))
            } else if tok.len() == 2 && tok.starts_with('-') && tok != "-" {
                let key = &tok[1..];
                let f = cmd
                    .flags
                    .iter()
                    .find(|f| f.short.as_deref() == Some(key))
                    .ok_or_else(|| format!("{}: no flag -{key}", name(&path)))?;
                Some((f, tok.clone(), None))
            } else {
                None
            };
            if let Some((f, shown, inline)) = flag {
                if let Some(long) = &f.long {
                    seen_flags.insert(long.clone());
                    if long == "help" || long == "version" {
                        asked_for_help = true;
                    }
                }
                if !f.takes_value {
                    if inline.is_some() {
                        return Err(format!("{}: {shown} takes no value", name(&path)));
                    }
                    continue;
                }
                let mut values = Vec::new();
                match inline {
                    Some(v) => values.push(v),
                    None => {
                        let takes_next = |t: &String| !(t.starts_with("--") && t.len() > 2);
                        match argv.get(i) {
                            Some(v) if takes_next(v) => {
                                values.push(v.clone());
                                i += 1;
                            }
                            _ => return Err(format!("{}: {shown} needs a value", name(&path))),
                        }
                        // `--input a b c`: a flag with several values takes words up to the
                        // next flag.
                        if f.multiple_values {
                            while let Some(v) = argv.get(i).filter(|v| !v.starts_with('-')) {
                                values.push(v.clone());
                                i += 1;
                            }
                        }
                    }
                }
                if !f.possible_values.is_empty() {
                    for v in values.iter().filter(|v| !v.contains('$')) {
                        if !f.possible_values.contains(v) {
                            return Err(format!(
                                "{}: {shown} {v}: not one of {}",
                                name(&path),
                                f.possible_values.join(", ")
                            ));
                        }
                    }
                }
                continue;
            }
            // A word: a subcommand, else a positional argument.
            if cmd.has_subcommands && positionals == 0 && !only_positionals {
                let mut next = path.clone();
                next.push(tok.clone());
                if !self.commands.contains_key(&next) {
                    let subs: Vec<String> = self
                        .commands
                        .keys()
                        .filter(|k| k.len() == path.len() + 1 && k.starts_with(&path))
                        .map(|k| k.last().cloned().unwrap_or_default())
                        .collect();
                    return Err(format!(
                        "{}: no subcommand {tok:?} (it has {})",
                        name(&path),
                        subs.join(", ")
                    ));
                }
                path = next;
                seen_flags.clear();
                continue;
            }
            positionals += 1;
            let repeatable_tail = cmd.positionals.last().is_some_and(|p| p.2);
            if positionals > cmd.positionals.len() && !repeatable_tail {
                return Err(format!(
                    "{}: unexpected argument {tok:?} (takes {} positional)",
                    name(&path),
                    cmd.positionals.len()
                ));
            }
        }
        if asked_for_help {
            return Ok(path);
        }
        let cmd = &self.commands[&path];
        if cmd.has_subcommands {
            return Err(format!("{}: needs a subcommand", name(&path)));
        }
        for f in cmd.flags.iter().filter(|f| f.required) {
            let long = f.long.clone().unwrap_or_default();
            if !seen_flags.contains(&long) {
                return Err(format!("{}: --{long} is required", name(&path)));
            }
        }
        let required = cmd.positionals.iter().filter(|p| p.1).count();
        if positionals < required {
            return Err(format!(
                "{}: needs {required} positional argument(s), got {positionals}",
                name(&path)
            ));
        }
        Ok(path)
    }

    /// Checks every invocation and variable; returns one message per problem.
    pub fn problems(&self, invocations: &[Invocation], env: &[(String, String)]) -> Vec<String> {
        let mut out = Vec::new();
        for inv in invocations {
            if let Err(e) = self.check_invocation(&inv.argv) {
                out.push(format!("{}: {e}   [{}]", inv.origin, inv.argv.join(" ")));
            }
        }
        for (origin, name) in env {
            if let Err(e) = self.check_env(name) {
                out.push(format!("{origin}: {e}"));
            }
        }
        out
    }
}

/// Every `FERRY_*` name in a text, wherever it stands (code, comments, docs): a manifest may
/// not even mention a variable the binary does not read.
pub fn ferry_env_names(origin: &str, text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let bytes = line.as_bytes();
        let mut i = 0;
        while let Some(pos) = line[i..].find("FERRY_") {
            let start = i + pos;
            let mut end = start + "FERRY_".len();
            while end < bytes.len()
                && (bytes[end].is_ascii_uppercase()
                    || bytes[end].is_ascii_digit()
                    || bytes[end] == b'_')
            {
                end += 1;
            }
            let preceded_by_word =
                start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
            if !preceded_by_word && end > start + "FERRY_".len() {
                out.push((format!("{origin}:{}", n + 1), line[start..end].to_string()));
            }
            i = end;
        }
    }
    out
}

// ----- shell -----

/// Whether a shell word runs the ferry binary.
pub fn is_ferry_word(w: &str) -> bool {
    let w = w.trim_matches('"');
    // `ferry=target/release/ferry` sets a variable; it runs nothing.
    !w.contains('=') && (w == "ferry" || w.ends_with("/ferry") || w == "$ferry" || w == "${ferry}")
}

/// Whether a shell word runs the slim `ferry-coordinator` binary.
pub fn is_slim_coordinator_word(w: &str) -> bool {
    let w = w.trim_matches('"');
    !w.contains('=') && (w == "ferry-coordinator" || w.ends_with("/ferry-coordinator"))
}

/// Logical lines of a shell script (continuations joined), with the line each starts on.
fn logical_lines(script: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut start = 0;
    for (n, line) in script.lines().enumerate() {
        if current.is_empty() {
            start = n + 1;
        }
        // Whole-line comments, also inside a continued command (as Docker reads them).
        if line.trim_start().starts_with('#') {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                out.push((start, std::mem::take(&mut current)));
            }
        }
    }
    if !current.is_empty() {
        out.push((start, current));
    }
    out
}

/// Shell words that end a simple command.
fn ends_command(w: &str) -> bool {
    matches!(
        w,
        "&" | "&&" | "||" | ";" | "|" | ")" | "then" | "do" | "fi" | "done"
    ) || w.starts_with('>')
        || w.starts_with("2>")
        || w.starts_with('<')
        || w.starts_with('#')
}

/// Every ferry command line in a shell script, including those inside `bash -c '...'`.
pub fn shell_invocations(origin: &str, script: &str) -> Vec<Invocation> {
    let mut out = Vec::new();
    for (line_no, line) in logical_lines(script) {
        // `;`, `&&` and `|` glued to words are split off so they end commands.
        let spaced = line
            .replace("; ", " ; ")
            .replace(";\t", " ; ")
            .replace("&& ", " && ")
            .replace("|| ", " || ");
        let Some(words) = shlex::split(&spaced) else {
            // Unbalanced quotes: not something to guess at.
            out.push(Invocation {
                origin: format!("{origin}:{line_no}"),
                argv: vec![format!("<unparsable shell line: {line}>")],
            });
            continue;
        };
        // Only a word in command position runs a program: first in a command (after
        // variable assignments), or after a launcher and its options (`srun -N2 ferry ...`).
        // `cargo build --bin ferry` runs cargo.
        let mut at_command = true;
        let mut i = 0;
        while i < words.len() {
            let w = &words[i];
            let slim = is_slim_coordinator_word(w);
            if at_command && (is_ferry_word(w) || slim) && !w.contains(' ') {
                let argv: Vec<String> = words[i + 1..]
                    .iter()
                    .take_while(|w| !ends_command(w))
                    .cloned()
                    .collect();
                i += 1 + argv.len();
                // `ferry-coordinator ARGS` is `ferry coordinator ARGS` (the same clap
                // arguments), so it is checked as that.
                let argv = if slim {
                    std::iter::once("coordinator".to_string())
                        .chain(argv)
                        .collect()
                } else {
                    argv
                };
                out.push(Invocation {
                    origin: format!("{origin}:{line_no}"),
                    argv,
                });
                at_command = false;
                continue;
            }
            // A script passed as one word (bash -c '...', trap '...'), wherever it stands.
            if w.contains(' ') && w.split_whitespace().any(is_ferry_word) {
                out.extend(shell_invocations(&format!("{origin}:{line_no}"), w));
            }
            at_command = if ends_command(w) || w == "(" || w == "{" {
                true
            } else if at_command {
                is_assignment(w) || is_launcher(w) || (w.starts_with('-') && i > 0)
            } else {
                false
            };
            i += 1;
        }
    }
    out
}

fn is_assignment(w: &str) -> bool {
    w.split_once('=').is_some_and(|(k, _)| {
        !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

/// Programs that run the command that follows their options.
fn is_launcher(w: &str) -> bool {
    matches!(
        w,
        "exec"
            | "srun"
            | "nohup"
            | "time"
            | "env"
            | "command"
            | "mpirun"
            | "if"
            | "then"
            | "do"
            | "!"
    )
}

/// Each `make-certs.sh DIR NAME...` command line of a shell script, or of the `#` comments
/// where a manifest documents a step run by hand: the words after the script, up to the end
/// of that command.
pub fn cert_step_commands(text: &str) -> Vec<Vec<String>> {
    let uncommented: String = text
        .lines()
        .map(|l| l.trim_start().trim_start_matches('#').to_string() + "\n")
        .collect();
    let mut out = Vec::new();
    for (_, line) in logical_lines(&uncommented) {
        let spaced = line.replace("; ", " ; ").replace("&& ", " && ");
        let Some(words) = shlex::split(&spaced) else {
            continue;
        };
        if let Some(at) = words.iter().position(|w| w.ends_with("make-certs.sh")) {
            out.push(
                words[at + 1..]
                    .iter()
                    .take_while(|w| !ends_command(w))
                    .cloned()
                    .collect(),
            );
        }
    }
    out
}

/// The ```bash / ```sh blocks of a Markdown file.
pub fn markdown_shell_blocks(text: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in text.lines() {
        let t = line.trim_start();
        if let Some(lang) = t.strip_prefix("```") {
            if inside {
                inside = false;
            } else {
                inside = matches!(lang.trim(), "bash" | "sh" | "shell" | "console");
            }
            out.push('\n');
            continue;
        }
        if inside {
            out.push_str(line.trim_start_matches("$ "));
        }
        out.push('\n');
    }
    out
}

// ----- YAML (Kubernetes, compose) -----

pub fn yaml_documents(path: &Path) -> Vec<Yaml> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    yaml_documents_of(&text, &path.display().to_string())
}

pub fn yaml_documents_of(text: &str, origin: &str) -> Vec<Yaml> {
    let mut docs = Vec::new();
    for d in serde_yaml::Deserializer::from_str(text) {
        let v = <Yaml as serde::Deserialize>::deserialize(d)
            .unwrap_or_else(|e| panic!("{origin}: not YAML: {e}"));
        if !v.is_null() {
            docs.push(v);
        }
    }
    docs
}

pub fn get<'a>(v: &'a Yaml, path: &[&str]) -> Option<&'a Yaml> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

pub fn str_at<'a>(v: &'a Yaml, path: &[&str]) -> Option<&'a str> {
    get(v, path).and_then(|v| v.as_str())
}

pub fn strings(v: Option<&Yaml>) -> Vec<String> {
    v.and_then(|v| v.as_sequence())
        .map(|s| {
            s.iter()
                .map(|w| match w {
                    Yaml::String(s) => s.clone(),
                    Yaml::Number(n) => n.to_string(),
                    Yaml::Bool(b) => b.to_string(),
                    other => format!("{other:?}"),
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn kind_name(doc: &Yaml) -> (String, String) {
    (
        str_at(doc, &["kind"]).unwrap_or("").to_string(),
        str_at(doc, &["metadata", "name"]).unwrap_or("").to_string(),
    )
}

/// The pod spec of a workload document, if it is one.
pub fn pod_spec(doc: &Yaml) -> Option<&Yaml> {
    match str_at(doc, &["kind"])? {
        "Pod" => get(doc, &["spec"]),
        "Deployment" | "StatefulSet" | "DaemonSet" | "Job" | "ReplicaSet" => {
            get(doc, &["spec", "template", "spec"])
        }
        "CronJob" => get(doc, &["spec", "jobTemplate", "spec", "template", "spec"]),
        _ => None,
    }
}

pub fn containers(doc: &Yaml) -> Vec<&Yaml> {
    let Some(spec) = pod_spec(doc) else {
        return Vec::new();
    };
    ["initContainers", "containers"]
        .iter()
        .filter_map(|k| spec.get(*k).and_then(|c| c.as_sequence()))
        .flatten()
        .collect()
}

/// The command line a container runs when its image's entrypoint is ferry: `command` (if it
/// names ferry, or is a shell running it) + `args`, else `args` alone.
pub fn container_invocations(origin: &str, c: &Yaml) -> Vec<Invocation> {
    let name = str_at(c, &["name"]).unwrap_or("?");
    let origin = format!("{origin}: container {name}");
    let command = strings(c.get("command"));
    let args = strings(c.get("args"));
    match command.first() {
        None => vec![Invocation { origin, argv: args }],
        Some(first) if is_ferry_word(first) => {
            let mut argv = command[1..].to_vec();
            argv.extend(args);
            vec![Invocation { origin, argv }]
        }
        Some(_) => {
            let words: Vec<String> = command.into_iter().chain(args).collect();
            shell_invocations(
                &origin,
                &shlex::try_join(words.iter().map(String::as_str)).unwrap_or_default(),
            )
        }
    }
}

/// Environment variable names a container sets.
pub fn container_env(c: &Yaml) -> Vec<String> {
    c.get("env")
        .and_then(|e| e.as_sequence())
        .map(|e| {
            e.iter()
                .filter_map(|v| str_at(v, &["name"]).map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

// ----- kustomize (the subset these manifests use) -----

/// Keys of lists that strategic merge patches merge element by element, by this field.
fn merge_key(list: &str) -> Option<&'static str> {
    match list {
        "containers" | "initContainers" | "env" | "volumes" | "volumeMounts" | "ports" => {
            Some("name")
        }
        _ => None,
    }
}

/// A strategic merge patch: maps merge, `null` deletes, keyed lists merge by key, other
/// lists are replaced.
pub fn strategic_merge(base: &mut Yaml, patch: &Yaml) {
    match (base, patch) {
        (Yaml::Mapping(b), Yaml::Mapping(p)) => {
            for (k, pv) in p {
                if pv.is_null() {
                    b.remove(k);
                    continue;
                }
                let key = k.as_str().unwrap_or("");
                match (b.get_mut(k), pv) {
                    (Some(Yaml::Sequence(bs)), Yaml::Sequence(ps)) if merge_key(key).is_some() => {
                        let field = merge_key(key).unwrap();
                        for item in ps {
                            let id = item.get(field).cloned();
                            match bs
                                .iter_mut()
                                .find(|b| id.is_some() && b.get(field).cloned() == id)
                            {
                                Some(existing) => strategic_merge(existing, item),
                                None => bs.push(item.clone()),
                            }
                        }
                    }
                    (Some(bv), pv) if bv.is_mapping() && pv.is_mapping() => strategic_merge(bv, pv),
                    _ => {
                        b.insert(k.clone(), pv.clone());
                    }
                }
            }
        }
        (b, p) => *b = p.clone(),
    }
}

/// What `kubectl kustomize DIR` would print, for resources, patches (strategic merge, by kind
/// and name), images and labels; anything else in a kustomization is an error here, so the
/// emulation cannot silently diverge. Returns the documents and every file it read.
pub fn kustomize(dir: &Path) -> Result<(Vec<Yaml>, Vec<PathBuf>), String> {
    let kfile = dir.join("kustomization.yaml");
    let k = yaml_documents(&kfile)
        .into_iter()
        .next()
        .ok_or_else(|| format!("{}: empty", kfile.display()))?;
    let mut read = vec![kfile.clone()];
    let known = [
        "apiVersion",
        "kind",
        "resources",
        "patches",
        "images",
        "labels",
    ];
    for key in k
        .as_mapping()
        .into_iter()
        .flatten()
        .filter_map(|(k, _)| k.as_str())
    {
        if !known.contains(&key) {
            return Err(format!(
                "{}: {key}: not understood by this check",
                kfile.display()
            ));
        }
    }
    let mut docs = Vec::new();
    for r in strings(k.get("resources")) {
        let p = dir.join(&r);
        if p.is_dir() {
            let (d, files) = kustomize(&p)?;
            docs.extend(d);
            read.extend(files);
        } else if p.is_file() {
            docs.extend(yaml_documents(&p));
            read.push(p);
        } else {
            return Err(format!("{}: resource {r} does not exist", kfile.display()));
        }
    }
    for patch in k
        .get("patches")
        .and_then(|p| p.as_sequence())
        .into_iter()
        .flatten()
    {
        let rel = str_at(patch, &["path"])
            .ok_or_else(|| format!("{}: a patch without path", kfile.display()))?;
        let p = dir.join(rel);
        if !p.is_file() {
            return Err(format!("{}: patch {rel} does not exist", kfile.display()));
        }
        for pd in yaml_documents(&p) {
            let id = kind_name(&pd);
            let target = docs
                .iter_mut()
                .find(|d| kind_name(d) == id)
                .ok_or_else(|| format!("{}: patches {id:?}, which no resource is", p.display()))?;
            strategic_merge(target, &pd);
        }
        read.push(p);
    }
    for image in k
        .get("images")
        .and_then(|i| i.as_sequence())
        .into_iter()
        .flatten()
    {
        let name = str_at(image, &["name"]).unwrap_or("");
        let new_name = str_at(image, &["newName"]).unwrap_or(name);
        let tag = get(image, &["newTag"]).map(|t| match t {
            Yaml::String(s) => s.clone(),
            other => serde_yaml::to_string(other)
                .unwrap_or_default()
                .trim()
                .to_string(),
        });
        for doc in docs.iter_mut() {
            for c in containers_mut(doc) {
                let current = str_at(c, &["image"]).unwrap_or("").to_string();
                let base = current.split(':').next().unwrap_or("");
                if base == name {
                    let new = match &tag {
                        Some(t) => format!("{new_name}:{t}"),
                        None => new_name.to_string(),
                    };
                    c["image"] = Yaml::String(new);
                }
            }
        }
    }
    Ok((docs, read))
}

fn containers_mut(doc: &mut Yaml) -> Vec<&mut Yaml> {
    let kind = str_at(doc, &["kind"]).unwrap_or("").to_string();
    let spec = match kind.as_str() {
        "Pod" => doc.get_mut("spec"),
        "Deployment" | "StatefulSet" | "DaemonSet" | "Job" | "ReplicaSet" => doc
            .get_mut("spec")
            .and_then(|s| s.get_mut("template"))
            .and_then(|t| t.get_mut("spec")),
        _ => None,
    };
    let Some(Yaml::Mapping(spec)) = spec else {
        return Vec::new();
    };
    spec.iter_mut()
        .filter(|(k, _)| matches!(k.as_str(), Some("containers") | Some("initContainers")))
        .filter_map(|(_, v)| v.as_sequence_mut())
        .flatten()
        .collect()
}

// ----- compose -----

/// Each compose service's ferry command line and the variables it sets. A service whose
/// entrypoint is another program (that runs no ferry command) is left out.
pub fn compose_services(origin: &str, doc: &Yaml) -> Vec<(String, Invocation, Vec<String>)> {
    let mut out = Vec::new();
    for (name, svc) in get(doc, &["services"])
        .and_then(|s| s.as_mapping())
        .into_iter()
        .flatten()
    {
        let name = name.as_str().unwrap_or("?").to_string();
        let words = |v: Option<&Yaml>| -> Vec<String> {
            match v {
                Some(Yaml::String(s)) => shlex::split(s).unwrap_or_default(),
                other => strings(other),
            }
        };
        let entrypoint = words(svc.get("entrypoint"));
        let mut argv = words(svc.get("command"));
        if let Some(first) = entrypoint.first() {
            // The slim coordinator takes `ferry coordinator`'s arguments.
            let slim = is_slim_coordinator_word(first);
            // Another program (the certificate step): it runs no ferry command, and must not
            // hide one either.
            if !slim && !is_ferry_word(first) {
                let all: Vec<String> = entrypoint.iter().chain(&argv).cloned().collect();
                let script = shlex::try_join(all.iter().map(String::as_str)).unwrap_or_default();
                assert!(
                    shell_invocations(origin, &script).is_empty(),
                    "{origin}: service {name} runs ferry through {first}: {all:?}"
                );
                continue;
            }
            let mut e = if slim {
                vec!["coordinator".to_string()]
            } else {
                Vec::new()
            };
            e.extend(entrypoint[1..].iter().cloned());
            e.extend(argv);
            argv = e;
        }
        let env = match svc.get("environment") {
            Some(Yaml::Mapping(m)) => m
                .keys()
                .filter_map(|k| k.as_str().map(str::to_string))
                .collect(),
            Some(seq @ Yaml::Sequence(_)) => strings(Some(seq))
                .into_iter()
                .map(|kv| kv.split('=').next().unwrap_or("").to_string())
                .collect(),
            _ => Vec::new(),
        };
        out.push((
            name.clone(),
            Invocation {
                origin: format!("{origin}: service {name}"),
                argv,
            },
            env,
        ));
    }
    out
}

// ----- Dockerfile -----

/// One instruction of a Dockerfile: keyword (upper case), its text, the stage it is in.
#[derive(Debug, Clone)]
pub struct Instruction {
    pub line: usize,
    pub stage: String,
    pub keyword: String,
    pub text: String,
}

pub fn dockerfile_instructions(text: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut stage = String::new();
    for (line, joined) in logical_lines(text) {
        let joined = joined.trim();
        if joined.is_empty() {
            continue;
        }
        let (keyword, rest) = joined
            .split_once(char::is_whitespace)
            .unwrap_or((joined, ""));
        let keyword = keyword.to_ascii_uppercase();
        if keyword == "FROM" {
            let words: Vec<&str> = rest.split_whitespace().collect();
            stage = match words.iter().position(|w| w.eq_ignore_ascii_case("as")) {
                Some(i) => words.get(i + 1).unwrap_or(&"").to_string(),
                None => words.first().unwrap_or(&"").to_string(),
            };
        }
        out.push(Instruction {
            line,
            stage: stage.clone(),
            keyword,
            text: rest.trim().to_string(),
        });
    }
    out
}

/// An exec-form (`["a", "b"]`) instruction's words; `None` for the shell form.
pub fn exec_form(text: &str) -> Option<Vec<String>> {
    serde_json::from_str::<Vec<String>>(text).ok()
}
