//! `ferry data fetch` against a real HTTP server on loopback that serves the shared corpora.
//!
//! These machines cannot reach the internet, so the server stands in for the public hosts: it
//! speaks HTTP/1.1 with byte ranges, and can cut a transfer in the middle or flip a byte. The
//! pins in each test's sources file are the shared data's own `SHA256SUMS`, never digests of
//! what the server sends, so a corrupted byte is caught the way a real one would be.

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};
use support::*;

// ---- the tests ---------------------------------------------------------------------------

#[test]
fn a_fresh_fetch_installs_checked_files_and_a_second_run_does_nothing() {
    let server = FileServer::start();
    let fixture = Fixture::new("fetch-fresh", &server);

    let out = run_ok(&mut fixture.fetch());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("fetched and checked"), "{stdout}");
    fixture.assert_installed();
    let work = fixture.data.join(".ferry-fetch");
    let left: Vec<String> = names(&work).into_iter().filter(|n| n != "lock").collect();
    assert_eq!(
        left,
        ["airline.json", "wikitext.json"],
        "only the stamps stay in {}",
        work.display()
    );
    assert_eq!(server.requests().len(), 2, "one request per source");

    // The second run: no request at all, no file rewritten.
    let before = fixture.mtimes();
    let out = run_ok(&mut fixture.fetch());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("up to date").count(), 2, "{stdout}");
    assert_eq!(
        server.requests().len(),
        2,
        "the second run asked the server: {:?}",
        server.requests()
    );
    assert_eq!(fixture.mtimes(), before);

    // A file that went missing is fetched again, and only its source.
    std::fs::remove_file(fixture.data.join("airline/Tweets.csv")).unwrap();
    run_ok(&mut fixture.fetch());
    assert_eq!(server.requests().len(), 3);
    fixture.assert_installed();
}

