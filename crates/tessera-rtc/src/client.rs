//! `connect`: a native peer (full ICE, the offering side) with one DataChannel, on its own
//! UDP socket and task.

use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use str0m::change::SdpAnswer;
use str0m::{Candidate, Rtc};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::driver::{COMMAND_QUEUE, Command, Counters, Driver, NewPeer};
use crate::peer::{Peer, PeerId};
use crate::{CHANNEL_LABEL, Config, RtcError};

/// Binds a UDP socket at `bind` (a specific address, port 0 for any: `127.0.0.1:0` on
/// loopback), makes an offer with one DataChannel, passes it to `signal` and applies the SDP
/// answer that `signal` returns (`signal::offer_over_websocket` does this over the
/// coordinator's WebSocket). The peer reports `Open` once the channel is up.
pub async fn connect<F, Fut, E>(
    bind: SocketAddr,
    config: Config,
    signal: F,
) -> Result<Peer, RtcError>
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = Result<String, E>>,
    E: Display,
{
    config.check()?;
    let socket = UdpSocket::bind(bind)
        .await
        .map_err(|source| RtcError::Bind { addr: bind, source })?;
    let local = socket
        .local_addr()
        .map_err(|source| RtcError::Bind { addr: bind, source })?;
    let candidate = Candidate::host(local, "udp").map_err(|_| RtcError::Candidate(local))?;

    let mut rtc = Rtc::builder()
        .set_crypto_provider(Arc::new(str0m::crypto::from_feature_flags()))
        .build(Instant::now());
    rtc.add_local_candidate(candidate);
    let mut changes = rtc.sdp_api();
    changes.add_channel(CHANNEL_LABEL.into());
    let (offer, pending) = changes
        .apply()
        .ok_or_else(|| RtcError::Negotiation("adding a DataChannel made no SDP change".into()))?;

    let answer = signal(offer.to_sdp_string())
        .await
        .map_err(|e| RtcError::Signalling(e.to_string()))?;
    let answer =
        SdpAnswer::from_sdp_string(&answer).map_err(|e| RtcError::InvalidAnswer(e.to_string()))?;
    rtc.sdp_api()
        .accept_answer(pending, answer)
        .map_err(|e| RtcError::Negotiation(e.to_string()))?;

    let (commands, receiver) = mpsc::channel(COMMAND_QUEUE);
    let id = PeerId(0);
    let (peer, link) = crate::peer::pair(id, commands.clone(), &config);
    let driver = Driver::new(
        socket,
        local,
        receiver,
        Arc::new(Counters::default()),
        config,
        true,
    );
    tokio::spawn(driver.run());
    let new = NewPeer {
        id,
        rtc,
        link,
        slot: None,
    };
    commands
        .send(Command::Add(Box::new(new)))
        .await
        .map_err(|_| RtcError::Stopped)?;
    Ok(peer)
}
