//! An authenticated client of the coordinator, for workers, the CLI and tests.
//!
//! Every request carries the job token. Channels reconnect by themselves; `with_backoff`
//! retries calls that failed because the coordinator was unreachable (restarting, say), so a
//! worker rides out a coordinator restart instead of dying with it.

use crate::proto::{admin_client::AdminClient, coordinator_client::CoordinatorClient};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};

/// The environment variable that holds the job token when no file is given.
pub const TOKEN_ENV: &str = "FERRY_JOB_TOKEN";

#[derive(thiserror::Error, Debug)]
pub enum ClientError {
    #[error("no job token: pass --token-file FILE or set {TOKEN_ENV}")]
    NoToken,
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: the token file is empty", path.display())]
    EmptyToken { path: PathBuf },
    #[error("the job token contains characters not allowed in a header (use printable ASCII)")]
    BadToken,
    #[error("coordinator address {address:?}: {message}")]
    Address { address: String, message: String },
}

/// Reads the job token from `file`, or else from `FERRY_JOB_TOKEN`.
pub fn load_token(file: Option<&Path>) -> Result<String, ClientError> {
    let token = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ClientError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            let token = text.trim().to_string();
            if token.is_empty() {
                return Err(ClientError::EmptyToken {
                    path: path.to_path_buf(),
                });
            }
            token
        }
        None => std::env::var(TOKEN_ENV)
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .ok_or(ClientError::NoToken)?,
    };
    bearer(&token)?;
    Ok(token)
}

fn bearer(token: &str) -> Result<MetadataValue<tonic::metadata::Ascii>, ClientError> {
    format!("Bearer {token}")
        .parse()
        .map_err(|_| ClientError::BadToken)
}

/// Adds `authorization: Bearer <token>` to every request.
#[derive(Clone)]
pub struct TokenInterceptor {
    header: MetadataValue<tonic::metadata::Ascii>,
}

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.header.clone());
        Ok(request)
    }
}

pub type Authed = InterceptedService<Channel, TokenInterceptor>;

/// Where the coordinator is and how to talk to it.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `host:port`, or a URL (`http://...`, `https://...`).
    pub address: String,
    pub token: String,
    /// PEM file of the CA that signed the coordinator's certificate; enables TLS.
    pub tls_ca: Option<PathBuf>,
    /// Name to verify in the coordinator's certificate (default: the host in `address`).
    pub tls_domain: Option<String>,
}

#[derive(Clone)]
pub struct Clients {
    pub coordinator: CoordinatorClient<Authed>,
    pub admin: AdminClient<Authed>,
}

impl Clients {
    /// Builds clients on one lazily connecting channel: nothing is sent until the first call,
    /// and a dropped connection is re-established by the next call.
    pub fn connect_lazy(cfg: &ClientConfig) -> Result<Clients, ClientError> {
        let bad = |message: String| ClientError::Address {
            address: cfg.address.clone(),
            message,
        };
        let url = if cfg.address.contains("://") {
            cfg.address.clone()
        } else if cfg.tls_ca.is_some() {
            format!("https://{}", cfg.address)
        } else {
            format!("http://{}", cfg.address)
        };
        let mut endpoint = Endpoint::from_shared(url)
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20));
        if let Some(ca_path) = &cfg.tls_ca {
            let pem = std::fs::read(ca_path).map_err(|source| ClientError::Io {
                path: ca_path.clone(),
                source,
            })?;
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
            if let Some(domain) = &cfg.tls_domain {
                tls = tls.domain_name(domain.clone());
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| bad(e.to_string()))?;
        }
        let channel = endpoint.connect_lazy();
        let interceptor = TokenInterceptor {
            header: bearer(&cfg.token)?,
        };
        // Plans for large worlds and whole ledgers exceed tonic's 4 MiB default.
        let limit = 64 * 1024 * 1024;
        Ok(Clients {
            coordinator: CoordinatorClient::with_interceptor(channel.clone(), interceptor.clone())
                .max_decoding_message_size(limit),
            admin: AdminClient::with_interceptor(channel, interceptor)
                .max_decoding_message_size(limit),
        })
    }
}

/// Whether a failed call may succeed if simply tried again later: the coordinator was down,
/// restarting or overloaded. Everything else is a real answer and is returned at once, among
/// them a coordinator certificate that does not verify with `--tls-ca` (tonic reports it as
/// `Unavailable`, but trying again cannot change the certificate or the CA).
pub fn is_transient(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::ResourceExhausted
    ) && !status.message().contains("message length too large")
        && !is_certificate_error(status)
}

/// A failed call to the coordinator at `address`, for a person: its message and code, and for
/// the two TLS mistakes that otherwise read as riddles, what to do.
pub fn describe_failure(address: &str, what: &str, status: &Status) -> String {
    let what = if what.is_empty() {
        String::new()
    } else {
        format!(" {what}")
    };
    let hint = if is_certificate_error(status) {
        "; the coordinator's certificate does not verify with --tls-ca: pass the CA that signed \
         it (deploy/make-certs.sh writes it as ca.crt), and --tls-domain if the certificate \
         names the coordinator otherwise than --coordinator does"
    } else if status.message() == "transport error" || status.message().contains("h2 protocol") {
        "; if the coordinator serves TLS (--tls-cert), pass --tls-ca with the CA that signed its \
         certificate"
    } else {
        ""
    };
    format!(
        "coordinator {address}{what}: {} ({:?}){hint}",
        status.message(),
        status.code()
    )
}

/// The coordinator's TLS certificate did not verify (rustls' "invalid peer certificate": an
/// unknown issuer, a bad signature, a name that does not match, an expired certificate).
pub fn is_certificate_error(status: &Status) -> bool {
    status.message().contains("invalid peer certificate")
}

/// The longest one attempt of [`with_backoff`] waits for an answer. A partition drops packets
/// silently, so a call on a connection it broke would otherwise wait for TCP or HTTP/2
/// keep-alive to give up; this is well above the longest the coordinator holds a call (a
/// `Rendezvous` waits 5 s for the group).
pub const ATTEMPT_DEADLINE: Duration = Duration::from_secs(15);

/// Runs `call` until it succeeds, fails for a non-transient reason, or `patience` has passed
/// since the first failure. Backoff doubles from 100 ms to 2 s. An attempt unanswered within
/// [`ATTEMPT_DEADLINE`] counts as the coordinator being unreachable.
pub async fn with_backoff<T, F, Fut>(patience: Duration, mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let mut delay = Duration::from_millis(100);
    let mut first_failure: Option<Instant> = None;
    loop {
        let started = Instant::now();
        let attempt = tokio::time::timeout(ATTEMPT_DEADLINE, call())
            .await
            .unwrap_or_else(|_| {
                Err(Status::unavailable(format!(
                    "no answer within {}s",
                    ATTEMPT_DEADLINE.as_secs()
                )))
            });
        match attempt {
            Ok(v) => return Ok(v),
            Err(status) if is_transient(&status) => {
                // Patience counts from the start of the first failed attempt: one that hung
                // until its deadline was failing all along.
                let since = *first_failure.get_or_insert(started);
                if since.elapsed() >= patience {
                    return Err(status);
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(status) => return Err(status),
        }
    }
}