#[test]
fn a_transfer_cut_in_the_middle_resumes_where_it_stopped() {
    let server = FileServer::start();
    let fixture = Fixture::new("fetch-resume", &server);
    let cut_at = 1_000_000;

    // Cut with no retries allowed: the run fails, naming the cut, and keeps the part.
    server.cut_next("/Tweets.csv", cut_at);
    let line = fetch_err(
        fixture
            .fetch()
            .args(["--only", "airline", "--retries", "0"]),
    );
    assert!(
        line.contains("airline") && line.contains(&format!("after {cut_at}")),
        "{line}"
    );
    let part = fixture.data.join(".ferry-fetch/airline.part");
    assert_eq!(std::fs::metadata(&part).unwrap().len(), cut_at as u64);
    assert!(!fixture.data.join("airline/Tweets.csv").exists());

    // The next run asks only for the rest, and the result is the whole file.
    run_ok(fixture.fetch().args(["--only", "airline"]));
    let last = server.requests().last().cloned().unwrap();
    assert_eq!(
        last,
        ("/Tweets.csv".to_string(), Some(cut_at as u64)),
        "{:?}",
        server.requests()
    );
    assert!(!part.exists());
    assert_same_file(
        &fixture.data.join("airline/Tweets.csv"),
        &data_dir().join("airline/Tweets.csv"),
    );

    // Cut again in a run that may retry: it resumes by itself and finishes in one run.
    std::fs::remove_file(fixture.data.join("airline/Tweets.csv")).unwrap();
    server.cut_next("/Tweets.csv", 300_000);
    let before = server.requests().len();
    let out = run_ok(fixture.fetch().args(["--only", "airline"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("trying again"), "{stderr}");
    let asked = &server.requests()[before..];
    assert_eq!(
        asked,
        [
            ("/Tweets.csv".to_string(), None),
            ("/Tweets.csv".to_string(), Some(300_000))
        ]
    );
    assert_same_file(
        &fixture.data.join("airline/Tweets.csv"),
        &data_dir().join("airline/Tweets.csv"),
    );
}

#[test]
fn a_corrupted_byte_is_refused_and_nothing_of_it_is_left_in_place() {
    let server = FileServer::start();
    let fixture = Fixture::new("fetch-corrupt", &server);

    // A plain file: the download's sha256 differs from the pin.
    server.corrupt("/Tweets.csv", 123_456);
    let line = fetch_err(fixture.fetch().args(["--only", "airline"]));
    let pinned = &fixture.pins["airline/Tweets.csv"];
    assert!(line.contains("airline: the download has sha256"), "{line}");
    assert!(
        line.contains(&format!("but {pinned} is pinned")) && line.contains("deleted the download"),
        "{line}"
    );
    assert!(!fixture.data.join("airline/Tweets.csv").exists());
    assert!(!fixture.data.join(".ferry-fetch/airline.part").exists());

    // An archive member whose digest differs (the archive itself is unpinned here, so the
    // member's own pin is what catches it): nothing is installed, no staging is left.
    let line = fetch_err(
        fixture
            .fetch()
            .args(["--only", "wikitext", "--sources"])
            .arg(fixture.sources_with_wrong_member_pin()),
    );
    assert!(
        line.contains("archive member \"wikitext-2/wiki.test.tokens\" has sha256"),
        "{line}"
    );
    assert!(!fixture.data.join("wikitext").exists());
    assert_eq!(names(&fixture.data.join(".ferry-fetch")), ["lock"]);

    // With the server fixed, the same command succeeds from a clean start.
    server.repair("/Tweets.csv");
    run_ok(&mut fixture.fetch());
    fixture.assert_installed();

    // A file already in the data directory that differs is not replaced without --overwrite.
    let tweets = fixture.data.join("airline/Tweets.csv");
    std::fs::write(&tweets, "tweet_id,text\n1,mine\n").unwrap();
    std::fs::remove_file(fixture.data.join(".ferry-fetch/airline.json")).unwrap();
    let line = fetch_err(fixture.fetch().args(["--only", "airline"]));
    assert!(
        line.contains("exists and is not the file this source gives")
            && line.contains("--overwrite"),
        "{line}"
    );
    assert_eq!(
        std::fs::read_to_string(&tweets).unwrap(),
        "tweet_id,text\n1,mine\n"
    );
    run_ok(fixture.fetch().args(["--only", "airline", "--overwrite"]));
    assert_same_file(&tweets, &data_dir().join("airline/Tweets.csv"));
}

#[test]
fn an_unreachable_or_silent_host_fails_with_one_line_and_never_hangs() {
    let server = FileServer::start();
    let fixture = Fixture::new("fetch-unreachable", &server);

    // Nothing listens on the port: refused at once.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let sources = fixture.sources_at(&format!("http://{closed}"));
    let started = Instant::now();
    let line = run_err(
        fixture
            .fetch()
            .args(["--retries", "0", "--sources"])
            .arg(&sources),
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        line.contains(&format!("could not download http://{closed}/"))
            && line.contains("(1 attempt)"),
        "{line}"
    );

    // With the default retries it gives up as clearly, after backing off.
    let started = Instant::now();
    let out = fixture
        .fetch()
        .args(["--sources"])
        .arg(&sources)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or("");
    assert!(
        last.starts_with("error: wikitext: could not download") && last.contains("(4 attempts)"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "took {:?}",
        started.elapsed()
    );

    // A host that accepts the connection and then says nothing: the read deadline ends it.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        for conn in silent.incoming().flatten() {
            keep.lock().unwrap().push(conn);
        }
    });
    let started = Instant::now();
    let line = run_err(
        fixture
            .fetch()
            .args(["--retries", "0", "--timeout-s", "1", "--sources"])
            .arg(fixture.sources_at(&format!("http://{silent_addr}"))),
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        line.contains("could not download") && line.to_lowercase().contains("timed out"),
        "{line}"
    );
    assert!(!fixture.data.join("wikitext").exists());
}

// ---- a data directory to fetch into, and the sources file that points at the server --------

