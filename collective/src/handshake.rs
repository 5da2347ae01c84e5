//! Authenticated connection set-up between ring neighbours.
//!
//! The connector (rank `from`) opens a TCP connection to its right neighbour (rank `to`):
//!
//! ```text
//! C -> A  hello:     magic, version, generation, from, to, world, options, nonce_c
//! A -> C  challenge: nonce_a, HMAC(token, "acceptor"  | nonce_c | nonce_a | gen | from | to | world)
//! C -> A  answer:            HMAC(token, "connector" | nonce_a | nonce_c | gen | from | to | world)
//! A -> C  ok byte
//! ```
//!
//! Both sides prove they know the job token without sending it, bound to fresh nonces, so a
//! recorded exchange cannot be replayed. Both then derive the key that authenticates every
//! message on this link (`message_mac`): HMAC(token, "messages" | nonce_c | nonce_a | gen |
//! from | to | world), which never crosses the network. `options` says whether the group
//! authenticates messages, so ranks that disagree fail here rather than misread the stream. A hello for another generation, rank or world size,
//! a wrong MAC or random bytes make the acceptor drop that connection and keep waiting for
//! the right peer until the deadline; the connector retries with backoff until the deadline
//! (peers start at slightly different times).
//!
//! The acceptor serves each connection on its own thread, and each handshake must finish
//! within [`HANDSHAKE_TIMEOUT`] as a whole, not per read: a client that drips one byte at a
//! time can neither hold the acceptor nor keep its own connection for long.

use super::message_mac::LinkKey;
use super::{wire, CollectiveError, GroupSpec};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

const MAGIC: [u8; 8] = *b"FERRYRNG";
/// 2: the hello carries `options`, and messages after the handshake carry a MAC.
const VERSION: u32 = 2;
const NONCE_BYTES: usize = 32;
const MAC_BYTES: usize = 32;
const HELLO_BYTES: usize = 8 + 4 + 8 + 4 + 4 + 4 + 4 + NONCE_BYTES;
/// `options` bit: messages after the handshake carry a MAC.
const OPTION_MESSAGE_MAC: u32 = 1;
const ACCEPTED: u8 = 0xA5;
/// How long one handshake may take as a whole (four small messages), on either side, so a
/// silent or dripping connection cannot hold a socket and a thread for the whole deadline.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(4);
/// Handshakes the acceptor serves at once; connections beyond are closed at once (a real
/// connector retries with backoff).
const MAX_CONCURRENT_HANDSHAKES: usize = 32;
const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// What both ends of one ring link must agree on.
#[derive(Clone)]
struct Link {
    token: Arc<[u8]>,
    generation: u64,
    from: u32,
    to: u32,
    world: u32,
    options: u32,
}

impl Link {
    /// The link from rank `from` to rank `to` of the group `spec` describes.
    fn of(spec: &GroupSpec, from: usize, to: usize) -> Link {
        Link {
            token: spec.job_token.as_bytes().into(),
            generation: spec.generation,
            from: from as u32,
            to: to as u32,
            world: spec.world_size as u32,
            options: if spec.message_mac {
                OPTION_MESSAGE_MAC
            } else {
                0
            },
        }
    }

    /// The key of this link's messages, from both nonces; None when the group sends them
    /// without a MAC.
    fn message_key(&self, nonce_c: &[u8], nonce_a: &[u8]) -> Result<Option<LinkKey>, String> {
        if self.options & OPTION_MESSAGE_MAC == 0 {
            return Ok(None);
        }
        let mac = self.mac(b"ferry-ring messages", nonce_c, nonce_a)?;
        Ok(Some(mac.finalize().into_bytes().into()))
    }

