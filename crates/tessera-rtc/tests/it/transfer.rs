//! Messages between an endpoint and three clients: text and binary both ways, a 64 KiB frame,
//! 4 MiB in 64 KiB chunks under backpressure, and a client leaving mid-transfer.

use tessera_rtc::{CloseReason, Config, Message, Peer, PeerEvent, RtcError};

use crate::{bounded, join, join_with, next_message, payload, ping, serve};

const CHUNK: usize = 64 * 1024;
const BIG: usize = 4 * 1024 * 1024;

#[tokio::test]
async fn three_clients_exchange_text_and_binary_both_ways() {
    bounded(async {
        let (endpoint, url, mut incoming) = serve(Config::default()).await;
        let mut pairs = Vec::new();
        for _ in 0..3 {
            pairs.push(join(&url, &mut incoming).await);
        }
        assert_eq!(endpoint.stats().peers, 3);
        for (i, (client, server)) in pairs.iter_mut().enumerate() {
            let i = i as u8;
            let text = Message::Text(format!("hello from client {i} ✓"));
            let frame = Message::Binary(payload(i, CHUNK));
            for message in [&text, &frame] {
                client.send(message.clone()).await.expect("client send");
            }
            for message in [&text, &frame] {
                assert_eq!(&next_message(server).await, message);
            }
            let reply = Message::Text(format!("hello client {i}"));
            let frame = Message::Binary(payload(100 + i, CHUNK));
            for message in [&reply, &frame] {
                server.send(message.clone()).await.expect("server send");
            }
            for message in [&reply, &frame] {
                assert_eq!(&next_message(client).await, message);
            }
        }
        let (client, _) = &pairs[0];
        let too_big = Message::Binary(vec![0; Config::default().max_message + 1]);
        assert!(matches!(
            client.send(too_big).await,
            Err(RtcError::MessageTooLarge { .. })
        ));
        for empty in [Message::Binary(Vec::new()), Message::Text(String::new())] {
            assert!(matches!(
                client.send(empty).await,
                Err(RtcError::EmptyMessage)
            ));
        }
        let stats = endpoint.stats();
        assert_eq!((stats.peers, stats.dropped_peers), (3, 0));
    })
    .await;
}

/// Sends `data` in `CHUNK`-sized binary messages. A failure shows as missing bytes at the
/// receiver (and the leaver's sends fail on purpose).
async fn send_chunks(peer: tessera_rtc::PeerSender, data: Vec<u8>) -> Result<(), RtcError> {
    for chunk in data.chunks(CHUNK) {
        peer.send(Message::Binary(chunk.to_vec())).await?;
    }
    Ok(())
}

/// Receives `len` bytes of binary messages.
async fn receive_bytes(peer: &mut Peer, len: usize) -> Vec<u8> {
    let mut received = Vec::with_capacity(len);
    while received.len() < len {
        match next_message(peer).await {
            Message::Binary(bytes) => received.extend_from_slice(&bytes),
            Message::Text(text) => panic!("expected binary, got text {text:?}"),
        }
    }
    received
}

#[tokio::test]
async fn four_mib_in_chunks_arrives_whole_and_in_order_both_ways() {
    bounded(async {
        // A send buffer of four chunks: the senders must wait for str0m's buffer to drain.
        let config = Config {
            send_buffer: 4 * CHUNK,
            ..Config::default()
        };
        let (_endpoint, url, mut incoming) = serve(config.clone()).await;
        let mut transfers = Vec::new();
        for i in 0..3u8 {
            let (mut client, mut server) = join_with(&url, &mut incoming, config.clone()).await;
            let up = payload(i, BIG);
            let down = payload(200 + i, BIG);
            tokio::spawn(send_chunks(client.sender(), up.clone()));
            tokio::spawn(send_chunks(server.sender(), down.clone()));
            transfers.push(tokio::spawn(async move {
                let at_server = receive_bytes(&mut server, BIG).await;
                let at_client = receive_bytes(&mut client, BIG).await;
                assert!(at_server == up, "client {i}: upload differs");
                assert!(at_client == down, "client {i}: download differs");
                ping(&mut client, &mut server).await;
            }));
        }
        for transfer in transfers {
            transfer.await.expect("transfer task");
        }
    })
    .await;
}

#[tokio::test]
async fn a_client_leaving_mid_transfer_does_not_disturb_the_others() {
    bounded(async {
        let (endpoint, url, mut incoming) = serve(Config::default()).await;
        let (leaver, mut leaver_at_server) = join(&url, &mut incoming).await;
        let mut stayers = Vec::new();
        for _ in 0..2 {
            stayers.push(join(&url, &mut incoming).await);
        }
        tokio::spawn(send_chunks(leaver.sender(), payload(9, BIG)));
        for (i, (client, server)) in stayers.iter().enumerate() {
            tokio::spawn(send_chunks(client.sender(), payload(i as u8, BIG)));
            tokio::spawn(send_chunks(server.sender(), payload(50 + i as u8, BIG)));
        }
        // Some of the leaver's upload arrives, then it goes.
        receive_bytes(&mut leaver_at_server, 4 * CHUNK).await;
        drop(leaver);
        loop {
            match leaver_at_server.recv().await {
                Some(PeerEvent::Message(_)) => {}
                Some(PeerEvent::Closed(reason)) => {
                    assert_eq!(reason, CloseReason::Remote);
                    break;
                }
                other => panic!("expected the leaver to close, got {other:?}"),
            }
        }
        for (i, (client, server)) in stayers.iter_mut().enumerate() {
            assert!(receive_bytes(server, BIG).await == payload(i as u8, BIG));
            assert!(receive_bytes(client, BIG).await == payload(50 + i as u8, BIG));
            ping(client, server).await;
        }
        let stats = endpoint.stats();
        assert_eq!((stats.peers, stats.dropped_peers), (2, 0));
    })
    .await;
}
