//! `hydrafy runner-config`: mount the seed into every docker runner.
//!
//! The last manual step of the old recipe was editing gitlab-runner's
//! `config.toml` by hand: for each `[[runners]]` with `executor = "docker"`,
//! add the seed's `nix/store` and `nix/var/nix/db` to `[runners.docker]
//! volumes`. That file also holds the runners' tokens and the operator's
//! comments, and gitlab-runner rereads it on its own, so the edit is done with
//! `toml_edit` (every other byte, comment and indentation stays), shown as a
//! unified diff first, and written only with `--write`: backup, temporary
//! file in the same directory with the original mode and owner, one rename.
//!
//! A runner that already mounts something else at `/nix/store` or
//! `/nix/var/nix/db` (or ours read-only) is an error naming the runner and
//! the volume, and nothing is changed: which of two stores the jobs should
//! see is the operator's call, not ours. Executors like `docker+machine` or
//! `docker-autoscaler` run jobs on other hosts, where DIR does not exist, so
//! they are skipped with a warning.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use serde::Serialize;
use toml_edit::{Array, DocumentMut, Item, Table, TableLike, Value};

use crate::error::{Error, Result};
use crate::ui::progress::Reporter;

/// Where the seed's two folders appear inside job containers.
const MOUNTS: [(&str, &str); 2] = [
    ("nix/store", "/nix/store"),
    ("nix/var/nix/db", "/nix/var/nix/db"),
];

/// What to do.
#[derive(Debug, Clone)]
pub struct RunnerConfigOptions {
    /// gitlab-runner's `config.toml`.
    pub config: PathBuf,
    /// The seed (`hydrafy fetch -o DIR`); made absolute.
    pub nix_backup: PathBuf,
    /// Replace the file; otherwise only print the diff.
    pub write: bool,
}

/// What was (or would be) done.
#[derive(Debug, Clone, Serialize)]
pub struct RunnerConfigReport {
    /// The file edited (symlinks resolved).
    pub config: PathBuf,
    /// The volumes every docker runner must have.
    pub volumes: Vec<String>,
    /// Names of the runners that gain volumes.
    pub changed: Vec<String>,
    /// Names of the docker runners that already had both.
    pub already_configured: Vec<String>,
    /// Runners left alone, with why.
    pub skipped: Vec<Skipped>,
    /// The change as a unified diff (empty when nothing changes).
    pub diff: String,
    /// Whether the file was replaced.
    pub written: bool,
    /// The copy of the original file, when it was replaced.
    pub backup: Option<PathBuf>,
}

/// A runner left alone.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub runner: String,
    pub reason: String,
}

