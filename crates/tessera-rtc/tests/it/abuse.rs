//! Misbehaviour: garbage on the UDP port and the WebSocket, a peer that never completes ICE,
//! a peer that sends faster than the application reads, a flood of signalling sessions and
//! offers. Each is refused or dropped, and a connected peer carries on.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tessera_protocol::ErrorCode;
use tessera_rtc::signal::{MAX_SESSIONS, MAX_SIGNAL_MESSAGE, SignalMessage};
use tessera_rtc::{CloseReason, Config, Message, PeerEvent, RtcError};
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_tungstenite::tungstenite::Error as WsError;

use crate::{LOOPBACK, bounded, join, join_with, ping, serve};

#[tokio::test]
async fn garbage_datagrams_are_counted_and_ignored() {
    bounded(async {
        let (endpoint, url, mut incoming) = serve(Config::default()).await;
        let (mut client, mut server) = join(&url, &mut incoming).await;
        let before = endpoint.stats();
        let attacker = tokio::net::UdpSocket::bind(LOOPBACK).await.expect("bind");
        let datagrams: [&[u8]; 6] = [
            b"",
            b"\xff\xff\xff\xff garbage",
            // Looks like DTLS by its first byte, from an address no peer uses.
            b"\x16\xfe\xfd\x00\x00\x00\x00\x00\x00\x00\x00\x00\x10junk",
            // A STUN header with the magic cookie and nothing valid after it.
            b"\x00\x01\x00\x08\x21\x12\xa4\x42abcdefghijkl\x00\x06\x00\x04user",
            // Looks like RTP.
            b"\x80\x60\x00\x01\x00\x00\x00\x01\x00\x00\x00\x02payload",
            &[0x42; 1500],
        ];
        for datagram in datagrams {
            attacker
                .send_to(datagram, endpoint.local_addr())
                .await
                .expect("send garbage");
        }
        // The endpoint reads its socket in order: once a message sent afterwards has made
        // the round trip, every garbage datagram has been handled.
        ping(&mut client, &mut server).await;
        let after = endpoint.stats();
        let ignored = (after.garbage_datagrams + after.unmatched_datagrams)
            - (before.garbage_datagrams + before.unmatched_datagrams);
        assert_eq!(ignored, datagrams.len() as u64, "{after:?}");
        assert_eq!((after.peers, after.dropped_peers), (1, 0));
    })
    .await;
}

#[tokio::test]
async fn a_peer_that_never_completes_ice_is_dropped() {
    bounded(async {
        let config = Config {
            connect_timeout: Duration::from_millis(300),
            ..Config::default()
        };
        let (endpoint, url, mut incoming) = serve(config).await;
        let (mut client, mut server) = join(&url, &mut incoming).await;
        // A real offer from a peer that then goes silent.
        let mut silent = str0m::Rtc::new(Instant::now());
        let mut changes = silent.sdp_api();
        changes.add_channel("tessera".into());
        let (offer, _pending) = changes.apply().expect("offer");
        let (_answer, mut ghost) = endpoint
            .accept_offer(&offer.to_sdp_string())
            .await
            .expect("accept");
        assert_eq!(
            ghost.opened().await.err().map(|e| e.to_string()),
            Some(format!(
                "peer {} closed before its DataChannel opened: DataChannel did not open in time",
                ghost.id()
            ))
        );
        assert_eq!(endpoint.stats().dropped_peers, 1);
        assert_eq!(endpoint.stats().peers, 1);
        ping(&mut client, &mut server).await;
    })
    .await;
}

