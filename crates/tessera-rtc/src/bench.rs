//! `bench_round_trip`: the round-trip latency of one frame over a loopback DataChannel,
//! an `Endpoint` echoing to a `connect`ed client in the same process.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::{Config, Endpoint, Message, PeerEvent, RtcError, connect};

/// Round trips not counted, so that connection set-up and SCTP's slow start are not measured.
const WARM_UP: usize = 16;

/// Round-trip times of `iterations` frames of `frame_len` bytes, one in flight at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundTrip {
    pub iterations: usize,
    pub frame_len: usize,
    pub min: Duration,
    pub median: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl fmt::Display for RoundTrip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} round trips of {} bytes over a loopback DataChannel: median {:.1?}, p99 {:.1?} (min {:.1?}, max {:.1?})",
            self.iterations, self.frame_len, self.median, self.p99, self.min, self.max
        )
    }
}

/// Sends a `frame_len`-byte binary frame, waits for its echo, `iterations` times (after a
/// short warm-up), over a fresh endpoint and client on 127.0.0.1.
pub async fn bench_round_trip(iterations: usize, frame_len: usize) -> Result<RoundTrip, RtcError> {
    let config = Config::default();
    if iterations == 0 || frame_len > config.max_message {
        return Err(RtcError::Config(format!(
            "bench needs at least one iteration and a frame of at most {} bytes, got {iterations} and {frame_len}",
            config.max_message
        )));
    }
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let endpoint = Endpoint::bind(loopback, config.clone()).await?;
    let (accepted, mut incoming) = mpsc::channel(1);
    let answering = endpoint.clone();
    let mut client = connect(loopback, config, |offer| async move {
        let (answer, peer) = answering.accept_offer(&offer).await?;
        accepted.send(peer).await.map_err(|_| RtcError::Stopped)?;
        Ok::<_, RtcError>(answer)
    })
    .await?;
    let mut server = incoming.recv().await.ok_or(RtcError::Stopped)?;
    let echo = tokio::spawn(async move {
        while let Some(event) = server.recv().await {
            match event {
                PeerEvent::Message(message) => server.send(message).await?,
                PeerEvent::Closed(_) => break,
                PeerEvent::Connected | PeerEvent::Open => {}
            }
        }
        Ok::<_, RtcError>(())
    });
    client.opened().await?;

    let frame: Vec<u8> = (0..frame_len).map(|i| (i % 251) as u8).collect();
    let mut samples = Vec::with_capacity(iterations);
    for i in 0..WARM_UP + iterations {
        let start = Instant::now();
        client.send(Message::Binary(frame.clone())).await?;
        loop {
            match client.recv().await {
                Some(PeerEvent::Message(Message::Binary(back))) if back.len() == frame_len => break,
                Some(PeerEvent::Message(_)) => {
                    return Err(RtcError::Config("the echo differs from the frame".into()));
                }
                Some(PeerEvent::Connected | PeerEvent::Open) => {}
                Some(PeerEvent::Closed(_)) | None => return Err(RtcError::Closed(client.id())),
            }
        }
        if i >= WARM_UP {
            samples.push(start.elapsed());
        }
    }
    client.close().await;
    // The echo ends with the peer; its result says nothing about the figures.
    let _ = echo.await;

    samples.sort_unstable();
    let at = |q: usize| samples[(samples.len() * q).div_ceil(100).saturating_sub(1)];
    Ok(RoundTrip {
        iterations,
        frame_len,
        min: samples[0],
        median: at(50),
        p99: at(99),
        max: samples[samples.len() - 1],
    })
}
