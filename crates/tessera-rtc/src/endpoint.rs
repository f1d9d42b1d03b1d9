//! `Endpoint`: the coordinator's side. ICE-lite on one UDP socket, answering offers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use str0m::change::SdpOffer;
use str0m::config::{CryptoProvider, DtlsCert};
use str0m::{Candidate, Rtc};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::driver::{COMMAND_QUEUE, Command, Counters, Driver, NewPeer, Slot};
use crate::peer::{Peer, PeerId};
use crate::{Config, RtcError};

/// Largest SDP offer accepted. Browsers' DataChannel-only offers are about 1 KiB.
pub const MAX_OFFER: usize = 16 * 1024;

/// The coordinator's WebRTC endpoint; cheap to clone. Its task stops when the endpoint and
/// every peer it made are dropped.
#[derive(Clone)]
pub struct Endpoint {
    inner: Arc<Inner>,
}

struct Inner {
    commands: mpsc::Sender<Command>,
    local_addr: SocketAddr,
    config: Config,
    counters: Arc<Counters>,
    crypto: Arc<CryptoProvider>,
    /// One certificate for every peer: generating one per offer costs a key pair each.
    cert: DtlsCert,
    next_id: AtomicU64,
}

/// What the endpoint has seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointStats {
    /// Peers connecting or connected now.
    pub peers: usize,
    /// Datagrams that were not STUN, DTLS, RTP or RTCP.
    pub garbage_datagrams: u64,
    /// Well-formed datagrams that no peer accepted.
    pub unmatched_datagrams: u64,
    /// Peers closed for misbehaving: protocol errors, timeouts, overflows.
    pub dropped_peers: u64,
}

impl Endpoint {
    /// Binds the UDP socket and starts the task on the current tokio runtime. `addr` must be
    /// a specific address (it is the ICE candidate offered to peers); port 0 picks one.
    pub async fn bind(addr: SocketAddr, config: Config) -> Result<Endpoint, RtcError> {
        config.check()?;
        let socket = UdpSocket::bind(addr)
            .await
            .map_err(|source| RtcError::Bind { addr, source })?;
        let local_addr = socket
            .local_addr()
            .map_err(|source| RtcError::Bind { addr, source })?;
        // Checked here so that every offer can build its candidate.
        Candidate::host(local_addr, "udp").map_err(|_| RtcError::Candidate(local_addr))?;
        let crypto = Arc::new(str0m::crypto::from_feature_flags());
        let cert = crypto
            .dtls_provider
            .generate_certificate()
            .ok_or(RtcError::Certificate)?;
        let counters = Arc::new(Counters::default());
        let (commands, receiver) = mpsc::channel(COMMAND_QUEUE);
        let driver = Driver::new(
            socket,
            local_addr,
            receiver,
            Arc::clone(&counters),
            config.clone(),
            false,
        );
        tokio::spawn(driver.run());
        Ok(Endpoint {
            inner: Arc::new(Inner {
                commands,
                local_addr,
                config,
                counters,
                crypto,
                cert,
                next_id: AtomicU64::new(1),
            }),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    pub fn stats(&self) -> EndpointStats {
        let c = &self.inner.counters;
        EndpointStats {
            peers: c.peers.load(Ordering::Relaxed),
            garbage_datagrams: c.garbage_datagrams.load(Ordering::Relaxed),
            unmatched_datagrams: c.unmatched_datagrams.load(Ordering::Relaxed),
            dropped_peers: c.dropped_peers.load(Ordering::Relaxed),
        }
    }

    /// Answers an SDP offer. The returned `Peer` reports `Open` once the remote side has
    /// connected, or `Closed(ConnectTimeout)` if it never does.
    pub async fn accept_offer(&self, offer: &str) -> Result<(String, Peer), RtcError> {
        let inner = &self.inner;
        if offer.len() > MAX_OFFER {
            return Err(RtcError::OfferTooLarge {
                len: offer.len(),
                max: MAX_OFFER,
            });
        }
        let offer =
            SdpOffer::from_sdp_string(offer).map_err(|e| RtcError::InvalidOffer(e.to_string()))?;
        let slot = self.reserve()?;
        let mut rtc = Rtc::builder()
            .set_ice_lite(true)
            .set_crypto_provider(Arc::clone(&inner.crypto))
            .set_dtls_cert(inner.cert.clone())
            .build(Instant::now());
        let candidate = Candidate::host(inner.local_addr, "udp")
            .map_err(|_| RtcError::Candidate(inner.local_addr))?;
        rtc.add_local_candidate(candidate);
        let answer = rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| RtcError::Negotiation(e.to_string()))?;
        let id = PeerId(inner.next_id.fetch_add(1, Ordering::Relaxed));
        let (peer, link) = crate::peer::pair(id, inner.commands.clone(), &inner.config);
        let new = NewPeer {
            id,
            rtc,
            link,
            slot: Some(slot),
        };
        inner
            .commands
            .send(Command::Add(Box::new(new)))
            .await
            .map_err(|_| RtcError::Stopped)?;
        Ok((answer.to_sdp_string(), peer))
    }

    fn reserve(&self) -> Result<Slot, RtcError> {
        let counters = &self.inner.counters;
        let max = self.inner.config.max_peers;
        counters
            .peers
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| RtcError::Full { max })?;
        Ok(Slot(Arc::clone(counters)))
    }
}