struct Fixture {
    data: PathBuf,
    sources: PathBuf,
    base: String,
    /// The shared data's SHA256SUMS: relative path -> sha256.
    pins: HashMap<String, String>,
}

impl Fixture {
    fn new(name: &str, server: &FileServer) -> Fixture {
        let dir = scratch(name);
        std::fs::create_dir_all(&dir).unwrap();
        let pins = shared_pins();
        server.serve("/wikitext-2.zip", wikitext_zip());
        server.serve(
            "/Tweets.csv",
            std::fs::read(data_dir().join("airline/Tweets.csv")).unwrap(),
        );
        let base = format!("http://{}", server.addr);
        let mut f = Fixture {
            data: dir.join("data"),
            sources: dir.join("sources.toml"),
            base: base.clone(),
            pins,
        };
        f.sources = f.sources_at(&base);
        f
    }

    /// A sources file with both sources at `base`.
    fn sources_at(&self, base: &str) -> PathBuf {
        let text = self.sources_text(base, &self.pins["wikitext/wiki.test.tokens"]);
        let path = self
            .data
            .with_file_name(format!("sources-{}.toml", hex(base.as_bytes())));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn sources_with_wrong_member_pin(&self) -> PathBuf {
        let text = self.sources_text(&self.base, &"0".repeat(64));
        let path = self.data.with_file_name("sources-wrong-pin.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn sources_text(&self, base: &str, test_tokens_pin: &str) -> String {
        format!(
            r#"
[[source]]
name = "wikitext"
url = "{base}/wikitext-2.zip"
unpinned = "the test builds this archive; its members are pinned"
unpack = "zip"
files = [
    {{ from = "wikitext-2/wiki.valid.tokens", to = "wikitext/wiki.valid.tokens", sha256 = "{valid}" }},
    {{ from = "wikitext-2/wiki.test.tokens", to = "wikitext/wiki.test.tokens", sha256 = "{test_tokens_pin}" }},
]

[[source]]
name = "airline"
url = "{base}/Tweets.csv"
sha256 = "{tweets}"
to = "airline/Tweets.csv"
"#,
            valid = self.pins["wikitext/wiki.valid.tokens"],
            tweets = self.pins["airline/Tweets.csv"],
        )
    }

    fn fetch(&self) -> std::process::Command {
        let mut c = ferry();
        c.args(["data", "fetch", "--timeout-s", "10", "--data-dir"])
            .arg(&self.data);
        c.arg("--sources").arg(&self.sources);
        c
    }

    fn assert_installed(&self) {
        for rel in [
            "wikitext/wiki.valid.tokens",
            "wikitext/wiki.test.tokens",
            "airline/Tweets.csv",
        ] {
            assert_same_file(&self.data.join(rel), &data_dir().join(rel));
        }
    }

    fn mtimes(&self) -> Vec<SystemTime> {
        [
            "wikitext/wiki.valid.tokens",
            "wikitext/wiki.test.tokens",
            "airline/Tweets.csv",
        ]
        .iter()
        .map(|rel| {
            std::fs::metadata(self.data.join(rel))
                .unwrap()
                .modified()
                .unwrap()
        })
        .collect()
    }
}

fn shared_pins() -> HashMap<String, String> {
    let sums = std::fs::read_to_string(data_dir().join("SHA256SUMS")).expect("shared SHA256SUMS");
    sums.lines()
        .filter_map(|l| l.split_once("  "))
        .map(|(sum, path)| (path.trim_start_matches("./").to_string(), sum.to_string()))
        .collect()
}

/// The shared WikiText validation and test files as a zip, laid out as wikitext-2-v1.zip is.
fn wikitext_zip() -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts =
        zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for name in ["wiki.valid.tokens", "wiki.test.tokens"] {
        zip.start_file(format!("wikitext-2/{name}"), opts).unwrap();
        zip.write_all(&std::fs::read(data_dir().join("wikitext").join(name)).unwrap())
            .unwrap();
    }
    zip.finish().unwrap().into_inner()
}

/// A fetch that must fail cleanly: exit 1, no panic, its progress lines and then exactly one
/// error line, last, which is returned.
fn fetch_err(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().expect("spawn");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{cmd:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert_eq!(
        stderr.lines().last(),
        Some(errors[0]),
        "the error comes last: {stderr}"
    );
    errors[0].to_string()
}

fn assert_same_file(got: &Path, want: &Path) {
    let a = std::fs::read(got).unwrap_or_else(|e| panic!("{}: {e}", got.display()));
    let b = std::fs::read(want).unwrap();
    assert!(a == b, "{} differs from {}", got.display(), want.display());
    assert_eq!(hex(&Sha256::digest(&a)), hex(&Sha256::digest(&b)));
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---- a small HTTP/1.1 file server with byte ranges and injected faults ----------------------

#[derive(Clone, Default)]
struct Served {
    body: Vec<u8>,
    /// Cut the next response after this many body bytes (then serve normally).
    cut_next: Option<usize>,
    /// Flip this byte in every response.
    corrupt: Option<usize>,
}

struct FileServer {
    addr: std::net::SocketAddr,
    files: Arc<Mutex<HashMap<String, Served>>>,
    /// Every request: (path, first byte asked for by a Range header).
    log: Arc<Mutex<Vec<(String, Option<u64>)>>>,
}

impl FileServer {
    fn start() -> FileServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = FileServer {
            addr: listener.local_addr().unwrap(),
            files: Arc::default(),
            log: Arc::default(),
        };
        let (files, log) = (server.files.clone(), server.log.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (files, log) = (files.clone(), log.clone());
                std::thread::spawn(move || {
                    let _ = answer(conn, &files, &log);
                });
            }
        });
        server
    }

