//! Who may open a node channel, and for which node.
//!
//! A shim presents its projected, audience-bound ServiceAccount token as `authorization: Bearer
//! <token>`. A [`TokenVerifier`] turns it into the one node the bearer may act for; the session
//! then refuses a `Hello` for any other node, so a shim only ever receives its own node's plan.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::watch;

/// Why a credential opens no node channel. The node channel answers each with its gRPC status
/// (`From<AuthError> for tonic::Status`); verifiers know nothing of gRPC.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The credential proves nothing (none, unknown, expired, for another audience).
    #[error("{0}")]
    Unauthenticated(String),
    /// It proves an identity that may not act for a node.
    #[error("{0}")]
    PermissionDenied(String),
    /// Too many unknown credentials to check right now: retry later.
    #[error("{0}")]
    Exhausted(String),
    /// It could not be checked (the API server did not answer).
    #[error("{0}")]
    Unavailable(String),
}

impl AuthError {
    /// Whether the verdict is about the credential itself (worth remembering), not about the
    /// moment it was checked.
    pub fn is_verdict(&self) -> bool {
        matches!(
            self,
            AuthError::Unauthenticated(_) | AuthError::PermissionDenied(_)
        )
    }
}

impl From<AuthError> for tonic::Status {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Unauthenticated(m) => tonic::Status::unauthenticated(m),
            AuthError::PermissionDenied(m) => tonic::Status::permission_denied(m),
            AuthError::Exhausted(m) => tonic::Status::resource_exhausted(m),
            AuthError::Unavailable(m) => tonic::Status::unavailable(m),
        }
    }
}

/// The node a credential is bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeIdentity {
    Node(String),
    /// Any node (`--insecure-allow-any-node`, local demos only).
    AnyNode,
}

impl NodeIdentity {
    /// Whether this identity may receive `node`'s plan.
    pub fn allows(&self, node: &str) -> bool {
        match self {
            NodeIdentity::Node(n) => n == node,
            NodeIdentity::AnyNode => true,
        }
    }
}

/// Verifies a bearer token.
#[async_trait::async_trait]
pub trait TokenVerifier: Send + Sync + 'static {
    /// The node the bearer of `token` (absent when the shim sent none) may act for;
    /// `Unauthenticated` when it proves nothing.
    async fn verify(&self, token: Option<&str>) -> Result<NodeIdentity, AuthError>;
}

/// A token file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("reading {}", path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}: expected `TOKEN NODE`", path.display())]
    Line { path: std::path::PathBuf, line: usize },
}

/// A fixed token -> node table (tests, the `dir:` source on plain hosts).
#[derive(Clone, Debug, Default)]
pub struct StaticTokens(pub HashMap<String, String>);

impl StaticTokens {
    /// Reads a file of `TOKEN NODE` lines (`#` starts a comment).
    pub fn from_file(path: &Path) -> Result<Self, TokenFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut map = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(token), Some(node), None) => {
                    map.insert(token.to_owned(), node.to_owned());
                }
                _ => {
                    return Err(TokenFileError::Line {
                        path: path.to_owned(),
                        line: i + 1,
                    });
                }
            }
        }
        Ok(StaticTokens(map))
    }
}

#[async_trait::async_trait]
impl TokenVerifier for StaticTokens {
    async fn verify(&self, token: Option<&str>) -> Result<NodeIdentity, AuthError> {
        let token = token.ok_or_else(|| AuthError::Unauthenticated("a bearer token is required".into()))?;
        self.0
            .get(token)
            .map(|n| NodeIdentity::Node(n.clone()))
            .ok_or_else(|| AuthError::Unauthenticated("unknown token".into()))
    }
}

/// Accepts anyone as any node. Only for local demos: say so loudly where it is chosen.
#[derive(Clone, Copy, Debug, Default)]
pub struct AllowAnyNode;

#[async_trait::async_trait]
impl TokenVerifier for AllowAnyNode {
    async fn verify(&self, _: Option<&str>) -> Result<NodeIdentity, AuthError> {
        Ok(NodeIdentity::AnyNode)
    }
}

/// The extra of a ServiceAccount token that names the node its pod runs on (Kubernetes ≥ 1.30).
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// The extra that names the pod the token is bound to.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";

