//! Entry points for `fuzz/fuzz_targets/ring_handshake.rs`, kept out of `handshake.rs`: the
//! acceptor's hello check, the acceptor's whole exchange with a connector that sends
//! arbitrary bytes, and the connector's with an acceptor that answers arbitrary bytes, each
//! over a loopback connection. Not an API: nothing else may use it.

use super::{authenticate_connector, try_connect, Link, ACCEPTED, HELLO_BYTES, NONCE_BYTES};
use super::{HANDSHAKE_TIMEOUT, MAC_BYTES, OPTION_MESSAGE_MAC};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// What both ends of one ring link agree on.
#[derive(Clone)]
pub struct FuzzLink(Link);

/// What the far end sends after the first message: bytes of the fuzzer's choosing, or the
/// correct MAC for the exchange so far (so that the fuzzer can reach the end of it).
#[derive(Clone, Debug)]
pub enum Reply {
    Bytes(Vec<u8>),
    Correct,
}

impl FuzzLink {
    pub fn new(
        token: &[u8],
        generation: u64,
        (from, to, world): (u32, u32, u32),
        message_mac: bool,
    ) -> FuzzLink {
        FuzzLink(Link {
            token: token.into(),
            generation,
            from,
            to,
            world,
            options: if message_mac { OPTION_MESSAGE_MAC } else { 0 },
        })
    }

    /// The hello a connector on this link sends.
    pub fn hello(&self, nonce: &[u8; NONCE_BYTES]) -> Vec<u8> {
        self.0.hello(nonce).to_vec()
    }

    /// [`Link::check_hello`] on the first hello-sized bytes; an error when there are fewer.
    pub fn check_hello(&self, bytes: &[u8]) -> Result<[u8; NONCE_BYTES], String> {
        let hello: &[u8; HELLO_BYTES] = bytes
            .get(..HELLO_BYTES)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| format!("{} bytes, a hello has {HELLO_BYTES}", bytes.len()))?;
        self.0.check_hello(hello)
    }

    /// The acceptor's side, [`authenticate_connector`], against a connector that sends
    /// `hello` (closing its side when that is shorter than a hello), reads the challenge and
    /// then sends `answer`. `Err` carries the acceptor's refusal; a failure to set up the
    /// loopback connection is `None`.
    pub fn accept_from(&self, hello: &[u8], answer: Reply) -> Option<Result<(), String>> {
        let (server, client) = loopback_pair()?;
        let link = self.0.clone();
        let hello = hello.to_vec();
        let connector = std::thread::spawn(move || {
            let mut c = client;
            let _ = c.set_read_timeout(Some(HANDSHAKE_TIMEOUT * 2));
            let _ = c.set_write_timeout(Some(HANDSHAKE_TIMEOUT * 2));
            if c.write_all(&hello).is_err() {
                return discard(c);
            }
            if hello.len() < HELLO_BYTES {
                let _ = c.shutdown(Shutdown::Write);
            }
            let mut challenge = [0u8; NONCE_BYTES + MAC_BYTES];
            if c.read_exact(&mut challenge).is_err() {
                return discard(c);
            }
            let answer = match answer {
                Reply::Bytes(b) => b,
                Reply::Correct => {
                    let mut nonce_c = [0u8; NONCE_BYTES];
                    if let Some(n) = hello.get(HELLO_BYTES - NONCE_BYTES..HELLO_BYTES) {
                        nonce_c.copy_from_slice(n);
                    }
                    match link.mac(b"ferry-ring connector", &challenge[..NONCE_BYTES], &nonce_c) {
                        Ok(m) => {
                            use hmac::Mac;
                            m.finalize().into_bytes().to_vec()
                        }
                        Err(_) => Vec::new(),
                    }
                }
            };
            if c.write_all(&answer).is_ok() && answer.len() < MAC_BYTES {
                let _ = c.shutdown(Shutdown::Write);
            }
            let mut ok = [0u8; 1];
            let _ = c.read_exact(&mut ok);
            discard(c);
        });
        let outcome = authenticate_connector(&self.0, server, Instant::now() + HANDSHAKE_TIMEOUT)
            .map(|(s, _key)| discard(s));
        let _ = connector.join();
        Some(outcome)
    }

    /// The connector's side, [`try_connect`], against an acceptor that reads the hello, sends
    /// `challenge`, reads the answer and sends `ok`; then closes. `None` when the loopback
    /// listener cannot be set up.
    pub fn connect_to(&self, challenge: Reply, ok: &[u8]) -> Option<Result<(), String>> {
        let listener = TcpListener::bind("127.0.0.1:0").ok()?;
        let addr = listener.local_addr().ok()?.to_string();
        let link = self.0.clone();
        let ok = ok.to_vec();
        let acceptor = std::thread::spawn(move || {
            // Polled with a deadline: a connector that never connects must not leave this
            // thread waiting for ever.
            let Some(mut s) = accept_within(&listener, HANDSHAKE_TIMEOUT * 2) else {
                return;
            };
            let _ = s.set_read_timeout(Some(HANDSHAKE_TIMEOUT * 2));
            let mut hello = [0u8; HELLO_BYTES];
            if s.read_exact(&mut hello).is_err() {
                return discard(s);
            }
            let challenge = match challenge {
                Reply::Bytes(b) => b,
                Reply::Correct => {
                    let nonce_a = [0x5a; NONCE_BYTES];
                    let mac = link.mac(
                        b"ferry-ring acceptor",
                        &hello[HELLO_BYTES - NONCE_BYTES..],
                        &nonce_a,
                    );
                    let Ok(mac) = mac else { return discard(s) };
                    use hmac::Mac;
                    let mut b = nonce_a.to_vec();
                    b.extend_from_slice(&mac.finalize().into_bytes());
                    b
                }
            };
            if s.write_all(&challenge).is_err() {
                return discard(s);
            }
            if challenge.len() < NONCE_BYTES + MAC_BYTES {
                let _ = s.shutdown(Shutdown::Write);
                return discard(s);
            }
            let mut answer = [0u8; MAC_BYTES];
            if s.read_exact(&mut answer).is_ok() {
                let _ = s.write_all(&ok);
                let _ = s.shutdown(Shutdown::Write);
                let _ = s.read(&mut [0u8; 1]);
            }
            discard(s);
        });
        let outcome =
            try_connect(&self.0, &addr, Duration::from_secs(5)).map(|(s, _key)| discard(s));
        let _ = acceptor.join();
        Some(outcome)
    }
}

/// The byte the acceptor sends when it accepts.
pub const ACCEPTED_BYTE: u8 = ACCEPTED;

fn accept_within(listener: &TcpListener, wait: Duration) -> Option<TcpStream> {
    listener.set_nonblocking(true).ok()?;
    let until = Instant::now() + wait;
    while Instant::now() < until {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).ok()?;
                return Some(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_micros(200))
            }
            Err(_) => return None,
        }
    }
    None
}

/// Two ends of one loopback TCP connection.
pub(crate) fn loopback_pair() -> Option<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0").ok()?;
    let client = TcpStream::connect(listener.local_addr().ok()?).ok()?;
    let (server, _) = listener.accept().ok()?;
    Some((server, client))
}

/// Closes `s` with a reset instead of a FIN, so that thousands of connections a second leave
/// no TIME_WAIT sockets behind to exhaust the ephemeral ports.
pub(crate) fn discard(s: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a correctly sized linger argument.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}