    fn serve(&self, path: &str, body: Vec<u8>) {
        self.files.lock().unwrap().insert(
            path.into(),
            Served {
                body,
                ..Served::default()
            },
        );
    }
    fn cut_next(&self, path: &str, after: usize) {
        self.files.lock().unwrap().get_mut(path).unwrap().cut_next = Some(after);
    }
    fn corrupt(&self, path: &str, at: usize) {
        self.files.lock().unwrap().get_mut(path).unwrap().corrupt = Some(at);
    }
    fn repair(&self, path: &str) {
        self.files.lock().unwrap().get_mut(path).unwrap().corrupt = None;
    }
    fn requests(&self) -> Vec<(String, Option<u64>)> {
        self.log.lock().unwrap().clone()
    }
}

fn answer(
    mut conn: TcpStream,
    files: &Mutex<HashMap<String, Served>>,
    log: &Mutex<Vec<(String, Option<u64>)>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_string();
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("range") {
                let first = value
                    .trim()
                    .trim_start_matches("bytes=")
                    .trim_end_matches('-');
                range = first.parse::<u64>().ok();
            }
        }
    }
    log.lock().unwrap().push((path.clone(), range));
    let served = {
        let mut files = files.lock().unwrap();
        match files.get_mut(&path) {
            Some(f) => {
                let copy = f.clone();
                f.cut_next = None;
                copy
            }
            None => {
                conn.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )?;
                return Ok(());
            }
        }
    };
    let mut body = served.body;
    if let Some(at) = served.corrupt {
        body[at] ^= 0x20;
    }
    let len = body.len() as u64;
    let start = range.unwrap_or(0);
    if start >= len && range.is_some() {
        let head = format!("HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return conn.write_all(head.as_bytes());
    }
    let rest = &body[start as usize..];
    let head = match range {
        Some(_) => format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{}/{len}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            len - 1,
            rest.len()
        ),
        None => format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", rest.len()),
    };
    conn.write_all(head.as_bytes())?;
    match served.cut_next {
        Some(after) => {
            conn.write_all(&rest[..after.min(rest.len())])?;
            conn.flush()?;
            conn.shutdown(Shutdown::Both)
        }
        None => conn.write_all(rest),
    }
}