/// What the TokenReview verifier may cost the API server.
///
/// Every verdict is cached by the token's SHA-256 (the cache never holds a token), concurrent
/// connections with the same unknown token share one review, and reviews of tokens not in the
/// cache draw from one token bucket: a client sending garbage tokens causes at most `burst`
/// reviews, then `rate` per second, however many streams it opens.
#[derive(Clone, Debug)]
pub struct ReviewLimits {
    /// How long a token that passed is trusted without asking again.
    pub ttl: Duration,
    /// How long a token that was refused stays refused without asking again.
    pub negative_ttl: Duration,
    /// Verdicts kept at most (the ones expiring first make room).
    pub cache_size: usize,
    /// Reviews of tokens not in the cache, per second, on average.
    pub rate: f64,
    /// Reviews of tokens not in the cache that may happen at once after a quiet period.
    pub burst: u32,
}

impl Default for ReviewLimits {
    fn default() -> Self {
        ReviewLimits {
            ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(10),
            cache_size: 10_000,
            // A new leader must admit every shim within its settling period (a few seconds):
            // the burst covers a large cluster at once, the rate bounds garbage afterwards.
            rate: 100.0,
            burst: 5_000,
        }
    }
}

/// Verifies tokens with the TokenReview API and binds them to the node of the shim's pod.
///
/// A token passes when the API server authenticates it for `audience`, it belongs to one of
/// `service_accounts` (`namespace/name`), and it is bound to a pod: the node comes from the
/// token's `node-name` extra, else from looking up that pod. How often the API server is asked
/// is bounded by [`ReviewLimits`].
pub struct TokenReviewVerifier {
    reviewer: Arc<Reviewer>,
}

struct Reviewer {
    client: kube::Client,
    audience: String,
    service_accounts: Vec<String>,
    limits: ReviewLimits,
    verdicts: Mutex<Verdicts>,
}

type Verdict = Result<NodeIdentity, AuthError>;
type TokenDigest = [u8; 32];

enum Slot {
    /// A review is running; its verdict arrives here.
    Reviewing(watch::Receiver<Option<Verdict>>),
    Known {
        verdict: Verdict,
        until: Instant,
    },
}

struct Verdicts {
    slots: HashMap<TokenDigest, Slot>,
    bucket: TokenBucket,
}

impl Verdicts {
    /// Makes room for one more slot; false when every slot is a running review.
    fn make_room(&mut self, capacity: usize, now: Instant) -> bool {
        if self.slots.len() < capacity {
            return true;
        }
        self.slots
            .retain(|_, s| !matches!(s, Slot::Known { until, .. } if *until <= now));
        if self.slots.len() < capacity {
            return true;
        }
        let first_to_expire = self
            .slots
            .iter()
            .filter_map(|(k, s)| match s {
                Slot::Known { until, .. } => Some((*until, *k)),
                Slot::Reviewing(_) => None,
            })
            .min();
        match first_to_expire {
            Some((_, key)) => {
                self.slots.remove(&key);
                true
            }
            None => false,
        }
    }
}

struct TokenBucket {
    tokens: f64,
    last: Instant,
    rate: f64,
    burst: f64,
}

