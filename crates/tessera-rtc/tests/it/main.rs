//! Integration tests of the transport over real UDP and WebSockets on 127.0.0.1: an
//! `Endpoint`, native clients, and the `/ws` signalling router served by axum.

mod abuse;
mod bench;
mod transfer;

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tessera_rtc::{Config, Endpoint, Message, Peer, PeerEvent, connect, signal};
use tokio::sync::mpsc;

const LOOPBACK: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

/// Every test runs under this bound, so a lost event fails instead of hanging.
async fn bounded<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(40), test)
        .await
        .expect("test did not finish within 40 s")
}

/// An endpoint and its signalling router served on loopback: the `ws://` URL and the
/// accepted peers.
async fn serve(config: Config) -> (Endpoint, String, mpsc::Receiver<Peer>) {
    let endpoint = Endpoint::bind(LOOPBACK, config)
        .await
        .expect("bind endpoint");
    let (accepted, incoming) = mpsc::channel(16);
    let app = signal::router(endpoint.clone(), accepted);
    let listener = tokio::net::TcpListener::bind(LOOPBACK)
        .await
        .expect("bind listener");
    let url = format!(
        "ws://{}/ws",
        listener.local_addr().expect("listener address")
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    (endpoint, url, incoming)
}

/// A client connected through the WebSocket, and the server's peer for it, both open.
async fn join(url: &str, incoming: &mut mpsc::Receiver<Peer>) -> (Peer, Peer) {
    join_with(url, incoming, Config::default()).await
}

async fn join_with(url: &str, incoming: &mut mpsc::Receiver<Peer>, config: Config) -> (Peer, Peer) {
    let mut client = connect(LOOPBACK, config, |offer| {
        signal::offer_over_websocket(url, offer)
    })
    .await
    .expect("connect");
    let mut server = incoming.recv().await.expect("accepted peer");
    client.opened().await.expect("client channel opens");
    server.opened().await.expect("server channel opens");
    (client, server)
}

/// The next message, failing on anything else.
async fn next_message(peer: &mut Peer) -> Message {
    match peer.recv().await {
        Some(PeerEvent::Message(message)) => message,
        other => panic!("peer {}: expected a message, got {other:?}", peer.id()),
    }
}

/// One text message each way: proof that a peer still works.
async fn ping(client: &mut Peer, server: &mut Peer) {
    client
        .send(Message::Text("ping".into()))
        .await
        .expect("send ping");
    assert_eq!(next_message(server).await, Message::Text("ping".into()));
    server
        .send(Message::Text("pong".into()))
        .await
        .expect("send pong");
    assert_eq!(next_message(client).await, Message::Text("pong".into()));
}

/// `len` bytes that say where they are: chunk `i` of `stream` starts with `i` and `stream`.
fn payload(stream: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i / 7 + i / 65536 * 13) as u8 ^ stream)
        .collect()
}