/// Run `hydrafy runner-config`.
pub fn runner_config(
    opts: &RunnerConfigOptions,
    reporter: &dyn Reporter,
) -> Result<RunnerConfigReport> {
    let config = fs::canonicalize(&opts.config).map_err(|e| {
        Error::io(
            &opts.config,
            "cannot open the gitlab-runner config (usually /etc/gitlab-runner/config.toml, or ~/.gitlab-runner/config.toml for a user runner)",
            e,
        )
    })?;
    let original = fs::read(&config)
        .map_err(|e| Error::io(&config, "cannot read the gitlab-runner config", e))?;
    let text = String::from_utf8(original.clone()).map_err(|_| Error::RunnerConfig {
        path: config.clone(),
        reason: "is not UTF-8 text, so it is not a TOML file; fix it first".to_string(),
    })?;
    let mut doc: DocumentMut = text.parse().map_err(|e: toml_edit::TomlError| {
        let at = e.span().map_or(String::new(), |span| {
            let before = &text.as_bytes()[..span.start.min(text.len())];
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            let column = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
            format!(" at line {line}, column {column}")
        });
        Error::RunnerConfig {
            path: config.clone(),
            reason: format!("is not valid TOML{at} ({}); fix it first", e.message()),
        }
    })?;

    let seed = absolute_seed(&opts.nix_backup)?;
    if !seed.join("nix/store").is_dir() {
        reporter.warn(&format!(
            "{} does not exist yet; run `hydrafy fetch -o {}` before the runners start jobs",
            seed.join("nix/store").display(),
            seed.display()
        ));
    }
    let volumes: Vec<String> = MOUNTS
        .iter()
        .map(|(sub, dest)| format!("{}:{dest}:rw", seed.join(sub).display()))
        .collect();

    let mut report = RunnerConfigReport {
        config: config.clone(),
        volumes: volumes.clone(),
        changed: Vec::new(),
        already_configured: Vec::new(),
        skipped: Vec::new(),
        diff: String::new(),
        written: false,
        backup: None,
    };
    let runners = match doc.get_mut("runners") {
        Some(Item::ArrayOfTables(a)) if !a.is_empty() => a,
        _ => {
            return Err(Error::RunnerConfig {
                path: config,
                reason:
                    "has no [[runners]]; register a docker runner first (gitlab-runner register)"
                        .to_string(),
            });
        }
    };
    for (i, runner) in runners.iter_mut().enumerate() {
        let name = runner
            .get("name")
            .and_then(Item::as_str)
            .map_or_else(|| format!("#{} (no name)", i + 1), str::to_string);
        let executor = runner
            .get("executor")
            .and_then(Item::as_str)
            .unwrap_or("")
            .to_string();
        if executor != "docker" {
            let reason = if executor.starts_with("docker") {
                reporter.warn(&format!(
                    "runner {name}: executor {executor:?} runs jobs on other hosts, where {} does not exist; skipped",
                    seed.display()
                ));
                format!("executor {executor:?} runs jobs on other hosts")
            } else {
                format!("executor {executor:?} is not docker")
            };
            report.skipped.push(Skipped {
                runner: name,
                reason,
            });
            continue;
        }
        if add_volumes(runner, &name, &seed, &volumes, &config)? {
            report.changed.push(name);
        } else {
            report.already_configured.push(name);
        }
    }
    if report.changed.is_empty() && report.already_configured.is_empty() {
        return Err(Error::RunnerConfig {
            path: config,
            reason: "has no runner with executor = \"docker\"; the shared store only works for docker runners"
                .to_string(),
        });
    }
    let new_text = doc.to_string();
    if new_text == text {
        reporter.info(&format!(
            "already configured: runner(s) {} mount {}; nothing to do",
            report.already_configured.join(", "),
            seed.display()
        ));
        return Ok(report);
    }
    let shown = config.display().to_string();
    report.diff = similar::TextDiff::from_lines(&text, &new_text)
        .unified_diff()
        .context_radius(3)
        .header(&shown, &shown)
        .to_string();
    report.diff = redact_secrets(&report.diff);
    let non_docker: Vec<&str> = report.skipped.iter().map(|s| s.runner.as_str()).collect();
    if !non_docker.is_empty() {
        reporter.info(&format!(
            "left alone (not docker): {}",
            non_docker.join(", ")
        ));
    }
    if !opts.write {
        reporter.info(&format!(
            "would add the Nix store volumes to runner(s) {}; run again with --write to change {}",
            report.changed.join(", "),
            config.display()
        ));
        return Ok(report);
    }
    let backup = replace_file(&config, &original, new_text.as_bytes())?;
    reporter.info(&format!(
        "added the Nix store volumes to runner(s) {} in {} (the original is in {})",
        report.changed.join(", "),
        config.display(),
        backup.display()
    ));
    reporter.info(
        "gitlab-runner rereads config.toml by itself within seconds; `gitlab-runner restart` makes it immediate",
    );
    report.written = true;
    report.backup = Some(backup);
    Ok(report)
}

/// The diff's context lines may show a runner's `token` (or a cache's
/// `SecretKey`); a diff is printed to terminals and CI logs, so their values
/// are masked. Only context can hold them: hydrafy adds volume lines only.
fn redact_secrets(diff: &str) -> String {
    let mut out = String::with_capacity(diff.len());
    for line in diff.split_inclusive('\n') {
        let (marker, rest) = line.split_at(line.len().min(1));
        let secret = rest.split_once('=').is_some_and(|(key, _)| {
            let key = key.trim().trim_matches('"').to_ascii_lowercase();
            !line.starts_with("---")
                && !line.starts_with("+++")
                && !key.contains(' ')
                && (key.ends_with("token") || key.contains("secret") || key.contains("password"))
        });
        match rest.split_once('=') {
            Some((key, _)) if secret => {
                out.push_str(marker);
                out.push_str(key);
                out.push_str("= \"<redacted>\"");
                if line.ends_with('\n') {
                    out.push('\n');
                }
            }
            _ => out.push_str(line),
        }
    }
    out
}

/// DIR as an absolute path without `.` or `..`, fit for a docker volume.
fn absolute_seed(dir: &Path) -> Result<PathBuf> {
    let abs = match fs::canonicalize(dir) {
        Ok(p) => p,
        Err(_) => {
            let joined = std::path::absolute(dir)
                .map_err(|e| Error::io(dir, "cannot make the path absolute", e))?;
            let mut out = PathBuf::new();
            for c in joined.components() {
                match c {
                    Component::ParentDir => {
                        out.pop();
                    }
                    Component::CurDir => {}
                    other => out.push(other),
                }
            }
            out
        }
    };
    let text = abs.to_str().ok_or_else(|| {
        Error::invalid(
            "--nix-backup",
            dir.display().to_string(),
            "is not valid UTF-8, which config.toml cannot hold",
        )
    })?;
    if text.contains([':', ',']) || text.chars().any(char::is_control) {
        return Err(Error::invalid(
            "--nix-backup",
            text,
            "contains ':', ',' or a control character, which a docker volume cannot hold; move the seed",
        ));
    }
    Ok(abs)
}