#[tokio::test]
async fn a_peer_that_floods_an_application_that_does_not_read_is_dropped() {
    bounded(async {
        let config = Config {
            receive_buffer: 256 * 1024,
            ..Config::default()
        };
        let (endpoint, url, mut incoming) = serve(config.clone()).await;
        let (mut client, mut server) = join_with(&url, &mut incoming, config.clone()).await;
        let (mut flooder, mut flooded) = join_with(&url, &mut incoming, config).await;
        let sender = flooder.sender();
        tokio::spawn(async move {
            for _ in 0..64 {
                if sender
                    .send(Message::Binary(vec![7; 64 * 1024]))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        // The application reads nothing until the flooder sees the endpoint close it; the
        // events already queued are still delivered, then `Closed`.
        assert_eq!(
            flooder.recv().await,
            Some(PeerEvent::Closed(CloseReason::Remote))
        );
        let reason = loop {
            match flooded.recv().await {
                Some(PeerEvent::Message(_)) => {}
                Some(PeerEvent::Closed(reason)) => break reason,
                other => panic!("expected messages then Closed, got {other:?}"),
            }
        };
        assert_eq!(
            reason,
            CloseReason::Overflow {
                what: "receive buffer"
            }
        );
        assert_eq!(endpoint.stats().dropped_peers, 1);
        ping(&mut client, &mut server).await;
    })
    .await;
}

/// Sends `message` on a fresh signalling socket; returns the error reply's code, or `None`
/// when the socket ended without a reply.
async fn refused(url: &str, message: Ws) -> Option<ErrorCode> {
    let (mut socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    // The server may cut the socket while we are still writing a huge message.
    let _ = socket.send(message).await;
    loop {
        match socket.next().await {
            Some(Ok(Ws::Text(text))) => {
                match serde_json::from_str::<SignalMessage>(&text).expect("reply is JSON") {
                    SignalMessage::Error { code, .. } => return Some(code),
                    other => panic!("expected an error reply, got {other:?}"),
                }
            }
            Some(Ok(Ws::Close(_))) | Some(Err(_)) | None => return None,
            Some(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn garbage_on_the_websocket_gets_an_error_reply_and_a_close() {
    bounded(async {
        let (endpoint, url, mut incoming) = serve(Config::default()).await;
        let (mut client, mut server) = join(&url, &mut incoming).await;
        let malformed = Some(ErrorCode::Malformed);
        let cases: Vec<(Ws, Option<ErrorCode>)> = vec![
            (Ws::text("not json"), malformed),
            (Ws::text("[1, 2]"), malformed),
            (Ws::text(r#"{"sdp": "v=0"}"#), malformed),
            (Ws::text(r#"{"type": "hello"}"#), malformed),
            (Ws::text(r#"{"type": "offer"}"#), malformed),
            (Ws::text(r#"{"type": "offer", "sdp": 7}"#), malformed),
            (
                Ws::text(r#"{"type": "offer", "sdp": "v=0 garbage"}"#),
                malformed,
            ),
            (Ws::text(r#"{"type": "answer", "sdp": "v=0"}"#), malformed),
            (Ws::binary(vec![0u8; 16]), malformed),
            (
                Ws::text(format!(
                    r#"{{"type": "offer", "sdp": "{}"}}"#,
                    "x".repeat(MAX_SIGNAL_MESSAGE)
                )),
                Some(ErrorCode::TooLarge),
            ),
            // Far over the limit: the WebSocket layer ends the socket, with a reply if it can.
            (Ws::text("y".repeat(16 * MAX_SIGNAL_MESSAGE)), None),
        ];
        for (message, expected) in cases {
            let shown: String = format!("{message:?}").chars().take(80).collect();
            let got = refused(&url, message).await;
            match expected {
                Some(code) => assert_eq!(got, Some(code), "{shown}"),
                None => assert!(
                    matches!(got, None | Some(ErrorCode::Malformed)),
                    "{shown}: {got:?}"
                ),
            }
        }
        let stats = endpoint.stats();
        assert_eq!((stats.peers, stats.dropped_peers), (1, 0));
        ping(&mut client, &mut server).await;
        // And signalling still works.
        let (mut second, mut second_at_server) = join(&url, &mut incoming).await;
        ping(&mut second, &mut second_at_server).await;
    })
    .await;
}

/// Far more signalling sockets than `MAX_SESSIONS` at once, then far more offers than
/// `Config::max_peers`: every one beyond a limit gets a clear refusal (HTTP 503, or an error
/// reply naming the limit), the limits hold exactly, and a connected peer never notices.
#[tokio::test]
async fn a_flood_of_sessions_and_offers_is_refused_and_a_connected_peer_carries_on() {
    bounded(async {
        let max_peers = 8;
        let config = Config {
            max_peers,
            ..Config::default()
        };
        let (endpoint, url, mut incoming) = serve(config).await;
        let (mut client, mut server) = join(&url, &mut incoming).await;

        // Sessions that open and say nothing hold their place until the offer timeout.
        let excess = 64;
        let attempts = futures::future::join_all(
            (0..MAX_SESSIONS + excess).map(|_| tokio_tungstenite::connect_async(url.as_str())),
        )
        .await;
        let mut open = Vec::new();
        let mut refused = 0;
        for attempt in attempts {
            match attempt {
                Ok((socket, _)) => open.push(socket),
                Err(WsError::Http(response)) => {
                    assert_eq!(response.status(), 503, "{response:?}");
                    let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).to_string();
                    assert_eq!(body, format!("{MAX_SESSIONS} signalling sessions are open already"));
                    refused += 1;
                }
                Err(e) => panic!("a signalling connection failed without a refusal: {e}"),
            }
        }
        assert_eq!((open.len(), refused), (MAX_SESSIONS, excess));
        ping(&mut client, &mut server).await;

        // Each held session ends with an error reply; its place is free once the reply is read.
        for socket in &mut open {
            socket.send(Ws::text("not an offer")).await.expect("send");
        }
        for mut socket in open {
            match socket.next().await {
                Some(Ok(Ws::Text(text))) => assert!(matches!(
                    serde_json::from_str::<SignalMessage>(&text).expect("reply is JSON"),
                    SignalMessage::Error { code: ErrorCode::Malformed, .. }
                )),
                other => panic!("expected an error reply, got {other:?}"),
            }
        }

        // One real offer, sent many times at once: the endpoint answers until it holds
        // `max_peers` peers and refuses the rest by name.
        let mut rtc = str0m::Rtc::new(Instant::now());
        let mut changes = rtc.sdp_api();
        changes.add_channel("tessera".into());
        let (offer, _pending) = changes.apply().expect("offer");
        let offer = offer.to_sdp_string();
        let offers = 200;
        let replies = futures::future::join_all(
            (0..offers).map(|_| tessera_rtc::signal::offer_over_websocket(&url, offer.clone())),
        )
        .await;
        let full = format!("endpoint is full: {max_peers} peers already");
        let mut answered = 0;
        for reply in replies {
            match reply {
                Ok(_) => answered += 1,
                Err(RtcError::Signalling(message)) if message.contains(&full) => {}
                Err(e) => panic!("an offer was neither answered nor refused as full: {e}"),
            }
        }
        assert_eq!(answered, max_peers - 1, "one place is the connected peer's");
        let stats = endpoint.stats();
        assert_eq!((stats.peers, stats.dropped_peers), (max_peers, 0));
        ping(&mut client, &mut server).await;
    })
    .await;
}
