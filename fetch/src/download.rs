//! One HTTP(S) download into a `.part` file that survives interruptions.
//!
//! A `.part` file that exists is continued with `Range: bytes=N-`; a server that answers 200
//! instead of 206 sends the whole file again and the part is restarted. Every connect and every
//! read has a deadline, so a host that is unreachable, or that accepts and then says nothing,
//! ends the attempt instead of hanging it. Failed attempts are retried with backoff, each one
//! continuing from where the last stopped.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How patient a download is.
#[derive(Debug, Clone)]
pub struct Patience {
    /// Deadline for connecting, and for each read.
    pub timeout: Duration,
    /// Attempts after the first, per URL.
    pub retries: u32,
    /// Wait before the first retry; doubled for each further one, up to 30 s.
    pub backoff: Duration,
}

/// Why an attempt failed, and whether trying again could help.
#[derive(Debug)]
pub(crate) struct AttemptError {
    pub reason: String,
    pub retryable: bool,
}

impl AttemptError {
    fn retry(reason: String) -> Self {
        Self {
            reason,
            retryable: true,
        }
    }
    fn fatal(reason: String) -> Self {
        Self {
            reason,
            retryable: false,
        }
    }
}

pub(crate) struct Downloader {
    agent: ureq::Agent,
    patience: Patience,
    show_progress: bool,
}

impl Downloader {
    pub fn new(patience: Patience, show_progress: bool) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(patience.timeout)
            .timeout_read(patience.timeout)
            .timeout_write(patience.timeout)
            .user_agent(concat!("ferry/", env!("CARGO_PKG_VERSION")))
            .build();
        Self {
            agent,
            patience,
            show_progress,
        }
    }

    /// Download `url` into `part`, continuing what is there; retries per [`Patience`].
    /// On failure returns the last attempt's reason and how many attempts were made.
    pub fn fetch(&self, label: &str, url: &str, part: &Path) -> Result<(), (String, u32)> {
        let mut wait = self.patience.backoff;
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.attempt(label, url, part) {
                Ok(()) => return Ok(()),
                Err(e) if !e.retryable || attempts > self.patience.retries => {
                    return Err((e.reason, attempts))
                }
                Err(e) => {
                    eprintln!(
                        "{label}: {} (attempt {attempts} of {}); trying again in {:.0?}",
                        e.reason,
                        self.patience.retries + 1,
                        wait
                    );
                    std::thread::sleep(wait);
                    wait = next_backoff(wait);
                }
            }
        }
    }

    fn attempt(&self, label: &str, url: &str, part: &Path) -> Result<(), AttemptError> {
        let have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
        let mut request = self.agent.get(url);
        if have > 0 {
            request = request.set("Range", &format!("bytes={have}-"));
        }
        let response = match request.call() {
            Ok(r) => r,
            // The part already holds the whole file: the digest check decides whether it is right.
            Err(ureq::Error::Status(416, _)) if have > 0 => return Ok(()),
            Err(ureq::Error::Status(code, r)) => {
                let reason = format!("HTTP {code} {}", r.status_text());
                // Server trouble and rate limits pass; anything else (404, 403) will not.
                return Err(if code >= 500 || code == 408 || code == 429 {
                    AttemptError::retry(reason)
                } else {
                    AttemptError::fatal(reason)
                });
            }
            Err(ureq::Error::Transport(t)) => return Err(AttemptError::retry(transport(&t))),
        };
        let length: Option<u64> = response
            .header("Content-Length")
            .and_then(|v| v.parse().ok());
        let (mut file, start) = match response.status() {
            206 => {
                let start = content_range_start(response.header("Content-Range"));
                if start != Some(have) {
                    // Not the range asked for: start over rather than splice wrong bytes.
                    std::fs::remove_file(part).ok();
                    return Err(AttemptError::retry(format!(
                        "the server answered a different range ({:?}) than bytes={have}-",
                        response.header("Content-Range").unwrap_or("")
                    )));
                }
                let file = OpenOptions::new().append(true).open(part).map_err(|e| {
                    AttemptError::fatal(format!("cannot append to {}: {e}", part.display()))
                })?;
                (file, have)
            }
            _ => {
                let file = File::create(part).map_err(|e| {
                    AttemptError::fatal(format!("cannot write {}: {e}", part.display()))
                })?;
                (file, 0)
            }
        };
        let total = length.map(|l| start + l);
        let bar = self.progress(label, total, start);
        let mut reader = response.into_reader();
        let mut buf = vec![0u8; 1 << 16];
        let mut at = start;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    bar.abandon();
                    file.sync_all().ok();
                    return Err(AttemptError::retry(format!(
                        "the transfer broke off after {at} bytes: {e}"
                    )));
                }
            };
            file.write_all(&buf[..n]).map_err(|e| {
                AttemptError::fatal(format!("cannot write {}: {e}", part.display()))
            })?;
            at += n as u64;
            bar.set_position(at);
        }
        file.sync_all()
            .map_err(|e| AttemptError::fatal(format!("cannot write {}: {e}", part.display())))?;
        if let Some(total) = total {
            if at < total {
                bar.abandon();
                return Err(AttemptError::retry(format!(
                    "the connection closed after {at} of {total} bytes"
                )));
            }
        }
        bar.finish_and_clear();
        if !self.show_progress {
            eprintln!("{label}: downloaded {at} bytes");
        }
        Ok(())
    }

    fn progress(&self, label: &str, total: Option<u64>, at: u64) -> ProgressBar {
        if !self.show_progress {
            let from = if at > 0 {
                format!(", continuing at byte {at}")
            } else {
                String::new()
            };
            let size = total.map(|t| format!(" ({t} bytes)")).unwrap_or_default();
            eprintln!("{label}: downloading{size}{from}");
            return ProgressBar::hidden();
        }
        let bar = match total {
            Some(t) => ProgressBar::new(t),
            None => ProgressBar::new_spinner(),
        };
        let template = "{msg} {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}";
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style);
        }
        bar.set_message(label.to_string());
        bar.set_position(at);
        bar
    }
}