/// A docker volume string, `[SOURCE:]DEST[:OPTIONS]`.
struct Volume<'a> {
    source: Option<&'a str>,
    dest: &'a str,
    read_only: bool,
}

fn parse_volume(spec: &str) -> Volume<'_> {
    let parts: Vec<&str> = spec.split(':').collect();
    let (source, dest, options) = match parts.as_slice() {
        [dest] => (None, *dest, ""),
        [source, dest] => (Some(*source), *dest, ""),
        [source, dest, options, ..] => (Some(*source), *dest, *options),
        [] => (None, "", ""),
    };
    Volume {
        source,
        dest,
        read_only: options.split(',').any(|o| o == "ro"),
    }
}

fn same_dir(a: &str, b: &str) -> bool {
    let norm = |s: &str| -> PathBuf { Path::new(s).components().collect() };
    norm(a) == norm(b)
}

/// Add the missing volumes to one docker runner of `config`. `Ok(true)` if
/// it changed, `Ok(false)` if it already had both, an error on a conflict.
fn add_volumes(
    runner: &mut Table,
    name: &str,
    seed: &Path,
    volumes: &[String],
    config: &Path,
) -> Result<bool> {
    let conflict = |reason: String| Error::RunnerConfig {
        path: config.to_path_buf(),
        reason,
    };
    let indent = key_indent(runner);
    if runner.get("docker").is_none() {
        let mut table = Table::new();
        table.decor_mut().set_prefix(indent.clone());
        runner.insert("docker", Item::Table(table));
    }
    let docker: &mut dyn TableLike = runner
        .get_mut("docker")
        .and_then(Item::as_table_like_mut)
        .ok_or_else(|| {
            conflict(format!(
                "runner {name}: `docker` is not a table; fix [runners.docker] first"
            ))
        })?;
    if docker.get("volumes").is_none() {
        let inner = docker
            .iter()
            .next()
            .map(|(k, _)| k.to_string())
            .and_then(|k| docker.key(&k).map(|k| prefix_of(k.leaf_decor())))
            .unwrap_or_else(|| format!("{indent}  "));
        docker.insert("volumes", Item::Value(Value::Array(Array::new())));
        if let Some(mut key) = docker.key_mut("volumes") {
            key.leaf_decor_mut().set_prefix(inner);
        }
    }
    let array = docker
        .get_mut("volumes")
        .and_then(Item::as_array_mut)
        .ok_or_else(|| {
            conflict(format!(
                "runner {name}: [runners.docker] volumes is not an array; fix it first"
            ))
        })?;
    let mut changed = false;
    for (want, (sub, dest)) in volumes.iter().zip(MOUNTS) {
        let ours = seed.join(sub);
        let mut present = false;
        for existing in array.iter().filter_map(Value::as_str) {
            let v = parse_volume(existing);
            if !same_dir(v.dest, dest) {
                continue;
            }
            let is_ours = v
                .source
                .is_some_and(|s| same_dir(s, &ours.to_string_lossy()));
            if is_ours && !v.read_only {
                present = true;
            } else if is_ours {
                return Err(conflict(format!(
                    "runner {name} mounts {existing:?} read-only; jobs must write to the store, \
                     so change it to {want:?} (nothing was changed)"
                )));
            } else {
                return Err(conflict(format!(
                    "runner {name} already mounts {existing:?} at {dest}; remove that volume \
                     to use {} instead, or leave this runner as it is (nothing was changed)",
                    seed.display()
                )));
            }
        }
        if !present {
            push_like_siblings(array, want);
            changed = true;
        }
    }
    Ok(changed)
}

/// The whitespace before the runner's first key (gitlab-runner indents by two).
fn key_indent(table: &Table) -> String {
    table
        .iter()
        .next()
        .and_then(|(k, _)| table.key(k))
        .map(|k| prefix_of(k.leaf_decor()))
        .unwrap_or_default()
}

fn prefix_of(decor: &toml_edit::Decor) -> String {
    decor
        .prefix()
        .and_then(|p| p.as_str())
        .map(|p| p.rsplit('\n').next().unwrap_or("").to_string())
        .unwrap_or_default()
}

