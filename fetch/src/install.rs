//! From a checked download to files in the data directory, and the stamps that make a second
//! run a no-op.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::digest::{Digest, Hashing};
use crate::sources::{Source, Unpack};
use crate::{check, io, FetchError};

/// What a fetched source left in the data directory, written last, so its presence means the
/// files were all checked and moved into place.
#[derive(Serialize, Deserialize)]
struct Stamp {
    source: String,
    download_sha256: String,
    files: Vec<StampedFile>,
}

#[derive(Serialize, Deserialize, PartialEq, Eq)]
struct StampedFile {
    path: PathBuf,
    bytes: u64,
    sha256: String,
}

fn stamp_path(data_dir: &Path, source: &Source) -> PathBuf {
    data_dir
        .join(crate::WORK_DIR)
        .join(format!("{}.json", source.name))
}

/// True when the stamp says this source was fetched with the pins it has now, and every file
/// it gave is still there with its size. (A full re-hash would read 600 MB on every run.)
pub(crate) fn is_up_to_date(data_dir: &Path, source: &Source) -> bool {
    let Ok(text) = std::fs::read_to_string(stamp_path(data_dir, source)) else {
        return false;
    };
    let Ok(stamp) = serde_json::from_str::<Stamp>(&text) else {
        return false;
    };
    if let Some(pin) = &source.pins.sha256 {
        if pin != &stamp.download_sha256 {
            return false;
        }
    }
    let wanted: Vec<&Path> = source.files.iter().map(|m| m.to.as_path()).collect();
    let stamped: Vec<&Path> = stamp.files.iter().map(|f| f.path.as_path()).collect();
    wanted == stamped
        && stamp.files.iter().all(|f| {
            std::fs::metadata(data_dir.join(&f.path))
                .is_ok_and(|m| m.is_file() && m.len() == f.bytes)
        })
}

/// Unpack (or move) a checked download into `data_dir`. Returns how many files it installed.
pub(crate) fn install(
    data_dir: &Path,
    work: &Path,
    source: &Source,
    part: &Path,
    download: &Digest,
    overwrite: bool,
) -> Result<usize, FetchError> {
    let staging = work.join(format!("{}.staging", source.name));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| io(&staging, e))?;
    }
    let staged: Vec<(PathBuf, PathBuf, Digest)> = match source.unpack {
        Unpack::None => {
            let member = &source.files[0];
            vec![(part.to_path_buf(), member.to.clone(), download.clone())]
        }
        Unpack::Zip => match unzip(source, part, &staging) {
            Ok(staged) => staged,
            Err(e) => {
                // An archive whose members fail their checks is not kept for a next run either.
                std::fs::remove_dir_all(&staging).ok();
                std::fs::remove_file(part).ok();
                return Err(e);
            }
        },
    };
    // Nothing moves until every file has passed its checks, and nothing that differs is
    // replaced without --overwrite.
    for (_, to, digest) in &staged {
        let target = data_dir.join(to);
        if target.exists() && !overwrite && Digest::of_file(&target)? != *digest {
            std::fs::remove_dir_all(&staging).ok();
            return Err(FetchError::Install {
                source_name: source.name.clone(),
                reason: format!(
                    "{} exists and is not the file this source gives; move it away or pass \
                     --overwrite (the checked download stays in {} for the next run)",
                    target.display(),
                    part.display()
                ),
            });
        }
    }
    for (from, to, _) in &staged {
        let target = data_dir.join(to);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        std::fs::rename(from, &target).map_err(|e| io(&target, e))?;
        sync_dir(target.parent().unwrap_or(data_dir));
    }
    let stamp = Stamp {
        source: source.name.clone(),
        download_sha256: download.sha256.clone(),
        files: staged
            .iter()
            .map(|(_, to, d)| StampedFile {
                path: to.clone(),
                bytes: d.bytes,
                sha256: d.sha256.clone(),
            })
            .collect(),
    };
    let path = stamp_path(data_dir, source);
    let tmp = path.with_extension("json.tmp");
    let json = serde_json::to_string_pretty(&stamp).expect("a stamp serializes");
    std::fs::write(&tmp, json).map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| io(&path, e))?;
    if source.unpack != Unpack::None {
        std::fs::remove_file(part).ok();
        std::fs::remove_dir_all(&staging).ok();
    }
    for (_, to, d) in &staged {
        eprintln!(
            "{}: {} ({} bytes, sha256 {})",
            source.name,
            to.display(),
            d.bytes,
            d.sha256
        );
    }
    Ok(staged.len())
}

/// Extract the listed members into `staging`, hashing as they are written, and check each.
fn unzip(
    source: &Source,
    part: &Path,
    staging: &Path,
) -> Result<Vec<(PathBuf, PathBuf, Digest)>, FetchError> {
    let bad = |reason: String| FetchError::Install {
        source_name: source.name.clone(),
        reason,
    };
    let file = File::open(part).map_err(|e| io(part, e))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| {
        bad(format!(
            "{} is not a readable zip archive: {e}",
            part.display()
        ))
    })?;
    let mut staged = Vec::new();
    for member in &source.files {
        let mut entry = archive.by_name(&member.from).map_err(|e| {
            bad(format!(
                "the archive has no member {:?} ({e}); the sources file is wrong",
                member.from
            ))
        })?;
        let out = staging.join(&member.to);
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        let writer = File::create(&out).map_err(|e| io(&out, e))?;
        let mut hashing = Hashing::new(writer);
        // zip checks each member's CRC-32 when it is read to the end.
        std::io::copy(&mut entry, &mut hashing)
            .map_err(|e| bad(format!("cannot extract {:?}: {e}", member.from)))?;
        let (writer, digest) = hashing.finish();
        writer.sync_all().map_err(|e| io(&out, e))?;
        let what = format!("archive member {:?}", member.from);
        check(&source.name, &what, &digest, &member.pins, member.min_bytes)?;
        staged.push((out, member.to.clone(), digest));
    }
    Ok(staged)
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        d.sync_all().ok();
    }
}

/// Held while a fetch writes into a data directory, so two runs cannot interleave their parts.
/// An advisory lock: it goes away with the process, however that ends.
pub(crate) struct WorkLock(#[allow(dead_code)] File);

impl WorkLock {
    pub fn take(work: &Path) -> Result<Self, FetchError> {
        let path = work.join("lock");
        let file = File::create(&path).map_err(|e| io(&path, e))?;
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Err(FetchError::Io {
                path,
                reason: "another `ferry data fetch` is writing this data directory".into(),
            });
        }
        Ok(Self(file))
    }
}