impl TokenBucket {
    fn new(rate: f64, burst: u32, now: Instant) -> Self {
        TokenBucket {
            tokens: f64::from(burst),
            last: now,
            rate: rate.max(0.0),
            burst: f64::from(burst),
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn digest(token: &str) -> TokenDigest {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl TokenReviewVerifier {
    pub fn new(client: kube::Client, audience: String, service_accounts: Vec<String>) -> Self {
        Self::with_limits(client, audience, service_accounts, ReviewLimits::default())
    }

    pub fn with_limits(
        client: kube::Client,
        audience: String,
        service_accounts: Vec<String>,
        limits: ReviewLimits,
    ) -> Self {
        let bucket = TokenBucket::new(limits.rate, limits.burst, Instant::now());
        TokenReviewVerifier {
            reviewer: Arc::new(Reviewer {
                client,
                audience,
                service_accounts,
                limits,
                verdicts: Mutex::new(Verdicts {
                    slots: HashMap::new(),
                    bucket,
                }),
            }),
        }
    }
}

impl Reviewer {
    async fn review(&self, token: &str) -> Verdict {
        use k8s_openapi::api::{
            authentication::v1::{TokenReview, TokenReviewSpec},
            core::v1::Pod,
        };
        use kube::{Api, api::PostParams};

        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let result = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Unavailable(format!("TokenReview failed: {e}")))?;
        let status = result
            .status
            .ok_or_else(|| AuthError::Unauthenticated("TokenReview returned no status".into()))?;
        if status.authenticated != Some(true) {
            return Err(AuthError::Unauthenticated(
                status.error.unwrap_or_else(|| "token not authenticated".into()),
            ));
        }
        if !status.audiences.unwrap_or_default().contains(&self.audience) {
            return Err(AuthError::Unauthenticated(
                "token not issued for this audience".into(),
            ));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let account = username
            .strip_prefix("system:serviceaccount:")
            .map(|s| s.replacen(':', "/", 1))
            .ok_or_else(|| AuthError::PermissionDenied("not a ServiceAccount token".into()))?;
        if !self.service_accounts.contains(&account) {
            return Err(AuthError::PermissionDenied(format!(
                "ServiceAccount {account} may not act as a shim"
            )));
        }
        let extra = user.extra.unwrap_or_default();
        let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
        if let Some(node) = first(NODE_NAME_EXTRA) {
            return Ok(NodeIdentity::Node(node));
        }
        let pod = first(POD_NAME_EXTRA)
            .ok_or_else(|| AuthError::PermissionDenied("token is not bound to a pod".into()))?;
        let namespace = account.split('/').next().unwrap_or_default().to_owned();
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        let pod = pods.get(&pod).await.map_err(|e| match &e {
            kube::Error::Api(s) if s.code == 404 => {
                AuthError::PermissionDenied(format!("pod {namespace}/{pod}: {e}"))
            }
            // Not a verdict on the token: it must not be cached as one.
            _ => AuthError::Unavailable(format!("looking up pod {namespace}/{pod}: {e}")),
        })?;
        pod.spec
            .and_then(|s| s.node_name)
            .map(NodeIdentity::Node)
            .ok_or_else(|| AuthError::PermissionDenied("the token's pod is not scheduled".into()))
    }

    /// Records a finished review: answers about the token are kept, failures to get one are not.
    fn settle(&self, key: TokenDigest, verdict: &Verdict) {
        let ttl = match verdict {
            Ok(_) => Some(self.limits.ttl),
            Err(e) if e.is_verdict() => Some(self.limits.negative_ttl),
            Err(_) => None,
        };
        let mut verdicts = self.verdicts.lock().expect("verdict cache lock");
        match ttl {
            Some(ttl) => {
                verdicts.slots.insert(
                    key,
                    Slot::Known {
                        verdict: verdict.clone(),
                        until: Instant::now() + ttl,
                    },
                );
            }
            None => {
                verdicts.slots.remove(&key);
            }
        }
    }
}

#[async_trait::async_trait]
impl TokenVerifier for TokenReviewVerifier {
    async fn verify(&self, token: Option<&str>) -> Result<NodeIdentity, AuthError> {
        let token = token.ok_or_else(|| AuthError::Unauthenticated("a bearer token is required".into()))?;
        let key = digest(token);
        let mut pending = {
            let reviewer = &self.reviewer;
            let mut verdicts = reviewer.verdicts.lock().expect("verdict cache lock");
            let now = Instant::now();
            match verdicts.slots.get(&key) {
                Some(Slot::Known { verdict, until }) if now < *until => return verdict.clone(),
                Some(Slot::Reviewing(pending)) => pending.clone(),
                _ => {
                    if !verdicts.bucket.take(now) {
                        return Err(AuthError::Exhausted(
                            "too many unknown tokens to review: retry later".into(),
                        ));
                    }
                    if !verdicts.make_room(reviewer.limits.cache_size, now) {
                        return Err(AuthError::Exhausted("too many token reviews running".into()));
                    }
                    let (tx, rx) = watch::channel(None);
                    verdicts.slots.insert(key, Slot::Reviewing(rx.clone()));
                    // Detached, so that a client hanging up does not waste the review, and every
                    // connection waiting for this token gets its verdict.
                    let reviewer = reviewer.clone();
                    let token = token.to_owned();
                    tokio::spawn(async move {
                        let verdict = reviewer.review(&token).await;
                        reviewer.settle(key, &verdict);
                        tx.send_replace(Some(verdict));
                    });
                    rx
                }
            }
        };
        let verdict = pending
            .wait_for(Option::is_some)
            .await
            .map_err(|_| AuthError::Unavailable("the token review did not finish".into()))?;
        verdict.clone().expect("waited for a verdict")
    }
}