/// Append `text` formatted like the array's last element: a one-per-line
/// array stays one per line (same indentation, the closing bracket where it
/// was); a one-line array gets toml_edit's `, "x"`.
fn push_like_siblings(array: &mut Array, text: &str) {
    let mut value = Value::from(text);
    let raw =
        |r: Option<&toml_edit::RawString>| r.and_then(|r| r.as_str()).unwrap_or("").to_string();
    if let Some(last) = array.iter_mut().last() {
        let prefix = raw(last.decor().prefix());
        let suffix = raw(last.decor().suffix());
        if prefix.contains('\n') {
            // Copy the indentation, not a comment line above the last element.
            let indent = prefix.rsplit('\n').next().unwrap_or("");
            value.decor_mut().set_prefix(format!("\n{indent}"));
            // No trailing comma: the newline before `]` moves after our element.
            if suffix.contains('\n') && !suffix.contains('#') {
                value.decor_mut().set_suffix(suffix);
                last.decor_mut().set_suffix("");
            }
        }
    }
    array.push_formatted(value);
}

/// Replace `path` with `new`, keeping a backup of `original`: refuse if the
/// file changed since it was read (gitlab-runner rewrites it, e.g. when it
/// renews a token), write a temporary file in the same directory with the
/// original's mode and owner, flush it, rename it over. Returns the backup.
fn replace_file(path: &Path, original: &[u8], new: &[u8]) -> Result<PathBuf> {
    let meta = fs::metadata(path).map_err(|e| Error::io(path, "cannot stat", e))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "config.toml".to_string());

    let unchanged = |when: &str| -> Result<()> {
        let now = fs::read(path).map_err(|e| Error::io(path, "cannot read", e))?;
        if now == original {
            Ok(())
        } else {
            Err(Error::RunnerConfig {
                path: path.to_path_buf(),
                reason: format!(
                    "changed while hydrafy was editing it ({when}); nothing was written, run again"
                ),
            })
        }
    };
    unchanged("before the backup")?;

    let mut n = 0;
    let backup = loop {
        let candidate = if n == 0 {
            dir.join(format!("{name}.bak"))
        } else {
            dir.join(format!("{name}.bak.{n}"))
        };
        match create_like(&candidate, &meta) {
            Ok(file) => break (candidate, file),
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::AlreadyExists => {
                n += 1;
            }
            Err(e) => return Err(e),
        }
    };
    let (backup, mut file) = backup;
    write_all_sync(&mut file, &backup, original)?;
    drop(file);

    let tmp = dir.join(format!(".{name}.hydrafy-{:08x}.tmp", fastrand::u32(..)));
    let result = (|| {
        let mut file = create_like(&tmp, &meta)?;
        write_all_sync(&mut file, &tmp, new)?;
        drop(file);
        unchanged("before the rename")?;
        fs::rename(&tmp, path).map_err(|e| Error::io(path, "cannot replace the config", e))?;
        let d = File::open(dir).map_err(|e| Error::io(dir, "cannot open directory", e))?;
        d.sync_all()
            .map_err(|e| Error::io(dir, "cannot flush directory", e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    Ok(backup)
}

/// A new file (never an existing one) with `like`'s mode and owner.
fn create_like(path: &Path, like: &fs::Metadata) -> Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(path, "cannot create", e))?;
    let done = (|| {
        if like.uid() != rustix::process::geteuid().as_raw()
            || like.gid() != rustix::process::getegid().as_raw()
        {
            std::os::unix::fs::fchown(&file, Some(like.uid()), Some(like.gid())).map_err(|e| {
                Error::io(
                    path,
                    "cannot give the file the config's owner (run as the owner or as root)",
                    e,
                )
            })?;
        }
        file.set_permissions(fs::Permissions::from_mode(like.mode() & 0o7777))
            .map_err(|e| Error::io(path, "cannot set the config's mode", e))
    })();
    if let Err(e) = done {
        let _ = fs::remove_file(path);
        return Err(e);
    }
    Ok(file)
}

fn write_all_sync(file: &mut File, path: &Path, bytes: &[u8]) -> Result<()> {
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io(path, "cannot write", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_in_diff_context_are_masked() {
        let diff = "@@ -1,3 +1,4 @@\n   token = \"glrt-x\"\n   SecretKey = \"k\"\n   executor = \"docker\"\n+  [runners.docker]\n";
        let out = redact_secrets(diff);
        assert!(!out.contains("glrt-x") && !out.contains("\"k\""), "{out}");
        assert!(out.contains("   token = \"<redacted>\"\n"), "{out}");
        assert!(out.contains("executor = \"docker\"") && out.contains("+  [runners.docker]"));
    }

    #[test]
    fn volume_strings_parse_as_docker_reads_them() {
        let v = parse_volume("/srv/nb/nix/store:/nix/store:ro,z");
        assert_eq!(
            (v.source, v.dest, v.read_only),
            (Some("/srv/nb/nix/store"), "/nix/store", true)
        );
        let v = parse_volume("/cache");
        assert_eq!((v.source, v.dest, v.read_only), (None, "/cache", false));
        assert!(same_dir("/nix/store/", "/nix/store"));
        assert!(!same_dir("/nix/store2", "/nix/store"));
    }
}