    fn mac(&self, label: &[u8], first: &[u8], second: &[u8]) -> Result<Hmac<Sha256>, String> {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.token)
            .map_err(|e| format!("HMAC key: {e}"))?;
        m.update(label);
        m.update(first);
        m.update(second);
        m.update(&self.generation.to_le_bytes());
        m.update(&self.from.to_le_bytes());
        m.update(&self.to.to_le_bytes());
        m.update(&self.world.to_le_bytes());
        Ok(m)
    }

    fn hello(&self, nonce: &[u8; NONCE_BYTES]) -> [u8; HELLO_BYTES] {
        let mut b = [0u8; HELLO_BYTES];
        b[..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..20].copy_from_slice(&self.generation.to_le_bytes());
        b[20..24].copy_from_slice(&self.from.to_le_bytes());
        b[24..28].copy_from_slice(&self.to.to_le_bytes());
        b[28..32].copy_from_slice(&self.world.to_le_bytes());
        b[32..36].copy_from_slice(&self.options.to_le_bytes());
        b[36..].copy_from_slice(nonce);
        b
    }

    /// Checks a received hello against this link; returns the connector's nonce.
    fn check_hello(&self, b: &[u8; HELLO_BYTES]) -> Result<[u8; NONCE_BYTES], String> {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        if b[..8] != MAGIC {
            return Err("not a ferry ring hello".into());
        }
        if u32_at(8) != VERSION {
            return Err(format!(
                "protocol version {} (expected {VERSION})",
                u32_at(8)
            ));
        }
        let mut g = [0u8; 8];
        g.copy_from_slice(&b[12..20]);
        let generation = u64::from_le_bytes(g);
        if generation != self.generation {
            return Err(format!(
                "generation {generation} (expected {})",
                self.generation
            ));
        }
        let (from, to, world) = (u32_at(20), u32_at(24), u32_at(28));
        if (from, to, world) != (self.from, self.to, self.world) {
            return Err(format!(
                "link {from}->{to} of world {world} (expected {}->{} of world {})",
                self.from, self.to, self.world
            ));
        }
        let options = u32_at(32);
        if options != self.options {
            let mac = |o: u32| {
                if o & OPTION_MESSAGE_MAC != 0 {
                    "on"
                } else {
                    "off"
                }
            };
            return Err(format!(
                "message MAC {} (this rank has it {})",
                mac(options),
                mac(self.options)
            ));
        }
        let mut nonce = [0u8; NONCE_BYTES];
        nonce.copy_from_slice(&b[36..]);
        Ok(nonce)
    }
}

/// A connection that passed the handshake, with the key of its messages.
pub(crate) type Authenticated = (TcpStream, Option<LinkKey>);

