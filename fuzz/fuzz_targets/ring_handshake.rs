//! The ring's connection handshake: the acceptor's hello check on arbitrary bytes, the
//! acceptor's whole exchange with a connector sending arbitrary (or partly valid) bytes, and
//! the connector's with an acceptor answering arbitrary bytes, over loopback connections.
//! Nothing may panic or hang; only a correct exchange may succeed, and a correct one must.

#![no_main]

use arbitrary::Arbitrary;
use ferry_collective::fuzzing::{FuzzLink, Reply, ACCEPTED_BYTE};
use libfuzzer_sys::fuzz_target;

const HELLO_BYTES: usize = 68;
/// The connector's nonce: the hello's last 32 bytes.
const NONCE_AT: usize = HELLO_BYTES - 32;

#[derive(Arbitrary, Debug)]
struct Input {
    token: Vec<u8>,
    generation: u64,
    from: u8,
    to: u8,
    world: u8,
    message_mac: bool,
    side: Side,
}

#[derive(Arbitrary, Debug)]
enum Side {
    CheckHello(Hello),
    Acceptor { hello: Hello, answer: Answer },
    Connector { challenge: Answer, ok: Vec<u8> },
}

#[derive(Arbitrary, Debug)]
enum Hello {
    Raw(Vec<u8>),
    /// The link's own hello, with at most one byte changed.
    Valid {
        nonce: [u8; 32],
        flip: Option<(u8, u8)>,
    },
}

#[derive(Arbitrary, Debug)]
enum Answer {
    Raw(Vec<u8>),
    Correct,
}

impl Answer {
    fn reply(self) -> Reply {
        match self {
            Answer::Raw(b) => Reply::Bytes(b),
            Answer::Correct => Reply::Correct,
        }
    }
}

/// The hello bytes, and whether they are exactly the link's own hello.
fn hello_bytes(link: &FuzzLink, hello: Hello) -> (Vec<u8>, bool) {
    match hello {
        Hello::Raw(b) => (b, false),
        Hello::Valid { nonce, flip } => {
            let mut b = link.hello(&nonce);
            let mut intact = true;
            if let Some((at, xor)) = flip {
                if xor != 0 {
                    b[usize::from(at) % HELLO_BYTES] ^= xor;
                    // The nonce (the last 32 bytes) is the connector's choice: any is valid.
                    intact = usize::from(at) % HELLO_BYTES >= NONCE_AT;
                }
            }
            (b, intact)
        }
    }
}

fuzz_target!(|input: Input| {
    let Input {
        token,
        generation,
        from,
        to,
        world,
        message_mac,
        side,
    } = input;
    let link = FuzzLink::new(
        &token,
        generation,
        (u32::from(from), u32::from(to), u32::from(world)),
        message_mac,
    );
    match side {
        Side::CheckHello(hello) => {
            let (bytes, intact) = hello_bytes(&link, hello);
            match link.check_hello(&bytes) {
                Ok(nonce) => assert_eq!(
                    link.hello(&nonce)[..],
                    bytes[..HELLO_BYTES],
                    "accepted a hello that is not this link's"
                ),
                Err(e) => assert!(!intact, "refused this link's own hello: {e}"),
            }
        }
        Side::Acceptor { hello, answer } => {
            let (bytes, intact) = hello_bytes(&link, hello);
            let correct = matches!(answer, Answer::Correct);
            let hello_ok = link.check_hello(&bytes).is_ok();
            let Some(outcome) = link.accept_from(&bytes, answer.reply()) else {
                return;
            };
            ferry_fuzz::debug(format!("acceptor: {outcome:?}"));
            if outcome.is_ok() {
                assert!(hello_ok, "accepted after a bad hello");
            }
            if intact && correct && bytes.len() == HELLO_BYTES {
                assert!(outcome.is_ok(), "refused a correct connector: {outcome:?}");
            }
        }
        Side::Connector { challenge, ok } => {
            let correct = matches!(challenge, Answer::Correct);
            let Some(outcome) = link.connect_to(challenge.reply(), &ok) else {
                return;
            };
            ferry_fuzz::debug(format!("connector: {outcome:?}"));
            if outcome.is_ok() {
                assert_eq!(
                    ok.first(),
                    Some(&ACCEPTED_BYTE),
                    "connected without acceptance"
                );
            }
            if correct && ok.first() == Some(&ACCEPTED_BYTE) {
                assert!(outcome.is_ok(), "refused a correct acceptor: {outcome:?}");
            }
        }
    }
});