/// The wait after `wait`: doubled, at most [`MAX_BACKOFF`]. Doubling without a cap would turn
/// a large --retries into a sleep of years (and overflow `Duration`): a hang, not patience.
fn next_backoff(wait: Duration) -> Duration {
    wait.saturating_mul(2).min(MAX_BACKOFF)
}

/// The first byte of a `Content-Range: bytes A-B/N` header.
fn content_range_start(header: Option<&str>) -> Option<u64> {
    let rest = header?.trim().strip_prefix("bytes ")?;
    rest.split('-').next()?.trim().parse().ok()
}

/// ureq's transport errors, in one line without the URL (the caller names it).
fn transport(t: &ureq::Transport) -> String {
    let mut s = match t.message() {
        Some(m) => format!("{}: {m}", t.kind()),
        None => t.kind().to_string(),
    };
    if let Some(source) = std::error::Error::source(t) {
        s.push_str(&format!(": {source}"));
    }
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_however_many_retries() {
        let mut wait = Duration::from_secs(1);
        let mut waits = Vec::new();
        for _ in 0..200 {
            waits.push(wait);
            wait = next_backoff(wait);
        }
        assert_eq!(
            waits[..6].iter().map(Duration::as_secs).collect::<Vec<_>>(),
            [1, 2, 4, 8, 16, 30]
        );
        assert!(waits.iter().all(|w| *w <= MAX_BACKOFF));
    }

    #[test]
    fn content_range_gives_its_first_byte() {
        assert_eq!(content_range_start(Some("bytes 100-199/200")), Some(100));
        assert_eq!(content_range_start(Some("bytes */200")), None);
        assert_eq!(content_range_start(None), None);
    }
}