/// Connects to rank `to` (this rank's right neighbour) and authenticates, retrying until
/// `deadline` or until `cancel` is set.
pub(crate) fn connect(
    spec: &GroupSpec,
    to: usize,
    deadline: Instant,
    cancel: &AtomicBool,
) -> Result<Authenticated, CollectiveError> {
    let link = Link::of(spec, spec.rank, to);
    let addr = &spec.peers[to];
    let mut backoff = Duration::from_millis(10);
    let mut last = String::from("no attempt");
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() || cancel.load(Ordering::Relaxed) {
            return Err(CollectiveError::Handshake {
                peer: to,
                reason: format!("could not connect to {addr} in time; last attempt: {last}"),
            });
        }
        match try_connect(&link, addr, remaining) {
            Ok(stream) => return Ok(stream),
            Err(reason) => last = reason,
        }
        std::thread::sleep(backoff.min(deadline.saturating_duration_since(Instant::now())));
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn try_connect(link: &Link, addr: &str, remaining: Duration) -> Result<Authenticated, String> {
    let target = addr
        .to_socket_addrs()
        .map_err(|e| format!("resolve {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr} resolves to no address"))?;
    let until = Instant::now() + remaining.min(HANDSHAKE_TIMEOUT);
    let mut s = TcpStream::connect_timeout(&target, remaining).map_err(|e| e.to_string())?;
    let io = |what: &str, e: io::Error| format!("{what}: {e}");
    s.set_nodelay(true).map_err(|e| io("nodelay", e))?;

    let nonce_c = random_nonce().map_err(|e| io("random nonce", e))?;
    write_all_by(&mut s, &link.hello(&nonce_c), until).map_err(|e| io("send hello", e))?;
    let mut challenge = [0u8; NONCE_BYTES + MAC_BYTES];
    read_exact_by(&mut s, &mut challenge, until).map_err(|e| {
        io(
            "peer refused the hello (stale generation or wrong rank?)",
            e,
        )
    })?;
    let (nonce_a, mac_a) = challenge.split_at(NONCE_BYTES);
    link.mac(b"ferry-ring acceptor", &nonce_c, nonce_a)?
        .verify_slice(mac_a)
        .map_err(|_| "the peer does not know the job token".to_string())?;
    let answer = link
        .mac(b"ferry-ring connector", nonce_a, &nonce_c)?
        .finalize();
    write_all_by(&mut s, &answer.into_bytes(), until).map_err(|e| io("send answer", e))?;
    let mut ok = [0u8; 1];
    read_exact_by(&mut s, &mut ok, until)
        .map_err(|e| io("peer refused our answer (wrong job token?)", e))?;
    if ok[0] != ACCEPTED {
        return Err("peer sent a bad acceptance byte".into());
    }
    Ok((s, link.message_key(&nonce_c, nonce_a)?))
}

/// Accepts connections on `listener` until one authenticates as rank `from`, this rank's
/// left neighbour, or `deadline` passes. Each connection is served on its own thread, so a
/// slow one cannot hold up the others; stray connections are dropped.
pub(crate) fn accept(
    listener: &TcpListener,
    spec: &GroupSpec,
    from: usize,
    deadline: Instant,
) -> Result<Authenticated, CollectiveError> {
    let link = Link::of(spec, from, spec.rank);
    let _restore = NonBlocking::set(listener).map_err(|e| CollectiveError::io("listener", e))?;
    // Handshake threads report here; they are detached and end by their own deadline, so
    // returning never waits for a slow stray.
    let (done, outcomes) = mpsc::channel::<Result<Authenticated, String>>();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut last = String::from("nobody connected");
    loop {
        while let Ok(outcome) = outcomes.try_recv() {
            match outcome {
                Ok(s) => return Ok(s),
                Err(reason) => last = reason,
            }
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(CollectiveError::Handshake {
                peer: from,
                reason: format!("no valid connection in time; last refused: {last}"),
            });
        }
        // Short polls, so a handshake that succeeds on its thread is seen promptly.
        let poll = remaining.min(Duration::from_millis(20));
        if !wait_readable(listener, poll).map_err(|e| CollectiveError::io("poll", e))? {
            continue;
        }
        let s = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // e.g. out of descriptors: back off instead of spinning on a ready listener.
                last = format!("accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if in_flight.load(Ordering::Acquire) >= MAX_CONCURRENT_HANDSHAKES {
            last = format!("{MAX_CONCURRENT_HANDSHAKES} handshakes already in progress");
            drop(s);
            continue;
        }
        let until = Instant::now() + remaining.min(HANDSHAKE_TIMEOUT);
        let (link, done, held) = (link.clone(), done.clone(), Arc::clone(&in_flight));
        held.fetch_add(1, Ordering::AcqRel);
        let spawned = std::thread::Builder::new()
            .name("ring-handshake".into())
            .spawn(move || {
                let outcome = authenticate_connector(&link, s, until);
                held.fetch_sub(1, Ordering::AcqRel);
                // The acceptor may have returned already; the connection is then dropped.
                let _ = done.send(outcome);
            });
        if let Err(e) = spawned {
            in_flight.fetch_sub(1, Ordering::AcqRel);
            last = format!("spawn a handshake thread: {e}");
        }
    }
}

fn authenticate_connector(
    link: &Link,
    mut s: TcpStream,
    until: Instant,
) -> Result<Authenticated, String> {
    let io = |what: &str, e: io::Error| format!("{what}: {e}");
    s.set_nonblocking(false).map_err(|e| io("blocking", e))?;
    s.set_nodelay(true).map_err(|e| io("nodelay", e))?;

    let mut hello = [0u8; HELLO_BYTES];
    read_exact_by(&mut s, &mut hello, until).map_err(|e| io("read hello", e))?;
    let nonce_c = link.check_hello(&hello)?;
    let nonce_a = random_nonce().map_err(|e| io("random nonce", e))?;
    let mac_a = link
        .mac(b"ferry-ring acceptor", &nonce_c, &nonce_a)?
        .finalize();
    let mut challenge = [0u8; NONCE_BYTES + MAC_BYTES];
    challenge[..NONCE_BYTES].copy_from_slice(&nonce_a);
    challenge[NONCE_BYTES..].copy_from_slice(&mac_a.into_bytes());
    write_all_by(&mut s, &challenge, until).map_err(|e| io("send challenge", e))?;
    let mut answer = [0u8; MAC_BYTES];
    read_exact_by(&mut s, &mut answer, until).map_err(|e| io("read answer", e))?;
    link.mac(b"ferry-ring connector", &nonce_a, &nonce_c)?
        .verify_slice(&answer)
        .map_err(|_| "connector does not know the job token".to_string())?;
    write_all_by(&mut s, &[ACCEPTED], until).map_err(|e| io("send acceptance", e))?;
    let key = link.message_key(&nonce_c, &nonce_a)?;
    Ok((s, key))
}

/// The time left before `until`, as a socket timeout; an error once it has passed.
fn time_left(until: Instant) -> io::Result<Duration> {
    let left = until.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the handshake took over {} s", HANDSHAKE_TIMEOUT.as_secs()),
        ));
    }
    Ok(left)
}

