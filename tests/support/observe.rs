//! Looking at a running job from outside, as an operator's tools do: HTTP GETs with timeouts
//! and the Prometheus text format.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::time::Duration;

/// One HTTP/1.1 GET; returns (status code, body). Every step has a timeout.
pub fn get(addr: &str, path: &str) -> Result<(u16, String), String> {
    let sock: std::net::SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .map_err(|e| format!("read from {addr}{path}: {e}"))?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{addr}{path}: no status line in {head:?}"))?;
    // axum answers with a content length, never chunked, for these small bodies.
    Ok((code, body.to_string()))
}

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    /// The raw label set, `{a="b"}`, or empty.
    pub labels: String,
    pub value: f64,
}

/// Parses the text format (0.0.4): `name{labels} value [timestamp]`, `#` lines skipped.
pub fn parse_prometheus(text: &str) -> Result<Vec<Sample>, String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, rest) = match line.find('}') {
            Some(close) => (&line[..=close], line[close + 1..].trim()),
            None => line
                .split_once(' ')
                .map(|(a, b)| (a, b.trim()))
                .ok_or_else(|| format!("not a sample: {line:?}"))?,
        };
        let (name, labels) = match series.find('{') {
            Some(open) => (&series[..open], &series[open..]),
            None => (series, ""),
        };
        let value = rest
            .split_whitespace()
            .next()
            .ok_or_else(|| format!("no value: {line:?}"))?;
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().map_err(|_| format!("bad value in {line:?}"))?,
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            return Err(format!("bad metric name in {line:?}"));
        }
        out.push(Sample {
            name: name.to_string(),
            labels: labels.to_string(),
            value,
        });
    }
    Ok(out)
}

/// The value of an unlabelled series.
pub fn value(samples: &[Sample], name: &str) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.name == name && s.labels.is_empty())
        .map(|s| s.value)
}
