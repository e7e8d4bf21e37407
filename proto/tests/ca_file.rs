//! The shim trusts its CA file as it is at each connection: a CA rotated in place (a mounted
//! Secret) is trusted from the next connection on, without restarting the shim.

use std::{net::SocketAddr, pin::Pin};

use sluice_proto::{
    client::{self, Config, SessionError},
    v2::{
        OperatorMessage, ShimMessage,
        node_channel_server::{NodeChannel, NodeChannelServer},
    },
};
use tokio_stream::Stream;
use tonic::{
    Request, Response, Status, Streaming,
    transport::{Identity, Server, ServerTlsConfig, server::TcpIncoming},
};

/// A server that only completes connections: `connect` goes no further.
struct Handshakes;

#[tonic::async_trait]
impl NodeChannel for Handshakes {
    type SyncStream = Pin<Box<dyn Stream<Item = Result<OperatorMessage, Status>> + Send>>;

    async fn sync(&self, _: Request<Streaming<ShimMessage>>) -> Result<Response<Self::SyncStream>, Status> {
        Err(Status::unimplemented("handshakes only"))
    }
}

/// A certificate for `localhost`, self-signed (its own CA): (certificate, key) in PEM.
fn localhost_cert() -> (String, String) {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    (cert.pem(), signing_key.serialize_pem())
}

async fn tls_server(cert: &str, key: &str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
    let server = Server::builder()
        .tls_config(tls)
        .unwrap()
        .add_service(NodeChannelServer::new(Handshakes));
    tokio::spawn(server.serve_with_incoming(TcpIncoming::from(listener)));
    addr
}

#[tokio::test]
async fn connect_trusts_the_ca_file_as_it_is_now() {
    let (served, key) = localhost_cert();
    let (other, _) = localhost_cert();
    let addr = tls_server(&served, &key).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, &other).unwrap();

    let mut config = Config::new(format!("https://localhost:{}", addr.port()));
    config.ca_file = Some(ca_file.clone());
    // A stale fixed CA is ignored when there is a file.
    config.ca_pem = Some(other.clone().into_bytes());
    let refused = client::connect(&config).await;
    assert!(
        matches!(refused, Err(SessionError::Connect(_))),
        "the server's certificate is not signed by the file's CA: {refused:?}"
    );

    // The file is rotated (written anew, as the kubelet does): the same configuration connects.
    let next = dir.path().join("ca.crt.new");
    std::fs::write(&next, &served).unwrap();
    std::fs::rename(&next, &ca_file).unwrap();
    client::connect(&config)
        .await
        .expect("the rotated CA file is read at the next connection");

    // And a file that went away is said so.
    std::fs::remove_file(&ca_file).unwrap();
    let gone = client::connect(&config).await;
    assert!(
        matches!(&gone, Err(SessionError::Config(m)) if m.contains("ca.crt")),
        "{gone:?}"
    );
}