/// `read_exact` that must finish by `until` as a whole: each read waits only for the time
/// left, so a peer sending a byte at a time still runs out of time.
fn read_exact_by(s: &mut TcpStream, mut buf: &mut [u8], until: Instant) -> io::Result<()> {
    while !buf.is_empty() {
        s.set_read_timeout(Some(time_left(until)?))?;
        match s.read(buf) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `write_all` that must finish by `until` as a whole.
fn write_all_by(s: &mut TcpStream, mut buf: &[u8], until: Instant) -> io::Result<()> {
    while !buf.is_empty() {
        s.set_write_timeout(Some(time_left(until)?))?;
        match s.write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Random bytes from the kernel, for nonces and shared-memory names.
pub(crate) fn random_nonce() -> io::Result<[u8; NONCE_BYTES]> {
    let mut b = [0u8; NONCE_BYTES];
    let mut filled = 0;
    while filled < b.len() {
        // SAFETY: writes at most the remaining length into our buffer.
        let n = unsafe { libc::getrandom(b[filled..].as_mut_ptr().cast(), b.len() - filled, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            filled += n as usize;
        }
    }
    Ok(b)
}

/// Waits until the listener has a pending connection; false on timeout or signal.
fn wait_readable(listener: &TcpListener, timeout: Duration) -> io::Result<bool> {
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid pollfd.
    let rc = unsafe { libc::poll(&mut fd, 1, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(rc > 0)
}

/// Puts the caller's long-lived listener in non-blocking mode while we accept (a pending
/// connection may vanish between poll and accept) and restores its previous mode after.
struct NonBlocking<'a> {
    listener: &'a TcpListener,
    flags: libc::c_int,
}

impl<'a> NonBlocking<'a> {
    fn set(listener: &'a TcpListener) -> io::Result<Self> {
        // SAFETY: F_GETFL on a valid descriptor.
        let flags = unsafe { libc::fcntl(listener.as_raw_fd(), libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        listener.set_nonblocking(true)?;
        Ok(NonBlocking { listener, flags })
    }
}

impl Drop for NonBlocking<'_> {
    fn drop(&mut self) {
        // SAFETY: F_SETFL with the flags read from the same descriptor.
        unsafe { libc::fcntl(self.listener.as_raw_fd(), libc::F_SETFL, self.flags) };
    }
}

/// After the handshake: the long timeouts and big buffers of a data connection.
pub(crate) fn into_data_socket(
    s: TcpStream,
    peer: usize,
    timeout: Duration,
) -> Result<TcpStream, CollectiveError> {
    wire::configure_data_socket(&s, timeout)
        .map_err(|e| CollectiveError::io(format!("configure connection to rank {peer}"), e))?;
    Ok(s)
}

/// For the fuzz targets in `fuzz/` only, by way of `ferry_collective::fuzzing`.
#[doc(hidden)]
pub(super) mod fuzzing;

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(rank: usize, token: &str, generation: u64) -> GroupSpec {
        GroupSpec {
            rank,
            world_size: 2,
            peers: vec![String::new(), String::new()],
            generation,
            job_token: token.into(),
            timeout: Duration::from_secs(5),
            message_mac: true,
        }
    }

    /// True when the acceptor closed `s` without sending anything more.
    fn refused(mut s: TcpStream) -> bool {
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(n) => n == 0,
            Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
        }
    }

    /// Stray, stale and forged connections are dropped one after another while the acceptor
    /// keeps waiting; the real peer then gets in.
    #[test]
    fn acceptor_refuses_strays_then_accepts_the_real_peer() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let acceptor = spec(0, "secret", 9);
        let peer_spec = |rank: usize, token: &str, generation: u64| {
            let mut s = spec(rank, token, generation);
            s.peers = vec![addr.clone(), addr.clone()];
            s
        };
        let quick = || Instant::now() + Duration::from_millis(300);
        let never = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let accepting = scope.spawn(|| {
                accept(
                    &listener,
                    &acceptor,
                    1,
                    Instant::now() + Duration::from_secs(10),
                )
            });

            // Random bytes.
            let mut s = TcpStream::connect(&addr).expect("connect");
            s.write_all(&random_nonce().expect("random").repeat(3))
                .expect("write");
            assert!(refused(s), "random bytes were not refused");

            // A well-formed hello gets a challenge; a forged answer is refused.
            let link = Link::of(&spec(0, "secret", 9), 1, 0);
            let mut s = TcpStream::connect(&addr).expect("connect");
            s.write_all(&link.hello(&[7; NONCE_BYTES])).expect("hello");
            let mut challenge = [0u8; NONCE_BYTES + MAC_BYTES];
            s.read_exact(&mut challenge)
                .expect("challenge for a valid hello");
            s.write_all(&[0u8; MAC_BYTES]).expect("forged answer");
            assert!(refused(s), "a forged answer was accepted");

            // Wrong token, stale generation, wrong rank: the connector gives up.
            for (rank, token, generation, to) in
                [(1, "guess", 9, 0), (1, "secret", 8, 0), (0, "secret", 9, 0)]
            {
                let r = connect(&peer_spec(rank, token, generation), to, quick(), &never);
                assert!(
                    matches!(r, Err(CollectiveError::Handshake { .. })),
                    "{rank} {token} {generation}"
                );
            }

            let real = connect(
                &peer_spec(1, "secret", 9),
                0,
                Instant::now() + Duration::from_secs(5),
                &never,
            );
            assert!(real.is_ok(), "{:?}", real.err());
            let accepted = accepting.join().expect("acceptor thread");
            assert!(accepted.is_ok(), "{:?}", accepted.err());
        });
    }

    /// A client that sends a valid hello one byte every 300 ms (well inside any per-read
    /// timeout) neither holds up the real peer nor keeps its connection past the handshake's
    /// whole deadline.
    #[test]
    fn a_dripping_client_neither_blocks_the_real_peer_nor_outlives_the_handshake_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let acceptor = spec(0, "secret", 9);
        let mut real_spec = spec(1, "secret", 9);
        real_spec.peers = vec![addr.clone(), addr.clone()];
        let link = Link::of(&spec(0, "secret", 9), 1, 0);
        let hello = link.hello(&[7; NONCE_BYTES]);
        std::thread::scope(|scope| {
            let accepting = scope.spawn(|| {
                accept(
                    &listener,
                    &acceptor,
                    1,
                    Instant::now() + Duration::from_secs(30),
                )
            });
            let mut drip = TcpStream::connect(&addr).expect("connect");
            let dripping = scope.spawn(move || {
                let t0 = Instant::now();
                for (sent, byte) in hello.iter().enumerate() {
                    std::thread::sleep(Duration::from_millis(300));
                    if drip.write_all(&[*byte]).is_err() {
                        return (sent, t0.elapsed());
                    }
                }
                (hello.len(), t0.elapsed())
            });

            // The dripper is being served; the real peer must still get in at once.
            std::thread::sleep(Duration::from_millis(500));
            let t0 = Instant::now();
            let real = connect(
                &real_spec,
                0,
                t0 + Duration::from_secs(3),
                &AtomicBool::new(false),
            );
            assert!(real.is_ok(), "the real peer was held up: {:?}", real.err());
            let accepted = accepting.join().expect("acceptor thread");
            assert!(accepted.is_ok(), "{:?}", accepted.err());
            assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());

            let (sent, took) = dripping.join().expect("dripping thread");
            assert!(
                sent < HELLO_BYTES,
                "the dripper was served for its whole hello ({took:?})"
            );
            assert!(
                took < HANDSHAKE_TIMEOUT + Duration::from_secs(2),
                "the dripper held its connection for {took:?}"
            );
        });
    }

    /// Both ends of a connection derive the same message key, never sent; each connection
    /// gets a fresh one; ranks that disagree on the message MAC do not connect.
    #[test]
    fn both_ends_derive_one_fresh_message_key_and_a_mac_mismatch_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let mut connector = spec(1, "secret", 3);
        connector.peers = vec![addr.clone(), addr];
        let pair = |connector: &GroupSpec, acceptor: &GroupSpec| {
            std::thread::scope(|scope| {
                let accepting = scope.spawn(|| {
                    accept(
                        &listener,
                        acceptor,
                        1,
                        Instant::now() + Duration::from_secs(2),
                    )
                });
                let connected = connect(
                    connector,
                    0,
                    Instant::now() + Duration::from_secs(2),
                    &AtomicBool::new(false),
                );
                (connected, accepting.join().expect("acceptor thread"))
            })
        };
        let keys = |connector: &GroupSpec| {
            let (c, a) = pair(connector, &spec(0, "secret", 3));
            (c.expect("connect").1, a.expect("accept").1)
        };
        let (c1, a1) = keys(&connector);
        let (c2, a2) = keys(&connector);
        assert!(
            c1.is_some() && c1 == a1 && c2 == a2,
            "the two ends disagree"
        );
        assert_ne!(c1, c2, "two connections share a key");

        let mut plain = connector.clone();
        plain.message_mac = false;
        let (c, a) = pair(&plain, &spec(0, "secret", 3));
        let e = a.expect_err("a connector without the MAC was accepted");
        assert!(format!("{e}").contains("message MAC off"), "{e}");
        assert!(c.is_err());

        let mut plain_acceptor = spec(0, "secret", 3);
        plain_acceptor.message_mac = false;
        let (c, a) = pair(&plain, &plain_acceptor);
        assert_eq!((c.expect("connect").1, a.expect("accept").1), (None, None));
    }

    #[test]
    fn acceptor_gives_up_at_the_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let t0 = Instant::now();
        let r = accept(
            &listener,
            &spec(0, "secret", 1),
            1,
            t0 + Duration::from_millis(200),
        );
        assert!(matches!(r, Err(CollectiveError::Handshake { peer: 1, .. })));
        assert!(t0.elapsed() < Duration::from_secs(1));
    }
}
