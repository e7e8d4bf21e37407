//! Who may open a node channel, and for which node.
//!
//! A shim presents its projected, audience-bound ServiceAccount token as `authorization: Bearer
//! <token>`. A [`TokenVerifier`] turns it into the one node the bearer may act for; the session
//! then refuses a `Hello` for any other node, so a shim only ever receives its own node's plan.

use std::{
    collections::HashMap,
    path::Path,
    sync::Mutex,
    time::{Duration, Instant},
};

use tonic::Status;

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
#[tonic::async_trait]
pub trait TokenVerifier: Send + Sync + 'static {
    /// The node the bearer of `token` (absent when the shim sent none) may act for;
    /// `Unauthenticated` when it proves nothing.
    async fn verify(&self, token: Option<&str>) -> Result<NodeIdentity, Status>;
}

/// A fixed token -> node table (tests, the `dir:` source on plain hosts).
#[derive(Clone, Debug, Default)]
pub struct StaticTokens(pub HashMap<String, String>);

impl StaticTokens {
    /// Reads a file of `TOKEN NODE` lines (`#` starts a comment).
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
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
                _ => anyhow::bail!("{}:{}: expected `TOKEN NODE`", path.display(), i + 1),
            }
        }
        Ok(StaticTokens(map))
    }
}

#[tonic::async_trait]
impl TokenVerifier for StaticTokens {
    async fn verify(&self, token: Option<&str>) -> Result<NodeIdentity, Status> {
        let token = token.ok_or_else(|| Status::unauthenticated("a bearer token is required"))?;
        self.0
            .get(token)
            .map(|n| NodeIdentity::Node(n.clone()))
            .ok_or_else(|| Status::unauthenticated("unknown token"))
    }
}

/// Accepts anyone as any node. Only for local demos: say so loudly where it is chosen.
#[derive(Clone, Copy, Debug, Default)]
pub struct AllowAnyNode;

#[tonic::async_trait]
impl TokenVerifier for AllowAnyNode {
    async fn verify(&self, _: Option<&str>) -> Result<NodeIdentity, Status> {
        Ok(NodeIdentity::AnyNode)
    }
}

/// The extra of a ServiceAccount token that names the node its pod runs on (Kubernetes ≥ 1.30).
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// The extra that names the pod the token is bound to.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";

/// Verifies tokens with the TokenReview API and binds them to the node of the shim's pod.
///
/// A token passes when the API server authenticates it for `audience`, it belongs to one of
/// `service_accounts` (`namespace/name`), and it is bound to a pod: the node comes from the
/// token's `node-name` extra, else from looking up that pod. Results are cached briefly, so that
/// a reconnect storm does not become a TokenReview storm.
pub struct TokenReviewVerifier {
    client: kube::Client,
    audience: String,
    service_accounts: Vec<String>,
    cache: Mutex<HashMap<String, (NodeIdentity, Instant)>>,
    ttl: Duration,
}

impl TokenReviewVerifier {
    pub fn new(client: kube::Client, audience: String, service_accounts: Vec<String>) -> Self {
        TokenReviewVerifier {
            client,
            audience,
            service_accounts,
            cache: Mutex::default(),
            ttl: Duration::from_secs(60),
        }
    }

    async fn review(&self, token: &str) -> Result<NodeIdentity, Status> {
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
            .map_err(|e| Status::unavailable(format!("TokenReview failed: {e}")))?;
        let status = result
            .status
            .ok_or_else(|| Status::unauthenticated("TokenReview returned no status"))?;
        if status.authenticated != Some(true) {
            return Err(Status::unauthenticated(
                status.error.unwrap_or_else(|| "token not authenticated".into()),
            ));
        }
        if !status.audiences.unwrap_or_default().contains(&self.audience) {
            return Err(Status::unauthenticated("token not issued for this audience"));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let account = username
            .strip_prefix("system:serviceaccount:")
            .map(|s| s.replacen(':', "/", 1))
            .ok_or_else(|| Status::permission_denied("not a ServiceAccount token"))?;
        if !self.service_accounts.contains(&account) {
            return Err(Status::permission_denied(format!(
                "ServiceAccount {account} may not act as a shim"
            )));
        }
        let extra = user.extra.unwrap_or_default();
        let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
        if let Some(node) = first(NODE_NAME_EXTRA) {
            return Ok(NodeIdentity::Node(node));
        }
        let pod =
            first(POD_NAME_EXTRA).ok_or_else(|| Status::permission_denied("token is not bound to a pod"))?;
        let namespace = account.split('/').next().unwrap_or_default().to_owned();
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        let pod = pods
            .get(&pod)
            .await
            .map_err(|e| Status::permission_denied(format!("pod {namespace}/{pod}: {e}")))?;
        pod.spec
            .and_then(|s| s.node_name)
            .map(NodeIdentity::Node)
            .ok_or_else(|| Status::permission_denied("the token's pod is not scheduled"))
    }
}

#[tonic::async_trait]
impl TokenVerifier for TokenReviewVerifier {
    async fn verify(&self, token: Option<&str>) -> Result<NodeIdentity, Status> {
        let token = token.ok_or_else(|| Status::unauthenticated("a bearer token is required"))?;
        if let Some((id, at)) = self.cache.lock().expect("cache lock").get(token)
            && at.elapsed() < self.ttl
        {
            return Ok(id.clone());
        }
        let id = self.review(token).await?;
        let mut cache = self.cache.lock().expect("cache lock");
        cache.retain(|_, (_, at)| at.elapsed() < self.ttl);
        cache.insert(token.to_owned(), (id.clone(), Instant::now()));
        Ok(id)
    }
}
